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
        choices=["atp"],
        default=None,
        help="estimate the zero/mean ablations by attribution patching (one forward + backward; "
        "APPROXIMATE, labelled so in heads.json and the report) instead of running them",
    )
    p.add_argument(
        "--compare-exact",
        action="store_true",
        help="with --approx: also run the exact ablations and report the rank correlation",
    )
    add_speed_args(p)


def heads_report(scores, title: str):
    """The HTML report for a ``HeadScores`` (importance and characterization heatmaps, notable heads)."""
    import numpy as np

    from ..views.html import Report

    rep = Report(
        title,
        subtitle=f"{scores.n_layers} layers × {scores.n_heads} heads; "
        f"{scores.meta.get('tokens_used', '?')} text tokens",
    )
    x_labels = [f"h{h}" for h in range(scores.n_heads)]
    y_labels = [f"L{i}" for i in range(scores.n_layers)]
    notes = {
        "ablation_mean": "Δ loss (nats/token) when the head's output is replaced by its mean",
        "ablation_zero": "Δ loss (nats/token) when the head's output is zeroed",
        "grad_importance": "|∂loss/∂mask| of a mask on the head's output (Michel et al. 2019)",
        "induction": "attention to the token after the previous occurrence (random repeated tokens)",
        "previous_token": "attention to the previous token",
        "first_token": "attention to the first token (attention sink)",
        "self": "attention to its own position",
        "atp_mean": "APPROXIMATE Δ loss of mean ablation (attribution patching, first order)",
        "atp_zero": "APPROXIMATE Δ loss of zero ablation (attribution patching, first order)",
        "atp_mean_cancellation": "how much atp_mean's per-position terms cancel (0 none … 1 all)",
        "atp_zero_cancellation": "how much atp_zero's per-position terms cancel (0 none … 1 all)",
    }

    def maps(metrics, diverging):
        out = []
        for m in metrics:
            if m in scores.scores:
                z = scores.scores[m]
                spec = {
                    "type": "heatmap",
                    "z": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in z],
                    "x_labels": x_labels,
                    "y_labels": y_labels,
                    "title": notes[m],
                    "x_title": "head",
                    "y_title": "layer",
                    "diverging": diverging,
                }
                out.append((m, spec))
        return out

    imp = maps(("ablation_mean", "ablation_zero", "grad_importance", "atp_mean", "atp_zero"), True)
    if imp:
        note = "larger = the model needs the head more on this text"
        if any(m.startswith("atp_") for m, _ in imp):
            note += "; atp_* are APPROXIMATE (attribution patching, a first-order estimate)"
            corr = scores.meta.get("atp_vs_exact")
            if corr:
                note += "; Spearman vs exact: " + ", ".join(f"{k} {v['spearman']}" for k, v in corr.items())
        sec = rep.section("Head importance", note=note)
        sec.choice(imp, label="metric")
        cancel = maps(("atp_mean_cancellation", "atp_zero_cancellation"), False)
        if cancel:
            sec.choice(cancel, label="cancellation")
    pat = maps(("induction", "previous_token", "first_token", "self"), False)
    if pat:
        sec = rep.section("What each head does", note="mean attention weight on the named position (0..1)")
        sec.choice(pat, label="pattern")
    rows, cols = [], ["layer", "head", "kv head", "zero Δloss", "mean Δloss", "grad", "summary"]
    for i in range(scores.n_layers):
        for h in range(scores.heads_per_layer[i]):
            line = scores.summary(i, h)
            if line:
                vals = [scores.scores.get(m) for m in ("ablation_zero", "ablation_mean", "grad_importance")]
                rows.append(
                    [i, h, scores.kv_heads[i][h], *[None if v is None else v[i, h] for v in vals], line]
                )
    sec = rep.section("Notable heads", note="heads with a clear attention pattern or a large ablation effect")
    if rows:
        sec.table(cols, rows)
    else:
        sec.text("No head passes the thresholds on this text.")

    def braces(groups):
        return "  ".join("{" + ",".join(map(str, g)) + "}" for g in groups)

    per_layer = [braces(scores.kv_groups(i)) for i in range(scores.n_layers)]
    if len(set(per_layer)) == 1:
        text = f"every layer: {per_layer[0]}"
    else:
        text = "\n".join(f"L{i}: {g}" for i, g in enumerate(per_layer))
    rep.section("Grouped-query attention", note="query heads in one brace read the same key/value head").text(
        text
    )
    return rep


def run(args) -> int:
    from ..explain.heads import METHODS, analyze_heads

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
