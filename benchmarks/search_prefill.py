"""Issue 12, goal 2's second half: is the structured search's model faster at prefill than uniform pruning at
the same parameters? Prefill time depends on the layer shapes only, so this times the shapes: the searched
recipe's kept heads and neurons per block (its least-squares refit changes weights, not shapes, and is left
out), against every block keeping the same number of MLP neurons (uniform importance-ordered pruning's shape)
at the searched model's block parameters. The models are timed in turn, fastest and median of ``--repeats``.
Run it on an idle machine: the difference is a few percent.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search_prefill.py --recipe found/recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def times(models: dict, tokens: int, repeats: int) -> dict[str, list[float]]:
    ids = torch.randint(3, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(input_ids=ids, attention_mask=mask, use_cache=False)
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, attention_mask=mask, use_cache=False)
                out[name].append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipe", required=True, help="the structured search's recipe.json")
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import lmscope
    from lmscope.compress import compress
    from lmscope.compress.recipe import Recipe

    lm = lmscope.load(args.model, progress=False)
    steps = [{k: v for k, v in st.items() if k != "refit"} for st in json.load(open(args.recipe))["steps"]]
    searched = compress(lm, Recipe.from_dict({"steps": steps})).lm
    params = lambda m: sum(p.numel() for b in m.blocks for p in b.parameters())  # noqa: E731
    full = params(lm)
    kept = params(searched)
    # the uniform shape: all heads, the same MLP width in every block, block parameters as close as possible
    n_blocks, width = lm.n_layers, lm.blocks[0].mlp.down_proj.in_features
    mlp = lm.blocks[0].mlp  # one neuron: a row of gate_proj and of up_proj, a column of down_proj
    per_neuron = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    cut = round((full - kept) / (n_blocks * per_neuron))
    keep = width - cut
    uniform = compress(
        lm,
        Recipe.from_dict(
            {
                "steps": [
                    {"kind": "keep_neurons", "layers": {str(i): list(range(keep)) for i in range(n_blocks)}}
                ]
            }
        ),
    ).lm
    models = {
        "original": lm.model,
        "searched": searched.model,
        f"uniform {keep}/{width} neurons": uniform.model,
    }
    print(
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; block params kept: searched "
        f"{kept / full:.4f}, uniform {params(uniform) / full:.4f}"
    )
    for tokens in (int(t) for t in args.tokens.split(",")):
        t = times(models, tokens, args.repeats)
        print(f"\nprefill {tokens} tokens, {args.repeats} runs each, in turn (load {os.getloadavg()[0]:.2f})")
        print("| model | fastest ms | median ms |")
        print("|---|---|---|")
        for name, v in t.items():
            print(f"| {name} | {min(v) * 1000:.1f} | {statistics.median(v) * 1000:.1f} |")
        u = next(k for k in t if k.startswith("uniform"))
        print(
            f"searched / uniform: fastest {min(t['searched']) / min(t[u]):.3f}, median "
            f"{statistics.median(t['searched']) / statistics.median(t[u]):.3f}"
        )


if __name__ == "__main__":
    main()
