"""Benchmark: head ablation and activation patching, exact vs attribution patching (AtP), and DLA, on smollm2.

    .venv/bin/python benchmarks/heads.py [--threads N] [--skip-exact-heads] [--skip-graddrop]

Prints (and saves to benchmarks/results/heads.txt): the exact zero/mean ablation of all 270 heads over
64 tokens of the built-in text (what `lmscope heads` runs) against its AtP estimate (one forward +
backward) — times and the Spearman rank correlation of the estimates with the exact scores; exact
activation patching on the IOI pair against its AtP estimate (times, correlations per site); direct
logit attribution's time and sum check; AtP with torch's default thread count against lmscope's choice;
AtP with GradDrop (AtP*'s fix for cancelling paths; a magnitude estimate, so it is compared with
|exact| beside |AtP|). Times are wall and CPU seconds (CPU: what survives a shared machine).
No peer library is installed for these (TransformerLens is not a dependency); the exact path is the
reference. Not a test: times depend on the machine and its load, which is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: lmscope's choice)")
    ap.add_argument("--skip-exact-heads", action="store_true", help="skip the slow exact head ablation")
    ap.add_argument("--skip-graddrop", action="store_true", help="skip AtP + GradDrop")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "heads.txt"))
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    from lmscope.cli.speed import choose_threads

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    import lmscope
    from lmscope.explain.atp import rank_correlation
    from lmscope.explain.dla import dla
    from lmscope.explain.heads import head_importance
    from lmscope.explain.patching import patch

    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    def load() -> str:
        return f"{os.getloadavg()[0]:.1f}"

    lm = lmscope.load("smollm2", progress=False)
    say(f"lmscope heads/patching benchmark · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(
        f"model smollm2 (135M, float32, CPU, torch {torch.__version__}); {threads} thread(s) "
        f"(lmscope's choice; torch's default here: {default_threads}); {len(os.sched_getaffinity(0))} CPUs; "
        f"load avg at start {load()}"
    )
    say("the machine is shared: times are noisy; correlations are exact")
    say()

    def timed(fn):
        """(wall seconds, result); the CPU seconds of the call are left in ``timed.cpu``."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        timed.cpu = time.process_time() - c0
        return time.perf_counter() - t0, out

    def top10(a: np.ndarray) -> set:
        flat = np.where(np.isnan(a), -np.inf, a).ravel()
        return {divmod(int(i), a.shape[1]) for i in np.argsort(-flat)[:10]}

    head_importance(lm, methods=("zero",), approx="atp", max_tokens=16, window=16)  # warm up
    t_atp, atp = timed(lambda: head_importance(lm, methods=("zero", "mean"), approx="atp"))
    say(f"heads, 64 tokens, all {lm.n_layers * lm.n_heads} heads, zero + mean ablation (load {load()})")
    c_atp = timed.cpu
    say(f"  AtP estimate (one forward + backward)      {t_atp:8.2f} s wall {c_atp:7.2f} s CPU")
    if not args.skip_graddrop:
        t_gd, gd = timed(lambda: head_importance(lm, methods=("zero", "mean"), approx="atp-graddrop"))
        say(
            f"  AtP + GradDrop (+60 partial backwards)     {t_gd:8.2f} s wall {timed.cpu:7.2f} s CPU  (load {load()})"
        )
    if not args.skip_exact_heads:
        t_exact, exact = timed(lambda: head_importance(lm, methods=("zero", "mean")))
        c_exact = timed.cpu
        say(
            f"  exact ablation (540 ablated forwards)      {t_exact:8.2f} s wall {c_exact:7.2f} s CPU  (load {load()})"
        )
        say(
            f"  speed-up AtP vs exact                      {t_exact / t_atp:8.1f}× wall {c_exact / c_atp:7.1f}× CPU"
        )
        for mode in ("zero", "mean"):
            c = rank_correlation(atp[f"atp_{mode}"], exact[f"ablation_{mode}"])
            top_a = {tuple(p) for p in atp.ranking(f"atp_{mode}")[:10]}
            top_e = {tuple(p) for p in exact.ranking(f"ablation_{mode}")[:10]}
            cancel = np.nanmean(atp[f"atp_{mode}_cancellation"])
            say(
                f"  {mode}-ablation: Spearman {c['spearman']:.3f}, Pearson {c['pearson']:.3f}, "
                f"top-10 overlap {len(top_a & top_e)}/10, mean cancellation {cancel:.2f}"
            )
            if not args.skip_graddrop:
                ex_abs = np.abs(exact[f"ablation_{mode}"])
                plain = rank_correlation(np.abs(atp[f"atp_{mode}"]), ex_abs)
                drop = rank_correlation(gd[f"atp_{mode}_graddrop"], ex_abs)
                ov_plain = len(top10(np.abs(atp[f"atp_{mode}"])) & top10(ex_abs))
                ov_drop = len(top10(gd[f"atp_{mode}_graddrop"]) & top10(ex_abs))
                say(
                    f"    vs |exact|: |AtP| Spearman {plain['spearman']:.3f} (top-10 {ov_plain}/10), "
                    f"GradDrop Spearman {drop['spearman']:.3f} (top-10 {ov_drop}/10)"
                )
    say()
    t_pe, exact_p = timed(lambda: patch(lm, CLEAN, CORRUPT, " Mary", " John"))
    t_pa, approx_p = timed(lambda: patch(lm, CLEAN, CORRUPT, " Mary", " John", approx="atp", exact=False))
    c_pa = timed.cpu
    say(f"patching, IOI pair ({len(exact_p.tokens)} tokens), metric {exact_p.metric_name} (load {load()})")
    say(f"  exact ({exact_p.meta['patched_runs']} patched runs)                 {t_pe:8.2f} s")
    say(f"  AtP estimate (resid, heads, heads×pos, MLP) {t_pa:8.2f} s   speed-up {t_pe / t_pa:.1f}×")
    for site, grid in (("resid", exact_p.resid_raw), ("heads", exact_p.heads_raw), ("mlp", exact_p.mlp_raw)):
        c = rank_correlation(approx_p.approx[site], grid)
        say(f"  {site:6s} Spearman {c['spearman']:.3f}, Pearson {c['pearson']:.3f} over {c['n']} sites")
    if not args.skip_graddrop:
        t_pg, gd_p = timed(
            lambda: patch(lm, CLEAN, CORRUPT, " Mary", " John", approx="atp-graddrop", exact=False)
        )
        say(f"  AtP + GradDrop {t_pg:.2f} s wall, {timed.cpu:.2f} s CPU (plain AtP {c_pa:.2f} s CPU)")
        for site, grid, lin in (
            ("resid", exact_p.resid_raw, "resid_linear"),
            ("heads", exact_p.heads_raw, "heads"),
            ("mlp", exact_p.mlp_raw, "mlp"),
        ):
            effect = np.abs(grid - exact_p.metric_corrupt)
            plain = rank_correlation(np.abs(approx_p.approx[lin] - exact_p.metric_corrupt), effect)
            drop = rank_correlation(gd_p.approx["graddrop"][site], effect)
            say(
                f"  {site:6s} vs |exact effect|: |AtP| Spearman {plain['spearman']:.3f}, "
                f"GradDrop Spearman {drop['spearman']:.3f}"
            )
    say()
    t_d, d = timed(lambda: dla(lm, CLEAN, target=" Mary", contrast=" John"))
    say(
        f"DLA, IOI, logit diff {d.logit:.4f}: {t_d:.2f} s; {len(d.parts)} parts, residual error "
        f"{d.residual_error:.1e}; top: " + ", ".join(f"{p.name} {p.value:+.2f}" for p in d.top(4))
    )
    if default_threads != threads:
        torch.set_num_threads(default_threads)
        t_def, _ = timed(lambda: head_importance(lm, methods=("zero", "mean"), approx="atp"))
        torch.set_num_threads(threads)
        t_ours, _ = timed(lambda: head_importance(lm, methods=("zero", "mean"), approx="atp"))
        say(
            f"threads: AtP heads with torch's default {default_threads} threads {t_def:.2f} s, "
            f"with lmscope's {threads} {t_ours:.2f} s (load {load()})"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
