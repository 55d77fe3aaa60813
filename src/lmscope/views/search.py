"""The search report: the Pareto front with the uniform baselines, the architecture map (layers x choice),
and where the search spent bits beside each layer's measured sensitivity."""

from __future__ import annotations

from .html import Report


def pareto_figure(result):
    """Bytes (fraction of fp32) vs KL: every evaluated point, the front, uniform baselines, the chosen one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    pts = [p for p in result.points if p["final_stage"]]
    probes = [p for p in result.points if not p["final_stage"] and p["origin"] == "sensitivity"]
    early = [p for p in result.points if not p["final_stage"] and p["origin"] != "sensitivity"]
    floor = min([p["kl"] for p in result.points if p["kl"] > 0] or [1e-9]) / 2
    y = lambda p: max(p["kl"], floor)  # noqa: E731  (log axis: a KL of exactly 0 sits on the floor)
    for group, color, label in (
        (early, "#cccccc", f"stopped at an early stage ({len(early)}; KL on fewer tokens)"),
        (
            probes,
            "#e3c9a8",
            f"sensitivity probes ({len(probes)}; one layer at the fewest bytes, rest at the most)",
        ),
    ):
        if group:
            ax.scatter([p["bytes_fraction"] for p in group], [y(p) for p in group], s=8, c=color, label=label)
    ax.scatter([p["bytes_fraction"] for p in pts], [y(p) for p in pts], s=12, c="#7a9cc6", label="evaluated")
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: p["bytes"])
    ax.step(
        [p["bytes_fraction"] for p in front],
        [y(p) for p in front],
        where="post",
        c="#1f4e8c",
        lw=1.2,
        label="Pareto front",
    )
    for p in result.baselines():
        ax.scatter([p["bytes_fraction"]], [y(p)], marker="s", s=46, c="#d9822b", zorder=3)
        ax.annotate(
            p.get("label") or p.get("describe", ""),
            (p["bytes_fraction"], y(p)),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
            color="#a0521a",
        )
    c = result.chosen_point
    if c is not None:
        ax.scatter([c["bytes_fraction"]], [y(c)], marker="*", s=180, c="#c0392b", zorder=4, label="chosen")
    ax.axvline(result.budget.fraction, color="#c0392b", ls="--", lw=0.8, label=f"budget {result.budget}")
    ax.set_yscale("log")
    ax.set_xlabel("bytes / fp32 bytes")
    ax.set_ylabel(f"KL to the original (nats/token, {result.stats.get('stage_tokens', ['?'])[-1]} tokens)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def search_report(result) -> Report:
    from .plots import plt  # noqa: F401  (Agg backend set up once)

    c = result.chosen_point
    rep = Report(
        f"Search: {result.model}",
        subtitle=f"budget {result.budget} — "
        + (c["describe"] if c else "no configuration within the budget"),
    )
    sec = rep.section(
        "Summary",
        note="bytes of the state dict as stored (the counter compress uses), as a fraction of the fp32 model; "
        "KL on calibration tokens; perplexity on held-out text disjoint from calibration",
    )
    rows = []
    ref = result.reference_ppl
    for p in sorted((p for p in result.points if p.get("ppl") is not None), key=lambda p: p["bytes"]):
        tag = "chosen" if p is c else (f"uniform {p['label']}" if p.get("label") else "front")
        rows.append(
            [
                tag,
                p["describe"],
                f"{p['bytes_fraction']:.4f}",
                f"{p['kl']:.4g}",
                f"{p['ppl']:.3f}",
                f"{p['ppl'] / ref - 1:+.1%}" if ref else "",
            ]
        )
    if ref:
        rows.insert(0, ["original", "float", "1.0000", "0", f"{ref:.3f}", ""])
    sec.table(
        ["point", "configuration", "bytes / fp32", "KL", "held-out ppl", "Δppl"],
        rows,
        highlight=[i for i, r in enumerate(rows) if r[0] == "chosen"],
    )
    s = result.stats
    sec.text(
        f"{s.get('evaluations')} evaluations ({s.get('computed')} computed in this run, "
        f"{s.get('eval_seconds')} s of fitness), {len(result.points)} configurations, "
        f"{s.get('generations')} generations ({s.get('accepted')} improved the parent); "
        f"KL stages of {s.get('stage_tokens')} tokens; seed {result.settings.get('seed')}."
    )
    rep.section(
        "Pareto front",
        note="every evaluated configuration; squares: uniform baselines (the same levels everywhere); "
        "star: the chosen configuration (lowest KL within the budget)",
    ).image(pareto_figure(result), alt="bytes vs KL")

    if c is not None:
        kinds = list(dict.fromkeys(u["kind"] for u in result.units))
        blocks = sorted({u["block"] for u in result.units})
        z = [[None] * len(kinds) for _ in blocks]
        text = [[""] * len(kinds) for _ in blocks]
        from ..compress.search.space import bits_per_weight

        for u in result.units:
            lv = c["config"][u["name"]]
            z[blocks.index(u["block"])][kinds.index(u["kind"])] = bits_per_weight(lv)
            text[blocks.index(u["block"])][kinds.index(u["kind"])] = lv
        rep.section(
            "Architecture map",
            note="the chosen level per layer (bits per weight, scales included; float = 32)",
        ).heatmap(
            z,
            x_labels=kinds,
            y_labels=[str(b) for b in blocks],
            x_title="projections",
            y_title="layer",
            cell_text=text,
            log=True,
        )
    if result.sensitivity and c is not None:
        from ..compress.search.space import bits_per_weight

        names = [u["name"] for u in result.units]
        sens = [result.sensitivity.get(n) for n in names]
        bits = [bits_per_weight(c["config"][n]) for n in names]
        sec2 = rep.section(
            "Where the bits went, beside sensitivity",
            note="sensitivity: KL to the original when only this layer is at the fewest-bytes level "
            "(the rest at the most), on the first stage's tokens; the search should spend bits on sensitive layers",
        )
        order = sorted(range(len(names)), key=lambda i: -(sens[i] or 0))
        sec2.table(
            ["layer", "sensitivity (KL)", "rank", "chosen level", "bits/weight"],
            [
                [
                    names[i],
                    f"{sens[i]:.4g}" if sens[i] is not None else "",
                    r + 1,
                    c["config"][names[i]],
                    bits[i],
                ]
                for r, i in enumerate(order)
            ],
            highlight=list(range(min(5, len(order)))),
        )
        sec2.lines(
            [
                {
                    "name": "sensitivity (log10 KL)",
                    "x": list(range(len(names))),
                    "y": [None if not v else _log10(v) for v in sens],
                },
                {"name": "chosen bits/weight", "x": list(range(len(names))), "y": bits},
            ],
            title="per layer, in model order (" + ", ".join(names[:3]) + ", …)",
            x_title="unit",
        )
    return rep


def _log10(v: float) -> float:
    import math

    return math.log10(v)
