"""Pruning benchmark rows for benchmarks/compression.py (and runnable alone):

- 50% unstructured sparsity: magnitude vs Wanda perplexity (target: Wanda's damage <= half of magnitude's);
- 25% of attention heads physically removed: importance vs random order (target: importance's damage <= half
  of random's, and prefill faster than the original).

Each function returns rows: dicts with name, ppl, ppl_change_pct, params, bytes, prefill_ratio, note; and
``targets(rows)`` returns (description, measured, met) triples. Run alone:
    .venv/bin/python benchmarks/pruning_rows.py [--windows 8]   # writes benchmarks/results/pruning.txt
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import lmscope
from lmscope import LM
from lmscope.compress.evaluate import evaluate
from lmscope.compress.prune import prune_heads, prune_unstructured
from lmscope.compress.recipe import Calibration


def _row(stats, ref, note="", seconds=None) -> dict:
    return {
        "name": stats.name,
        "ppl": stats.perplexity,
        "ppl_change_pct": 100 * (stats.perplexity / ref.perplexity - 1),
        "params": stats.params,
        "bytes": stats.bytes,
        "prefill_tok_s": stats.prefill_tokens_per_s,
        "prefill_ratio": (stats.prefill_tokens_per_s / ref.prefill_tokens_per_s)
        if stats.prefill_tokens_per_s and ref.prefill_tokens_per_s
        else None,
        "top1_agreement": stats.top1_agreement,
        "kl": stats.kl,
        "compress_s": seconds,
        "note": note,
    }


def _copy(lm, name):
    return LM(copy.deepcopy(lm.model), lm.tokenizer, name=name)


def unstructured_rows(lm=None, sparsity: float = 0.5, windows: int = 8, calib_windows: int = 8) -> list[dict]:
    lm = lm or lmscope.load("smollm2", progress=False)
    calib = Calibration(lm, n_windows=calib_windows)
    models, seconds = [lm], [None]
    for method in ("magnitude", "wanda"):
        m = _copy(lm, f"{method} {sparsity:.0%}")
        t = time.perf_counter()
        prune_unstructured(m, sparsity, method, calib=calib)
        seconds.append(time.perf_counter() - t)
        models.append(m)
    ev = evaluate(models, windows=windows, latency=False)
    ref = ev.models[0]
    note = "zeros in dense tensors: same bytes, same speed"
    return [_row(s, ref, note if i else "reference", seconds[i]) for i, s in enumerate(ev.models)]


def head_rows(lm=None, fraction: float = 0.25, windows: int = 8, calib_windows: int = 8, repeats: int = 5):
    lm = lm or lmscope.load("smollm2", progress=False)
    calib = Calibration(lm, n_windows=calib_windows)
    models, seconds, notes = [lm], [None], ["reference"]
    for order in ("importance", "random"):
        m = _copy(lm, f"heads -{fraction:.0%} {order}")
        t = time.perf_counter()
        info = prune_heads(m, fraction, order, calib=calib)
        seconds.append(time.perf_counter() - t)
        notes.append(f"{info['heads_removed']}/{info['heads_before']} heads removed")
        models.append(m)
    ev = evaluate(models, windows=windows, latency=True, decode_tokens=16, repeats=repeats)
    ref = ev.models[0]
    return [_row(s, ref, notes[i], seconds[i]) for i, s in enumerate(ev.models)]


def targets(unstructured: list[dict], heads: list[dict]) -> list[tuple[str, str, bool]]:
    out = []
    if unstructured:
        mag = next(r for r in unstructured if r["name"].startswith("magnitude"))
        wan = next(r for r in unstructured if r["name"].startswith("wanda"))
        out.append(
            (
                "50% unstructured: Wanda damage <= 1/2 magnitude damage",
                f"Wanda {wan['ppl_change_pct']:+.1f}% vs magnitude {mag['ppl_change_pct']:+.1f}%",
                wan["ppl_change_pct"] <= 0.5 * mag["ppl_change_pct"],
            )
        )
    if heads:
        imp = next(r for r in heads if r["name"].endswith("importance"))
        rnd = next(r for r in heads if r["name"].endswith("random"))
        out.append(
            (
                "25% heads: importance damage <= 1/2 random damage",
                f"importance {imp['ppl_change_pct']:+.1f}% vs random {rnd['ppl_change_pct']:+.1f}%",
                imp["ppl_change_pct"] <= 0.5 * rnd["ppl_change_pct"],
            )
        )
        out.append(
            (
                "25% heads: prefill faster than the original",
                f"importance-pruned prefill {imp['prefill_ratio']:.2f}x the original",
                (imp["prefill_ratio"] or 0) > 1.0,
            )
        )
    return out


def format_rows(rows: list[dict]) -> str:
    cols = [
        "name",
        "ppl",
        "Δppl",
        "params",
        "bytes",
        "prefill tok/s",
        "prefill x",
        "top-1",
        "KL",
        "time",
        "note",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["name"],
                f"{r['ppl']:.3f}",
                f"{r['ppl_change_pct']:+.2f}%",
                f"{r['params'] / 1e6:.2f}M",
                f"{r['bytes'] / 2**20:.1f}MB",
                f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-",
                f"{r['prefill_ratio']:.2f}" if r["prefill_ratio"] else "-",
                f"{r['top1_agreement']:.1%}",
                f"{r['kl']:.3f}",
                f"{r['compress_s']:.0f}s" if r["compress_s"] else "-",
                r["note"],
            ]
        )
    table = [cols, *body]
    w = [max(len(row[c]) for row in table) for c in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w[i]) for i, v in enumerate(row)).rstrip() for row in table)


# rows for benchmarks/compression.py (its ROW_PROVIDERS): (label, LM, note), measured like every other row
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 256 tokens")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows of 256 tokens")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "pruning.txt"))
    args = p.parse_args(argv)
    lm = lmscope.load("smollm2", progress=False)
    t0 = time.perf_counter()
    un = unstructured_rows(lm, windows=args.windows, calib_windows=args.calib_windows)
    hd = head_rows(lm, windows=args.windows, calib_windows=args.calib_windows)
    lines = [
        f"lmscope pruning benchmark — smollm2 fp32, CPU threads {torch.get_num_threads()}, "
        f"{args.windows}x256 evaluation tokens (built-in evaluation text), "
        f"{args.calib_windows}x256 calibration tokens (disjoint), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "50% unstructured sparsity (all block linears)",
        format_rows(un),
        "",
        "25% of attention heads physically removed (GQA aware)",
        format_rows(hd),
        "",
        "targets:",
    ]
    for desc, measured, met in targets(un, hd):
        lines.append(f"  [{'met' if met else 'MISSED'}] {desc}: {measured}")
    lines.append(f"\ntotal {time.perf_counter() - t0:.0f} s (machine shared; timings noisy)")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
