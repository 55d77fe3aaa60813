"""Reports of the compress package: compress (summary, structure, SQNR), compare (inside changes) and
the structure-diff section both use."""

from __future__ import annotations

import math
import re

from .html import Report


def _r(v, digits: int = 4):
    """``digits`` significant digits (a JS of 7e-4 bits stays 7.34e-4, not 7e-4 or 0)."""
    return "" if v is None else float(f"{v:.{digits}g}")


def _text(v) -> str:
    """A table value as text (one alignment per column): floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def removed_counts(result) -> list[tuple[str, int, int, int]]:
    """(what, before, after, removed) for each pruning step: heads, MLP neurons, layers."""
    out = []
    for step, info in zip(result.recipe.steps, result.infos):
        for what, key_before, key_removed in (
            ("attention heads", "heads_before", "heads_removed"),
            ("MLP neurons", "neurons_before", "neurons_removed"),
        ):
            if key_before in info and key_removed in info:
                b, r = int(info[key_before]), int(info[key_removed])
                out.append((what, b, b - r, r))
        if step.kind == "prune_layers" and "layers_before" in info:
            b, r = int(info["layers_before"]), len(info.get("removed", []))
            out.append(("layers", b, b - r, r))
    return out


def compress_report(result) -> Report:
    """The compress report: summary, structure diff, per-layer SQNR."""
    rep = Report(f"Compress: {getattr(result.lm, 'name', 'model')}", subtitle=result.recipe.describe())
    sec = rep.section("Summary", note="bytes of the state dict as stored; parameters counted logically")
    rows = [
        [
            "size",
            _megabytes(result.bytes_before),
            _megabytes(result.bytes_after),
            f"{result.bytes_after / max(1, result.bytes_before):.3f}",
        ],
        [
            "parameters",
            f"{result.params_before / 1e6:.2f}M",
            f"{result.params_after / 1e6:.2f}M",
            f"{result.params_after / max(1, result.params_before):.3f}",
        ],
    ]
    rows += [
        [what, str(before), str(after), f"{removed} removed"]
        for what, before, after, removed in removed_counts(result)
    ]
    sec.table(["", "before", "after", "ratio / removed"], rows)
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
            values = [r["output_sqnr_db"] for r in with_out]
            # bars from just below the worst value: from 0, 33.7 and 39.8 dB look alike
            sec.bars(
                [r["layer"] for r in with_out],
                values,
                title=f"output SQNR (dB), worst {len(values)} (bars start at the axis value, not 0)",
                baseline=math.floor(min(values)) - 1,
            )
    for step, info in zip(result.recipe.steps, result.infos):
        if step.kind != "quantize":
            small = {k: v for k, v in info.items() if not isinstance(v, (list, dict))}
            if small:
                rep.section(f"Step {step.kind}").table(
                    ["key", "value"], [[k, _text(v)] for k, v in small.items()]
                )
    return rep


def compare_report(cmp) -> Report:
    """The compare report: output agreement, per-head JS, logit-lens drift, attribution agreement."""
    rep = Report(f"Compare: {cmp.a_name} vs {cmp.b_name}", subtitle=cmp.text[:200])
    sec = rep.section("Summary", note="what the compressed model does differently on this text")
    summary = [
        ["tokens", len(cmp.tokens)],
        ["output top-1 agreement", f"{cmp.top1_agreement:.1%}"],
        ["output KL (nats/token)", _r(cmp.output_kl)],
        ["heads removed", len(cmp.removed_heads)],
        ["max head JS among kept (bits)", _r(cmp.max_head_js)],
        [
            "layers removed",
            ", ".join(str(x["layer"]) for x in cmp.layers if x["status"] == "removed") or "none",
        ],
        ["structure", cmp.structure],
    ]
    sec.table(["measure", "value"], [[k, _text(v)] for k, v in summary])
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
        [[h["layer"], h["head"], _r(h["js"])] for h in cmp.most_changed_heads(10)],
    )
    ls = rep.section("Layers: logit-lens drift", note="KL(original ‖ compressed) of what each layer predicts")
    kept = [x for x in cmp.layers if x["lens_kl"] is not None]
    # two charts: KL in nats and JS in bits have different units and scales (on one axis JS was a flat line)
    layers = [x["layer"] for x in kept]
    ls.lines(
        [{"name": "logit-lens KL", "x": layers, "y": [x["lens_kl"] for x in kept]}],
        title="logit-lens KL(original ‖ compressed) per layer",
        x_title="layer",
        y_title="KL (nats)",
    )
    ls.lines(
        [{"name": "mean head JS", "x": layers, "y": [x["mean_head_js"] for x in kept]}],
        title="mean attention-head JS divergence per layer",
        x_title="layer",
        y_title="JS (bits)",
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
    """A section with the structure diff as a tree (indented names); runs of blocks whose rows are
    identical apart from their index are shown once ("layers.0–29: 30 identical blocks")."""
    sec = report.section(f"Structure: {diff.a_name} vs {diff.b_name}", note=diff.summary())
    rows, highlight = [], []
    for cells, changed in grouped_structure_rows(diff):
        if changed or not changed_only:
            if changed:
                highlight.append(len(rows))
            rows.append(cells)
    sec.table(list(diff.COLUMNS), rows, highlight=highlight)
    return sec


_INDEX = re.compile(r"^(.*)\.(\d+)$")


def grouped_structure_rows(diff) -> list[tuple[list[str], bool]]:
    """(cells, changed) per displayed row of ``diff``: the module tree with names indented by depth
    (non-breaking spaces, so HTML keeps them) and consecutive identical numbered blocks merged."""
    rows = diff.rows
    out, i = [], 0

    def subtree(k: int) -> list:
        path = rows[k].path
        j = k + 1
        while j < len(rows) and rows[j].path.startswith(path + "."):
            j += 1
        return rows[k:j]

    def signature(block: list) -> tuple:
        base = block[0].path
        return tuple((r.path[len(base) :], r.status, tuple(diff._cells(r)[2:])) for r in block)

    while i < len(rows):
        m = _INDEX.match(rows[i].path)
        block = subtree(i) if m else [rows[i]]
        run = [block]
        if m:  # extend with the next blocks of the same list whose rows are the same
            j = i + len(block)
            while j < len(rows):
                m2 = _INDEX.match(rows[j].path)
                if not m2 or m2.group(1) != m.group(1):
                    break
                nxt = subtree(j)
                if signature(nxt) != signature(block):
                    break
                run.append(nxt)
                j += len(nxt)
        for r in block:
            cells = diff._cells(r)
            cells[1] = "\u00a0\u00a0" * r.depth + cells[1].strip()
            if r is block[0] and len(run) > 1:
                first, last = m.group(2), _INDEX.match(run[-1][0].path).group(2)
                cells[1] = "\u00a0\u00a0" * r.depth + f"{first}–{last} ({len(run)} identical blocks)"
                cells[5:7] = [c + " each" if c else c for c in cells[5:7]]
            out.append((cells, r.changed))
        i += sum(len(b) for b in run)
    return out
