"""Faithfulness metrics on a hand-checked toy (a function linear in token presence), the sanity check
on a tiny model, and the ranking / JSON shape of ``explain``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.explain.faithfulness import faithfulness, random_baseline, randomized_copy, ranking, spearman


class LinearToy:
    """f(mask) = Σ w_i · mask_i: what an Objective looks like to the metrics."""

    def __init__(self, w):
        self.w = torch.tensor(w, dtype=torch.float64)
        self.n = len(w)
        self.free = torch.ones(self.n, dtype=torch.bool)
        self.f_x = float(self.w.sum())
        self.f_baseline = 0.0

    def f_masks(self, masks):
        return masks.double() @ self.w


W = [3.0, 1.0, 0.0, -2.0]


def test_metrics_by_hand():
    toy = LinearToy(W)
    fa = faithfulness(toy, W)  # the perfect ranking: 0, 1, 2, 3
    c = fa["curves"]
    assert c["k"] == [0, 1, 2, 3, 4]
    assert c["deletion"] == [2.0, -1.0, -2.0, -2.0, 0.0]
    assert c["insertion"] == [0.0, 3.0, 4.0, 4.0, 2.0]
    assert fa["deletion_aopc"] == pytest.approx(13 / 5)  # mean(0, 3, 4, 4, 2)
    assert fa["insertion_aopc"] == pytest.approx(13 / 5)
    # top 1/5/10/20 % -> 1 token, 50 % -> 2 tokens
    assert fa["comprehensiveness"] == pytest.approx((3 + 3 + 3 + 3 + 4) / 5)
    assert fa["sufficiency"] == pytest.approx((-1 - 1 - 1 - 1 - 2) / 5)
    assert fa["aopc_sum"] == pytest.approx(26 / 5)


def test_a_reversed_ranking_scores_worse_than_random_and_the_true_one_better():
    toy = LinearToy([2.0, -1.0, 0.5, 3.0, -0.5, 1.5, 0.0, -2.5])
    good = faithfulness(toy, toy.w.tolist())
    bad = faithfulness(toy, (-toy.w).tolist())
    rand = random_baseline(toy, n_orders=20)
    assert good["aopc_sum"] > rand["aopc_sum"] > bad["aopc_sum"]
    assert good["comprehensiveness"] > bad["comprehensiveness"]
    assert good["sufficiency"] < bad["sufficiency"]


def test_ranking_skips_tokens_that_may_not_be_perturbed():
    free = torch.tensor([True, False, True, True])
    assert ranking([0.1, 9.0, 0.5, 0.5], free).tolist() == [2, 3, 0]


def test_long_inputs_use_a_subsampled_grid():
    toy = LinearToy(list(np.linspace(-1, 1, 100)))
    fa = faithfulness(toy, toy.w.tolist(), max_points=21)
    ks = fa["curves"]["k"]
    assert ks[0] == 0 and ks[-1] == 100 and len(ks) <= 21 + 5
    assert {1, 5, 10, 20, 50} <= set(ks)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2, 3], [0, 0, 0]) is None
    assert spearman([0, 0, 0], [0, 0, 0]) == 1.0  # nothing changed: a failed randomization check, not n/a
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    from scipy.stats import spearmanr

    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    ties_a, ties_b = np.round(a), np.round(b * 2) / 2  # many ties on both sides
    assert spearman(ties_a, ties_b) == pytest.approx(spearmanr(ties_a, ties_b).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_randomized_copy_changes_top_layers_only(make_tiny):
    lm = make_tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rand, n_top = randomized_copy(lm, seed=0)
    assert n_top == 1  # 3 layers -> the top half, at least one
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    changed = {k for k, v in rand.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_randomized_copy_shares_kept_tensors_and_draws_what_a_full_copy_draws(make_tiny, family):
    import copy

    lm = make_tiny(family)
    rand, n_top = randomized_copy(lm, seed=3)
    # the reference: the plain algorithm (a full deep copy, then re-draw the top blocks' matrices)
    full = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in list(full.get_submodule(lm.family.blocks))[lm.n_layers - n_top :]:
            for p in block.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.std())
    ours, ref = rand.model.state_dict(), full.state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    orig = lm.model.state_dict()
    kept = [k for k in orig if torch.equal(orig[k], ours[k])]
    assert kept and all(ours[k].data_ptr() == orig[k].data_ptr() for k in kept)  # shared, not copied
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(rand.model(ids).logits, full(ids).logits)


def test_explain_json_ranks_methods_and_runs_the_sanity_check(make_tiny, tmp_path):
    from lmscope.explain.api import explain

    lm = make_tiny("gpt2")
    res = explain(
        lm,
        "When Mary and John went to the store, John gave a drink to",
        target=" Mary",
        methods="occlusion,saliency,logit_lens,integrated_gradients",
        config={"integrated_gradients": {"max_steps": 64}},
    )
    data = res.to_json()
    json.dumps(data, allow_nan=False)
    assert data["target"]["token"] == " Mary" and len(data["tokens"]) == 14
    assert set(data["methods"]) == {"occlusion", "saliency", "logit_lens", "integrated_gradients"}
    assert sorted(data["ranking"]) == ["integrated_gradients", "occlusion", "saliency"]
    # unflagged methods first, each group by AOPC sum (flags: test_flags.py)
    keys = [
        (bool(data["methods"][m]["flags"]), -data["methods"][m]["faithfulness"]["aopc_sum"])
        for m in data["ranking"]
    ]
    assert keys == sorted(keys)
    for m in data["ranking"]:
        fa = data["methods"][m]["faithfulness"]
        assert len(data["methods"][m]["scores"]) == 14
        assert {"deletion_aopc", "insertion_aopc", "comprehensiveness", "sufficiency"} <= set(fa)
        assert -1.0 <= fa["randomization_spearman"] <= 1.0
    ig = data["methods"]["integrated_gradients"]
    for key in ("steps", "baseline", "delta_f", "completeness_error"):
        assert key in ig
    assert ig["completeness_error"] == pytest.approx(abs(sum(ig["scores"]) - ig["delta_f"]), abs=1e-6)
    assert data["methods"]["logit_lens"]["faithfulness"] is None
    assert len(data["methods"]["logit_lens"]["scores"]) == lm.n_layers
    html = res.report(tmp_path / "r.html")
    assert "occlusion" in html and (tmp_path / "r.html").exists()


def test_explain_generate_explains_each_step(make_tiny):
    from lmscope.explain.api import explain

    lm = make_tiny("llama")
    res = explain(lm, "When Mary and John went", methods="occlusion", generate=3, sanity=False)
    assert len(res.steps) == 3
    data = res.to_json()
    assert len(data["steps"]) == 3
    for i, step in enumerate(res.steps):
        assert len(step.tokens) == len(res.steps[0].tokens) + i
        if i:  # the previous step's target was appended
            assert step.tokens[-1] == res.steps[i - 1].target["token"]
