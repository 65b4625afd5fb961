"""What this machine computes fast: bf16 is native on recent GPUs and on CPUs with AVX-512 BF16 or
AMX, and emulated (several times slower than fp32) on AVX2-only CPUs. Detected at run time; never
assumed, because the machines zegkit runs on differ."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # oneDNN runs bf16 matmuls natively with either


@cache
def _cpuinfo_field(name: str) -> str:
    """The first value of field `name` in /proc/cpuinfo ("" where it or the file is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else `platform.processor()`), for reports."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_bf16_flags() -> list[str]:
    """Which of the flags that make CPU bf16 native (CPU_BF16_FLAGS) this CPU has."""
    flags = set(_cpuinfo_field("flags").split())
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 autocast runs natively (faster than fp32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype of a precision setting: "fp32", "bf16", or "auto" (bf16 where native).

    Raises:
        ValueError: another precision.
    """
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision in ("fp32", "bf16"):
        return torch.float32 if precision == "fp32" else torch.bfloat16
    raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}.")


def check_device(device: str | torch.device) -> torch.device:
    """The torch device `device` names, refused up front where this machine lacks it, instead of
    torch's assertion deep in the first `.to(device)` (or a silent run elsewhere).

    Raises:
        ValueError: not a device name torch knows.
        RuntimeError: a CUDA device without CUDA (a CPU-only build of torch, no GPU, or an index
            past the GPUs there are), or MPS where it is not available.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r} ({error}); use cpu, cuda, cuda:N or mps.") \
            from None
    if parsed.type == "cuda":
        _check_cuda(device, parsed.index)
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"Device {device!r}: MPS is not available on this machine; use "
                           "--device cpu.")
    return parsed


def _check_cuda(device: str | torch.device, index: int | None) -> None:
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RuntimeError(
            f"Device {str(device)!r} asked for, but CUDA is not available (torch "
            f"{torch.__version__}, {build}, no usable NVIDIA GPU). Use --device cpu, or run on a "
            "machine with an NVIDIA GPU and a CUDA build of torch."
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise RuntimeError(f"Device {str(device)!r}: this machine has {count} CUDA device(s), "
                           f"cuda:0..cuda:{count - 1}.")
