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
    with hardware.planned_threads(num_workers=1) as plan:
        assert (plan.threads, plan.num_workers) == (2, 1) and torch.get_num_threads() == 2
        assert plan.threads_from in ("usable cores", hardware.FOLLOWING_LOAD)
    assert torch.get_num_threads() == 3  # restored on exit
    with hardware.planned_threads(num_workers=0, threads=1):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch applied it at start; 3 stands for that
    with hardware.planned_threads() as plan:
        assert plan.threads_from == "OMP_NUM_THREADS" and torch.get_num_threads() == 3



def test_threads_are_the_cores_others_leave_free():
    assert hardware.free_core_threads(2, 0.0, ceiling=2, workers=0) == 2
    assert hardware.free_core_threads(2, 0.64, ceiling=2, workers=0) == 1  # a neighbour's share
    assert hardware.free_core_threads(2, 0.4, ceiling=2, workers=0) == 2  # background noise
    assert hardware.free_core_threads(2, 2.0, ceiling=2, workers=0) == 1  # at least one
    assert hardware.free_core_threads(8, 2.4, ceiling=8, workers=2) == 4
    assert hardware.free_core_threads(8, 0.0, ceiling=4, workers=0) == 4  # never above the plan


def test_busy_seconds_of_the_given_cores_from_proc_stat(tmp_path):
    (tmp_path / "stat").write_text(
        "cpu  10 10 10 10 10 10 10 10 0 0\n"
        "cpu0 100 1 10 5000 70 0 2 3 50 0\n"  # user nice system idle iowait irq softirq steal
        "cpu1 200 0 20 9000 0 0 0 0 0 0\n"
        "cpu2 999 0 0 0 0 0 0 0 0 0\n"
        "intr 1 2 3\n")
    tick = hardware.os.sysconf("SC_CLK_TCK")
    assert hardware.busy_cpu_seconds({0, 1}, proc=tmp_path) == pytest.approx(336 / tick)
    assert hardware.busy_cpu_seconds({3}, proc=tmp_path) == 0
    assert hardware.busy_cpu_seconds({0}, proc=tmp_path / "missing") is None


@pytest.mark.skipif(not hardware.PROC.joinpath("self", "task").is_dir(), reason="needs /proc")
def test_own_cpu_seconds_count_a_live_child_process():
    busy = ("import time\nwhile time.process_time() < 0.5: pass\n"
            "print('busy', flush=True)\ninput()")  # then alive, idle, until told to end
    before = hardware.own_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "busy\n"
        assert hardware.own_cpu_seconds() - before >= 0.45  # in 10-ms ticks
    finally:
        child.kill()
        child.wait()


@pytest.mark.usefixtures("restore_torch_threads")
def test_threads_follow_a_neighbour_that_comes_and_goes(monkeypatch):
    """Scripted looks at 2 cores: a neighbour takes its share, stays, and leaves."""
    clock = iter([1.0, 2.0, 3.0, 4.0])
    others_per_look = iter([0.64, 1.0, 0.05, 0.05])
    busy = own = 0.0

    def look_busy(cpus):
        nonlocal busy
        busy += next(others_per_look) + 1.0  # this process keeps one core busy
        return busy

    def look_own():
        nonlocal own
        own += 1.0
        return own

    monkeypatch.setattr(hardware.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(hardware, "own_cpu_seconds", look_own)
    torch.set_num_threads(2)
    follower = hardware.LoadFollower(frozenset({0, 1}), ceiling=2, workers=0, looked_at=0.0,
                                     busy=0.0, own=0.0)
    monkeypatch.setattr(hardware, "busy_cpu_seconds", look_busy)
    seen = []
    for _ in range(4):
        follower.follow()
        seen.append(torch.get_num_threads())
    assert seen == [1, 1, 2, 2]


@pytest.mark.usefixtures("restore_torch_threads")
def test_only_threads_the_policy_chose_follow_the_load(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with hardware.planned_threads(num_workers=0) as plan:
        following = hardware._load_follower is not None
        assert following == (plan.threads_from == hardware.FOLLOWING_LOAD)
        assert following or not hardware.PROC.joinpath("stat").exists()
    assert hardware._load_follower is None  # off after the evaluation
    with hardware.planned_threads(num_workers=0, threads=1) as plan:
        assert hardware._load_follower is None and plan.threads_from == "threads argument"


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
