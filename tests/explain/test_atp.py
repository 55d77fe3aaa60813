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


def test_graddrop_equals_dropping_each_sublayer_gradient_by_brute_force(make_tiny):
    """GradDrop's per-sublayer gradients (full gradient minus a VJP) equal re-running the forward with that
    sublayer's output detached; the score is (1/(U−1)) Σ_u |estimate_u| over U = 2·layers sublayers."""
    from lmscope.capture.session import hooks
    from lmscope.explain.heads import next_token_ce

    lm = make_tiny("llama")
    lm.model.double()
    ids = torch.randint(1000, 20000, (2, 10), generator=torch.Generator().manual_seed(4))
    scores = head_importance(lm, input_ids=ids, methods=("zero", "mean"), approx="atp-graddrop")
    names = [f"blocks.{i}.attn.head_out" for i in range(lm.n_layers)]
    units = [f"blocks.{i}.{s}" for i in range(lm.n_layers) for s in ("attn.out", "mlp.out")]

    def head_grads(detach=None):
        iv = {n: (lambda x, name: x.clone()) for n in names}
        if detach is not None:
            iv[detach] = lambda x, name: x.detach()
        with torch.enable_grad(), hooks(lm, names, iv, keep_grad=True) as s:
            logits = lm.model(input_ids=ids).logits
            loss = next_token_ce(logits[:, :-1], ids[:, 1:]).mean(1).mean()
            acts = [s.tensors[n] for n in names]
            return [a.detach() for a in acts], torch.autograd.grad(loss, acts, allow_unused=True)

    acts, plain = head_grads()
    for mode in ("zero", "mean"):
        expect = np.zeros((lm.n_layers, lm.n_heads))
        for u, unit in enumerate(units):
            _, dropped = head_grads(unit)
            for layer, (a, g_plain, g_drop) in enumerate(zip(acts, plain, dropped)):
                g = g_plain if u < 2 * layer + 1 else g_drop  # only sublayers after the head are dropped
                target = torch.zeros_like(a) if mode == "zero" else a.mean(dim=(0, 1), keepdim=True)
                expect[layer] += ((target - a) * g).sum(dim=(0, 1, 3)).abs().numpy()
        expect /= len(units) - 1
        # (float64 model; rotary tables stay float32 in HF, hence not 1e-12)
        np.testing.assert_allclose(scores[f"atp_{mode}_graddrop"], expect, rtol=1e-6, atol=1e-12)
        assert np.all(scores[f"atp_{mode}_graddrop"] >= 0)
        # a different number from |AtP|: dropping paths changes the estimates
        assert not np.allclose(scores[f"atp_{mode}_graddrop"], np.abs(scores[f"atp_{mode}"]), rtol=1e-2)
    # the plain AtP estimates are unchanged by asking for GradDrop
    plain_scores = head_importance(lm, input_ids=ids, methods=("zero", "mean"), approx="atp")
    np.testing.assert_allclose(scores["atp_zero"], plain_scores["atp_zero"], rtol=1e-10)
    data = scores.to_json()
    assert "APPROXIMATE" in data["approximate"]["atp_zero_graddrop"]
    assert data["heads"][0]["atp_mean_graddrop"] is not None
    from lmscope.views.heads import heads_report

    page = json.dumps(heads_report(scores, "heads").data(), ensure_ascii=False)
    assert "GradDrop (approximate |Δ loss|)" in page and "APPROXIMATE |Δ loss| of zero ablation" in page


def test_patch_graddrop_equals_brute_force_and_is_labelled(make_tiny):
    from lmscope.capture.session import hooks

    lm = make_tiny("llama")
    lm.model.double()
    res = patch(lm, CLEAN, CORRUPT, " Mary", " John", approx="atp-graddrop")
    gd = res.approx["graddrop"]
    L = lm.n_layers
    nodes = [f"blocks.{i}.{s}" for i in range(L) for s in ("resid_pre", "attn.head_out", "mlp.out")]
    units = [f"blocks.{i}.{s}" for i in range(L) for s in ("attn.out", "mlp.out")]
    first = {"resid_pre": 0, "attn.head_out": 1, "mlp.out": 2}
    clean_ids, corrupt_ids = (lm.encode(t)["input_ids"] for t in (CLEAN, CORRUPT))
    with torch.no_grad(), hooks(lm, nodes) as s:
        lm.model(input_ids=clean_ids)
    clean = {n: s.tensors[n][0].double() for n in nodes}

    def node_grads(detach=None):
        iv = {n: (lambda x, name: x.clone()) for n in nodes}
        if detach is not None:  # same value, no gradient through it (the site stays differentiable itself)
            iv[detach] = lambda x, name: x.detach() + 0 * x
        with torch.enable_grad(), hooks(lm, nodes, iv, keep_grad=True) as s:
            logits = lm.model(input_ids=corrupt_ids).logits[0, -1]
            m = logits[res.target_id] - logits[res.contrast_id]
            acts = [s.tensors[n] for n in nodes]
            grads = torch.autograd.grad(m, acts, allow_unused=True)
        return {n: (a.detach()[0].double(), g) for n, a, g in zip(nodes, acts, grads)}

    plain = node_grads()
    expect = {"resid": np.zeros((L, len(res.tokens))), "heads": np.zeros((L, lm.n_heads)), "mlp": np.zeros(L)}
    for u, unit in enumerate(units):
        dropped = node_grads(unit)
        for n in nodes:
            layer, what = int(n.split(".")[1]), n.split(".", 2)[2]
            a, g = plain[n] if u < 2 * layer + first[what] else dropped[n]
            terms = (clean[n] - a) * (torch.zeros_like(a) if g is None else g[0].double())
            if what == "attn.head_out":
                expect["heads"][layer] += terms.sum(dim=(0, 2)).abs().numpy()
            elif what == "mlp.out":
                expect["mlp"][layer] += float(terms.sum().abs())
            else:
                expect["resid"][layer] += terms.sum(-1).abs().numpy()
    for site, want in expect.items():
        np.testing.assert_allclose(gd[site], want / (len(units) - 1), rtol=1e-6, atol=1e-10, err_msg=site)
    np.testing.assert_allclose(gd["heads_pos"].sum(-1) >= gd["heads"] - 1e-12, True)  # |Σ| ≤ Σ|·|
    data = json.loads(json.dumps(res.to_json()))
    assert "APPROXIMATE" in data["approx"]["graddrop"]["label"] and data["approx"]["method"] == "atp-graddrop"
    assert "heads_graddrop_vs_abs" in data["approx"]["correlation_with_exact"]
    from lmscope.views.patching import patching_report

    html = patching_report(res, "patch").render()
    assert (
        "Attention heads (approximate, AtP + GradDrop)" in html
        and "MLPs (approximate, AtP + GradDrop)" in html
    )
