"""``lmscope inspect``: capture a model's internals on a text; write report.html, PNGs, run.json, tensors."""

from __future__ import annotations

import json
import sys

from ..errors import LmscopeError
from .common import add_model_arg, add_text_args, add_verb, atomic_out, check_out_dir, get_text, load_model

EXAMPLE = 'lmscope inspect --model smollm2 --text "The capital of France is" --out out/'


def add_parser(sub) -> None:
    p = add_verb(sub, "inspect", "attention, activations and logit lens for one text", EXAMPLE, run)
    add_model_arg(p)
    add_text_args(p)
    p.add_argument(
        "--out", required=True, help="output directory (report.html, PNGs, run.json, tensors.safetensors)"
    )
    p.add_argument(
        "--capture",
        action="append",
        default=None,
        help="extra capture names/globs, e.g. 'blocks.*.attn.head_out' (repeatable); "
        "every layer's attn.pattern, resid_post and mlp.hidden are always captured",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer the report's attention view opens at and the static figures show (default: last)",
    )
    p.add_argument(
        "--head",
        default="mean",
        help="head (a number or mean) for the report's attention view and the static figures (default: mean)",
    )
    p.add_argument(
        "--max-capture-gb",
        type=float,
        default=None,
        help="refuse captures larger than this (default: half of free RAM)",
    )
    p.add_argument("--no-png", action="store_true", help="skip the static PNG figures")
    from .features import add_sae_args

    add_sae_args(p, "list the features active on each token")


def inspect(
    lm,
    text: str,
    out: str,
    capture=None,
    layer=None,
    head="mean",
    truncate=False,
    max_capture_gb=None,
    png: bool = True,
    sae=None,
    sae_top: int = 5,
    explanations: dict | None = None,
) -> dict:
    """Run the inspect job; returns run.json's content. Writes nothing unless every step succeeds.

    ``sae`` (a ``lmscope.features.Dictionary``): also the dictionary features active on each token
    (``features.analysis.active_features``, labelled from ``explanations``), in run.json's ``features`` and a
    report section."""
    from ..views.report import build_inspect_report, inspect_summary, save_pngs

    check_out_dir(out)
    if layer is not None and not 0 <= layer < lm.n_layers:
        raise LmscopeError(f"--layer {layer} is out of range", f"this model has layers 0..{lm.n_layers - 1}")
    if head != "mean":
        try:
            head = int(head)
        except ValueError:
            raise LmscopeError(f"--head must be a number or 'mean', got '{head}'", "e.g. --head 3") from None
        if not 0 <= head < lm.n_heads:
            raise LmscopeError(f"--head {head} is out of range", f"this model has heads 0..{lm.n_heads - 1}")
    names = ["blocks.*.attn.pattern", "blocks.*.resid_post"]
    names.append("blocks.*.mlp.router" if lm.family.moe else "blocks.*.mlp.hidden")
    if lm.is_causal:
        names.append("logits")
    names += capture or []
    max_bytes = int(max_capture_gb * 2**30) if max_capture_gb else None
    activity = None
    if sae is not None:
        from ..features.analysis import active_features

        activity = active_features(lm, sae, text, top=sae_top, explanations=explanations, truncate=truncate)
    run = lm.run(text, capture=names, max_bytes=max_bytes, truncate=truncate, progress=True)
    summary = inspect_summary(run)
    if activity is not None:
        summary["features"] = activity.to_dict()
    with atomic_out(out) as tmp:
        opened = {}  # --layer/--head: the report's attention explorer opens where the figures are
        if layer is not None or head != "mean":
            opened = {"layer": lm.n_layers - 1 if layer is None else layer, "head": head}
        rep = build_inspect_report(run, **opened)
        if activity is not None:
            from ..views.feature_views import add_activity_section

            add_activity_section(rep, activity)
        rep.write(tmp / "report.html")
        if png:
            summary["pngs"] = save_pngs(run, tmp, layer=layer, head=head)
        run.save_tensors(tmp / "tensors.safetensors")
        (tmp / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def run(args) -> int:
    text = get_text(args)
    check_out_dir(args.out)
    from .features import load_sae_args

    sae, explanations = load_sae_args(args)
    lm = load_model(args.model)
    summary = inspect(
        lm,
        text,
        args.out,
        args.capture,
        args.layer,
        args.head,
        args.truncate,
        args.max_capture_gb,
        png=not args.no_png,
        sae=sae,
        sae_top=args.sae_top or 5,
        explanations=explanations,
    )
    if "truncated" in summary:
        t = summary["truncated"]
        print(
            f"--truncate: kept the first {t['kept']} of {t['tokens']} tokens ({t['tokens'] - t['kept']} cut)",
            file=sys.stderr,
        )
    pred = f" → {summary['prediction'][0]['token']!r}" if "prediction" in summary else ""
    print(f"{lm.name}: {summary['n_tokens']} tokens{pred}", file=sys.stderr)
    if "features" in summary:
        f = summary["features"]
        top = ", ".join(f"f{x['feature']}" for x in f["features"][:5])
        print(f"{f['site']}: {len(f['features'])} features active; strongest {top}", file=sys.stderr)
    print(f"{args.out.rstrip('/')}/report.html")
    return 0
