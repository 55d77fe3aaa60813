"""The unstructured-sparsity space (``--space sparsity``): every block chooses its own Wanda sparsity level
(default 0.5 ... 0.9) under a budget on the block linears' non-zero weights (``params=0.3``: 30% kept, i.e. 70%
sparsity), searched by the same EvoPress-style evolution and staged KL fitness as precision.

The level database holds, per linear, the rank of every weight in its row by Wanda's score |W_ij|·‖X_j‖₂
(``input_sq_norms`` on the calibration text, the original model's inputs): a level is then a threshold on the
ranks, so any sparsity of any layer is made in one masked copy, never re-scored. Also here: OWL's allocation
(Yin et al. 2024), the baseline: layers with more outlier weights (score > M x the layer's mean score) get
lower sparsity, within ``S ± lambda``, mean ``S``.

Honest note (as for ``--prune-unstructured``): the zeros stay in dense tensors; bytes and latency do not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import LmscopeError
from . import SearchResult, pareto_front
from .space import Budget, Unit

DEFAULT_SPARSITY_LEVELS = ("0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9")
OWL_M = 5.0
OWL_LAMBDA = 0.08


class SparsitySpace:
    """One unit per block (all its linears), levels = sparsity fractions (as strings)."""

    name = "sparsity"

    def __init__(self, lm, levels=DEFAULT_SPARSITY_LEVELS):
        from ..targets import block_linears

        if not lm.is_causal:
            raise LmscopeError(
                f"'{lm.name}' is not a causal LM: the search's fitness is the next-token distribution",
                "search a decoder such as smollm2",
            )
        try:
            values = [float(lv) for lv in levels]
        except ValueError:
            raise LmscopeError(
                f"sparsity levels must be numbers, got {', '.join(levels)}",
                "e.g. --levels 0.5,0.6,0.7,0.8,0.9",
            ) from None
        if not values or any(not 0 <= v < 1 for v in values):
            raise LmscopeError("sparsity levels must be in [0, 1)", "e.g. --levels 0.5,0.6,0.7,0.8,0.9")
        self.levels: tuple[str, ...] = tuple(f"{v:g}" for v in sorted(set(values)))
        self.prefix = prefix = lm.family.blocks + "."
        groups: dict[int, list[str]] = {}
        for path, m in block_linears(lm):
            if not isinstance(m, nn.Linear):
                raise LmscopeError(
                    f"the sparsity search does not support family '{lm.family.name}' (Conv1D layers)",
                    "search a Linear-based family such as llama/qwen2/mistral",
                )
            groups.setdefault(int(path[len(prefix) :].split(".")[0]), []).append(path)
        self.units: tuple[Unit, ...] = tuple(Unit(str(b), b, "block", tuple(p)) for b, p in groups.items())
        self.granularity = "block"

    def uniform(self, level: str) -> tuple[str, ...]:
        return tuple(level for _ in self.units)

    def as_dict(self, config) -> dict[str, str]:
        return {u.name: lv for u, lv in zip(self.units, config)}

    def recipe(self, config):
        """The ``compress`` recipe of a configuration: one Wanda step per run of consecutive blocks at the same
        level, last blocks first. A step's Wanda scores are taken on the model as earlier steps left it, and a
        block's inputs depend only on the blocks before it: pruning from the end, every step sees the original
        inputs, as the search's level database did, so the recipe reproduces the candidate weight for weight."""
        from ..recipe import PruneUnstructured, Recipe

        runs: list[tuple[float, list[Unit]]] = []
        for unit, lv in zip(self.units, config):
            if runs and runs[-1][0] == float(lv):
                runs[-1][1].append(unit)
            else:
                runs.append((float(lv), [unit]))
        steps = [
            PruneUnstructured(
                level, method="wanda", modules=tuple(f"{self.prefix}{u.block}.*" for u in units)
            )
            for level, units in reversed(runs)
            if level > 0
        ]
        if not steps:
            raise LmscopeError("the chosen configuration prunes nothing", "search a budget below params=1")
        return Recipe(tuple(steps))

    def describe(self, config) -> str:
        vals = [float(lv) for lv in config]
        return (
            f"sparsity {min(vals):g}..{max(vals):g} per block"
            if len(set(vals)) > 1
            else f"uniform {vals[0]:g}"
        )


class SparsityDatabase:
    """The working model and, per linear, the Wanda rank of every weight in its row; ``assemble(config)``
    writes each changed block's masked weights (one copy per linear). ``bytes``/``total_bytes`` count the
    non-zero block weights a configuration keeps (the budget's cost)."""

    def __init__(self, lm, space: SparsitySpace, calibration_text: str | None = None):
        from ...lm import LM
        from ..calibration import input_sq_norms

        self.space = space
        self.simulate = False
        self.work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        paths = [p for u in space.units for p in u.paths]
        self.original = {p: self.work.module(p).weight.detach().clone() for p in paths}
        with torch.no_grad():  # calibration None: the built-in calibration half
            sq = input_sq_norms(lm, calibration_text, paths)
            self.score = {p: self.original[p].abs().float() * sq[p].sqrt()[None, :] for p in paths}
            # rank of each weight within its row, lowest score first (int16: widths < 32768)
            self.rank = {}
            for p in paths:
                order = torch.argsort(self.score[p], dim=1, stable=True)
                r = torch.empty_like(order)
                r.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
                self.rank[p] = r.to(torch.int16 if order.shape[1] < 32768 else torch.int32)
        self.numel = {
            u: sum(self.original[p].numel() for p in unit.paths) for u, unit in enumerate(space.units)
        }
        self.total_weights = sum(self.numel.values())
        self.current: list[float | None] = [None] * len(space.units)
        self.built = 0
        self._error: dict[tuple[int, float], float] = {}

    def _kept(self, p: str, sparsity: float) -> torch.Tensor:
        k = int(round(self.original[p].shape[1] * sparsity))
        return self.rank[p] >= k

    def kept_weights(self, u: int, sparsity: float) -> int:
        return sum(int(self._kept(p, sparsity).sum()) for p in self.space.units[u].paths)

    def bytes(self, u: int, level) -> int:  # the cost of a level: weights kept (as the masks count them)
        return sum(
            self.original[p].shape[0]
            * (self.original[p].shape[1] - int(round(self.original[p].shape[1] * float(level))))
            for p in self.space.units[u].paths
        )

    def total_bytes(self, config) -> float:
        return sum(self.bytes(u, lv) for u, lv in enumerate(config))

    def error(self, u: int, level) -> float:
        """Wanda-weighted squared error of the unit at this sparsity, relative (the greedy prior)."""
        key = (u, float(level))
        if key not in self._error:
            num = den = 0.0
            for p in self.space.units[u].paths:
                s2 = self.score[p].pow(2)
                num += float((s2 * ~self._kept(p, float(level))).sum())
                den += float(s2.sum())
            self._error[key] = num / max(den, 1e-30)
        return self._error[key]

    @torch.no_grad()
    def assemble(self, config):
        for u, lv in enumerate(config):
            s = float(lv)
            if self.current[u] != s:
                for p in self.space.units[u].paths:
                    w = self.work.module(p).weight
                    w.copy_(self.original[p] * self._kept(p, s).to(w.dtype))
                self.current[u] = s
                self.built += 1
        return self.work

    # -- OWL --------------------------------------------------------------------------------------------
    def outlier_ratios(self, m: float = OWL_M) -> list[float]:
        """Per unit: fraction of weights whose Wanda score exceeds ``m`` x the layer's mean score (OWL's LOD)."""
        out = []
        for unit in self.space.units:
            n = tot = 0
            for p in unit.paths:
                s = self.score[p]
                n += int((s > m * s.mean()).sum())
                tot += s.numel()
            out.append(n / tot)
        return out

    def owl_allocation(self, target: float, lam: float = OWL_LAMBDA, m: float = OWL_M) -> list[float]:
        """OWL: sparsity_i = target + lam - 2 lam (D_i - min D) / (max D - min D), then shifted so that the
        weighted mean is ``target`` exactly."""
        d = self.outlier_ratios(m)
        lo, hi = min(d), max(d)
        raw = [target + lam - 2 * lam * ((x - lo) / (hi - lo) if hi > lo else 0.5) for x in d]
        w = [self.numel[u] for u in range(len(d))]
        shift = target - sum(r * n for r, n in zip(raw, w)) / sum(w)
        return [min(max(r + shift, 0.0), 0.99) for r in raw]


def snap_to_levels(evolution, values: list[float], priority: list[float]) -> tuple[str, ...]:
    """A per-unit allocation (OWL's) as the nearest levels, made to fit the budget: while over it, the unit
    with the lowest ``priority`` (outlier ratio) moves one level sparser; spare budget goes back to the units
    with the highest priority first."""
    idx = []
    for u, v in enumerate(values):
        lv = evolution.levels[u]  # most kept (least sparse) first
        idx.append(min(range(len(lv)), key=lambda k: abs(float(lv[k]) - v)))
    order = sorted(range(len(values)), key=lambda u: priority[u])
    while evolution._total(idx) > evolution.budget:
        movable = [u for u in order if idx[u] < len(evolution.levels[u]) - 1]
        if not movable:
            break
        idx[movable[0]] += 1
        order = order[1:] + order[:1]
    return evolution._config(evolution._refill(idx, order[::-1]))


def search_sparsity(
    lm,
    sparsity: float = 0.7,
    *,
    levels=DEFAULT_SPARSITY_LEVELS,
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
    prior: str = "error",
    store=None,
    resume: bool = False,
    on_eval=None,
    before_store=None,
) -> SparsityResult:
    """Per-block Wanda sparsity levels with mean ``sparsity`` over the block linears (weighted by size): the
    searched allocation beside uniform Wanda and OWL's allocation, each with KL and held-out perplexity.
    Returns a ``SparsityResult`` (``write(out)``: pareto.json, recipe.json, report.html)."""
    import time

    from ..calibration import default_calibration_text
    from ..evaluate import evaluation_text
    from .fitness import KLFitness, heldout_windows, perplexity
    from .store import _optuna
    from .strategy import Evolution, evolve

    if not 0 < sparsity < 1:
        raise LmscopeError(
            f"sparsity must be in (0, 1), got {sparsity}", "e.g. --budget params=0.3 (70% sparsity)"
        )
    _optuna()
    space = SparsitySpace(lm, levels)
    if not float(space.levels[0]) <= sparsity <= float(space.levels[-1]):
        raise LmscopeError(
            f"sparsity {sparsity:g} is outside the levels {space.levels[0]}..{space.levels[-1]}",
            "choose --levels around the target sparsity",
        )
    start = time.perf_counter()
    calib_text = calibration_text or default_calibration_text()
    db = SparsityDatabase(lm, space, calib_text)
    fitness = KLFitness(lm, calib_text, calibration_tokens, window, stages)
    budget = int(round(db.total_weights * (1 - sparsity)))
    target = f"{sparsity:g}"
    if target in space.levels:  # per-row rounding: uniform at the target keeps a few weights more or less
        budget = max(budget, db.total_bytes(space.uniform(target)))
    evolution = Evolution(db, budget, None, fitness.n_stages, seed=seed, offspring=offspring)
    if evolution.minimum_bytes() > budget:
        raise LmscopeError(
            f"sparsity {sparsity:g} is above the sparsest configuration of the levels", "add sparser --levels"
        )
    settings = {
        "model": lm.name,
        "space": "sparsity",
        "sparsity": sparsity,
        "levels": list(space.levels),
        "calibration_tokens": calibration_tokens,
        "window": window,
        "stages": stages,
        "seed": seed,
        "offspring": offspring,
        "prior": prior,
        "method": "wanda",
    }
    owl = db.owl_allocation(sparsity)
    ratios = db.outlier_ratios()
    evolution.extra_seeds = [snap_to_levels(evolution, owl, ratios)]
    trials, evaluator = evolve(
        evolution,
        db,
        fitness,
        space,
        settings,
        prior,
        store=store,
        resume=resume,
        max_evals=max_evals,
        time_limit=time_limit,
        on_eval=on_eval,
        before_store=before_store,
    )
    search_seconds = time.perf_counter() - start
    last = fitness.n_stages - 1
    best: dict[tuple, tuple[int, dict]] = {}
    for (config, stage), r in trials.results.items():
        if config not in best or stage > best[config][0]:
            best[config] = (stage, r)
    points = []
    for config, (stage, r) in best.items():
        kept = db.total_bytes(config)
        points.append(
            {
                "config": space.as_dict(config),
                "describe": space.describe(config),
                "sparsity": round(1 - kept / db.total_weights, 6),
                "params": kept,
                "params_fraction": round(kept / db.total_weights, 6),
                "kl": r["kl"],
                "kl_tokens": fitness.stage_tokens[stage],
                "stage": stage,
                "final_stage": stage == last,
                "within_budget": kept <= budget,
                "origin": r["origin"],
                "label": f"uniform {config[0]}" if len(set(config)) == 1 else "",
            }
        )
    points.sort(key=lambda p: (p["params"], p["kl"]))
    finals = [p for p in points if p["final_stage"]]
    for i in pareto_front(finals, "params"):
        finals[i]["pareto"] = True
    feasible = [i for i, p in enumerate(points) if p["final_stage"] and p["within_budget"]]
    chosen = min(feasible, key=lambda i: (points[i]["kl"], points[i]["params"])) if feasible else None
    heldout = heldout_windows(lm, heldout_text or evaluation_text()[0], heldout_tokens)
    with torch.no_grad():
        reference_ppl = perplexity(lm, heldout)
        confirm = [i for i, p in enumerate(points) if p["origin"] == "uniform" and p["within_budget"]]
        confirm += [chosen] if chosen is not None else []
        for i in dict.fromkeys(confirm):
            config = tuple(points[i]["config"][u.name] for u in space.units)
            points[i]["ppl"] = perplexity(db.assemble(config), heldout)
        owl_config = tuple(f"{v:.6f}" for v in owl)
        owl_model = db.assemble(owl_config)
        owl_kept = sum(db.bytes(u, v) for u, v in enumerate(owl_config))
        points.append(
            {
                "config": space.as_dict(owl_config),
                "describe": f"OWL allocation (M={OWL_M:g}, lambda={OWL_LAMBDA:g})",
                "sparsity": round(1 - owl_kept / db.total_weights, 6),
                "params": owl_kept,
                "params_fraction": round(owl_kept / db.total_weights, 6),
                "kl": fitness.kl(owl_model, last)[0],
                "kl_tokens": fitness.stage_tokens[last],
                "stage": last,
                "final_stage": False,
                "within_budget": owl_kept <= budget,
                "origin": "baseline",
                "baseline": True,
                "label": "OWL",
                "ppl": perplexity(owl_model, heldout),
            }
        )
    from . import run_stats

    return SparsityResult(
        model=lm.name,
        budget=Budget("params", round(1 - sparsity, 9)),
        budget_bytes=budget,
        reference_bytes=4 * lm.n_params(),
        reference_params=db.total_weights,
        units=[
            {"name": u.name, "block": u.block, "kind": u.kind, "paths": list(u.paths)} for u in space.units
        ],
        levels=list(space.levels),
        points=points,
        chosen=chosen,
        sensitivity=evolution.sensitivity,
        settings=settings,
        stats=run_stats(evaluator, evolution, db, fitness, heldout, search_seconds),
        reference_ppl=reference_ppl,
        space=space,
        sparsity=sparsity,
        outlier_ratios={u.name: r for u, r in zip(space.units, ratios)},
        owl={u.name: v for u, v in zip(space.units, owl)},
        wanda_error={}
        if chosen is None
        else {u.name: db.error(k, points[chosen]["config"][u.name]) for k, u in enumerate(space.units)},
    )


@dataclass
class SparsityResult(SearchResult):
    """A sparsity search's result: points carry the non-zero block weights they keep (``params``, the budget's
    cost) and their ``sparsity``; the OWL allocation, each block's outlier ratio and the chosen blocks' relative
    Wanda error, for the report. ``write(out)``: pareto.json, recipe.json (per-block Wanda steps), report.html."""

    sparsity: float = 0.7
    outlier_ratios: dict = field(default_factory=dict)
    owl: dict = field(default_factory=dict)
    wanda_error: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["space"] = "sparsity"
        d["budget"] = {
            "kind": "params",
            "fraction": self.budget.fraction,
            "sparsity": self.sparsity,
            "kept_weights": self.budget_bytes,
            "block_weights": self.reference_params,
        }
        d["reference"] = {"block_weights": self.reference_params, "ppl": self.reference_ppl}
        d["outlier_ratios"] = self.outlier_ratios
        d["owl"] = self.owl
        d["wanda_error"] = self.wanda_error
        d["note"] = "zeros in dense tensors: bytes and latency unchanged"
        return d

    def to_text(self) -> str:
        header = (
            f"search {self.model}: sparsity {self.sparsity:g} = {self.budget_bytes:,} of "
            f"{self.reference_params:,} block weights kept non-zero"
        )
        where = lambda p: f"sparsity {p['sparsity']:.4f}"  # noqa: E731
        return "\n".join(self._text(header, "params", where, 14, reference="dense"))
