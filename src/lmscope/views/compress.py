"""Reports of the compress package: compress (summary, structure, SQNR), compare (inside changes) and
the structure-diff section both use."""

from __future__ import annotations

from .html import Report


def _r(v, nd: int = 4):
    return "" if v is None else round(v, nd)


def compress_report(result) -> Report:
    """The compress report: summary, structure diff, per-layer SQNR."""
    rep = Report(f"Compress: {getattr(result.lm, 'name', 'model')}", subtitle=result.recipe.describe())
    sec = rep.section("Summary", note="bytes of the state dict as stored; parameters counted logically")
    sec.table(
        ["", "before", "after", "ratio"],
        [
            [
                "bytes",
                result.bytes_before,
                result.bytes_after,
                f"{result.bytes_after / max(1, result.bytes_before):.3f}",
            ],
            [
                "params",
                result.params_before,
                result.params_after,
                f"{result.params_after / max(1, result.params_before):.3f}",
            ],
        ],
    )
    diff = result.structure_diff()
    if diff is not None:
        structure_section(rep, diff, changed_only=False)
    rows = result.layer_errors()
    if rows:
        sec = rep.section(
            "Per-layer quantization error (worst first)",
            note="SQNR = 20·log10(‖w‖/‖w − ŵ‖); output SQNR on calibration activations (higher is better)",
        )
        cols = ["layer", "shape", "bits", "how", "weight SQNR dB", "output SQNR dB", "output rel. error"]
        table = [
            [
                r["layer"],
                "×".join(map(str, r["shape"])),
                r["bits"],
                r["how"],
                r["weight_sqnr_db"],
                r["output_sqnr_db"],
                r["output_rel_error"],
            ]
            for r in rows
        ]
        sec.table(cols, table, highlight=list(range(min(5, len(table)))))
        with_out = [r for r in rows if r["output_sqnr_db"] is not None][:40]
        if with_out:
            sec.bars(
                [r["layer"] for r in with_out],
                [r["output_sqnr_db"] for r in with_out],
                title="output SQNR (dB), worst 40",
            )
    for step, info in zip(result.recipe.steps, result.infos):
        if step.kind != "quantize":
            small = {k: v for k, v in info.items() if not isinstance(v, (list, dict))}
            if small:
                rep.section(f"Step {step.kind}").table(
                    ["key", "value"], [[k, str(v)] for k, v in small.items()]
                )
    return rep


def compare_report(cmp) -> Report:
    """The compare report: output agreement, per-head JS, logit-lens drift, attribution agreement."""
    rep = Report(f"Compare: {cmp.a_name} vs {cmp.b_name}", subtitle=cmp.text[:200])
    sec = rep.section("Summary", note="what the compressed model does differently on this text")
    summary = [
        ["tokens", len(cmp.tokens)],
        ["output top-1 agreement", f"{cmp.top1_agreement:.1%}"],
        ["output KL (nats/token)", round(cmp.output_kl, 5)],
        ["heads removed", len(cmp.removed_heads)],
        ["max head JS among kept (bits)", round(cmp.max_head_js, 4)],
        [
            "layers removed",
            ", ".join(str(x["layer"]) for x in cmp.layers if x["status"] == "removed") or "none",
        ],
        ["structure", cmp.structure],
    ]
    sec.table(["measure", "value"], summary)
    for line in cmp.notes:
        sec.text(line)
    n_layers = max(h["layer"] for h in cmp.heads) + 1
    n_heads = max(h["head"] for h in cmp.heads) + 1
    z = [[None] * n_heads for _ in range(n_layers)]
    cell = [[""] * n_heads for _ in range(n_layers)]
    for h in cmp.heads:
        z[h["layer"]][h["head"]] = h["js"]
        cell[h["layer"]][h["head"]] = "✕" if h["status"] == "removed" else ""
    hs = rep.section(
        "Attention heads: Jensen–Shannon divergence (bits)",
        note="0 = same pattern, 1 = disjoint; the color scale spans the measured values (see the color bar); "
        "✕ marks heads the compression removed",
    )
    hs.heatmap(
        z,
        x_labels=[f"H{i}" for i in range(n_heads)],
        y_labels=[f"L{i}" for i in range(n_layers)],
        x_title="head (original numbering)",
        y_title="layer",
        cell_text=cell,
        controls=["log"],
    )
    hs.table(
        ["layer", "head", "JS (bits)"],
        [[h["layer"], h["head"], round(h["js"], 4)] for h in cmp.most_changed_heads(10)],
    )
    ls = rep.section("Layers: logit-lens drift", note="KL(original ‖ compressed) of what each layer predicts")
    kept = [x for x in cmp.layers if x["lens_kl"] is not None]
    ls.lines(
        [
            {
                "name": "logit-lens KL (nats)",
                "x": [x["layer"] for x in kept],
                "y": [x["lens_kl"] for x in kept],
            },
            {
                "name": "mean head JS (bits)",
                "x": [x["layer"] for x in kept],
                "y": [x["mean_head_js"] for x in kept],
            },
        ],
        x_title="layer",
        y_title="divergence",
    )
    ls.table(
        ["layer", "status", "lens KL", "mean head JS"],
        [[x["layer"], x["status"], _r(x["lens_kl"]), _r(x["mean_head_js"])] for x in cmp.layers],
        highlight=[i for i, x in enumerate(cmp.layers) if x["status"] == "removed"],
    )
    at = rep.section("Attributions", note="same target (the original's top prediction) in both models")
    rows = [
        [m, _r(v.get("spearman")), _r(v.get("topk_overlap")), v.get("k", ""), v.get("error", "")]
        for m, v in cmp.attribution.items()
    ]
    at.table(["method", "Spearman", "top-k overlap", "k", "note"], rows)
    for m, v in cmp.attribution.items():
        if "a" in v:
            at.tokens(cmp.tokens, v["a"], label=f"{m}: {cmp.a_name}")
            at.tokens(cmp.tokens, v["b"], label=f"{m}: {cmp.b_name}")
    return rep


def structure_section(report, diff, changed_only: bool = False):
    """A section with the structure diff table (changed rows highlighted)."""
    sec = report.section(f"Structure: {diff.a_name} vs {diff.b_name}", note=diff.summary())
    cols, rows, hl = diff.to_html_rows(changed_only)
    sec.table(cols, rows, highlight=hl)
    return sec
