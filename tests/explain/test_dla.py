"""Direct logit attribution: parts sum to the logit, zeroed heads give zero, equals a hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.explain.dla import dla

TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.parametrize("contrast", [None, " John"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_parts_sum_to_the_logit(make_tiny, family, contrast):
    lm = make_tiny(family)
    res = dla(lm, TEXT, target=" Mary", contrast=contrast)
    with torch.no_grad():
        logits = lm.model(**lm.encode(TEXT)).logits[0, -1].double()
    t = lm.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    expected = float(logits[t])
    if contrast:
        expected -= float(logits[lm.tokenizer(contrast, add_special_tokens=False)["input_ids"][0]])
    assert abs(res.logit - expected) < 1e-4 * max(1.0, abs(expected))
    assert abs(res.total + res.residual_error - res.logit) < 1e-9
    assert abs(res.residual_error) < 1e-4 * max(1.0, abs(expected))
    n_heads = sum(1 for p in res.parts if p.head is not None)
    assert n_heads == lm.n_layers * lm.n_heads
    # the per-source breakdown of each top head sums to that head's value (no o_proj bias in it)
    for (layer, head), vals in res.sources.items():
        assert abs(sum(vals) - res.heads[layer, head]) < 1e-4 * max(1.0, abs(res.heads[layer, head]))
    data = json.loads(json.dumps(res.to_json()))
    assert set(data) >= {"target", "logit", "parts", "residual_error"}
    assert abs(sum(p["value"] for p in data["parts"]) + data["residual_error"] - data["logit"]) < 1e-9


def test_zeroed_head_contributes_zero(make_tiny):
    lm = make_tiny("llama")

    def zero(x, name):
        x = x.clone()
        x[:, :, 2] = 0.0
        return x

    base = dla(lm, TEXT, target=" Mary")
    res = dla(lm, TEXT, target=" Mary", interventions={"blocks.1.attn.head_out": zero})
    assert base.heads[1, 2] != 0.0
    assert res.heads[1, 2] == 0.0
    assert [p.value for p in res.parts if p.name == "L1H2"] == [0.0]
    assert abs(res.residual_error) < 1e-4 * max(1.0, abs(res.logit))
    assert res.logit != base.logit  # the intervention changed the forward being explained


def _rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_equals_hand_computation_on_tiny_llama(make_tiny):
    """Independent oracle: the tiny Llama recomputed from its weights in float64 with plain tensor code."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = make_tiny("llama")
    model = lm.model
    cfg = model.config
    ids = lm.encode(TEXT)["input_ids"]
    n = ids.shape[1]
    t = lm.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    eps = cfg.rms_norm_eps
    d = lambda p: p.detach().double()  # noqa: E731
    h = d(model.model.embed_tokens.weight)[ids[0]]  # [n, d]
    embed = h[-1].clone()
    pos = torch.arange(n)[None]
    cos, sin = model.model.rotary_emb(h[None].float(), pos)
    head_contrib, mlp_contrib = np.zeros((cfg.num_hidden_layers, nh, cfg.hidden_size)), []
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = _rms(h, d(layer.input_layernorm.weight), eps)
        q = (x @ d(a.q_proj.weight).T).view(n, nh, hd).transpose(0, 1)[None]
        k = (x @ d(a.k_proj.weight).T).view(n, nkv, hd).transpose(0, 1)[None]
        v = (x @ d(a.v_proj.weight).T).view(n, nkv, hd).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        attn_out = torch.zeros_like(h)
        wo = d(a.o_proj.weight)
        for head in range(nh):
            kv = head // (nh // nkv)
            s = (q[0, head] @ k[0, kv].T) / hd**0.5
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            z = p @ v[kv]  # [n, hd]
            c = z @ wo[:, head * hd : (head + 1) * hd].T
            head_contrib[i, head] = c[-1].numpy()
            attn_out += c
        h = h + attn_out
        x = _rms(h, d(layer.post_attention_layernorm.weight), eps)
        m = torch.nn.functional.silu(x @ d(layer.mlp.gate_proj.weight).T) * (
            x @ d(layer.mlp.up_proj.weight).T
        )
        m = m @ d(layer.mlp.down_proj.weight).T
        mlp_contrib.append(m[-1])
        h = h + m
    final = h[-1]
    scale = 1 / torch.sqrt(final.pow(2).mean() + eps)
    u = d(model.lm_head.weight)[t] * d(model.model.norm.weight) * scale
    hand_logit = float(_rms(final, d(model.model.norm.weight), eps) @ d(model.lm_head.weight)[t])

    res = dla(lm, TEXT, target=" Mary")
    tol = 1e-4 * max(1.0, abs(hand_logit))
    assert abs(res.logit - hand_logit) < tol
    assert abs(next(p.value for p in res.parts if p.name == "embed") - float(embed @ u)) < tol
    np.testing.assert_allclose(res.heads, head_contrib @ u.numpy(), atol=tol)
    np.testing.assert_allclose(res.mlp, [float(m @ u) for m in mlp_contrib], atol=tol)


def test_top_prediction_and_errors(make_tiny):
    lm = make_tiny("llama")
    res = dla(lm, TEXT, top_heads=2)
    with torch.no_grad():
        top = int(lm.model(**lm.encode(TEXT)).logits[0, -1].argmax())
    assert res.target["token_id"] == top and len(res.sources) == 2
    with pytest.raises(LmscopeError, match="exactly one token"):
        dla(lm, TEXT, target=" Maryland and")
    enc = make_tiny("bert")
    with pytest.raises(LmscopeError, match="encoder"):
        dla(enc, TEXT)
