"""What each tab of the page runs: thin job functions over the public lmscope API (no analysis here).

Each returns a ``Result``: ``view`` is the JSON the page draws (``Report.data()`` sections rendered by
lmscope.js), ``report`` and ``data`` are the downloads — the same report.html / JSON the CLI writes.
Explain, Heads and Compare call the explain / compress packages, imported when a job first needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .jobs import JobContext


def inspect_capture(lm) -> list[str]:
    """What the Inspect tab records: patterns, residuals, MLP neurons (router choices for a mixture of
    experts) and the logits of a causal LM."""
    names = ["blocks.*.attn.pattern", "blocks.*.resid_post"]
    names.append("blocks.*.mlp.router" if lm.family.moe else "blocks.*.mlp.hidden")
    return names + (["logits"] if lm.is_causal else [])


@dataclass
class Result:
    """A finished job: ``view`` is what the page draws; ``report`` / ``data`` are the downloads."""

    view: dict
    report: Any = None  # views.html.Report, downloaded as report.html
    data: dict | None = None  # downloaded as result.json
    name: str = "result"


def status() -> dict:
    """What the page's tabs offer (every tab is part of every build); Explain lists its methods."""
    methods = explain_methods()
    return {
        "explain": {
            "available": True,
            "reason": None,
            "methods": methods,
            "default_methods": [m for m in FAST_METHODS if m in methods],
        },
        "heads": {"available": True, "reason": None},
        "compare": {"available": True, "reason": None},
    }


#: checked on the page at start: one forward+backward or one pass per token each, seconds on CPU
#: (all methods with the sanity check take minutes on a 135M model)
FAST_METHODS = ("saliency", "input_x_gradient", "occlusion")


def explain_methods() -> list[str]:
    from ..explain.attribution.base import method_names

    return method_names()


# -- Inspect ---------------------------------------------------------------------------------------
def inspect(ctx: JobContext, lm, text: str) -> Result:
    """The inspect report (attention, activations, logit lens) and run.json, as ``lmscope inspect`` writes."""
    from ..views.report import build_inspect_report, inspect_summary

    ctx.progress(0.05, "running the model")
    run = lm.run(text, capture=inspect_capture(lm))
    ctx.progress(0.6, "building the views")
    report = build_inspect_report(run)
    ctx.progress(0.9, "summarising")
    data = inspect_summary(run)
    return Result(
        view={"report": report.data(), "tokens": run.tokens(0)}, report=report, data=data, name="inspect"
    )


def pattern(ctx: JobContext, lm, text: str, layer: int, head: int) -> Result:
    """One head's attention on ``text``: the attention explorer opened at ``layer``/``head``."""
    from ..views.attention import attention_widget
    from ..views.html import Report

    ctx.progress(0.1, f"attention of layer {layer}, head {head}")
    run = lm.run(text, capture=["blocks.*.attn.pattern"])
    widget = attention_widget(run, layer=layer, head=head)
    report = Report(f"lmscope: {lm.name} layer {layer} head {head}")
    report.section(f"Layer {layer}, head {head}", "attention pattern on the current text").add(widget)
    return Result(
        view={"report": report.data(), "layer": layer, "head": head}, report=report, name=f"L{layer}H{head}"
    )


# -- Explain / Heads / Compare (other packages' public API) -------------------------------------------
def explain(
    ctx: JobContext,
    lm,
    text: str,
    target=None,
    contrast=None,
    pair=None,
    methods=None,
    generate: int = 0,
    sanity: bool = False,
) -> Result:
    """Token attributions per method with the faithfulness ranking (``lmscope explain``). With
    ``generate`` > 0, one step per greedily generated token; the page picks the step to show."""
    from ..explain.api import explain as run_explain

    def progress(fraction: float, message: str) -> None:  # called between methods: cancel lands there
        ctx.progress(0.02 + 0.93 * fraction, f"attribution: {message}")

    ctx.progress(0.01, "preparing")
    result = run_explain(
        lm,
        text,
        target=target,
        contrast=contrast,
        pair=pair,
        methods=methods,
        generate=generate,
        sanity=sanity,
        progress=progress,
    )
    ctx.progress(0.97, "building the views")
    report = result.build_report()
    data = report.data()
    steps = []
    for k, step in enumerate(result.steps):
        prefix = f"Step {k + 1}: " if len(result.steps) > 1 else ""
        sections = [
            dict(sec, title=sec["title"][len(prefix) :])
            for sec in data["sections"]
            if sec["title"].startswith(prefix)
        ]
        steps.append(
            {
                "target": step.target.get("token"),
                "description": step.target.get("description"),
                "ranking": step.ranking,
                "sections": sections,
            }
        )
    view = {"title": data["title"], "subtitle": data["subtitle"], "steps": steps}
    return Result(view=view, report=report, data=result.to_json(), name="explain")


def heads(ctx: JobContext, lm, text: str | None, approx: str | None = None) -> Result:
    """Importance and characterization of every head (``lmscope heads``), on ``text`` or the built-in text."""
    from ..explain.heads import analyze_heads
    from ..views.heads import heads_report

    def progress(done: int, total: int) -> None:
        message = f"ablating heads: layer {done} of {total}"
        if done == total:  # what follows reports no progress of its own
            message = "gradient importance and attention patterns"
        ctx.progress(0.05 + 0.85 * done / total, message)

    ctx.progress(0.02, "scoring heads")
    scores = analyze_heads(lm, text, progress=progress, approx=approx)
    ctx.progress(0.95, "building the views")
    report = heads_report(scores, f"Heads: {lm.name}")
    source = "the text above" if text is not None else "the built-in text"
    return Result(
        view={"report": report.data(), "scored_on": source},
        report=report,
        data=scores.to_json(),
        name="heads",
    )


def dla(ctx: JobContext, lm, text: str, target=None, contrast=None) -> Result:
    """Direct logit attribution of the target on ``text`` (``lmscope dla``)."""
    from ..explain.dla import dla as run_dla

    ctx.progress(0.05, "decomposing the logit")
    result = run_dla(lm, text, target=target, contrast=contrast)
    report = result.build_report()
    return Result(view={"report": report.data()}, report=report, data=result.to_json(), name="dla")


def compare(ctx: JobContext, original, compressed, text: str) -> Result:
    """Original vs compressed on ``text`` (``lmscope compare``): attention divergence, attribution
    agreement, logit-lens drift and the structure diff."""
    from ..compress.compare import compare as run_compare

    ctx.progress(0.05, f"comparing {original.name} with {compressed.name}")
    result = run_compare(original, compressed, text)
    ctx.progress(0.8, "building the views")
    report = result.report()
    if not any(sec.title.startswith("Structure") for sec in report.sections):
        from ..compress.structure import structure_diff

        structure_diff(original, compressed).add_to(report, changed_only=True)
    return Result(view={"report": report.data()}, report=report, data=result.to_dict(), name="compare")
