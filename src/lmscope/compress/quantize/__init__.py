"""Quantization: one registered handler for the ``quantize`` step, one file per scheme.

A scheme is a function ``(lm, step, calib, targets) -> list[Quantized]`` registered in ``SCHEMES``; the
handler captures calibration inputs, runs the scheme, swaps the modules in, quantizes the token
embedding (tied head included) to int8 rows, and records per-layer SQNR / output error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from ...errors import LmscopeError
from ...progress import track
from ..calibration import capture_inputs
from ..registry import register_step
from ..steps import Quantize
from ..targets import block_linears, is_conv1d, set_module
from . import _common as C

SCHEMES: dict[str, Callable] = {}


@dataclass
class Quantized:
    """One replaced layer: the new module, the fp weight it approximates and how its input was scaled."""

    name: str
    module: nn.Module
    kind: str  # int8 | w8a8 | int4 (the module type to rebuild)
    ref_weight: torch.Tensor  # the float weight this module stands for (after any smoothing folds)
    bias: torch.Tensor | None
    how: str
    input_scale: torch.Tensor | None = None  # module input = original input / input_scale
    meta: dict = field(default_factory=dict)


#: modules of this package that hold no scheme (``_private`` ones are skipped too)
NOT_SCHEMES = frozenset({"affine", "modules"})


def load_schemes() -> dict[str, Callable]:
    """Import every scheme module of this package (each ``@scheme`` registers itself); a new scheme is a
    new file here, plus its name in ``lmscope.compress.steps.QUANT_SCHEMES`` (what configs accept)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in NOT_SCHEMES:
            importlib.import_module(f"{__name__}.{info.name}")
    return SCHEMES


def scheme(name: str):
    def deco(fn):
        SCHEMES[name] = fn
        return fn

    return deco


def quantize_targets(lm, step: Quantize, selected: set[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers inside the blocks (model-relative names), minus the ``skip`` globs and, with a
    module filter, those it does not select. GPT-2-style Conv1D layers are swapped for the equivalent
    nn.Linear first (only the ones quantized), so every scheme applies to them."""
    out = []
    for n, m in block_linears(lm, conv1d=True):
        if any(fnmatch(n, p) for p in step.skip) or (selected is not None and n not in selected):
            continue
        if is_conv1d(m):
            m = C.as_linear(m)
            set_module(lm.model, n, m)
        out.append((n, m))
    if not out and selected is None:
        raise LmscopeError(
            f"'{lm.name}' has no nn.Linear layers in its blocks to quantize (family {lm.family.name})",
            "quantization supports Linear-based families such as llama/qwen2/mistral and bert",
        )
    return out


@register_step(Quantize)
class QuantizeHandler:
    def apply(self, lm, step: Quantize, calib) -> dict:
        load_schemes()
        # the module filter: only the selected layers, experts and (if selected) the embedding
        selected = set(step.selected_modules(lm)) if step.modules else None
        targets = quantize_targets(lm, step, selected)
        embedding = selected is None or lm.family.embed in selected
        names = [n for n, _ in targets]
        head_hessian = None
        if embedding and step.embedding.startswith("gptq4") and lm.family.unembed:
            from .gptq import original_hessians  # the unquantized model's, before this step changes it

            head_hessian = original_hessians(lm, calib).get(lm.family.unembed)
        windows = calib.windows() if calib is not None else []
        inputs = capture_inputs(lm, names, [w[:, : C.ERROR_TOKENS] for w in windows[:1]]) if windows else {}
        done: list[Quantized] = (
            SCHEMES[step.scheme](lm, step, calib, track(targets, f"quantize {step.scheme}", unit="layer"))
            if targets
            else []
        )
        rows, modules = [], {}
        for q in done:
            x = inputs.get(q.name)
            if x is not None and q.input_scale is not None:
                x = x / q.input_scale
            rows.append(C.error_row(q.name, q.ref_weight, q.bias, q.module, x, q.how))
            set_module(lm.model, q.name, q.module)
            modules[q.name] = {"kind": q.kind, **q.meta}
        experts = {}
        for name, mod in C.experts_of(lm):  # MoE experts: int8 per (expert, output row) under every scheme
            if selected is not None and name not in selected:
                continue
            new, expert_rows = quantize_experts(mod)
            set_module(lm.model, name, new)
            experts[name] = {"kind": "int8-experts", "params": list(new._lmscope_qparams)}
            rows.extend(
                C._row(f"{name}.{p}", w, w_hat, 8, "int8 per expert row") for p, w, w_hat in expert_rows
            )
        emb = C.quantize_embeddings(lm, step.embedding, head_hessian) if embedding else None
        if emb is not None:
            rows.extend(emb.pop("rows"))
        return {
            "scheme": step.scheme,
            "modules": modules,
            "experts": experts,
            "embedding": emb,
            "layers": C.rank_rows(rows),
            "calibration_tokens": int(sum(w.shape[1] for w in windows)),
        }

    def rebuild(self, model: nn.Module, step: Quantize, info: dict) -> None:
        for name, meta in info["modules"].items():
            lin = model.get_submodule(name)
            n_in, n_out = C.io_features(lin)
            set_module(model, name, C.empty_module(meta["kind"], n_in, n_out, lin.bias is not None, meta))
        for name, meta in (info.get("experts") or {}).items():
            set_module(
                model, name, quantize_experts(model.get_submodule(name), meta["params"], empty=True)[0]
            )
        if info.get("embedding"):
            C.rebuild_embeddings(model, info["embedding"])


# -- mixture-of-experts weights ------------------------------------------------------------------------------
_EXPERT_CLASSES: dict[type, type] = {}


def _expert_class(cls: type) -> type:
    """A subclass of the family's experts module whose 3-D weights are int8 buffers + per-row scales,
    de-quantized when the family's own forward reads them (its routing code runs unchanged)."""
    if cls in _EXPERT_CLASSES:
        return _EXPERT_CLASSES[cls]

    def weight(param):
        def get(self):
            scale = getattr(self, f"{param}_scale")
            return getattr(self, f"{param}_q").to(scale.dtype) * scale

        return property(get)

    def logical_numel(self) -> int:
        return sum(getattr(self, f"{p}_q").numel() for p in self._lmscope_qparams)

    attrs = {p: weight(p) for p in ("gate_up_proj", "down_proj", "up_proj", "gate_proj")}
    attrs["logical_numel"] = logical_numel
    sub = type(f"Int8{cls.__name__}", (cls,), attrs)
    _EXPERT_CLASSES[cls] = sub
    return sub


def quantize_experts(mod: nn.Module, params=None, empty: bool = False):
    """(int8 experts module, [(param, float weight, de-quantized weight)]) for a MoE experts module."""
    params = params or [n for n, p in mod.named_parameters(recurse=False) if p.dim() == 3]
    new = mod
    new.__class__ = _expert_class(type(mod))
    new._lmscope_qparams = tuple(params)
    rows = []
    for name in params:
        original = mod._parameters.pop(name).detach()
        w = original.float()
        scale = (w.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12).to(original.dtype)
        q = (
            torch.zeros_like(w, dtype=torch.int8)
            if empty
            else torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
        )
        new.register_buffer(f"{name}_q", q)
        new.register_buffer(f"{name}_scale", scale)
        if not empty:
            rows.append((name, w, q.float() * scale.float()))
    return new, rows
