"""``lmscope audit``: a model's decisions over a dataset — explained, tested with counterfactuals, per group."""

from __future__ import annotations

import sys

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, check_out_dir, load_model, show_path

EXAMPLE = (
    "lmscope audit --model clf/ --data cases.jsonl --text-field text --label-field label --group-field group "
    "--counterfactuals builtin:gender,names --out audit/\n"
    '  lmscope audit --model smollm2 --data cases.csv --prompt "Application: {text}\\nDecision:" '
    '--choices " approve" " deny" --counterfactuals swaps.json --out audit/'
)


def add_parser(sub) -> None:
    p = add_verb(
        sub,
        "audit",
        "decisions over a dataset: explanations, counterfactual invariance, group metrics, calibration",
        EXAMPLE,
        run,
    )
    add_model_arg(p)
    p.add_argument("--data", required=True, help="the cases: .jsonl, .csv, .tsv or .parquet")
    p.add_argument("--text-field", default="text", help="key/column of the text (default: text)")
    p.add_argument("--label-field", default=None, help="key/column of the true label (optional)")
    p.add_argument("--group-field", default=None, help="key/column of the group, e.g. gender (optional)")
    p.add_argument("--id-field", default=None, help="key/column of a case id (default: the record number)")
    p.add_argument("--prompt", default=None, help="causal LM as a classifier: a template holding {text} once")
    p.add_argument(
        "--choices",
        nargs="+",
        default=None,
        help='the answers a causal LM picks from, e.g. " approve" " deny"',
    )
    p.add_argument(
        "--counterfactuals",
        nargs="+",
        default=None,
        help="builtin:gender,names and/or JSON swap files (pairs, or regex rules)",
    )
    p.add_argument(
        "--positive",
        default=None,
        help="the class whose rate is the selection rate (default: the second class of a two-class classifier, "
        "else the first class or choice)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="attribution methods tried per case, the most faithful unflagged one kept "
        "(default: saliency,input_x_gradient,occlusion)",
    )
    p.add_argument("--no-explain", action="store_true", help="skip explanations (decisions and metrics only)")
    p.add_argument("--no-sanity", action="store_true", help="skip the model-randomization check per case")
    p.add_argument("--granularity", choices=("word", "token"), default="word", help="attribution units")
    p.add_argument("--max-cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward batch (default: 16)")
    p.add_argument("--bins", type=int, default=10, help="calibration bins (default: 10)")
    p.add_argument("--truncate", action="store_true", help="cut texts longer than the model's context")
    p.add_argument("--out", required=True, help="output directory: audit.json, cases.csv, report.html")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="audit batches on Ray: 'auto' starts a local runtime, an address joins a cluster (lmscope[scale])",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray actors, each holding the model (default: 2)")
    p.add_argument(
        "--resume", action="store_true", help="continue an audit into --out that was interrupted (killed)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args) -> int:
    from ..audit.counterfactuals import load_swaps
    from ..audit.data import Cases
    from ..audit.decider import TEXT_SLOT

    check_out_dir(args.out)
    # everything that can be checked without the model fails before it loads
    cases = Cases(args.data, args.text_field, args.label_field, args.group_field, args.id_field)
    if args.counterfactuals:
        load_swaps(args.counterfactuals)
    if args.prompt is not None and args.prompt.count(TEXT_SLOT) != 1:
        raise LmscopeError(
            f"--prompt must hold {TEXT_SLOT} exactly once (it holds it {args.prompt.count(TEXT_SLOT)} times)",
            'e.g. --prompt "Application: {text}\\nDecision:"',
        )
    if (args.prompt is None) != (args.choices is None):
        raise LmscopeError(
            "--prompt and --choices go together", 'pass both, e.g. --choices " approve" " deny"'
        )
    if args.choices and len(set(args.choices)) != len(args.choices):
        raise LmscopeError("two --choices are the same", "pass different answers")
    if args.bins < 1:
        raise LmscopeError("--bins must be positive", "e.g. --bins 10")
    if args.ray:
        from ..scan.distributed import require_ray

        require_ray()
    lm = load_model(args.model)

    def show(done: int, total: int | None, rate: float) -> None:
        if args.quiet:
            return
        line = f"\raudit: {done}" + (f"/{total}" if total else "") + f" cases, {rate:.2f} cases/s"
        if total and rate > 0:
            line += f", ETA {(total - done) / rate:.0f} s"
        print(line, end="", file=sys.stderr, flush=True)

    checkpoint = partial_dir(args.out)
    try:
        result = _run_audit(args, lm, cases, show, checkpoint)
    except LmscopeError:
        if not args.resume:  # a bad record: nothing half-written stays (a refused resume keeps its work)
            import shutil

            shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    if not args.quiet:
        print(file=sys.stderr)
    result.write(args.out, report=not args.no_report)
    import shutil

    shutil.rmtree(checkpoint, ignore_errors=True)
    for f in result.findings:
        if f["severity"] in ("high", "medium"):
            print(f"finding ({f['severity']}): {f['text']}", file=sys.stderr)
    print(show_path(args.out, "audit.json" if args.no_report else "report.html"))
    return 0


def partial_dir(out: str):
    """Where an unfinished audit into ``out`` keeps its finished cases (a hidden sibling of ``out``)."""
    from pathlib import Path

    path = Path(out).expanduser().resolve()
    return path.parent / f".{path.name}.audit-partial"


def _run_audit(args, lm, cases, show, checkpoint):
    from ..audit import audit

    if args.resume and not (checkpoint / "state.json").is_file():
        raise LmscopeError(
            f"there is no interrupted audit into '{args.out}' to resume", "rerun without --resume"
        )
    return audit(
        lm,
        cases,
        label_field=args.label_field,
        group_field=args.group_field,
        prompt=args.prompt,
        choices=args.choices,
        counterfactuals=args.counterfactuals,
        positive=args.positive,
        explain=not args.no_explain,
        methods=args.methods,
        granularity=args.granularity,
        sanity=not args.no_sanity,
        max_cases=args.max_cases,
        batch_size=args.batch_size,
        bins=args.bins,
        truncate=args.truncate,
        progress=show,
        checkpoint=checkpoint,
        resume=args.resume,
        ray=args.ray,
        workers=args.workers,
    )
