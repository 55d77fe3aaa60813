"""Quantization schemes on a tiny llama: the model still computes nearly the same function, the layers
are really integer-stored, the error report is ranked, and the compute paths agree with the math."""

from __future__ import annotations

import pytest
import torch

from lmscope.compress.apply import compress
from lmscope.compress.quantize.affine import QuantSpec, fake_quantize
from lmscope.compress.quantize.gptq import gptq_quantize
from lmscope.compress.quantize.modules import Int4Linear, Int8Embedding, Int8Linear, Int8TiedHead, W8A8Linear
from lmscope.compress.recipe import Quantize

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun all afternoon."
CALIB = " ".join(
    ["Python evaluates expressions from left to right; assignments evaluate the right side first."] * 40
)

# scheme -> (module type, max relative logit error on the tiny model)
SCHEMES = {
    "int8": (Int8Linear, 0.05),
    "w8a8": (W8A8Linear, 0.08),
    "w8a8-smooth": (W8A8Linear, 0.08),
    "int4": (Int4Linear, 0.4),
    "int4m": (Int4Linear, 0.4),
    "gptq4": (Int4Linear, 0.4),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_quantizes_every_block_linear(make_tiny, scheme):
    lm = make_tiny("llama")
    ids = lm.encode(TEXT)
    with torch.no_grad():
        ref = lm.forward(ids).logits
    result = compress(
        lm, Quantize(scheme, group_size=32 if scheme in ("int4", "int4m", "gptq4") else None), CALIB
    )
    kind, tol = SCHEMES[scheme]
    qlm = result.lm
    linears = [m for n, m in qlm.model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    assert not linears  # nothing left in float
    assert sum(isinstance(m, kind) for m in qlm.model.modules()) == 7 * qlm.n_layers
    assert isinstance(qlm.model.model.embed_tokens, Int8Embedding)
    assert isinstance(qlm.model.lm_head, Int8TiedHead)  # tied: one int8 matrix, not two
    with torch.no_grad():
        got = qlm.forward(ids).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < tol
    assert result.bytes_after < 0.3 * result.bytes_before
    rows = result.layer_errors()
    assert len(rows) == 7 * qlm.n_layers + 1  # + the embedding
    measured = [r["output_sqnr_db"] for r in rows if r["output_sqnr_db"] is not None]
    assert measured == sorted(measured)  # worst first
    assert all(r["weight_sqnr_db"] > (15 if kind is Int4Linear else 35) for r in rows)
    assert result.lm.model is not lm.model  # the original is untouched
    assert isinstance(lm.model.lm_head, torch.nn.Linear)


def test_int8_linear_paths_match_the_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    from lmscope.compress.quantize._common import make_int8, make_w8a8

    q = make_int8(lin)
    w_hat = fake_quantize(lin.weight.detach(), QuantSpec(8, True, "per_channel"))
    assert torch.allclose(q.dequantized_weight(), w_hat, atol=1e-7)
    for rows in (1, 40):  # decode kernel and prefill path
        x = torch.randn(rows, 64)
        ref = torch.nn.functional.linear(x, w_hat, lin.bias)
        assert torch.allclose(q(x), ref, rtol=0, atol=0.03 * float(ref.abs().max()))
    w8a8 = make_w8a8(lin)
    x = torch.randn(40, 64)
    ref = torch.nn.functional.linear(x, w_hat, lin.bias)
    assert torch.allclose(w8a8(x), ref, atol=0.03 * float(ref.abs().max()))


def test_w8a8_outlier_channels_are_kept_exact_in_bf16():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    from lmscope.compress.quantize._common import make_w8a8

    x = torch.randn(50, 64)
    x[:, 3] *= 300.0  # one huge channel, as in small LMs
    plain, kept = make_w8a8(lin), make_w8a8(lin, outliers=[3])
    ref = lin(x)

    def err(m):
        return float((m(x) - ref).norm() / ref.norm())

    assert err(kept) < err(plain) / 4


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)  # low-rank-ish inputs
    h = 2 * x.t() @ x / len(x)
    _, _, _, w_gptq = gptq_quantize(w, h, group_size=32)
    w_rtn = fake_quantize(w, QuantSpec(4, False, "per_group", 32))
    out_err = lambda wq: float((x @ (w - wq).t()).norm())  # noqa: E731
    assert out_err(w_gptq) < 0.8 * out_err(w_rtn)


def test_int4_decode_kernel_matches_the_prefill_path():
    from lmscope.compress.quantize._common import make_int4

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    q = make_int4(lin, 32)
    w_hat = q.dequantized_weight()
    for rows in (1, 40):  # aten._weight_int4pack_mm_for_cpu, then unpack + bf16 matmul
        x = torch.randn(rows, 128)
        ref = torch.nn.functional.linear(x, w_hat, lin.bias)
        assert torch.allclose(q(x), ref, atol=0.02 * float(ref.abs().max()))
    q.zero.fill_(8)  # changing the codes' parameters in place rebuilds the cached decode layout
    x = torch.randn(1, 128)
    ref = torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    assert torch.allclose(q(x), ref, atol=0.02 * float(ref.abs().max()))


def test_int4m_reproduces_a_gguf_q4_1_weight_exactly():
    """A weight dequantized from GGUF's Q4_1 (by the gguf package, the reference implementation) lies on a
    "scale and min" grid per 32 values: int4m g32 stores it with zero error, the uint8-zero int4 does not, and
    both kernels (bf16 prefill, int4pack decode) compute with it."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from lmscope.compress.quantize._common import make_int4, make_int4m

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32) * 0.05 + 0.01
    q4_1 = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    lin = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(q4_1))
    q = make_int4m(lin, 32)
    assert q.scheme == "int4m" and q.zero.dtype == torch.float16
    assert torch.equal(q.dequantized_weight(), lin.weight)
    assert float((make_int4(lin, 32).dequantized_weight() - lin.weight).abs().max()) > 1e-4
    for rows in (1, 40):
        x = torch.randn(rows, 128)
        ref = torch.nn.functional.linear(x, lin.weight)
        assert torch.allclose(q(x), ref, atol=0.02 * float(ref.abs().max()))
    # on a weight not on such a grid it is still a 4-bit quantizer: error within one step of each group
    lin2 = torch.nn.Linear(128, 64, bias=False)
    q2 = make_int4m(lin2, 64)
    err = (q2.dequantized_weight() - lin2.weight).abs().view(64, 2, 64).amax(-1)
    assert bool((err <= 0.51 * q2.scale.float() + 1e-6).all()) and float(err.max()) > 0


def test_int8_matches_torchao_int8_weight_only(make_tiny):
    """Peer reference: torchao's Int8WeightOnlyConfig on the same layers. Both are symmetric per output
    channel; torchao maps max|w| to 127.5 over [-128, 127], lmscope to 127 over [-127, 127] (so the scales
    differ by exactly 127.5/127); each rounds to nearest, and the two reconstructions are equally good."""
    import copy

    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from lmscope.compress.quantize.affine import sqnr

    lm = make_tiny("llama")
    peer = copy.deepcopy(lm.model)
    quantize_(
        peer,
        Int8WeightOnlyConfig(),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and ".layers." in fqn,
    )
    result = compress(lm, Quantize("int8"), CALIB)
    ours = dict(result.lm.model.named_modules())
    checked = 0
    for name, m in peer.named_modules():
        if not (isinstance(m, torch.nn.Linear) and ".layers." in name):
            continue
        w = lm.model.get_submodule(name).weight.detach().float()
        q = ours[name]
        assert isinstance(q, Int8Linear)
        peer_scale = m.weight.scale.flatten().float()
        torch.testing.assert_close(q.scale, peer_scale * 127.5 / 127, rtol=1e-5, atol=0)
        w_ours, w_peer = q.dequantized_weight(), m.weight.dequantize().float()
        assert float(((w_ours - w).abs() / q.scale[:, None]).max()) <= 0.5 + 1e-4  # round to nearest
        assert float(((w_peer - w).abs() / peer_scale[:, None]).max()) <= 0.5 + 1e-4
        assert abs(sqnr(w, w_ours) - sqnr(w, w_peer)) < 0.5  # dB: the same quality of reconstruction
        checked += 1
    assert checked == 4 * lm.n_layers + 3 * lm.n_layers  # q k v o + gate up down in every block
    ids = lm.encode(TEXT)
    with torch.no_grad():
        ref, a, b = lm.forward(ids).logits, result.lm.forward(ids).logits, peer(**ids).logits
    # the two int8 models agree with each other about as well as each agrees with fp32
    assert float((a - b).norm()) <= 2.5 * max(float((a - ref).norm()), float((b - ref).norm()))
