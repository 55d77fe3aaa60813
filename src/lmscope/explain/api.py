"""``explain``: token attributions for one target with a measured faithfulness score per method.

from lmscope.explain.api import explain
res = explain(lm, "When Mary and John went to the store, John gave a drink to", target=" Mary")
res.to_json()          # {tokens, target, methods: {name: {scores, faithfulness, ...}}, ranking, ...}
res.report("out/report.html")
res.steps[0].methods["integrated_gradients"].info["completeness_error"]
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import LmscopeError
from ..views.html import Reportable
from .attribution.base import Attribution, get_method, method_names
from .faithfulness import (
    faithfulness,
    faithfulness_many,
    random_baseline,
    randomized_copy,
    rank_methods,
    spearman,
)
from .targets import Objective, Target, encode_prompt, make_target

#: what `explain` runs when no methods are named: the fast ones (one gradient, one batch of
#: occlusions; seconds on a CPU), each still with faithfulness and the randomization check.
#: ``methods="all"`` runs every registered method.
DEFAULT_METHODS = ("saliency", "input_x_gradient", "occlusion")


@dataclass
class Explanation:
    """Attributions for one target (one generation step)."""

    tokens: list[str]
    special: list[bool]
    target: dict
    methods: dict[str, Attribution]
    ranking: list[str] = field(default_factory=list)
    random_baseline: dict | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    sanity_layers: int | None = None
    #: where the time went (seconds): each method, the faithfulness batch, the randomization check
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "special": self.special,
            "target": self.target,
            "methods": {name: a.to_dict() for name, a in self.methods.items()},
            "ranking": self.ranking,
            "random_baseline": self.random_baseline,
            "skipped": self.skipped,
            "sanity_randomized_top_layers": self.sanity_layers,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class ExplainResult(Reportable):
    """``steps[0]`` explains the next token after the text; with ``generate`` each later step explains
    the next generated token given the text plus the tokens generated before it."""

    model: str
    text: str
    steps: list[Explanation]
    seconds: float = 0.0

    @property
    def first(self) -> Explanation:
        return self.steps[0]

    def to_json(self) -> dict:
        out = {
            "model": self.model,
            "text": self.text,
            **self.first.to_json(),
            "seconds": round(self.seconds, 3),
        }
        if len(self.steps) > 1:
            out["steps"] = [s.to_json() for s in self.steps]
        return _finite(out)

    def write_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, allow_nan=False)

    def build_report(self):
        from ..views.explain import explain_report

        return explain_report(self)


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def resolve_methods(methods) -> list[str]:
    """Method names from a list or a comma-separated string; None: ``DEFAULT_METHODS``; "all": every one."""
    names = method_names()
    if methods is None:
        return [m for m in DEFAULT_METHODS if m in names]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if list(methods) == ["all"]:
        return names
    if not methods:
        raise LmscopeError("no attribution method given", f"use one or more of: {', '.join(names)}")
    for m in methods:
        if m not in names:
            raise LmscopeError(f"unknown attribution method '{m}'", f"use one of: {', '.join(names)}")
    return list(dict.fromkeys(methods))


def explain_objective(
    objective: Objective,
    methods,
    config: dict | None = None,
    faithful: bool = True,
    sanity: bool = True,
    sanity_layers: int | None = None,
    seed: int = 0,
    progress=None,
    share: bool = True,
) -> Explanation:
    """Run ``methods`` on one objective, score each for faithfulness, rank them.

    ``share``: the perturbations of every method's faithfulness curves and of the random baseline run
    as one batch, each distinct perturbed input once, and gradient methods share the gradient at the
    input (``Objective.cache``); ``share=False`` runs each method's on its own (the same numbers up
    to float rounding; kept as the reference the tests compare with)."""
    objective.cache = share
    timings: dict[str, float] = {}
    config = config or {}
    results, skipped = {}, {}
    names = resolve_methods(methods)
    unknown = sorted(set(config) - set(method_names()))
    if unknown:
        raise LmscopeError(
            f"settings given for unknown attribution method(s) {', '.join(map(repr, unknown))}",
            f"key the settings by method name: {', '.join(method_names())}",
        )
    for i, name in enumerate(names):
        method = get_method(name, **config.get(name, {}))
        why = method.supports(objective.lm)
        if why:
            skipped[name] = why
            continue
        if progress:
            progress(i / len(names), f"{name}")
        torch.manual_seed(seed)
        results[name] = method.attribute(objective)
        if faithful and not share and results[name].unit == "token":
            fa = faithfulness(objective, results[name].scores)
            results[name].faithfulness = fa
    t0 = time.perf_counter()
    rand_base = None
    if faithful and share:
        if progress:
            progress(len(names) / (len(names) + 1), "faithfulness")
        scored = [n for n, r in results.items() if r.unit == "token"]
        fas, rand_base = faithfulness_many(
            objective, [results[n].scores for n in scored], random_orders=3, seed=seed
        )
        for n, fa in zip(scored, fas):
            results[n].faithfulness = fa
    elif faithful:
        rand_base = random_baseline(objective, seed=seed)
    timings["faithfulness"] = time.perf_counter() - t0  # share=False: the random baseline only
    t0 = time.perf_counter()
    rand_copy = None
    if sanity and results:
        rand_lm, sanity_layers = randomized_copy(objective.lm, sanity_layers, seed=seed)
        rand_obj = Objective(
            rand_lm,
            objective.ids,
            objective.target,
            objective.baseline,
            objective.exclude_special,
            objective.batch_size,
            cache=share,
        )
        for name, res in results.items():
            if res.unit != "token":
                continue
            torch.manual_seed(seed)
            other = get_method(name, **config.get(name, {})).attribute(rand_obj)
            fa = res.faithfulness if res.faithfulness is not None else {}
            fa["randomization_spearman"] = spearman(res.scores, other.scores)
            res.faithfulness = fa
        rand_copy = sanity_layers
        del rand_lm, rand_obj
    timings["sanity"] = time.perf_counter() - t0
    timings.update({f"method:{n}": r.seconds for n, r in results.items()})
    ranked = rank_methods(results, rand_base)  # flagged methods rank after the unflagged ones
    return Explanation(
        tokens=objective.tokens,
        special=objective.special,
        target=objective.describe(),
        methods=results,
        ranking=ranked,
        random_baseline=rand_base,
        skipped=skipped,
        sanity_layers=rand_copy,
        timings=timings,
    )


def explain(
    lm,
    text: str,
    target: str | None = None,
    contrast: str | None = None,
    pair: str | None = None,
    methods=DEFAULT_METHODS,
    baseline: str = "pad",
    steps: int | None = None,
    generate: int = 0,
    chat: bool = False,
    exclude_special: bool = False,
    faithful: bool = True,
    sanity: bool = True,
    seed: int = 0,
    config: dict | None = None,
    truncate: bool = False,
    progress=None,
    share: bool = True,
    target_label=None,
    contrast_label=None,
) -> ExplainResult:
    """Explain ``lm``'s output on ``text``.

    target/contrast: one token each (``None``: the model's top prediction); pair: encoders only, the
    second text of a cosine similarity; target_label/contrast_label: sequence classifiers only, a class
    name or index (``None``: the predicted class). methods: names or a comma-separated string (None: the fast
    ``DEFAULT_METHODS``; "all": every registered method). share: see ``explain_objective``.
    baseline: pad | eos | zero | mask (the "absent token" for IG, occlusion, SHAP and faithfulness).
    steps: uniform IG steps (None: adaptive until the completeness error ≤ 1%). generate: explain
    each of N greedily generated tokens. config: per-method settings, e.g.
    ``{"integrated_gradients": {"max_steps": 256}}``. sanity: model-randomization check.
    """
    t0 = time.perf_counter()
    if generate < 0:
        raise LmscopeError("--generate must be 0 or more", "e.g. --generate 3")
    if generate and (target is not None or contrast is not None or not lm.is_causal):
        raise LmscopeError(
            "--generate explains each generated token; it cannot take --target/--contrast (or an encoder)",
            "drop --target/--contrast, or drop --generate",
        )
    resolve_methods(methods)
    config = {k: dict(v) for k, v in (config or {}).items()}
    if steps is not None:
        if steps < 1:
            raise LmscopeError(f"--steps must be positive, got {steps}", "e.g. --steps 64")
        config.setdefault("integrated_gradients", {})["steps"] = steps
    tgt = make_target(lm, target, contrast, pair, target_label, contrast_label)
    ids = encode_prompt(lm, text, chat=chat, truncate=truncate)
    out = []
    for step in range(max(1, generate)):
        objective = Objective(lm, ids, tgt if step == 0 else Target(kind="token"), baseline, exclude_special)
        out.append(
            explain_objective(
                objective,
                methods,
                config,
                faithful=faithful,
                sanity=sanity and step == 0,
                seed=seed,
                progress=progress,
                share=share,
            )
        )
        if generate:
            ids = torch.cat([ids, torch.tensor([objective.target.token_id])])
    return ExplainResult(model=lm.name, text=text, steps=out, seconds=time.perf_counter() - t0)
