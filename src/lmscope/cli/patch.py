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
    p.add_argument("--target", required=True, help='the answer token, e.g. " Mary" (one token)')
    p.add_argument(
        "--contrast", default=None, help='the competing token, e.g. " John" (metric: logit difference)'
    )
    p.add_argument("--layers", default=None, help="patch only these layers, e.g. 0,10,29 (default: all)")
    p.add_argument(
        "--approx",
        choices=["atp"],
        default=None,
        help="add attribution-patching estimates of every site and of each head at each position (one "
        "forward + backward; APPROXIMATE, labelled so) beside the exact patching",
    )
    p.add_argument(
        "--no-exact", action="store_true", help="with --approx: skip the exact patching (large prompts)"
    )
    p.add_argument("--out", required=True, help="output directory (report.html, patching.json)")
    add_speed_args(p)


def patching_report(result, title: str):
    """The HTML report for a ``PatchingResult``: restored-metric heatmaps per site (exact, and the
    attribution-patching estimates when present, labelled approximate)."""
    import numpy as np

    from ..views.html import Report

    rep = Report(
        title,
        subtitle=f"metric {result.metric_name}: clean {result.metric_clean:.3f}, corrupted {result.metric_corrupt:.3f}",
    )
    rng = (-1.0, 1.0)
    changed = [i for i, (a, b) in enumerate(zip(result.tokens, result.corrupt_tokens)) if a != b]
    x_tokens = [
        f"{t!r}" + (f"→{result.corrupt_tokens[i]!r}" if i in changed else "")
        for i, t in enumerate(result.tokens)
    ]
    y_layers = [f"L{i}" for i in range(len(result.resid_raw))]
    note = "restored fraction of the clean metric: 0 = corrupted, 1 = clean"
    if not result.exact:
        rep.section("Exact patching", note="not run (--no-exact): every number below is approximate")
    else:
        _exact_sections(rep, result, x_tokens, y_layers, note, rng)
    if result.approx is not None:
        corr = result.approx.get("correlation") or {}
        said = "; ".join(
            f"{k}: Spearman {v['spearman']}" for k, v in corr.items() if v["spearman"] is not None
        )
        approx_note = f"APPROXIMATE ({result.approx['label']}); {note}" + (
            f"; agreement with exact — {said}" if said else ""
        )
        rep.section("Residual stream (approximate, attribution patching)", note=approx_note).heatmap(
            result.approx_normalized("resid"),
            x_labels=x_tokens,
            y_labels=y_layers,
            x_title="position",
            y_title="layer",
            diverging=True,
            value_range=rng,
        )
        heads = result.approx_normalized("heads")
        rep.section("Attention heads (approximate, attribution patching)", note=approx_note).heatmap(
            heads,
            x_labels=[f"h{h}" for h in range(heads.shape[1])],
            y_labels=y_layers,
            x_title="head",
            y_title="layer",
            diverging=True,
            value_range=rng,
        )
        per = result.approx["heads_pos"] - result.metric_corrupt  # [layers, heads, pos]
        span = result.metric_clean - result.metric_corrupt
        if span:
            flat = per.reshape(-1, per.shape[-1]) / span
            order = np.argsort(-np.nan_to_num(np.abs(flat).sum(-1)))[:24]
            labels = [f"L{i // per.shape[1]}H{i % per.shape[1]}" for i in order]
            rep.section(
                "Heads per position (approximate, attribution patching)",
                note="APPROXIMATE: one head's output patched at one position; the 24 heads with the largest "
                "effects; contribution to the restored fraction",
            ).heatmap(
                flat[order],
                x_labels=x_tokens,
                y_labels=labels,
                x_title="position",
                y_title="head",
                diverging=True,
            )
        rep.section("MLPs (approximate, attribution patching)", note=approx_note).bars(
            y_layers, result.approx_normalized("mlp")
        )
    return rep


def _exact_sections(rep, result, x_tokens, y_layers, note, rng) -> None:
    rep.section(
        "Residual stream", note=f"{result.resid_site} patched at one (layer, position); {note}"
    ).heatmap(
        result.resid,
        x_labels=x_tokens,
        y_labels=y_layers,
        x_title="position",
        y_title="layer",
        diverging=True,
        value_range=rng,
    )
    rep.section("Attention heads", note=f"one head's output patched at every position; {note}").heatmap(
        result.heads,
        x_labels=[f"h{h}" for h in range(result.heads.shape[1])],
        y_labels=y_layers,
        x_title="head",
        y_title="layer",
        diverging=True,
        value_range=rng,
    )
    rep.section("MLPs", note=f"one MLP's output patched at every position; {note}").bars(y_layers, result.mlp)


def run(args) -> int:
    from ..explain.patching import patch

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
