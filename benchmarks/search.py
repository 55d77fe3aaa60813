"""``lmscope search`` on smollm2, goal 1 of issue 12: mixed precision at the bytes of uniform int4 g64 vs
uniform int4 RTN (g32/g64/g128) and GPTQ int4 g64, Δppl on held-out text (the evaluation half of the built-in
text, disjoint from the calibration half the KL fitness uses).

The budget is the exact state-dict bytes of uniform int4 g64 (``compress --quantize int4``), as a fraction of
fp32. Every number comes from this run; the search is sized for a shared 2-core machine (few calibration tokens,
a bounded number of evaluations), so it is a far smaller search than EvoPress runs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search.py --max-evals 300 --time-limit 600

``--levels`` adds the GPTQ levels (``gptq-g32``, ``gptq-g64``: GPTQ from the unquantized model's calibration
inputs, one variant per unit, mixed freely); the uniform rows then include them, beside the block-sequential
GPTQ baseline that ``compress --quantize gptq4`` builds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GPTQ_NOTE = {
    "gptq-g32": " (GPTQ, per layer)",
    "gptq-g64": " (GPTQ, per layer)",
    "gptq4-g64": " (GPTQ block-sequential, compress)",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-evals", type=int, default=300)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds of search (evaluations)")
    ap.add_argument("--calibration-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--granularity", default="kind")
    ap.add_argument(
        "--levels",
        default="float,int8,int4-g32,int4-g64,int4-g128",
        help="comma list of the space's levels (add gptq-g32,gptq-g64 for the GPTQ levels)",
    )
    ap.add_argument(
        "--embedding",
        default="int8",
        help="the token embedding + tied head in every configuration: int8, int4-gN, int4m-gN or gptq4-gN",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--prior", default="sensitivity", help="sensitivity (measured, 1 eval per unit) or error")
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument(
        "--simulate", action="store_true", help="fake-quantized fp32 candidates during the search"
    )
    ap.add_argument("--out", default=None, help="also write pareto.json / recipe.json / report.html here")
    ap.add_argument(
        "--budgets",
        default="int4-g64",
        help="comma list of uniform levels whose exact bytes are the budgets, searched one after the other "
        "(int4-g64 is goal 1; int4-g32 leaves the space room to mix int8 and int4-g64)",
    )
    args = ap.parse_args()
    for i, level in enumerate(x.strip() for x in args.budgets.split(",") if x.strip()):
        run_one(args, level, first=i == 0)


def run_one(args, level: str, first: bool) -> None:

    import lmscope
    from lmscope.compress import compress
    from lmscope.compress.recipe import Quantize, Recipe
    from lmscope.compress.search import search
    from lmscope.compress.search.space import fp32_bytes

    t0 = time.perf_counter()
    lm = lmscope.load(args.model, progress=False)
    load_s = time.perf_counter() - t0
    ref_bytes = fp32_bytes(lm.model)
    from lmscope.compress.search.space import LEVELS

    scheme, group = LEVELS[level]
    uniform = compress(lm, Quantize(scheme, group_size=group))
    budget = uniform.bytes_after / ref_bytes
    del uniform
    baselines = (
        {} if args.no_gptq or not first else {"gptq4-g64": Recipe((Quantize("gptq4", group_size=64),))}
    )
    print(
        f"\n== threads {torch.get_num_threads()}; load {load_s:.0f} s; budget = uniform {level} = {budget:.6f} of fp32",
        flush=True,
    )
    t = time.perf_counter()
    res = search(
        lm,
        f"bytes={budget}",
        granularity=args.granularity,
        levels=tuple(x.strip() for x in args.levels.split(",") if x.strip()),
        embedding=args.embedding,
        calibration_tokens=args.calibration_tokens,
        window=args.window,
        heldout_tokens=args.heldout_tokens,
        max_evals=args.max_evals,
        time_limit=args.time_limit,
        seed=args.seed,
        baselines=baselines,
        simulate=args.simulate,
        prior=args.prior,
        offspring=args.offspring,
        on_eval=lambda n: n % 10 or print(f"  {n} evaluations, {time.perf_counter() - t:.0f} s", flush=True),
    )
    wall = time.perf_counter() - t
    print(res.to_text())
    ref = res.reference_ppl
    chosen = res.chosen_point
    rows = {p["label"]: p for p in res.points if p.get("label") and p.get("ppl") is not None}
    print()
    print(
        f"| point | bytes / fp32 | KL ({res.stats['stage_tokens'][-1]} calib tokens) | held-out ppl | Δppl |"
    )
    print("|---|---|---|---|---|")
    print(f"| original fp32 | 1.0000 | 0 | {ref:.3f} | |")
    for label in (
        "int8",
        *(f"{s}-g{g}" for s in ("int4", "int4m") for g in (32, 64, 128)),
        *("gptq-g32", "gptq-g64", "gptq4-g64"),
    ):
        p = rows.get(label)
        if p is not None:
            print(
                f"| uniform {label}{GPTQ_NOTE.get(label, '')} | {p['bytes_fraction']:.4f} | {p['kl']:.4f} | {p['ppl']:.3f} | {p['ppl'] / ref - 1:+.1%} |"
            )
    if chosen is not None:
        print(
            f"| **searched** ({chosen['describe']}) | {chosen['bytes_fraction']:.4f} | {chosen['kl']:.4f} | "
            f"{chosen['ppl']:.3f} | {chosen['ppl'] / ref - 1:+.1%} |"
        )
        rtn = rows.get(level)
        if rtn:
            print(
                f"\nsearched vs uniform {level} at the same budget: Δppl {chosen['ppl'] / ref - 1:+.1%} vs "
                f"{rtn['ppl'] / ref - 1:+.1%}; KL {chosen['kl'] / rtn['kl']:.2f}x of RTN's"
            )
        print(
            f"searched Δppl {chosen['ppl'] / ref - 1:+.1%} (embedding {args.embedding}); Δppl <= +6% (goal 1 at "
            f"int4-g64 bytes): {'met' if chosen['ppl'] / ref - 1 <= 0.06 else 'MISSED'}"
        )
        gptq = [rows[k] for k in ("gptq-g64", "gptq4-g64") if k in rows and rows[k].get("ppl")]
        if gptq:
            best = min(gptq, key=lambda p: p["ppl"])
            print(
                f"searched vs the best uniform GPTQ ({best['label']}): Δppl {chosen['ppl'] / ref - 1:+.1%} vs "
                f"{best['ppl'] / ref - 1:+.1%}"
            )
    if args.simulate and chosen is not None:  # the headline again with the real compressed modules
        from lmscope.compress.evaluate import evaluation_text
        from lmscope.compress.search.fitness import heldout_windows, perplexity

        held = heldout_windows(lm, evaluation_text()[0], args.heldout_tokens)
        for name, recipe in (
            (f"uniform {level}", Recipe((Quantize(scheme, group_size=group),))),
            ("searched", res.recipe()),
        ):
            real = compress(lm, recipe)
            ppl = perplexity(real.lm, held)
            emulated = (
                next((p["ppl"] for p in res.points if p.get("label") == level and p.get("ppl")), None)
                if name != "searched"
                else chosen["ppl"]
            )
            print(
                f"real kernels, {name}: {real.bytes_after / ref_bytes:.6f} of fp32, held-out ppl {ppl:.3f} "
                f"({ppl / ref - 1:+.1%}); emulated during the search: {emulated}",
                flush=True,
            )
            del real
    s = res.stats
    print(
        f"cost: {s['evaluations']} evaluations ({s['generations']} generations, {s['accepted']} accepted) in "
        f"{s['eval_seconds']} s of fitness, {s['evals_per_hour']} evaluations/hour; "
        f"search() wall {wall:.0f} s incl. level database, held-out ppl and baselines"
    )
    if args.out:
        res.write(f"{args.out}-{level}")
        print(f"wrote {args.out}")
    print(json.dumps({"budget": budget, "stats": s, "settings": res.settings}))


if __name__ == "__main__":
    main()
