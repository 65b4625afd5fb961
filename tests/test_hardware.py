"""The cores a process may use (affinity, cgroup quota) and the thread/worker policy of eval."""

import platform
import subprocess
import sys

import pytest
import torch

from zegkit import hardware
from zegkit.hardware import ThreadPlan, cgroup_cpu_limit, eval_thread_plan

NO_ENVIRONMENT = {}


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_policy_leaves_the_workers_cores_to_them():
    assert eval_thread_plan(1, environment=NO_ENVIRONMENT) == ThreadPlan(1, 0, "usable cores")
    assert eval_thread_plan(8, environment=NO_ENVIRONMENT) == ThreadPlan(8, 0, "usable cores")
    # a model on a GPU gets workers decoding ahead, a core kept for the loop
    assert eval_thread_plan(8, device="cuda", environment=NO_ENVIRONMENT) == \
        ThreadPlan(6, 2, "usable cores")
    assert eval_thread_plan(2, device="cuda:1", environment=NO_ENVIRONMENT).num_workers == 1
    assert eval_thread_plan(1, device="cuda", environment=NO_ENVIRONMENT).num_workers == 0
    # explicit workers take their cores from the model's threads, never below one thread
    assert eval_thread_plan(4, num_workers=2, environment=NO_ENVIRONMENT).threads == 2
    assert eval_thread_plan(2, num_workers=3, environment=NO_ENVIRONMENT).threads == 1


def test_policy_never_overrides_a_choice():
    omp = {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "5"}
    assert eval_thread_plan(2, environment=omp) == ThreadPlan(3, 0, "OMP_NUM_THREADS")
    assert eval_thread_plan(2, environment={"MKL_NUM_THREADS": "5"}).threads_from == \
        "MKL_NUM_THREADS"
    assert eval_thread_plan(16, threads=4, environment=omp) == \
        ThreadPlan(4, 0, "threads argument")
    assert eval_thread_plan(16, num_workers=0, device="cuda",
                            environment=NO_ENVIRONMENT).num_workers == 0
    assert eval_thread_plan(2, environment={"OMP_NUM_THREADS": "4,2"}).threads == 4  # nested
    for ignored in ("", "0", "many", "-1"):  # not a count: the policy decides
        plan = eval_thread_plan(2, environment={"OMP_NUM_THREADS": ignored})
        assert plan.threads_from == "usable cores"


def _cgroup_v2(tmp_path, limits):
    """A fake /sys/fs/cgroup with cpu.max files at paths relative to it."""
    root = tmp_path / "cgroup"
    for path, text in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(text)
    return root


def test_cgroup_v2_quota_is_the_tightest_on_the_way_up(tmp_path):
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/app/job\n")
    root = _cgroup_v2(tmp_path, {"app/job": "150000 100000\n", "app": "max 100000\n"})
    assert cgroup_cpu_limit(root, membership) == 1.5
    root = _cgroup_v2(tmp_path, {"app": "50000 100000\n"})
    assert cgroup_cpu_limit(root, membership) == 0.5
    unlimited = _cgroup_v2(tmp_path / "other", {"app/job": "max 100000\n"})
    assert cgroup_cpu_limit(unlimited, membership) is None
    assert cgroup_cpu_limit(root, tmp_path / "no-such-file") is None


def test_cgroup_v1_quota(tmp_path):
    membership = tmp_path / "self-cgroup"
    membership.write_text("4:memory:/m\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = tmp_path / "cgroup" / "cpu" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "cgroup", membership) is None
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_limit(tmp_path / "cgroup", membership) == 3.0


def test_usable_cores_from_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: None)
    assert hardware.usable_cores() == 4
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 2.5)  # throttled beyond 2 threads
    assert hardware.usable_cores() == 2
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: 0.5)
    assert hardware.usable_cores() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes on this node share them
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda: None)
    assert hardware.cores_per_process() == 2


@pytest.mark.usefixtures("restore_torch_threads")
def test_eval_threads_set_torch_unless_the_environment_did(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cores", lambda: 3)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(3)
    with hardware.eval_threads(num_workers=1) as plan:
        assert plan == ThreadPlan(2, 1, "usable cores") and torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3  # restored on exit
    with hardware.eval_threads(num_workers=0, threads=1):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch applied it at start; 3 stands for that
    with hardware.eval_threads() as plan:
        assert plan.threads_from == "OMP_NUM_THREADS" and torch.get_num_threads() == 3


# A 36 MiB block (a ViT-B/16 MLP activation over 15 crops) allocated, written and freed twice
# through glibc's malloc: the page faults of the second time.
REFAULT_PROBE = """
import ctypes, resource, sys
from zegkit.hardware import glibc, keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
libc = glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def cycle(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
cycle(36 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle(36 * 2**20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_kept_freed_memory_is_reused_without_page_faults():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", REFAULT_PROBE, mode], check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0], int(out[1])

    pages = 36 * 2**20 // 4096
    kept, kept_faults = faults("keep")
    default, default_faults = faults("default")
    assert (kept, default) == ("True", "False")
    assert default_faults > pages / 2 and kept_faults < pages / 20
