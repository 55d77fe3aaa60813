"""``lmscope search --space heads,neurons,layers`` on smollm2, goal 2 of issue 12: 25% of the block parameters
removed structurally; Δppl of the searched architecture vs uniform importance-ordered pruning at the same
parameters (goal: at most half of uniform's), and measured prefill time of both.

Uniform baselines, all at <= the same block parameters, ordered by the same priors the search uses: every
layer loses the same number of MLP neurons (Wanda-style activation x ‖W_down‖ order); the same with 3 of 9 heads
per layer removed (gradient head importance, GQA-aware); the least influential blocks dropped (ShortGPT);
and the uniform level-grid points the search seeds from. Held-out perplexity on the evaluation half of the
built-in text (disjoint from the calibration half the KL fitness uses), on the real compressed models
``compress --recipe`` builds. Prefill: median wall time of a 512-token forward, models timed round-robin so
machine load hits all alike.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_structure.py --time-limit 1800
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def prefill_seconds(models: dict, tokens: int, repeats: int) -> dict[str, float]:
    from search_prefill import times  # the same in-turn timing loop

    return {k: statistics.median(v) for k, v in times(models, tokens, repeats).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", default="params=0.75")
    ap.add_argument("--space", default="heads,neurons,layers")
    ap.add_argument("--max-evals", type=int, default=2000)
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds of search (evaluations)")
    ap.add_argument("--calibration-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--heldout-tokens", type=int, default=1024)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument(
        "--prior",
        default="priors",
        help="priors (seeds placed by head/neuron/block priors, no measurement: for a loaded machine) or "
        "sensitivity (one KL probe per unit first)",
    )
    ap.add_argument("--prior-tokens", type=int, default=1024, help="calibration tokens for the priors")
    ap.add_argument(
        "--no-refit", action="store_true", help="no least-squares refit of o_proj/down_proj (plain slicing)"
    )
    ap.add_argument("--refit-tokens", type=int, default=None, help="calibration tokens of the refit's Gram")
    ap.add_argument("--store", default=None, help="optuna SQLite file for the evaluations (with --resume)")
    ap.add_argument("--resume", action="store_true", help="continue the search stored in --store")
    ap.add_argument("--out", default=None, help="also write pareto.json / recipe.json / report.html here")
    args = ap.parse_args()

    import lmscope
    from lmscope.compress import compress
    from lmscope.compress.evaluate import evaluation_text
    from lmscope.compress.search import search
    from lmscope.compress.search.fitness import heldout_windows, perplexity

    t0 = time.perf_counter()
    lm = lmscope.load(args.model, progress=False)
    print(
        f"threads {torch.get_num_threads()}; load {time.perf_counter() - t0:.0f} s; load avg {os.getloadavg()}"
    )
    t = time.perf_counter()
    res = search(
        lm,
        args.budget,
        args.space,
        calibration_tokens=args.calibration_tokens,
        window=args.window,
        heldout_tokens=args.heldout_tokens,
        max_evals=args.max_evals,
        time_limit=args.time_limit,
        seed=args.seed,
        offspring=args.offspring,
        prior=args.prior,
        structure={
            "prior_tokens": args.prior_tokens,
            "refit": not args.no_refit,
            "refit_tokens": args.refit_tokens,
        },
        store=args.store,
        resume=args.resume,
        on_eval=lambda n: (
            n % 25
            or print(
                f"  {n} evaluations, {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        ),
    )
    wall = time.perf_counter() - t
    if args.out:
        res.write(args.out)
        print(f"wrote {args.out}")
    print(res.to_text())
    ref = res.reference_ppl
    chosen = res.chosen_point
    if chosen is None:
        print("no configuration within the budget reached the last stage")
        return

    # the real compressed models, built by compress from recipes: held-out ppl again, and prefill time
    held = heldout_windows(lm, evaluation_text()[0], args.heldout_tokens)
    recipes = {"searched": res.recipe()}
    recipes.update(res.baseline_recipes)
    grid = sorted(
        (p for p in res.points if p["origin"] == "uniform" and p.get("ppl") is not None),
        key=lambda p: p["ppl"],
    )
    refit = res.settings.get("refit") is not None
    for p in grid[:1] + [p for p in grid[1:] if "blocks" in p["label"]]:  # the best grid point, layer drop
        config = tuple(p["config"][u["name"]] for u in res.units)
        recipe = res.space.recipe(config)
        compensated = any(getattr(st, "refit", None) for st in recipe.steps)
        recipes[p["label"] + (" + refit" if compensated else "")] = recipe
    models, rows = {"original": lm.model}, []
    for name, recipe in recipes.items():
        done = compress(lm, recipe)
        blocks = sum(p.numel() for b in done.lm.blocks for p in b.parameters())
        ppl = perplexity(done.lm, held)
        rows.append((name, blocks / res.reference_params, ppl))
        models[name] = done.lm.model
        print(
            f"  built {name}: {blocks / res.reference_params:.4f} of block params, ppl {ppl:.3f}", flush=True
        )
    print(f"timing prefill of {args.prefill_tokens} tokens, load avg {os.getloadavg()}", flush=True)
    times = prefill_seconds(models, args.prefill_tokens, args.repeats)

    print()
    print(f"| model | block params kept | held-out ppl | Δppl | prefill {args.prefill_tokens} tok (median) |")
    print("|---|---|---|---|---|")
    print(f"| original | 1.0000 | {ref:.3f} | | {times['original'] * 1000:.0f} ms |")
    for name, frac, ppl in rows:
        bold = "**" if name == "searched" else ""
        print(
            f"| {bold}{name}{bold} | {frac:.4f} | {ppl:.3f} | {ppl / ref - 1:+.1%} | {times[name] * 1000:.0f} ms |"
        )
    searched = next(r for r in rows if r[0] == "searched")
    d_s = searched[2] / ref - 1
    base = [r for r in rows if r[0] != "searched" and "blocks" not in r[0]]  # uniform head/neuron pruning
    groups = [("uniform, plain slicing", [r for r in base if not r[0].endswith("+ refit")])]
    if refit:
        groups.append(("uniform with the same refit", [r for r in base if r[0].endswith("+ refit")]))
    print()
    for what, rs in groups:
        if not rs:
            continue
        best = min(rs, key=lambda r: r[2])
        d_b = best[2] / ref - 1
        print(
            f"searched Δppl {d_s:+.1%} vs the best {what} ({best[0]}) {d_b:+.1%}: ratio {d_s / d_b:.2f} "
            f"(goal <= 0.5: {'met' if d_s <= 0.5 * d_b else 'MISSED'}); prefill {times['searched'] * 1000:.0f} ms "
            f"vs {times[best[0]] * 1000:.0f} ms ({'faster' if times['searched'] < times[best[0]] else 'NOT faster'})"
        )
    s = res.stats
    print(
        f"cost: {s['evaluations']} evaluations ({s['generations']} generations, {s['accepted']} accepted) in "
        f"{s['eval_seconds']} s of fitness, {s['evals_per_hour']} evaluations/hour; search() wall {wall:.0f} s "
        f"incl. priors, held-out ppl and baselines; load avg at end {os.getloadavg()}"
    )
    print(json.dumps({"stats": s, "settings": res.settings}))


if __name__ == "__main__":
    main()
