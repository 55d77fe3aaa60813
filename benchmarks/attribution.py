"""Benchmark: lmscope integrated gradients vs Captum's LayerIntegratedGradients on smollm2.

    .venv/bin/python benchmarks/attribution.py [--threads 1] [--skip-explain]

Prints (and saves to benchmarks/results/attribution.txt) time and completeness error at 32 and 200
uniform Gauss–Legendre steps for both (same baseline: the pad token embedding at every position, same
internal batch size), their time ratio, lmscope's adaptive default (steps used, error, time) and the
wall time of `lmscope explain` with its default methods in a fresh process, the in-process explain
with work shared between methods against the per-method path (and the largest difference between
their numbers), and every method with its faithfulness. Not a test: numbers depend on the machine and
its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"
TARGET = " Mary"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: lmscope's choice)")
    ap.add_argument("--batch", type=int, default=32, help="internal_batch_size for both libraries")
    ap.add_argument("--skip-explain", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attribution.txt"))
    args = ap.parse_args()
    from lmscope.cli.speed import choose_threads

    args.threads = choose_threads(args.threads)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import captum
    from captum.attr import LayerIntegratedGradients

    import lmscope
    from lmscope.explain.api import explain
    from lmscope.explain.attribution.base import get_method
    from lmscope.explain.targets import Objective, encode_prompt, make_target

    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    lm = lmscope.load("smollm2", progress=False)
    ids = encode_prompt(lm, PROMPT)
    obj = Objective(lm, ids, make_target(lm, TARGET), baseline="pad")
    delta_f = obj.f_x - obj.f_baseline
    target_id = obj.target.token_id
    say(f"lmscope attribution benchmark · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(
        f"model smollm2 ({lm.n_params() / 1e6:.0f}M, float32, CPU, torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.1f}); "
        f"captum {captum.__version__}"
    )
    say(
        f"prompt {PROMPT!r} ({obj.n} tokens), target {TARGET!r}, baseline: pad token embedding at every position"
    )
    say(f"f(x) = {obj.f_x:.4f}, f(baseline) = {obj.f_baseline:.4f}, Δf = {delta_f:.4f}")
    say("the machine is shared with other jobs: times are noisy (± tens of %); errors are exact")
    say()

    def captum_ig(steps: int):
        def forward(input_ids):
            return lm.model(input_ids=input_ids).logits[:, -1, target_id]

        lig = LayerIntegratedGradients(forward, lm.module(lm.family.embed))
        base = torch.full_like(ids[None], lm.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        attr = lig.attribute(
            ids[None], baselines=base, n_steps=steps, method="gausslegendre", internal_batch_size=args.batch
        )
        dt = time.perf_counter() - t0
        scores = attr[0].sum(-1).double()
        return dt, abs(float(scores.sum()) - delta_f), scores

    def ours(**config):
        m = get_method("integrated_gradients", internal_batch_size=args.batch, **config)
        t0 = time.perf_counter()
        res = m.attribute(obj)
        return time.perf_counter() - t0, res

    rows = []
    for steps in (32, 200):
        ct, cerr, cscores = captum_ig(steps)
        lt, res = ours(steps=steps, method="gausslegendre")
        diff = float(
            (torch.tensor(res.scores, dtype=torch.float64) - cscores).abs().max() / cscores.abs().max()
        )
        rows.append((steps, ct, cerr, lt, res.info["completeness_error"], lt / ct, diff))
    at, ares = ours()

    say(f"{'':34s}{'steps':>7s}{'time s':>9s}{'|Σattr − Δf|':>14s}{'% of |Δf|':>11s}")
    for steps, ct, cerr, lt, lerr, ratio, diff in rows:
        say(
            f"{'captum LayerIntegratedGradients':34s}{steps:7d}{ct:9.2f}{cerr:14.4f}{100 * cerr / abs(delta_f):11.1f}"
        )
        say(
            f"{'lmscope IG (gausslegendre)':34s}{steps:7d}{lt:9.2f}{lerr:14.4f}{100 * lerr / abs(delta_f):11.1f}"
        )
        say(
            f"{'  time ratio lmscope/captum':34s}{'':7s}{ratio:9.2f}×   (max rel. attribution difference {diff:.1e})"
        )
    aerr = ares.info["completeness_error"]
    say(
        f"{'lmscope IG adaptive (default)':34s}{ares.info['steps']:7d}{at:9.2f}{aerr:14.4f}{100 * aerr / abs(delta_f):11.2f}"
    )
    say(
        f"  adaptive: {ares.info['scan_points']} forward-only scan points, {ares.info['rounds']} refinement rounds, "
        f"path total variation {ares.info['path_total_variation']:.1f} logits; "
        f"time ratio vs captum at 200 steps {at / rows[1][1]:.2f}×, error ratio {rows[1][2] / max(aerr, 1e-12):.0f}× smaller"
    )
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    long_obj = Objective(lm, encode_prompt(lm, long_text)[:64], make_target(lm))
    for name in ("attention_rollout", "attention_flow"):
        t0 = time.perf_counter()
        get_method(name).attribute(long_obj)
        say(
            f"{name} on {long_obj.n} tokens × {lm.n_layers} layers: {time.perf_counter() - t0:.2f} s (incl. one forward)"
        )
    if not args.skip_explain:
        import subprocess

        say()
        cmd = [sys.executable, "-m", "lmscope.cli.main", "explain", "--text", PROMPT, "--target", TARGET]
        out_dir = Path(args.out).parent / "explain-default"
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--out", str(out_dir), "--quiet"], capture_output=True, text=True)
        fresh = time.perf_counter() - t0
        say(
            f"`lmscope explain` with the default methods in a fresh process: {fresh:.1f} s wall "
            f"(exit {proc.returncode}; load avg {os.getloadavg()[0]:.1f}; includes importing torch/transformers "
            "and loading the model)"
        )
        say()
        say(
            "in-process explain (faithfulness + randomization check for every method), shared vs per-method path:"
        )
        runs = {}
        for label, methods, share in (
            ("default methods, shared", None, True),
            ("default methods, per-method (before)", None, False),
            ("all methods, shared", "all", True),
        ):
            t0 = time.perf_counter()
            res = explain(lm, PROMPT, target=TARGET, methods=methods, share=share)
            runs[label] = (time.perf_counter() - t0, res)
            tm = res.first.timings
            parts = ", ".join(f"{k.removeprefix('method:')} {v:.2f}" for k, v in tm.items())
            say(f"  {label:38s} {runs[label][0]:7.2f} s   ({parts}; load {os.getloadavg()[0]:.1f})")
        a = runs["default methods, shared"][1].first
        b = runs["default methods, per-method (before)"][1].first
        diff = max(
            abs(x - y)
            for n in a.methods
            for x, y in zip(
                a.methods[n].faithfulness["curves"]["deletion"]
                + a.methods[n].faithfulness["curves"]["insertion"],
                b.methods[n].faithfulness["curves"]["deletion"]
                + b.methods[n].faithfulness["curves"]["insertion"],
            )
        )
        say(f"  shared vs per-method: max |Δ| over every faithfulness-curve point {diff:.1e}")
        first = runs["all methods, shared"][1].first
        say()
        say(
            f"{'all methods':24s}{'seconds':>9s}{'AOPC sum':>10s}{'del AOPC':>10s}{'ins AOPC':>10s}{'comp':>8s}{'suff':>8s}{'rand ρ':>8s}"
        )
        for name, a in first.methods.items():
            fa = a.faithfulness or {}

            def num(key, fa=fa):
                v = fa.get(key)
                return f"{v:8.3f}" if isinstance(v, float) else f"{'—':>8s}"

            say(
                f"{name:24s}{a.seconds:9.2f}{num('aopc_sum'):>10s}{num('deletion_aopc'):>10s}{num('insertion_aopc'):>10s}"
                f"{num('comprehensiveness')}{num('sufficiency')}{num('randomization_spearman')}"
            )
        rb = first.random_baseline
        say(
            f"{'random order':24s}{'':9s}{rb['aopc_sum']:10.3f}{rb['deletion_aopc']:10.3f}{rb['insertion_aopc']:10.3f}"
        )
        say(f"faithfulness ranking on this input: {', '.join(first.ranking)}")
        ig = first.methods["integrated_gradients"].info
        say(f"explain's IG: {ig['steps']} steps, completeness error {ig['completeness_error']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
