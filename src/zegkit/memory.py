"""The memory a segmentation needs at least and the memory this machine has free, so that
`zegkit segment` refuses an image that cannot fit before the model loads, instead of running
for minutes and then dying (or being killed by the kernel) in the middle.

The need is a lower bound: the arrays the label path must hold at one time, counted below per
input pixel, plus the resized image and its crops. Labels, the label decision's running maps
and the overlay are made at the input's full resolution whatever --short-side says, so for a
large image that part dominates, and only a smaller image (or more memory) helps. A request is
refused only when even this bound exceeds what is available; one that passes may still need
about twice the bound (a 16-MP greyscale PNG through the shipped model, SCLIP, fp32: the bound
is 28 bytes per pixel, the measured peak 38 bytes per pixel above the loaded model; 54 before
the decision took one pass, 90 before it read a resized image a band of lines at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from zegkit.inference import InferenceConfig, resized_size, window_starts

FLOAT32_BYTES, INT64_BYTES = 4, 8
# Per input pixel, what the label path holds at once (one image):
DECODED_BYTES = 4 + 3 * FLOAT32_BYTES  # the RGB image (Pillow keeps 4 bytes a pixel), (3, H, W)
RUNNING_BYTES = INT64_BYTES + FLOAT32_BYTES  # each pixel's label and, for a threshold, probability
# Refiners need every class at full resolution: the scores and their probabilities, per class.
REFINED_BYTES_PER_CLASS = 2 * FLOAT32_BYTES
# The measured peak over this least need (see the module doc: 38 / 28 bytes per pixel, with
# room for larger vocabularies), for suggesting an image size that fits in practice.
TYPICAL_PEAK_FACTOR = 2
MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")
MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class Need:
    """The least memory one image's segmentation needs, in bytes, by what scales it.

    Attributes:
        full_resolution: what grows with the input's pixels (no setting shrinks it).
        refined: what grows with classes x input pixels (only with --refine).
        resized: the resized image and its sliding-window crops (--short-side, --crop).
    """

    full_resolution: int
    refined: int
    resized: int

    @property
    def total(self) -> int:
        return self.full_resolution + self.refined + self.resized


def segment_need(height: int, width: int, config: InferenceConfig, num_classes: int) -> Need:
    """The least memory segmenting (and saving) one image of height x width pixels takes with
    `config` and `num_classes` classes, beyond the model's weights."""
    pixels = height * width
    resized_h, resized_w = resized_size(height, width, config.short_side)
    refining = config.refine != "none"  # then the decision reads full probabilities
    full = (DECODED_BYTES + RUNNING_BYTES) * pixels  # scores come a block of lines at a time
    refined = REFINED_BYTES_PER_CLASS * num_classes * pixels if refining else 0
    resized = 3 * FLOAT32_BYTES * resized_h * resized_w
    if config.mode == "slide":  # every crop of the image is cut out at once
        windows = (len(window_starts(max(resized_h, config.crop), config.crop, config.stride))
                   * len(window_starts(max(resized_w, config.crop), config.crop, config.stride)))
        resized += 3 * FLOAT32_BYTES * config.crop**2 * windows
    return Need(full, refined, resized)


def available_memory(meminfo: Path = MEMINFO, root: Path = CGROUP_ROOT,
                     membership: Path = CGROUP_MEMBERSHIP) -> tuple[int, str] | None:
    """(bytes, where the figure comes from) this process can still allocate: the kernel's
    MemAvailable, or less where a cgroup memory limit (a container's, a job's) leaves less
    room: its limit minus its usage, page cache that can be dropped not counted as used. None
    where neither can be read (not Linux). Swap is not counted.
    """
    found = []
    kib = _field(meminfo, "MemAvailable")
    if kib is not None:
        found.append((kib * 1024, f"MemAvailable in {meminfo}"))
    for folder, files in _cgroup_memory_folders(root, membership):
        limit, usage = _number(folder / files[0]), _number(folder / files[1])
        if limit is not None and usage is not None:
            reclaimable = _field(folder / "memory.stat", files[2]) or 0
            found.append((max(0, limit - usage + reclaimable),
                          f"the memory limit of cgroup {folder}"))
    return min(found, default=None)


def check_segment_fits(sizes: dict[Path, tuple[int, int]], config: InferenceConfig,
                       num_classes: int, available: tuple[int, str] | None) -> None:
    """Refuse, before any model loads, images whose segmentation cannot fit in memory.

    Args:
        sizes: each image's (height, width).
        config: the inference protocol.
        num_classes: the vocabulary's size.
        available: `available_memory()` (None: unknown, nothing is refused).

    Raises:
        RuntimeError: naming the largest image that does not fit, what it needs at least and
            what is available, and what would fit.
    """
    if available is None or not sizes:
        return
    free, source = available
    needs = {path: segment_need(*size, config, num_classes) for path, size in sizes.items()}
    too_big = [path for path, need in needs.items() if need.total > free]
    if not too_big:
        return
    path = max(too_big, key=lambda item: needs[item].total)
    (height, width), need = sizes[path], needs[path]
    others = f" (and {len(too_big) - 1} more image(s))" if len(too_big) > 1 else ""
    refined = (f"; {_size(need.refined)} for the per-class maps of --refine "
               f"{config.refine}" if need.refined else "")
    remedies = []
    plain = segment_need(height, width, replace(config, refine="none"), num_classes)
    if need.refined and TYPICAL_PEAK_FACTOR * plain.total <= free:
        remedies.append("drop --refine (without it the classes are decided a few at a time)")
    scale = math.sqrt(max(0, free / TYPICAL_PEAK_FACTOR - need.resized)
                      / (need.full_resolution + need.refined))
    if scale * min(height, width) >= 1:
        remedies.append(f"shrink the image to about {math.floor(width * scale)} x "
                        f"{math.floor(height * scale)} pixels first (where the typical peak, "
                        f"about {TYPICAL_PEAK_FACTOR}x this least need, fits)")
    remedies.append("free memory" if remedies else "free memory or use a machine with more")
    message = (
        f"{path}{others}: segmenting this {width} x {height} image ({height * width / 1e6:.1f} "
        f"MP) needs at least {_size(need.total)} of memory ({_size(need.full_resolution)} for "
        f"the image, scores, labels and overlay at its full resolution, which --short-side "
        f"does not change{refined}), but {_size(free)} is available "
        f"({source}). To fit, {', '.join(remedies[:-1])}{', or ' if len(remedies) > 1 else ''}"
        f"{remedies[-1]}."
    )
    raise RuntimeError(message)


def _size(bytes_: int) -> str:
    return f"{bytes_ / GIB:.1f} GiB" if bytes_ >= GIB else f"{bytes_ / MIB:.0f} MiB"


def _field(path: Path, name: str) -> int | None:
    """The number after `name` in a "name value" file (/proc/meminfo, memory.stat)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key.rstrip(":") == name and value.split():
            return int(value.split()[0])
    return None


def _number(path: Path) -> int | None:
    """A file holding one number ("max", unreadable, missing: None)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_memory_folders(root: Path, membership: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """The memory cgroup folders over this process, its own and those above it, each with its
    (limit, usage, reclaimable page cache) file and field names: cgroup v2 (unified) and v1."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:  # the v2 hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        relative = PurePosixPath(path.strip().lstrip("/"))
        folders += [(base / folder, files) for folder in (relative, *relative.parents)]
    return folders
