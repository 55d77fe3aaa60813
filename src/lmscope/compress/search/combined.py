"""Precision and structure in one search (``--space quant,heads,neurons[,layers] --budget bytes=F``).

A candidate is a structure configuration (heads kept, MLP neurons kept, block kept or dropped: the units and
levels of ``StructuredSpace``) and a precision configuration (a level per block or block x projection kind: the
units and levels of ``QuantSpace``). Its bytes are exact: the state-dict bytes ``compress`` counts for the
model its recipe builds (the embedding int8, or ``embedding``, as in every precision candidate; each kept
linear at its level, at the shape the structure left). The recipe applies the structural steps first (``keep_heads``, ``keep_neurons``,
``prune_layers``), then one ``quantize`` step per level over what is kept (paths renumbered past dropped
blocks). The evolution is the structured search's (one unit up, others down until the budget holds), over the
units of both parts, so a mutation moves either.

Candidates are assembled in the structure database's working model: its blocks are sliced by the same functions
``compress`` runs, then each kept linear is swapped for its quantized variant, built once per (layer, slicing,
level) by the same scheme functions and kept in a memory-bounded cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from ...errors import LmscopeError
from .space import LEVELS, QuantSpace, Unit, bits_per_weight, fp32_bytes
from .structure import (
    STRUCT_SPACES,
    StructureDatabase,
    StructuredEvolution,
    StructuredResult,
    StructuredSpace,
)

#: a quantization unit's name in the combined space: its QuantSpace name plus this suffix ("3.mlp" -> "3.mlp.q")
QSUFFIX = ".q"
#: with --prior priors, a unit's loss at its lowest precision relative to a structural unit at its smallest
QUANT_PRIOR_SCALE = 0.1


class CombinedSpace:
    """The structure units (``i.attn``, ``i.mlp``, ``i.block``) followed by the precision units (``i.self_attn.q``,
    ``i.mlp.q`` or ``i.q`` for block granularity), each with its own levels."""

    name = "combined"

    def __init__(
        self,
        lm,
        spaces,
        levels,
        granularity: str = "kind",
        calib=None,
        priors=None,
        prior_tokens=1024,
        embedding: str = "int8",
    ):
        struct = tuple(s for s in spaces if s in STRUCT_SPACES)
        if embedding.startswith("gptq4"):  # the combined database keeps no calibration Hessians
            raise LmscopeError(
                f"embedding level '{embedding}' needs calibration Hessians the combined search does not keep",
                "use --embedding int8, float, int4-gN or int4m-gN in a combined search",
            )
        self.qspace = QuantSpace(lm, levels, granularity, embedding)
        self.sspace = StructuredSpace(lm, struct, calib, priors=priors, prior_tokens=prior_tokens)
        self.spaces = self.sspace.spaces  # StructuredEvolution asks whether blocks can be dropped
        self.n_layers = self.sspace.n_layers
        self.priors = self.sspace.priors
        self.head_keep, self.neuron_keep = self.sspace.head_keep, self.sspace.neuron_keep
        self.n_struct = len(self.sspace.units)
        qunits = tuple(Unit(u.name + QSUFFIX, u.block, "quant:" + u.kind, u.paths) for u in self.qspace.units)
        self.units: tuple[Unit, ...] = tuple(self.sspace.units) + qunits
        self.unit_levels: list[tuple[str, ...]] = list(self.sspace.unit_levels) + [
            self.qspace.levels for _ in qunits
        ]
        self.levels: tuple[str, ...] = tuple(dict.fromkeys(lv for lvs in self.unit_levels for lv in lvs))
        self.blocks = lm.family.blocks
        self.granularity = granularity

    def restrict(self, struct_levels) -> None:
        """Keep only these levels of the structure units (the database drops the ones a precision level's group
        size cannot quantize)."""
        self.unit_levels = [tuple(lvs) for lvs in struct_levels] + self.unit_levels[self.n_struct :]
        self.levels = tuple(dict.fromkeys(lv for lvs in self.unit_levels for lv in lvs))

    def split(self, config) -> tuple[tuple[str, ...], tuple[str, ...]]:
        config = tuple(config)
        return config[: self.n_struct], config[self.n_struct :]

    def full(self) -> tuple[str, ...]:
        return tuple(lvs[0] for lvs in self.unit_levels)

    def as_dict(self, config) -> dict[str, str]:
        return {u.name: lv for u, lv in zip(self.units, config)}

    def dropped(self, config) -> list[int]:
        return self.sspace.structure(self.split(config)[0])[2]

    def canonical(self, config) -> tuple[str, ...]:
        """A dropped block's heads, neurons and precision do not matter: written at their first level."""
        s, q = self.split(config)
        s = self.sspace.canonical(s)
        gone = set(self.sspace.structure(s)[2])
        q = tuple(self.qspace.levels[0] if u.block in gone else lv for u, lv in zip(self.qspace.units, q))
        return s + q

    def recipe(self, config):
        """Structure first (explicit kept heads / neurons, dropped blocks), then one quantize step per level over
        the kept linears, their paths renumbered past the dropped blocks; the embedding as in every candidate
        (int8 by default, float: left as it is)."""
        from ..recipe import Quantize, Recipe

        s, q = self.split(self.canonical(config))
        heads, neurons, dropped = self.sspace.structure(s)
        steps = []
        if heads or neurons or dropped:
            steps += list(self.sspace.recipe(s).steps)
        gone = set(dropped)
        q = tuple("float" if u.block in gone else lv for u, lv in zip(self.qspace.units, q))
        emb = self.qspace.embedding
        if all(lv == "float" for lv in q):  # the embedding as in every candidate (float: no step)
            qsteps = [] if emb == "float" else [Quantize("int8", embedding=emb, modules=(self.qspace.embed,))]
        else:
            qsteps = list(self.qspace.recipe(q).steps)
        prefix = self.blocks + "."
        new_index = {}
        for i in range(self.n_layers):
            if i not in gone:
                new_index[i] = i - sum(1 for d in gone if d < i)

        def renumber(path: str) -> str:
            if not path.startswith(prefix):
                return path  # the embedding
            index, _, rest = path[len(prefix) :].partition(".")
            return f"{prefix}{new_index[int(index)]}.{rest}"

        steps += [replace(st, modules=tuple(renumber(p) for p in st.modules)) for st in qsteps]
        return Recipe(tuple(steps))

    def describe(self, config) -> str:
        s, q = self.split(self.canonical(config))
        gone = set(self.sspace.structure(s)[2])
        kept_q = [lv for u, lv in zip(self.qspace.units, q) if u.block not in gone]
        return self.sspace.describe(s) + "; " + (self.qspace.describe(kept_q) if kept_q else "no block kept")


class CombinedDatabase:
    """Assembles (structure, precision) candidates in the structure database's working model and knows each
    one's state-dict bytes exactly, without assembling it."""

    def __init__(self, lm, space: CombinedSpace, max_bytes: int = 2 << 30, simulate: bool = False):
        from ..quantize import _common as C
        from ..size import state_bytes

        self.space = space
        self.sdb = StructureDatabase(lm, space.sspace)
        self.work = self.sdb.work
        self.reference_params = self.sdb.reference_params
        self.simulate = simulate
        self.max_bytes = max_bytes
        with torch.no_grad():
            if space.qspace.embedding != "float":  # as in every precision candidate (and in the recipe)
                C.quantize_embeddings(self.work, space.qspace.embedding)
        fam = lm.family
        self.attn_prefix = fam.attn + "."
        self._attn: dict[str, bool] = {}
        self._block_bytes: dict[tuple, int] = {}
        self.qpaths = {u.block: [] for u in space.qspace.units}
        self.unit_of: dict[str, int] = {}
        for k, u in enumerate(space.qspace.units):
            self.qpaths[u.block].extend(u.paths)
            for p in u.paths:
                self.unit_of[p] = space.n_struct + k
        blocks = self.sdb.blocks
        floats = {p: self.work.module(p) for ps in self.qpaths.values() for p in ps}
        # bytes: what is not a searched linear (embedding, head, norms of every block) is fixed per block
        self.fixed_bytes = state_bytes(self.work.model) - sum(state_bytes(b) for b in blocks)
        self.other = [
            state_bytes(b) - sum(state_bytes(floats[p]) for p in self.qpaths.get(i, ()))
            for i, b in enumerate(blocks)
        ]
        # the shape of every searched linear under every slicing of its block (sliced once here)
        self.shapes: dict[tuple[str, tuple | None], tuple[int, int, bool]] = {}
        for i in range(len(blocks)):
            for p in self.qpaths.get(i, ()):
                self.shapes[(p, None)] = _shape(floats[p])
        with torch.no_grad():
            for (i, _lv), kept in space.head_keep.items():
                self._slice_shapes(i, (kept, None, False))
            for (i, _lv), kept in space.neuron_keep.items():
                self._slice_shapes(i, (None, kept, False))
            self.sdb.assemble_states([(None, None, False)] * len(blocks))
        self._qbytes: dict[tuple, int] = {}
        self._cache: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._cache_bytes: dict[tuple, int] = {}
        self.built = 0
        self.floats: dict[int, tuple] = {}  # block -> (its structure state, {path: sliced float module})
        self.placed: dict[str, torch.nn.Module] = {}  # path -> the module this database put there
        space.restrict(self._divisible_levels())
        if simulate:
            from ..quantize.modules import Int4TiedHead, Int8TiedHead
            from ..targets import set_module
            from .levels import EmulatedLinear

            head = fam.unembed
            if head and isinstance(self.work.module(head), (Int8TiedHead, Int4TiedHead)):
                set_module(self.work.model, head, EmulatedLinear(self.work.module(head)))

    def _key(self, path: str, state) -> tuple | None:
        """What of the block's structure state a linear's shape and weights depend on."""
        heads, neurons, _ = state
        part = heads if self._is_attn(path) else neurons
        return None if part is None else tuple(part)

    def _is_attn(self, path: str) -> bool:
        if path not in self._attn:
            prefix = self.space.blocks + "."
            self._attn[path] = path[len(prefix) :].partition(".")[2].startswith(self.attn_prefix)
        return self._attn[path]

    def _slice_shapes(self, i: int, state) -> None:
        states = [(None, None, False)] * len(self.sdb.blocks)
        states[i] = state
        self.sdb.assemble_states(states)
        for p in self.qpaths.get(i, ()):
            key = self._key(p, state)
            if key is not None:
                self.shapes[(p, key)] = _shape(self.work.module(p))

    def _divisible_levels(self) -> list[tuple[str, ...]]:
        """Per structure unit, the levels whose sliced widths every precision level's group size divides (an
        int4 group of 32 cannot quantize 16 inputs): the others are left out of the combined space."""
        groups = [LEVELS[lv][1] for lv in self.space.qspace.levels if LEVELS[lv] and LEVELS[lv][1]]
        out = []
        for u, lvs in zip(self.space.units[: self.space.n_struct], self.space.unit_levels):
            keep = []
            for lv in lvs:
                kept = None
                if u.kind == "attn":
                    kept = self.space.head_keep.get((u.block, lv))
                    state = (kept, None, False)
                elif u.kind == "mlp":
                    kept = self.space.neuron_keep.get((u.block, lv))
                    state = (None, kept, False)
                if kept is not None:
                    widths = [
                        self.shapes[(p, self._key(p, state))][0]
                        for p in self.qpaths.get(u.block, ())
                        if self._key(p, state) is not None
                    ]
                    if any(w % g for w in widths for g in groups):
                        continue
                keep.append(lv)
            out.append(tuple(keep))
        return out

    # -- bytes -------------------------------------------------------------------------------------------
    def _linear_bytes(self, shape, level: str) -> int:
        key = (shape, level)
        if key not in self._qbytes:
            from ..size import state_bytes

            fan_in, fan_out, bias = shape
            lin = torch.nn.Linear(fan_in, fan_out, bias=bias)
            self._qbytes[key] = (
                state_bytes(lin) if level == "float" else state_bytes(_quantize(self.work, lin, level))
            )
        return self._qbytes[key]

    def bytes_of(self, struct_states, qconfig) -> int:
        total = self.fixed_bytes
        n = self.space.n_struct
        for i, state in enumerate(struct_states):
            if state[2]:
                continue
            paths = self.qpaths.get(i, ())
            levels = tuple(qconfig[self.unit_of[p] - n] for p in paths)
            key = (i, *(self._key(p, state) for p in paths), levels)
            if key not in self._block_bytes:
                self._block_bytes[key] = self.other[i] + sum(
                    self._linear_bytes(self.shapes[(p, self._key(p, state))], lv)
                    for p, lv in zip(paths, levels)
                )
            total += self._block_bytes[key]
        return total

    def total_bytes(self, config) -> int:
        s, q = self.space.split(config)
        return self.bytes_of(self.sdb.block_states(s), q)

    def params(self, config) -> int:
        """Block parameters kept (quantization keeps them all)."""
        return self.sdb.total_params(self.space.split(config)[0])

    # -- assembling --------------------------------------------------------------------------------------
    def assemble(self, config):
        s, q = self.space.split(config)
        n = self.space.n_struct
        return self.assemble_levels(self.sdb.block_states(s), lambda p: q[self.unit_of[p] - n])

    def part_units(self, i: int) -> tuple[int | None, int | None]:
        """Block ``i``'s precision units (indices into the precision part of a configuration) holding its
        attention and its MLP linears (the same unit at block granularity)."""
        n = self.space.n_struct
        attn = [self.unit_of[p] - n for p in self.qpaths.get(i, ()) if self._is_attn(p)]
        mlp = [self.unit_of[p] - n for p in self.qpaths.get(i, ()) if not self._is_attn(p)]
        return (attn[0] if attn else None), (mlp[0] if mlp else None)

    @torch.no_grad()
    def assemble_levels(self, states, level_of):
        """The working model with blocks at structure ``states`` and each kept linear at ``level_of(path)``
        (the latency table times attention and MLP precisions apart through this)."""
        from ..targets import set_module

        self.sdb.assemble_states(states)  # blocks whose structure changed: float again, re-sliced
        for i, state in enumerate(states):
            if state[2]:
                continue
            paths = self.qpaths.get(i, ())
            rec = self.floats.get(i)
            if (
                rec is None
                or rec[0] != state
                or any(self.work.module(p) is not self.placed.get(p) for p in paths)
            ):  # the structure database re-sliced this block: what is there now is float
                rec = (state, {p: self.work.module(p) for p in paths})
                self.floats[i] = rec
                self.placed.update(rec[1])
            for p, fl in rec[1].items():
                m = self._module(p, self._key(p, state), level_of(p), fl)
                if self.placed[p] is not m:
                    set_module(self.work.model, p, m)
                    self.placed[p] = m
        return self.work

    def _module(self, path, key, level, float_module):
        if level == "float":
            return float_module
        k = (path, key, level)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        from .levels import _memory

        m = _quantize(self.work, float_module, level, path)
        self.built += 1
        if self.simulate:
            from ..size import state_bytes
            from .levels import EmulatedLinear

            em = EmulatedLinear(m)
            em._lmscope_bytes = state_bytes(m)
            m = em
        self._cache[k] = m
        self._cache_bytes[k] = _memory(m)
        while sum(self._cache_bytes.values()) > self.max_bytes and len(self._cache) > 1:
            old, _ = self._cache.popitem(last=False)
            self._cache_bytes.pop(old, None)
        return m


def _shape(m) -> tuple[int, int, bool]:
    return (m.in_features, m.out_features, m.bias is not None)


def _quantize(work, module, level: str, path: str = "layer"):
    """``module`` quantized at ``level`` by the scheme function ``compress`` runs."""
    from ..quantize import SCHEMES, load_schemes
    from ..steps import Quantize

    load_schemes()
    scheme, group = LEVELS[level]
    (q,) = SCHEMES[scheme](work, Quantize(scheme, group_size=group), None, [(path, module)])
    return q.module


# -- the search ------------------------------------------------------------------------------------------------
class CombinedEvolution(StructuredEvolution):
    """The structured search's evolution over the units of both parts under a byte budget: a mutation raises one
    unit (a structure level or a precision level) and lowers others until the bytes fit. Seeds: uniform
    precision with uniform structure that fit, and a greedy allocation by sensitivity (or priors). Under a latency
    budget each precision unit's levels are ordered by their measured latency (at the full structure: int4 can be
    slower than float in prefill), so "down" still means cheaper."""

    def __init__(self, db, budget, evaluate, n_stages: int, seed=0, offspring=8, cost=None):
        super().__init__(db, budget, evaluate, n_stages, seed=seed, offspring=offspring, cost=cost)
        if self.cost.kind == "latency":
            n = self.space.n_struct
            for k in range(n, len(self.levels)):
                self.levels[k] = sorted(self.levels[k], key=lambda lv, k=k: (-self.cost.unit(k, lv), lv))

    def uniform_seeds(self) -> dict[tuple, str]:
        space, out = self.space, {}
        n = space.n_struct
        kinds = [k for k in ("attn", "mlp") if any(u.kind == k for u in space.units[:n])]
        level_lists = {
            k: list(
                dict.fromkeys(lv for u, lvs in zip(space.units[:n], self.levels) if u.kind == k for lv in lvs)
            )
            for k in kinds
        }
        combos = [{}]
        for k in kinds:
            combos = [{**c, k: lv} for c in combos for lv in level_lists[k]]
        full = list(space.full())
        for q in space.qspace.levels:
            if (
                q == "float" and self.cost.kind != "latency"
            ):  # under a latency budget float + structure competes
                continue
            feasible = []
            for c in combos:
                config = list(full)
                ok = True
                for k, u in enumerate(space.units):
                    if k >= n:
                        config[k] = q
                    elif u.kind in c:
                        if c[u.kind] not in self.levels[k]:
                            ok = False
                            break
                        config[k] = c[u.kind]
                if ok and self.cost.total(config) <= self.budget:
                    feasible.append((c, tuple(config)))
            for c, config in feasible:  # the uniform points no other one beats on every kind
                dominated = any(
                    d is not c
                    and all(level_lists[k].index(d[k]) <= level_lists[k].index(c[k]) for k in kinds)
                    for d, _ in feasible
                )
                if not dominated:
                    kept = [c[k] for k in kinds if c[k] != level_lists[k][0]]
                    out[space.canonical(config)] = f"uniform {q}" + "".join(" + " + lv for lv in kept)
        return out

    def prior_weights(self) -> dict[str, float]:
        """Structure units: the priors' mass per layer (mean 1 within a kind); precision units: a constant,
        ``QUANT_PRIOR_SCALE`` (a layer at int4 costs less than one at its smallest structure)."""
        pri, raw = self.space.priors, {}
        for u in self.space.units:
            if u.kind == "attn":
                raw[u.name] = float(sum(abs(x) for x in pri["heads"][u.block]))
            elif u.kind == "mlp":
                raw[u.name] = float(sum(abs(x) for x in pri["neurons"][u.block]))
            elif u.kind == "block":
                raw[u.name] = float(abs(pri["layers"][u.block]))
        out = {}
        for kind in {u.kind for u in self.space.units}:
            names = [u.name for u in self.space.units if u.kind == kind]
            if kind.startswith("quant:"):
                out.update({n: QUANT_PRIOR_SCALE for n in names})
                continue
            mean = sum(raw[n] for n in names) / len(names) or 1.0
            out.update({n: max(raw[n] / mean, 1e-6) for n in names})
        return out

    def greedy(self, weights, start=None, movable=None, budget=None) -> tuple[str, ...]:
        """From the most kept / most precise (or ``start``, with only ``movable`` units reset), lower one unit a
        level at a time, the one whose estimated loss grows least per byte saved, until ``budget`` holds; then
        spend what is left. Loss of a unit at a level, relative to its lowest level (= its weight): structure,
        (share of its removable bytes removed)^2; precision, quantization noise power 4^-(bits) relative to the
        lowest level's."""
        budget = self.budget if budget is None else budget
        n_units = len(self.levels)
        movable = set(range(n_units)) if movable is None else set(movable)
        start = [0] * n_units if start is None else list(start)
        n = self.space.n_struct
        top = [0] * n_units
        full_total = self._total(top)
        shape: dict[tuple[int, int], float] = {}

        def rel(k: int, j: int) -> float:
            if (k, j) not in shape:
                if k >= n:
                    bits = [bits_per_weight(lv) for lv in self.levels[k]]
                    shape[(k, j)] = 0.0 if bits[j] >= 32 else 4.0 ** (min(bits) - bits[j])
                else:
                    last = len(self.levels[k]) - 1
                    span = max(full_total - self._total_with(top, k, last), 1e-12)  # bytes or a fraction
                    shape[(k, j)] = ((full_total - self._total_with(top, k, j)) / span) ** 2
            return shape[(k, j)]

        idx = [start[k] if k not in movable else 0 for k in range(n_units)]
        while self._total(idx) > budget:
            total = self._total(idx)
            best, best_cost, best_j = None, math.inf, None
            for k in sorted(movable):
                step = self._next_saving(idx, k, total)
                if step is None:
                    continue
                j, saved = step
                w = weights[self.space.units[k].name]
                cost = w * (rel(k, j) - rel(k, idx[k])) / saved
                if cost < best_cost:
                    best, best_cost, best_j = k, cost, j
            if best is None:
                break
            idx[best] = best_j
        idx = self._refill(idx, sorted(range(n_units), key=lambda k: -weights[self.space.units[k].name]))
        return self.space.canonical(self._config(idx))


def check_bytes_budget(evolution: CombinedEvolution, budget, reference_bytes: int, embedding=None) -> None:
    if evolution.cost.kind == "latency":
        from .strategy import check_budget

        return check_budget(evolution, budget, reference_bytes, embedding)
    low = evolution.minimum_bytes()
    if low > evolution.budget:
        raise LmscopeError(
            f"budget {budget} ({evolution.budget / 2**20:.2f} MB) is below the smallest configuration of this "
            f"space ({low / reference_bytes:.4f} of fp32, {low / 2**20:.2f} MB)",
            f"raise the budget to at least bytes={math.ceil(low / reference_bytes * 1000) / 1000:g}, or add "
            "layers to --space",
        )


def search_combined(
    lm,
    budget,
    spaces,
    *,
    levels,
    granularity="kind",
    embedding="int8",
    calibration_text=None,
    calibration_tokens=512,
    window=64,
    stages=3,
    heldout_text=None,
    heldout_tokens=1024,
    max_evals=200,
    time_limit=None,
    seed=0,
    offspring=8,
    prior="sensitivity",
    finalists=3,
    store=None,
    resume=False,
    on_eval=None,
    before_store=None,
    simulate=False,
    max_cache_bytes=2 << 30,
    priors=None,
    head_roles=True,
    prior_tokens=1024,
    latency_table=None,
    latency_timer=None,
    ray=None,
    workers=2,
) -> CombinedResult:
    """``search`` over precision and structure together under ``bytes=F`` (of the fp32 model's bytes) or
    ``latency=F`` (predicted by a ``StructureLatencyTable`` of structure x precision measured once on this machine,
    cached, or read from ``latency_table``; ``latency_timer``: how models are timed, for tests; the chosen point
    is measured on the model its recipe builds). ``ray``: candidates scored on ``workers`` Ray actors (the same
    results as in-process). Returns a ``CombinedResult``; bad inputs raise ``LmscopeError`` before any output
    exists."""
    import time

    from ..calibration import default_calibration_text
    from ..evaluate import evaluation_text
    from . import pareto_front, run_stats
    from .fitness import KLFitness, heldout_windows, perplexity
    from .store import _optuna
    from .strategy import evolve
    from .structure import head_role_table

    if budget.kind not in ("bytes", "latency"):
        raise LmscopeError(
            f"a {budget.kind} budget cannot be combined with quant: precision and structure are searched "
            "together under a bytes or latency budget",
            "use --budget bytes=FRACTION (of the fp32 bytes) or latency=FRACTION",
        )
    _optuna()
    calib = calibration_text or default_calibration_text()
    start = time.perf_counter()
    space = CombinedSpace(lm, spaces, levels, granularity, calib, priors, prior_tokens, embedding)
    db = CombinedDatabase(lm, space, max_cache_bytes, simulate)
    reference_bytes = fp32_bytes(lm.model)
    budget_bytes = int(budget.fraction * reference_bytes)
    latency = budget.kind == "latency"
    table = cost = None
    if latency or latency_table is not None:
        from .latency import StructureLatencyCost, StructureLatencyTable

        table = StructureLatencyTable.cached(lm, db, latency_table, timer=latency_timer)
        cost = StructureLatencyCost(table, db)
    limit = budget.fraction if latency else budget_bytes
    fitness = KLFitness(lm, calib, calibration_tokens, window, stages)
    evolution = CombinedEvolution(
        db, limit, None, fitness.n_stages, seed=seed, offspring=offspring, cost=cost if latency else None
    )
    check_bytes_budget(evolution, budget, reference_bytes, embedding)
    settings = {
        "model": lm.name,
        "budget": str(budget),
        "space": ",".join(spaces),
        "levels": list(space.levels),
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
        "priors": f"head importance (gradient), neuron activation x |W_down|, block influence; {prior_tokens} "
        "calibration tokens",
    }
    if table is not None:
        settings["latency_table"] = table.data["key"]
    scorers = None
    if ray is not None:  # an unreachable address or a missing extra fails here, before any output
        from .distributed import RayScorers

        scorers = RayScorers(
            lm,
            ray,
            workers,
            {
                "spaces": tuple(spaces),
                "levels": tuple(levels),
                "granularity": granularity,
                "priors": space.priors,
                "embedding": embedding,
            },
            {"text": calib, "tokens": calibration_tokens, "window": window, "stages": stages},
            simulate,
            kind="combined",
        )
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
        scorers=scorers,
    )
    search_seconds = time.perf_counter() - start
    sensitivity = dict(evolution.sensitivity)
    if not sensitivity:  # a resumed or bounded search: the probes read back from storage
        for k, unit in enumerate(space.units):
            config = list(space.full())
            config[k] = evolution.levels[k][-1]
            r = trials.get(tuple(config), 0)
            if r is not None:
                sensitivity[unit.name] = r["kl"]

    last = fitness.n_stages - 1
    best: dict[tuple, tuple[int, dict]] = {}
    for (config, stage), r in trials.results.items():
        if config not in best or stage > best[config][0]:
            best[config] = (stage, r)
    labels = evolution.seed_labels
    points = []

    def point(config, kl, stage, origin, label=""):
        nbytes = db.total_bytes(config)
        params = db.params(config)
        return {
            **(cost.fields(config) if cost is not None else {}),
            "config": space.as_dict(config),
            "describe": space.describe(config),
            "bytes": nbytes,
            "bytes_fraction": round(nbytes / reference_bytes, 6),
            "params": params,
            "params_fraction": round(params / db.reference_params, 6),
            "kl": kl,
            "kl_tokens": fitness.stage_tokens[stage],
            "stage": stage,
            "final_stage": stage == last,
            "within_budget": evolution.cost.total(config) <= evolution.budget,
            "origin": origin,
            "label": label,
        }

    for config, (stage, r) in best.items():
        points.append(point(config, r["kl"], stage, r["origin"], labels.get(config, "")))
    points.sort(key=lambda p: (p["bytes"], p["kl"]))
    finals = [p for p in points if p["final_stage"]]
    for i in pareto_front(finals, "latency_fraction" if latency else "bytes"):
        finals[i]["pareto"] = True
    full = space.full()
    feasible = [
        i
        for i, p in enumerate(points)
        if p["final_stage"] and p["within_budget"] and tuple(p["config"].values()) != full
    ]
    chosen = min(feasible, key=lambda i: (points[i]["kl"], points[i]["bytes"])) if feasible else None

    heldout = heldout_windows(lm, heldout_text or evaluation_text()[0], heldout_tokens)
    with torch.no_grad():
        reference_ppl = perplexity(lm, heldout)
        confirm = [] if chosen is None else [chosen]
        confirm += [i for i, p in enumerate(points) if p["origin"] == "uniform" and p["final_stage"]]
        confirm += [i for i, p in enumerate(points) if p.get("pareto") and p["within_budget"]][-finalists:]
        for i in dict.fromkeys(confirm):
            config = tuple(points[i]["config"][u.name] for u in space.units)
            points[i]["ppl"] = perplexity(db.assemble(config), heldout)
        # uniform precision with every head, neuron and block (over the budget unless it is loose): baselines
        n = space.n_struct
        for q in space.qspace.levels:
            config = space.full()[:n] + tuple(q for _ in space.qspace.units)
            if q == "float" or config in best:
                continue
            work = db.assemble(config)
            p = point(config, fitness.kl(work, last)[0], last, "baseline", f"uniform {q}")
            p.update({"final_stage": False, "baseline": True, "ppl": perplexity(work, heldout)})
            points.append(p)
    from .structure import latency_report

    latency_stats = latency_report(table, lm, space, points, chosen, latency, calib, latency_timer)
    roles = head_role_table(lm) if head_roles and "heads" in spaces else None
    return CombinedResult(
        model=lm.name,
        budget=budget,
        budget_bytes=budget_bytes,
        reference_bytes=reference_bytes,
        reference_params=db.reference_params,
        units=[
            {"name": u.name, "block": u.block, "kind": u.kind, "paths": list(u.paths)} for u in space.units
        ],
        levels=list(space.levels),
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
        space=space,
        priors=space.priors,
        head_roles=roles,
        unit_levels={u.name: list(lvs) for u, lvs in zip(space.units, space.unit_levels)},
        head_keep={f"{i}:{lv}": v for (i, lv), v in space.head_keep.items()},
    )


@dataclass
class CombinedResult(StructuredResult):
    """A combined search's result: points carry exact bytes (the budget) and the block parameters they keep;
    the structure's priors and head roles for "what the search kept"; the precision of every kept unit."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["budget"] = {"kind": "bytes", "fraction": self.budget.fraction, "bytes": self.budget_bytes}
        if self.budget.kind == "latency":
            d["budget"] = {"kind": "latency", "fraction": self.budget.fraction}
        d["reference"] = {
            "bytes_fp32": self.reference_bytes,
            "block_params": self.reference_params,
            "ppl": self.reference_ppl,
        }
        return d

    def to_text(self) -> str:
        if self.budget.kind == "latency":
            header = (
                f"search {self.model}: budget {self.budget} of the original's measured latency (precision and "
                "structure together)"
            )
            where = lambda p: (  # noqa: E731
                f"latency {p['latency_fraction']:.3f}, {p['bytes_fraction']:.4f} of fp32, "
                f"{p['params_fraction']:.3f} of block params"
            )
            return "\n".join(
                self._text(header, "latency_fraction", where, 36) + self._latency_lines() + self._kept()
            )
        header = (
            f"search {self.model}: budget {self.budget} = {self.budget_bytes / 2**20:.2f} MB "
            "(precision and structure together)"
        )
        where = lambda p: f"{p['bytes_fraction']:.4f} of fp32, {p['params_fraction']:.3f} of block params"  # noqa: E731
        return "\n".join(self._text(header, "bytes", where, 36) + self._kept())
