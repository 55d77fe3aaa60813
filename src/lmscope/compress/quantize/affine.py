"""Affine (uniform) quantization math: parameters, quantize/dequantize, int4 packing, SQNR.

    scale      = (max - min) / (2^b - 1)            (asymmetric; min/max widened to include 0)
    zero_point = round(-min / scale)
    q          = clamp(round(x / scale) + zero_point, 0, 2^b - 1)
    x_hat      = (q - zero_point) * scale

Symmetric: scale = max|x| / (2^(b-1) - 1), zero_point = 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1] (the
restricted signed range, so -q is always representable). Granularity: one (scale, zero_point) for the
whole tensor (``per_tensor``), per output row (``per_channel``, axis 0 of an ``[out, in]`` weight) or per
contiguous group of ``group_size`` inputs within a row (``per_group``). See docs/quantization.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LmscopeError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: bits, symmetric or not, granularity (and group size)."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise LmscopeError(f"bits must be 2..8, got {self.bits}", "use 4 or 8")
        if self.granularity not in GRANULARITIES:
            raise LmscopeError(f"unknown granularity '{self.granularity}'", f"use one of {GRANULARITIES}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise LmscopeError("group_size is needed for, and only for, per_group", "e.g. group_size=64")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so that the last dim holds exactly the values sharing one (scale, zero_point)."""
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    if spec.granularity == "per_channel":
        return x.reshape(x.shape[0], -1)
    if x.shape[-1] % spec.group_size:
        raise LmscopeError(
            f"group size {spec.group_size} does not divide the width {x.shape[-1]}",
            "choose a group size that divides the layer's input width",
        )
    return x.reshape(-1, spec.group_size)


def affine_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point), each shaped ``[n_groups, 1]`` for the grouped view of ``x`` (float32)."""
    g = _grouped(x.detach().float(), spec)
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        scale = g.abs().amax(dim=1, keepdim=True) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=1, keepdim=True).clamp(max=0.0)  # widen to include 0: zero is exact
        hi = g.amax(dim=1, keepdim=True).clamp(min=0.0)
        scale = (hi - lo) / (2**spec.bits - 1)
        scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (int8 for symmetric, uint8 for asymmetric), same shape as ``x``."""
    g = _grouped(x.detach().float(), spec)
    q = torch.clamp(torch.round(g / scale) + zero, spec.qmin, spec.qmax)
    return q.to(torch.int8 if spec.symmetric else torch.uint8).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    g = _grouped(q.float(), spec)
    return ((g - zero) * scale).reshape(q.shape)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize (what the model computes with), in float32."""
    scale, zero = affine_params(x, spec)
    return dequantize(quantize(x, scale, zero, spec), scale, zero, spec)


def scale_min_params(x: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, minimum) per group of ``group_size`` along the last dim, both rounded to fp16 (as stored), each
    ``[n_groups, 1]`` float32: the "scale and min" grid ``x_hat = q * scale + minimum``, q in 0..2^b-1, of
    GGUF's Q4_1 (and torchao's float zero point). Unlike :func:`affine_params` the minimum is not widened to
    include 0 and not rounded onto the grid: a group already on such a grid (a dequantized Q4_1 weight) is
    reproduced exactly."""
    g = _grouped(x.detach().float(), QuantSpec(bits, False, "per_group", group_size))
    lo = g.amin(dim=1, keepdim=True).half().float()
    scale = ((g.amax(dim=1, keepdim=True) - lo) / (2**bits - 1)).half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo  # a constant group: any scale works


def quantize_scale_min(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int = 4):
    """uint8 codes of ``x`` on the grid ``q * scale + minimum`` (per group, as from :func:`scale_min_params`)."""
    g = x.detach().float().reshape(scale.shape[0], -1)
    q = torch.clamp(torch.round((g - minimum) / scale), 0, 2**bits - 1)
    return q.to(torch.uint8).reshape(x.shape)


def sqnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||x|| / ||x - x_hat||) (inf when exact)."""
    x, x_hat = x.detach(), x_hat.detach()
    if x.dtype != torch.float64:  # float32 norms are plenty for a dB figure and avoid a float64 copy
        x, x_hat = x.float(), x_hat.float()
    noise = torch.linalg.vector_norm(x - x_hat)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(x) / noise))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (0..15) two per byte along the last dim: low nibble = even index."""
    if q.shape[-1] % 2:
        raise LmscopeError("int4 packing needs an even width", "use an even group size")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 codes 0..15, last dim doubled."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
