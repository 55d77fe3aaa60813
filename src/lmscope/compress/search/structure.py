"""The structured search: per block, how many attention heads stay (GQA-aware), how many MLP neurons stay,
and whether the block stays at all, under a budget of block parameters (``--budget params=0.75``).

Within a layer, which heads and neurons go is fixed by cheap priors computed once on the calibration text:
head importance (gradient of the loss w.r.t. a per-head gate, ``explain.heads.head_importance``; the best
layout under the KV grouping by the exact per-layer choice of ``prune.heads``), Wanda-style neuron scores
(mean |activation| x ‖W_down column‖) and block influence (ShortGPT's 1 - cos) for which blocks go first.
The search decides only *how much* each layer keeps. A candidate is assembled in a working copy of the model
by the same slicing functions ``compress`` runs (``remove_heads``, ``remove_neurons``); a dropped block is
swapped for a module that returns its input, which is what removing it computes. The chosen point becomes
a recipe of explicit ``keep_heads`` / ``keep_neurons`` / ``prune_layers`` steps, so ``compress --recipe``
rebuilds exactly the candidate the search scored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import LmscopeError
from . import SearchResult, run_stats
from .space import Unit
from .strategy import Evolution, evolve

STRUCT_SPACES = ("heads", "neurons", "layers")
#: fractions of a layer's MLP neurons a level keeps
NEURON_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def neuron_level(fraction: float) -> str:
    return f"mlp{fraction * 100:g}"


def head_level(kept: int) -> str:
    return f"heads{kept}"


class Skip(nn.Module):
    """Stands for a dropped block in the working model: the residual stream passes through unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if hasattr(block, "attention_type"):  # families that pick the attention mask per layer read it
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def block_params(block: nn.Module) -> int:
    seen, total = set(), 0
    for p in block.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class StructuredSpace:
    """Units per block (``i.attn``: heads kept, ``i.mlp``: neurons kept, ``i.block``: keep / drop) with their
    levels, and the priors that fix which heads and neurons a level keeps."""

    name = "structure"

    def __init__(
        self,
        lm,
        spaces,
        calib=None,
        neuron_fractions=NEURON_FRACTIONS,
        priors: dict | None = None,
        prior_tokens: int = 1024,
    ):
        from ..prune.heads import _layer_options, check_head_surgery, layer_layout

        spaces = tuple(spaces)
        if not lm.is_causal:
            raise LmscopeError(
                f"'{lm.name}' is not a causal LM: the search's fitness is the next-token distribution",
                "search a decoder such as smollm2",
            )
        fam = lm.family
        if fam.shared:
            raise LmscopeError(
                f"family '{fam.name}' shares one block across depths: its structure cannot differ by layer",
                "search --space quant",
            )
        if "heads" in spaces:  # one line, exit 2, for families whose heads cannot be sliced exactly
            try:
                check_head_surgery(lm)
            except LmscopeError as e:
                raise LmscopeError(
                    e.problem, "search --space neurons,layers instead, or --space quant"
                ) from None
        if "neurons" in spaces and fam.mlp_out is None:
            raise LmscopeError(
                f"family '{fam.name}' has mixture-of-experts MLPs: the neurons space needs a dense MLP",
                "search --space heads,layers",
            )
        self.spaces = spaces
        self.n_layers = lm.n_layers
        self.priors = priors if priors is not None else compute_priors(lm, spaces, calib, prior_tokens)
        self.units: list[Unit] = []
        self.unit_levels: list[tuple[str, ...]] = []
        self.head_keep: dict[tuple[int, str], list[int]] = {}  # (layer, level) -> kept heads
        self.neuron_keep: dict[tuple[int, str], list[int]] = {}  # (layer, level) -> kept neurons
        blocks = fam.blocks
        for i in range(lm.n_layers):
            if "heads" in spaces:
                n_q, per_kv = layer_layout(lm, i)
                options = _layer_options(torch.as_tensor(self.priors["heads"][i]), per_kv)
                levels = []
                for removed in sorted(options):
                    lv = head_level(n_q - removed)
                    self.head_keep[(i, lv)] = sorted(options[removed][1])
                    levels.append(lv)
                self.units.append(Unit(f"{i}.attn", i, "attn", (f"{blocks}.{i}.{fam.attn}",)))
                self.unit_levels.append(tuple(levels))
            if "neurons" in spaces:
                scores = torch.as_tensor(self.priors["neurons"][i])
                d = len(scores)
                levels = []
                for f in sorted(set(neuron_fractions), reverse=True):
                    lv = neuron_level(f)
                    n_keep = max(1, round(d * f))
                    self.neuron_keep[(i, lv)] = sorted(torch.topk(scores, n_keep).indices.tolist())
                    levels.append(lv)
                mlp = fam.mlp_out.rpartition(".")[0]
                self.units.append(Unit(f"{i}.mlp", i, "mlp", (f"{blocks}.{i}.{mlp}",)))
                self.unit_levels.append(tuple(levels))
            if "layers" in spaces:
                self.units.append(Unit(f"{i}.block", i, "block", (f"{blocks}.{i}",)))
                self.unit_levels.append(("keep", "drop"))
        self.units = tuple(self.units)
        self.levels: tuple[str, ...] = tuple(dict.fromkeys(lv for lvs in self.unit_levels for lv in lvs))

    # -- configurations: one level name per unit -----------------------------------------------------------
    def full(self) -> tuple[str, ...]:
        return tuple(lvs[0] for lvs in self.unit_levels)

    def as_dict(self, config) -> dict[str, str]:
        return {u.name: lv for u, lv in zip(self.units, config)}

    def canonical(self, config) -> tuple[str, ...]:
        """A dropped block's heads and neurons do not matter: they are written at their first level."""
        dropped = {u.block for u, lv in zip(self.units, config) if lv == "drop"}
        return tuple(
            self.unit_levels[k][0] if u.kind != "block" and u.block in dropped else lv
            for k, (u, lv) in enumerate(zip(self.units, config))
        )

    def structure(self, config) -> tuple[dict[int, list[int]], dict[int, list[int]], list[int]]:
        """(kept heads by layer, kept neurons by layer, dropped layers): only layers that change."""
        heads, neurons, dropped = {}, {}, []
        for u, lv in zip(self.units, config):
            if u.kind == "block" and lv == "drop":
                dropped.append(u.block)
        for k, (u, lv) in enumerate(zip(self.units, config)):
            if u.block in dropped or lv == self.unit_levels[k][0]:
                continue
            if u.kind == "attn":
                heads[u.block] = self.head_keep[(u.block, lv)]
            elif u.kind == "mlp":
                neurons[u.block] = self.neuron_keep[(u.block, lv)]
        return heads, neurons, sorted(dropped)

    #: the refit spec the search's candidates were compensated with (``Refit.spec``), carried by its recipes
    refit_spec: dict | None = None

    def recipe(self, config, refit: dict | None | bool = True):
        """The recipe of ``config``; ``refit=True``: with the search's compensation (if it used one)."""
        return recipe_of(*self.structure(config), refit=self.refit_spec if refit is True else refit or None)

    def describe(self, config) -> str:
        return describe_structure(self.spaces, *self.structure(config))


def recipe_of(heads: dict, neurons: dict, dropped, refit: dict | None = None) -> object:
    """The Recipe removing exactly this structure (kept heads / neurons by original layer, dropped layers);
    ``refit`` (a ``Refit.spec``): the keep steps re-solve the consuming projections as the search did."""
    from ..recipe import Recipe
    from ..steps import KeepHeads, KeepNeurons, PruneLayers

    steps = []
    if heads:
        steps.append(KeepHeads(layers={str(i): list(v) for i, v in heads.items()}, refit=refit))
    if neurons:
        steps.append(KeepNeurons(layers={str(i): list(v) for i, v in neurons.items()}, refit=refit))
    if dropped:  # last: the head and neuron steps use the original layer numbering
        steps.append(PruneLayers(layers=tuple(dropped)))
    if not steps:
        raise LmscopeError("the configuration keeps every head, neuron and block", "nothing to compress")
    return Recipe(tuple(steps))


def describe_structure(spaces, heads: dict, neurons: dict, dropped) -> str:
    parts = []
    if "heads" in spaces:
        parts.append(f"heads cut in {len(heads)} layers")
    if "neurons" in spaces:
        parts.append(f"neurons cut in {len(neurons)} layers")
    if "layers" in spaces:
        parts.append(f"dropped blocks {list(dropped)}" if dropped else "no block dropped")
    return ", ".join(parts)


def compute_priors(lm, spaces, calib=None, tokens: int = 1024, window: int = 128) -> dict:
    """Per-layer head importance, neuron scores and block influence, once (higher = more worth keeping), on
    the first ``tokens`` tokens of the calibration text."""
    from ...data import token_windows
    from ..prune.heads import gradient_importance
    from ..prune.layers import block_influence
    from ..prune.neurons import neuron_scores

    if calib is None or isinstance(calib, str):
        rows = token_windows(lm, calib, max_tokens=tokens, window=window)
        calib = [{"input_ids": r[None], "attention_mask": torch.ones_like(r[None])} for r in rows]
    out: dict = {}
    if "heads" in spaces:
        out["heads"] = [s.tolist() for s in gradient_importance(lm, calib)]
    if "neurons" in spaces:
        out["neurons"] = [s.tolist() for s in neuron_scores(lm, "activation", calib)]
    if "layers" in spaces:
        out["layers"] = list(block_influence(lm, calib))
    return out


class Refit:
    """Least-squares compensation for the search (``prune.refit``): the Gram matrices of every o_proj /
    down_proj input of the original model on the first ``tokens`` calibration tokens, collected once, and
    the recipe spec that makes ``compress`` compute the same refit on the same tokens."""

    def __init__(
        self, lm, text, tokens: int | None = None, window: int | None = None, damp: float | None = None
    ):
        from ..prune.refit import (
            REFIT_DAMP,
            REFIT_TOKENS,
            REFIT_WINDOW,
            cached_grams,
            refit_windows,
            tokens_digest,
        )

        tokens = REFIT_TOKENS if tokens is None else tokens
        window = REFIT_WINDOW if window is None else window
        self.damp = REFIT_DAMP if damp is None else damp
        windows = refit_windows(lm, text, tokens, window)
        self.spec = {"tokens": tokens, "window": window, "damp": self.damp, "digest": tokens_digest(windows)}
        self.n_tokens = int(windows.numel())
        with torch.no_grad():
            self.grams = cached_grams(lm, windows)


class StructureDatabase:
    """Assembles candidates in a working copy of the model and knows every candidate's block parameters
    exactly (measured once per layer and level by slicing, then summed: attention and MLP are disjoint).
    With ``refit``, each sliced o_proj / down_proj is replaced by its least-squares refit on the original
    model's inputs, built once per layer and kept set (cached) and switched off by setting ``compensate``."""

    def __init__(self, lm, space: StructuredSpace, refit: Refit | None = None):
        from ...lm import LM

        self.space = space
        self.refit = refit
        self.compensate = refit is not None
        self.refits: dict[tuple, nn.Module] = {}  # (kind, layer, kept) -> the refit projection module
        self.refit_info: dict[tuple, dict] = {}
        self.work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        fam = lm.family
        self.fam = fam
        self.container = self.work.model.get_submodule(fam.blocks)
        self.blocks = list(self.container)
        paths = {fam.q, fam.k, fam.v, fam.o}
        if fam.mlp_out is not None:
            paths |= {*fam.mlp_in, fam.mlp_out}
        self.originals = [
            {p: b.get_submodule(p) for p in paths if p} for b in self.blocks
        ]  # the float modules, swapped back before another slicing
        self.attrs = [dict(vars(b.get_submodule(fam.attn))) for b in self.blocks]
        self.attrs = [
            {k: v for k, v in a.items() if isinstance(v, (int, float, bool)) and not k.startswith("_")}
            for a in self.attrs
        ]
        self.state: list[tuple] = [((None, None, False), False)] * len(self.blocks)
        self.built = 0
        n = len(self.blocks)
        self.full_params = [block_params(b) for b in self.blocks]
        self.reference_params = sum(self.full_params)
        self.attn_delta: dict[tuple[int, str], int] = {}
        self.mlp_delta: dict[tuple[int, str], int] = {}
        with torch.no_grad():
            for (i, lv), kept in space.head_keep.items():
                self._set(i, (kept, None, False))
                self.attn_delta[(i, lv)] = block_params(self.blocks[i]) - self.full_params[i]
            smallest: dict[int, tuple[str, list[int]]] = {}
            for (i, lv), kept in space.neuron_keep.items():
                if i not in smallest or len(kept) < len(smallest[i][1]):
                    smallest[i] = (lv, kept)
            for i, (lv, kept) in smallest.items():  # one slicing per layer: the rest is affine in the count
                self._set(i, (None, kept, False))
                self.mlp_delta[(i, lv)] = block_params(self.blocks[i]) - self.full_params[i]
            for i in range(n):
                self._set(i, (None, None, False))

    # -- the working model -----------------------------------------------------------------------------
    def _set(self, i: int, state: tuple) -> None:
        """Block ``i`` to (kept heads or None, kept neurons or None, dropped)."""
        from ..prune.heads import remove_heads
        from ..prune.neurons import remove_neurons
        from ..targets import set_module

        key = (state, self.compensate)
        if self.state[i] == key:
            return
        heads, neurons, dropped = state
        block = self.blocks[i]
        self.container[i] = block
        for p, m in self.originals[i].items():
            set_module(block, p, m)
        attn = block.get_submodule(self.fam.attn)
        for k, v in self.attrs[i].items():
            setattr(attn, k, v)
        if heads is not None:
            remove_heads(self.work, {i: heads}, track_origin=False)
            if self.compensate and not dropped:
                self._compensate(i, "attn", self.fam.o, heads)
        if neurons is not None:
            remove_neurons(self.work, {i: neurons})
            if self.compensate and not dropped:
                self._compensate(i, "mlp", self.fam.mlp_out, neurons)
        if dropped:
            self.container[i] = Skip(block)
        self.state[i] = key
        self.built += 1

    def _compensate(self, i: int, kind: str, path: str, kept) -> None:
        """Swap layer ``i``'s sliced projection for its refit (built on first use, then cached)."""
        from ..prune._linear import weight_out_in
        from ..prune.refit import head_columns, refit_projection
        from ..targets import set_module

        block = self.blocks[i]
        key = (kind, i, tuple(kept))
        if key not in self.refits:
            columns = head_columns(self.work, kept) if kind == "attn" else list(kept)
            full = weight_out_in(self.originals[i][path])
            self.refit_info[key] = refit_projection(
                block, path, full, self.refit.grams[(kind, i)], columns, self.refit.damp
            )
            self.refits[key] = block.get_submodule(path)
        set_module(block, path, self.refits[key])

    def block_states(self, config) -> list[tuple]:
        heads, neurons, dropped = self.space.structure(config)
        return [(heads.get(i), neurons.get(i), i in dropped) for i in range(len(self.blocks))]

    @torch.no_grad()
    def assemble_states(self, states):
        for i, s in enumerate(states):
            self._set(i, s)
        return self.work

    def assemble(self, config):
        return self.assemble_states(self.block_states(config))

    # -- costs -----------------------------------------------------------------------------------------
    def params_of_states(self, states) -> int:
        total = 0
        for i, (heads, neurons, dropped) in enumerate(states):
            if dropped:
                continue
            total += self.full_params[i]
            if heads is not None:
                total += self._attn_delta(i, heads)
            if neurons is not None:
                total += self._mlp_delta(i, len(neurons))
        return total

    def _attn_delta(self, i, heads) -> int:
        lv = head_level(len(heads))
        if self.space.head_keep.get((i, lv)) == list(heads):
            return self.attn_delta[(i, lv)]
        raise LmscopeError(f"layer {i}: head layout {heads} is not one of the search's", "internal")

    def _mlp_delta(self, i, n_keep) -> int:
        """Block-parameter change for keeping ``n_keep`` neurons: affine in the count (each neuron is one row
        of every input projection, with its bias, and one column of the output projection)."""
        d = len(self.space.priors["neurons"][i])
        lv = next(lv for (j, lv) in self.mlp_delta if j == i)
        k = len(self.space.neuron_keep[(i, lv)])
        if n_keep == d or k == d:
            return 0
        per, rest = divmod(self.mlp_delta[(i, lv)], k - d)
        assert rest == 0, "MLP parameters are not a whole number per neuron"
        return per * (n_keep - d)

    def total_bytes(self, config) -> int:
        """The cost the budget counts, named as the quantization database's: here, block parameters."""
        return self.params_of_states(self.block_states(config))

    total_params = total_bytes


class StructuredEvolution(Evolution):
    """EvoPress evolution over (heads, neurons, block) levels under a block-parameter budget. Mutations are
    the parent class's (one unit up, others down until the budget holds, free parameters refilled);
    children are canonicalized (a dropped block's other units do not matter)."""

    def __init__(
        self, db: StructureDatabase, budget, evaluate, n_stages: int, seed=0, offspring=8, cost=None
    ):
        import random

        self.db = db
        self.space = db.space
        self.budget = budget
        self.evaluate = evaluate
        self.rng = random.Random(seed)
        self.offspring = offspring
        self.levels = [list(lvs) for lvs in self.space.unit_levels]
        self.last = n_stages - 1
        self.sensitivity: dict[str, float] = {}
        self.parent = None
        self.history: list[dict] = []
        self.seed_labels: dict[tuple, str] = {}
        self.extra_seeds: list[tuple[str, ...]] = []
        from .latency import ByteCost

        # the parent's moves ask a cost: block parameters (db.total_bytes), or a StructureLatencyCost
        self.cost = cost if cost is not None else ByteCost(db)

    def mutate(self, parent):
        child = super().mutate(parent)
        if child is None:
            return None
        child = self.space.canonical(child)
        if (
            child == tuple(parent)
            or self._total(self._index(child)) > self.budget
            or self._all_dropped(child)
        ):
            return None
        return child

    def _all_dropped(self, config) -> bool:
        blocks = [lv for u, lv in zip(self.space.units, config) if u.kind == "block"]
        return bool(blocks) and all(lv == "drop" for lv in blocks)

    def minimum_bytes(self) -> int:
        """The fewest block parameters of the space (one block must stay: a model without blocks is refused)."""
        low = [len(lv) - 1 for lv in self.levels]
        if "layers" not in self.space.spaces:
            return self._total(low)
        best = None
        for b in range(self.space.n_layers):
            idx = [0 if u.kind == "block" and u.block == b else k for u, k in zip(self.space.units, low)]
            best = self._total(idx) if best is None else min(best, self._total(idx))
        return best

    # -- seeds --------------------------------------------------------------------------------------------
    def uniform_seeds(self) -> dict[tuple, str]:
        """Uniform importance-ordered configurations (every layer the same level) that fit the budget, the
        most parameters first per kind; and the fewest least-influential blocks dropped (ShortGPT)."""
        space, out = self.space, {}
        kinds = [k for k in ("attn", "mlp") if any(u.kind == k for u in space.units)]
        full = list(space.full())

        def uniform(levels_by_kind):
            config = list(full)
            for k, u in enumerate(space.units):
                lv = levels_by_kind.get(u.kind)
                if lv is not None:
                    if lv not in self.levels[k]:
                        return None
                    config[k] = lv
            return tuple(config)

        level_lists = {
            k: list(
                dict.fromkeys(lv for u, lvs in zip(space.units, self.levels) if u.kind == k for lv in lvs)
            )
            for k in kinds
        }
        combos = [{}]
        for k in kinds:
            combos = [{**c, k: lv} for c in combos for lv in level_lists[k]]
        feasible = []
        for c in combos:
            config = uniform(c)
            if config is not None and self.cost.total(config) <= self.budget:
                feasible.append((c, config))
        # keep the uniform points no other uniform point dominates (more parameters at every kind)
        for c, config in feasible:
            dominated = any(
                d is not c and all(level_lists[k].index(d[k]) <= level_lists[k].index(c[k]) for k in kinds)
                for d, _ in feasible
            )
            if not dominated and c:
                out[config] = "uniform " + " ".join(c[k] for k in kinds)
        if "layers" in space.spaces:
            influence = space.priors["layers"]
            order = sorted(range(space.n_layers), key=lambda i: influence[i])
            for n in range(1, space.n_layers):
                drop = set(order[:n])
                config = tuple(
                    "drop" if u.kind == "block" and u.block in drop else lv
                    for u, lv in zip(space.units, full)
                )
                if self.cost.total(config) <= self.budget:
                    out[space.canonical(config)] = f"drop {n} blocks (block influence)"
                    break
        return out

    def measure_sensitivity(self) -> dict[str, float]:
        """KL at the first stage with one unit at its fewest-parameters level and everything else full."""
        probes = []
        for k in range(len(self.space.units)):
            config = list(self.space.full())
            config[k] = self.levels[k][-1]
            probes.append(tuple(config))
        kls = self._many(probes, 0, "sensitivity")
        return {u.name: kl for u, kl in zip(self.space.units, kls)}

    def greedy(
        self,
        weights: dict[str, float],
        start: list[int] | None = None,
        movable=None,
        budget: int | None = None,
    ) -> tuple[str, ...]:
        """From the full model (or ``start``, with only the ``movable`` units lowered), lower one unit a level at
        a time, the one whose estimated loss (its weight x (share of its removable parameters removed)^2) grows
        least per parameter saved, until ``budget`` (default: the search's) holds; then spend what is left."""
        budget = self.budget if budget is None else budget
        movable = set(range(len(self.levels))) if movable is None else set(movable)
        start = [0] * len(self.levels) if start is None else list(start)
        idx = [0] * len(self.levels)
        span = []
        for k in range(len(self.levels)):
            top = self._total_with(idx, k, 0)
            low = self._total_with(idx, k, len(self.levels[k]) - 1)
            span.append(max(top - low, 1e-12))  # parameters, or a latency fraction

        full_total = self._total([0] * len(idx))
        removed_memo: dict[tuple[int, int], int] = {}

        def loss(k, level_index, total_now):
            if (k, level_index) not in removed_memo:
                removed_memo[(k, level_index)] = full_total - self._total_with([0] * len(idx), k, level_index)
            return weights[self.space.units[k].name] * (removed_memo[(k, level_index)] / span[k]) ** 2

        idx = [start[k] if k not in movable else 0 for k in range(len(idx))]
        while self._total(idx) > budget:
            total = self._total(idx)
            best, best_cost, best_j = None, math.inf, None
            for k in sorted(movable):
                step = self._next_saving(idx, k, total)
                if step is None:
                    continue
                j, saved = step
                cost = (loss(k, j, total) - loss(k, idx[k], total)) / saved
                if cost < best_cost:
                    best, best_cost, best_j = k, cost, j
            if best is None:
                break
            idx[best] = best_j
        idx = self._refill(idx, sorted(range(len(idx)), key=lambda k: -weights[self.space.units[k].name]))
        return self.space.canonical(self._config(idx))

    def prior_weights(self) -> dict[str, float]:
        """Cheap, unmeasured weights per unit from the priors (mean 1 within a kind): a layer's summed head
        importance, its summed neuron scores (its MLP's expected write to the residual stream), its block
        influence. Layers with more prior mass keep more."""
        pri = self.space.priors
        raw = {}
        for u in self.space.units:
            if u.kind == "attn":
                raw[u.name] = float(sum(abs(x) for x in pri["heads"][u.block]))
            elif u.kind == "mlp":
                raw[u.name] = float(sum(abs(x) for x in pri["neurons"][u.block]))
            else:
                raw[u.name] = float(abs(pri["layers"][u.block]))
        out = {}
        for kind in {u.kind for u in self.space.units}:
            names = [u.name for u in self.space.units if u.kind == kind]
            mean = sum(raw[n] for n in names) / len(names) or 1.0
            out.update({n: max(raw[n] / mean, 1e-6) for n in names})
        return out

    def redistribute(self, config, weights: dict[str, float]) -> tuple[str, ...]:
        """A uniform seed with each kind's removed parameters moved between layers by ``weights``, kind by
        kind, keeping each kind's parameters: the same amount of heads / neurons removed, placed by priors."""
        idx = self._index(config)
        for kind in ("attn", "mlp"):
            movable = [k for k, u in enumerate(self.space.units) if u.kind == kind]
            if not movable:
                continue
            target = self._total(idx)
            idx = self._index(self.greedy(weights, idx, movable, budget=target))
            if self._total(idx) > target:
                return tuple(config)
        return self.space.canonical(self._config(idx))

    def _next_saving(self, idx, k: int, total) -> tuple[int, float] | None:
        """Unit ``k``'s next lower level that saves cost, and what it saves (a measured latency can be flat
        over a few levels: the greedy moves past such plateaus)."""
        for j in range(idx[k] + 1, len(self.levels[k])):
            saved = total - self._total_with(idx, k, j)
            if saved > 0:
                return j, saved
        return None

    def _total_with(self, idx, k, level_index) -> int:
        j = list(idx)
        j[k] = level_index
        return self._total(j)

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, prior: str = "sensitivity") -> None:
        self.seed_labels = self.uniform_seeds()
        self._many(list(self.seed_labels), self.last, "uniform")
        seeds = list(self.seed_labels)
        if prior == "sensitivity":
            self.sensitivity = self.measure_sensitivity()
            weights = {k: max(v, 1e-12) for k, v in self.sensitivity.items()}
        elif prior == "priors":  # no measurement: the priors' mass per layer (for slow machines)
            weights = self.prior_weights()
            for config in list(seeds):
                seeds.append(self.redistribute(config, weights))
        else:
            weights = {u.name: 1.0 for u in self.space.units}
        seeds.append(self.greedy(weights))
        for config in list(seeds):  # each uniform seed's spare parameters spent too
            seeds.append(
                self.space.canonical(self._config(self._refill(self._index(config), range(len(self.levels)))))
            )
        seeds = list(dict.fromkeys(seeds))
        seeds = [c for c in seeds if self.cost.total(c) <= self.budget] or seeds
        scored = [(kl, i, c) for i, (kl, c) in enumerate(zip(self._many(seeds, self.last, "seed"), seeds))]
        self.parent = min(scored)[2]
        while True:
            parent_kl = self.evaluate(self.parent, self.last, "seed")
            self.evaluate.check_time()
            kids, tries = [], 0
            while len(kids) < self.offspring and tries < 20 * self.offspring:
                tries += 1
                child = self.mutate(self.parent)
                if child is not None and child not in kids and not self.evaluate.seen(child, self.last):
                    kids.append(child)
            if not kids:
                return
            for stage in range(self.last + 1):
                ranked = sorted((kl, i, c) for i, (kl, c) in enumerate(zip(self._many(kids, stage), kids)))
                if stage < self.last:
                    kids = [c for _, _, c in ranked[: max(1, math.ceil(len(kids) / 4))]]
            best_kl, _, best = ranked[0]
            accepted = best_kl < parent_kl
            if accepted:
                self.parent = best
            self.history.append({"parent_kl": min(best_kl, parent_kl), "accepted": accepted})


def latency_report(table, lm, space, points, chosen, latency: bool, calib, timer=None) -> dict:
    """The latency table's summary for ``stats``, and under a latency budget the chosen point's predicted
    latency checked on the model ``compress`` builds from its recipe."""
    if table is None:
        return {}
    from .latency import table_summary

    out = {"latency_table": table_summary(table, "grid", "timings", "timer")}
    if latency and chosen is not None:
        from .latency import measure_chosen

        config = tuple(points[chosen]["config"][u.name] for u in space.units)
        out["chosen_measured"] = measure_chosen(lm, space.recipe(config), table, points[chosen], calib, timer)
    return out


def check_params_budget(evolution: StructuredEvolution, budget, reference: int) -> None:
    if evolution.cost.kind == "latency":
        from .strategy import check_budget

        return check_budget(evolution, budget, reference)
    low = evolution.minimum_bytes()
    if low > evolution.budget:
        raise LmscopeError(
            f"budget {budget} ({evolution.budget} block parameters) is below the smallest configuration of "
            f"this space ({low / reference:.4f} of the block parameters)",
            f"raise the budget to at least params={math.ceil(low / reference * 1000) / 1000:g}, or add layers "
            "to --space",
        )


def uniform_baselines(
    db: StructureDatabase, budget, configs: dict | None = None, cost=None
) -> dict[str, list[tuple]]:
    """Uniform importance-ordered pruning at the budget, off the level grid: every layer loses the same number
    of neurons (the fewest that fit), alone and beside uniformly pruned heads. ``cost(states)``: what the budget
    limits (default: block parameters; a predicted latency fraction). Returns block states by label; ``configs`` (if given) receives each one's per-unit description (neuron fractions
    off the level grid)."""
    space = db.space
    cost = db.params_of_states if cost is None else cost
    out: dict[str, list[tuple]] = {}
    configs = {} if configs is None else configs
    n = space.n_layers
    if "neurons" not in space.spaces:
        return out
    head_options: list[tuple[str, dict]] = [("", {})]
    if "heads" in space.spaces:
        n_q = len(space.priors["heads"][0])
        counts = sorted({int(lv[5:]) for (_, lv) in space.head_keep}, reverse=True)
        # the head level nearest to removing a quarter of the heads, the uniform heads+neurons baseline
        target = min(counts[1:] or counts, key=lambda c: abs(c / n_q - 0.75))
        if all((i, head_level(target)) in space.head_keep for i in range(n)):
            head_options.append(
                (f"heads {target}/{n_q} + ", {i: space.head_keep[(i, head_level(target))] for i in range(n)})
            )
    for label, heads in head_options:
        d = len(space.priors["neurons"][0])
        for keep in range(d - 1, 0, -1):  # counted with stand-in lists; the kept neurons chosen once it fits
            if cost([(heads.get(i), range(keep), False) for i in range(n)]) <= budget:
                name = f"uniform {label}neurons {keep}/{d}"
                configs[name] = {
                    **({f"{i}.attn": head_level(len(h)) for i, h in heads.items()}),
                    **{f"{i}.mlp": neuron_level(round(keep / d, 6)) for i in range(n)},
                }
                out[name] = [
                    (
                        heads.get(i),
                        sorted(
                            torch.topk(torch.as_tensor(space.priors["neurons"][i]), keep).indices.tolist()
                        ),
                        False,
                    )
                    for i in range(n)
                ]
                break
    return out


def search_structure(
    lm,
    budget,
    spaces,
    *,
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
    neuron_fractions=NEURON_FRACTIONS,
    priors=None,
    head_roles=True,
    prior_tokens=1024,
    refit=True,
    refit_tokens=None,
    refit_damp=None,
    ray=None,
    workers=2,
    latency_table=None,
    latency_timer=None,
):
    """``search`` for the structured spaces (heads, neurons, layers) under ``params=F`` (F of the block
    parameters kept) or ``latency=F`` (the mean of the prefill and decode ratios to the original, predicted by a
    ``StructureLatencyTable`` measured once on this machine and cached, or read from ``latency_table``;
    ``latency_timer``: how models are timed, for tests); the chosen point's latency is then measured on the
    model its recipe builds. ``refit``: every candidate's sliced o_proj / down_proj re-solved by least squares on the
    original model's inputs (``refit_tokens`` calibration tokens, ridge ``refit_damp``; the recipe carries
    it); uniform baselines are scored both with and without it. Returns a ``StructuredResult``."""
    import time

    from ..calibration import default_calibration_text
    from ..evaluate import evaluation_text
    from . import pareto_front
    from .fitness import KLFitness, heldout_windows, perplexity
    from .store import _optuna

    if budget.kind not in ("params", "latency"):
        raise LmscopeError(
            f"a {budget.kind} budget does not apply to the structured spaces ({','.join(spaces)})",
            "use --budget params=FRACTION (of the block parameters kept) or latency=FRACTION",
        )
    _optuna()
    calib = calibration_text or default_calibration_text()
    start = time.perf_counter()
    space = StructuredSpace(lm, spaces, calib, neuron_fractions, priors, prior_tokens)
    compensation = None
    if refit and ("heads" in spaces or "neurons" in spaces):
        compensation = Refit(lm, calib, refit_tokens, damp=refit_damp)
        space.refit_spec = compensation.spec
    db = StructureDatabase(lm, space, compensation)
    budget_params = int(budget.fraction * db.reference_params)
    latency = budget.kind == "latency"
    table = cost = None
    if latency or latency_table is not None:
        from .latency import StructureLatencyCost, StructureLatencyTable

        table = StructureLatencyTable.cached(lm, db, latency_table, timer=latency_timer)
        cost = StructureLatencyCost(table, db)
    limit = budget.fraction if latency else budget_params
    fitness = KLFitness(lm, calib, calibration_tokens, window, stages)
    evolution = StructuredEvolution(
        db, limit, None, fitness.n_stages, seed=seed, offspring=offspring, cost=cost if latency else None
    )
    check_params_budget(evolution, budget, db.reference_params)
    settings = {
        "model": lm.name,
        "budget": str(budget),
        "space": ",".join(spaces),
        "levels": list(space.levels),
        "calibration_tokens": calibration_tokens,
        "calibration": "given text" if calibration_text else "built-in calibration half",
        "window": window,
        "stages": stages,
        "seed": seed,
        "offspring": offspring,
        "prior": prior,
        "priors": f"head importance (gradient), neuron activation x |W_down|, block influence; {prior_tokens} "
        "calibration tokens",
        "refit": None
        if compensation is None
        else {**compensation.spec, "calibration_tokens_used": compensation.n_tokens},
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
                "priors": space.priors,
                "neuron_fractions": tuple(neuron_fractions),
                "refit": space.refit_spec,
            },
            {"text": calib, "tokens": calibration_tokens, "window": window, "stages": stages},
            False,
            kind="structure",
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
    if not sensitivity:  # a resumed or bounded search: read the probes back from storage
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
    other = lm.n_params() - db.reference_params  # embeddings, final norm, head: not in the budget
    labels = evolution.seed_labels
    points = []
    for config, (stage, r) in best.items():
        params = int(r["bytes"])
        points.append(
            {
                **(cost.fields(config) if cost is not None else {}),
                "config": space.as_dict(config),
                "describe": space.describe(config),
                "params": params,
                "params_fraction": round(params / db.reference_params, 6),
                "model_params": other + params,
                "bytes": 4 * (other + params),
                "bytes_fraction": round((other + params) / (other + db.reference_params), 6),
                "kl": r["kl"],
                "kl_tokens": fitness.stage_tokens[stage],
                "stage": stage,
                "final_stage": stage == last,
                "within_budget": evolution.cost.total(config) <= evolution.budget,
                "origin": r["origin"],
                "label": labels.get(config, ""),
            }
        )
    points.sort(key=lambda p: (p["params"], p["kl"]))
    finals = [p for p in points if p["final_stage"]]
    for i in pareto_front(finals, "latency_fraction" if latency else "bytes"):
        finals[i]["pareto"] = True
    full = space.full()
    feasible = [
        i
        for i, p in enumerate(points)
        if p["final_stage"] and p["within_budget"] and tuple(p["config"].values()) != full
    ]
    chosen = min(feasible, key=lambda i: (points[i]["kl"], -points[i]["params"])) if feasible else None

    heldout = heldout_windows(lm, heldout_text or evaluation_text()[0], heldout_tokens)
    reference_ppl = perplexity(lm, heldout)
    confirm = [] if chosen is None else [chosen]
    confirm += [i for i, p in enumerate(points) if p["origin"] == "uniform" and p["final_stage"]]
    confirm += [i for i, p in enumerate(points) if p.get("pareto") and p["within_budget"]][-finalists:]
    for i in dict.fromkeys(confirm):
        config = tuple(points[i]["config"][u.name] for u in space.units)
        points[i]["ppl"] = perplexity(db.assemble(config), heldout)
    # uniform pruning at the budget's parameters off the level grid, scored the same way
    with torch.no_grad():
        baseline_recipes, baseline_configs = {}, {}
        variants = [(True, " + refit"), (False, "")] if compensation is not None else [(False, "")]
        plain = uniform_baselines(db, limit, baseline_configs, cost=cost.states_fraction if latency else None)
        for (compensate, suffix), (base_label, states) in (
            (v, item) for item in plain.items() for v in variants
        ):
            label = base_label + suffix
            baseline_configs[label] = baseline_configs[base_label]
            db.compensate = compensate
            baseline_recipes[label] = recipe_of(
                {i: h for i, (h, _, _) in enumerate(states) if h is not None},
                {i: n for i, (_, n, _) in enumerate(states) if n is not None},
                [i for i, (_, _, d) in enumerate(states) if d],
                refit=space.refit_spec if compensate else None,
            )
            params = db.params_of_states(states)
            work = db.assemble_states(states)
            kl, _ = fitness.kl(work, last)
            timing = {}
            if cost is not None:
                sec = cost.table.seconds(cost.layers_of_states(states))
                timing = {
                    "prefill_s": round(sec[0], 5),
                    "decode_s": round(sec[1], 5),
                    "latency_fraction": round(cost.table.fraction_of(sec), 5),
                }
            points.append(
                {
                    **timing,
                    "config": baseline_configs[label],
                    "describe": label,
                    "params": params,
                    "params_fraction": round(params / db.reference_params, 6),
                    "model_params": other + params,
                    "bytes": 4 * (other + params),
                    "bytes_fraction": round((other + params) / (other + db.reference_params), 6),
                    "kl": kl,
                    "kl_tokens": fitness.stage_tokens[last],
                    "stage": last,
                    "final_stage": False,
                    "within_budget": (
                        cost.states_fraction(states) <= budget.fraction
                        if latency
                        else params <= budget_params
                    ),
                    "origin": "baseline",
                    "baseline": True,
                    "label": label,
                    "refit": compensate,
                    "ppl": perplexity(work, heldout),
                }
            )
        db.compensate = compensation is not None
    latency_stats = latency_report(table, lm, space, points, chosen, latency, calib, latency_timer)
    roles = None
    if head_roles and "heads" in spaces:
        roles = head_role_table(lm)
    return StructuredResult(
        model=lm.name,
        budget=budget,
        budget_bytes=budget_params,
        reference_bytes=4 * lm.n_params(),
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
        baseline_recipes=baseline_recipes,
    )


def head_role_table(lm) -> dict:
    """Each head's role from ``explain.heads`` (induction, previous-token, sink, self) on the default text:
    {"roles": {"layer.head": [roles]}, "scores": {pattern: [[per head] per layer]}}."""
    from ...explain.heads import PATTERN_THRESHOLD, characterize_heads

    res = characterize_heads(lm)
    roles: dict[str, list[str]] = {}
    scores = {}
    for pattern, threshold in PATTERN_THRESHOLD.items():
        s = res.scores.get(pattern)
        if s is None:
            continue
        scores[pattern] = [[round(float(x), 4) for x in row] for row in s]
        for i, row in enumerate(s):
            for h, x in enumerate(row[: lm.n_heads_at(i)]):
                if float(x) >= threshold:
                    roles.setdefault(f"{i}.{h}", []).append(pattern)
    return {"roles": roles, "scores": scores, "threshold": dict(PATTERN_THRESHOLD)}


def kept_structure(result, point) -> dict:
    """For a structured point: per layer the kept heads (original numbering), neuron fraction, dropped."""
    config = point["config"]
    n_layers = max(u["block"] for u in result.units) + 1
    heads_of = {}
    for i in range(n_layers):
        lv = config.get(f"{i}.attn")
        heads_of[i] = None if lv is None else result.head_keep.get(f"{i}:{lv}")
    dropped = {i for i in range(n_layers) if config.get(f"{i}.block") == "drop"}
    neurons = {
        i: float(config[f"{i}.mlp"][3:]) / 100 if f"{i}.mlp" in config else 1.0 for i in range(n_layers)
    }
    return {"heads": heads_of, "dropped": dropped, "neurons": neurons, "n_layers": n_layers}


def role_summary(result, point) -> list[dict]:
    """Per head role (induction, previous-token, sink, self): how many such heads the point keeps."""
    roles = (result.head_roles or {}).get("roles") or {}
    if not roles:
        return []
    k = kept_structure(result, point)
    names = {
        "induction": "induction",
        "previous_token": "previous-token",
        "first_token": "sink",
        "self": "self",
    }
    out = []
    for role, name in names.items():
        heads = [h for h, rs in roles.items() if role in rs]
        if not heads:
            continue
        removed = []
        for h in heads:
            i, j = (int(x) for x in h.split("."))
            kept = k["heads"].get(i)
            if i in k["dropped"] or (kept is not None and j not in kept):
                removed.append(h)
        out.append({"role": name, "heads": sorted(heads), "removed": sorted(removed)})
    return out


def role_sentence(summary: list[dict]) -> str:
    parts = []
    for r in summary:
        n, gone = len(r["heads"]), len(r["removed"])
        if gone == 0:
            parts.append(f"kept {n}/{n} {r['role']} heads")
        elif gone == n:
            parts.append(f"removed all {n} {r['role']} heads")
        else:
            parts.append(f"kept {n - gone}/{n} {r['role']} heads (removed {gone / n:.0%})")
    return "; ".join(parts)


@dataclass
class StructuredResult(SearchResult):
    """A structured search's result: points carry block parameters (``params``); the priors, each head's
    role and the head layouts behind every level, for the report's "what the search kept"."""

    priors: dict = field(default_factory=dict)
    head_roles: dict | None = None
    unit_levels: dict = field(default_factory=dict)
    head_keep: dict = field(default_factory=dict)
    baseline_recipes: dict = field(default_factory=dict)  # label -> Recipe (not serialized)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["budget"] = {"kind": "params", "fraction": self.budget.fraction, "params": self.budget_bytes}
        if self.budget.kind == "latency":
            d["budget"] = {"kind": "latency", "fraction": self.budget.fraction}
        d["reference"] = {"block_params": self.reference_params, "ppl": self.reference_ppl}
        d["unit_levels"] = self.unit_levels
        d["priors"] = self.priors
        d["head_roles"] = self.head_roles
        d["head_keep"] = self.head_keep
        return d

    def to_text(self) -> str:
        if self.budget.kind == "latency":
            header = f"search {self.model}: budget {self.budget} of the original's measured latency"
            where = lambda p: (  # noqa: E731
                f"latency {p['latency_fraction']:.3f}, {p['params_fraction']:.3f} of block params"
            )
            return "\n".join(
                self._text(header, "latency_fraction", where, 44) + self._latency_lines() + self._kept()
            )
        header = (
            f"search {self.model}: budget {self.budget} = {self.budget_bytes:,} of "
            f"{self.reference_params:,} block parameters"
        )
        where = lambda p: f"{p['params_fraction']:.4f} of block params"  # noqa: E731
        return "\n".join(self._text(header, "params", where, 44) + self._kept())

    def _kept(self) -> list[str]:
        """'what the search kept' by head role, for the chosen point (none without roles)."""
        if self.chosen_point is None or not self.head_roles:
            return []
        summary = role_summary(self, self.chosen_point)
        return ["what the search kept: " + role_sentence(summary)] if summary else []
