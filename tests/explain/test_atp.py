"""Attribution patching: exact where the model is linear in the patched activation, a true first-order
estimate elsewhere (checked against finite differences), and labelled approximate wherever it appears."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lmscope.errors import LmscopeError
from lmscope.explain.heads import head_importance, token_losses
from lmscope.explain.patching import patch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _linear_last_layer(lm):
    """Make the metric linear in every site of the last layer: its attention pattern constant (q, k = 0:
    uniform causal attention), no norm before attention, no MLP, no final norm."""
    last = lm.blocks[-1]
    with torch.no_grad():
        last.self_attn.q_proj.weight.zero_()
        last.self_attn.k_proj.weight.zero_()
        last.mlp.down_proj.weight.mul_(0.0)
    last.input_layernorm = nn.Identity()
    lm.model.model.norm = nn.Identity()
    return lm


def test_atp_equals_exact_patching_on_a_model_linear_in_the_patched_activation(make_tiny):
    lm = _linear_last_layer(make_tiny("llama"))
    last = lm.n_layers - 1
    res = patch(lm, CLEAN, CORRUPT, " Mary", " John", layers=[last], approx="atp")
    a = res.approx
    tol = 1e-4 * max(1.0, abs(res.metric_clean), abs(res.metric_corrupt))
    np.testing.assert_allclose(a["resid"][last], res.resid_raw[last], atol=tol)
    np.testing.assert_allclose(a["heads"][last], res.heads_raw[last], atol=tol)
    np.testing.assert_allclose(a["mlp"][last], res.mlp_raw[last], atol=tol)
    # per head per position: the pieces add up to the whole-head estimate (linear model)
    per = a["heads_pos"][last] - res.metric_corrupt
    np.testing.assert_allclose(per.sum(-1) + res.metric_corrupt, a["heads"][last], atol=tol)
    assert a["correlation"]["heads"]["pearson"] == pytest.approx(1.0, abs=1e-6)
    # ...and on the unmodified model it is only an estimate (different from exact somewhere)
    raw = patch(make_tiny("llama"), CLEAN, CORRUPT, " Mary", " John", approx="atp")
    assert np.nanmax(np.abs(raw.approx["heads"] - raw.heads_raw)) > 1e-3


def test_qk_fix_is_exact_when_only_the_patched_layer_attention_is_nonlinear(make_tiny):
    """Last layer keeps its real (saturating) softmax and norm; after its attention all is linear (no
    MLP, no final norm). The QK-fixed residual estimate recomputes that attention, so it equals exact
    patching; the plain linear estimate does not."""
    lm = make_tiny("llama")
    with torch.no_grad():
        lm.blocks[-1].mlp.down_proj.weight.mul_(0.0)
    lm.model.model.norm = nn.Identity()
    last = lm.n_layers - 1
    res = patch(lm, CLEAN, CORRUPT, " Mary", " John", layers=[last], approx="atp")
    tol = 1e-4 * max(1.0, abs(res.metric_clean), abs(res.metric_corrupt))
    np.testing.assert_allclose(res.approx["resid"][last], res.resid_raw[last], atol=tol)
    assert np.max(np.abs(res.approx["resid_linear"][last] - res.resid_raw[last])) > 10 * tol


def test_patch_json_labels_the_approximation(make_tiny):
    lm = make_tiny("llama")
    res = patch(lm, CLEAN, CORRUPT, " Mary", " John", approx="atp", exact=False)
    data = json.loads(json.dumps(res.to_json()))
    assert data["approx"]["approximate"] is True and "APPROXIMATE" in data["approx"]["label"]
    assert data["approx"]["resid_qk_fix"] is True and len(data["approx"]["resid_linear"]) == lm.n_layers
    assert data["exact_computed"] is False and data["approx"]["correlation_with_exact"] is None
    assert len(data["approx"]["heads_pos"]) == lm.n_layers
    assert len(data["approx"]["heads_pos"][0][0]) == len(data["tokens"])
    assert "approx" in patch(lm, CLEAN, CORRUPT, " Mary", " John").to_json()  # None without --approx
    with pytest.raises(LmscopeError, match="unknown approximation"):
        patch(lm, CLEAN, CORRUPT, " Mary", approx="taylor")


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_atp_is_the_first_order_term_of_the_exact_ablation(make_tiny, mode):
    """AtP's estimate is d/dt Δloss(a + t·(a' − a)) at t = 0: checked by central differences."""
    lm = make_tiny("llama")
    lm.model.double()
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(1))
    scores = head_importance(lm, input_ids=ids, methods=(mode,), approx="atp")
    acts = {}
    from lmscope.capture.session import hooks

    names = [f"blocks.{i}.attn.head_out" for i in range(lm.n_layers)]
    with torch.no_grad(), hooks(lm, names) as s:
        lm.model(input_ids=ids)
    acts = s.tensors
    eps = 1e-2
    for layer, head in [(0, 1), (1, 2), (2, 3)]:
        mean = acts[names[layer]][:, :, head].mean(dim=(0, 1))

        def moved(t, layer=layer, head=head, mean=mean):
            def fn(x, name):
                x = x.clone()
                target = torch.zeros_like(x[:, :, head]) if mode == "zero" else mean.expand_as(x[:, :, head])
                x[:, :, head] = x[:, :, head] + t * (target - x[:, :, head])
                return x

            return {names[layer]: fn}

        up = token_losses(lm, ids, moved(eps)).mean(1).mean()
        down = token_losses(lm, ids, moved(-eps)).mean(1).mean()
        fd = float(up - down) / (2 * eps)
        assert scores[f"atp_{mode}"][layer, head] == pytest.approx(fd, rel=1e-3, abs=1e-6)
    assert f"ablation_{mode}" not in scores.scores  # not run: only estimated
    c = scores[f"atp_{mode}_cancellation"]
    assert np.all((c >= 0) & (c <= 1))


def test_head_atp_compare_exact_and_labels(make_tiny):
    lm = make_tiny("llama")
    ids = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(2))
    scores = head_importance(lm, input_ids=ids, methods=("zero", "mean"), approx="atp", compare_exact=True)
    exact = head_importance(lm, input_ids=ids, methods=("zero", "mean"))
    np.testing.assert_allclose(scores["ablation_mean"], exact["ablation_mean"], atol=1e-6)
    corr = scores.meta["atp_vs_exact"]
    assert set(corr) == {"atp_zero", "atp_mean"} and -1 <= corr["atp_mean"]["spearman"] <= 1
    data = scores.to_json()
    assert "APPROXIMATE" in data["metrics"]["atp_mean"] and "APPROXIMATE" in data["approximate"]["atp_mean"]
    assert data["heads"][0]["atp_mean"] is not None
    enc = make_tiny("bert")
    with pytest.raises(LmscopeError, match="causal"):
        head_importance(enc, input_ids=ids[:, :8], methods=("zero",), approx="atp")
