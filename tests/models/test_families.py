"""Every family: the derived map finds its parts, captures equal what HF itself computes, and what a family
cannot give is refused in one line. Tiny random models from config objects, sharpened attention, sliding
windows shorter than the text, padded batches."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscope import LM
from lmscope.capture.session import hooks
from lmscope.errors import LmscopeError
from lmscope.testing import DECODERS, ENCODERS, tiny_model

OPEN = list(DECODERS + ENCODERS)
SEQ = 10


def _inputs(model_type: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 900, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on the second row
    return {"input_ids": ids, "attention_mask": mask}


def _with_impl(model, impl: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(impl)
    return other


@pytest.fixture(scope="module", params=OPEN)
def family_model(request):
    return request.param, tiny_model(request.param)


def _valid(mask):
    return mask.bool()


def test_patterns_equal_hf_eager(family_model):
    mt, model = family_model
    lm = LM(model, None, name=mt)
    inputs = _inputs(mt)
    names = [f"blocks.{i}.attn.pattern" for i in range(lm.n_layers)]
    with torch.no_grad(), hooks(lm, names) as s:
        lm.forward(inputs)
    eager = _with_impl(model, "eager")
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True, **({"use_cache": False} if lm.causal_attention else {}))
    valid = _valid(inputs["attention_mask"])
    for i, name in enumerate(names):
        got, want = s.tensors[name], ref.attentions[i]
        assert got.shape == want.shape
        for b in range(2):
            rows = valid[b]
            g, w = got[b][:, rows][:, :, rows], want[b][:, rows][:, :, rows]
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(g.sum(-1), torch.ones_like(g.sum(-1)), atol=1e-5, rtol=0)
        if lm.causal_attention:  # nothing above the diagonal
            assert float(got[0].triu(1).abs().max()) == 0.0
        last = got[0, :, -1]  # the last query sees every key: sharp means well above uniform (1/SEQ)
        assert float(last.max()) > 2.0 / SEQ, "attention should be sharp in these tests, not uniform"


def test_resid_post_equals_hidden_states_and_plain_forward_equals_default(family_model):
    mt, model = family_model
    lm = LM(model, None, name=mt)
    inputs = _inputs(mt)
    names = [f"blocks.{i}.resid_post" for i in range(lm.n_layers)]
    with torch.no_grad(), hooks(lm, names) as s:
        out = lm.forward(inputs, output_hidden_states=True)
    valid = _valid(inputs["attention_mask"])
    for i, name in enumerate(names):
        want = out.hidden_states[i + 1]
        if i == lm.n_layers - 1 and lm.family.final_norm and not torch.allclose(s.tensors[name], want):
            # some families report the last hidden state after the final norm
            want = lm.final_norm(s.tensors[name])
            torch.testing.assert_close(want[valid], out.hidden_states[-1][valid], atol=1e-5, rtol=1e-4)
            continue
        torch.testing.assert_close(s.tensors[name][valid], want[valid], atol=1e-5, rtol=1e-4)
    # the plain forward (no capture) equals the family's default attention implementation
    default = copy.deepcopy(model)
    impl = "sdpa" if type(model)._supports_sdpa else "eager"
    default.set_attn_implementation(impl)
    with torch.no_grad():
        plain = lm.output_of(lm.forward(inputs))
        ref = lm.output_of(default(**inputs, **({"use_cache": False} if lm.causal_attention else {})))
    scale = float(ref[valid].abs().max())
    assert float((plain[valid] - ref[valid]).abs().max()) <= 1e-5 * max(1.0, scale) * 10


def test_logits_site_and_unembed_equal_model_logits(family_model):
    mt, model = family_model
    lm = LM(model, None, name=mt)
    if lm.task != "lm":
        pytest.skip("encoders have no logits")
    inputs = _inputs(mt)
    last = f"blocks.{lm.n_layers - 1}.resid_post"
    with torch.no_grad(), hooks(lm, ["logits", last]) as s:
        out = lm.forward(inputs)
    torch.testing.assert_close(s.tensors["logits"], out.logits)
    lens = lm.unembed(lm.final_norm(s.tensors[last]))  # the logit lens at the last layer is the logits
    torch.testing.assert_close(lens, out.logits, atol=1e-4, rtol=1e-4)


def test_other_sites_have_their_documented_shapes(family_model):
    from lmscope.capture.names import expand

    mt, model = family_model
    lm = LM(model, None, name=mt)
    fam = lm.family
    wanted = [
        "embed",
        "blocks.*.attn.head_out",
        "blocks.*.attn.out",
        "blocks.*.mlp.out",
        "blocks.*.resid_pre",
    ]
    wanted += ["blocks.*.mlp.router", "blocks.*.mlp.experts"] if fam.moe else ["blocks.*.mlp.hidden"]
    if fam.mid:
        wanted.append("blocks.*.resid_mid")
    if not fam.native_attention:
        wanted += ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v", "blocks.*.attn.scores"]
    names = expand(wanted, lm.n_layers, has_logits=False, moe=fam.moe)
    inputs = _inputs(mt)
    with torch.no_grad(), hooks(lm, names) as s:
        lm.forward(inputs)
    b, n = 2, SEQ
    for name in names:
        t = s.tensors[name]
        what = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        if what == "embed":
            width = getattr(lm.config, "embedding_size", None) or lm.d_model  # ELECTRA/ALBERT project after
            assert t.shape == (b, n, width), name
        elif what in ("resid_pre", "attn.out", "mlp.out", "resid_mid"):
            assert t.shape == (b, n, lm.d_model), name
        elif what == "attn.head_out":
            assert t.shape == (b, n, lm.n_heads, lm.head_dim), name
        elif what == "mlp.hidden":
            assert t.shape == (b, n, lm.d_mlp_at(0)), name
        elif what == "mlp.router":
            assert t.shape == (b, n, lm.n_experts), name
            torch.testing.assert_close(t.sum(-1), torch.ones(b, n), atol=1e-5, rtol=0)
        elif what == "mlp.experts":
            assert t.shape == (b, n, lm.experts_per_token), name
        elif what == "attn.q":
            assert t.shape == (b, lm.n_heads, n, lm.head_dim), name
        elif what in ("attn.k", "attn.v"):
            assert t.shape == (b, lm.n_kv_heads, n, lm.head_dim), name
        elif what == "attn.scores":
            assert t.shape == (b, lm.n_heads, n, n), name
    sandwich = "post_feedforward_layernorm" in dict(lm.blocks[0].named_children())  # normed branch outputs
    if fam.mid and not fam.post_ln and not sandwich:  # pre-LN block: resid_mid = resid_pre + attn.out
        torch.testing.assert_close(
            s.tensors["blocks.0.resid_mid"],
            s.tensors["blocks.0.resid_pre"] + s.tensors["blocks.0.attn.out"] * _residual_scale(lm),
            atol=1e-4,
            rtol=1e-4,
        )


def _residual_scale(lm):
    return getattr(lm.config, "residual_multiplier", 1.0) or 1.0


def test_head_out_intervention_zeroes_a_head(family_model):
    """Zeroing head 0's input to the output projection changes the output; zeroing nothing does not."""
    mt, model = family_model
    lm = LM(model, None, name=mt)
    inputs = _inputs(mt)
    with torch.no_grad():
        clean = lm.output_of(lm.forward(inputs))

        def zero(t, name):
            t = t.clone()
            t[:, :, 0] = 0
            return t

        with hooks(lm, [], {"blocks.0.attn.head_out": zero}):
            ablated = lm.output_of(lm.forward(inputs))
        with hooks(lm, [], {"blocks.0.attn.head_out": lambda t, n: None}):
            same = lm.output_of(lm.forward(inputs))
    assert float((ablated - clean).abs().max()) > 1e-4
    torch.testing.assert_close(same, clean)


@pytest.mark.parametrize("mt", ["bloom", "mpt", "falcon", "deberta-v2"])
def test_native_attention_families_refuse_what_they_cannot_give(mt):
    lm = LM(tiny_model(mt), None, name=mt)
    assert lm.family.native_attention
    with pytest.raises(LmscopeError, match="own code"):
        with hooks(lm, ["blocks.0.attn.scores"]):
            pass
    with pytest.raises(LmscopeError, match="own code"):
        with hooks(lm, [], {"blocks.0.attn.pattern": lambda t, n: t}):
            pass


def test_bloom_never_sees_future_tokens():
    """Changing the last token must not move the first position's logits (the bug a None mask caused)."""
    lm = LM(tiny_model("bloom"), None, name="bloom")
    ids = torch.randint(5, 900, (1, 8), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 7) % 900
    with torch.no_grad():
        a = lm.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
        b = lm.forward({"input_ids": other, "attention_mask": torch.ones_like(ids)}).logits
    torch.testing.assert_close(a[0, :-1], b[0, :-1])


@pytest.mark.parametrize("mt", ["t5", "bart"])
def test_encoder_decoders_refused_in_one_line(mt, tmp_path):
    from transformers import AutoConfig

    from lmscope.models.families import check_supported

    with pytest.raises(LmscopeError, match="encoder-decoder"):
        check_supported(AutoConfig.for_model(mt))


def test_albert_shared_layer_is_captured_once_per_depth():
    """ALBERT runs one layer module at every depth: each depth's capture is its own call's tensor."""
    lm = LM(tiny_model("albert", num_hidden_layers=3), None, name="albert")
    assert lm.family.shared and lm.n_layers == 3 and len({id(b) for b in lm.blocks}) == 1
    ids = torch.randint(5, 900, (1, 7), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = [f"blocks.{i}.{w}" for i in range(3) for w in ("attn.pattern", "resid_pre", "resid_post")]
    with torch.no_grad(), hooks(lm, names) as s:
        out = lm.forward(inputs, output_hidden_states=True)
    for i in range(3):
        torch.testing.assert_close(s.tensors[f"blocks.{i}.resid_post"], out.hidden_states[i + 1])
        if i:
            torch.testing.assert_close(
                s.tensors[f"blocks.{i}.resid_pre"], s.tensors[f"blocks.{i - 1}.resid_post"]
            )
    assert not torch.allclose(s.tensors["blocks.0.attn.pattern"], s.tensors["blocks.2.attn.pattern"])
    with pytest.raises(LmscopeError, match="every depth"):
        from lmscope.compress.prune.heads import check_head_surgery

        check_head_surgery(lm)


def test_sequence_and_token_classifiers_keep_their_heads():
    for mt in ("bert", "roberta", "distilbert", "deberta-v2", "llama"):
        clf = LM(tiny_model(mt, head="seq"), None, name=mt)
        assert clf.task == "classifier" and clf.labels == ["negative", "neutral", "positive"]
        inputs = _inputs(mt)
        with torch.no_grad():
            out = clf.output_of(clf.forward(inputs))
        assert out.shape == (2, 3)
        tok = LM(tiny_model(mt, head="tok"), None, name=mt)
        assert tok.task == "token-classifier"
        with torch.no_grad():
            assert tok.output_of(tok.forward(inputs)).shape == (2, SEQ, 3)
