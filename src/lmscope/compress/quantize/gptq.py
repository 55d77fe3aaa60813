"""GPTQ int4 (Frantar et al. 2022): quantize columns one by one, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer's calibration inputs.

Block-sequential: the inputs of block ``i`` come from blocks ``0..i-1`` already quantized, so later layers
correct for earlier error. Per-group (asymmetric, same codes/storage as ``int4``) parameters are fixed
when the quantizer reaches a group's first column (from the error-updated weights). No act-order: groups
stay contiguous so the packed layout is the same as RTN's.
"""

from __future__ import annotations

import torch

from ...progress import track
from ..targets import set_module
from . import Quantized, scheme
from . import _common as C
from .affine import affine_params

BLOCK = 128
DAMP = 0.01


class _Stop(Exception):
    pass


@torch.no_grad()
def _block_inputs(lm, windows):
    """(args, kwargs) each window's first block is called with."""
    got = []

    def pre(mod, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = lm.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for ids in windows:
            try:
                lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, bits: int = 4):
    """Return (codes [out, in] uint8, scale [out, n_groups], zero [out, n_groups], dequantized weight)."""
    spec = C.int4_spec(group_size) if bits == 4 else None
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(cols)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    Q = torch.zeros_like(W)
    n_groups = cols // group_size
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
    qmax = 2**bits - 1
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                s, z = affine_params(W1[:, i : i + group_size], spec)  # [rows, 1] each
                scales[:, col // group_size] = s[:, 0]
                zeros[:, col // group_size] = z[:, 0]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s[:, 0]) + z[:, 0], 0, qmax)
            dq = (q - z[:, 0]) * s[:, 0]
            codes[:, col] = q.to(torch.uint8)
            Q[:, col] = dq
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, zeros, Q


@scheme("gptq4")
@torch.no_grad()
def quantize_gptq4(lm, step, calib, targets) -> list[Quantized]:
    g = step.group_size
    by_name = dict(targets)
    prefix = lm.family.blocks
    inputs = _block_inputs(lm, calib.windows())
    hidden = [a[0] for a, _ in inputs]
    out: list[Quantized] = []
    for i, block in track(list(enumerate(lm.blocks)), "GPTQ", unit="block"):
        mine = {n: m for n, m in by_name.items() if n.startswith(f"{prefix}.{i}.")}
        H = {n: torch.zeros(m.in_features, m.in_features) for n, m in mine.items()}
        count = {n: 0 for n in mine}
        handles = []
        for n, m in mine.items():

            def pre(mod, args, n=n, H=H, count=count):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                k = x.shape[0]
                H[n].mul_(count[n] / (count[n] + k))
                count[n] += k
                H[n].addmm_(x.t(), x, alpha=2.0 / count[n])

            handles.append(m.register_forward_pre_hook(pre))
        try:
            for (args, kwargs), h in zip(inputs, hidden):
                block(h, *args[1:], **kwargs)
        finally:
            for hd in handles:
                hd.remove()
        for n, m in mine.items():
            codes, scale, zero, _ = gptq_quantize(m.weight, H[n], g)
            q = C.make_int4(m, g, codes=codes, scale=scale, zero=zero)
            out.append(
                Quantized(
                    n,
                    q,
                    "int4",
                    m.weight.detach().float().clone(),
                    m.bias,
                    f"int4 g{g} GPTQ",
                    meta={"group_size": g},
                )
            )
            set_module(lm.model, n, q)  # the next blocks see this block's quantized outputs
        hidden = [_first(block(h, *args[1:], **kwargs)) for (args, kwargs), h in zip(inputs, hidden)]
    return out
