"""``lmscope explain``: token attributions with a measured faithfulness score per method; writes
report.html and attributions.json."""

from __future__ import annotations

import argparse
import sys

from ..errors import LmscopeError
from .common import (
    EarlyExit,
    add_model_arg,
    add_text_args,
    add_verb,
    atomic_out,
    check_out_dir,
    get_text,
    load_model,
)
from .speed import add_speed_args, apply_threads, progress_bar

EXAMPLE = (
    'lmscope explain --model smollm2 --text "When Mary and John went to the store, John gave a drink to" '
    '--target " Mary" --out out/'
)


class _MethodsOrList(argparse.Action):
    """``--methods list`` prints the methods and exits while parsing, like --help: so --out can be
    required (and shown so in --help) without being required for listing."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.strip() == "list":
            print_methods()
            raise EarlyExit(0)
        setattr(namespace, self.dest, values)


def add_parser(sub) -> None:
    p = add_verb(
        sub, "explain", "token attributions for one output, ranked by measured faithfulness", EXAMPLE, run
    )
    add_model_arg(p)
    add_text_args(p, required=False)
    p.add_argument(
        "--target", default=None, help='the token to explain, e.g. " Mary" (default: the top prediction)'
    )
    p.add_argument("--contrast", default=None, help='explain logit(target) − logit(contrast), e.g. " John"')
    p.add_argument(
        "--target-label",
        default=None,
        help="sequence classifiers: the class to explain, by name or index (default: the predicted class)",
    )
    p.add_argument(
        "--contrast-label", default=None, help="classifiers: explain logit(class) − logit(this class)"
    )
    p.add_argument(
        "--pair", default=None, help="encoders: explain the cosine similarity of --text and this text"
    )
    p.add_argument(
        "--methods",
        action=_MethodsOrList,
        default=None,
        help="comma-separated attribution methods, 'all', or 'list' to print them "
        "(default: saliency,input_x_gradient,occlusion — the fast ones)",
    )
    p.add_argument("--generate", type=int, default=0, help="explain each of N greedily generated tokens")
    p.add_argument(
        "--baseline",
        default="pad",
        help="the 'absent token': pad | eos | zero (embedding) | mask (default: pad)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="uniform integrated-gradients steps (default: adaptive, error ≤ 1%%)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="cap on adaptive IG steps (default: 1024)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the tokenizer's chat template")
    p.add_argument(
        "--exclude-special",
        action="store_true",
        help="never perturb special tokens (BOS, chat markers); score 0",
    )
    p.add_argument("--no-sanity", action="store_true", help="skip the model-randomization sanity check")
    p.add_argument("--out", required=True, help="output directory (report.html, attributions.json)")
    from .features import add_sae_args

    add_sae_args(
        p, "attribute the target to dictionary features instead of tokens (report.html, features.json)"
    )
    add_speed_args(p)


def print_methods() -> int:
    from ..explain.attribution.base import REGISTRY, method_names

    for name in method_names():
        cls = REGISTRY[name]
        print(f"{name:22s} {cls.summary}")
    return 0


def run(args) -> int:
    check_out_dir(args.out)
    text = get_text(args)
    if args.steps is not None and args.steps < 1:
        raise LmscopeError(f"--steps must be positive, got {args.steps}", "e.g. --steps 64")
    if args.max_steps is not None and args.max_steps < 2:
        raise LmscopeError(f"--max-steps must be at least 2, got {args.max_steps}", "e.g. --max-steps 512")
    from ..explain.api import explain, resolve_methods
    from ..explain.targets import BASELINES

    if args.baseline not in BASELINES:
        raise LmscopeError(f"unknown baseline '{args.baseline}'", f"use one of: {', '.join(BASELINES)}")
    if args.generate < 0:
        raise LmscopeError("--generate must be 0 or more", "e.g. --generate 3")
    resolve_methods(args.methods)
    from .features import load_sae_args

    sae, explanations = load_sae_args(args)
    if sae is not None:
        return _run_features(args, text, sae, explanations)
    apply_threads(args)
    lm = load_model(args.model)
    from ..explain.targets import leading_space_hint

    for flag, value in (("--target", args.target), ("--contrast", args.contrast)):
        hint = leading_space_hint(lm, text, value, flag)
        if hint:
            print(f"note: {hint}", file=sys.stderr)
    bar = progress_bar("explain", "%", quiet=args.quiet, total=100)
    config = {"integrated_gradients": {"max_steps": args.max_steps}} if args.max_steps else None
    result = explain(
        lm,
        text,
        target=args.target,
        contrast=args.contrast,
        target_label=args.target_label,
        contrast_label=args.contrast_label,
        pair=args.pair,
        methods=args.methods,
        baseline=args.baseline,
        steps=args.steps,
        generate=args.generate,
        chat=args.chat,
        exclude_special=args.exclude_special,
        sanity=not args.no_sanity,
        config=config,
        truncate=args.truncate,
        progress=lambda fraction, message: bar.update_to(round(100 * fraction), 100, message),
    )
    bar.close()
    with atomic_out(args.out) as tmp:
        result.write_json(tmp / "attributions.json")
        result.report(tmp / "report.html")
    first = result.first
    print(f"target: {first.target['description']} = {first.target['value']:.4g}", file=sys.stderr)
    trusted = [n for n in first.ranking if not first.methods[n].flags]
    if trusted:
        print(f"most faithful here: {', '.join(trusted[:3])}", file=sys.stderr)
    elif first.ranking:
        print("every method is flagged on this input (see the report's flags column)", file=sys.stderr)
    ig = first.methods.get("integrated_gradients")
    if ig is not None:
        print(
            f"integrated_gradients: {ig.info['steps']} steps, completeness error {ig.info['completeness_error']:.3g}"
            f" ({100 * ig.info['relative_completeness_error']:.2f}% of |Δf|)",
            file=sys.stderr,
        )
    print(f"{args.out.rstrip('/')}/report.html")
    return 0


def _run_features(args, text: str, sae, explanations: dict) -> int:
    """``explain --sae``: the target attributed to dictionary features, the error term as its own row."""
    from ..features.analysis import attribute_features

    used = [f for f, v in (("--methods", args.methods), ("--generate", args.generate)) if v]
    if used:
        raise LmscopeError(
            f"{used[0]} is for token attributions; --sae attributes to dictionary features",
            f"drop {used[0]}, or run explain without --sae",
        )
    apply_threads(args)
    lm = load_model(args.model)
    result = attribute_features(
        lm,
        sae,
        text,
        target=args.target,
        contrast=args.contrast,
        target_label=args.target_label,
        contrast_label=args.contrast_label,
        pair=args.pair,
        top=args.sae_top or 20,
        explanations=explanations,
        truncate=args.truncate,
        chat=args.chat,
    )
    import json

    with atomic_out(args.out) as tmp:
        (tmp / "features.json").write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
        result.report(tmp / "report.html")
    print(f"target: {result.target['description']} = {result.target['value']:.4g}", file=sys.stderr)
    print(
        f"features {result.features_sum:+.4g}, error {result.error:+.4g}, bias {result.bias:+.4g}, "
        f"position 0 {result.sink:+.4g} (total {result.total:+.4g})",
        file=sys.stderr,
    )
    for f in result.features[:5]:
        e = f" — {f['explanation']}" if f.get("explanation") else ""
        print(f"  f{f['feature']}: {f['attribution']:+.4g}{e}", file=sys.stderr)
    print(f"{args.out.rstrip('/')}/report.html")
    return 0
