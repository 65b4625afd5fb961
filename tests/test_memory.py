"""The least memory a segmentation needs (a lower bound of the measured peak) and the memory a
process has free (MemAvailable, cgroup v1 and v2 limits), for `zegkit segment`'s refusal of an
image that cannot fit (issue 16)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zegkit.inference import InferenceConfig
from zegkit.memory import available_memory, check_segment_fits, segment_need

GIB = 2**30


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_available_memory_is_the_tightest_of_meminfo_and_the_cgroups_above(tmp_path):
    meminfo = _files(tmp_path, {"meminfo": "MemTotal: 100 kB\nMemAvailable:   8388608 kB\n"})
    meminfo = meminfo / "meminfo"
    membership = _files(tmp_path, {"self": "0::/jobs/one\n"}) / "self"
    v2 = _files(tmp_path / "v2", {
        "jobs/one/memory.max": "max\n",  # no limit of its own
        "jobs/memory.max": f"{6 * GIB}\n", "jobs/memory.current": f"{3 * GIB}\n",
        "jobs/memory.stat": f"anon 1\ninactive_file {GIB}\n",  # page cache that can go
    })
    assert available_memory(meminfo, v2, membership) == (4 * GIB, f"the memory limit of "
                                                         f"cgroup {v2 / 'jobs'}")
    roomy = _files(tmp_path / "roomy", {"jobs/memory.max": f"{64 * GIB}\n",
                                        "jobs/memory.current": "0\n"})
    assert available_memory(meminfo, roomy, membership) == (8 * GIB, f"MemAvailable in {meminfo}")
    v1_membership = _files(tmp_path, {"self1": "5:cpu,cpuacct:/x\n4:memory:/jobs/two\n"})
    v1 = _files(tmp_path / "v1", {
        "memory/jobs/two/memory.limit_in_bytes": f"{2 * GIB}\n",
        "memory/jobs/two/memory.usage_in_bytes": f"{GIB}\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: unlimited
        "memory/memory.usage_in_bytes": f"{50 * GIB}\n",
    })
    assert available_memory(meminfo, v1, v1_membership / "self1")[0] == GIB
    assert available_memory(tmp_path / "none", v1, tmp_path / "none") is None  # not Linux


def test_need_grows_with_pixels_and_with_classes_only_when_refined():
    config = InferenceConfig()
    small, large = segment_need(600, 800, config, 3), segment_need(6000, 8000, config, 3)
    assert large.full_resolution == 100 * small.full_resolution and large.refined == 0
    assert large.resized == small.resized  # both resized to a short side of 448
    assert segment_need(600, 800, config, 150) == small
    refined = InferenceConfig(refine="pamr")
    assert segment_need(600, 800, refined, 150).refined == 50 * segment_need(600, 800, refined,
                                                                              3).refined


def test_only_images_beyond_the_available_memory_are_refused():
    config, sizes = InferenceConfig(), {Path("a.png"): (13000, 13000), Path("b.png"): (400, 300)}
    need = segment_need(13000, 13000, config, 3).total
    check_segment_fits(sizes, config, 3, (need, "test"))
    check_segment_fits(sizes, config, 3, None)  # unknown: nothing refused
    with pytest.raises(RuntimeError, match=r"a\.png: segmenting this 13000 x 13000") as error:
        check_segment_fits(sizes, config, 3, (need - 1, "test"))
    assert "shrink the image to about" in str(error.value)
    with pytest.raises(RuntimeError, match="drop --refine"):
        check_segment_fits(sizes, InferenceConfig(refine="pamr"), 150, (2 * need, "test"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux VmHWM")
def test_the_least_need_is_below_the_measured_peak(tiny_clip_dir, tmp_path):
    size = (800, 1200)
    blocks = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(blocks.repeat(100, 0).repeat(100, 1)).save(tmp_path / "p.png")  # fast PNGs
    code = """if True:
        import sys
        from pathlib import Path
        from zegkit import load_segmenter
        from zegkit.io import load_image

        def status(key):
            line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                        if l.startswith(key))
            return int(line.split()[1]) * 1024

        segmenter = load_segmenter("sclip", sys.argv[1])
        segmenter.set_vocabulary(["sky", "road", "dog"])
        before = status("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
        image = load_image(sys.argv[2])
        segmenter.segment(image).save(sys.argv[3], "p", image)
        print(status("VmHWM:") - before)
    """
    done = subprocess.run([sys.executable, "-c", code, str(tiny_clip_dir), str(tmp_path / "p.png"),
                           str(tmp_path)], capture_output=True, text=True, check=True, timeout=600)
    measured = int(done.stdout.split()[-1])
    assert segment_need(*size, InferenceConfig(), 3).total <= measured
