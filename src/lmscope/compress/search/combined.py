"""Precision and structure in one search (``--space quant,heads,neurons[,layers] --budget bytes=F``).

A candidate is a structure configuration (heads kept, MLP neurons kept, block kept or dropped: the units and
levels of ``StructuredSpace``) and a precision configuration (a level per block or block x projection kind: the
units and levels of ``QuantSpace``). Its bytes are exact: the state-dict bytes ``compress`` counts for the
model its recipe builds (the embedding int8 as in every precision candidate; each kept linear at its level, at
the shape the structure left). The recipe applies the structural steps first (``keep_heads``, ``keep_neurons``,
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
    head_level,
    neuron_level,
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
        self, lm, spaces, levels, granularity: str = "kind", calib=None, priors=None, prior_tokens=1024
    ):
        struct = tuple(s for s in spaces if s in STRUCT_SPACES)
        self.qspace = QuantSpace(lm, levels, granularity)
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
        the kept linears, their paths renumbered past the dropped blocks; the embedding int8 as in every
        candidate."""
        from ..recipe import Quantize, Recipe

        s, q = self.split(self.canonical(config))
        heads, neurons, dropped = self.sspace.structure(s)
        steps = []
        if heads or neurons or dropped:
            steps += list(self.sspace.recipe(s).steps)
        gone = set(dropped)
        q = tuple("float" if u.block in gone else lv for u, lv in zip(self.qspace.units, q))
        if all(lv == "float" for lv in q):  # the embedding is int8 in every candidate
            qsteps = [Quantize("int8", modules=(self.qspace.embed,))]
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
            C.quantize_embeddings(self.work)  # as in every precision candidate (and in the recipe)
        fam = lm.family
        self.attn_prefix = fam.attn + "."
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
            from ..quantize.modules import Int8TiedHead
            from ..targets import set_module
            from .levels import EmulatedLinear

            head = fam.unembed
            if head and isinstance(self.work.module(head), Int8TiedHead):
                set_module(self.work.model, head, EmulatedLinear(self.work.module(head)))

    def _key(self, path: str, state) -> tuple | None:
        """What of the block's structure state a linear's shape and weights depend on."""
        heads, neurons, _ = state
        part = heads if self._is_attn(path) else neurons
        return None if part is None else tuple(part)

    def _is_attn(self, path: str) -> bool:
        prefix = self.space.blocks + "."
        return path[len(prefix) :].partition(".")[2].startswith(self.attn_prefix)

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
        for i, state in enumerate(struct_states):
            if state[2]:
                continue
            total += self.other[i]
            for p in self.qpaths.get(i, ()):
                lv = qconfig[self.unit_of[p] - self.space.n_struct]
                total += self._linear_bytes(self.shapes[(p, self._key(p, state))], lv)
        return total

    def total_bytes(self, config) -> int:
        s, q = self.space.split(config)
        return self.bytes_of(self.sdb.block_states(s), q)

    def params(self, config) -> int:
        """Block parameters kept (quantization keeps them all)."""
        return self.sdb.total_params(self.space.split(config)[0])

    # -- assembling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def assemble(self, config):
        from ..targets import set_module

        s, q = self.space.split(config)
        states = self.sdb.block_states(s)
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
                m = self._module(p, self._key(p, state), q[self.unit_of[p] - self.space.n_struct], fl)
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
