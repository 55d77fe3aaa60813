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
from ..targets import block_linears, set_module
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


def quantize_targets(lm, step: Quantize) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers inside the blocks (model-relative names), minus the ``skip`` globs."""
    out = [(n, m) for n, m in block_linears(lm, conv1d=False) if not any(fnmatch(n, p) for p in step.skip)]
    if not out:
        raise LmscopeError(
            f"'{lm.name}' has no nn.Linear layers in its blocks to quantize (family {lm.family.name})",
            "quantization supports Linear-based families such as llama/qwen2/mistral and bert",
        )
    return out


@register_step(Quantize)
class QuantizeHandler:
    def apply(self, lm, step: Quantize, calib) -> dict:
        load_schemes()
        targets = quantize_targets(lm, step)
        embedding = True
        if step.modules:  # the module filter: only the selected layers (and the embedding if selected)
            selected = set(step.selected_modules(lm))
            targets = [(n, m) for n, m in targets if n in selected]
            embedding = lm.family.embed in selected
            if not targets:
                raise LmscopeError(
                    f"the module filter {list(step.modules)} selects no linear layer to quantize",
                    "add a glob that matches block linears, e.g. model.layers.*.mlp.*",
                )
        names = [n for n, _ in targets]
        windows = calib.windows() if calib is not None else []
        inputs = capture_inputs(lm, names, [w[:, : C.ERROR_TOKENS] for w in windows[:1]]) if windows else {}
        done: list[Quantized] = SCHEMES[step.scheme](
            lm, step, calib, track(targets, f"quantize {step.scheme}", unit="layer")
        )
        rows, modules = [], {}
        for q in done:
            x = inputs.get(q.name)
            if x is not None and q.input_scale is not None:
                x = x / q.input_scale
            rows.append(C.error_row(q.name, q.ref_weight, q.bias, q.module, x, q.how))
            set_module(lm.model, q.name, q.module)
            modules[q.name] = {"kind": q.kind, **q.meta}
        emb = C.quantize_embeddings(lm) if embedding else None
        if emb is not None:
            rows.extend(emb.pop("rows"))
        return {
            "scheme": step.scheme,
            "modules": modules,
            "embedding": emb,
            "layers": C.rank_rows(rows),
            "calibration_tokens": int(sum(w.shape[1] for w in windows)),
        }

    def rebuild(self, model: nn.Module, step: Quantize, info: dict) -> None:
        for name, meta in info["modules"].items():
            lin = model.get_submodule(name)
            set_module(
                model,
                name,
                C.empty_module(meta["kind"], lin.in_features, lin.out_features, lin.bias is not None, meta),
            )
        if info.get("embedding"):
            C.rebuild_embeddings(model, info["embedding"])
