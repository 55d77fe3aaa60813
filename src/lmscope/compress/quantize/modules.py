"""Quantized drop-in modules. Weights live as integers in memory and on disk; matmuls use PyTorch's kernels.

Compute paths (chosen by measurement on this CPU, see docs/quantization.md):

* ``Int8Linear`` (weight-only): prefill casts the int8 codes to bf16 (exact: |q| <= 127) and runs a bf16
  matmul, then applies the per-channel scale in fp32; decode (<= 16 rows) uses
  ``aten._weight_int8pack_mm``. Activations are rounded to bf16; weights are never widened in memory.
* ``W8A8Linear``: activations quantized per token (symmetric int8, dynamic), ``torch._int_mm`` (int8 x int8
  -> int32, oneDNN/AMX), then ``x_scale * w_scale``. Optional outlier input channels are kept out of the
  int8 path and multiplied in bf16.
* ``Int4Linear``: 4-bit codes packed two per byte + per-group fp16 scale and uint8 zero point; prefill
  unpacks to a bf16 weight and runs a bf16 matmul; decode uses ``aten._weight_int4pack_mm_for_cpu`` on a
  copy in that kernel's layout, built on the first decode call.
* ``Int8Embedding`` / ``Int8TiedHead``: the token embedding as int8 rows; a tied LM head reuses it.
* ``Int4Embedding`` / ``Int4TiedHead``: the token embedding in ``Int4Linear``'s layout ([vocab, dim] codes per
  group of ``dim``); a tied LM head runs ``Int4Linear``'s kernels on the same buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .affine import unpack_int4

DECODE_ROWS = 16  # at most this many rows: the decode kernels win (measured)
BF16 = torch.bfloat16


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k)


def _straight_through(module, x: torch.Tensor) -> torch.Tensor:
    """Run the quantized kernel; when a gradient w.r.t. the input is needed (attribution on a compressed
    model), take it from the dequantized weight (straight-through): forward values stay the kernel's, and
    the int8/int4 kernels, which have no backward, are never on the autograd graph."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return module._kernel_forward(x)
    with torch.no_grad():
        y = module._kernel_forward(x)
    ref = F.linear(x, module.dequantized_weight().to(x.dtype))
    return y + (ref - ref.detach())


class QuantizedLinear(nn.Module):
    """Base: ``in_features``/``out_features`` like nn.Linear, an optional fp32 bias, ``dequantized_weight()``."""

    bits = 8
    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def _finish(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:  # [out, in] float32, in the input space of this module
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _straight_through(self, x)

    def logical_numel(self) -> int:  # the weight it stands for (its bias is a Parameter, counted apart)
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class Int8Linear(QuantizedLinear):
    """int8 weight-only, symmetric per output channel."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = _rows(x, self.in_features).to(BF16)
        if x2.shape[0] <= DECODE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(BF16)).float()
        else:
            y = F.linear(x2, self.qweight.to(BF16)).float() * self.scale
        return self._finish(y, shape).to(dtype if dtype.is_floating_point else torch.float32)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


class W8A8Linear(QuantizedLinear):
    """int8 weights (per channel) x int8 activations (per token, dynamic); ``torch._int_mm``."""

    scheme = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, n_outliers: int = 0):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.n_outliers = n_outliers
        if n_outliers:
            # input channels kept out of int8: their activations and weights stay in bf16
            self.register_buffer("outlier_index", torch.zeros(n_outliers, dtype=torch.long))
            self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, dtype=BF16))

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = _rows(x, self.in_features).float()
        extra = None
        if self.n_outliers:
            extra = F.linear(x2.index_select(1, self.outlier_index).to(BF16), self.outlier_weight).float()
            x2 = x2.index_fill(1, self.outlier_index, 0.0)
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        xq = torch.round(x2 / x_scale).to(torch.int8)
        y = torch._int_mm(xq, self.qweight.t()).float() * (x_scale * self.scale)
        if extra is not None:
            y = y + extra
        return self._finish(y, shape).to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        w = self.qweight.float() * self.scale[:, None]
        if self.n_outliers:
            w[:, self.outlier_index] = self.outlier_weight.float()
        return w

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", bf16_outlier_channels={self.n_outliers}" if self.n_outliers else ""
        )


def _int4_buffers(module: nn.Module, rows: int, cols: int, group_size: int, minimum: bool) -> None:
    """Packed codes [rows, cols / 2], an fp16 scale per group, and per group either a uint8 zero point
    (``(q - zero) * scale``) or, with ``minimum``, an fp16 minimum (``q * scale + min``: GGUF Q4_1's layout)."""
    n_groups = cols // group_size
    module.register_buffer("qweight", torch.zeros(rows, cols // 2, dtype=torch.uint8))
    module.register_buffer("scale", torch.ones(rows, n_groups, dtype=torch.float16))
    zero_dtype = torch.float16 if minimum else torch.uint8
    module.register_buffer("zero", torch.zeros(rows, n_groups, dtype=zero_dtype))
    if minimum:
        module.scheme = "int4m"


def _min_repr(module: nn.Module) -> str:
    return ", scale and min" if module.zero.dtype == torch.float16 else ""


class Int4Linear(QuantizedLinear):
    """int4 weight-only, asymmetric per group of ``group_size`` inputs; codes packed two per byte. The group's
    offset is a uint8 zero point, or with ``minimum=True`` (scheme "int4m") an fp16 minimum."""

    bits = 4
    scheme = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 64,
        minimum: bool = False,
    ):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        _int4_buffers(self, out_features, in_features, group_size, minimum)

    def _weight(self, dtype) -> torch.Tensor:
        q = unpack_int4(self.qweight).view(self.out_features, -1, self.group_size)
        if self.zero.dtype == torch.float16:  # "scale and min": q * scale + min, in fp32, rounded once
            w = q.float() * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
            return w.reshape(self.out_features, self.in_features).to(dtype)
        q = q.to(dtype)
        w = (q - self.zero.to(dtype).unsqueeze(-1)) * self.scale.to(dtype).unsqueeze(-1)
        return w.reshape(self.out_features, self.in_features)

    def _decode_layout(self):
        """The weight in ``aten._weight_int4pack_mm_for_cpu``'s layout, built on first decode and cached
        (not saved; adds ~0.5 byte/parameter of memory once decoding starts)."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scale._version, self.zero._version)
        cached = getattr(self, "_int4pack", None)
        if cached is None or cached[0] != key:
            codes = unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            s, z = self.scale.float(), self.zero.float()
            # the kernel computes (q - 8) * scale + offset; ours is (q - zero) * scale, or q * scale + min
            offset = z + 8 * s if self.zero.dtype == torch.float16 else (8 - z) * s
            scale_offset = torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous().to(BF16)
            cached = (key, packed, scale_offset)
            self._int4pack = cached
        return cached[1], cached[2]

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = _rows(x, self.in_features).to(BF16)
        if x2.shape[0] <= DECODE_ROWS:
            packed, scale_offset = self._decode_layout()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.contiguous(), packed, self.group_size, scale_offset
            )
            y = y.float()
        else:
            y = F.linear(x2, self._weight(BF16)).float()
        return self._finish(y, shape).to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight(torch.float32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}" + _min_repr(self)


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one fp32 scale per token."""

    bits = 8
    scheme = "int8"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids].unsqueeze(-1)

    def logical_numel(self) -> int:  # the tied head reuses this matrix and counts 0
        return self.num_embeddings * self.embedding_dim

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


class Int8TiedHead(nn.Module):
    """LM head tied to an ``Int8Embedding`` (the same int8 matrix; not a second copy)."""

    bits = 8
    scheme = "int8"

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: saved once, under the embedding
        self.hidden_size = embedding.embedding_dim  # (no in_features: it owns no weight)
        self.vocab_size = embedding.num_embeddings

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._embedding
        shape = x.shape
        x2 = _rows(x, self.hidden_size).to(BF16)
        if x2.shape[0] <= DECODE_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), e.qweight, e.scale.to(BF16)).float()
        else:
            y = F.linear(x2, e.qweight.to(BF16)).float() * e.scale
        return y.reshape(*shape[:-1], self.vocab_size)

    def dequantized_weight(self) -> torch.Tensor:
        return self._embedding.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _straight_through(self, x)

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied to the int8 embedding"


class Int4Embedding(nn.Module):
    """Token embedding as int4 codes (two per byte) with an fp16 scale and uint8 zero per group of
    ``group_size`` columns: ``Int4Linear``'s layout and arithmetic for a [vocab, dim] matrix."""

    bits = 4
    scheme = "int4"
    bias = None
    # the tied head runs Int4Linear's prefill/decode code on these buffers (same names, same layout)
    _weight = Int4Linear._weight
    _decode_layout = Int4Linear._decode_layout
    _finish = QuantizedLinear._finish

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        group_size: int = 64,
        minimum: bool = False,
    ):
        super().__init__()
        self.num_embeddings = self.out_features = num_embeddings
        self.embedding_dim = self.in_features = embedding_dim
        self.padding_idx = padding_idx
        self.group_size = group_size
        _int4_buffers(self, num_embeddings, embedding_dim, group_size, minimum)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = unpack_int4(self.qweight[ids]).float()  # [..., dim]
        q = q.view(*ids.shape, -1, self.group_size)  # [..., groups, group_size]
        s, z = self.scale[ids].float().unsqueeze(-1), self.zero[ids].float().unsqueeze(-1)
        w = q * s + z if self.zero.dtype == torch.float16 else (q - z) * s
        return w.reshape(*ids.shape, self.embedding_dim)

    def logical_numel(self) -> int:  # the tied head reuses this matrix and counts 0
        return self.num_embeddings * self.embedding_dim

    def dequantized_weight(self) -> torch.Tensor:
        return self._weight(torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 group_size={self.group_size}" + _min_repr(
            self
        )


class Int4TiedHead(nn.Module):
    """LM head tied to an ``Int4Embedding``: ``Int4Linear``'s kernels on the embedding's own buffers."""

    bits = 4
    scheme = "int4"

    def __init__(self, embedding: Int4Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: saved once, under the embedding
        self.hidden_size = embedding.embedding_dim
        self.vocab_size = embedding.num_embeddings

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return Int4Linear._kernel_forward(self._embedding, x)

    def dequantized_weight(self) -> torch.Tensor:
        return self._embedding.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _straight_through(self, x)

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied to the int4 embedding"
