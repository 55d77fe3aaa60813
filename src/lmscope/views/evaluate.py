"""Rendering of ``lmscope.compress.evaluate.Evaluation``: the terminal table, the ratio figure, the HTML report.

Speed and memory columns and charts appear only when they were measured (not with ``--no-latency``).
"""

from __future__ import annotations

from ..compress.size import human_bytes

QUALITY_COLUMNS = ("model", "params", "bytes", "ppl", "Δppl", "top-1 agree", "KL")
CLASSIFIER_COLUMNS = ("model", "params", "bytes", "accuracy", "label agree", "class KL")
LATENCY_COLUMNS = ("peak mem", "prefill tok/s", "decode tok/s")


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _ratio(v, ref):
    return f" ({v / ref:.2f}x)" if v and ref else ""


def measured_latency(ev) -> bool:
    return bool(ev.settings.get("latency"))


def is_classifier(ev) -> bool:
    return ev.settings.get("task") == "classifier"


def columns(ev) -> list[str]:
    quality = CLASSIFIER_COLUMNS if is_classifier(ev) else QUALITY_COLUMNS
    return list(quality) + (list(LATENCY_COLUMNS) if measured_latency(ev) else [])


def rows(ev) -> list[list[str]]:
    ref = ev.models[0]
    out = []
    for m in ev.models:
        dppl = (
            f"{100 * (m.perplexity / ref.perplexity - 1):+.2f}%"
            if m.perplexity is not None and ref.perplexity
            else "-"
        )
        row = [
            m.name,
            f"{m.params / 1e6:.2f}M",
            human_bytes(m.bytes) + ("" if m.bytes_source == "disk" else "*"),
        ]
        if is_classifier(ev):
            row += [_fmt(m.accuracy, "{:.2%}"), _fmt(m.top1_agreement, "{:.2%}"), _fmt(m.kl, "{:.4f}")]
        else:
            row += [
                _fmt(m.perplexity, "{:.3f}"),
                dppl,
                _fmt(m.top1_agreement, "{:.2%}"),
                _fmt(m.kl, "{:.4f}"),
            ]
        if measured_latency(ev):
            row += [
                human_bytes(m.peak_memory_bytes),
                _fmt(m.prefill_tokens_per_s, "{:.0f}")
                + (_ratio(m.prefill_tokens_per_s, ref.prefill_tokens_per_s) if m is not ref else ""),
                _fmt(m.decode_tokens_per_s, "{:.1f}")
                + (_ratio(m.decode_tokens_per_s, ref.decode_tokens_per_s) if m is not ref else ""),
            ]
        out.append(row)
    return out


def notes(ev) -> list[str]:
    s = ev.settings
    if is_classifier(ev):
        what = (
            f"{s['labelled_cases']} labelled texts"
            if s.get("labelled_cases")
            else f"{s['windows']} windows of {s['text_source']}"
        )
        lines = [f"decisions on {what}; label agreement and class KL vs {ev.models[0].name}"]
    else:
        lines = [
            f"perplexity on {s['eval_tokens']} tokens ({s['windows']} windows x {s['window_tokens']}) of "
            f"{s['text_source']}; KL and agreement vs {ev.models[0].name}"
        ]
    if any(m.bytes_source != "disk" for m in ev.models):
        lines.append("* bytes of the in-memory state dict (not saved on disk)")
    if measured_latency(ev):
        lines.append(
            f"prefill: {s['prefill_tokens']} tokens, batch 1, median of {s['repeats']} (models timed in turn); "
            f"decode: {s['decode_tokens']} greedy steps with the KV cache after an untimed prefill, same way; "
            f"torch threads {s['threads']}"
        )
        lines.append(f"peak mem: {s['memory_method']}")
    else:
        lines.append("speed and memory not measured (--no-latency)")
    for m in ev.models:
        for n in m.notes:
            lines.append(f"{m.name}: {n}")
    return lines


def text(ev) -> str:
    table = [columns(ev), *rows(ev)]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = [
        "  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))) for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *notes(ev)])


def figure(ev):
    """Bars relative to the reference: perplexity and bytes, and prefill/decode speed when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = ev.models[0]
    first = ("label agreement", "top1_agreement") if is_classifier(ev) else ("perplexity", "perplexity")
    metrics = [first, ("bytes", "bytes")]
    if measured_latency(ev):
        metrics += [("prefill tok/s", "prefill_tokens_per_s"), ("decode tok/s", "decode_tokens_per_s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
    names = [m.name for m in ev.models]
    for ax, (title, attr) in zip(axes, metrics, strict=True):
        base = getattr(ref, attr)
        vals = [(getattr(m, attr) or 0) / base if base else 0 for m in ev.models]
        ax.bar(range(len(vals)), vals, color=["#888"] + ["#3b7dd8"] * (len(vals) - 1))
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xticks(range(len(vals)), [n[:14] for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{title} (x reference)", fontsize=9)
    fig.tight_layout()
    return fig


def report(ev):
    """The self-contained HTML report (a ``views.html.Report``)."""
    from .html import Report

    rep = Report("Evaluate: " + " vs ".join(m.name for m in ev.models), subtitle=ev.settings["text_source"])
    sec = rep.section("Before / after", note="first row is the reference; Δ and ratios are against it")
    sec.table(columns(ev), rows(ev), highlight=list(range(1, len(ev.models))))
    for line in notes(ev):
        sec.text(line)
    plot = rep.section("Relative to the reference")
    if is_classifier(ev):
        plot.bars(
            [m.name for m in ev.models], [m.top1_agreement or 0 for m in ev.models], title="label agreement"
        )
    else:
        plot.bars([m.name for m in ev.models], [m.perplexity or 0 for m in ev.models], title="perplexity")
    plot.image(figure(ev), alt="ratios vs reference")
    return rep
