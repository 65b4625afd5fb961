"""Caption training data: CSV / JSONL / folder listings, WebDataset shards (parsing, every sample
exactly once per epoch over 2 ranks x 2 workers, exact resume), the synthetic captions, and
noun prompts."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from zegkit.data.worker_errors import raise_caught
from zegkit.train.captions import (
    ShardSet,
    ShardStream,
    SyntheticCaptionSet,
    build_caption_loader,
    choose_caption,
    expand_braces,
    load_caption_set,
    read_shard,
)


def _png(value: int, size: tuple[int, int] = (20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path, sizes: list[int]) -> list[str]:
    """Shards of `sizes` samples; sample captions are unique ("caption <n>"). Returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    captions, number = [], 0
    for index, size in enumerate(sizes):
        with tarfile.open(folder / f"shard-{index:03d}.tar", "w") as archive:
            for _ in range(size):
                key = f"s{index:03d}/{number:06d}"
                _add(archive, f"{key}.png", _png(number % 250))
                if number % 2:
                    _add(archive, f"{key}.json", json.dumps({"caption": f"caption {number}"})
                         .encode())
                else:
                    _add(archive, f"{key}.txt", f"caption {number}".encode())
                captions.append(f"caption {number}")
                number += 1
    return captions


def test_read_shard_groups_members_by_key_and_skips_incomplete_samples(tmp_path):
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as archive:
        _add(archive, "a.png", _png(1))
        _add(archive, "a.txt", b"a red star")
        _add(archive, "b.png", _png(2))  # no caption: skipped
        _add(archive, "c.txt", b"no image")  # no image: skipped
        _add(archive, "d.seg.png", _png(3))  # key "d", extension "seg.png": not an image part
        _add(archive, "d.jpg", _png(4))
        _add(archive, "d.json", json.dumps({"text": ["two rings", "rings"]}).encode())
    samples = list(read_shard(path))
    assert [(s.key, s.captions) for s in samples] == [("a", ("a red star",)),
                                                       ("d", ("two rings", "rings"))]


def test_shards_are_read_exactly_once_per_epoch_over_2_ranks_x_2_workers(tmp_path):
    captions = _write_shards(tmp_path / "shards", [3, 5, 2, 4, 1, 6, 3, 2, 4])
    shards = load_caption_set("captions", tmp_path / "shards")
    assert isinstance(shards, ShardSet) and len(shards) == 9
    for epoch in (0, 1):
        seen = Counter()
        for rank in (0, 1):
            stream = ShardStream(shards, 16, seed=3, batch_size=2, rank=rank, world_size=2,
                                 num_workers=2, num_epochs=epoch + 1)
            loader = DataLoader(stream, batch_size=2, num_workers=2)
            batches = [caption for _, batch in loader for caption in batch]
            # the stream of epoch `epoch` is what follows epoch 0's when num_epochs = 2
            seen.update(batches)
        assert seen == Counter({caption: epoch + 1 for caption in captions})


def test_a_resumed_shard_stream_continues_the_uninterrupted_one(tmp_path):
    _write_shards(tmp_path / "shards", [4, 4, 5, 3])
    shards = ShardSet(tmp_path / "shards")

    def captions(start_step: int, steps: int) -> list[list[str]]:
        stream = ShardStream(shards, 16, seed=0, batch_size=3, start_step=start_step,
                             num_workers=2)
        loader = iter(DataLoader(stream, batch_size=3, num_workers=2))
        return [list(next(loader)[1]) for _ in range(steps)]

    straight = captions(0, 7)
    assert captions(3, 4) == straight[3:]


def test_too_few_shards_for_the_readers_is_an_error(tmp_path):
    _write_shards(tmp_path / "shards", [2, 2])
    with pytest.raises(ValueError, match="at least 4 shards"):
        ShardStream(ShardSet(tmp_path / "shards"), 16, seed=0, batch_size=1, world_size=2,
                    num_workers=2)


def test_brace_patterns_expand_with_padding(tmp_path):
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar",
                                                 "a-011.tar"]
    _write_shards(tmp_path, [1, 1])
    assert len(ShardSet(str(tmp_path / "shard-{000..001}.tar"))) == 2
    with pytest.raises(FileNotFoundError, match="shard-002"):
        ShardSet(str(tmp_path / "shard-{000..002}.tar"))


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for value, name in enumerate(names):
        Image.fromarray(np.full((24, 40, 3), 10 * value, np.uint8)).save(folder / name)


def test_csv_jsonl_and_folder_listings(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg/a.png,a star\nimg/b.png,a ring\n")
    (tmp_path / "pairs.tsv").write_text("image\tcaption\nimg/a.png\ta star\n")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"image": "img/a.png", "captions": ["a star", "one star"]}) + "\n")
    (tmp_path / "img" / "a.txt").write_text("a star\n")
    csv_set = load_caption_set("captions", tmp_path / "pairs.csv")
    assert [c for _, c in csv_set.entries] == [("a star",), ("a ring",)]
    assert load_caption_set("captions", tmp_path / "pairs.tsv").entries[0][1] == ("a star",)
    assert load_caption_set("captions", tmp_path / "pairs.jsonl").entries[0][1] == (
        "a star", "one star")
    folder = load_caption_set("captions", tmp_path / "img")
    assert [(p.name, c) for p, c in folder.entries] == [("a.png", ("a star",))]
    image, captions = csv_set.item(1)
    assert image.shape == (3, 24, 40) and captions == ("a ring",)
    csv_set.check()


def test_bad_listings_fail_clearly(tmp_path):
    (tmp_path / "bad.csv").write_text("picture,caption\nx.png,a star\n")
    with pytest.raises(ValueError, match="no image column"):
        load_caption_set("captions", tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("image,caption\nnowhere.png,a star\n")
    with pytest.raises(ValueError, match="nowhere.png"):
        load_caption_set("captions", tmp_path / "missing.csv").check()
    with pytest.raises(ValueError, match="--data-root"):
        load_caption_set("captions")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"image": "x.png", "caption": " "}) + "\n")
    with pytest.raises(ValueError, match="empty.jsonl:1: the caption is empty"):
        load_caption_set("captions", tmp_path / "empty.jsonl")


def test_loader_items_and_noun_prompts():
    dataset = SyntheticCaptionSet(num_scenes=8, size=64, noun_prompt_prob=0.0)
    loader = build_caption_loader(dataset, crop=48, batch_size=4, seed=0, num_steps=2)
    images, captions = next(iter(loader))
    assert images.shape == (4, 3, 48, 48) and 0 <= images.min() and images.max() <= 1
    assert all(isinstance(c, str) and c for c in captions)
    rng = np.random.default_rng(0)
    prompts = {choose_caption(["two stars and a ring on grass."], rng, ("star", "ring", "sky"),
                              1.0) for _ in range(50)}
    named = {noun for prompt in prompts for noun in ("star", "ring", "sky") if noun in prompt}
    assert named == {"star", "ring"}  # only nouns the caption names, plural included


def test_bad_data_in_loader_workers_comes_out_as_raised(tmp_path):
    _write_shards(tmp_path / "shards", [2])
    with tarfile.open(tmp_path / "shards" / "shard-001.tar", "w") as archive:
        _add(archive, "bad.png", _png(1))
        _add(archive, "bad.txt", b"  ")  # found only while streaming: check() opens the tar
    shards = load_caption_set("captions", tmp_path / "shards")
    shards.check()
    streamed = build_caption_loader(shards, crop=16, batch_size=2, seed=0, num_steps=4,
                                    num_workers=2)
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg/a.png,a star\nimg/b.png,a ring\n")
    listed = load_caption_set("captions", tmp_path / "pairs.csv")
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")  # damaged after the listing
    keyed = build_caption_loader(listed, crop=16, batch_size=2, seed=0, num_steps=1,
                                 num_workers=1)
    for loader, fragment in ((streamed, r"bad\.txt: the caption is empty"), (keyed, r"b\.png")):
        with pytest.raises(ValueError, match=fragment) as error:
            for batch in loader:
                raise_caught(batch)
        assert "DataLoader worker" not in str(error.value)
