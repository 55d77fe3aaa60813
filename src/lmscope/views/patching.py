"""The patching report: how much of the clean metric patching each site restores."""

from __future__ import annotations

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
    return rep
