"""What this machine computes fast: bf16 is native on recent GPUs and on CPUs with AVX-512 BF16 or
AMX, and emulated (several times slower than fp32) on AVX2-only CPUs. And how many cores this
process may use (its CPU affinity and cgroup quota, which torch's default thread count ignores),
split between the model's threads and the loader workers and kept on the cores other processes
leave free (`LoadFollower`), since threads competing for cores are several times slower than
fewer threads (a 224-px scene beside one busy process on 2 cores: 1.21 s with 2 threads, 0.18 s
with 1; issue 17). And how freed tensor memory is reused
(`keep_freed_memory`). Detected at run time; never assumed, because the machines zegkit runs on
differ."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path, PurePosixPath

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # oneDNN runs bf16 matmuls natively with either
# The precision settings: a compute dtype by name, and "auto" (bf16 where native, else fp32).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *PRECISION_DTYPES)


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


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The PRECISION_DTYPES name a precision setting (a PRECISIONS name) computes in on `device`:
    "auto" is "bf16" where bf16 is native there (`native_bf16`), else "fp32".

    Raises:
        ValueError: a name not in PRECISIONS.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The compute dtype of a precision setting on `device` (see `resolve_precision`).

    Raises:
        ValueError: a name not in PRECISIONS.
    """
    return PRECISION_DTYPES[resolve_precision(precision, device)]


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


# ---- memory allocator -------------------------------------------------------------------------
# glibc's malloc.h: mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap and are reused when freed (glibc's own ceiling is
# 32 MiB: a ViT-B/16 MLP activation over 15 crops is 36 MiB, and each such block went back to
# the kernel on free and faulted its pages in again on the next layer). Larger ones (a
# full-resolution score map) are still mapped and returned to the kernel.
HEAP_BLOCK_BYTES = 256 * 2**20
# Free memory kept at the top of the heap instead of being returned after each call.
HEAP_KEPT_BYTES = 512 * 2**20


def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc, whose malloc zegkit tunes and trims; None elsewhere
    (macOS, musl), whose malloc has neither `mallopt`'s thresholds nor `malloc_trim`."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed tensor memory instead of returning it to the kernel and
    faulting it in again: a process-wide setting, made by the `zegkit` command (never on
    import). SCLIP on a random ViT-B/16, 15 crops of 224, one thread, AMD EPYC: page faults
    per forward 398-434k -> 0-3k, CPU seconds 8.30 / 7.65 -> 6.60 / 6.51; peak RSS 1.10 -> 1.24
    GiB.

    Returns:
        Whether it was set (False off Linux or off glibc, where malloc decides alone).
    """
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEPT_BYTES))


# ---- cores and threads ------------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT,
                     membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """The CPUs' worth of time a cgroup CPU quota allows this process (quota / period: 1.5 is one
    and a half cores), the tightest of its cgroup and those above it; None without a quota.

    Reads cgroup v2 (`cpu.max`) and v1 (`cpu/cpu.cfs_quota_us`), where containers (docker
    --cpus, Kubernetes CPU limits) set them.

    Args:
        root: where the cgroup file systems are mounted.
        membership: the process's cgroups, one "ID:CONTROLLERS:PATH" line per hierarchy.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if not controllers:  # the v2 (unified) hierarchy
            limits += [_v2_limit(folder) for folder in _cgroup_folders(root, path)]
        elif "cpu" in controllers.split(","):
            limits += [_v1_limit(folder) for folder in _cgroup_folders(root / "cpu", path)]
    return min((limit for limit in limits if limit is not None), default=None)


def _cgroup_folders(root: Path, path: str) -> list[Path]:
    """The folder of cgroup `path` under `root`, then those above it, up to `root` itself."""
    relative = PurePosixPath(path.strip().lstrip("/"))
    return [root / relative, *(root / parent for parent in relative.parents)]


def _v2_limit(folder: Path) -> float | None:
    """From cpu.max, "QUOTA PERIOD" in microseconds; QUOTA is "max" when unlimited."""
    fields = (_read(folder / "cpu.max") or "").split()
    return _quota(*fields) if len(fields) == 2 else None


def _v1_limit(folder: Path) -> float | None:
    """From cpu.cfs_quota_us (-1 when unlimited) and cpu.cfs_period_us."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    return None if quota is None or period is None else _quota(quota, period)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _quota(quota: str, period: str) -> float | None:
    """quota / period in CPUs; None for no quota ("max", -1) or text that is not numbers."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def affinity_cpus() -> frozenset[int]:
    """The CPUs this process may run on: its affinity (`os.sched_getaffinity`, where the OS has
    it), else all of `os.cpu_count()`."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """The cores this process may keep busy: its CPU affinity (`affinity_cpus`), capped by a
    cgroup CPU quota rounded down (threads beyond the quota are throttled), at least 1.
    torch's default thread count ignores both."""
    cores = len(affinity_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.floor(limit))
    return max(1, cores)


def cores_per_process() -> int:
    """This process's share of `usable_cores()`: the processes torchrun starts on one node
    (LOCAL_WORLD_SIZE) share the same cores."""
    processes = _positive_int(os.environ.get("LOCAL_WORLD_SIZE", "")) or 1
    return max(1, usable_cores() // processes)


THREAD_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch's default reads, in order
USABLE_CORES = "usable cores"  # a ThreadPlan's threads_from when the policy chose them


@dataclass(frozen=True)
class ThreadPlan:
    """How an evaluation process splits its cores between the model and the image decoding."""

    threads: int  # torch intra-op threads of the process running the model
    num_workers: int  # DataLoader worker processes decoding ahead (torch runs each on 1 thread)
    threads_from: str  # "threads argument", an environment variable, USABLE_CORES, FOLLOWING_LOAD


# Workers decoding ahead of a model on a GPU (zegkit eval's default on every device until now).
ACCELERATOR_EVAL_WORKERS = 2


def default_eval_workers(cores: int, device: str | torch.device = "cpu") -> int:
    """Loader workers for an evaluation whose model runs on `device`, with `cores` usable cores.

    A model on the CPU gets none: a worker pays only where decoding takes more of the loop's
    time than the worker's core takes from the model's threads (1 / cores). Decoding a
    synthetic 224-px scene in the loop took 2-8% of it (the tiny CLIP, 1-2 threads on 2 cores),
    far less beside a ViT-B's forward (1.7 s for a 448 x 597 image on one thread); with 2
    workers beside 2 threads on 2 cores eval ran at 50 images/s, with none at 72 (issue 17).
    A model on an accelerator leaves the cores to decoding: up to ACCELERATOR_EVAL_WORKERS
    workers, one core kept for the loop.
    """
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(ACCELERATOR_EVAL_WORKERS, cores - 1))


def eval_thread_plan(cores: int, *, num_workers: int | None = None, threads: int | None = None,
                     device: str | torch.device = "cpu",
                     environment: Mapping[str, str] | None = None) -> ThreadPlan:
    """The threads and loader workers of an evaluation, where choices given win over the policy.

    Policy: `default_eval_workers(cores, device)` workers, and the cores they leave to torch's
    intra-op threads (at least 1), so the model's threads and the workers do not compete for
    cores; `planned_threads` then lowers them to the cores other processes leave free
    (`LoadFollower`).

    Args:
        cores: the cores this process may use (`cores_per_process()`).
        num_workers: loader workers asked for (None: the policy's).
        threads: torch threads asked for (None: the environment's, else the policy's).
        device: where the model runs.
        environment: where OMP_NUM_THREADS / MKL_NUM_THREADS are read (None: `os.environ`); a
            positive count there is the user's choice (torchrun sets OMP_NUM_THREADS=1 for
            several processes per node), which torch has already applied.
    """
    workers = default_eval_workers(cores, device) if num_workers is None else num_workers
    if threads is not None:
        return ThreadPlan(threads, workers, "threads argument")
    environment = os.environ if environment is None else environment
    for name in THREAD_ENVIRONMENT:
        count = _positive_int(environment.get(name, ""))
        if count is not None:
            return ThreadPlan(count, workers, name)
    return ThreadPlan(max(1, cores - workers), workers, USABLE_CORES)


def _positive_int(text: str) -> int | None:
    """The thread count an OMP_NUM_THREADS-style value gives ("4", or "4,2" for nested levels:
    the outer one); None for anything else."""
    first = text.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


@contextmanager
def planned_threads(num_workers: int | None = None, threads: int | None = None,
                    device: str | torch.device = "cpu") -> Iterator[ThreadPlan]:
    """Run inside with `eval_thread_plan`'s threads: torch.set_num_threads on entry, unless the
    count comes from the environment (torch read it at start), and torch's count restored on
    exit. Threads the policy chose (no `threads`, no environment variable) then follow other
    processes' load: the evaluation loops and `zegkit segment` call `follow_load` between
    images (`LoadFollower`). For the caller that owns the process's threads (`zegkit eval`,
    `zegkit segment`); outside this context `zegkit.evaluate.evaluate` leaves them as they are.

    Args:
        num_workers, threads, device: as in `eval_thread_plan`.

    Yields:
        The plan in force (`threads_from` is FOLLOWING_LOAD when the threads follow the load).
    """
    global _load_follower
    plan = eval_thread_plan(cores_per_process(), num_workers=num_workers, threads=threads,
                            device=device)
    if plan.threads_from in THREAD_ENVIRONMENT:
        yield plan
        return
    before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    follower = LoadFollower.start(plan) if plan.threads_from == USABLE_CORES else None
    if follower is not None:
        plan = replace(plan, threads_from=FOLLOWING_LOAD)
    _load_follower = follower
    try:
        yield plan
    finally:
        _load_follower = None
        torch.set_num_threads(before)


# ---- following other processes' load --------------------------------------------------------
PROC = Path("/proc")
# Seconds between two looks at other processes' load (`LoadFollower`): 100 of /proc/stat's
# 10-ms ticks on 2 cores; a look (/proc/stat and this process's children) costs ~0.1 ms.
LOAD_PERIOD_S = 0.5
# The fields of a /proc/stat "cpuN" line that are busy time: user nice system (idle iowait)
# irq softirq steal; guest time is already inside user and nice.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
# /proc/<pid>/stat's utime and stime, counted from the field after the command's ")".
CHILD_CPU_FIELDS = slice(11, 13)
FOLLOWING_LOAD = "usable cores less those other processes keep busy"

_load_follower: LoadFollower | None = None


def busy_cpu_seconds(cpus: Collection[int], proc: Path = PROC) -> float | None:
    """CPU-seconds that cores `cpus` have spent busy since boot, whoever ran on them (time the
    hypervisor gave to other machines included); None where /proc/stat cannot be read."""
    text = _read(proc / "stat")
    if text is None:
        return None
    names = {f"cpu{cpu}" for cpu in cpus}
    ticks = sum(int(fields[1:][index]) for fields in map(str.split, text.splitlines())
                if fields and fields[0] in names for index in BUSY_FIELDS)
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(proc: Path = PROC) -> float:
    """CPU-seconds this process and its child processes (loader workers; those reaped
    included) have used: their load is the evaluation's own, not another process's."""
    reaped = os.times()
    seconds = time.process_time() + reaped.children_user + reaped.children_system
    ticks = 0
    for children in (proc / "self" / "task").glob("*/children"):
        for pid in (_read(children) or "").split():
            stat = _read(proc / pid / "stat") or ")"
            ticks += sum(map(int, stat.rsplit(")", 1)[1].split()[CHILD_CPU_FIELDS]))
    return seconds + ticks / os.sysconf("SC_CLK_TCK")


def free_core_threads(cores: int, others_busy: float, ceiling: int, workers: int) -> int:
    """Threads for the cores other processes leave free: `cores` less the cores' worth of time
    the others kept busy, rounded to whole cores, less the loader workers' cores; 1 at least
    and `ceiling` (the plan's threads) at most."""
    return max(1, min(ceiling, math.floor(cores - others_busy + 0.5) - workers))


@dataclass
class LoadFollower:
    """Keeps torch's threads on the cores other processes leave free, looking every
    LOAD_PERIOD_S at how busy the usable cores were without this process and its workers.

    Threads waiting for a core a neighbour holds stall every parallel step: beside one busy
    single-threaded process on 2 cores, the tiny CLIP evaluated 10.7 images/s with 2 threads
    and 29.8 with 1, idle 37.3 with 2 and 32.0 with 1 (AMD EPYC, issue 17). OpenMP's passive
    waiting is no cure: 26.8 beside the neighbour and 20.8 idle with 2 threads.
    """

    cpus: frozenset[int]
    ceiling: int
    workers: int
    looked_at: float  # time.monotonic() of the last look
    busy: float  # busy_cpu_seconds(cpus) then
    own: float  # own_cpu_seconds() then

    @classmethod
    def start(cls, plan: ThreadPlan) -> LoadFollower | None:
        """A follower of `plan`'s threads from now; None where the cores' load cannot be read."""
        cpus = affinity_cpus()
        busy = busy_cpu_seconds(cpus)
        if busy is None:
            return None
        return cls(cpus, plan.threads, plan.num_workers, time.monotonic(), busy,
                   own_cpu_seconds())

    def follow(self) -> None:
        """Set torch's threads from the load since the last look, if LOAD_PERIOD_S has passed."""
        now = time.monotonic()
        if now - self.looked_at < LOAD_PERIOD_S:
            return
        busy, own = busy_cpu_seconds(self.cpus), own_cpu_seconds()
        if busy is None:
            return
        others = max(0.0, (busy - self.busy) - (own - self.own)) / (now - self.looked_at)
        threads = free_core_threads(len(self.cpus), others, self.ceiling, self.workers)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.looked_at, self.busy, self.own = now, busy, own


def follow_load() -> None:
    """Between two images: let `planned_threads`' follower, if one is on, set the threads from
    other processes' load (cheap when it is not yet time to look)."""
    if _load_follower is not None:
        _load_follower.follow()
