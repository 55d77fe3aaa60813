"""``lmscope features`` on smollm2: a TopK dictionary at a middle residual site, its held-out metrics, harvest
and training throughput (lmscope's loop, and SAELens's training step on the same activations when sae-lens is
installed), then ``rules`` explanations of dictionary latents beside MLP neurons of the same layer.

Corpus: the built-in text plus the README texts (``METADATA``) of the installed Python packages — prose and
markdown, offline. One harvest pass captures ``blocks.L.resid_post`` and ``blocks.L.mlp.hidden`` together
(the forward stops after block L); the cache lets the explain stage rerun without the model pass.

    .venv/bin/python benchmarks/features.py --stage train --tokens 30000
    .venv/bin/python benchmarks/features.py --stage explain
    .venv/bin/python benchmarks/features.py --stage more --more-tokens 20000   # more tokens to explain from, then explain
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

LAYER = 15
SEQ = 128


def corpus_paths(root: Path) -> list[str]:
    """The built-in text and every installed package's README (METADATA), copied as .txt files."""
    import site

    root.mkdir(parents=True, exist_ok=True)
    if not any(root.iterdir()):
        for sp in site.getsitepackages():
            for meta in sorted(Path(sp).glob("*.dist-info/METADATA")):
                (root / f"{meta.parent.name}.txt").write_bytes(meta.read_bytes())
    return ["builtin", str(root)]


def harvest(lm, corpus, sites, part, tokens):
    from lmscope.features.activations import stream

    ids_all, acts_all, n = [], {s: [] for s in sites}, 0
    t = time.perf_counter()
    for ids, acts in stream(lm, corpus, sites, SEQ, part):
        ids_all.append(ids)
        for s in sites:
            acts_all[s].append(acts[s].half())
        n += ids.numel()
        print(f"\rharvest {part}: {n:,}/{tokens:,} tokens", end="", file=sys.stderr, flush=True)
        if n >= tokens:
            break
    seconds = time.perf_counter() - t
    print(file=sys.stderr)
    return ids_all, {s: acts_all[s] for s in sites}, n, seconds


def saelens_step_rate(x: torch.Tensor, latents: int, k: int, batch: int) -> float | None:
    """Tokens/s of SAELens's TopK training step (forward, loss with AuxK, backward, Adam) on the same rows."""
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    cfg = TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=latents, k=k)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    dead = torch.zeros(latents, dtype=torch.bool)
    steps = max(1, min(40, len(x) // batch))
    t = time.perf_counter()
    for i in range(steps):
        rows = x[i * batch : (i + 1) * batch].float()
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=rows, coefficients={}, dead_neuron_mask=dead, n_training_steps=i, is_logging_step=False
            )
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def stage_train(args, work: Path) -> dict:
    import lmscope
    from lmscope.features import DictionaryConfig, TrainSettings, evaluate, train_dictionary
    from lmscope.scan import Corpus

    lm = lmscope.load("smollm2", progress=False)
    corpus = Corpus(corpus_paths(work / "corpus"))
    site, neurons = f"blocks.{LAYER}.resid_post", f"blocks.{LAYER}.mlp.hidden"
    ids, acts, n, seconds = harvest(lm, corpus, [site, neurons], "train", args.tokens)
    x = torch.cat([a[:, 1:].reshape(-1, a.shape[-1]) for a in acts[site]])  # the sink position dropped
    from safetensors.torch import save_file

    # the cache for the explain stage: ids and both sites, [windows, SEQ(, d)] (equal lengths only)
    full = [i for i, t in enumerate(ids) if t.shape[1] == SEQ]
    save_file(
        {
            "ids": torch.cat([ids[i] for i in full]),
            "resid": torch.cat([acts[site][i] for i in full]),
            "neurons": torch.cat([acts[neurons][i] for i in full]),
        },
        str(work / "harvest.safetensors"),
    )
    cfg = DictionaryConfig(
        kind="topk", d_in=lm.d_model, d_sae=args.latents, site=site, k=args.k, model_name=lm.name
    )
    settings = TrainSettings(
        latents=args.latents,
        k=args.k,
        batch_size=args.batch,
        epochs=args.epochs,
        buffer_tokens=10**9,
        dead_tokens=args.dead_tokens,
        lr=args.lr,
    )
    sae, log = train_dictionary(
        [(x, x)],
        cfg,
        settings,
        progress=lambda i: print(
            f"\rtrain: step {i['step']} fvu {i['fvu']:.3f} l0 {i['l0']:.0f} dead {i['dead']:.2f}",
            end="",
            file=sys.stderr,
            flush=True,
        ),
    )
    print(file=sys.stderr)
    sae.save(work / "sae")
    t = time.perf_counter()
    m = evaluate(lm, sae, corpus, tokens=args.eval_tokens, seq_len=SEQ)
    eval_seconds = time.perf_counter() - t
    m.pop("frequency")
    try:
        theirs = saelens_step_rate(x, args.latents, args.k, args.batch)
    except Exception as e:  # a peer's API drift must not lose the run's own numbers
        theirs = f"failed: {type(e).__name__}: {e}"[:200]
    return {
        "site": site,
        "harvest_tokens": n,
        "train_rows": len(x),
        "harvest_tokens_per_s": n / seconds,
        "train_tokens_per_s": log["train_tokens_per_s"],
        "saelens_step_tokens_per_s": theirs,
        "steps": log["steps"],
        "epochs": args.epochs,
        "latents": args.latents,
        "k": args.k,
        "eval_seconds": eval_seconds,
        **m,
    }


def stage_more(args, work: Path) -> dict:
    """Harvest ``--more-tokens`` further training-part windows (after those the train stage used) for the
    explanations only: more activating contexts per latent. The dictionary is not retrained."""
    from safetensors.torch import load_file, save_file

    import lmscope
    from lmscope.features.activations import capture, corpus_windows, window_batches
    from lmscope.scan import Corpus

    lm = lmscope.load("smollm2", progress=False)
    corpus = Corpus(corpus_paths(work / "corpus"))
    site, neurons = f"blocks.{LAYER}.resid_post", f"blocks.{LAYER}.mlp.hidden"
    used = json.loads((work / "train.json").read_text())["harvest_tokens"]
    seen = n = 0
    ids_all, resid, hidden = [], [], []
    t = time.perf_counter()
    for ids in window_batches(corpus_windows(lm, corpus, SEQ, "train"), 8):
        if seen < used:  # the train stage's windows (its harvest stops at the first batch past --tokens)
            seen += ids.numel()
            continue
        if ids.shape[1] != SEQ:
            continue
        got = capture(lm, ids, [site, neurons])
        ids_all.append(ids)
        resid.append(got[site].half())
        hidden.append(got[neurons].half())
        n += ids.numel()
        print(f"\rharvest more: {n:,}/{args.more_tokens:,} tokens", end="", file=sys.stderr, flush=True)
        if n >= args.more_tokens:
            break
    seconds = time.perf_counter() - t
    print(file=sys.stderr)
    old = load_file(str(work / "harvest.safetensors"))
    save_file(
        {
            "ids": torch.cat([old["ids"], *ids_all]),
            "resid": torch.cat([old["resid"], *resid]),
            "neurons": torch.cat([old["neurons"], *hidden]),
        },
        str(work / "harvest.safetensors"),
    )
    return {
        "more_tokens": n,
        "harvest_tokens_per_s": n / seconds,
        "windows_now": int(old["ids"].shape[0]) + sum(int(i.shape[0]) for i in ids_all),
    }


def stage_explain(args, work: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lmscope.features import load
    from lmscope.features.explain import explain_units
    from lmscope.models.loading import convert_gguf
    from lmscope.models.sources import builtin_path

    tok = AutoTokenizer.from_pretrained(convert_gguf(builtin_path("smollm2"), progress=False))
    data = load_file(str(work / "harvest.safetensors"))
    sae = load(work / "sae")
    ids = data["ids"]
    resid = data["resid"].float()
    with torch.no_grad():
        latents = sae.encode(resid)  # [windows, SEQ, d_sae]
    latents[:, 0] = 0  # the sink position is not part of the dictionary's domain
    g = torch.Generator().manual_seed(0)
    fired = (latents > 0).flatten(0, 1).sum(0)
    alive = torch.nonzero(fired >= 10).flatten()
    pick = alive[torch.randperm(len(alive), generator=g)[: args.units]]
    neuron_pick = torch.randperm(data["neurons"].shape[-1], generator=g)[: args.units]
    t = time.perf_counter()
    lat = explain_units(ids, latents[..., pick], tok, [int(i) for i in pick], site="sae", seed=0)
    neu = explain_units(
        ids, data["neurons"].float()[..., neuron_pick], tok, [int(i) for i in neuron_pick], site="mlp", seed=0
    )
    seconds = time.perf_counter() - t

    def med(units, key, which="scores"):
        vals = [u[which][key] for u in units if u[which][key] is not None]
        return statistics.median(vals) if vals else float("nan")

    return {
        "units_each": args.units,
        "latents_alive_of": [len(alive), sae.d_sae],
        "latents_detection_median": med(lat, "detection"),
        "latents_auroc_median": med(lat, "auroc"),
        "latents_fuzzing_median": med(lat, "fuzzing"),
        "latents_simulation_median": med(lat, "simulation"),
        "latents_random_detection_median": med(lat, "detection", "random_baseline"),
        "neurons_detection_median": med(neu, "detection"),
        "neurons_auroc_median": med(neu, "auroc"),
        "neurons_simulation_median": med(neu, "simulation"),
        "neurons_random_detection_median": med(neu, "detection", "random_baseline"),
        "explain_seconds": seconds,
        "examples": [u["explanation"] for u in sorted(lat, key=lambda u: -u["scores"]["detection"])[:5]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("train", "more", "explain", "all"), default="all")
    p.add_argument(
        "--more-tokens", type=int, default=20000, help="--stage more: tokens harvested for explaining"
    )
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--latents", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--dead-tokens", type=int, default=20000)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--units", type=int, default=100)
    p.add_argument("--work", default="/tmp/lmscope-features-bench")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = {"threads": torch.get_num_threads()}
    if args.stage in ("train", "all"):
        out["train"] = stage_train(args, work)
        (work / "train.json").write_text(json.dumps(out["train"], indent=1))
    if args.stage == "more":
        out["more"] = stage_more(args, work)
        (work / "more.json").write_text(json.dumps(out["more"], indent=1))
    if args.stage in ("explain", "all", "more"):
        out["explain"] = stage_explain(args, work)
        (work / "explain.json").write_text(json.dumps(out["explain"], indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
