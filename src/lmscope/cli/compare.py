"""``lmscope compare``: what compression changed inside: per-head attention divergence, logit-lens drift per
layer, attribution agreement, top-1 agreement; compare.json and report.html."""

from __future__ import annotations

from ..errors import LmscopeError
from .common import (
    add_model_arg,
    add_text_args,
    add_verb,
    atomic_out,
    check_out_dir,
    get_text,
    load_model,
    show_path,
)

EXAMPLE = 'lmscope compare --model smollm2 --against small/ --text "The capital of France is" --out cmp/'


def add_parser(sub) -> None:
    p = add_verb(
        sub, "compare", "explanations before vs after compression (what changed inside)", EXAMPLE, run
    )
    add_model_arg(p)
    p.add_argument("--against", required=True, help="the compressed model (a directory written by compress)")
    add_text_args(p)
    p.add_argument("--out", required=True, help="output directory (compare.json, report.html)")
    p.add_argument(
        "--methods",
        default="saliency,input_x_gradient,occlusion",
        help="attribution methods to compare, comma-separated, or 'none' (default: saliency,input_x_gradient,"
        "occlusion)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="k for the top-k attribution overlap (default: 5; at most half of the tokens, since k near the token count makes the overlap trivially 1)",
    )
    from .features import add_sae_args

    add_sae_args(p, "also which dictionary features the compressed model lost or distorted")


def run(args) -> int:
    if args.top_k < 1:
        raise LmscopeError(f"--top-k must be at least 1, got {args.top_k}", "e.g. --top-k 5")
    methods = (
        [] if args.methods.strip() == "none" else [m.strip() for m in args.methods.split(",") if m.strip()]
    )
    if methods:
        from ..explain.attribution.base import method_names

        unknown = [m for m in methods if m not in method_names()]
        if unknown:
            raise LmscopeError(
                f"unknown attribution method '{unknown[0]}'",
                f"use some of: {', '.join(method_names())}, or none",
            )
    text = get_text(args)
    check_out_dir(args.out)
    from ..compress.compare import compare
    from .features import load_sae_args

    sae, explanations = load_sae_args(args)
    a = load_model(args.model)
    b = load_model(args.against)
    features = None
    if sae is not None:  # checked before the (slower) comparison: a dictionary for another site fails first
        from ..features.analysis import compare_features

        features = compare_features(
            a, b, sae, text, worst=args.sae_top or 20, explanations=explanations, truncate=args.truncate
        )
    result = compare(a, b, text, methods=methods, k=args.top_k, truncate=args.truncate)
    with atomic_out(args.out) as tmp:
        if features is None:
            result.to_json(tmp / "compare.json")
            result.report(tmp / "report.html")
        else:
            import json

            from ..views.feature_views import add_comparison_section

            data = {**result.to_dict(), "features": features.to_dict()}
            (tmp / "compare.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            rep = result.build_report()
            add_comparison_section(rep, features)
            rep.write(tmp / "report.html")
    print(result.to_text())
    if features is not None:
        print(features.to_text())
    print(f"wrote {show_path(args.out, 'compare.json')}, report.html")
    return 0
