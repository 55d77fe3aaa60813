"""Gradients through quantized modules (attribution on a compressed model): forward values stay the
kernel's, the gradient is the dequantized weight's (straight-through), for prefill- and decode-sized inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmscope.compress.apply import compress
from lmscope.compress.quantize.modules import DECODE_ROWS, QuantizedLinear
from lmscope.compress.recipe import Quantize
from lmscope.explain.api import explain

CALIB = " ".join(["A class definition defines a class object; its suite runs in a new frame."] * 40)


@pytest.mark.parametrize("scheme", ["int8", "w8a8-smooth", "int4"])
@pytest.mark.parametrize("rows", [DECODE_ROWS - 3, DECODE_ROWS + 5])
def test_quantized_linear_gradient_is_the_dequantized_weights(make_tiny, scheme, rows):
    step = Quantize(scheme, group_size=32) if scheme == "int4" else Quantize(scheme)
    lm = compress(make_tiny("llama"), step, CALIB).lm
    layer = next(m for m in lm.model.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(rows, layer.in_features, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # same values as the no-grad kernel path
    g = torch.randn_like(y)
    (y * g).sum().backward()
    expected = g @ layer.dequantized_weight()
    assert torch.allclose(x.grad, expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(y, F.linear(x, layer.dequantized_weight()), atol=0.1, rtol=0.05)


def test_gradient_attribution_runs_on_a_quantized_model(make_tiny):
    lm = compress(make_tiny("llama"), Quantize("int8"), CALIB).lm
    res = explain(
        lm, "The quick brown fox jumps over", methods=["saliency", "integrated_gradients"], sanity=False
    )
    scores = res.first.methods["saliency"].scores
    assert len(scores) == len(res.first.tokens) and any(abs(s) > 0 for s in scores)
