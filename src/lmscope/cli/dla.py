"""``lmscope dla``: direct logit attribution of one target; writes dla.json and report.html."""

from __future__ import annotations

import sys

from ..errors import LmscopeError
from .common import add_model_arg, add_text_args, add_verb, atomic_out, check_out_dir, get_text, load_model
from .speed import add_speed_args, apply_threads

EXAMPLE = (
    'lmscope dla --model smollm2 --text "When Mary and John went to the store, John gave a drink to" '
    '--target " Mary" --contrast " John" --out out/'
)


def add_parser(sub) -> None:
    p = add_verb(
        sub,
        "dla",
        "direct logit attribution: each head's and MLP's direct contribution to the target logit",
        EXAMPLE,
        run,
    )
    add_model_arg(p)
    add_text_args(p)
    p.add_argument(
        "--target", default=None, help='the token to explain, e.g. " Mary" (default: the top prediction)'
    )
    p.add_argument("--contrast", default=None, help='decompose logit(target) − logit(contrast), e.g. " John"')
    p.add_argument(
        "--top-heads", type=int, default=6, help="heads given a per-source-position breakdown (default: 6)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the text in the tokenizer's chat template")
    p.add_argument("--out", required=True, help="output directory (dla.json, report.html)")
    add_speed_args(p)


def run(args) -> int:
    check_out_dir(args.out)
    text = get_text(args)
    if args.top_heads < 0:
        raise LmscopeError(f"--top-heads must be 0 or more, got {args.top_heads}", "e.g. --top-heads 6")
    from ..explain.dla import dla

    apply_threads(args)
    lm = load_model(args.model)
    result = dla(
        lm, text, target=args.target, contrast=args.contrast, top_heads=args.top_heads, chat=args.chat
    )
    with atomic_out(args.out) as tmp:
        result.write_json(tmp / "dla.json")
        result.report(tmp / "report.html")
    print(
        f"{result.target['description']} = {result.logit:.4f}; residual error {result.residual_error:.2e}",
        file=sys.stderr,
    )
    for p in result.top(5):
        print(f"  {p.name:>16s} {p.value:+.4f}", file=sys.stderr)
    print(f"{args.out.rstrip('/')}/report.html")
    return 0
