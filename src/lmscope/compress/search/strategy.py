"""The search strategy: EvoPress-style (1 + lambda) evolution over per-unit levels under a byte budget.

Seeds: every uniform configuration (these are also the uniform baselines) and a prior one, allocated greedily
from measured sensitivities (KL with only that unit at the lowest level). Offspring come from budget-keeping
mutations (a unit gains a level, others lose one until the budget holds again, then free bytes are refilled);
they are scored on a few calibration tokens first, and only the best quarter goes on to the next, larger
stage. A child replaces its parent when it beats it at the last stage. Everything random draws from one
``random.Random(seed)``, so a seed fixes the whole search.
"""

from __future__ import annotations

import math
import random
import time

from ...errors import LmscopeError


class StopSearch(Exception):  # noqa: N818  (a bound was reached, not an error)
    pass


class Evaluator:
    """Fitness with its bounds and its memory: each (configuration, stage) is computed once, stored, and
    counted once against ``max_evals`` (stored results replayed on ``--resume`` count as in the first run)."""

    def __init__(self, db, fitness, store, max_evals: int, time_limit: float | None, on_eval=None):
        self.db, self.fitness, self.store = db, fitness, store
        self.max_evals = max_evals
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.on_eval = on_eval
        self.evals = 0  # distinct (config, stage) pairs this search has needed
        self.computed = 0  # of those, computed in this process (not read back from storage)
        self.seconds = 0.0
        self._seen: set = set()
        self.scorers = None  # a RayScorers: ``many`` scores a batch on Ray actors

    def many(self, configs, stage: int, origin: str = "search") -> list[float]:
        """KL of each configuration at ``stage``, in order; with Ray the ones not yet stored are computed in
        parallel. Bounds as in ``__call__``: the configurations within ``max_evals`` are scored and stored,
        then ``StopSearch``."""
        configs = [tuple(c) for c in configs]
        if self.scorers is None:
            return [self(c, stage, origin) for c in configs]
        allowed, stop = [], False
        for c in configs:
            key = (c, stage)
            if key not in self._seen:
                if self.evals >= self.max_evals:
                    stop = True
                    break
                self.evals += 1
                self._seen.add(key)
            allowed.append(c)
        todo = list(dict.fromkeys(c for c in allowed if self.store.get(c, stage) is None))
        if todo:
            self.check_time()
            start = time.perf_counter()
            jobs = [(c, stage, self._done(c, stage)) for c in todo]
            for c, (kl, sums) in zip(todo, self.scorers.map(jobs)):
                self.store.put(c, stage, kl, self.db.total_bytes(c), sums, origin)
                self.computed += 1
                if self.on_eval is not None:
                    self.on_eval(self.evals)
            self.seconds += time.perf_counter() - start
        if stop:
            raise StopSearch
        return [self.store.get(c, stage)["kl"] for c in configs]

    def _done(self, config, stage: int) -> list[float] | None:
        for s in range(stage - 1, -1, -1):  # an earlier stage's windows are extended, not recomputed
            prev = self.store.get(config, s)
            if prev is not None:
                return prev["window_kl"]
        return None

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise StopSearch

    def seen(self, config, stage: int) -> bool:
        return (tuple(config), stage) in self._seen

    def __call__(self, config, stage: int, origin: str = "search") -> float:
        config = tuple(config)
        key = (config, stage)
        if key not in self._seen:
            if self.evals >= self.max_evals:
                raise StopSearch
            self.evals += 1
            self._seen.add(key)
        found = self.store.get(config, stage)
        if found is not None:
            return found["kl"]
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise StopSearch
        start = time.perf_counter()
        done = self._done(config, stage)
        lm = self.db.assemble(config)
        kl, sums = self.fitness.kl(lm, stage, done)
        self.store.put(config, stage, kl, self.db.total_bytes(config), sums, origin)
        self.computed += 1
        self.seconds += time.perf_counter() - start
        if self.on_eval is not None:
            self.on_eval(self.evals)
        return kl


class Evolution:
    def __init__(
        self,
        db,
        budget_bytes: int,
        evaluate: Evaluator | None,
        n_stages: int,
        seed: int = 0,
        offspring: int = 8,
        cost=None,
    ):
        from .latency import ByteCost

        self.db = db
        self.space = db.space
        # what the budget limits (bytes by default; a measured latency fraction with a latency table)
        self.cost = cost if cost is not None else ByteCost(db)
        self.budget = budget_bytes
        self.evaluate = evaluate
        self.rng = random.Random(seed)
        self.offspring = offspring
        n = len(self.space.units)
        # levels per unit from most to least cost (bytes: index 0 = most bits); a level that costs more than
        # another with more bits (int4 prefill can be slower than float) stays in the list: the search decides
        self.levels = [
            sorted(self.space.levels, key=lambda lv, i=i: (-self.cost.unit(i, lv), lv)) for i in range(n)
        ]
        self.last = n_stages - 1
        self.sensitivity: dict[str, float] = {}
        self.parent: tuple[str, ...] | None = None
        self.history: list[dict] = []  # per generation: parent KL, accepted
        self.extra_seeds: list[tuple[str, ...]] = []  # from other priors (OWL's allocation for sparsity)

    # -- budget-keeping moves -------------------------------------------------------------------------
    def _total(self, idx) -> float:
        return self.cost.total(self._config(idx))

    def _config(self, idx) -> tuple[str, ...]:
        return tuple(self.levels[u][k] for u, k in enumerate(idx))

    def _index(self, config) -> list[int]:
        return [self.levels[u].index(lv) for u, lv in enumerate(config)]

    def minimum_bytes(self) -> int:
        return self._total([len(lv) - 1 for lv in self.levels])

    def _refill(self, idx: list[int], order) -> list[int]:
        for u in order:  # spend left-over bytes: one level up where it still fits
            if idx[u] > 0:
                idx[u] -= 1
                if self._total(idx) > self.budget:
                    idx[u] += 1
        return idx

    def mutate(self, parent) -> tuple[str, ...] | None:
        rng, n = self.rng, len(self.levels)
        idx = self._index(parent)
        for _ in range(rng.choice((1, 1, 2, 3))):
            ups = [u for u in range(n) if idx[u] > 0]
            if not ups:
                break
            a = rng.choice(ups)
            idx[a] -= 1
            while self._total(idx) > self.budget:
                downs = [u for u in range(n) if u != a and idx[u] < len(self.levels[u]) - 1]
                if not downs:
                    return None
                idx[rng.choice(downs)] += 1
        idx = self._refill(idx, rng.sample(range(n), n))
        child = self._config(idx)
        return child if child != tuple(parent) else None

    # -- seeds ------------------------------------------------------------------------------------------
    def greedy(self, weights: dict[str, float]) -> tuple[str, ...]:
        """Allocate the budget greedily: start at the fewest bytes, repeatedly upgrade the unit whose
        estimated loss (weight x relative weight error) falls most per byte, while the budget holds."""
        n = len(self.levels)
        idx = [len(lv) - 1 for lv in self.levels]

        def loss(u, k):
            lowest = max(self.db.error(u, lv) for lv in self.levels[u]) or 1e-30
            return weights[self.space.units[u].name] * self.db.error(u, self.levels[u][k]) / lowest

        while True:
            best, best_gain = None, 0.0
            total = self._total(idx)
            for u in range(n):
                if idx[u] == 0:
                    continue
                k = idx[u] - 1
                extra = self.cost.unit(u, self.levels[u][k]) - self.cost.unit(u, self.levels[u][idx[u]])
                if total + extra > self.budget:
                    continue
                gain = (loss(u, idx[u]) - loss(u, k)) / max(extra, 1e-12)
                if gain > best_gain:
                    best, best_gain = u, gain
            if best is None:
                return self._config(idx)
            idx[best] -= 1

    def _by_error(self, u: int) -> list[str]:
        return sorted(self.levels[u], key=lambda lv: (self.db.error(u, lv), lv))

    def measure_sensitivity(self) -> dict[str, float]:
        """KL at the first stage with one unit at its least precise level and the rest at their most precise
        (float when it is a level)."""
        top = [self._by_error(u)[0] for u in range(len(self.levels))]
        probes = []
        for u in range(len(self.space.units)):
            config = list(top)
            config[u] = self._by_error(u)[-1]
            probes.append(tuple(config))
        kls = self._many(probes, 0, "sensitivity")
        return {unit.name: kl for unit, kl in zip(self.space.units, kls)}

    def _many(self, configs, stage: int, origin: str = "search") -> list[float]:
        many = getattr(self.evaluate, "many", None)
        if many is None:
            return [self.evaluate(c, stage, origin) for c in configs]
        return many(configs, stage, origin)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, prior: str = "sensitivity") -> None:
        """Seeds, then generations until a bound (evaluations, time) stops it (``StopSearch``)."""
        uniforms = [self.space.uniform(lv) for lv in self.space.levels if lv != "float"]
        self._many(uniforms, self.last, "uniform")  # the uniform baselines, on the full calibration
        seeds = [c for c in uniforms if self.cost.total(c) <= self.budget]
        if prior == "sensitivity":
            self.sensitivity = self.measure_sensitivity()
            weights = {k: max(v, 1e-12) for k, v in self.sensitivity.items()}
        else:
            weights = {u.name: 1.0 for u in self.space.units}
        seeds.append(self.greedy(weights))
        seeds += [tuple(c) for c in self.extra_seeds if self.cost.total(c) <= self.budget]
        for config in list(seeds):  # best feasible uniform, its spare bytes spent greedily too
            idx = self._refill(self._index(config), range(len(self.levels)))
            seeds.append(self._config(idx))
        seeds = list(dict.fromkeys(seeds))
        scored = [(kl, i, c) for i, (kl, c) in enumerate(zip(self._many(seeds, self.last, "seed"), seeds))]
        self.parent = min(scored)[2]
        while True:
            parent_kl = self.evaluate(self.parent, self.last, "seed")
            self.evaluate.check_time()
            kids, tries = [], 0
            while len(kids) < self.offspring and tries < 20 * self.offspring:
                tries += 1
                child = self.mutate(self.parent)
                # a child already scored at the last stage teaches nothing: draw another
                if child is not None and child not in kids and not self.evaluate.seen(child, self.last):
                    kids.append(child)
            if not kids:  # the neighbourhood of the parent is exhausted (small spaces)
                return
            for stage in range(self.last + 1):
                kls = self._many(kids, stage)
                ranked = sorted((kl, i, c) for i, (kl, c) in enumerate(zip(kls, kids)))
                if stage < self.last:
                    keep = max(1, math.ceil(len(kids) / 4))
                    kids = [c for _, _, c in ranked[:keep]]
            best_kl, _, best = ranked[0]
            accepted = best_kl < parent_kl
            if accepted:
                self.parent = best
            self.history.append({"parent_kl": min(best_kl, parent_kl), "accepted": accepted})


def check_budget(evolution: Evolution, budget, reference_bytes: int, embedding: str | None = None) -> None:
    """Refuse a budget no configuration meets. ``embedding``: the space's token embedding storage; under a
    latency budget, one that is not float gets ``--embedding float`` suggested (on CPUs without bf16 matmul
    units the quantized tied head's prefill is slower than fp32)."""
    low = evolution.minimum_bytes()
    if evolution.cost.kind == "latency":
        if low > evolution.budget:
            also = " or --embedding float (the token embedding and tied head kept fp32)"
            raise LmscopeError(
                f"budget {budget} is below the fastest configuration of this space ({low:.3f} of the original's "
                "measured prefill+decode latency on this machine)",
                f"raise the budget to at least latency={math.ceil(low * 1000) / 1000:g}, or add levels"
                + (f",{also}" if embedding not in (None, "float") else ""),
            )
        return
    if low > evolution.budget:
        raise LmscopeError(
            f"budget {budget} ({evolution.budget / 2**20:.2f} MB) is below the smallest configuration of this "
            f"space ({low / reference_bytes:.4f} of fp32, {low / 2**20:.2f} MB)",
            f"raise the budget to at least bytes={math.ceil(low / reference_bytes * 1000) / 1000:g}",
        )


def evolve(
    evolution,
    db,
    fitness,
    space,
    settings,
    prior,
    *,
    store,
    resume,
    max_evals,
    time_limit,
    on_eval,
    before_store=None,
    scorers=None,
):
    """Run ``evolution`` from ``prior`` until it ends or a bound (``max_evals``, ``time_limit``) stops it, every
    evaluation stored as an optuna trial (``--resume`` replays them). ``before_store()`` is called once the inputs
    are known good (the caller may create its output folder then); Ray ``scorers`` are closed whatever happens.
    Returns (trials, evaluator)."""
    import torch

    from .store import TrialStore

    try:
        if before_store is not None:
            before_store()
        trials = TrialStore(store, space, settings, resume=resume)
        evaluator = Evaluator(db, fitness, trials, max_evals, time_limit, on_eval)
        evaluator.scorers = scorers
        evolution.evaluate = evaluator
        with torch.no_grad():
            try:
                evolution.run(prior)
            except StopSearch:
                pass
    finally:
        if scorers is not None:
            scorers.close()
    return trials, evaluator
