"""Affine quantization math: round trips, the documented worked example, packing, SQNR floors on real weights."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope.compress.quantize.affine import (
    QuantSpec,
    affine_params,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    sqnr,
    unpack_int4,
)
from lmscope.errors import LmscopeError

SPECS = [
    QuantSpec(8, True, "per_tensor"),
    QuantSpec(8, False, "per_tensor"),
    QuantSpec(8, True, "per_channel"),
    QuantSpec(8, False, "per_channel"),
    QuantSpec(4, True, "per_group", 32),
    QuantSpec(4, False, "per_group", 64),
    QuantSpec(4, False, "per_channel"),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-{s.granularity}"
)
def test_round_trip_error_is_at_most_half_a_step(spec):
    torch.manual_seed(0)
    x = torch.randn(48, 128) * torch.linspace(0.1, 3.0, 48)[:, None]
    scale, zero = affine_params(x, spec)
    q = quantize(x, scale, zero, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    x_hat = dequantize(q, scale, zero, spec)
    # every value inside the range lands within half a step of itself
    step = scale.expand(-1, x.numel() // scale.shape[0]).reshape(x.shape)
    assert torch.all((x - x_hat).abs() <= step / 2 + 1e-6)
    # re-quantizing the dequantized tensor is exact (idempotent)
    assert torch.equal(quantize(x_hat, scale, zero, spec), q)


def test_finer_granularity_and_more_bits_never_hurt():
    torch.manual_seed(1)
    x = torch.randn(64, 256) * torch.logspace(-1, 1, 64)[:, None]
    per_tensor = sqnr(x, fake_quantize(x, QuantSpec(8, True, "per_tensor")))
    per_channel = sqnr(x, fake_quantize(x, QuantSpec(8, True, "per_channel")))
    assert per_channel > per_tensor + 3
    int4_g32 = sqnr(x, fake_quantize(x, QuantSpec(4, False, "per_group", 32)))
    int4_g128 = sqnr(x, fake_quantize(x, QuantSpec(4, False, "per_group", 128)))
    assert int4_g32 > int4_g128 > 0
    assert per_channel > int4_g32


def test_worked_example_from_the_docs():
    """docs/quantization.md, "Worked example": these exact numbers are printed there."""
    x = torch.tensor([-1.2, -0.45, 0.0, 0.95, 1.8])
    asym = QuantSpec(4, symmetric=False, granularity="per_tensor")
    scale, zero = affine_params(x, asym)
    assert float(scale) == pytest.approx(0.2) and float(zero) == 6.0
    q = quantize(x, scale, zero, asym)
    assert q.tolist() == [0, 4, 6, 11, 15]
    assert dequantize(q, scale, zero, asym).tolist() == pytest.approx([-1.2, -0.4, 0.0, 1.0, 1.8], abs=1e-6)

    sym = QuantSpec(4, symmetric=True, granularity="per_tensor")
    scale, zero = affine_params(x, sym)
    assert float(scale) == pytest.approx(1.8 / 7) and float(zero) == 0.0
    q = quantize(x, scale, zero, sym)
    assert q.tolist() == [-5, -2, 0, 4, 7]
    assert dequantize(q, scale, zero, sym).tolist() == pytest.approx(
        [-1.285714, -0.514286, 0.0, 1.028571, 1.8], abs=1e-5
    )
    # the SQNR the docs quote for the asymmetric case
    assert sqnr(x, dequantize(quantize(x, *affine_params(x, asym), asym), *affine_params(x, asym), asym)) == (
        pytest.approx(20 * math.log10(x.norm().item() / math.sqrt(2 * 0.05**2)), abs=0.01)
    )


def test_int4_packing_is_two_per_byte_and_lossless():
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), q)


def test_zero_row_and_bad_spec():
    x = torch.zeros(3, 64)
    assert torch.equal(fake_quantize(x, QuantSpec(8, True, "per_channel")), x)
    with pytest.raises(LmscopeError, match="group size 48 does not divide"):
        fake_quantize(torch.randn(2, 64), QuantSpec(4, False, "per_group", 48))
    with pytest.raises(LmscopeError):
        QuantSpec(4, False, "per_group")


@pytest.mark.real
def test_sqnr_floors_on_real_smollm2_weights(smollm2):
    """int8 per-channel >= 40 dB over the model's block weights (every single layer >= 38 dB: the worst,
    layers.0.o_proj, is 38.7 dB); int4 g64 >= 18 dB for every layer."""
    int8 = QuantSpec(8, True, "per_channel")
    int4 = QuantSpec(4, False, "per_group", 64)
    signal = noise8 = 0.0
    worst8, worst4 = math.inf, math.inf
    for name, mod in smollm2.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            w = mod.weight.detach()
            w8 = fake_quantize(w, int8)
            signal += float(w.double().norm() ** 2)
            noise8 += float((w - w8).double().norm() ** 2)
            worst8 = min(worst8, sqnr(w, w8))
            worst4 = min(worst4, sqnr(w, fake_quantize(w, int4)))
    assert 10 * math.log10(signal / noise8) >= 40.0
    assert worst8 >= 38.0
    assert worst4 >= 18.0
