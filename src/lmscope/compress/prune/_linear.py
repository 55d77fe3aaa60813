"""Slicing helpers shared by the pruners: shrink a Linear / GPT-2 Conv1D along its output or input side.

Weights are always viewed as [out, in] here; GPT-2's Conv1D stores [in, out] and is handled transparently.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..targets import is_conv1d


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] view (shares storage with the module's parameter)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_out_in(module).shape[0]


def _new_like(module: nn.Module, weight_oi: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    out_f, in_f = weight_oi.shape
    if is_conv1d(module):
        new = type(module)(out_f, in_f)
        new.weight = nn.Parameter(
            weight_oi.t().contiguous().clone(), requires_grad=module.weight.requires_grad
        )
        new.bias = nn.Parameter(bias.clone()) if bias is not None else None
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight_oi.device, dtype=weight_oi.dtype)
        with torch.no_grad():
            new.weight.copy_(weight_oi)
            if bias is not None:
                new.bias.copy_(bias)
    new.train(module.training)
    return new


def keep_outputs(module: nn.Module, index: Iterable[int]) -> nn.Module:
    """A copy of ``module`` computing only the output features in ``index`` (rows of W, entries of b)."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    w = weight_out_in(module).detach()[idx]
    b = module.bias.detach()[idx] if getattr(module, "bias", None) is not None else None
    return _new_like(module, w, b)


def keep_inputs(module: nn.Module, index: Iterable[int]) -> nn.Module:
    """A copy of ``module`` reading only the input features in ``index`` (columns of W; the bias stays)."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    w = weight_out_in(module).detach()[:, idx]
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return _new_like(module, w, b)
