"""``lmscope search``: find a per-layer compression (which precision each block's projections get) under a
budget, instead of one uniform setting, and show what the search kept.

``space`` (units and levels, the recipe a configuration stands for), ``levels`` (the level database: every
variant built once, candidates assembled by swapping modules), ``fitness`` (staged KL to the original,
held-out perplexity), ``strategy`` (EvoPress-style evolution), ``store`` (optuna storage: every evaluation,
``--resume``). ``search(lm, "bytes=0.16")`` returns a ``SearchResult``; ``result.write(out)`` writes
pareto.json, recipe.json and report.html.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LmscopeError
from .space import DEFAULT_LEVELS, LEVELS, Budget, QuantSpace, bits_per_weight, fp32_bytes, parse_spaces

__all__ = ["LEVELS", "Budget", "QuantSpace", "SearchResult", "bits_per_weight", "pareto_front", "search"]

STORE_FILE = "search.db"


def pareto_front(points: list[dict], cost: str = "bytes") -> list[int]:
    """Indices of the points no other point beats on both ``cost`` (bytes, latency_fraction) and KL (lower is
    better for both)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][cost], points[i]["kl"]))
    front, best = [], float("inf")
    for i in order:
        if points[i]["kl"] < best:
            front.append(i)
            best = points[i]["kl"]
    return front


@dataclass
class SearchResult:
    """Every evaluated configuration (``points``), the chosen one, baselines, sensitivities and settings."""

    model: str
    budget: Budget
    budget_bytes: int
    reference_bytes: int
    reference_params: int
    units: list[dict]
    levels: list[str]
    points: list[dict]
    chosen: int | None
    sensitivity: dict[str, float]
    settings: dict
    stats: dict = field(default_factory=dict)
    reference_ppl: float | None = None
    space: object = None  # the QuantSpace (for recipes); not serialized

    @property
    def chosen_point(self) -> dict | None:
        return None if self.chosen is None else self.points[self.chosen]

    def chosen_config(self) -> tuple[str, ...]:
        p = self.chosen_point
        if p is None:
            raise LmscopeError("the search evaluated no configuration within the budget", "raise --max-evals")
        return tuple(p["config"][u["name"]] for u in self.units)

    def recipe(self):
        return self.space.recipe(self.chosen_config())

    def baselines(self) -> list[dict]:
        return [p for p in self.points if p.get("origin") == "uniform" or p.get("baseline")]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "budget": {
                "kind": self.budget.kind,
                "fraction": self.budget.fraction,
                "bytes": self.budget_bytes,
            },
            "reference": {
                "bytes_fp32": self.reference_bytes,
                "params": self.reference_params,
                "ppl": self.reference_ppl,
            },
            "units": self.units,
            "levels": self.levels,
            "chosen": self.chosen,
            "sensitivity": self.sensitivity,
            "settings": self.settings,
            "stats": self.stats,
            "points": self.points,
        }

    def to_text(self) -> str:
        size = (
            "of the original's measured latency"
            if self.budget.kind == "latency"
            else f"= {self.budget_bytes / 2**20:.2f} MB"
        )
        header = f"search {self.model}: budget {self.budget} {size}"
        if self.settings.get("embedding", "int8") != "int8":
            header += f", token embedding {self.settings['embedding']} in every configuration"
        where = lambda p: f"{p['bytes_fraction']:.4f} of fp32"  # noqa: E731
        return "\n".join(self._text(header, "bytes", where, 16, built=True) + self._latency_lines())

    def _latency_lines(self) -> list[str]:
        """Under a latency budget: the chosen point's predicted latency beside its measurement on the model
        ``compress`` builds from the recipe, and where the table came from."""
        m, t, c = self.stats.get("chosen_measured"), self.stats.get("latency_table") or {}, self.chosen_point
        if not m or c is None:
            return []
        predicted = m.get("predicted_fraction", c.get("latency_fraction"))
        lines = [
            f"chosen latency: predicted {predicted:.3f} of the original (prefill {c['prefill_s'] * 1e3:.1f} ms, "
            f"decode {c['decode_s'] * 1e3:.2f} ms), measured {m['latency_fraction']:.3f} (prefill "
            f"{m['prefill_s'] * 1e3:.1f} ms, decode {m['decode_s'] * 1e3:.2f} ms) on the model the recipe builds"
            + (
                f", the original timed back to back ({m['reference_prefill_s'] * 1e3:.1f} ms, "
                f"{m['reference_decode_s'] * 1e3:.2f} ms; median of {len(m['rounds'])} rounds)"
                if "rounds" in m
                else ""
            )
        ]
        if t:
            lines.append(
                "latency table: "
                + (f"{t['timings']} whole-model timings" if t.get("timings") else "per-unit timings")
                + (f", grid of {t['grid']} kept sizes per kind" if t.get("grid") else "")
                + f", {t.get('threads')} threads, {t.get('cpu')}"
                + (f", cached at {t['path']}" if t.get("path") else "")
            )
        return lines

    def _text(self, header: str, key: str, where, width: int, built: bool = False, reference="original"):
        """The lines every search prints: header, cost, then each point with held-out perplexity, sorted by
        ``key``; ``where(point)`` says where the point sits (its size, sparsity, ...)."""
        s = self.stats
        cost = (
            f"evaluations: {s.get('evaluations')} ({s.get('computed')} computed here, "
            f"{s.get('eval_seconds', 0):.0f} s), {len(self.points)} configurations"
        )
        if built:
            cost += f", level variants built: {s.get('variants_built')}"
        ref = self.reference_ppl
        lines = [
            header,
            cost,
            f"held-out perplexity ({reference} {ref:.3f}):" if ref else "held-out perplexity:",
        ]
        for p in sorted((p for p in self.points if p.get("ppl") is not None), key=lambda p: p[key]):
            tag = "chosen" if p is self.chosen_point else p.get("label") or p.get("origin", "")
            change = f" ({p['ppl'] / ref - 1:+.1%})" if ref else ""
            lines.append(f"  {tag:<{width}} {where(p)}  KL {p['kl']:.4f}  ppl {p['ppl']:.3f}{change}")
        return lines

    def report(self, path=None) -> str:
        from ...views.search import search_report

        rep = search_report(self)
        if path is not None:
            rep.write(path)
        return rep.render()

    def write(self, out: str | os.PathLike) -> Path:
        """pareto.json, recipe.json (when a point was chosen) and report.html, each replaced atomically."""
        from ...fsutil import atomic_directory

        out = Path(out)
        with atomic_directory(out) as tmp:
            (tmp / "pareto.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
            if self.chosen is not None:
                self.recipe().to_json(tmp / "recipe.json")
            self.report(tmp / "report.html")
        return out


def search(
    lm,
    budget: str | Budget = "bytes=0.16",
    space: str = "quant",
    *,
    levels=DEFAULT_LEVELS,
    granularity: str = "kind",
    embedding: str = "int8",
    calibration_text: str | None = None,
    calibration_tokens: int = 512,
    window: int = 64,
    stages: int = 3,
    heldout_text: str | None = None,
    heldout_tokens: int = 1024,
    max_evals: int = 200,
    time_limit: float | None = None,
    seed: int = 0,
    offspring: int = 8,
    prior: str = "sensitivity",
    finalists: int = 3,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    max_cache_bytes: int = 2 << 30,
    on_eval=None,
    before_store=None,
    baselines: dict | None = None,
    simulate: bool = False,
    structure: dict | None = None,
    latency_table: str | os.PathLike | None = None,
    ray: str | None = None,
    workers: int = 2,
) -> SearchResult:
    """Search per-unit precision levels for ``lm`` under ``budget`` (e.g. ``"bytes=0.16"``: bytes of the
    state dict as a fraction of the fp32 model). ``store``: an SQLite file for the optuna storage (``--resume``
    continues from it). ``"latency=0.9"``: the mean of the prefill and decode ratios to the original, from a
    per-unit latency table measured on this machine (cached; ``latency_table``: a given table file).
    ``ray``: "auto" (a local runtime) or a cluster address: candidates are scored on ``workers`` Ray actors
    (same results as in-process). ``embedding``: the token embedding + tied head in every configuration,
    "int8" or an int4 level ("gptq4-g32": GPTQ on the head's inputs), leaving its bytes to the blocks, or "float"
    (as in the original model, its fp32 bytes counted; latency tables are measured with it); GPTQ
    levels and a GPTQ embedding use the calibration ``compress`` uses (8 x 256 tokens of the same text).
    Bad inputs raise ``LmscopeError`` before any output exists."""
    from ..calibration import default_calibration_text
    from ..evaluate import evaluation_text
    from .fitness import KLFitness, heldout_windows, perplexity
    from .levels import LevelDatabase
    from .store import _optuna
    from .strategy import Evolution, check_budget, evolve

    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    spaces = parse_spaces(space)
    for name, value, low in (("max_evals", max_evals, 1), ("calibration_tokens", calibration_tokens, 2)):
        if not isinstance(value, int) or value < low:
            raise LmscopeError(f"{name} must be an integer >= {low}, got {value!r}", f"e.g. {name} 100")
    if prior not in ("sensitivity", "error", "priors"):
        raise LmscopeError(f"unknown prior '{prior}'", "use sensitivity, error or priors (structured spaces)")
    from .structure import STRUCT_SPACES

    # what every kind of search takes alike (its data, bounds, strategy and storage)
    run = dict(
        calibration_text=calibration_text,
        calibration_tokens=calibration_tokens,
        window=window,
        stages=stages,
        heldout_text=heldout_text,
        heldout_tokens=heldout_tokens,
        max_evals=max_evals,
        time_limit=time_limit,
        seed=seed,
        offspring=offspring,
        prior=prior,
        finalists=finalists,
        store=store,
        resume=resume,
        on_eval=on_eval,
        before_store=before_store,
    )
    if set(spaces) <= set(STRUCT_SPACES):  # heads, neurons, layers: the structured search
        from .structure import search_structure

        return search_structure(
            lm,
            budget,
            spaces,
            **run,
            ray=ray,
            workers=workers,
            latency_table=latency_table,
            **(structure or {}),
        )
    if "quant" in spaces and len(spaces) > 1 and set(spaces) - {"quant"} <= set(STRUCT_SPACES):
        from .combined import search_combined  # precision and structure together, bytes=F or latency=F

        return search_combined(
            lm,
            budget,
            spaces,
            levels=levels,
            granularity=granularity,
            embedding=embedding,
            **run,
            simulate=simulate,
            max_cache_bytes=max_cache_bytes,
            latency_table=latency_table,
            ray=ray,
            workers=workers,
            **(structure or {}),
        )
    if prior == "priors":
        raise LmscopeError(
            "prior 'priors' (head, neuron and block priors) applies to the structured spaces",
            "use prior sensitivity or error with --space quant",
        )
    if spaces != ("quant",):
        raise LmscopeError(
            f"search space '{','.join(spaces)}' cannot be searched in one run",
            "use --space quant, heads,neurons,layers, or quant,heads,neurons,layers",
        )
    if budget.kind not in ("bytes", "latency"):
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to the quantization space",
            "use --budget bytes=FRACTION or latency=FRACTION",
        )
    _optuna()  # a missing extra fails before any work
    qspace = QuantSpace(lm, levels, granularity, embedding)
    reference_bytes = fp32_bytes(lm.model)
    budget_bytes = int(budget.fraction * reference_bytes)
    table = cost = None
    if latency_table is not None or budget.kind == "latency":
        from .latency import LatencyCost, LatencyTable

        table = LatencyTable.cached(lm, qspace, latency_table)
    if budget.kind == "latency":
        cost = LatencyCost(table)
    settings = {
        "model": lm.name,
        "budget": str(budget),
        "space": "quant",
        "levels": list(qspace.levels),
        "granularity": granularity,
        "embedding": embedding,
        "calibration_tokens": calibration_tokens,
        "calibration": "given text" if calibration_text else "built-in calibration half",
        "window": window,
        "stages": stages,
        "seed": seed,
        "offspring": offspring,
        "prior": prior,
        "simulate": simulate,
    }
    if table is not None:
        settings["latency_table"] = table.data["key"]
    start = time.perf_counter()
    db = LevelDatabase(
        lm, qspace, max_bytes=max_cache_bytes, simulate=simulate, calibration_text=calibration_text
    )
    fitness = KLFitness(
        lm, calibration_text or default_calibration_text(), calibration_tokens, window, stages
    )
    limit = budget.fraction if cost is not None else budget_bytes
    evolution = Evolution(db, limit, None, fitness.n_stages, seed=seed, offspring=offspring, cost=cost)
    check_budget(evolution, budget, reference_bytes, embedding)  # before the store file exists
    scorers = None
    if ray is not None:  # an unreachable address or a missing extra fails here, before any output
        from .distributed import RayScorers

        scorers = RayScorers(
            lm,
            ray,
            workers,
            {"levels": tuple(levels), "granularity": granularity, "embedding": embedding},
            {
                "text": calibration_text or default_calibration_text(),
                "tokens": calibration_tokens,
                "window": window,
                "stages": stages,
            },
            simulate,
        )
    trials, evaluator = evolve(
        evolution,
        db,
        fitness,
        qspace,
        settings,
        prior,
        store=store,
        resume=resume,
        max_evals=max_evals,
        time_limit=time_limit,
        on_eval=on_eval,
        before_store=before_store,
        scorers=scorers,
    )
    search_seconds = time.perf_counter() - start
    sensitivity = evolution.sensitivity or {
        u.name: r["kl"]
        for u in qspace.units
        if (r := trials.get(_sensitivity_config(evolution, qspace, u), 0)) is not None
    }

    # every configuration once, at the largest stage it reached
    last = fitness.n_stages - 1
    best: dict[tuple, tuple[int, dict]] = {}
    for (config, stage), r in trials.results.items():
        if config not in best or stage > best[config][0]:
            best[config] = (stage, r)
    n_params = lm.n_params()
    points = []
    for config, (stage, r) in best.items():
        points.append(
            {
                **_latency_fields(table, config),
                "config": qspace.as_dict(config),
                "describe": qspace.describe(config),
                "bytes": r["bytes"],
                "bytes_fraction": round(r["bytes"] / reference_bytes, 6),
                "params": n_params,
                "kl": r["kl"],
                "kl_tokens": fitness.stage_tokens[stage],
                "stage": stage,
                "final_stage": stage == last,
                "within_budget": evolution.cost.total(config) <= evolution.budget,
                "origin": r["origin"],
                "label": _uniform_label(config),
            }
        )
    points.sort(key=lambda p: (p["bytes"], p["kl"]))
    finals = [p for p in points if p["final_stage"]]
    for i in pareto_front(finals, "latency_fraction" if budget.kind == "latency" else "bytes"):
        finals[i]["pareto"] = True
    feasible = [
        i for i, p in enumerate(points) if p["final_stage"] and p["within_budget"] and p["label"] != "float"
    ]
    chosen = min(feasible, key=lambda i: (points[i]["kl"], points[i]["bytes"])) if feasible else None

    # held-out perplexity: the original, the chosen point, the uniform baselines, a few front points
    heldout = heldout_windows(lm, heldout_text or evaluation_text()[0], heldout_tokens)
    reference_ppl = perplexity(lm, heldout)
    confirm = [] if chosen is None else [chosen]
    confirm += [i for i, p in enumerate(points) if p["origin"] == "uniform"]
    confirm += [i for i, p in enumerate(points) if p.get("pareto") and p["within_budget"]][-finalists:]
    for i in dict.fromkeys(confirm):
        config = tuple(points[i]["config"][u.name] for u in qspace.units)
        points[i]["ppl"] = perplexity(db.assemble(config), heldout)
    for label, recipe in (baselines or {}).items():  # peers' uniform settings (GPTQ), scored the same way
        from ..apply import compress

        done = compress(lm, recipe, calibration_text=calibration_text)
        kl, _ = fitness.kl(done.lm, last)
        points.append(
            {
                "config": {},
                "describe": done.recipe.describe(),
                "bytes": done.bytes_after,
                "bytes_fraction": round(done.bytes_after / reference_bytes, 6),
                "params": done.params_after,
                "kl": kl,
                "kl_tokens": fitness.stage_tokens[last],
                "stage": last,
                "final_stage": False,  # not a point of this space: drawn as a baseline, never on the front
                "within_budget": done.bytes_after <= budget_bytes if budget.kind == "bytes" else None,
                "origin": "baseline",
                "baseline": True,
                "label": label,
                "ppl": perplexity(done.lm, heldout),
            }
        )
    latency_stats = {}
    if table is not None:
        from .latency import table_summary

        latency_stats["latency_table"] = table_summary(table)
        if (
            chosen is not None and budget.kind == "latency"
        ):  # the estimate checked on the real compressed model
            from ..apply import compress
            from .latency import measure_model

            real = compress(lm, qspace.recipe(tuple(points[chosen]["config"][u.name] for u in qspace.units)))
            p, d = measure_model(real.lm.model, lm.vocab_size)
            ref_p, ref_d = table.reference
            latency_stats["chosen_measured"] = {
                "prefill_s": round(p, 5),
                "decode_s": round(d, 5),
                "latency_fraction": round(0.5 * (p / ref_p + d / ref_d), 5),
            }
    return SearchResult(
        model=lm.name,
        budget=budget,
        budget_bytes=budget_bytes,
        reference_bytes=reference_bytes,
        reference_params=n_params,
        units=[
            {"name": u.name, "block": u.block, "kind": u.kind, "paths": list(u.paths)} for u in qspace.units
        ],
        levels=list(qspace.levels),
        points=points,
        chosen=chosen,
        sensitivity=sensitivity,
        settings=settings,
        stats={
            **run_stats(evaluator, evolution, db, fitness, heldout, search_seconds),
            **latency_stats,
            "workers": f"ray {ray} x{workers}" if ray is not None else "in-process",
        },
        reference_ppl=reference_ppl,
        space=qspace,
    )


def _latency_fields(table, config) -> dict:
    if table is None:
        return {}
    p, d = table.seconds(config)
    return {
        "prefill_s": round(p, 5),
        "decode_s": round(d, 5),
        "latency_fraction": round(table.fraction(config), 5),
    }


def _uniform_label(config) -> str:
    return config[0] if len(set(config)) == 1 else ""


def _sensitivity_config(evolution, qspace, unit):
    top = [evolution._by_error(u)[0] for u in range(len(evolution.levels))]
    u = qspace.units.index(unit)
    top[u] = evolution._by_error(u)[-1]
    return tuple(top)


def run_stats(evaluator, evolution, db, fitness, heldout, search_seconds: float) -> dict:
    """What a search cost: evaluations (asked, computed), seconds, generations, variants, tokens, evals/hour."""
    return {
        "evaluations": evaluator.evals,
        "computed": evaluator.computed,
        "eval_seconds": round(evaluator.seconds, 1),
        "search_seconds": round(search_seconds, 1),
        "generations": len(evolution.history),
        "accepted": sum(h["accepted"] for h in evolution.history),
        "variants_built": db.built,
        "stage_tokens": list(fitness.stage_tokens),
        "heldout_tokens": int(sum(w.shape[1] for w in heldout)),
        "evals_per_hour": round(3600 * evaluator.computed / evaluator.seconds) if evaluator.seconds else None,
    }
