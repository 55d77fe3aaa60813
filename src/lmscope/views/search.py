"""The search report: the Pareto front with the uniform baselines, the architecture map (layers x choice),
and where the search spent bits beside each layer's measured sensitivity."""

from __future__ import annotations

from .html import Report

LATENCY_AXIS = "predicted latency / original's (mean of prefill and decode ratios)"


def _cost_axis(result, cost: str, title: str) -> tuple[str, str]:
    """Under a latency budget the front and the summary are over the predicted latency fraction."""
    return ("latency", LATENCY_AXIS) if result.budget.kind == "latency" else (cost, title)


def pareto_figure(result):
    """Bytes (fraction of fp32) vs KL: every evaluated point, the front, uniform baselines, the chosen one."""
    return _pareto(
        result,
        *_cost_axis(result, "bytes", "bytes / fp32 bytes"),
        probe_note="one layer at the fewest bytes, rest at the most",
        size=(7.5, 4.6),
        legend={"loc": "upper right"},
    )


def _pareto(
    result, cost: str, xlabel: str, probe_note: str, size, legend: dict, early_excludes=("sensitivity",)
):
    """``cost`` ("bytes" or "params") vs KL, log axis: early-stage points, sensitivity probes, every point at the
    last stage, the Pareto front, the uniform baselines (labelled), the chosen point and the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    x = f"{cost}_fraction"
    pts = [p for p in result.points if p["final_stage"]]
    probes = [p for p in result.points if not p["final_stage"] and p["origin"] == "sensitivity"]
    early = [p for p in result.points if not p["final_stage"] and p["origin"] not in early_excludes]
    floor = min([p["kl"] for p in result.points if p["kl"] > 0] or [1e-9]) / 2
    y = lambda p: max(p["kl"], floor)  # noqa: E731  (log axis: a KL of exactly 0 sits on the floor)
    for group, color, label in (
        (early, "#cccccc", f"stopped at an early stage ({len(early)}; KL on fewer tokens)"),
        (probes, "#e3c9a8", f"sensitivity probes ({len(probes)}; {probe_note})"),
    ):
        if group:
            ax.scatter([p[x] for p in group], [y(p) for p in group], s=8, c=color, label=label)
    ax.scatter([p[x] for p in pts], [y(p) for p in pts], s=12, c="#7a9cc6", label="evaluated")
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: p[x])
    ax.step(
        [p[x] for p in front], [y(p) for p in front], where="post", c="#1f4e8c", lw=1.2, label="Pareto front"
    )
    for p in result.baselines():
        if x not in p:  # a peer's setting scored without the latency table (--baseline-gptq)
            continue
        ax.scatter([p[x]], [y(p)], marker="s", s=46, c="#d9822b", zorder=3)
        ax.annotate(
            p.get("label") or p.get("describe", ""),
            (p[x], y(p)),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
            color="#a0521a",
        )
    c = result.chosen_point
    if c is not None:
        ax.scatter([c[x]], [y(c)], marker="*", s=180, c="#c0392b", zorder=4, label="chosen")
    ax.axvline(result.budget.fraction, color="#c0392b", ls="--", lw=0.8, label=f"budget {result.budget}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"KL to the original (nats/token, {result.stats.get('stage_tokens', ['?'])[-1]} tokens)")
    ax.legend(fontsize=7, **legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def search_report(result) -> Report:
    from .plots import plt  # noqa: F401  (Agg backend set up once)

    if result.settings.get("space") == "sparsity":
        return sparsity_report(result)
    if len(result.settings.get("space", "quant").split(",")) > 1 and "quant" in result.settings["space"]:
        return combined_report(result)
    if result.settings.get("space", "quant") != "quant":
        return structure_report(result)

    c = result.chosen_point
    embedding = result.settings.get("embedding") or "int8"
    rep = Report(
        f"Search: {result.model}",
        subtitle=f"budget {result.budget} — "
        + (c["describe"] if c else "no configuration within the budget")
        + f"; token embedding (and a tied head) {embedding} in every configuration, uniform baselines included",
    )
    sec = rep.section(
        "Summary",
        note=_cost_note(
            result,
            "bytes of the state dict as stored (the counter compress uses), as a fraction of the fp32 model",
        ),
    )
    _summary(
        sec,
        result,
        *_cost_axis(result, "bytes", "bytes / fp32"),
        "float",
        tag=lambda p: f"uniform {p['label']}" if p.get("label") else "front",
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


# -- the structured search (heads, neurons, layers under params=F) --------------------------------------------
def structure_pareto_figure(result):
    """Block parameters kept vs KL: every evaluated point, the front, the uniform baselines, the chosen one."""
    return _pareto(
        result,
        *_cost_axis(result, "params", "block parameters kept / original"),
        probe_note="one unit at its smallest, rest full",
        size=(9.5, 4.6),
        legend={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)},  # outside: labels stay readable
        early_excludes=("sensitivity", "baseline"),
    )


def _cost_note(result, other: str) -> str:
    """The summary's note: what the cost column is (the predicted latency under a latency budget, else
    ``other``), then KL and perplexity."""
    cost = (
        "latency predicted from the measured latency table, as a fraction of the original's (mean of the prefill "
        "and decode ratios)"
        if result.budget.kind == "latency"
        else other
    )
    return f"{cost}; KL on calibration tokens; perplexity on held-out text disjoint from calibration"


def structure_report(result) -> Report:
    from ..compress.search.structure import kept_structure, role_sentence, role_summary
    from .plots import plt  # noqa: F401  (Agg backend set up once)

    c = result.chosen_point
    latency = result.budget.kind == "latency"
    rep = Report(
        f"Search: {result.model} (structure)",
        subtitle=f"budget {result.budget} of the "
        + ("original's measured latency" if latency else "block parameters")
        + " — "
        + (c["describe"] if c else "no configuration within the budget"),
    )
    sec = rep.section(
        "Summary",
        note=_cost_note(
            result,
            "block parameters kept (attention, MLP and norms of the transformer blocks; embeddings and head "
            "excluded) as a fraction of the original",
        )
        + ". Uniform baselines: the same priors, the same amount removed in every layer",
    )
    _summary(
        sec,
        result,
        *_cost_axis(result, "params", "block params kept"),
        "every head, neuron and block",
        tag=lambda p: p.get("label") or "front",
        extra=f"; priors: {result.settings.get('priors')}",
    )
    rep.section(
        "Pareto front",
        note="every evaluated configuration; squares: uniform baselines; star: the chosen configuration "
        "(lowest KL within the budget)",
    ).image(structure_pareto_figure(result), alt="block parameters vs KL")
    if c is None:
        return rep
    k = kept_structure(result, c)
    cols = []
    kinds = {u["kind"] for u in result.units}
    if "attn" in kinds:
        cols.append("heads kept")
    if "mlp" in kinds:
        cols.append("neurons kept")
    if "block" in kinds:
        cols.append("block")
    z, text = [], []
    for i in range(k["n_layers"]):
        row, trow = [], []
        gone = i in k["dropped"]
        for col in cols:
            if col == "heads kept":
                n_all = len((result.priors.get("heads") or [[]])[i]) or 1
                kept = k["heads"][i]
                n = 0 if gone else (n_all if kept is None else len(kept))
                row.append(n / n_all)
                trow.append("—" if gone else f"{n}/{n_all}")
            elif col == "neurons kept":
                f = 0.0 if gone else k["neurons"][i]
                row.append(f)
                trow.append("—" if gone else f"{f:.1%}".replace(".0%", "%"))
            else:
                row.append(0.0 if gone else 1.0)
                trow.append("dropped" if gone else "kept")
        z.append(row)
        text.append(trow)
    rep.section(
        "Architecture map",
        note="the chosen structure per layer: share of heads and MLP neurons kept, blocks dropped (0 = removed)",
    ).heatmap(
        z,
        x_labels=cols,
        y_labels=[str(i) for i in range(k["n_layers"])],
        x_title="choice",
        y_title="layer",
        cell_text=text,
    )

    kept_sec = rep.section(
        "What the search kept",
        note="each head's role from `lmscope heads` on the original (induction: on repeated random tokens; "
        "previous-token, sink = first token, self: on text; a head has a role when its mean attention there "
        f"passes {((result.head_roles or {}).get('threshold') or {})}); the chosen point and the uniform baselines",
    )
    if result.head_roles is not None:
        summary = role_summary(result, c)
        if summary:
            kept_sec.text("Chosen: " + role_sentence(summary) + ".")
            for p in result.baselines():
                if p.get("config"):
                    kept_sec.text(f"{p['label']}: " + role_sentence(role_summary(result, p)) + ".")
            kept_sec.table(
                ["role", "heads", "removed by the search"],
                [[r["role"], ", ".join(r["heads"]), ", ".join(r["removed"]) or "none"] for r in summary],
            )
        else:
            kept_sec.text("No head passes a role threshold in this model.")
    if result.sensitivity:
        names = [u["name"] for u in result.units]
        sens = [result.sensitivity.get(n) for n in names]
        order = sorted(range(len(names)), key=lambda i: -(sens[i] or 0))
        kept_sec.text(
            "Where the parameters went, beside sensitivity (KL to the original when only this unit is at its "
            "smallest level, everything else full, on the first stage's tokens): the search should keep "
            "the sensitive units whole."
        )
        levels = result.unit_levels
        kept_sec.table(
            ["unit", "sensitivity (KL)", "rank", "chosen level", "of its levels"],
            [
                [
                    names[i],
                    f"{sens[i]:.4g}" if sens[i] is not None else "",
                    r + 1,
                    "— (block dropped)"
                    if not names[i].endswith(".block") and int(names[i].split(".")[0]) in k["dropped"]
                    else c["config"][names[i]],
                    " ".join(levels.get(names[i], [])),
                ]
                for r, i in enumerate(order)
            ],
            highlight=list(range(min(5, len(order)))),
        )
    return rep


# -- precision and structure together (quant,heads,neurons[,layers] under bytes=F) ----------------------------
def combined_report(result) -> Report:
    """Pareto plot (bytes vs KL, uniform precision with the full structure and uniform mixes as points), the
    architecture map (per layer: heads kept, neurons kept, block, bits of each kept part) and what the search
    kept (head roles, sensitivities)."""
    from ..compress.search.space import bits_per_weight
    from ..compress.search.structure import kept_structure, role_sentence, role_summary
    from .plots import plt  # noqa: F401  (Agg backend set up once)

    c = result.chosen_point
    rep = Report(
        f"Search: {result.model} (precision and structure)",
        subtitle=f"budget {result.budget} — "
        + (c["describe"] if c else "no configuration within the budget"),
    )
    sec = rep.section(
        "Summary",
        note=_cost_note(
            result,
            "bytes of the state dict as compress stores the model the recipe builds, as a fraction of the fp32 model",
        ),
    )
    _summary(
        sec,
        result,
        *_cost_axis(result, "bytes", "bytes / fp32"),
        "float, every head, neuron and block",
        tag=lambda p: p.get("label") or "front",
    )
    rep.section(
        "Pareto front",
        note="every evaluated configuration; squares: uniform precision with every head and neuron kept "
        "(drawn even over the budget), uniform mixes that fit; star: the chosen configuration",
    ).image(
        _pareto(
            result,
            *_cost_axis(result, "bytes", "bytes / fp32 bytes"),
            probe_note="one unit at its smallest, rest full and float",
            size=(9.5, 4.6),
            legend={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)},
            early_excludes=("sensitivity", "baseline"),
        ),
        alt="bytes vs KL",
    )
    if c is None:
        return rep
    k = kept_structure(result, c)
    qunits = [u for u in result.units if u["kind"].startswith("quant:")]
    qkinds = list(dict.fromkeys(u["kind"][6:] for u in qunits))
    skinds = {u["kind"] for u in result.units}
    cols = (
        (["heads kept"] if "attn" in skinds else [])
        + (["neurons kept"] if "mlp" in skinds else [])
        + (["block"] if "block" in skinds else [])
        + [f"bits: {q}" for q in qkinds]
    )
    z, text = [], []
    for i in range(k["n_layers"]):
        gone = i in k["dropped"]
        row, trow = [], []
        for col in cols:
            if col == "heads kept":
                n_all = len((result.priors.get("heads") or [[]])[i]) or 1
                kept = k["heads"][i]
                n = 0 if gone else (n_all if kept is None else len(kept))
                row.append(n / n_all)
                trow.append("—" if gone else f"{n}/{n_all}")
            elif col == "neurons kept":
                f = 0.0 if gone else k["neurons"][i]
                row.append(f)
                trow.append("—" if gone else f"{f:.1%}".replace(".0%", "%"))
            elif col == "block":
                row.append(0.0 if gone else 1.0)
                trow.append("dropped" if gone else "kept")
            else:
                lv = c["config"].get(
                    next(u["name"] for u in qunits if u["block"] == i and u["kind"] == "quant:" + col[6:])
                )
                row.append(0.0 if gone else bits_per_weight(lv) / 32)
                trow.append("—" if gone else lv)
        z.append(row)
        text.append(trow)
    rep.section(
        "Architecture map",
        note="the chosen point per layer: share of heads and MLP neurons kept, blocks dropped, and the precision of "
        "what is kept (colour: bits per weight / 32, scales included; 0 = removed)",
    ).heatmap(
        z,
        x_labels=cols,
        y_labels=[str(i) for i in range(k["n_layers"])],
        x_title="choice",
        y_title="layer",
        cell_text=text,
        value_range=(0, 1),
    )
    kept_sec = rep.section(
        "What the search kept",
        note="each head's role from `lmscope heads` on the original; sensitivity: KL when only this unit is at "
        "its smallest level (fewest heads / neurons, dropped, or the lowest precision), everything else full and "
        "float, on the first stage's tokens",
    )
    if result.head_roles is not None:
        summary = role_summary(result, c)
        kept_sec.text(
            "Chosen: " + role_sentence(summary) + "." if summary else "No head passes a role threshold here."
        )
    if result.sensitivity:
        names = [u["name"] for u in result.units]
        sens = [result.sensitivity.get(n) for n in names]
        order = sorted(range(len(names)), key=lambda i: -(sens[i] or 0))
        kept_sec.table(
            ["unit", "sensitivity (KL)", "rank", "chosen level", "of its levels"],
            [
                [
                    names[i],
                    f"{sens[i]:.4g}" if sens[i] is not None else "",
                    r + 1,
                    "— (block dropped)"
                    if result.units[i]["block"] in k["dropped"] and not names[i].endswith(".block")
                    else c["config"][names[i]],
                    " ".join(result.unit_levels.get(names[i], [])),
                ]
                for r, i in enumerate(order)
            ],
            highlight=list(range(min(5, len(order)))),
        )
    return rep


# -- the sparsity search (per-block Wanda levels under params=F) ---------------------------------------------
def sparsity_report(result) -> Report:
    """Pareto plot (non-zero block weights vs KL; uniform Wanda levels and OWL as points), the architecture map
    (sparsity per block beside OWL's allocation, the block's outlier ratio and sensitivity)."""
    from .plots import plt  # noqa: F401  (Agg backend set up once)

    c = result.chosen_point
    rep = Report(
        f"Search: {result.model} (sparsity)",
        subtitle=f"{result.sparsity:g} of the block weights zeroed (Wanda per block) — "
        + (c["describe"] if c else "no configuration within the budget"),
    )
    sec = rep.section(
        "Summary",
        note="non-zero weights of the block linears kept, as a fraction of all of them; KL on calibration tokens; "
        "perplexity on held-out text disjoint from calibration. The zeros stay in dense tensors: bytes and "
        "latency do not change",
    )
    _summary(sec, result, "params", "weights kept", "dense", tag=lambda p: p.get("label") or "front")
    rep.section(
        "Pareto front",
        note="every evaluated configuration; squares: uniform Wanda at each level and OWL's allocation "
        "(outlier-rich blocks pruned less); star: the chosen configuration (lowest KL within the budget)",
    ).image(
        _pareto(
            result,
            "params",
            "non-zero block weights / all block weights",
            probe_note="one block at the sparsest level, rest at the densest",
            size=(7.5, 4.6),
            legend={"loc": "upper right"},
        ),
        alt="weights kept vs KL",
    )
    if c is None:
        return rep
    names = [u["name"] for u in result.units]
    chosen = [float(c["config"][n]) for n in names]
    owl = [result.owl.get(n) for n in names]
    ratios = [result.outlier_ratios.get(n) for n in names]
    sens = [result.sensitivity.get(n) for n in names]
    cols = ["sparsity (chosen)", "OWL's sparsity", "outlier ratio (scaled)"]
    hi = max((r for r in ratios if r is not None), default=0) or 1
    z = [[s, o, None if r is None else r / hi] for s, o, r in zip(chosen, owl, ratios)]
    text = [
        [f"{s:.0%}", "" if o is None else f"{o:.1%}", "" if r is None else f"{r:.2%}"]
        for s, o, r in zip(chosen, owl, ratios)
    ]
    if any(v is not None for v in sens):
        cols.append("sensitivity (scaled)")
        top = max(v for v in sens if v is not None) or 1
        for row, trow, v in zip(z, text, sens):
            row.append(None if v is None else v / top)
            trow.append("" if v is None else f"{v:.3g}")
    rep.section(
        "Architecture map",
        note="per block: the chosen Wanda sparsity, OWL's allocation, the block's outlier ratio (share of weights "
        "whose Wanda score passes 5x the layer mean; OWL prunes outlier-rich blocks less) and, with --prior "
        "sensitivity, the KL with only this block at the sparsest level; ratio columns scaled to their maximum",
    ).heatmap(
        z,
        x_labels=cols,
        y_labels=names,
        x_title="per block",
        y_title="block",
        cell_text=text,
        value_range=(0, 1),
    )
    order = sorted(range(len(names)), key=lambda i: chosen[i])
    rep.section(
        "Where the weights went",
        note="blocks from least to most pruned; relative Wanda error: the share of the block's squared Wanda "
        "score the chosen level zeroes",
    ).table(
        ["block", "chosen sparsity", "OWL", "outlier ratio", "relative Wanda error", "sensitivity (KL)"],
        [
            [
                names[i],
                f"{chosen[i]:g}",
                "" if owl[i] is None else f"{owl[i]:.3f}",
                "" if ratios[i] is None else f"{ratios[i]:.4f}",
                f"{result.wanda_error.get(names[i], float('nan')):.4g}",
                "" if sens[i] is None else f"{sens[i]:.4g}",
            ]
            for i in order
        ],
    ).lines(
        [
            {"name": "chosen sparsity", "x": list(range(len(names))), "y": chosen},
            {"name": "OWL", "x": list(range(len(names))), "y": owl},
            {
                "name": "outlier ratio x 10",
                "x": list(range(len(names))),
                "y": [None if r is None else 10 * r for r in ratios],
            },
        ],
        title="per block, in model order",
        x_title="block",
    )
    return rep


def _summary(sec, result, cost: str, cost_title: str, original: str, tag, extra: str = "") -> None:
    """The summary table (every point with a held-out perplexity, by ``cost``; the original first, the chosen
    point highlighted) and the search's cost in one sentence."""
    rows = []
    ref = result.reference_ppl
    key = cost + "_fraction"
    for p in sorted(
        (p for p in result.points if p.get("ppl") is not None), key=lambda p: p.get(key, float("inf"))
    ):
        rows.append(
            [
                "chosen" if p is result.chosen_point else tag(p),
                p["describe"],
                f"{p[key]:.4f}" if key in p else "",
                f"{p['kl']:.4g}",
                f"{p['ppl']:.3f}",
                f"{p['ppl'] / ref - 1:+.1%}" if ref else "",
            ]
        )
    if ref:
        rows.insert(0, ["original", original, "1.0000", "0", f"{ref:.3f}", ""])
    sec.table(
        ["point", "configuration", cost_title, "KL", "held-out ppl", "Δppl"],
        rows,
        highlight=[i for i, r in enumerate(rows) if r[0] == "chosen"],
    )
    s = result.stats
    for line in result._latency_lines():
        sec.text(line + ".")
    sec.text(
        f"{s.get('evaluations')} evaluations ({s.get('computed')} computed in this run, "
        f"{s.get('eval_seconds')} s of fitness), {len(result.points)} configurations, "
        f"{s.get('generations')} generations ({s.get('accepted')} improved the parent); "
        f"KL stages of {s.get('stage_tokens')} tokens; seed {result.settings.get('seed')}{extra}."
    )
