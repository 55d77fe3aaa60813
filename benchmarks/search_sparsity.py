"""``lmscope search --space sparsity`` on smollm2, goal 3 of issue 12: 70% unstructured sparsity of the block
linears, per-block Wanda levels found by the search vs uniform Wanda and OWL's allocation (Yin et al. 2024,
M=5, lambda=0.08), held-out perplexity on the evaluation half of the built-in text (disjoint from the
calibration half the Wanda scores and the KL fitness use). Every number comes from this run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_sparsity.py --time-limit 900
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--max-evals", type=int, default=400)
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--calibration-tokens", type=int, default=128)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--prior", default="error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write pareto.json, recipe.json and report.html here")
    args = ap.parse_args()

    import lmscope
    from lmscope.compress.search.sparsity import search_sparsity

    t0 = time.perf_counter()
    lm = lmscope.load(args.model, progress=False)
    print(f"threads {torch.get_num_threads()}; load {time.perf_counter() - t0:.0f} s", flush=True)
    t = time.perf_counter()
    res = search_sparsity(
        lm,
        args.sparsity,
        calibration_tokens=args.calibration_tokens,
        window=args.window,
        heldout_tokens=args.heldout_tokens,
        max_evals=args.max_evals,
        time_limit=args.time_limit,
        seed=args.seed,
        offspring=args.offspring,
        prior=args.prior,
        on_eval=lambda n: n % 10 or print(f"  {n} evaluations, {time.perf_counter() - t:.0f} s", flush=True),
    )
    wall = time.perf_counter() - t
    if args.out:
        res.write(args.out)
        print(f"wrote {args.out}/ pareto.json, recipe.json, report.html")
    res = res.to_dict()
    ref = res["reference"]["ppl"]
    rows = [(i, p) for i, p in enumerate(res["points"]) if p.get("ppl") is not None]
    print(
        f"\n| point | sparsity | KL ({res['stats']['stage_tokens'][-1]} calib tokens) | held-out ppl | Δppl |"
    )
    print("|---|---|---|---|---|")
    print(f"| dense | 0 | 0 | {ref:.3f} | |")
    for i, p in sorted(
        rows, key=lambda r: (r[1]["label"] != "uniform 0.7", r[1]["label"] != "OWL", r[1]["kl"])
    ):
        name = "**searched**" if i == res["chosen"] else (p["label"] or p["origin"])
        print(
            f"| {name} | {p['sparsity']:.4f} | {p['kl']:.4f} | {p['ppl']:.3f} | {p['ppl'] / ref - 1:+.1%} |"
        )
    chosen = res["points"][res["chosen"]] if res["chosen"] is not None else None
    uni = next((p for p in res["points"] if p["label"] == f"uniform {args.sparsity:g}"), None)
    owl = next(p for p in res["points"] if p["label"] == "OWL")
    if chosen is not None and uni is not None:
        beat = chosen["ppl"] < uni["ppl"] and chosen["ppl"] < owl["ppl"]
        print(
            f"\nsearched ppl {chosen['ppl']:.3f} vs uniform Wanda {uni['ppl']:.3f} vs OWL {owl['ppl']:.3f}: "
            f"goal 3 (searched beats both) {'met' if beat else 'MISSED'}"
        )
        print("searched levels:", " ".join(chosen["config"][u["name"]] for u in res["units"]))
        print("OWL levels:     ", " ".join(f"{res['owl'][u['name']]:.3f}" for u in res["units"]))
    s = res["stats"]
    print(
        f"cost: {s['evaluations']} evaluations ({s['generations']} generations, {s['accepted']} accepted), "
        f"{s['eval_seconds']} s of fitness, {s['evals_per_hour']} evaluations/hour; wall {wall:.0f} s"
    )
    print(json.dumps({"stats": s, "settings": res["settings"]}))


if __name__ == "__main__":
    main()
