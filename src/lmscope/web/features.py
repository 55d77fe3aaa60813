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
    files: dict | None = None  # more downloads: {file name: (bytes, media type)}


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
    report = result.build_report()
    if not any(sec.title.startswith("Structure") for sec in report.sections):
        from ..compress.structure import structure_diff

        structure_diff(original, compressed).add_to(report, changed_only=True)
    return Result(view={"report": report.data()}, report=report, data=result.to_dict(), name="compare")


# -- Audit ----------------------------------------------------------------------------------------------
#: the files an audit job offers for download, in the order the page lists them (what ``lmscope audit`` writes)
AUDIT_FILES = {
    "report.html": "text/html; charset=utf-8",
    "audit.json": "application/json",
    "cases.csv": "text/csv; charset=utf-8",
}


def audit(ctx: JobContext, lm, data_path, data_name: str, folder, options: dict) -> Result:
    """``lmscope audit`` on an uploaded file: ``options`` are ``lmscope.audit.audit``'s keyword arguments.
    The outputs are written by the audit's own writer into ``folder`` (the upload's temporary folder, which
    the server removes after the job) and kept in memory for download."""
    from pathlib import Path

    from ..audit import audit as run_audit

    def progress(done: int, total: int | None, rate: float) -> None:  # per batch: cancel lands there
        line = f"{done}" + (f"/{total}" if total else "") + f" cases, {rate:.2f} cases/s"
        if total and rate > 0:
            line += f", ETA {(total - done) / rate:.0f} s"
        ctx.progress(0.02 + 0.9 * (done / total if total else 0), line)

    ctx.progress(0.01, "reading the cases")
    result = run_audit(lm, str(data_path), progress=progress, **options)
    # name the uploaded file, not the temporary folder it sat in (the size and sha256 identify it)
    result.data["path"] = data_name
    for source in result.data["fingerprint"]["sources"]:
        source["path"] = data_name
    ctx.progress(0.95, "writing audit.json, cases.csv and report.html")
    out = Path(folder) / "audit"
    result.write(out, report=False)
    report = result.build_report()
    report.write(out / "report.html")
    files = {name: ((out / name).read_bytes(), kind) for name, kind in AUDIT_FILES.items()}
    view = {"report": report.data(), "findings": result.findings, "n_cases": result.data["n_cases"]}
    return Result(view=view, files=files, name="audit")


def swap_lists() -> list[str]:
    """The built-in counterfactual swap lists the Audit tab offers."""
    from ..audit.counterfactuals import builtin_names

    return builtin_names()


# -- Features (sparse dictionaries) ---------------------------------------------------------------------
@dataclass
class DictionaryEntry:
    """A dictionary the server was started with (``--sae DIR``) and its scored explanations, if any."""

    id: str
    sae: Any  # lmscope.features.Dictionary
    folder: str
    explanations: dict | None = None  # explanations.json of ``lmscope features explain`` for this dictionary

    def __post_init__(self):
        units = (self.explanations or {}).get("units", [])
        self._by_unit = {int(u["unit"]): u for u in units}

    def explained(self, unit: int) -> dict | None:
        return self._by_unit.get(int(unit))

    def describe(self) -> dict:
        c = self.sae.cfg
        return {
            "id": self.id,
            "kind": c.kind,
            "site": c.site,
            "out_site": c.out_site,
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "k": c.k,
            "explained": len(self._by_unit),
        }


def load_dictionary(folder, explanations=None, id: str | None = None) -> DictionaryEntry:
    """A dictionary folder and its explanations: ``explanations`` (a folder holding explanations.json, or the
    file), else an explanations.json inside the dictionary folder; refused if they are another dictionary's."""
    import json
    from pathlib import Path

    from ..errors import LmscopeError
    from ..features import load

    sae = load(folder)
    folder = Path(folder).expanduser()
    path = Path(explanations).expanduser() if explanations else folder / "explanations.json"
    if path.is_dir():
        path = path / "explanations.json"
    data = None
    if explanations or path.is_file():
        if not path.is_file():
            raise LmscopeError(
                f"'{path}' does not exist", "pass the --out folder of lmscope features explain --sae"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            units = data["units"]
            bad = [u["unit"] for u in units if not 0 <= int(u["unit"]) < sae.d_sae]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LmscopeError(
                f"'{path}' is not an explanations.json ({type(e).__name__})",
                "pass the --out folder of lmscope features explain",
            ) from None
        if data.get("kind") != "latents" or data.get("site") != sae.cfg.site or bad:
            raise LmscopeError(
                f"'{path}' explains {data.get('kind')} at {data.get('site')}, not this dictionary's "
                f"{sae.d_sae} latents at {sae.cfg.site}",
                "pass the explanations made with lmscope features explain --sae for this dictionary",
            )
    return DictionaryEntry(id or folder.resolve().name, sae, str(folder), data)


def _explanation(entry: DictionaryEntry, unit: int) -> dict:
    """What the page shows beside a feature: its scored explanation, or nothing (never an unscored one)."""
    item = entry.explained(unit)
    if item is None:
        return {"unit": unit}
    return {
        "unit": unit,
        "explanation": item["explanation"],
        "scores": item["scores"],
        "random_baseline": item.get("random_baseline"),
    }


def sae_features(ctx: JobContext, lm, entry: DictionaryEntry, text: str, top: int = 5) -> Result:
    """The dictionary's features on each token of ``text``: the ``top`` active on each token, and every
    feature active anywhere, strongest first, with its explanation and scores when the dictionary has them."""
    from ..features import active_features

    site = entry.sae.cfg.site
    ctx.progress(0.1, f"running the model to {site} and encoding with the dictionary")
    # the same numbers as inspect --sae; position 0 (the attention sink) is never encoded, as in training
    found = active_features(lm, entry.sae, text, top=top, max_features=64)
    per_token = [[[f["feature"], round(f["activation"], 4)] for f in row] for row in found.per_token]
    listed = [
        _explanation(entry, f["feature"])
        | {"max": round(f["peak"], 4), "n_tokens": f["tokens_active"], "at": f["peak_token"]}
        for f in found.features
    ]
    view = {
        "dictionary": entry.id,
        "site": site,
        "tokens": found.tokens,
        "per_token": per_token,
        "features": listed,
        "explanations": {
            str(u): _explanation(entry, u) for tok in per_token for u, _ in tok if entry.explained(u)
        },
        "has_explanations": entry.explanations is not None,
        "l0": round(sum(found.l0[1:]) / max(len(found.l0) - 1, 1), 2),
    }
    return Result(view=view, data=view, name="features")


def sae_feature(ctx: JobContext, lm, entry: DictionaryEntry, unit: int) -> Result:
    """One feature's dashboard: views/features.py's (explanation and scores beside a random explanation's,
    histogram, top contexts, logits, nearest) when explanations.json has it; else what the dictionary alone
    tells: the tokens its decoder direction promotes and suppresses, and its nearest features."""
    import torch

    from ..features.pipeline import _directions, logit_effects
    from ..views.features import features_html
    from ..views.html import Report

    item = entry.explained(unit)
    title = f"{lm.name} · {entry.id} · feature {unit}"
    if item is not None:
        ctx.progress(0.5, "building the dashboard")
        html = features_html({**entry.explanations, "units": [item]}, title=f"lmscope features: {title}")
        return Result(
            view={"unit": unit, "dashboard": html},
            files={f"feature-{unit}.html": (html.encode("utf-8"), "text/html; charset=utf-8")},
            name=f"feature-{unit}",
        )
    ctx.progress(0.3, "decoder direction through the unembedding")
    sae = entry.sae
    effects = logit_effects(lm, _directions(lm, sae, sae.cfg.site, [unit]))
    with torch.no_grad():
        w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
        cos = w @ w[unit]
        cos[unit] = -2
        near = cos.topk(min(5, w.shape[0] - 1))
    report = Report(f"lmscope: {title}", "no scored explanation for this feature")
    sec = report.section(
        f"Feature {unit}",
        "this dictionary has no scored explanation for it (run lmscope features explain --sae on it); "
        "what its decoder direction does:",
    )
    eff = effects[0] if effects else {}
    if eff:
        sec.table(["promotes", "logit"], [[repr(t), round(v, 3)] for t, v in eff["promoted"]])
        sec.table(["suppresses", "logit"], [[repr(t), round(v, 3)] for t, v in eff["suppressed"]])
    sec.table(
        ["nearest feature", "cosine"],
        [[int(i), round(float(v), 3)] for v, i in zip(near.values, near.indices)],
    )
    data = {
        "unit": unit,
        "logits": eff,
        "nearest": [[int(i), float(v)] for v, i in zip(near.values, near.indices)],
    }
    return Result(
        view={"unit": unit, "report": report.data()}, report=report, data=data, name=f"feature-{unit}"
    )
