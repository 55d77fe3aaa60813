"""The level database: every unit's compressed variants, built once by the same scheme functions
``compress`` runs, kept in memory up to a byte bound (least recently used go first and are rebuilt on demand),
and an assembled working model where a candidate is made by swapping modules, never by re-quantizing.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ..size import state_bytes
from .space import LEVELS, QuantSpace


class LevelDatabase:
    """``modules(unit, level)`` -> {path: module}; ``bytes(unit, level)``; ``assemble(config)``."""

    def __init__(self, lm, space: QuantSpace, max_bytes: int = 2 << 30, simulate: bool = False):
        from ...lm import LM
        from ..quantize import _common as C

        self.space = space
        self.max_bytes = max_bytes
        # simulate: candidates use fp32 nn.Linear layers holding the de-quantized weights (fake quantization).
        # Same weights, but activations are not rounded to bf16 as the real kernels do, so the logits are close
        # to, not equal to, the compressed model's; much faster on CPUs without bf16 matmul units.
        self.simulate = simulate
        # the working model: a copy whose embedding is int8 (every configuration has it so)
        self.work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        with torch.no_grad():
            C.quantize_embeddings(self.work)
        self.float_modules = {p: self.work.model.get_submodule(p) for u in space.units for p in u.paths}
        self._cache: OrderedDict[tuple[int, str], dict[str, nn.Module]] = OrderedDict()
        self._cache_bytes: dict[tuple[int, str], int] = {}
        self.built = 0  # how many variants were built (rebuilds after eviction included)
        self._bytes: dict[tuple[int, str], int] = {}
        self._error: dict[tuple[int, str], float] = {}
        self.current: list[str] = ["float"] * len(space.units)
        for i in range(len(space.units)):  # bytes and weight error of every variant, once
            for lv in space.levels:
                mods = self.modules(i, lv)
                self._bytes[(i, lv)] = sum(
                    getattr(m, "_lmscope_bytes", None) or state_bytes(m) for m in mods.values()
                )
                self._error[(i, lv)] = self._relative_error(i, mods)
        self.fixed_bytes = state_bytes(self.work.model) - sum(
            self._bytes[(i, "float")] for i in range(len(space.units))
        )

    @torch.no_grad()
    def _build(self, unit: int, level: str) -> dict[str, nn.Module]:
        from ..quantize import SCHEMES, load_schemes
        from ..steps import Quantize

        load_schemes()
        scheme, group = LEVELS[level]
        step = Quantize(scheme, group_size=group)
        targets = [(p, self.float_modules[p]) for p in self.space.units[unit].paths]
        self.built += 1
        done = {q.name: q.module for q in SCHEMES[scheme](self.work, step, None, targets)}
        if self.simulate:
            for name, q in done.items():
                lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
                lin.weight.data = q.dequantized_weight().float()
                if q.bias is not None:
                    lin.bias.data = q.bias.detach().clone()
                lin._lmscope_bytes = state_bytes(q)  # the bytes of what it stands for
                done[name] = lin
        return done

    def modules(self, unit: int, level: str) -> dict[str, nn.Module]:
        if level == "float":
            return {p: self.float_modules[p] for p in self.space.units[unit].paths}
        key = (unit, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        mods = self._build(unit, level)
        self._cache[key] = mods
        self._cache_bytes[key] = sum(state_bytes(m) for m in mods.values())
        while sum(self._cache_bytes.values()) > self.max_bytes and len(self._cache) > 1:
            old, _ = self._cache.popitem(last=False)
            if old in self._cache_bytes:
                del self._cache_bytes[old]
        return mods

    @torch.no_grad()
    def _relative_error(self, unit: int, mods: dict[str, nn.Module]) -> float:
        num = den = 0.0
        for p, m in mods.items():
            w = self.float_modules[p].weight.detach().float()
            w_hat = m.dequantized_weight().float() if hasattr(m, "dequantized_weight") else m.weight.float()
            num += float((w - w_hat).pow(2).sum())
            den += float(w.pow(2).sum())
        return num / max(den, 1e-30)

    def bytes(self, unit: int, level: str) -> int:
        return self._bytes[(unit, level)]

    def error(self, unit: int, level: str) -> float:
        """Relative squared weight error of the unit at this level (0 for float)."""
        return self._error[(unit, level)]

    def total_bytes(self, config) -> int:
        """State-dict bytes of the configuration, exactly as ``compress`` would count them."""
        return self.fixed_bytes + sum(self._bytes[(i, lv)] for i, lv in enumerate(config))

    def assemble(self, config):
        """Swap the modules of ``config`` into the working model (only the units that change); returns it."""
        from ..targets import set_module

        for i, lv in enumerate(config):
            if self.current[i] != lv:
                for p, m in self.modules(i, lv).items():
                    set_module(self.work.model, p, m)
                self.current[i] = lv
        return self.work
