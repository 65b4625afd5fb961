"""Image-caption training data (methods trained without masks, e.g. PACL), in the forms corpora
come in, and a deterministic loader.

Sources (`load_caption_set(name, root)`):

- ``synthetic-captions``: the proving ground's scenes generated on the fly with their captions
  (`SyntheticCaptionSet`; the scenes of `zegkit.train.data.SyntheticTrainingSet`, masks unused).
- ``captions`` with `root` one of:
    a CSV / TSV file with a header naming an image column (``image``, ``filepath``,
    ``file_name``, ``path``) and a caption column (``caption``, ``text``, ``title``);
    a JSONL file of objects with those keys (the caption may be a list of captions);
    a folder holding ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face's imagefolder layout),
    or images with a caption file of the same stem beside each (``0001.jpg`` + ``0001.txt``);
    WebDataset tar shards, as CC3M / CC12M / YFCC are distributed: a ``.tar`` file, a folder of
    them, or a brace pattern ``shards/cc3m-{000000..000331}.tar``. A sample is the run of tar
    members sharing a key (the member name up to the first dot of its base name): an image
    (``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``) and a caption (``txt``, or ``json`` with a
    ``caption`` / ``text`` field). Samples lacking either are skipped.
  Relative image paths are relative to the listing file's folder.

Items: the image resized so its short side is the crop and centre-cropped (CLIP's preprocessing;
no augmentation), float32 (3, crop, crop) in [0, 1], and one caption: one of the image's captions
chosen by the draw's generator, or, with probability `noun_prompt_prob`, a noun named in it
wrapped in a CLIP template ("a photo of a star.") — the paper's noun-prompt augmentation, one text
per image so the contrastive batch stays B x B. Nouns are matched from a given list (the proving
ground's class names); zegkit has no part-of-speech tagger, so corpora get noun prompts only when
given a list.

Determinism: files, folders, CSV and JSONL are map-style and use the mask loader's keys
(`StepSampler`: the items of a step depend only on (seed, step)), so a resumed or N-process run
sees the one-process batches. Tar shards are streamed: in epoch e the shard order is
``permutation(num_shards, seed, e)`` and shard position p goes to the reader slot
``p % (world_size * num_workers)``, slot = rank * num_workers + worker, so within an epoch every
sample is read by exactly one loader worker of one process. A slot's stream runs epoch after
epoch; a resumed run skips (without decoding) the samples its slots already gave.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from zegkit.data import synthetic
from zegkit.data.worker_errors import CaughtErrors, CaughtStreamErrors, collate_caught
from zegkit.io import list_images, load_image, to_tensor
from zegkit.text import IMAGENET_TEMPLATES
from zegkit.train.data import (
    DEFAULT_CHECK_SAMPLE,
    DEFAULT_SYNTHETIC_SCENES,
    PROBLEMS_SHOWN,
    StepSampler,
    SyntheticTrainingSet,
    _check_indices,
    draw_rng,
    permutation,
)

PathLike = str | os.PathLike
CAPTION_DATASETS = ("synthetic-captions", "captions")
IMAGE_COLUMNS = ("image", "filepath", "file_name", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "captions")
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SHARD_CAPTION_EXTENSIONS = ("txt", "json")
# The proving ground's noun-prompt rate: P(an item's text is "a photo of a <noun>." for a class
# its caption names instead of the caption). zegkit's choice (the paper adds noun prompts
# beside each caption; how they enter the batch is not in what could be read).
SYNTHETIC_NOUN_PROMPT_PROB = 0.3
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_caption_dataset(name: str) -> bool:
    """Whether `name` is an image-caption training set (not a segmentation dataset)."""
    return name in CAPTION_DATASETS


# ---- map-style sources ------------------------------------------------------------------------
class CaptionCorpus(Dataset):
    """(image file, captions) pairs from a folder, CSV or JSONL listing.

    Attributes:
        entries: (image path, captions) per item.
        nouns: nouns that noun prompts may name (empty: no noun prompts).
    """

    name = "captions"
    class_names: list[str] = []
    seen: list[int] = []
    unseen: list[int] = []

    def __init__(self, entries: Sequence[tuple[Path, tuple[str, ...]]], source: str,
                 nouns: Sequence[str] = (), noun_prompt_prob: float = 0.0) -> None:
        if not entries:
            raise ValueError(f"{source}: no (image, caption) pairs found.")
        self.entries, self.source = list(entries), source
        self.nouns, self.noun_prompt_prob = tuple(nouns), noun_prompt_prob

    def __len__(self) -> int:
        return len(self.entries)

    def item(self, index: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(image float32 (3, H, W) in [0, 1], captions) of entry `index`."""
        path, captions = self.entries[index]
        return to_tensor(load_image(path)), captions

    def check(self, sample: int | None = DEFAULT_CHECK_SAMPLE) -> None:
        """Open images (headers only) before training; fail naming every bad file found.

        Raises:
            ValueError: listing up to 5 missing or unreadable images and how many there are.
        """
        problems = []
        for index in _check_indices(len(self), sample):
            path = self.entries[int(index)][0]
            try:
                with Image.open(path) as image:
                    image.verify()
            except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as error:
                problems.append(f"{path}: {error}")
        _raise_problems(self.source, problems)


class SyntheticCaptionSet(Dataset):
    """The proving ground's generated scenes with their captions (masks unused).

    Scene i is `SyntheticTrainingSet(num_scenes, seed, size).scene(i)`: the scenes ZegCLIP's
    synthetic recipe trains on, never a `write_dataset` evaluation scene. The class names and
    split are the proving ground's (for evaluation; the captions name all 20 classes).
    """

    name = "synthetic"

    def __init__(self, num_scenes: int = DEFAULT_SYNTHETIC_SCENES, seed: int = 0,
                 size: int = 224, noun_prompt_prob: float = SYNTHETIC_NOUN_PROMPT_PROB) -> None:
        self.scenes = SyntheticTrainingSet(num_scenes, seed, size)
        self.class_names, self.seen, self.unseen = (
            self.scenes.class_names, self.scenes.seen, self.scenes.unseen)
        self.nouns, self.noun_prompt_prob = tuple(synthetic.CLASSES), noun_prompt_prob

    def __len__(self) -> int:
        return len(self.scenes)

    def item(self, index: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(image float32 (3, H, W) in [0, 1], captions) of scene `index`."""
        scene = self.scenes.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
        return image, tuple(scene.captions)

    def check(self, sample: int | None = None) -> None:
        """Generated scenes have no files and are valid by construction."""


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:PROBLEMS_SHOWN])
        raise ValueError(f"{source}: {len(problems)} bad training items; fix or remove them "
                         f"before training:\n  {shown}")


def _column(names: Sequence[str], wanted: Sequence[str], what: str, source: str) -> str:
    for name in wanted:
        if name in names:
            return name
    raise ValueError(f"{source} has no {what} column; name one of {list(wanted)} "
                     f"(its columns: {list(names)}).")


def _captions(value: object, where: str) -> tuple[str, ...]:
    captions = (value,) if isinstance(value, str) else tuple(value) if isinstance(
        value, list) else ()
    captions = tuple(c.strip() for c in captions if isinstance(c, str) and c.strip())
    if not captions:
        raise ValueError(f"{where}: the caption is empty or not text ({value!r}).")
    return captions


def read_csv(path: Path) -> CaptionCorpus:
    """A CSV/TSV listing (header: an image column and a caption column)."""
    with open(path, newline="", encoding="utf-8") as handle:
        header = handle.readline()
        delimiter = "\t" if path.suffix == ".tsv" or header.count("\t") > header.count(
            ",") else ","
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=delimiter)
        names = reader.fieldnames or []
        image, caption = (_column(names, IMAGE_COLUMNS, "image", str(path)),
                          _column(names, CAPTION_COLUMNS, "caption", str(path)))
        entries = [(path.parent / row[image], _captions(row[caption], f"{path}:{number}"))
                   for number, row in enumerate(reader, start=2)]
    return CaptionCorpus(entries, str(path))


def read_jsonl(path: Path) -> CaptionCorpus:
    """A JSONL listing: one object per line with an image key and a caption key."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error}).") from None
        where = f"{path}:{number}"
        image = _column(list(record), IMAGE_COLUMNS, "image", where)
        caption = _column(list(record), CAPTION_COLUMNS, "caption", where)
        entries.append((path.parent / record[image], _captions(record[caption], where)))
    return CaptionCorpus(entries, str(path))


def read_folder(root: Path) -> CaptionCorpus:
    """A folder: metadata.jsonl / metadata.csv inside, or images with same-stem .txt captions."""
    for listing, reader in (("metadata.jsonl", read_jsonl), ("metadata.csv", read_csv)):
        if (root / listing).is_file():
            return reader(root / listing)
    entries, missing = [], []
    for image in list_images(root):
        text = image.with_suffix(".txt")
        if text.is_file():
            entries.append((image, _captions(text.read_text(encoding="utf-8"), str(text))))
        else:
            missing.append(image.name)
    if not entries:
        raise ValueError(f"{root}: no captioned images found; put metadata.jsonl (file_name, "
                         "text) in the folder, or a <stem>.txt caption beside each image "
                         f"({len(missing)} images have none).")
    return CaptionCorpus(entries, str(root))


# ---- WebDataset shards ------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar'] (zero padding kept)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for number in range(int(first), int(last) + 1)
            for name in expand_braces(f"{head}{number:0{width}d}{tail}")]


def shard_paths(root: PathLike) -> list[Path]:
    """The shards of a .tar file, a folder of .tar files or a brace pattern, in name order.

    Raises:
        FileNotFoundError: no shard there, or shards of the pattern that do not exist.
    """
    text = str(root)
    if _BRACES.search(text):
        paths = [Path(name).expanduser() for name in expand_braces(text)]
    elif Path(text).expanduser().is_dir():
        paths = sorted(Path(text).expanduser().glob("*.tar"))
    else:
        paths = [Path(text).expanduser()]
    missing = [str(path) for path in paths if not path.is_file()]
    if not paths or missing:
        raise FileNotFoundError(f"WebDataset shards not found: {missing[:PROBLEMS_SHOWN] or text}"
                                f"{f' ({len(missing)} missing)' if missing else ''}.")
    return paths


@dataclass
class ShardSample:
    """One sample of a shard: its key, encoded image bytes and captions."""

    key: str
    image: bytes = b""
    captions: tuple[str, ...] = ()


def _split_member(name: str) -> tuple[str, str]:
    """A tar member name -> (key, extension): 'dir/000017.jpg' -> ('dir/000017', 'jpg')."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _shard_caption(extension: str, data: bytes, where: str) -> tuple[str, ...]:
    if extension == "txt":
        return _captions(data.decode("utf-8"), where)
    record = json.loads(data.decode("utf-8"))
    value = next((record[k] for k in CAPTION_COLUMNS if isinstance(record, dict) and k in record),
                 None)
    return _captions(value, where)


def read_shard(path: Path) -> Iterator[ShardSample]:
    """The complete samples (an image and a caption) of one tar shard, in member order."""
    current: ShardSample | None = None
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _split_member(member.name)
            if current is not None and key != current.key:
                if current.image and current.captions:
                    yield current
                current = None
            current = current or ShardSample(key)
            if extension in SHARD_IMAGE_EXTENSIONS or extension in SHARD_CAPTION_EXTENSIONS:
                data = archive.extractfile(member).read()
                if extension in SHARD_IMAGE_EXTENSIONS:
                    current.image = data
                elif not current.captions:
                    current.captions = _shard_caption(extension, data, f"{path}:{member.name}")
    if current is not None and current.image and current.captions:
        yield current


class ShardSet:
    """WebDataset tar shards of (image, caption) samples (streamed; see the module docstring)."""

    name = "captions"
    class_names: list[str] = []
    seen: list[int] = []
    unseen: list[int] = []

    def __init__(self, root: PathLike, nouns: Sequence[str] = (),
                 noun_prompt_prob: float = 0.0) -> None:
        self.shards = shard_paths(root)
        self.source = str(root)
        self.nouns, self.noun_prompt_prob = tuple(nouns), noun_prompt_prob

    def __len__(self) -> int:
        return len(self.shards)

    def check(self, sample: int | None = None) -> None:
        """Open every shard as a tar archive before training (a truncated or foreign file fails).

        Raises:
            ValueError: naming up to 5 unreadable shards.
        """
        problems = []
        for path in self.shards:
            try:
                with tarfile.open(path, "r|*") as archive:
                    archive.next()
            except (tarfile.TarError, OSError) as error:
                problems.append(f"{path}: {error}")
        _raise_problems(self.source, problems)


CaptionSet = CaptionCorpus | SyntheticCaptionSet | ShardSet


def load_caption_set(name: str, root: PathLike | None = None, *, size: int = 224,
                     seed: int = 0) -> CaptionSet:
    """An image-caption training set by name (see the module docstring).

    Raises:
        ValueError: unknown name, a missing root for "captions", or an unreadable listing.
        FileNotFoundError: the root does not exist.
    """
    if name == "synthetic-captions":
        if root is not None:
            raise ValueError("synthetic-captions are generated; pass no --data-root (or use "
                             "--recipe with dataset 'captions' for captions on disk).")
        return SyntheticCaptionSet(seed=seed, size=size)
    if name != "captions":
        raise ValueError(f"Unknown caption dataset {name!r}; known: {list(CAPTION_DATASETS)}.")
    if root is None:
        raise ValueError("captions: pass the corpus with --data-root (a CSV/JSONL file, a folder, "
                         "or WebDataset .tar shards).")
    text = str(root)
    path = Path(text).expanduser()
    if _BRACES.search(text) or path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return ShardSet(text)
    if not path.exists():
        raise FileNotFoundError(f"Caption corpus {text!r} does not exist.")
    if path.is_dir():
        return read_folder(path)
    if path.suffix in (".csv", ".tsv"):
        return read_csv(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise ValueError(f"{text}: unknown corpus format; pass a .csv/.tsv/.jsonl listing, a folder "
                     "or WebDataset .tar shards.")


# ---- items --------------------------------------------------------------------------------------
def fit_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> float32 (3, crop, crop) in [0, 1]: short side resized to `crop`
    (bicubic, antialiased), then the centre crop (CLIP's preprocessing)."""
    pixels = image.float()[None]
    height, width = pixels.shape[-2:]
    if min(height, width) != crop:
        scale = crop / min(height, width)
        size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
        pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False,
                               antialias=True).clamp(0, 1)
    top, left = (pixels.shape[-2] - crop) // 2, (pixels.shape[-1] - crop) // 2
    return pixels[0, :, top:top + crop, left:left + crop].contiguous()


def named_nouns(caption: str, nouns: Sequence[str]) -> list[str]:
    """The nouns of `nouns` that `caption` names (as a word, singular or plural)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return [noun for noun in nouns if noun in words or synthetic.plural(noun) in words]


def choose_caption(captions: Sequence[str], rng: np.random.Generator, nouns: Sequence[str],
                   noun_prompt_prob: float) -> str:
    """One of `captions`, or with probability `noun_prompt_prob` a template around a noun it
    names (no noun named: the caption)."""
    caption = str(captions[int(rng.integers(len(captions)))])
    if noun_prompt_prob and rng.random() < noun_prompt_prob:
        named = named_nouns(caption, nouns)
        if named:
            template = IMAGENET_TEMPLATES[int(rng.integers(len(IMAGENET_TEMPLATES)))]
            return template.format(named[int(rng.integers(len(named)))])
    return caption


class CaptionItems(Dataset):
    """Training items by key ``(index, draw)`` -> (image float32 (3, crop, crop), caption)."""

    def __init__(self, dataset: CaptionCorpus | SyntheticCaptionSet, crop: int, seed: int) -> None:
        self.dataset, self.crop, self.seed = dataset, crop, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        index, draw = key
        image, captions = self.dataset.item(index)
        caption = choose_caption(captions, draw_rng(self.seed, draw), self.dataset.nouns,
                                 self.dataset.noun_prompt_prob)
        return fit_crop(image, self.crop), caption


class ShardStream(IterableDataset):
    """One process's stream of (image float32 (3, crop, crop), caption) from tar shards.

    Args:
        shards: the shard set.
        crop: output size.
        seed: seeds the per-epoch shard order and each sample's caption choice.
        batch_size: this process's batch (the loader's); resume skips whole batches.
        start_step: batches of this process already consumed (resume).
        rank, world_size: this process and the number of processes.
        num_workers: the loader's worker processes (0: the main process reads).
        num_epochs: stop after this many epochs (None: run epoch after epoch).
    """

    def __init__(self, shards: ShardSet, crop: int, *, seed: int, batch_size: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 num_epochs: int | None = None) -> None:
        readers = world_size * max(num_workers, 1)
        if len(shards) < readers:
            raise ValueError(
                f"{shards.source}: {len(shards)} shards cannot be split over {world_size} "
                f"processes x {max(num_workers, 1)} loader workers without duplicates; use at "
                f"least {readers} shards or fewer workers (--num-workers).")
        self.shards, self.crop, self.seed, self.batch_size = shards, crop, seed, batch_size
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.num_workers, self.num_epochs = max(num_workers, 1), num_epochs

    def _role(self) -> int:
        """This worker's reader slot within the process. The loader takes batch t from worker
        t % workers; after a resume at step s it starts with worker 0, which must give batch s."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.start_step) % self.num_workers

    def _skip(self, role: int) -> int:
        """Samples this role gave before `start_step`: its batches t < start_step."""
        batches = max(0, (self.start_step - role + self.num_workers - 1) // self.num_workers)
        return batches * self.batch_size

    def slot_shards(self, epoch: int, slot: int) -> list[Path]:
        """The shards reader `slot` (rank * workers + role) reads in `epoch`."""
        order = permutation(len(self.shards), self.seed, epoch)
        readers = self.world_size * self.num_workers
        return [self.shards.shards[i] for i in order[slot::readers]]

    def samples(self) -> Iterator[tuple[int, ShardSample]]:
        """(sample number in this slot's stream, sample), epoch after epoch."""
        slot = self.rank * self.num_workers + self._role()
        number, epoch = 0, 0
        while self.num_epochs is None or epoch < self.num_epochs:
            found = False
            for path in self.slot_shards(epoch, slot):
                for sample in read_shard(path):
                    found = True
                    yield number, sample
                    number += 1
            if not found:
                raise ValueError(f"{self.shards.source}: the shards of reader {slot} hold no "
                                 "complete (image, caption) sample.")
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        slot = self.rank * self.num_workers + self._role()
        skip = self._skip(self._role())
        for number, sample in self.samples():
            if number < skip:
                continue
            image = to_tensor(load_image(Image.open(io.BytesIO(sample.image))))
            rng = draw_rng(self.seed, number * self.world_size * self.num_workers + slot)
            caption = choose_caption(sample.captions, rng, self.shards.nouns,
                                     self.shards.noun_prompt_prob)
            yield fit_crop(image, self.crop), caption


def build_caption_loader(
    dataset: CaptionSet,
    *,
    crop: int,
    batch_size: int,
    seed: int,
    num_steps: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> DataLoader:
    """The loader of a caption training run: per step, this rank's ``(images float32
    (B / world_size, 3, crop, crop) in [0, 1], captions list of B / world_size str)``.

    Map-style sets follow `zegkit.train.data.build_train_loader`'s keys (a step's items depend
    only on (seed, step)); shards stream (see `ShardStream`). Arguments and bad items (a caught
    error, for `raise_caught`) as there.

    Raises:
        ValueError: a global batch that does not split over the processes, too few shards.
    """
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"The global batch size ({batch_size}) must be a positive multiple of "
                         f"the number of processes ({world_size}).")
    common = dict(num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                  persistent_workers=num_workers > 0, collate_fn=collate_caught)
    if isinstance(dataset, ShardSet):
        stream = ShardStream(dataset, crop, seed=seed, batch_size=batch_size // world_size,
                             start_step=start_step, rank=rank, world_size=world_size,
                             num_workers=num_workers)
        return DataLoader(CaughtStreamErrors(stream), batch_size=batch_size // world_size,
                          **common)
    sampler = StepSampler(len(dataset), batch_size, seed=seed, num_steps=num_steps,
                          start_step=start_step, rank=rank, world_size=world_size)
    return DataLoader(CaughtErrors(CaptionItems(dataset, crop, seed)), batch_sampler=sampler,
                      **common)


__all__ = [
    "CAPTION_DATASETS",
    "CaptionCorpus",
    "ShardSet",
    "ShardStream",
    "SyntheticCaptionSet",
    "build_caption_loader",
    "is_caption_dataset",
    "load_caption_set",
    "read_shard",
    "shard_paths",
]
