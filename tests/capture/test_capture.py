"""Capture correctness against HF's own eager attention and hidden states, on every family."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscope.capture.names import expand
from lmscope.capture.session import hooks
from lmscope.errors import LmscopeError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Short text here"]


def _hf_eager(lm, inputs):
    model = copy.deepcopy(lm.model)
    model.config._attn_implementation = "eager"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(**inputs, output_attentions=True, output_hidden_states=True)


def test_patterns_equal_hf_eager(tiny_lm):
    run = tiny_lm.run(TEXTS, capture=["blocks.*.attn.pattern"])
    ref = _hf_eager(tiny_lm, {"input_ids": run.input_ids, "attention_mask": run.attention_mask})
    assert len(ref.attentions) == tiny_lm.n_layers
    mask = run.attention_mask.bool()
    for i, want in enumerate(ref.attentions):
        got = run.tensors[f"blocks.{i}.attn.pattern"]
        assert got.shape == want.shape == (2, tiny_lm.n_heads, run.input_ids.shape[1], run.input_ids.shape[1])
        # compare real (non-padding) query rows: HF leaves padded query rows unspecified
        q = mask[:, None, :, None].expand_as(got)
        assert torch.allclose(got[q], want[q], atol=1e-5), f"layer {i}"
        assert not torch.allclose(got, torch.full_like(got, got.mean()), atol=1e-3), "pattern is uniform"


def test_resid_post_equals_hidden_states(tiny_lm):
    run = tiny_lm.run(TEXTS, capture=["blocks.*.resid_post", "blocks.*.resid_pre"])
    ref = _hf_eager(tiny_lm, {"input_ids": run.input_ids, "attention_mask": run.attention_mask})
    hs = ref.hidden_states
    n = tiny_lm.n_layers
    for i in range(n):
        assert torch.allclose(run.tensors[f"blocks.{i}.resid_pre"], hs[i], atol=1e-5)
    for i in range(n - 1):
        assert torch.allclose(run.tensors[f"blocks.{i}.resid_post"], hs[i + 1], atol=1e-5)
    last = run.tensors[f"blocks.{n - 1}.resid_post"]
    fam = tiny_lm.family
    if fam.final_norm:  # HF's last hidden state is after the final norm for decoder families
        with torch.no_grad():
            last = tiny_lm.module(fam.final_norm)(last)
    assert torch.allclose(last, hs[n], atol=1e-5)


def test_capture_does_not_change_output(tiny_lm):
    everything = ["*"]
    plain = tiny_lm.run(TEXTS, capture=[])
    full = tiny_lm.run(TEXTS, capture=everything)
    assert torch.allclose(plain.output, full.output, atol=1e-5)
    names = expand(everything, tiny_lm.n_layers, tiny_lm.is_causal)
    assert set(full.tensors) == set(names)


def test_pattern_invariants(tiny_lm):
    run = tiny_lm.run(TEXTS, capture=["blocks.*.attn.pattern", "blocks.*.attn.scores"])
    mask = run.attention_mask.bool()
    for i in range(tiny_lm.n_layers):
        p = run.tensors[f"blocks.{i}.attn.pattern"]
        sums = p.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        # padding keys get no attention from real queries
        pad_keys = ~mask[:, None, None, :]
        real_q = mask[:, None, :, None]
        assert float(p.masked_select(pad_keys & real_q).abs().sum()) < 1e-6
        if tiny_lm.is_causal:
            upper = torch.triu(torch.ones(p.shape[-1], p.shape[-1], dtype=torch.bool), 1)
            assert float(p[..., upper].abs().max()) == 0.0
            s = run.tensors[f"blocks.{i}.attn.scores"]
            assert torch.isinf(s[..., upper]).all()


def test_shapes(tiny_lm):
    run = tiny_lm.run(TEXTS[0], capture=["*"])
    b, s = run.input_ids.shape
    h, d = tiny_lm.n_heads, tiny_lm.head_dim
    assert run.tensors["blocks.0.attn.head_out"].shape == (b, s, h, d)
    assert run.tensors["blocks.0.mlp.hidden"].shape == (b, s, tiny_lm.d_mlp_at(0))
    assert run.tensors["blocks.1.attn.out"].shape == (b, s, tiny_lm.d_model)
    assert run.tensors["embed"].shape == (b, s, tiny_lm.d_model)
    if tiny_lm.is_causal:
        assert run.tensors["logits"].shape == (b, s, tiny_lm.vocab_size)
        assert torch.allclose(run.tensors["logits"], run.output)


def test_head_out_feeds_output_projection(tiny_lm):
    run = tiny_lm.run(TEXTS[0], capture=["blocks.1.attn.head_out", "blocks.1.attn.out"])
    o = tiny_lm.blocks[1].get_submodule(tiny_lm.family.o)
    with torch.no_grad():
        again = o(run.tensors["blocks.1.attn.head_out"].flatten(-2))
    assert torch.allclose(again, run.tensors["blocks.1.attn.out"], atol=1e-5)


def test_intervention_zeroing_a_head_changes_output(tiny_lm):
    def zero_head(t, name):
        t = t.clone()
        t[:, :, 0] = 0
        return t

    base = tiny_lm.run(TEXTS[0], capture=[])
    patched = tiny_lm.run(
        TEXTS[0], capture=["blocks.0.attn.head_out"], interventions={"blocks.0.attn.head_out": zero_head}
    )
    assert float(patched.tensors["blocks.0.attn.head_out"][:, :, 0].abs().max()) == 0.0
    assert not torch.allclose(base.output, patched.output, atol=1e-6)


def test_hooks_removed_even_when_forward_raises(tiny_lm):
    def boom(t, name):
        raise RuntimeError("boom")

    counts_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_lm.model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        tiny_lm.run(TEXTS[0], capture=["*"], interventions={"blocks.0.mlp.out": boom})
    counts_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_lm.model.modules())
    assert counts_after == counts_before
    # and the attention function is back to plain SDPA (no active session)
    from lmscope.capture.session import _ACTIVE

    assert _ACTIVE.get() is None


def test_unknown_capture_name_is_clear(tiny_lm):
    with pytest.raises(LmscopeError, match="matches nothing"):
        tiny_lm.run(TEXTS[0], capture=["blocks.99.attn.pattern"])


@pytest.mark.parametrize("name", ["blocks.99.attn.head_out", "blocks.0.atn.head_out", "blocks.*.mlp.hiden"])
def test_intervention_matching_nothing_is_an_error(tiny_lm, name):
    called = []
    with pytest.raises(LmscopeError, match="intervention name .* matches nothing") as err:
        tiny_lm.run(TEXTS[0], capture=[], interventions={name: lambda t, n: called.append(n)})
    assert "attn.head_out" in str(err.value) and f"0..{tiny_lm.n_layers - 1}" in str(err.value)
    assert not called


def test_intervention_globs_resolve_like_capture(tiny_lm):
    seen = []
    tiny_lm.run(TEXTS[0], capture=[], interventions={"blocks.*.mlp.out": lambda t, n: seen.append(n)})
    assert seen == expand("blocks.*.mlp.out", tiny_lm.n_layers, tiny_lm.is_causal)


def test_memory_refusal(tiny_lm):
    with pytest.raises(LmscopeError, match="--max-capture-gb"):
        tiny_lm.run(TEXTS[0], capture=["*"], max_bytes=1000)


def test_empty_text_is_clear(tiny_lm):
    with pytest.raises(LmscopeError, match="empty"):
        tiny_lm.run("   ")


def test_keep_grad_session_lets_gradients_flow(make_tiny):
    lm = make_tiny("llama")
    inputs = lm.encode(TEXTS[0])
    mask = torch.ones(lm.n_heads, requires_grad=True)
    with hooks(lm, [], {"blocks.0.attn.head_out": lambda t, n: t * mask[None, None, :, None]}):
        out = lm.forward(inputs).logits[0, -1].logsumexp(-1)
    out.backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


@pytest.mark.real
def test_real_smollm2_patterns_equal_eager(smollm2):
    run = smollm2.run("The capital of France is", capture=["blocks.*.attn.pattern", "blocks.*.resid_post"])
    ref = _hf_eager(smollm2, {"input_ids": run.input_ids, "attention_mask": run.attention_mask})
    for i in (0, 14, 29):
        assert torch.allclose(run.tensors[f"blocks.{i}.attn.pattern"], ref.attentions[i], atol=1e-5)
        assert run.tensors[f"blocks.{i}.attn.pattern"].shape[1] == 9
    assert smollm2.tokenizer.decode(run.output[0, -1].argmax()).strip() == "Paris"
