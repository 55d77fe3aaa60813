"""Benchmark: lmscope integrated gradients vs Captum's LayerIntegratedGradients on smollm2.

    .venv/bin/python benchmarks/attribution.py [--threads 1] [--skip-explain]
    .venv/bin/python benchmarks/attribution.py --parts 2 [--before-src OTHER_CHECKOUT/src]
    .venv/bin/python benchmarks/attribution.py --cli 3 [--before-src OTHER_CHECKOUT/src]

``--parts N``: only the default explain's parts, each in a fresh process, N times (alternating with
``--before-src``'s code when given, so both see the same machine load): wall and CPU seconds of
importing torch + transformers (through lmscope), loading smollm2 from the conversion cache, each part
of explain (methods, faithfulness curves, randomization check) and writing the report, with the load
average. CPU seconds are the comparison that survives a shared machine (1 thread).

``--cli N``: the issue's measurement itself — ``lmscope explain`` with its default methods and thread
choice, N fresh processes (alternating with ``--before-src``), wall and CPU seconds, the load at each
start, and the largest difference between the two codes' reported numbers.

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


#: one fresh process: the default explain, timed part by part (wall and CPU seconds)
PARTS_SCRIPT = r"""
import json, os, sys, time
torch_threads = int(sys.argv[1])
marks = [("start", time.perf_counter(), time.process_time())]
def mark(name):
    marks.append((name, time.perf_counter(), time.process_time()))
import torch
torch.set_num_threads(torch_threads)
mark("import torch")
from lmscope.models.lean import lean_transformers
lean_transformers()  # as the CLI does, before transformers' modeling code is imported
import lmscope, lmscope.lm
from lmscope.explain.api import explain
mark("import transformers + lmscope")
lm = lmscope.load("smollm2", progress=False)
mark("load smollm2")
parts = {}
def timed_part(fn):
    def run(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a, **k)
        parts.setdefault(fn.__name__, [0.0, 0.0])
        parts[fn.__name__][0] += time.perf_counter() - t
        parts[fn.__name__][1] += time.process_time() - c
        return out
    return run
import lmscope.explain.api as api
api.faithfulness_many = timed_part(api.faithfulness_many)
api.randomized_copy = timed_part(api.randomized_copy)
shared = [0, 0]  # tokens in the perturbed batches, distinct prefixes computed
try:
    import lmscope.explain.prefix as prefix
    plain_index = prefix.prefix_index
    def counted_index(embeds):
        index, inverse = plain_index(embeds)
        shared[0] += embeds.shape[0] * embeds.shape[1]
        shared[1] += len(index)
        return index, inverse
    prefix.prefix_index = counted_index
except ImportError:  # a checkout without shared prefixes
    pass
res = explain(lm, sys.argv[2], target=sys.argv[3])
mark("explain")
res.write_json(os.devnull) if hasattr(res, "write_json") else None
res.report(os.path.join(sys.argv[4], "report.html"))
mark("report")
out = {name: (t - t0, c - c0) for (name, t, c), (_, t0, c0) in zip(marks[1:], marks[:-1])}
out["explain: " + "+".join(res.first.timings)] = tuple(res.first.timings.values())
out["parts"] = parts
out["shared"] = shared
out["total"] = (marks[-1][1] - marks[0][1], marks[-1][2] - marks[0][2])
out["load_avg"] = os.getloadavg()[0]
print(json.dumps(out))
"""


def explain_parts(runs: int, before_src: str | None, threads: int, say) -> None:
    """The default explain in fresh processes, part by part (``--parts``)."""
    import json
    import subprocess
    import tempfile

    here = str(Path(__file__).resolve().parent.parent / "src")
    codes = [("after (this checkout)", here)] + ([("before", before_src)] if before_src else [])
    rows: dict[str, list[dict]] = {label: [] for label, _ in codes}
    for _ in range(runs):
        for label, src in codes:
            env = {**os.environ, "PYTHONPATH": src, "TOKENIZERS_PARALLELISM": "false"}
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(
                    [sys.executable, "-c", PARTS_SCRIPT, str(threads), PROMPT, TARGET, tmp],
                    capture_output=True,
                    text=True,
                    env=env,
                )
            if proc.returncode:
                say(f"{label}: failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            rows[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for label, got in rows.items():
        for i, r in enumerate(got):
            say(
                f"{label}, run {i + 1} (load avg {r['load_avg']:.1f} at its end), {threads} thread(s): wall s / CPU s"
            )
            for key in ("import torch", "import transformers + lmscope", "load smollm2"):
                say(f"  {key:40s} {r[key][0]:7.2f} / {r[key][1]:6.2f}")
            ekey = next(k for k in r if k.startswith("explain: "))
            names = ekey.removeprefix("explain: ").split("+")
            say(f"  {'explain':40s} {r['explain'][0]:7.2f} / {r['explain'][1]:6.2f}")
            for n, v in zip(names, r[ekey]):
                say(f"    {n.removeprefix('method:'):38s} {v:7.2f}")
            for n, (w, c) in r["parts"].items():
                say(f"    of which {n:29s} {w:7.2f} / {c:6.2f}")
            tokens, computed = r.get("shared", (0, 0))
            if tokens:
                say(f"    perturbed batches: {tokens} tokens, {computed} distinct prefixes computed")
            say(f"  {'report':40s} {r['report'][0]:7.2f} / {r['report'][1]:6.2f}")
            say(f"  {'total (fresh process)':40s} {r['total'][0]:7.2f} / {r['total'][1]:6.2f}")


def explain_cli(runs: int, before_src: str | None, say) -> None:
    """``lmscope explain`` with the default methods and threads, each run a fresh process (``--cli``),
    alternating with ``--before-src``'s code: wall and CPU seconds (user + system, from the child's
    rusage), the processes running at its start and the load average; and the largest difference
    between the two codes' attributions.json numbers."""
    import json
    import subprocess
    import tempfile

    from lmscope.cli.speed import others_running

    here = str(Path(__file__).resolve().parent.parent / "src")
    codes = [("after (this checkout)", here)] + ([("before", before_src)] if before_src else [])
    numbers: dict[str, dict] = {}

    def flat(x, path=""):
        if isinstance(x, dict):
            return {
                k2: v2
                for k, v in x.items()
                if k not in ("seconds", "timings")
                for k2, v2 in flat(v, f"{path}.{k}").items()
            }
        if isinstance(x, list):
            return {k2: v2 for i, v in enumerate(x) for k2, v2 in flat(v, f"{path}[{i}]").items()}
        return {path: x} if isinstance(x, float) else {}

    for i in range(runs):
        for label, src in codes:
            env = {**os.environ, "PYTHONPATH": src, "TOKENIZERS_PARALLELISM": "false"}
            env.pop("OMP_NUM_THREADS", None)  # lmscope's own thread choice
            running, load0 = others_running(), os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "lmscope.cli.main", "explain", "--model", "smollm2"]
                cmd += ["--text", PROMPT, "--target", TARGET, "--out", f"{tmp}/out", "--quiet"]
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                err = proc.stderr.read().decode()
                proc.stderr.close()
                if proc.returncode:
                    say(f"{label}: failed: {err.strip().splitlines()[-1]}")
                    continue
                numbers[label] = flat(json.loads(Path(f"{tmp}/out/attributions.json").read_text()))
            say(
                f"  {label:22s} run {i + 1}: {wall:6.2f} s wall, {usage.ru_utime + usage.ru_stime:6.2f} s CPU   "
                f"(other processes running at its start {running:.0f}, load avg {load0:.1f} → {os.getloadavg()[0]:.1f})"
            )
    if len(numbers) == 2:
        a, b = numbers.values()
        diff = max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for k in a.keys() & b.keys())
        say(
            f"  attributions.json, after vs before: {len(a.keys() & b.keys())} numbers in both (of {len(a)} / {len(b)}), "
            f"largest difference {diff:.1e} (relative where |value| > 1)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--parts", type=int, default=0, help="only the default explain, part by part, N fresh runs"
    )
    ap.add_argument(
        "--cli",
        type=int,
        default=0,
        help="only `lmscope explain` (default methods and threads), N fresh runs",
    )
    ap.add_argument(
        "--before-src", default=None, help="with --parts/--cli: another checkout's src/ to compare"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: lmscope's choice)")
    ap.add_argument("--batch", type=int, default=32, help="internal_batch_size for both libraries")
    ap.add_argument("--skip-explain", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attribution.txt"))
    args = ap.parse_args()
    from lmscope.cli.speed import choose_threads

    args.threads = choose_threads(args.threads)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cli:
        lines = []

        def say_cli(s: str = "") -> None:
            print(s, flush=True)
            lines.append(s)

        say_cli(
            f"`lmscope explain` (default methods, default threads), fresh processes, alternating · "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        say_cli(f"prompt {PROMPT!r}, target {TARGET!r}; {os.cpu_count()} CPUs")
        explain_cli(args.cli, args.before_src, say_cli)
        out = Path(args.out).with_name("attribution-cli.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    if args.parts:
        lines: list[str] = []

        def say_parts(s: str = "") -> None:
            print(s, flush=True)
            lines.append(s)

        say_parts(f"default explain, part by part · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        say_parts(f"prompt {PROMPT!r}, target {TARGET!r}; load avg at start {os.getloadavg()[0]:.1f}")
        explain_parts(args.parts, args.before_src, args.threads, say_parts)
        out = Path(args.out).with_name("attribution-parts.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return

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
