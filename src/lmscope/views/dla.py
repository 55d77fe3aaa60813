"""The direct-logit-attribution report: layer × head heatmap, top contributors, MLPs, per-position
breakdown of the top heads, and the sum check (parts + residual error = logit)."""

from __future__ import annotations

import numpy as np

from .html import Report


def dla_report(result, title: str | None = None) -> Report:
    """The HTML report for a ``lmscope.explain.dla.DLAResult``."""
    target = result.target
    rep = Report(
        title or f"Direct logit attribution: {result.model}",
        subtitle=f"{target['description']} at position {target['position']} = {result.logit:.4f}; "
        f"parts sum to {result.total:.4f}, residual error {result.residual_error:.2e}",
    )
    n_layers, n_heads = result.heads.shape
    rep.section(
        "Heads",
        note="each head's direct contribution to the metric through the final norm (scale frozen at this "
        "input) and the unembedding; red raises it, blue lowers it",
    ).heatmap(
        result.heads,
        x_labels=[f"h{h}" for h in range(n_heads)],
        y_labels=[f"L{i}" for i in range(n_layers)],
        x_title="head",
        y_title="layer",
        diverging=True,
        hover=[
            [f"L{i}H{h}: {v:+.4f}" if not np.isnan(v) else "" for h, v in enumerate(row)]
            for i, row in enumerate(result.heads)
        ],
    )
    top = result.top(20)
    rep.section("Top contributors", note="the 20 parts with the largest |direct contribution|").bars(
        [p.name for p in top], [p.value for p in top]
    )
    rep.section("MLPs", note="each MLP's direct contribution").bars(
        [f"L{i}" for i in range(n_layers)], result.mlp
    )
    if result.sources:
        sec = rep.section(
            "Where the top heads read from",
            note="a head's contribution at the last position split over the source tokens it attends to "
            "(attention weight × value through the output projection); the pieces sum to the head's value",
        )
        for (layer, head), vals in result.sources.items():
            sec.tokens(result.tokens, vals, label=f"L{layer}H{head} ({result.heads[layer, head]:+.3f})")
    rows = [[p.name, p.layer, p.head, p.value] for p in top]
    rows.append(["residual error", None, None, result.residual_error])
    rows.append(["logit (model)", None, None, result.logit])
    rep.section(
        "Sum check",
        note="the parts plus the residual error equal the metric the model computed; "
        f"frozen-norm error at this input {result.meta.get('frozen_norm_error', float('nan')):.2e}",
    ).table(["part", "layer", "head", "value"], rows)
    return rep
