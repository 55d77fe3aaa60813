"""Rows for benchmarks/compression.py (``ROW_PROVIDERS``): the pruning targets of the compression benchmark.

``benchmark_rows(ctx)`` returns (label, LM, note) for 50% unstructured magnitude and Wanda, and 25% of heads
removed by importance and by random order; the benchmark measures them like every other row.
Standalone numbers: benchmarks/pruning_rows.py -> benchmarks/results/pruning.txt.
"""

from __future__ import annotations

import time

from ..recipe import Calibration
from .heads import prune_heads
from .unstructured import prune_unstructured


def benchmark_rows(ctx) -> list[tuple[str, object, str]]:
    rows = []
    for method in ("magnitude", "wanda"):
        lm = ctx.fresh()
        t = time.perf_counter()
        prune_unstructured(lm, 0.5, method, calib=Calibration(lm, ctx.calibration_text))
        rows.append(
            (
                f"prune 50% unstructured {method}",
                lm,
                f"{time.perf_counter() - t:.0f} s; zeros in dense tensors: same bytes and speed",
            )
        )
    for order in ("importance", "random"):
        lm = ctx.fresh()
        t = time.perf_counter()
        info = prune_heads(lm, 0.25, order, calib=Calibration(lm, ctx.calibration_text))
        rows.append(
            (
                f"prune 25% heads {order}",
                lm,
                f"{time.perf_counter() - t:.0f} s; {info['heads_removed']}/{info['heads_before']} heads removed",
            )
        )
    return rows
