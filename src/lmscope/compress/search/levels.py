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

BF16 = torch.bfloat16


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(BF16).float()


class EmulatedLinear(nn.Module):
    """The prefill arithmetic of ``Int8Linear`` / ``Int4Linear`` / ``Int8TiedHead`` in fp32: the input rounded to
    bf16, the weight exactly as the real kernel widens it to bf16 (int8 codes; int4 ``(q - zero) * scale``
    computed in bf16), an fp32 matmul (a product of two bf16 values is exact in fp32, the kernels accumulate
    in fp32 too), the product rounded to bf16, then the fp32 per-channel scale and bias. Equal to the real
    kernel up to the order of the fp32 accumulation; 2-5x faster on CPUs without bf16 matmul units."""

    def __init__(self, module: nn.Module):
        super().__init__()
        from ..quantize.modules import Int4Linear, Int4TiedHead, Int8Linear, Int8TiedHead

        self.post_scale = None
        if isinstance(module, Int4TiedHead):
            weight = module._embedding._weight(BF16).float()
            self.out_features, self.bias = module.vocab_size, None
        elif isinstance(module, Int8TiedHead):
            e = module._embedding
            weight, self.post_scale = e.qweight.float(), e.scale
            self.out_features, self.bias = module.vocab_size, None
        elif isinstance(module, Int8Linear):
            weight, self.post_scale = module.qweight.float(), module.scale
            self.out_features, self.bias = module.out_features, module.bias
        elif isinstance(module, Int4Linear):
            weight = module._weight(BF16).float()
            self.out_features, self.bias = module.out_features, module.bias
        else:
            raise TypeError(f"cannot emulate {type(module).__name__}")
        # plain attributes, not buffers: the byte count is the real module's (``_lmscope_bytes``)
        object.__setattr__(self, "weight_fp32", weight)
        self.source = type(module).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        y = _bf16(torch.nn.functional.linear(_bf16(x.reshape(-1, shape[-1])), self.weight_fp32))
        if self.post_scale is not None:
            y = y * self.post_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.weight_fp32
        return w * self.post_scale[:, None] if self.post_scale is not None else w


def _memory(m: nn.Module) -> int:
    """Bytes a cached variant holds in memory (an emulated one: its fp32 weight)."""
    w = getattr(m, "weight_fp32", None)
    return state_bytes(m) + (0 if w is None else w.numel() * w.element_size())


class LevelDatabase:
    """``modules(unit, level)`` -> {path: module}; ``bytes(unit, level)``; ``assemble(config)``."""

    def __init__(
        self,
        lm,
        space: QuantSpace,
        max_bytes: int = 2 << 30,
        simulate: bool = False,
        calibration_text: str | None = None,
    ):
        from ...lm import LM
        from ..calibration import Calibration
        from ..quantize import _common as C
        from ..targets import set_module

        self.space = space
        self.max_bytes = max_bytes
        # simulate: candidates (and the int8 tied head) use ``EmulatedLinear``: the real kernels' prefill
        # arithmetic (bf16 rounding included) in fp32 matmuls, much faster on CPUs without bf16 matmul units
        self.simulate = simulate
        # the working model: a copy whose embedding is stored as every configuration has it (int8 by default)
        # GPTQ levels: every block linear's Hessian from the unquantized model on the calibration windows
        # ``compress`` uses by default (8 x 256 tokens of the same text), computed once; the weight errors are
        # then output errors on that Hessian for every level (a plain weight error ranks GPTQ below RTN)
        self.calib = self.hessians = None
        gptq = any(LEVELS[lv] is not None and LEVELS[lv][0] == "gptq4" for lv in space.levels)
        if gptq or space.embedding.startswith("gptq4"):
            from ..quantize.gptq import original_hessians

            self.calib = Calibration(lm, calibration_text)
            self.hessians = original_hessians(lm, self.calib)
        self.work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        with torch.no_grad():  # the embedding as the recipe's first quantize step stores it
            head_hessian = self.hessians.get(lm.family.unembed) if self.hessians else None
            if space.embedding != "float":  # float: as in the original model
                C.quantize_embeddings(self.work, space.embedding, head_hessian)
        self.float_modules = {p: self.work.model.get_submodule(p) for u in space.units for p in u.paths}
        self._cache: OrderedDict[tuple[int, str], dict[str, nn.Module]] = OrderedDict()
        self._cache_bytes: dict[tuple[int, str], int] = {}
        self.built = 0  # how many variants were built (rebuilds after eviction included)
        self._bytes: dict[tuple[int, str], int] = {}
        self._error: dict[tuple[int, str], float] = {}
        self.current: list[str] = ["float"] * len(space.units)
        for i in range(len(space.units)):  # bytes and weight error of every variant, once
            for lv in dict.fromkeys(("float", *space.levels)):  # float: the fixed bytes below need it
                mods = self.modules(i, lv)
                self._bytes[(i, lv)] = sum(
                    getattr(m, "_lmscope_bytes", None) or state_bytes(m) for m in mods.values()
                )
                self._error[(i, lv)] = self._relative_error(i, mods)
        self.fixed_bytes = state_bytes(self.work.model) - sum(
            self._bytes[(i, "float")] for i in range(len(space.units))
        )
        if simulate:  # after the byte count: the emulated head holds no state of its own
            from ..quantize.modules import Int4TiedHead, Int8TiedHead

            head = lm.family.unembed
            if head and isinstance(self.work.module(head), (Int8TiedHead, Int4TiedHead)):
                set_module(self.work.model, head, EmulatedLinear(self.work.module(head)))

    @torch.no_grad()
    def _build(self, unit: int, level: str) -> dict[str, nn.Module]:
        from ..quantize import SCHEMES, load_schemes
        from ..steps import Quantize

        load_schemes()
        scheme, group = LEVELS[level]
        step = Quantize(scheme, group_size=group, **({"sequential": False} if scheme == "gptq4" else {}))
        targets = [(p, self.float_modules[p]) for p in self.space.units[unit].paths]
        self.built += 1
        done = {q.name: q.module for q in SCHEMES[scheme](self.work, step, self.calib, targets)}
        if self.simulate and scheme != "w8a8":  # w8a8's activation rounding is not emulated: the real module
            for name, q in done.items():
                em = EmulatedLinear(q)
                em._lmscope_bytes = state_bytes(q)  # the bytes of what it stands for
                done[name] = em
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
        self._cache_bytes[key] = sum(_memory(m) for m in mods.values())
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
            if self.hessians is None:
                num += float((w - w_hat).pow(2).sum())
                den += float(w.pow(2).sum())
            else:  # output error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)
                H = self.hessians[p]
                num += float(((w - w_hat) @ H * (w - w_hat)).sum())
                den += float((w @ H * w).sum())
        return num / max(den, 1e-30)

    def bytes(self, unit: int, level: str) -> int:
        return self._bytes[(unit, level)]

    def error(self, unit: int, level: str) -> float:
        """Relative squared weight error of the unit at this level (0 for float); with GPTQ levels, the relative
        squared output error on the calibration inputs."""
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
