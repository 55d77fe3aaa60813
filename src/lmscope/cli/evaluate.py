"""``lmscope evaluate``: models side by side (the first is the reference): perplexity, top-1 agreement and KL,
parameters, bytes on disk, peak memory, prefill/decode speed; terminal table, evaluate.json, report.html."""

from __future__ import annotations

from ..errors import LmscopeError
from .common import add_model_arg, add_verb, atomic_out, check_out_dir, load_model, read_text_file, show_path

EXAMPLE = "lmscope evaluate --model smollm2 --model small/ --out eval/"


def add_parser(sub) -> None:
    p = add_verb(sub, "evaluate", "compare models side by side: quality, size, memory, speed", EXAMPLE, run)
    add_model_arg(p, multiple=True)
    p.add_argument(
        "--text-file", help="evaluate on this UTF-8 text (default: lmscope's built-in evaluation text)"
    )
    p.add_argument("--out", help="also write evaluate.json, report.html and evaluate.png here")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows (default: 8)")
    p.add_argument("--window-tokens", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--no-latency", action="store_true", help="skip the speed and memory measurements")
    p.add_argument(
        "--decode-tokens", type=int, default=32, help="tokens generated for decode speed (default 32)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    p.add_argument(
        "--labels",
        help="sequence classifiers: a labelled file (JSONL, CSV, Parquet) to measure accuracy and label "
        "agreement on (fields: --text-field, --label-field)",
    )
    p.add_argument("--text-field", default="text", help="with --labels: the text field (default: text)")
    p.add_argument("--label-field", default="label", help="with --labels: the label field (default: label)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    if args.windows < 1 or args.window_tokens < 16:
        raise LmscopeError(
            f"--windows {args.windows} / --window-tokens {args.window_tokens} is too small",
            "use --windows 1 or more and --window-tokens 16 or more",
        )
    if args.repeats < 1 or args.decode_tokens < 0:
        raise LmscopeError("--repeats must be >= 1 and --decode-tokens >= 0", "e.g. --repeats 3")
    if args.out:
        check_out_dir(args.out)
    text = read_text_file(args.text_file) if args.text_file else None
    if text is not None and not text.strip():
        raise LmscopeError(f"text file '{args.text_file}' is empty", "pass a file with some text")
    from .. import progress
    from ..compress.evaluate import evaluate

    labels = None
    if args.labels:
        from ..audit.data import Cases

        labels = [(c.text, c.label) for c in Cases(args.labels, args.text_field, args.label_field).cases()]
        if not labels:
            raise LmscopeError(f"'{args.labels}' holds no cases", "pass a file with labelled texts")
    models = [load_model(spec) for spec in (args.model or ["smollm2"])]
    if labels and not all(lm.task == "classifier" for lm in models):
        raise LmscopeError(
            "--labels is for sequence classifiers (a causal LM is measured by perplexity)",
            "drop --labels, or pass classifiers with --model",
        )
    with progress.enabled(not args.quiet):
        result = evaluate(
            models,
            text=text,
            windows=args.windows,
            window_tokens=args.window_tokens,
            latency=not args.no_latency,
            decode_tokens=args.decode_tokens,
            repeats=args.repeats,
            labels=labels,
        )
    print(result.to_text())
    if args.out:
        with atomic_out(args.out) as tmp:
            result.to_json(tmp / "evaluate.json")
            result.report(tmp / "report.html")
            result.figure().savefig(tmp / "evaluate.png", dpi=110)
        print(f"wrote {show_path(args.out, 'evaluate.json')}, report.html, evaluate.png")
    return 0
