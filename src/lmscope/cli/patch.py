"""``lmscope patch``: activation patching from a clean into a corrupted prompt; writes report.html and
patching.json."""

from __future__ import annotations

import json
import sys

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, atomic_out, check_out_dir, load_model, parse_int_list
from .speed import add_speed_args, apply_threads, progress_bar

EXAMPLE = (
    'lmscope patch --model smollm2 --clean "When Mary and John went to the store, John gave a drink to" '
    '--corrupt "When Mary and John went to the store, Mary gave a drink to" '
    '--target " Mary" --contrast " John" --out out/'
)


def add_parser(sub) -> None:
    p = add_verb(sub, "patch", "activation patching: which parts carry the clean answer", EXAMPLE, run)
    add_model_arg(p)
    p.add_argument("--clean", required=True, help="the prompt whose answer we want to restore")
    p.add_argument("--corrupt", required=True, help="the same prompt with a change (same token count)")
    p.add_argument(
        "--target",
        required=True,
        help='the answer token, e.g. " Mary" (one token); for a sequence classifier a class name or index',
    )
    p.add_argument(
        "--contrast", default=None, help='the competing token, e.g. " John" (metric: logit difference)'
    )
    p.add_argument("--layers", default=None, help="patch only these layers, e.g. 0,10,29 (default: all)")
    p.add_argument(
        "--approx",
        choices=["atp", "atp-graddrop"],
        default=None,
        help="add attribution-patching estimates of every site and of each head at each position (one "
        "forward + backward; APPROXIMATE, labelled so) beside the exact patching; atp-graddrop adds "
        "AtP*'s GradDrop magnitudes (robust to cancelling paths; ~one backward pass per layer)",
    )
    p.add_argument(
        "--no-exact", action="store_true", help="with --approx: skip the exact patching (large prompts)"
    )
    p.add_argument("--out", required=True, help="output directory (report.html, patching.json)")
    add_speed_args(p)


def run(args) -> int:
    from ..explain.patching import patch
    from ..views.patching import patching_report

    check_out_dir(args.out)
    for flag in ("clean", "corrupt"):
        if not getattr(args, flag).strip():
            raise LmscopeError(f"--{flag} is empty", f'pass a prompt, e.g. --{flag} "When Mary and John ..."')
    if args.no_exact and not args.approx:
        raise LmscopeError("--no-exact leaves nothing to compute", "add --approx atp, or drop --no-exact")
    layers = parse_int_list(args.layers, "--layers")
    apply_threads(args)
    lm = load_model(args.model)
    bar = progress_bar("patching", "layer", quiet=args.quiet)
    result = patch(
        lm,
        args.clean,
        args.corrupt,
        args.target,
        args.contrast,
        layers=layers,
        approx=args.approx,
        exact=not args.no_exact,
        progress=bar.update_to,
    )
    bar.close()
    with atomic_out(args.out) as tmp:
        (tmp / "patching.json").write_text(json.dumps(result.to_json(), indent=1, ensure_ascii=False))
        patching_report(result, f"Patching: {lm.name}").write(tmp / "report.html")
    print(
        f"{result.metric_name}: clean {result.metric_clean:.3f}, corrupted {result.metric_corrupt:.3f}",
        file=sys.stderr,
    )
    print(f"{args.out.rstrip('/')}/report.html")
    return 0
