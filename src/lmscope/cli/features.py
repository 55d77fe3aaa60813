"""``lmscope features``: train a sparse dictionary on a model's activations, and explain + score its features.

    lmscope features train   --model smollm2 --site blocks.15.resid_post --corpus builtin --tokens 2000000 \\
                             --latents 4608 --k 64 --out sae/
    lmscope features explain --model smollm2 --sae sae/ --corpus data/ --out feats/
    lmscope features explain --model smollm2 --neurons blocks.20.mlp.hidden --scan scan/ --out feats/
"""

from __future__ import annotations

import json
import math
import sys

from ..errors import LmscopeError
from .common import Parser, add_model_arg, atomic_out, check_out_dir, load_model, parse_int_list

EXAMPLE = (
    "lmscope features train --model smollm2 --site blocks.15.resid_post --corpus builtin --tokens 200000 "
    "--latents 4608 --k 64 --out sae/"
)


def add_sae_args(p, what: str) -> None:
    """``--sae DIR`` (+ ``--sae-top``, ``--explanations``) for inspect / explain / compare."""
    p.add_argument("--sae", default=None, help=f"a dictionary folder (features train, or SAELens): {what}")
    p.add_argument("--sae-top", type=int, default=None, help="how many features to list (with --sae)")
    p.add_argument(
        "--explanations",
        default=None,
        help="explanations.json (or its folder) of the dictionary's features (default: one in or beside --sae)",
    )


def load_sae_args(args):
    """(dictionary or None, explanations) from ``--sae`` / ``--explanations``; refuses the flags without --sae."""
    if args.sae is None:
        if args.sae_top is not None or args.explanations is not None:
            raise LmscopeError(
                "--sae-top and --explanations need --sae", "pass --sae DIR (a dictionary folder)"
            )
        return None, {}
    if args.sae_top is not None and args.sae_top < 1:
        raise LmscopeError(f"--sae-top must be at least 1, got {args.sae_top}", "e.g. --sae-top 10")
    from ..features import load
    from ..features.analysis import load_explanations

    sae = load(args.sae)
    return sae, load_explanations(sae, args.explanations)


def add_parser(sub) -> None:
    from .common import HelpFormatter

    p = sub.add_parser(
        "features",
        help="learn a model's features (sparse dictionaries), explain each one, score every explanation",
        description=__doc__.split("\n\n")[0],
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=HelpFormatter,
    )
    verbs = p.add_subparsers(dest="features_verb", metavar="{train,explain}", parser_class=Parser)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = verbs.add_parser("train", help="train a TopK / ReLU sparse autoencoder or a transcoder")
    t.set_defaults(func=run_train)
    add_model_arg(t)
    t.add_argument(
        "--site", required=True, help="capture site, e.g. blocks.15.resid_post (transcoder: blocks.L.mlp.out)"
    )
    _add_corpus_args(t)
    t.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (default: 2,000,000)")
    t.add_argument("--latents", type=int, default=4608, help="dictionary width (default: 4608)")
    t.add_argument("--k", type=int, default=None, help="active latents per token, topk (default: 64)")
    t.add_argument("--kind", choices=("topk", "relu", "transcoder"), default="topk")
    t.add_argument(
        "--l1",
        type=float,
        default=0.3,
        help="relu and transcoder (ReLU, as SAELens's): L1 coefficient (default: 0.3)",
    )
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: scaled by width)")
    t.add_argument("--batch-size", type=int, default=1024, help="tokens per optimizer step (default: 1024)")
    t.add_argument("--epochs", type=int, default=1, help="passes over each activation buffer (default: 1)")
    t.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens for metrics.json")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--out", required=True, help="output folder (SAELens format: cfg.json, sae_weights.safetensors)"
    )

    e = verbs.add_parser("explain", help="explain every latent (or neuron) and score it on held-out text")
    e.set_defaults(func=run_explain)
    add_model_arg(e)
    e.add_argument("--sae", help="a dictionary folder (lmscope features train, or SAELens save_model)")
    e.add_argument("--neurons", help="explain the units of this site instead, e.g. blocks.20.mlp.hidden")
    _add_corpus_args(e)
    e.add_argument("--tokens", type=int, default=32_768, help="tokens of activations to explain from")
    e.add_argument("--units", default=None, help="comma-separated unit numbers (default: all)")
    e.add_argument(
        "--explainer",
        default="rules",
        help="rules (offline, default); local:DIR, a causal LM folder lmscope loads (scored by the rules "
        "simulator); or http:URL of an OpenAI-compatible server (explains and, by default, scores)",
    )
    e.add_argument(
        "--scorer",
        choices=("explainer", "rules"),
        default="explainer",
        help="who scores an http: explainer's explanations: the endpoint itself (detection, fuzzing; default) or "
        "the offline rules simulator (detection, fuzzing, simulation). rules and local: are always scored by "
        "the rules simulator",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="output folder (explanations.json, features.html)")


def _add_corpus_args(p) -> None:
    p.add_argument("--corpus", nargs="+", help="text files, folders, .jsonl, .parquet or 'builtin'")
    p.add_argument("--field", help="the text key (JSONL) or column (Parquet)")
    p.add_argument(
        "--scan", help="read activations from this scan's --dump shards instead of running the model"
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")


def _corpus(args):
    from ..scan import Corpus

    if args.scan is None and not args.corpus:
        raise LmscopeError(
            "no activations source", "pass --corpus FILES (or --corpus builtin), or --scan DIR"
        )
    return Corpus(args.corpus, args.field) if args.corpus else None


def _positive(value: int, flag: str) -> None:
    if value <= 0:
        raise LmscopeError(f"{flag} must be positive, got {value}", f"e.g. {flag} 1024")


def _clean(x):
    """JSON without NaN (None instead), tensors dropped."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if not hasattr(v, "detach")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def _report(info: dict) -> None:
    print(
        f"\rfeatures: {info['tokens']:,} tokens · {info['tokens_per_s']:,.0f} tok/s · step {info['step']} · "
        f"FVU {info['fvu']:.3f} · L0 {info['l0']:.0f} · dead {info['dead']:.0%}   ",
        end="",
        file=sys.stderr,
        flush=True,
    )


def run_train(args) -> int:
    from ..features import TrainSettings, evaluate, train
    from ..features.activations import check_site

    if args.k is not None and args.kind != "topk":
        raise LmscopeError(
            f"--k applies to topk dictionaries, not {args.kind}", "drop --k, or tune --l1 instead"
        )
    args.k = 64 if args.k is None else args.k
    for flag in ("tokens", "latents", "k", "batch_size", "epochs"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    check_out_dir(args.out)
    corpus = _corpus(args)
    lm = load_model(args.model)
    check_site(lm, args.site)
    if args.kind == "topk" and args.k > args.latents:
        raise LmscopeError(f"--k {args.k} is larger than --latents {args.latents}", "pass a smaller --k")
    settings = TrainSettings(
        kind=args.kind,
        latents=args.latents,
        k=args.k if args.kind == "topk" else None,
        l1_coefficient=args.l1,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        dead_tokens=min(100_000, max(args.tokens // 10, args.batch_size)),
    )
    sae, log = train(
        lm,
        corpus,
        args.site,
        settings,
        tokens=args.tokens,
        seq_len=args.seq_len,
        scan_dir=args.scan,
        progress=_report,
    )
    print(file=sys.stderr)
    if corpus is None:
        metrics = {"note": "trained from scan dumps: pass --corpus too for held-out metrics"}
    else:
        metrics = evaluate(lm, sae, corpus, tokens=args.eval_tokens, seq_len=args.seq_len)
        metrics.pop("frequency")
    metrics["training"] = {k: v for k, v in log.items() if k != "log"}
    with atomic_out(args.out) as tmp:
        sae.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps(_clean(metrics), indent=1))
        (tmp / "training_log.json").write_text(json.dumps(_clean(log["log"]), indent=1))
    summary = ", ".join(
        f"{k} {metrics[k]:.3f}" for k in ("l0", "fvu", "ce_recovered", "dead_fraction") if k in metrics
    )
    print(f"{args.out.rstrip('/')}/metrics.json ({summary})")
    return 0


def run_explain(args) -> int:
    from ..features import load
    from ..features.llm import explainer_from
    from ..features.pipeline import explain_model
    from ..views.features import features_html

    explainer = explainer_from(args.explainer, scorer=args.scorer)  # a bad one fails before the model loads
    _positive(args.tokens, "--tokens")
    if (args.sae is None) == (args.neurons is None):
        raise LmscopeError("explain needs one of --sae or --neurons", "pass --sae DIR or --neurons SITE")
    check_out_dir(args.out)
    units = parse_int_list(args.units, "--units")
    sae = load(args.sae) if args.sae else None  # a corrupt dictionary fails before the model loads
    corpus = _corpus(args)
    lm = load_model(args.model)
    result = explain_model(
        lm,
        corpus,
        sae=sae,
        neurons=args.neurons,
        scan_dir=args.scan,
        tokens=args.tokens,
        seq_len=args.seq_len,
        units=units,
        explainer=explainer or "rules",
        seed=args.seed,
    )
    result = _clean(result)
    with atomic_out(args.out) as tmp:
        (tmp / "explanations.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        (tmp / "features.html").write_text(features_html(result), encoding="utf-8")
    s = result["summary"]
    print(
        f"{args.out.rstrip('/')}/features.html ({s['units']} explained; median detection "
        f"{s['median']['detection'] if s['median']['detection'] is not None else float('nan'):.2f}, "
        f"random {s['random_median']['detection'] if s['random_median']['detection'] is not None else float('nan'):.2f})"
    )
    return 0
