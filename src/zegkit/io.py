"""Image input and atomic file output.

`load_image` turns whatever a user hands over (a path, a PIL image, a numpy array) into one
thing: an 8-bit RGB PIL image, upright (EXIF orientation applied). Every mode and dtype has one
documented rule:

- Transparency (RGBA, LA, PA, palettes or grey/RGB images with a transparent colour) is
  **composited on white**. Dropping alpha instead would expose whatever colour happens to sit
  under transparent pixels (often black, sometimes garbage); white is what image viewers show and
  gives every transparent image one defined look.
- 16-bit images (`I;16*`, and `I` holding values in [0, 65535], which is how 16-bit files decode)
  are scaled by their bit depth, 65535 -> 255, never clipped at 255 as `Image.convert("L")` does.
- Float images (mode `F`, float arrays) must hold values in [0, 1]; they scale by 255.
- Multi-frame files (GIF, multi-page TIFF) give their first frame.

`to_tensor` is the bridge to the model (3 x H x W float32 in [0, 1]). `atomic_write` and the
`save_*_atomic` helpers write through a temporary file in the target's directory and
`os.replace` it into place, so a reader never sees a half-written file and a failed write leaves
the old file untouched. `write_files_atomic` does the same for several files that belong
together (an image's label map, overlay and summary): all of them are replaced, or none is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | os.PathLike | Image.Image | np.ndarray

UINT8_MAX = 255
UINT16_MAX = 65535
WHITE = (255, 255, 255)
# Extensions `list_images` picks up (lower case; matching ignores case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Named in error messages; Pillow reads more (GIF, PPM, ICO, ...), all of which load_image accepts.
SUPPORTED_FORMATS = "PNG, JPEG, BMP, TIFF, WebP, GIF and the other formats Pillow reads"
# Pillow modes holding 16-bit unsigned samples.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes (besides 'transparency' in image.info) that carry an alpha channel.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Pillow cannot convert these premultiplied-alpha modes to RGBA directly; go through these first.
PREMULTIPLIED_TO_STRAIGHT = {"La": "LA"}
ARRAY_SHAPES = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
ARRAY_DTYPES = "uint8, uint16, bool, or float with values in [0, 1]"
WRITE_MODES = ("w", "wt", "wb")


# --------------------------------------------------------------------------------------------
# Loading


def load_image(source: ImageSource) -> Image.Image:
    """Load an image as an upright 8-bit RGB PIL image.

    Args:
        source: A path to an image file; a PIL image (any mode); or a numpy array of shape
            (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8, uint16 (scaled by
            65535 -> 255), bool, or float with values in [0, 1]. Four channels are RGBA.

    Returns:
        A new PIL image in mode "RGB". EXIF orientation is applied to files and PIL images;
        transparency is composited on white; 16-bit data is scaled, not clipped.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The path is a directory, an empty file, not an image Pillow can read, or a
            truncated/corrupt image; or the array has an unsupported shape, dtype or value range;
            or a float/32-bit image holds values outside the supported range.
        TypeError: `source` is none of the accepted types.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(_decode(source, what="the PIL image"))
    if isinstance(source, (str, os.PathLike)):
        return _pil_to_rgb(_open_file(Path(source)))
    hint = ""
    if isinstance(source, torch.Tensor):
        hint = " For a (3, H, W) tensor in [0, 1], pass tensor.permute(1, 2, 0).cpu().numpy()."
    raise TypeError(
        f"load_image expects a path (str or os.PathLike), a PIL.Image.Image or a numpy array; "
        f"got {type(source).__name__}.{hint}"
    )


def _open_file(path: Path) -> Image.Image:
    """Open, fully decode and EXIF-rotate an image file, with clear errors for bad files."""
    _check_path(path)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(_bomb_message(str(path), error)) from error
    except UnidentifiedImageError as error:
        raise ValueError(
            f"{path} is not a readable image (supported: {SUPPORTED_FORMATS})."
        ) from error
    except (OSError, SyntaxError, EOFError, ValueError) as error:  # a damaged header (BMP, WebP)
        raise ValueError(
            f"{path} is truncated or corrupt: its header cannot be read ({error}). Re-export or "
            "re-download the image."
        ) from error
    with image:
        return _decode(image, what=str(path))


def _check_path(path: Path) -> None:
    """Refuse a missing path, a directory or an empty file, each with its own message."""
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}. Check the path and try again.")
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not an image file. Pass one image file, or use "
            f"zegkit.io.list_images({str(path)!r}) to find the images in it."
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is an empty file (0 bytes), not a readable image.")


def check_image_file(path: str | os.PathLike) -> tuple[int, int]:
    """Check from its header (without decoding pixels) that `path` is an image Pillow reads.

    Cheap enough to run over every input before any model loads; decoding can still fail later
    for damage the header does not show.

    Returns:
        (height, width) of the image as stored (before EXIF orientation).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, an empty file, not an image, a damaged header, or larger than
            Pillow's decompression-bomb limit.
    """
    path = Path(path)
    _check_path(path)
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except Image.DecompressionBombError as error:
        raise ValueError(_bomb_message(str(path), error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable image ({error}); supported: {SUPPORTED_FORMATS}."
        ) from error
    return size[1], size[0]


def _decode(image: Image.Image, what: str) -> Image.Image:
    """Force decoding (Pillow opens lazily) and apply EXIF orientation; returns a new image."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)  # a transposed copy, or a plain copy
    except Image.DecompressionBombError as error:
        raise ValueError(_bomb_message(what, error)) from error
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(
            f"{what} is truncated or corrupt and cannot be decoded ({error}). Re-export or "
            f"re-download the image."
        ) from error


def _bomb_message(what: str, error: Exception) -> str:
    return (
        f"{what} is larger than Pillow's decompression-bomb limit ({error}). If you trust the "
        f"file, raise PIL.Image.MAX_IMAGE_PIXELS before loading it."
    )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB by the rules in the module doc."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_uint16(np.asarray(image)))
    if mode == "I":
        return _gray_to_rgb(_scale_uint16(_int32_as_uint16(np.asarray(image))))
    if mode == "F":
        return _gray_to_rgb(_scale_unit_float(np.asarray(image), what="mode 'F' image"))
    if mode in ALPHA_MODES or "transparency" in image.info:
        if mode in PREMULTIPLIED_TO_STRAIGHT:
            image = image.convert(PREMULTIPLIED_TO_STRAIGHT[mode])
        return _composite_on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(
            f"Cannot convert an image in Pillow mode {mode!r} to RGB ({error}). Convert it "
            f"to RGB yourself, e.g. with another tool, and load that."
        ) from error


def _int32_as_uint16(values: np.ndarray) -> np.ndarray:
    """Mode 'I' is how 16-bit files decode in some Pillow versions/formats; insist on that range."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > UINT16_MAX:
        raise ValueError(
            f"32-bit integer image holds values in [{low}, {high}]; only values in "
            f"[0, {UINT16_MAX}] (16-bit data) are supported. Rescale it to 8 or 16 bits first."
        )
    return values.astype(np.uint16)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """Convert an (H, W[, 1|3|4]) uint8/uint16/bool/float array to an RGB PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = " It looks channels-first; use array.transpose(1, 2, 0)."
        raise ValueError(
            f"Image array has shape {array.shape}; accepted shapes are {ARRAY_SHAPES}.{hint}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Image array has shape {array.shape}: it has no pixels.")
    pixels = np.ascontiguousarray(_array_to_uint8(array))
    image = Image.fromarray(pixels)  # mode L, RGB or RGBA from the shape
    if image.mode == "RGBA":
        return _composite_on_white(image)
    return image.convert("RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map an array's values to uint8 by its dtype's rule."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * UINT8_MAX
    if array.dtype == np.uint16:
        return _scale_uint16(array)
    if np.issubdtype(array.dtype, np.floating):
        return _scale_unit_float(array, what="float image array")
    raise ValueError(
        f"Image array has dtype {array.dtype}; accepted dtypes are {ARRAY_DTYPES}. If the values "
        f"are 0..255, convert with array.astype(np.uint8)."
    )


def _scale_uint16(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples to 8 bits by bit depth (65535 -> 255, 257 -> 1), rounding."""
    scaled = np.rint(values.astype(np.float64) * (UINT8_MAX / UINT16_MAX))
    return scaled.astype(np.uint8)


def _scale_unit_float(values: np.ndarray, what: str) -> np.ndarray:
    """Scale floats in [0, 1] to uint8; anything else (NaN included) is an error."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contains NaN or infinite values; clean them before loading.")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{what} holds values in [{low:g}, {high:g}]; float images must lie in [0, 1]. "
            f"If they are 0..255 values, divide by 255 (or convert with astype(np.uint8))."
        )
    return np.rint(values * UINT8_MAX).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, WHITE + (UINT8_MAX,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float tensor.

    Args:
        image: A PIL image in mode "RGB" (use `load_image` to get one from anything else).

    Returns:
        Tensor of shape (3, H, W), dtype float32, values in [0, 1] (not CLIP-normalised).

    Raises:
        TypeError: `image` is not a PIL image.
        ValueError: `image` is not in mode "RGB".
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"to_tensor expects a PIL.Image.Image; got {type(image).__name__}. "
            f"Use zegkit.io.load_image to load paths and arrays."
        )
    if image.mode != "RGB":
        raise ValueError(
            f"to_tensor expects an RGB image; got mode {image.mode!r}. "
            f"Pass it through zegkit.io.load_image first."
        )
    pixels = np.array(image, dtype=np.float32) / UINT8_MAX  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)


def list_images(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """List the image files in a folder, sorted by path.

    Files count as images by extension (case-insensitive): .png, .jpg, .jpeg, .bmp, .tif, .tiff,
    .webp. Hidden files (names starting with ".", e.g. macOS "._photo.jpg") are skipped.

    Args:
        folder: The folder to search.
        recursive: Also search sub-folders.

    Returns:
        Sorted list of image file paths.

    Raises:
        FileNotFoundError: The folder does not exist, or holds no image files.
        NotADirectoryError: `folder` is a file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"Image folder not found: {root}.")
    if not root.is_dir():
        raise NotADirectoryError(
            f"{root} is a file, not a folder. Pass a folder of images, or load the file "
            f"directly with zegkit.io.load_image."
        )
    candidates = root.rglob("*") if recursive else root.iterdir()
    images = sorted(
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and path.is_file()
    )
    if not images:
        where = "or its sub-folders " if recursive else ""
        raise FileNotFoundError(
            f"No image files found in {root} {where}(looked for extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})."
            + ("" if recursive else " Pass recursive=True to search sub-folders.")
        )
    return images


# --------------------------------------------------------------------------------------------
# Atomic writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a file for writing such that it appears complete or not at all.

    Writes go to a temporary file in the target's directory (so the final rename stays on one
    file system); on normal exit it is flushed, fsynced and `os.replace`d onto `path`. If the
    block raises, the temporary file is removed, `path` is left as it was, and the exception
    propagates. An existing target's permission bits are kept; a new file gets the usual ones
    (umask applies). Text mode writes UTF-8.

    Args:
        path: The file to write. Its directory must exist.
        mode: "wb" (binary, default), or "w" / "wt" (text, UTF-8).

    Yields:
        The open temporary file object.

    Raises:
        ValueError: `mode` is not a write mode listed above.
        FileNotFoundError: The target's directory does not exist.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"atomic_write mode must be one of {WRITE_MODES}; got {mode!r}.")
    target = Path(path)
    _check_directory(target)
    temp = _temp_path(target, "tmp")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(temp, mode.replace("w", "x"), encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _keep_permissions(target, temp)
        os.replace(temp, target)
    except BaseException:
        _remove_quietly(temp)
        raise


def write_files_atomic(contents: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files as one unit: afterwards all hold the new bytes, or none changed.

    Every file is first written in full to a temporary file beside its target and fsynced, so a
    full disk, a read-only folder or an interrupt (Ctrl-C) while writing touches no target. Then
    each existing target is moved aside and the new file renamed into place; if anything fails
    in that step, the moved-aside files are put back and new ones removed. Temporary files never
    remain. Existing targets keep their permission bits.

    Args:
        contents: target path -> the bytes it should hold. Each target's directory must exist.

    Raises:
        ValueError: the same target twice.
        FileNotFoundError: a target's directory does not exist.
        OSError: a write or rename failed (nothing changed; the error propagates).
    """
    targets = [Path(path) for path in contents]
    if len({path.resolve() for path in targets}) != len(targets):
        raise ValueError(f"write_files_atomic got the same target twice: {targets}.")
    for target in targets:
        _check_directory(target)
    staged: dict[Path, Path] = {}
    try:
        for target, data in zip(targets, contents.values(), strict=True):
            staged[target] = _temp_path(target, "tmp")
            _write_synced(staged[target], data)
        _commit(staged)
    finally:
        for temp in staged.values():
            _remove_quietly(temp)


def _commit(staged: Mapping[Path, Path]) -> None:
    """Rename staged temporary files onto their targets, all or none (see write_files_atomic)."""
    moved_aside: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for target, temp in staged.items():
            _keep_permissions(target, temp)
            if target.exists():
                moved_aside[target] = _temp_path(target, "old")
                os.replace(target, moved_aside[target])
            os.replace(temp, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            _remove_quietly(target)
        for target, old in moved_aside.items():
            os.replace(old, target)
        raise
    for old in moved_aside.values():
        _remove_quietly(old)


def _write_synced(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, flushed to the disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _check_directory(target: Path) -> None:
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Cannot write {target}: directory {directory} does not exist. Create it first, "
            f"e.g. Path({str(directory)!r}).mkdir(parents=True, exist_ok=True)."
        )


def _temp_path(target: Path, kind: str) -> Path:
    """A hidden, unique name beside `target` (same file system, so renames are atomic)."""
    return target.parent / f".{target.name}.{secrets.token_hex(6)}.{kind}"


def _keep_permissions(target: Path, temp: Path) -> None:
    if target.exists():
        os.chmod(temp, stat.S_IMODE(target.stat().st_mode))


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG, atomically (see `atomic_write`).

    Args:
        image: Any PIL image PNG can hold ("P" images keep their palette).
        path: Destination file; its directory must exist.

    Raises:
        TypeError: `image` is not a PIL image.
    """
    data = png_bytes(image)
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as a PNG file, in memory (for `write_files_atomic`).

    Raises:
        TypeError: `image` is not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"PNG encoding expects a PIL.Image.Image; got {type(image).__name__}.")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_json_atomic(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (UTF-8, trailing newline), atomically (see `atomic_write`).

    NaN and infinity are rejected rather than written as the non-standard `NaN` tokens that
    browsers' `JSON.parse` and many other readers refuse.

    Args:
        obj: A JSON-serialisable object (dicts, lists, str, int, finite float, bool, None).
        path: Destination file; its directory must exist.
        indent: Indentation passed to `json.dumps`; None for one line.

    Raises:
        TypeError: `obj` holds something JSON cannot encode (e.g. a numpy array).
        ValueError: `obj` holds NaN or infinity.
    """
    text = json_text(obj, path, indent=indent)
    with atomic_write(path, "w") as handle:
        handle.write(text)


def json_text(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> str:
    """`obj` as strict JSON with a trailing newline, as `save_json_atomic` writes it to `path`
    (named in errors).

    Raises:
        TypeError, ValueError: as for `save_json_atomic`.
    """
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        raise ValueError(
            f"Cannot write {path} as JSON: {error}. Replace NaN/infinite floats with None "
            f"(or a finite value) first."
        ) from error
    except TypeError as error:
        raise TypeError(
            f"Cannot write {path} as JSON: {error}. Convert numpy arrays/scalars and other "
            f"objects to lists, floats, ints or strings first (e.g. array.tolist())."
        ) from error
    return text + "\n"


def jsonable(value: object) -> object:
    """Settings as plain JSON values: mappings with string keys, tuples as lists, other objects
    (paths, dtypes) as their strings, so a record compares equal after a save and a load."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
