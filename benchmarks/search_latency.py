"""``lmscope search --budget latency=F`` for the structured and combined spaces on smollm2 (issue 12): a short
search, then the chosen point and the uniform baselines that fit the same predicted latency measured on the real
models ``compress`` builds from their recipes (prefill of 128 tokens + one decode step, as the table), and the
table's interpolation checked against a direct measurement of a configuration off its grid of kept sizes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_latency.py --budget latency=0.7 \\
        --space quant,heads,neurons --max-evals 40 --time-limit 900 [--embedding float]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", default="latency=0.7")
    ap.add_argument("--space", default="quant,heads,neurons")
    ap.add_argument("--levels", default="float,int8,int4-g32")
    ap.add_argument("--granularity", default="block")
    ap.add_argument(
        "--embedding", default="int8", help="token embedding + tied head: int8 (default) or float"
    )
    ap.add_argument("--max-evals", type=int, default=40)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds of search (evaluations)")
    ap.add_argument("--calibration-tokens", type=int, default=128)
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--offspring", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-refit", action="store_true", help="structured spaces: plain slicing (no least squares)"
    )
    ap.add_argument("--prior-tokens", type=int, default=1024, help="calibration tokens for the priors")
    ap.add_argument("--out", default=None, help="also write pareto.json / recipe.json / report.html here")
    args = ap.parse_args()

    import lmscope
    from lmscope.compress import compress
    from lmscope.compress.search import search
    from lmscope.compress.search.latency import StructureLatencyTable, measure_model

    def load() -> str:
        return f"load avg {os.getloadavg()[0]:.1f} (uptime: {subprocess.getoutput('uptime').strip()})"

    print(f"threads {torch.get_num_threads()}; {load()}", flush=True)
    lm = lmscope.load(args.model, progress=False)
    quant = "quant" in args.space.split(",")
    t = time.perf_counter()
    res = search(
        lm,
        args.budget,
        args.space,
        levels=tuple(args.levels.split(",")),
        granularity=args.granularity,
        embedding=args.embedding,
        simulate=quant,  # KL from emulated kernels (fast on this CPU); the latency table times the real ones
        calibration_tokens=args.calibration_tokens,
        heldout_tokens=args.heldout_tokens,
        max_evals=args.max_evals,
        time_limit=args.time_limit,
        seed=args.seed,
        offspring=args.offspring,
        prior="priors",
        structure={"prior_tokens": args.prior_tokens, **({"refit": False} if args.no_refit else {})},
        on_eval=lambda n: (
            n % 10 or print(f"  {n} evaluations, {time.perf_counter() - t:.0f} s, {load()}", flush=True)
        ),
    )
    wall = time.perf_counter() - t
    if args.out:
        res.write(args.out)
    print(res.to_text())
    info = res.stats["latency_table"]
    print(
        f"latency table: {info['timings']} whole-model timings in {info['measured_seconds']} s (0 if read from the "
        f"cache), reference prefill {info['reference'][0]:.3f} s, decode {info['reference'][1] * 1e3:.1f} ms; "
        f"all-float working model {info['fixed'][0]:.3f} s, {info['fixed'][1] * 1e3:.1f} ms"
    )
    table = StructureLatencyTable(json.loads(Path(info["path"]).read_text()))
    ref_p, ref_d = table.reference

    def real(config, recipe=None) -> tuple[float, float, float]:
        done = compress(lm, recipe or res.space.recipe(config))
        p, d = measure_model(done.lm.model, lm.vocab_size)
        return p, d, 0.5 * (p / ref_p + d / ref_d)

    rows = []
    if res.chosen is not None:
        pts = [("chosen", res.chosen_point)]
        fits = sorted(
            (
                p
                for p in res.points
                if p.get("label", "").startswith("uniform") and p["within_budget"] and p.get("ppl")
            ),
            key=lambda p: p["kl"],
        )
        pts += [(p["label"], p) for p in fits[:2]]
        pts += [(p["label"], p) for p in res.points if p.get("baseline")][
            :1
        ]  # uniform precision, full structure
        for name, p in pts:
            recipes = getattr(res, "baseline_recipes", {})  # off the level grid (structured baselines)
            config = None if name in recipes else tuple(p["config"][u["name"]] for u in res.units)
            mp, md, mf = real(config, recipes.get(name))
            rows.append((name, p, mp, md, mf))
            print(f"  measured {name}: {mf:.3f} ({load()})", flush=True)
    # interpolation: every MLP at a neuron level off the measured grid (float, every head), predicted vs measured
    grp = table.groups[0]
    grid = {r[0] for r in grp["mlp"]["float"]}
    mlp_units = [k for k, u in enumerate(res.space.units) if u.kind == "mlp"]
    check = None
    if mlp_units:
        lv = next(
            lv
            for lv in res.space.unit_levels[mlp_units[0]]
            if len(res.space.neuron_keep[(0, lv)]) not in grid
        )
        config = list(res.space.full())
        for k in mlp_units:
            config[k] = lv
        kept = len(res.space.neuron_keep[(0, lv)])
        pred = table.seconds([(None, kept, False, "float", "float")] * lm.n_layers)
        mp, md, mf = real(tuple(config))
        check = (lv, kept, sorted(grid), pred, (mp, md, mf))

    print()
    print(
        f"{args.model}, {args.budget}, --space {args.space}, levels {args.levels}, embedding {args.embedding}, "
        f"{load()}"
    )
    print()
    print("| point | predicted latency | measured latency (prefill / decode) | KL | held-out ppl | Δppl |")
    print("|---|---|---|---|---|---|")
    ref = res.reference_ppl
    for name, p, mp, md, mf in rows:
        ppl = p.get("ppl")
        print(
            f"| {name}: {p['describe']} | {p['latency_fraction']:.3f} | {mf:.3f} ({mp * 1e3:.0f} ms / {md * 1e3:.1f} ms) "
            f"| {p['kl']:.4f} | {ppl:.3f} | {ppl / ref - 1:+.1%} |"
            if ppl
            else f"| {name} | {p['latency_fraction']:.3f} | {mf:.3f} | {p['kl']:.4f} | | |"
        )
    if check:
        lv, kept, grid, pred, (mp, md, mf) = check
        print(
            f"\ninterpolation check: every MLP at {lv} ({kept} neurons; measured grid {grid}), float: predicted "
            f"{table.fraction_of(pred):.3f} (prefill {pred[0] * 1e3:.0f} ms, decode {pred[1] * 1e3:.1f} ms), measured "
            f"{mf:.3f} ({mp * 1e3:.0f} ms, {md * 1e3:.1f} ms): error {mf / table.fraction_of(pred) - 1:+.1%}"
        )
    s = res.stats
    print(
        f"cost: {s['evaluations']} evaluations ({s['computed']} computed, {s['eval_seconds']} s of fitness, "
        f"{s['generations']} generations); search() wall {wall:.0f} s incl. table, priors, held-out ppl; {load()}"
    )


if __name__ == "__main__":
    main()
