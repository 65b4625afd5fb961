"""Evaluation: metrics (pure), the sharded resumable loop, tables and JSON, `zegkit eval` runs.

- `metrics`: confusion matrix, mIoU and friends (mmseg-style), seen/unseen/hIoU.
- `loop`: `evaluate`, one segmenter over a labelled dataset, sharded across torchrun processes.
- `bootstrap`: scene-bootstrap 95% intervals of mIoU, paired differences between methods.
- `checkpoint`: per-rank atomic resume checkpoints.
- `report`: text tables, run records, JSON results.
- `runs`: build a method's segmenter under a protocol and evaluate it (`zegkit eval`).
"""

from zegkit.distributed import DistributedContext, init_distributed
from zegkit.evaluate.bootstrap import (
    ImageStats,
    bootstrap_difference,
    bootstrap_intervals,
    compare_results,
)
from zegkit.evaluate.checkpoint import rank_checkpoint_path
from zegkit.evaluate.loop import evaluate
from zegkit.evaluate.metrics import confusion_matrix, harmonic_mean, metrics
from zegkit.evaluate.report import (
    format_comparison,
    format_table,
    format_throughput,
    run_record,
    save_results,
)
from zegkit.evaluate.runs import evaluate_method, method_progress_file, run_eval, run_eval_all

__all__ = [
    "DistributedContext",
    "ImageStats",
    "bootstrap_difference",
    "bootstrap_intervals",
    "compare_results",
    "confusion_matrix",
    "evaluate",
    "evaluate_method",
    "format_comparison",
    "format_table",
    "format_throughput",
    "harmonic_mean",
    "init_distributed",
    "method_progress_file",
    "metrics",
    "rank_checkpoint_path",
    "run_eval",
    "run_eval_all",
    "run_record",
    "save_results",
]
