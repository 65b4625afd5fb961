"""`zegkit bench`: the table, the JSON and the machine behind them (no timings asserted)."""

import json

import pytest
import torch

from zegkit.backbone import load_clip
from zegkit.bench import class_names, peak_memory, resolve_precisions
from zegkit.cli import main
from zegkit.hardware import native_bf16
from zegkit.methods.cls_injection import replaced_layers


def test_bench_writes_rows_and_machine(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--models", "zegkit/tiny-synthetic", "--methods", "naive", "sclip",
                   "--classes", "3", "--precisions", "fp32", "--repeats", "1", "--json", str(out)])
    assert status == 0
    record = json.loads(out.read_text())
    assert record["machine"]["torch_threads"] == torch.get_num_threads()
    assert "cpu_bf16_flags" in record["machine"] and record["machine"]["cpu"]
    rows = record["rows"]
    assert [(r["method"], r["classes"], r["precision"]) for r in rows] == [
        ("naive", 3, "fp32"), ("sclip", 3, "fp32")]
    for row in rows:
        assert row["crops"] == 15  # 448 x 597 at crop 224, stride 112
        assert row["seconds"] > 0 and row["plain_seconds"] > 0 and row["ratio"] > 0
        assert row["peak_gib"] > 0
    # the last-block methods count the plain forward's work and little more
    assert all(1.0 <= row["flop_ratio"] < 1.1 for row in rows)
    table = capsys.readouterr().out
    assert "x plain" in table and "x FLOPs" in table
    assert "torch_threads=" in table and "sclip" in table


def test_clsclip_rows_carry_their_own_floor(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--models", "zegkit/tiny-synthetic", "--methods", "clsclip_standin",
                   "naive", "--classes", "2", "--precisions", "fp32", "--repeats", "1",
                   "--json", str(out)])
    assert status == 0
    standin, naive = json.loads(out.read_text())["rows"]
    depth = load_clip("zegkit/tiny-synthetic").num_layers
    first = replaced_layers(None, depth)[0]
    assert standin["floor"] == pytest.approx((first + (depth - first) * 2) / depth)
    assert standin["floor_ratio"] == pytest.approx(standin["ratio"] / standin["floor"])
    assert naive["floor"] is None and naive["floor_ratio"] is None
    assert "x floor" in capsys.readouterr().out


def test_auto_precision_is_resolved_and_deduplicated():
    native = "bf16" if native_bf16("cpu") else "fp32"
    assert resolve_precisions(["fp32", "auto"]) == list(dict.fromkeys(["fp32", native]))
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precisions(["fp16"])


def test_class_names_beyond_ade_are_numbered():
    names = class_names(152)
    assert len(names) == len(set(names)) == 152
    assert names[0].startswith("wall") and names[-1] == "object 151"


def test_peak_memory_sees_a_large_allocation():
    baseline, _ = peak_memory(lambda: None)
    peak, how = peak_memory(lambda: torch.ones(64 * 2**20).sum())  # 256 MiB
    assert peak - baseline > 200 * 2**20, how


def test_bad_repeats_is_a_usage_error(capsys):
    assert main(["bench", "--repeats", "0", "--models", "zegkit/tiny-synthetic"]) == 2
    assert "--repeats" in capsys.readouterr().err
