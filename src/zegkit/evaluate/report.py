"""Results as text tables and JSON files, with the settings that produced them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from zegkit.evaluate.bootstrap import CI_SUFFIX
from zegkit.io import save_json_atomic

SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mIoU(S)", "mIoU(U)", "hIoU", "FB-IoU")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _summary_cell(result: Mapping, key: str) -> str:
    """A summary value, followed by its bootstrap interval when the result has one."""
    interval = result.get(key + CI_SUFFIX)
    bounds = "" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    return _cell(result.get(key)) + bounds


def _rows_to_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _split_mark(index: int, result: Mapping) -> str:
    if result.get("unseen") is None:
        return ""
    return "unseen" if index in result["unseen"] else "seen" if index in result["seen"] else ""


def format_table(result: Mapping, *, per_class: bool = True) -> str:
    """A result of `metrics`/`evaluate` as a text table: per-class IoU/Acc, then the summary.

    Summary values with a bootstrap interval show it after the value: "41.20 [38.90, 43.60]".
    """
    parts = []
    if per_class:
        split = result.get("unseen") is not None
        header = ["class", "IoU", "Acc"] + (["split"] if split else [])
        rows = []
        for index, name in enumerate(result["IoU"]):
            row = [name, _cell(result["IoU"][name]), _cell(result["Acc"][name])]
            rows.append(row + ([_split_mark(index, result)] if split else []))
        parts.append(_rows_to_text(header, rows))
    keys = [key for key in SUMMARY_KEYS if key in result]
    parts.append(_rows_to_text(keys, [[_summary_cell(result, key) for key in keys]]))
    title = _title(result)
    return "\n\n".join(([title] if title else []) + parts)


def _title(result: Mapping) -> str:
    settings = result.get("settings") or {}
    bits = [f"{key}={settings[key]}" for key in ("dataset", "method", "model", "protocol")
            if settings.get(key) is not None]
    if "num_images" in result:
        bits.append(f"images={result['num_images']}")
    return ", ".join(bits)


def format_throughput(throughput: Mapping) -> str:
    """An evaluation's "throughput" entry as one line: images/s and where the time went."""
    if throughput["images_per_second"] is None:
        return "no images timed in this run (all were resumed from the progress file)"
    other = max(0.0, 1 - throughput["model_fraction"] - throughput["data_wait_fraction"])
    return (f"{throughput['images']} images in {throughput['seconds']:.1f} s, "
            f"{throughput['images_per_second']:.1f} images/s; time in the model "
            f"{throughput['model_fraction']:.0%}, waiting for data "
            f"{throughput['data_wait_fraction']:.0%}, other {other:.0%} "
            f"({throughput['num_workers']} loader workers, {throughput['torch_threads']} torch "
            f"threads, {throughput['usable_cores']} usable cores)")


def format_comparison(results: Mapping[str, Mapping], *, per_class: bool = True) -> str:
    """Several results (e.g. one per method) side by side: per-class IoU, then the summary.

    Args:
        results: {column name (e.g. method): result of `evaluate`}; a result holding only
            {"error": message} (a method that could not run) gets "-" and a footnote.
        per_class: include the per-class IoU rows.
    """
    columns = list(results)
    ran = [results[c] for c in columns if "error" not in results[c]]
    if not ran:
        return "\n".join(f"{c}: {results[c]['error']}" for c in columns)
    rows = []
    if per_class:
        for name in ran[0]["IoU"]:
            rows.append([name, *(_cell(results[c].get("IoU", {}).get(name)) for c in columns)])
        rows.append([""] * (len(columns) + 1))
    for key in SUMMARY_KEYS:
        if any(key in result for result in ran):
            rows.append([key, *(_summary_cell(results[c], key) for c in columns)])
    notes = [f"{c}: {results[c]['error']}" for c in columns if "error" in results[c]]
    header = ["IoU" if per_class else "metric", *columns]
    return "\n".join([_rows_to_text(header, rows), *notes])


def _zegkit_version() -> str:
    from zegkit import __version__

    return __version__


def run_record(settings: Mapping[str, object] | None = None) -> dict[str, object]:
    """Settings plus the UTC timestamp and zegkit version, as recorded with a result."""
    record = dict(settings or {})
    record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["zegkit_version"] = _zegkit_version()
    return record


def save_results(path: str | os.PathLike, result: Mapping) -> Path:
    """Write a result (or {name: result}) as JSON, atomically, creating the parent folder.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic(dict(result), path)
    return path
