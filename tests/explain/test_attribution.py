"""Attribution methods: one table of configurations -> a contract test for every method, plus oracles
(hand-written autograd, Captum, exact occlusion, completeness, rollout/flow invariants, logit lens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.explain.attribution.base import REGISTRY, get_method, method_names
from lmscope.explain.targets import Objective, encode_prompt, make_target

TEXT = "When Mary and John went to the store, John gave a drink to"
PAIR = "A man handed a woman a cup at the shop"

# One row per method configuration; every registered method must have a row (test below).
CASES = [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"steps": 16, "method": "gausslegendre", "internal_batch_size": 5}),
    ("integrated_gradients", {"max_steps": 96}),  # adaptive
    ("occlusion", {}),
    ("occlusion_delete", {}),
    ("attention_rollout", {}),
    ("attention_flow", {}),
    ("kernel_shap", {"n_samples": 48}),
    ("logit_lens", {}),
]


def objective(lm, text=TEXT, **kw):
    target = make_target(lm, pair=PAIR) if not lm.is_causal else make_target(lm)
    return Objective(lm, encode_prompt(lm, text), target, **kw)


def hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_every_registered_method_has_a_contract_row():
    assert set(method_names()) == {name for name, _ in CASES}
    assert set(REGISTRY) == set(method_names())


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_contract(tiny_lm, name, config):
    method = get_method(name, **config)
    obj = objective(tiny_lm)
    if method.supports(tiny_lm):
        with pytest.raises(LmscopeError):
            method.attribute(obj)
        return
    before = hook_count(tiny_lm.model)
    torch.manual_seed(0)
    first = method.attribute(obj)
    torch.manual_seed(0)
    second = method.attribute(obj)
    expected = tiny_lm.n_layers if method.unit == "layer" else obj.n
    assert len(first.scores) == expected
    assert np.all(np.isfinite(first.scores))
    assert first.scores == second.scores  # deterministic under a fixed seed
    assert np.abs(first.scores).max() > 0  # says something
    assert hook_count(tiny_lm.model) == before == 0  # no hooks left behind
    assert first.to_dict()["scores"] == first.scores


def _logit_fn(lm, target_id):
    def f(embeds):
        out = lm.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
        return out.logits[:, -1, target_id]

    return f


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saliency_and_input_x_gradient_equal_hand_autograd(make_tiny, family):
    lm = make_tiny(family)
    obj = objective(lm)
    ids = encode_prompt(lm, TEXT)
    x = lm.module(lm.family.embed)(ids[None]).detach().requires_grad_(True)
    _logit_fn(lm, obj.target.token_id)(x)[0].backward()
    g = x.grad[0]
    sal = get_method("saliency").attribute(obj).scores
    ixg = get_method("input_x_gradient").attribute(obj).scores
    torch.testing.assert_close(
        torch.tensor(sal, dtype=torch.float64), g.norm(dim=-1).double(), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        torch.tensor(ixg, dtype=torch.float64), (g * x.detach()[0]).sum(-1).double(), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method,steps", [("gausslegendre", 32), ("riemann_trapezoid", 20)])
def test_integrated_gradients_equal_captum(make_tiny, family, method, steps):
    from captum.attr import LayerIntegratedGradients

    lm = make_tiny(family)
    obj = objective(lm, baseline="pad")
    ids = encode_prompt(lm, TEXT)[None]
    target_id = obj.target.token_id

    def forward(input_ids):
        return lm.model(input_ids=input_ids).logits[:, -1, target_id]

    lig = LayerIntegratedGradients(forward, lm.module(lm.family.embed))
    base_ids = torch.full_like(ids, lm.tokenizer.pad_token_id)
    ref = lig.attribute(ids, baselines=base_ids, n_steps=steps, method=method, internal_batch_size=7)
    ref = ref[0].sum(-1).double()
    ours = get_method("integrated_gradients", steps=steps, method=method, internal_batch_size=8).attribute(
        obj
    )
    ours = torch.tensor(ours.scores, dtype=torch.float64)
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_integrated_gradients_completeness_at_200_steps(make_tiny):
    lm = make_tiny("gpt2")
    obj = objective(lm, baseline="zero")
    res = get_method(
        "integrated_gradients", steps=200, method="gausslegendre", internal_batch_size=50
    ).attribute(obj)
    delta = obj.f_x - obj.f_baseline
    assert abs(delta) > 1e-2  # a non-trivial path
    assert res.info["delta_f"] == pytest.approx(delta)
    assert abs(sum(res.scores) - delta) <= 0.005 * abs(delta)
    assert res.info["completeness_error"] == pytest.approx(abs(sum(res.scores) - delta))


def test_adaptive_integrated_gradients_meets_tolerance_on_tiny(make_tiny):
    lm = make_tiny("llama")
    obj = objective(lm, baseline="pad")
    res = get_method("integrated_gradients", tolerance=0.01).attribute(obj)
    assert res.info["method"] == "adaptive"
    assert res.info["relative_completeness_error"] <= 0.01
    assert res.info["steps"] <= 1024


@pytest.mark.real
def test_adaptive_integrated_gradients_on_smollm2_reaches_one_percent(smollm2):
    obj = Objective(smollm2, encode_prompt(smollm2, TEXT), make_target(smollm2, " Mary"), baseline="pad")
    uniform = get_method("integrated_gradients", steps=32, method="gausslegendre").attribute(obj)
    res = get_method("integrated_gradients").attribute(obj)
    delta = obj.f_x - obj.f_baseline
    assert res.info["completeness_error"] == pytest.approx(abs(sum(res.scores) - delta))
    assert res.info["relative_completeness_error"] <= 0.01
    # the reason for adapting: uniform steps are far off on this path
    assert uniform.info["completeness_error"] > 10 * res.info["completeness_error"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_occlusion_is_exact_one_token_difference(make_tiny, family):
    lm = make_tiny(family)
    obj = objective(lm)
    ids = encode_prompt(lm, TEXT)
    target_id = obj.target.token_id
    pad = lm.tokenizer.pad_token_id

    def f(input_ids):
        with torch.no_grad():
            return float(lm.model(input_ids=input_ids[None]).logits[0, -1, target_id])

    replace = get_method("occlusion").attribute(obj).scores
    delete = get_method("occlusion_delete").attribute(obj).scores
    for i in (0, 4, len(ids) - 1):
        replaced = ids.clone()
        replaced[i] = pad
        assert replace[i] == pytest.approx(f(ids) - f(replaced), abs=1e-4)
        dropped = torch.cat([ids[:i], ids[i + 1 :]])
        assert delete[i] == pytest.approx(f(ids) - f(dropped), abs=1e-4)


def test_kernel_shap_efficiency_and_r2(tiny_lm):
    obj = objective(tiny_lm)
    res = get_method("kernel_shap", n_samples=128, max_features=100).attribute(obj)
    assert sum(res.scores) == pytest.approx(obj.f_x - obj.f_baseline, rel=1e-6, abs=1e-6)
    sparse = get_method("kernel_shap", n_samples=128, max_features=3).attribute(obj)
    assert sum(1 for s in sparse.scores if s != 0) <= 3
    assert sparse.info["n_features"] == 3
    # same samples (same seed): the sparse surrogate is a restriction of the full one, so it fits no better
    assert sparse.info["r2"] <= res.info["r2"] + 1e-9


def test_kernel_shap_r2_is_the_fit_of_its_scores_on_the_model(tiny_lm, monkeypatch):
    """Reference: the model's own outputs on the coalitions it was asked about, and the reported scores as
    the linear surrogate: R² = 1 − SS_res/SS_tot recomputed from them."""
    obj = objective(tiny_lm)
    calls = []
    real = obj.f_masks

    def recording(masks):
        out = real(masks)
        calls.append((masks.clone(), out.detach().double().clone()))
        return out

    monkeypatch.setattr(obj, "f_masks", recording)
    res = get_method("kernel_shap", n_samples=128, max_features=100).attribute(obj)
    free = obj.free.numpy()
    z = torch.cat([m for m, _ in calls]).numpy()[:, free].astype(np.float64)
    y = torch.cat([f for _, f in calls]).numpy() - obj.f_baseline
    phi = np.asarray(res.scores)[free]
    r2 = 1 - ((y - z @ phi) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert res.info["r2"] == pytest.approx(r2, abs=1e-9)
    assert 0.0 < res.info["r2"] < 1.0  # a random transformer is not exactly linear in token presence
    shuffled = np.random.default_rng(0).permutation(phi)
    assert 1 - ((y - z @ shuffled) ** 2).sum() / ((y - y.mean()) ** 2).sum() < res.info["r2"]


def test_kernel_shap_recovers_a_linear_model():
    from lmscope.explain.attribution.kernel_shap import constrained_lstsq, r_squared

    rng = np.random.default_rng(1)
    w = rng.normal(size=6)
    z = rng.integers(0, 2, size=(80, 6)).astype(float)
    y = z @ w
    phi = constrained_lstsq(z, y, w.sum())
    np.testing.assert_allclose(phi, w, atol=1e-6)
    assert r_squared(y, z @ phi) == pytest.approx(1.0)


def test_rollout_rows_sum_to_one(tiny_lm):
    from lmscope.explain.attribution.attention_rollout import residual_attention, rollout

    patterns = objective(tiny_lm).attention_patterns()
    for a in residual_attention(patterns):
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[0], dtype=a.dtype))
    r = rollout(patterns)
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[0], dtype=r.dtype))
    if tiny_lm.is_causal:  # nothing flows from the future
        assert torch.triu(r, diagonal=1).abs().max() == 0


def test_attention_flow_matches_networkx_on_a_random_graph():
    nx = pytest.importorskip("networkx")
    from lmscope.explain.attribution.attention_flow import SCALE, attention_flow, flow_graph

    gen = torch.Generator().manual_seed(3)
    mats = []
    for _ in range(3):
        a = torch.rand(5, 5, generator=gen, dtype=torch.float64).tril()
        mats.append(a / a.sum(-1, keepdim=True))
    sink = torch.zeros(5, dtype=torch.float64)
    sink[-1] = 1.0
    ours = attention_flow(mats, sink)
    graph, super_sink = flow_graph(mats, sink)
    g = nx.DiGraph()
    coo = graph.tocoo()
    for u, v, c in zip(coo.row, coo.col, coo.data):
        g.add_edge(int(u), int(v), capacity=int(c))
    for i in range(5):
        ref = nx.maximum_flow_value(g, i, super_sink) / SCALE if i in g else 0.0
        assert float(ours[i]) == pytest.approx(ref, abs=1e-9)
    # a hand-checked one-layer case: position 1 reads itself and position 0 half each
    two = [torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)]
    flows = attention_flow(two, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(flows, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_attention_flow_64_tokens_finishes(make_tiny):
    lm = make_tiny("llama")
    obj = objective(lm, text=" ".join(["word"] * 64))
    res = get_method("attention_flow").attribute(obj)
    assert len(res.scores) == obj.n
    assert max(res.scores) <= 1.0 + 1e-6  # the sink takes at most one unit of flow


def test_logit_lens_last_layer_equals_logits(make_tiny):
    from lmscope.explain.lens import logit_lens

    lm = make_tiny("llama")
    run = lm.run(TEXT, capture=["blocks.*.resid_post", "logits"])
    lens = logit_lens(lm, run, k=3)
    n = run.input_ids.shape[1]
    assert lens.top_ids.shape == (lm.n_layers, n, 3)
    assert lens.final_token_prob.shape == (lm.n_layers, n)
    probs = run.output[0].softmax(-1)
    torch.testing.assert_close(lens.top_ids[-1], probs.topk(3, dim=-1).indices)
    torch.testing.assert_close(lens.top_probs[-1], probs.topk(3, dim=-1).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lens.final_token_prob[-1], probs.max(-1).values, rtol=1e-4, atol=1e-5)
    assert lens.top_tokens[-1][-1][0] == lm.tokenizer.decode([int(probs[-1].argmax())])
    with pytest.raises(LmscopeError, match="resid_post"):
        logit_lens(lm, lm.run(TEXT, capture=["logits"]))


def test_logit_lens_attribution_sums_to_final_target(make_tiny):
    lm = make_tiny("gpt2")
    obj = objective(lm)
    res = get_method("logit_lens").attribute(obj)
    assert res.info["target_by_layer"][-1] == pytest.approx(obj.f_x, abs=1e-4)
    assert sum(res.scores) == pytest.approx(obj.f_x - res.info["embedding_reading"], abs=1e-4)


def test_special_tokens_are_shown_and_excludable(make_tiny):
    lm = make_tiny("bert")  # [CLS] ... [SEP]
    target = make_target(lm, pair=PAIR)
    ids = encode_prompt(lm, TEXT)
    shown = Objective(lm, ids, target)
    assert shown.special[0] and shown.special[-1] and not any(shown.special[1:-1])
    excluded = Objective(lm, ids, target, exclude_special=True)
    scores = get_method("occlusion").attribute(excluded).scores
    assert scores[0] == 0 and scores[-1] == 0
    assert get_method("occlusion").attribute(shown).scores[0] != 0


def test_chat_template_tokens_are_kept(make_tiny):
    lm = make_tiny("llama")
    plain = encode_prompt(lm, TEXT)
    chat = encode_prompt(lm, TEXT, chat=True)
    assert len(chat) > len(plain)
    obj = Objective(lm, chat, make_target(lm), exclude_special=True)
    assert any(obj.special) and not all(obj.special)
    scores = get_method("saliency").attribute(obj).scores
    assert all(s == 0 for s, sp in zip(scores, obj.special) if sp)


def test_multi_token_target_error_shows_tokenization(tiny_lm):
    if not tiny_lm.is_causal:
        with pytest.raises(LmscopeError, match="--pair"):
            make_target(tiny_lm, target=" Mary")
        return
    with pytest.raises(LmscopeError) as err:
        make_target(tiny_lm, target=" Maryanne")
    msg = str(err.value)
    assert "2 tokens" in msg and "' Mary'" in msg and "'anne'" in msg and "first token" in msg


def test_contrast_target_is_the_logit_difference(make_tiny):
    lm = make_tiny("llama")
    ids = encode_prompt(lm, TEXT)
    a = Objective(lm, ids, make_target(lm, " Mary"))
    b = Objective(lm, ids, make_target(lm, " John"))
    ab = Objective(lm, ids, make_target(lm, " Mary", contrast=" John"))
    assert ab.f_x == pytest.approx(a.f_x - b.f_x, abs=1e-5)
    sal = [get_method("input_x_gradient").attribute(o).scores for o in (a, b, ab)]
    np.testing.assert_allclose(sal[2], np.array(sal[0]) - np.array(sal[1]), atol=1e-5)


def test_unknown_setting_is_an_error_naming_the_valid_ones():
    with pytest.raises(LmscopeError, match="has no setting 'max_step'") as err:
        get_method("integrated_gradients", max_step=64)
    assert "max_steps" in str(err.value)
    assert get_method("integrated_gradients", max_steps=64).max_steps == 64


def test_settings_for_an_unknown_method_are_an_error(make_tiny):
    from lmscope.explain.api import explain_objective

    lm = make_tiny("llama")
    with pytest.raises(LmscopeError, match="unknown attribution method.*'integrated_gradient'"):
        explain_objective(objective(lm), ["saliency"], config={"integrated_gradient": {"steps": 4}})


def test_a_new_method_file_registers_itself(tmp_path, monkeypatch):
    """The registry finds methods by listing the package: a new file is a new method, nothing else to edit."""
    import lmscope.explain.attribution as package
    from lmscope.explain.attribution import base

    (tmp_path / "constant_one.py").write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from lmscope.explain.attribution.base import AttributionMethod, register\n\n"
        "@register\n@dataclass\nclass ConstantOne(AttributionMethod):\n"
        "    name = 'constant_one'\n"
        "    def compute(self, objective):\n"
        "        return torch.ones(objective.ids.shape[-1]), {}\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))
    monkeypatch.setattr(base, "_loaded", False)
    monkeypatch.delitem(__import__("sys").modules, "lmscope.explain.attribution.constant_one", raising=False)
    assert "constant_one" in base.method_names()
    assert type(base.get_method("constant_one")).__name__ == "ConstantOne"
    __import__("sys").modules.pop("lmscope.explain.attribution.constant_one", None)
