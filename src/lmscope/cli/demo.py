"""``lmscope demo``: the main job on the default model; prints the report path."""

from __future__ import annotations

import sys

from .common import add_verb

EXAMPLE = "lmscope demo --out out/demo"
TEXT = "The capital of France is"


def add_parser(sub) -> None:
    p = add_verb(sub, "demo", "inspect the built-in smollm2 on a sample text", EXAMPLE, run)
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")


def run(args) -> int:
    import lmscope

    from .inspect import inspect

    lm = lmscope.load("smollm2")
    summary = inspect(lm, TEXT, args.out)
    top = summary["prediction"][0]
    print(f"{lm!r}\n{TEXT!r} → {top['token']!r} (p={top['prob']:.2f})", file=sys.stderr)
    print(f"report: {args.out.rstrip('/')}/report.html")
    return 0
