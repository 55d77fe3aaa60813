"""``lmscope heads``: importance (ablation, gradient) and characterization (induction, previous-token, sink,
self) of every attention head; writes report.html and heads.json."""

from __future__ import annotations

import json
import sys

from ..errors import LmscopeError
from .common import (
    add_model_arg,
    add_verb,
    atomic_out,
    check_out_dir,
    load_model,
    parse_int_list,
    read_text_file,
)
from .speed import add_speed_args, apply_threads, progress_bar

EXAMPLE = "lmscope heads --model smollm2 --out out/"


def add_parser(sub) -> None:
    p = add_verb(sub, "heads", "importance and behaviour of every attention head", EXAMPLE, run)
    add_model_arg(p)
    p.add_argument("--out", required=True, help="output directory (report.html, heads.json)")
    p.add_argument(
        "--text-file", help="UTF-8 text to score heads on (default: built-in Python reference prose)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="tokens of text to use (default: 64; ablation time grows linearly with it)",
    )
    p.add_argument("--window", type=int, default=64, help="tokens per window (default: 64)")
    p.add_argument(
        "--methods", default="zero,mean,grad", help="importance methods: zero, mean, grad (default: all)"
    )
    p.add_argument("--layers", default=None, help="score only these layers, e.g. 0,5,29 (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sequences for the induction score")
    p.add_argument(
        "--approx",
        choices=["atp", "atp-graddrop"],
        default=None,
        help="estimate the zero/mean ablations by attribution patching (one forward + backward; "
        "APPROXIMATE, labelled so in heads.json and the report) instead of running them; atp-graddrop "
        "adds AtP*'s GradDrop magnitudes (robust to cancelling paths; ~one backward pass per layer)",
    )
    p.add_argument(
        "--compare-exact",
        action="store_true",
        help="with --approx: also run the exact ablations and report the rank correlation",
    )
    add_speed_args(p)


def run(args) -> int:
    from ..explain.heads import METHODS, analyze_heads
    from ..views.heads import heads_report

    check_out_dir(args.out)
    text = None
    if args.text_file:
        text = read_text_file(args.text_file)
        if not text.strip():
            raise LmscopeError(f"the text file '{args.text_file}' is empty", "pass a file with some text")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise LmscopeError(f"unknown --methods '{args.methods}'", f"use some of: {','.join(METHODS)}")
    if args.compare_exact and not args.approx:
        raise LmscopeError(
            "--compare-exact compares an approximation with the exact scores", "add --approx atp"
        )
    if args.max_tokens < 2 or args.window < 2:
        raise LmscopeError("--max-tokens and --window must be at least 2", "e.g. --max-tokens 64")
    layers = parse_int_list(args.layers, "--layers")
    apply_threads(args)
    lm = load_model(args.model)

    bar = progress_bar("ablating heads", "layer", quiet=args.quiet)

    scores = analyze_heads(
        lm,
        text,
        max_tokens=args.max_tokens,
        window=args.window,
        methods=methods,
        layers=layers,
        seed=args.seed,
        progress=bar.update_to,
        approx=args.approx,
        compare_exact=args.compare_exact,
    )
    bar.close()
    data = scores.to_json()
    with atomic_out(args.out) as tmp:
        (tmp / "heads.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
        heads_report(scores, f"Heads: {lm.name}").write(tmp / "report.html")
    for i, h in scores.ranking("induction")[:3] if "induction" in scores.scores else []:
        print(f"L{i}h{h}: {scores.summary(i, h)}", file=sys.stderr)
    print(f"{args.out.rstrip('/')}/report.html")
    return 0
