"""GPTQ int4 (Frantar et al. 2022): quantize columns one by one, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer's calibration inputs.

Block-sequential by default: the inputs of block ``i`` come from blocks ``0..i-1`` already quantized, so later
layers correct for earlier error. ``sequential=False``: every layer's Hessian comes from the inputs of the model
as it enters quantization (one calibration pass, cached per calibration), so each layer's result depends on
that layer and the calibration alone -- what the search's level database needs to build, cache and mix
per-layer GPTQ variants that ``compress --recipe`` then reproduces exactly. Per-group (asymmetric, same codes/storage as ``int4``) parameters are fixed
when the quantizer reaches a group's first column (from the error-updated weights). No act-order: groups
stay contiguous so the packed layout is the same as RTN's.
"""

from __future__ import annotations

import weakref

import torch

from ...errors import LmscopeError
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


def _accumulate(H: dict, count: dict, name: str, x: torch.Tensor) -> None:
    """Running ``2/N * X^T X`` over the calibration rows seen so far (the form every GPTQ Hessian here takes)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    k = x.shape[0]
    H[name].mul_(count[name] / (count[name] + k))
    count[name] += k
    H[name].addmm_(x.t(), x, alpha=2.0 / count[name])


@torch.no_grad()
def collect_hessians(lm, windows, names) -> dict[str, torch.Tensor]:
    """``2/N X^T X`` of each named linear's inputs over ``windows``, in one pass of the model as it is."""
    mods = {n: lm.model.get_submodule(n) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods.items()}
    count = {n: 0 for n in mods}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, n=n, H=H, count=count: _accumulate(H, count, n, args[0])
        )
        for n, m in mods.items()
    ]
    try:
        for ids in windows:
            lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return H


#: per calibration object: the Hessians of every block linear of the model as it entered quantization
_ORIGINAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def original_hessians(lm, calib) -> dict[str, torch.Tensor]:
    """Hessians of every block ``nn.Linear`` (and the LM head) of ``lm`` on ``calib``'s windows, computed once per calibration
    object (so later non-sequential steps of one ``compress`` call, and the search's level database, reuse
    them). Computing them on a model that is already partly quantized is refused: the result would depend on
    the order of the steps."""
    got = _ORIGINAL.get(calib)
    if got is None:
        from ..targets import block_linears
        from .modules import Int8Embedding, QuantizedLinear

        done = [n for n, m in lm.model.named_modules() if isinstance(m, (QuantizedLinear, Int8Embedding))]
        if done:
            raise LmscopeError(
                f"non-sequential GPTQ needs the unquantized model's inputs, but '{done[0]}' is already quantized",
                "put the gptq4 steps with sequential false before the other quantize steps",
            )
        names = [n for n, m in block_linears(lm, conv1d=False) if isinstance(m, torch.nn.Linear)]
        head = lm.family.unembed
        if head and isinstance(lm.module(head), torch.nn.Linear):  # for a GPTQ embedding + tied head
            names.append(head)
        got = collect_hessians(lm, calib.windows(), names)
        _ORIGINAL[calib] = got
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
    if not step.sequential:
        return _quantize_independent(lm, step, calib, targets)
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
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, args, n=n, H=H, count=count: _accumulate(H, count, n, args[0])
                )
            )
        try:
            for (args, kwargs), h in zip(inputs, hidden):
                block(h, *args[1:], **kwargs)
        finally:
            for hd in handles:
                hd.remove()
        for n, m in mine.items():
            done = _quantized(n, m, g, H[n], f"int4 g{g} GPTQ")
            out.append(done)
            set_module(lm.model, n, done.module)  # the next blocks see this block's quantized outputs
        hidden = [_first(block(h, *args[1:], **kwargs)) for (args, kwargs), h in zip(inputs, hidden)]
    return out


def _quantized(name: str, m, g: int, H: torch.Tensor, how: str) -> Quantized:
    codes, scale, zero, _ = gptq_quantize(m.weight, H, g)
    q = C.make_int4(m, g, codes=codes, scale=scale, zero=zero)
    return Quantized(name, q, "int4", m.weight.detach().float().clone(), m.bias, how, meta={"group_size": g})


@torch.no_grad()
def _quantize_independent(lm, step, calib, targets) -> list[Quantized]:
    """Each layer from the Hessian of its inputs in the unquantized model (``original_hessians``)."""
    H = original_hessians(lm, calib)
    g = step.group_size
    out = []
    for n, m in targets:
        if n not in H:
            raise LmscopeError(f"no calibration Hessian for '{n}'", "quantize it in a sequential gptq4 step")
        out.append(_quantized(n, m, g, H[n], f"int4 g{g} GPTQ (non-sequential)"))
    return out
