"""What every dataset reader shares: samples on disk -> (image, mask, name), checked lazily.

A reader finds its (image, mask) file pairs once, when it is built, and fails there if the layout
is wrong, a split file is missing, masks are missing, or nothing was found. Each image and mask
is decoded only when asked for (in DataLoader workers), and the mask is checked then: its size
must match the image and its values must be class indices or the ignore index; otherwise the
error names the file and the offending values.

Label conventions follow MMSegmentation's (``mmseg/datasets/basesegdataset.py``): 255 is the
ignore index, and ``reduce_zero_label`` maps 0 -> 255 and v -> v - 1 for datasets whose 0 is
"unlabelled / other" rather than a class (ADE20K, Pascal Context 59, VOC20).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from zegkit.text import parse_classes, read_class_file

# Label value for "no ground truth here" (MMSegmentation's ignore_index).
IGNORE_INDEX = 255
# Shipped class-name files, src/zegkit/data/classnames/<name>.txt.
CLASSNAMES_PACKAGE = "zegkit.data"
CLASSNAMES_FOLDER = "classnames"
# Single-channel PIL modes a label PNG may have (palette indices, grey, 16/32-bit integers).
LABEL_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")
# How many missing files / bad values an error message lists before "and N more".
LIST_IN_ERRORS = 5


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its id, its image file and its label file (None: unlabelled)."""

    name: str
    image: Path
    mask: Path | None


def shipped_class_names(name: str) -> list[str]:
    """The class names (with synonyms, "a; b; c") of a shipped class-name file.

    Args:
        name: file stem under ``zegkit/data/classnames``, e.g. "voc21" or "ade150".

    Raises:
        ValueError: no such file; the message lists the shipped ones.
    """
    folder = resources.files(CLASSNAMES_PACKAGE) / CLASSNAMES_FOLDER
    available = sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".txt"))
    if name not in available:
        raise ValueError(f"No shipped class-name file {name!r}; available: {available}.")
    with resources.as_file(folder / f"{name}.txt") as path:
        return read_class_file(path)


def display_name(class_name: str) -> str:
    """The display name of a class entry: its first synonym ("person; people" -> "person")."""
    return class_name.split(";")[0].strip()


def _short_list(items: Sequence[object]) -> str:
    shown = ", ".join(str(item) for item in items[:LIST_IN_ERRORS])
    more = len(items) - LIST_IN_ERRORS
    return shown + (f" and {more} more" if more > 0 else "")


def describe_folder(path: Path) -> str:
    """What is at `path`, for error messages: 'missing', 'a file', or its first few entries."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a folder"
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in path.iterdir())
    if not entries:
        return f"{path} is empty"
    return f"{path} holds: {_short_list(entries)}"


def require_layout(root: Path, dataset: str, expected: Sequence[str]) -> None:
    """Check that `root` holds the sub-paths a layout needs.

    Args:
        root: the data root the user gave.
        dataset: dataset name for the message.
        expected: sub-paths (relative to root) that must exist.

    Raises:
        FileNotFoundError: root or one of the sub-paths is missing; the message lists the
            expected layout and what was found.
    """
    missing = [sub for sub in expected if not (root / sub).exists()]
    if not missing:
        return
    layout = "\n".join(f"  {root / sub}" for sub in expected)
    hint = ""
    if root.is_dir():
        nested = [child for child in sorted(root.iterdir()) if child.is_dir()
                  and all((child / sub).exists() for sub in expected)]
        if nested:
            hint = f" The layout is in {nested[0]}: pass that folder as the data root."
    raise FileNotFoundError(
        f"{dataset}: {root} does not have the expected layout; missing {missing}.\n"
        f"Expected:\n{layout}\nFound: {describe_folder(root)}.{hint}\n"
        f"Pass --data-root pointing at the folder that contains these (the MMSegmentation layout)."
    )


def read_split_file(path: Path, dataset: str) -> list[str]:
    """Image ids listed one per line in a split file (e.g. ImageSets/Segmentation/val.txt)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{dataset}: split file {path} not found ({describe_folder(path.parent)}). "
            f"Choose a split that has a .txt file there."
        )
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{dataset}: split file {path} lists no images.")
    return ids


def pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], dataset: str, mask_hint: str
) -> list[Sample]:
    """Pair images with masks by id; every image must have a mask.

    Raises:
        FileNotFoundError: some images have no mask (the message lists a few and the count).
    """
    missing = sorted(name for name in images if name not in masks)
    if missing:
        raise FileNotFoundError(
            f"{dataset}: {len(missing)} of {len(images)} images have no mask ({mask_hint}); "
            f"e.g. {_short_list(missing)}. Check that the annotations are complete and in place."
        )
    return [Sample(name, images[name], masks[name]) for name in sorted(images)]


def check_files_exist(samples: Sequence[Sample], dataset: str) -> None:
    """Raise FileNotFoundError naming the missing images/masks of a file list."""
    for kind in ("image", "mask"):
        paths = [getattr(sample, kind) for sample in samples]
        missing = [str(path) for path in paths if path is not None and not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{dataset}: {len(missing)} of {len(samples)} {kind} files listed by the split are "
                f"missing, e.g. {_short_list(missing)}."
            )


def _open(path: Path, what: str, *, pixels: bool = True) -> Image.Image:
    """Open an image file; with pixels=False only its header (size, mode) is read."""
    try:
        image = Image.open(path)
        if pixels:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} {path} cannot be read as an image: {error}.") from None
    return image


def _check_same_size(sample: Sample, mask_shape: tuple[int, ...], image_hw: tuple[int, int]):
    """Raise ValueError naming both files when a mask's (H, W) is not its image's."""
    if tuple(mask_shape) != tuple(image_hw):
        raise ValueError(
            f"Mask {sample.mask} is {mask_shape[1]}x{mask_shape[0]} (WxH) but its image "
            f"{sample.image} is {image_hw[1]}x{image_hw[0]}; masks must have their image's size."
        )


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to a uint8 tensor (3, H, W), RGB, pixels as stored (no EXIF turn).

    Ground-truth masks are aligned with the stored pixels, so dataset images are not rotated by
    their EXIF orientation (MMSegmentation reads them the same way).
    """
    array = np.asarray(_open(path, "Image").convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label_png(path: Path) -> np.ndarray:
    """Decode a single-channel label image to an int64 array (H, W) of raw values."""
    image = _open(path, "Mask")
    if image.mode not in LABEL_MODES:
        raise ValueError(
            f"Mask {path} has PIL mode {image.mode!r}; label images must be single-channel class "
            f"indices (modes {LABEL_MODES}), e.g. a palette or greyscale PNG. Colour-coded masks "
            f"must be converted to index masks first."
        )
    return np.asarray(image).astype(np.int64)


def reduce_zero_label(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """MMSegmentation's reduce_zero_label: 0 -> ignore, v -> v - 1, ignore stays ignore."""
    reduced = mask - 1
    reduced[(mask == 0) | (mask == ignore_index)] = ignore_index
    return reduced


class SegmentationDataset(Dataset):
    """A list of (image, mask) files with class names; items are decoded and checked lazily.

    Items are ``(image, mask, name)``: image uint8 (3, H, W) RGB, mask int64 (H, W) with values
    in [0, num_classes) or `ignore_index`, name the image id. An unlabelled dataset
    (`has_masks` False) gives masks filled with `ignore_index`.

    Args:
        samples: the files, in a fixed order (index i is always the same image).
        class_names: one entry per label value, synonyms separated by ";".
        name: the dataset's name (as in `load_dataset`).
        root: the data root it was read from.
        reduce_zero_label: map raw 0 -> ignore and v -> v - 1 (see module docstring).
        seen: indices of the seen classes of a zero-shot split, if the dataset defines one.
        unseen: indices of the unseen classes.
        ignore_index: the label value that marks pixels without ground truth.

    Raises:
        ValueError: no samples, or class names that do not parse.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        *,
        name: str,
        root: str | os.PathLike,
        reduce_zero_label: bool = False,
        seen: Sequence[int] | None = None,
        unseen: Sequence[int] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not samples:
            raise ValueError(f"{name}: no images found under {root}; the dataset is empty.")
        parse_classes(list(class_names))
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.name = name
        self.root = Path(root)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.seen = None if seen is None else list(seen)
        self.unseen = None if unseen is None else list(unseen)
        self.split: str | None = None  # set by load_dataset

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        """True when every image has a ground-truth mask."""
        return all(sample.mask is not None for sample in self.samples)

    @property
    def names(self) -> list[str]:
        """The image ids, in index order."""
        return [sample.name for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, "
            f"images={len(self)}, classes={self.num_classes})"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        sample = self.samples[index]
        image = read_image(sample.image)
        height, width = image.shape[-2:]
        if sample.mask is None:
            mask = torch.full((height, width), self.ignore_index, dtype=torch.int64)
            return image, mask, sample.name
        mask = self.load_mask(sample.mask)
        _check_same_size(sample, mask.shape, (height, width))
        return image, torch.from_numpy(mask), sample.name

    def read_checked_mask(self, index: int) -> np.ndarray:
        """The mapped mask (H, W) of item `index`, checked as `__getitem__` checks it, without
        decoding the image (its size comes from the file header): for checking a whole split
        before training.

        Raises:
            FileNotFoundError: the image or mask file is missing.
            ValueError: the item has no mask, a file cannot be read, the mask has values outside
                the classes, or its size differs from the image's; the message names the file.
        """
        sample = self.samples[index]
        if sample.mask is None:
            raise ValueError(
                f"{self.name}: image {sample.image} has no mask; training and evaluation need "
                f"a mask for every image."
            )
        with _open(sample.image, "Image", pixels=False) as image:
            width, height = image.size
        mask = self.load_mask(sample.mask)
        _check_same_size(sample, mask.shape, (height, width))
        return mask

    def load_mask(self, path: Path) -> np.ndarray:
        """Read a mask file, apply the dataset's label mapping, and check the values.

        Raises:
            ValueError: values outside [0, num_classes) other than the ignore index; the
                message names the file and the values.
        """
        mask = self.map_labels(read_label_png(path))
        outside = (mask < 0) | (mask >= self.num_classes)
        bad = np.unique(mask[outside & (mask != self.ignore_index)])
        if bad.size:
            raise ValueError(
                f"Mask {path} holds values {_short_list(bad.tolist())} outside the "
                f"{self.num_classes} classes of {self.name} (allowed: 0..{self.num_classes - 1} "
                f"and {self.ignore_index} for ignore, after this dataset's label mapping). Is the "
                f"dataset name right for these annotations (e.g. voc21 vs voc20, context60 vs "
                f"context59)?"
            )
        return mask

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> class indices (reduce_zero_label if set; identity otherwise)."""
        return reduce_zero_label(raw, self.ignore_index) if self.reduce_zero_label else raw


def _joined_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.casefold())


def _word_key(name: str) -> tuple[str, ...]:
    return tuple(sorted(re.findall(r"[0-9a-z]+", name.casefold())))


def class_index(name: str, class_names: Sequence[str]) -> int:
    """The index of the class that `name` refers to.

    Names compare case-insensitively and ignore spacing and punctuation ("pottedplant" finds
    "potted plant", "wall-concrete" finds "concrete wall"). A display name (first synonym) match
    wins over a match with another synonym.

    Raises:
        ValueError: no class or more than one class matches; the message lists the classes.
    """
    synonyms = [[part.strip() for part in entry.split(";")] for entry in class_names]

    def matches(candidate: str) -> bool:
        same_letters = _joined_key(candidate) == _joined_key(name)
        return same_letters or _word_key(candidate) == _word_key(name)

    for candidates in ([names[:1] for names in synonyms], synonyms):
        found = [i for i, names in enumerate(candidates) if any(matches(n) for n in names)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"Class name {name!r} is ambiguous: it matches classes "
                f"{[class_names[i] for i in found]}. Use the display name (first synonym)."
            )
    raise ValueError(
        f"Class name {name!r} is not in this vocabulary; its classes are "
        f"{[display_name(entry) for entry in class_names]}."
    )


def class_indices(names: Sequence[str | int], class_names: Sequence[str]) -> list[int]:
    """Indices of classes given by name (see `class_index`) or by index.

    Raises:
        ValueError: an unknown name, an index out of range, or a class given twice.
    """
    indices = []
    for name in names:
        if isinstance(name, bool) or not isinstance(name, (int, str)):
            raise ValueError(f"Classes are given by name or index; got {name!r}.")
        if isinstance(name, int):
            if not 0 <= name < len(class_names):
                raise ValueError(
                    f"Class index {name} is out of range for {len(class_names)} classes."
                )
            indices.append(name)
        else:
            indices.append(class_index(name, class_names))
    if len(set(indices)) != len(indices):
        raise ValueError(f"Classes {list(names)} name the same class more than once.")
    return indices
