"""The heads report: importance and characterization of every attention head."""

from __future__ import annotations

import numpy as np

from .html import Report


def heads_report(scores, title: str):
    """The HTML report for a ``HeadScores`` (importance and characterization heatmaps, notable heads)."""
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
        "atp_mean_graddrop": "APPROXIMATE |Δ loss| of mean ablation (AtP + GradDrop, robust to cancelling paths)",
        "atp_zero_graddrop": "APPROXIMATE |Δ loss| of zero ablation (AtP + GradDrop, robust to cancelling paths)",
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
        graddrop = maps(("atp_mean_graddrop", "atp_zero_graddrop"), False)  # magnitudes: no sign
        if graddrop:
            sec.choice(graddrop, label="GradDrop (approximate |Δ loss|)")
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
