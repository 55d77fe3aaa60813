"""The patching report: how much of the clean metric patching each site restores (exact, and the
attribution-patching estimates when present, labelled approximate)."""

from __future__ import annotations

import numpy as np

from .html import Report


def patching_report(result, title: str):
    """The HTML report for a ``PatchingResult``: restored-metric heatmaps per site."""
    rep = Report(
        title,
        subtitle=f"metric {result.metric_name}: clean {result.metric_clean:.3f}, corrupted {result.metric_corrupt:.3f}",
    )
    changed = [i for i, (a, b) in enumerate(zip(result.tokens, result.corrupt_tokens)) if a != b]
    # plain tokens (the page shows spaces as ·), "clean→corrupt" where the prompts differ
    x_tokens = [
        t + (f"→{result.corrupt_tokens[i]}" if i in changed else "") for i, t in enumerate(result.tokens)
    ]
    y_layers = [f"L{i}" for i in range(len(result.resid_raw))]
    note = "restored fraction of the clean metric: 0 = corrupted, 1 = clean; colors span the measured values"
    if not result.exact:
        rep.section("Exact patching", note="not run (--no-exact): every number below is approximate")
    else:
        _exact_sections(rep, result, x_tokens, y_layers, note)
    if result.approx is not None:
        _approx_sections(rep, result, x_tokens, y_layers, note)
    return rep


def _exact_sections(rep, result, x_tokens, y_layers, note) -> None:
    rep.section(
        "Residual stream", note=f"{result.resid_site} patched at one (layer, position); {note}"
    ).heatmap(
        result.resid,
        x_labels=x_tokens,
        y_labels=y_layers,
        x_title="position",
        y_title="layer",
        diverging=True,
    )
    rep.section("Attention heads", note=f"one head's output patched at every position; {note}").heatmap(
        result.heads,
        x_labels=[f"h{h}" for h in range(result.heads.shape[1])],
        y_labels=y_layers,
        x_title="head",
        y_title="layer",
        diverging=True,
    )
    rep.section("MLPs", note=f"one MLP's output patched at every position; {note}").bars(y_layers, result.mlp)


def _approx_sections(rep, result, x_tokens, y_layers, note) -> None:
    corr = result.approx.get("correlation") or {}
    said = "; ".join(f"{k}: Spearman {v['spearman']}" for k, v in corr.items() if v["spearman"] is not None)
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
    )
    heads = result.approx_normalized("heads")
    rep.section("Attention heads (approximate, attribution patching)", note=approx_note).heatmap(
        heads,
        x_labels=[f"h{h}" for h in range(heads.shape[1])],
        y_labels=y_layers,
        x_title="head",
        y_title="layer",
        diverging=True,
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
    gd, span = result.approx.get("graddrop"), abs(result.metric_clean - result.metric_corrupt)
    if gd is not None and span:
        gd_note = (
            f"APPROXIMATE ({result.approx['graddrop_label']}); magnitudes |Δ metric| / |clean − corrupted| "
            "(no sign), robust to paths that cancel"
        )
        rep.section("Attention heads (approximate, AtP + GradDrop)", note=gd_note).heatmap(
            np.asarray(gd["heads"]) / span,
            x_labels=[f"h{h}" for h in range(heads.shape[1])],
            y_labels=y_layers,
            x_title="head",
            y_title="layer",
        )
        rep.section("MLPs (approximate, AtP + GradDrop)", note=gd_note).bars(
            y_layers, np.asarray(gd["mlp"]) / span
        )
