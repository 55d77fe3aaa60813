"""Compression across families: every head layout lmscope slices (separate q/k/v, fused [q|k|v], fused per
head, multi-query, Conv1D), MoE experts, and one-line refusals where slicing cannot be exact."""

from __future__ import annotations

import pytest
import torch

from lmscope import LM
from lmscope.capture.session import hooks
from lmscope.compress import PruneHeads, Quantize, compress
from lmscope.compress.prune.heads import plan_heads, remove_heads
from lmscope.errors import LmscopeError
from lmscope.testing import FAMILIES, tiny_model

SLICED = [
    "llama",
    "gpt2",
    "gpt_neox",
    "gpt_bigcode",
    "opt",
    "qwen3",
    "mixtral",
    "bert",
    "distilbert",
    "stablelm",
]
REFUSED = {
    "phi3": "fused qkv",
    "falcon": "layout",
    "bloom": "ALiBi",
    "mpt": "ALiBi",
    "olmo2": "normalizes all heads",
    "codegen": "layout",
}


def _probe(lm):
    ids = torch.randint(5, 900, (2, 9), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("mt", SLICED)
def test_removing_heads_equals_masking_them(mt):
    """Physically removing heads gives the output of the original with those heads zeroed."""
    lm = LM(tiny_model(mt), None, name=mt)
    scores = [torch.arange(lm.n_heads_at(i), dtype=torch.float) * (1 + i) for i in range(lm.n_layers)]
    keep = plan_heads(lm, scores, n_remove=max(1, lm.n_heads * lm.n_layers // 4))
    probe = _probe(lm)

    def zero(kept):
        def fn(t, name):
            t = t.clone()
            t[:, :, [h for h in range(t.shape[2]) if h not in kept]] = 0
            return t

        return fn

    with torch.no_grad(), hooks(lm, [], {f"blocks.{i}.attn.head_out": zero(k) for i, k in keep.items()}):
        masked = lm.output_of(lm.forward(probe))
    removed_before = sum(lm.n_heads_at(i) for i in range(lm.n_layers))
    remove_heads(lm, {i: k for i, k in keep.items() if len(k) < lm.n_heads_at(i)})
    assert sum(lm.n_heads_at(i) for i in range(lm.n_layers)) < removed_before
    with torch.no_grad():
        pruned = lm.output_of(lm.forward(probe))
    torch.testing.assert_close(pruned, masked, atol=2e-5, rtol=1e-4)
    # the lowest-scored heads went: scores rise with the head index, so head 0 of layer 0 is gone first
    assert 0 not in keep[0]


@pytest.mark.parametrize("mt", ["gpt2", "gpt_neox", "gpt_bigcode", "mixtral", "qwen2_moe", "distilbert"])
def test_int8_and_heads_save_and_reload_with_equal_outputs(mt, tmp_path, causal_tokenizer, encoder_tokenizer):
    import lmscope

    tok = encoder_tokenizer if mt == "distilbert" else causal_tokenizer
    lm = LM(tiny_model(mt), tok, name=mt)
    res = compress(lm, [PruneHeads(0.25, method="magnitude"), Quantize("int8")])
    assert res.infos[0]["heads_removed"] > 0
    q = res.infos[1]
    assert q["modules"], "every family's block projections are quantized (Conv1D included)"
    if lm.family.moe:
        assert q["experts"], "MoE expert weights are quantized too"
        assert res.bytes_after < 0.5 * res.bytes_before
    res.save(tmp_path / "small")
    back = lmscope.load(str(tmp_path / "small"), progress=False)
    probe = _probe(lm)
    with torch.no_grad():
        a = res.lm.output_of(res.lm.forward(probe))
        b = back.output_of(back.forward(probe))
        ref = lm.output_of(lm.forward(probe))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, ref)  # something was compressed


def test_int8_experts_track_the_float_experts(causal_tokenizer):
    lm = LM(tiny_model("mixtral"), causal_tokenizer, name="mixtral")
    res = compress(lm, Quantize("int8"))
    probe = _probe(lm)
    with torch.no_grad():
        ref = lm.output_of(lm.forward(probe))
        got = res.lm.output_of(res.lm.forward(probe))
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.05, rel
    rows = [r for r in res.infos[0]["layers"] if "experts" in r["layer"]]
    assert rows and min(r["weight_sqnr_db"] for r in rows) > 35


@pytest.mark.parametrize("mt,why", sorted(REFUSED.items()))
def test_head_pruning_refused_in_one_line_where_it_cannot_be_exact(mt, why, causal_tokenizer):
    lm = LM(tiny_model(mt), causal_tokenizer, name=mt)
    with pytest.raises(LmscopeError, match=why) as e:
        compress(lm, PruneHeads(0.25, method="magnitude"))
    assert "\n" not in str(e.value)
    compress(lm, Quantize("int8"))  # quantization still works for the family


@pytest.mark.parametrize("mt", ["opt", "gptj", "qwen3", "gemma2", "mixtral", "starcoder2"])
def test_smoothquant_runs_and_tracks_the_float_model(mt, causal_tokenizer):
    """SmoothQuant folds only where the family's structure allows it; the result stays close to float."""
    lm = LM(tiny_model(mt), causal_tokenizer, name=mt)
    res = compress(lm, Quantize("w8a8-smooth"))
    probe = _probe(lm)
    with torch.no_grad():
        ref = lm.output_of(lm.forward(probe))
        got = res.lm.output_of(res.lm.forward(probe))
    assert float((got - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("mt", FAMILIES)
def test_int4m_on_every_family_or_a_one_line_refusal(mt, causal_tokenizer, encoder_tokenizer):
    """int4m ("scale and min") quantizes every family's block projections, GPT-2's Conv1D included: each stored
    weight is within half a quantization step of the original, and the model still computes nearly the same
    function; a family it cannot handle is refused with an LmscopeError (one line on the CLI)."""
    from lmscope.compress.quantize.modules import Int4Linear
    from lmscope.testing import ENCODERS

    lm = LM(tiny_model(mt), encoder_tokenizer if mt in ENCODERS else causal_tokenizer, name=mt)
    widths = {m.in_features for m in lm.model.modules() if isinstance(m, torch.nn.Linear)}
    if any(w % 32 for w in widths):
        pytest.skip(f"{mt}: a linear width is not a multiple of 32")
    probe = _probe(lm)
    with torch.no_grad():
        ref = lm.output_of(lm.forward(probe))
    try:
        res = compress(lm, Quantize("int4m", group_size=32))
    except LmscopeError as e:
        assert "\n" not in str(e)
        return
    q4 = {n: m for n, m in res.lm.model.named_modules() if isinstance(m, Int4Linear)}
    assert q4 and all(m.zero.dtype == torch.float16 for m in q4.values())
    originals = dict(lm.model.named_modules())
    for name, m in q4.items():
        w = originals[name].weight.detach().float()
        w = w.t() if type(originals[name]).__name__ == "Conv1D" else w
        err = (m.dequantized_weight() - w).abs().view(w.shape[0], -1, 32).amax(-1)
        assert bool((err <= 0.51 * m.scale.float() + 1e-3 * w.abs().max()).all()), name
    with torch.no_grad():
        got = res.lm.output_of(res.lm.forward(probe))
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.5
