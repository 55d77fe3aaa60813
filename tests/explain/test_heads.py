"""Head importance and characterization: oracles on tiny models, the induction claim on smollm2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.explain.heads import (
    IMPORTANCE,
    PATTERNS,
    ablation_interventions,
    characterize_heads,
    head_importance,
    induction_sequences,
    token_losses,
)


def _windows(lm, n=2, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 5000, (n, length), generator=gen)


def _direct_loss(lm, ids, interventions=None):
    """Loss without the batching/replay machinery: a plain hooked forward per window."""
    if lm.is_causal:
        return token_losses(lm, ids, interventions).mean(dim=1)
    run_clean = lm_hidden(lm, ids)
    run = lm_hidden(lm, ids, interventions)
    return 1 - torch.nn.functional.cosine_similarity(run.mean(1), run_clean.mean(1), dim=-1)


def lm_hidden(lm, ids, interventions=None):
    from lmscope.capture.session import hooks

    with torch.no_grad(), hooks(lm, (), interventions):
        return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()


def test_zero_and_mean_ablation_equal_direct_forward(tiny_lm):
    ids = _windows(tiny_lm)
    scores = head_importance(tiny_lm, input_ids=ids, methods=("zero", "mean"))
    clean = _direct_loss(tiny_lm, ids)
    run = tiny_lm_run(tiny_lm, ids)
    for layer, head in [(0, 1), (2, 3), (1, 0)]:
        zeroed = _direct_loss(tiny_lm, ids, ablation_interventions(tiny_lm, [(layer, head)]))
        expect = float((zeroed - clean).mean())
        assert scores["ablation_zero"][layer, head] == pytest.approx(expect, abs=1e-5, rel=1e-4)
        mean = {layer: run[f"blocks.{layer}.attn.head_out"].float().mean(dim=(0, 1))}
        meaned = _direct_loss(tiny_lm, ids, ablation_interventions(tiny_lm, [(layer, head)], mean))
        expect = float((meaned - clean).mean())
        assert scores["ablation_mean"][layer, head] == pytest.approx(expect, abs=1e-5, rel=1e-4)
    assert not np.isnan(scores["ablation_zero"]).any()
    assert np.abs(scores["ablation_zero"]).max() > 0  # heads matter in this random model


def tiny_lm_run(lm, ids):
    from lmscope.capture.session import hooks

    names = [f"blocks.{i}.attn.head_out" for i in range(lm.n_layers)]
    with torch.no_grad(), hooks(lm, names) as s:
        lm.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return s.tensors


def test_grad_importance_matches_finite_differences(make_tiny):
    lm = make_tiny("llama")
    lm.model.double()
    ids = _windows(lm, n=1, length=10)
    scores = head_importance(lm, input_ids=ids, methods=("grad",))
    # central differences with a wide step: HF's RMSNorm runs in float32 even in a float64 model,
    # so a tiny step drowns in rounding (O(eps^2) truncation is ~1e-6 relative at 1e-2)
    eps = 1e-2
    for layer, head in [(0, 0), (1, 2), (2, 3)]:

        def scaled(factor, layer=layer, head=head):
            def fn(x, name):
                x = x.clone()
                x[:, :, head] *= factor
                return x

            return {f"blocks.{layer}.attn.head_out": fn}

        up = token_losses(lm, ids, scaled(1 + eps)).mean()
        down = token_losses(lm, ids, scaled(1 - eps)).mean()
        fd = abs(float(up - down) / (2 * eps))
        assert scores["grad_importance"][layer, head] == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_grad_importance_encoder_is_finite(tiny_lm):
    scores = head_importance(tiny_lm, input_ids=_windows(tiny_lm), methods=("grad",), layers=[1])
    g = scores["grad_importance"]
    assert np.isnan(g[0]).all() and np.isnan(g[2]).all()  # only layer 1 scored
    assert (g[1] >= 0).all() and g[1].max() > 0


def test_layers_restrict_and_validate(tiny_lm):
    ids = _windows(tiny_lm)
    part = head_importance(tiny_lm, input_ids=ids, methods=("zero",), layers=[2])
    full = head_importance(tiny_lm, input_ids=ids, methods=("zero",))
    assert np.isnan(part["ablation_zero"][:2]).all()
    np.testing.assert_allclose(part["ablation_zero"][2], full["ablation_zero"][2], atol=1e-6)
    with pytest.raises(LmscopeError, match="layer 3 is out of range"):
        head_importance(tiny_lm, input_ids=ids, layers=[3])
    with pytest.raises(LmscopeError, match="unknown head-importance method"):
        head_importance(tiny_lm, input_ids=ids, methods=("shapley",))


def test_characterization_scores_are_attention_fractions(tiny_lm):
    scores = characterize_heads(tiny_lm, max_tokens=16, window=16, n_random=2, random_length=10)
    for m in PATTERNS:
        a = scores[m]
        assert a.shape == (tiny_lm.n_layers, tiny_lm.n_heads)
        assert ((a >= 0) & (a <= 1 + 1e-6)).all()
        f = scores.argmax_fraction[m]
        assert ((f >= 0) & (f <= 1)).all()
    # a position cannot put more than all its attention on previous + self (distinct keys for q >= 1)
    assert (scores["previous_token"] + scores["self"] <= 1 + 1e-5).all()


def test_induction_sequences_repeat():
    class Tok:
        all_special_ids = [0, 1, 2]
        bos_token_id = 1
        cls_token_id = None

        def __len__(self):
            return 5000

    class Fake:
        tokenizer = Tok()
        vocab_size = 5000
        is_causal = True

    ids, offset = induction_sequences(Fake(), n=3, length=7, seed=1)
    assert offset == 1 and ids.shape == (3, 15)
    assert (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:8], ids[:, 8:])
    again, _ = induction_sequences(Fake(), n=3, length=7, seed=1)
    assert torch.equal(ids, again)


def test_heads_json_schema(tiny_lm):
    ids = _windows(tiny_lm)
    scores = head_importance(tiny_lm, input_ids=ids).merge(characterize_heads(tiny_lm, input_ids=ids))
    data = json.loads(json.dumps(scores.to_json()))  # valid JSON: no NaN
    assert len(data["heads"]) == tiny_lm.n_layers * tiny_lm.n_heads
    keys = {"layer", "head", "kv_head", *IMPORTANCE, *PATTERNS, "summary"}
    for row in data["heads"]:
        assert keys <= set(row)
        assert row["kv_head"] == tiny_lm.kv_group(row["head"])
        assert all(isinstance(row[k], float) for k in (*IMPORTANCE, *PATTERNS))
        assert isinstance(row["summary"], str)
    groups = data["kv_groups"][0]
    assert sorted(h for g in groups for h in g) == list(range(tiny_lm.n_heads))
    assert len(groups) == tiny_lm.n_kv_heads
    # ranking is by the metric, descending
    ranked = scores.ranking("ablation_mean")
    values = [scores["ablation_mean"][p] for p in ranked]
    assert values == sorted(values, reverse=True) and len(ranked) == tiny_lm.n_layers * tiny_lm.n_heads


@pytest.mark.real
def test_smollm2_induction_heads_matter_on_repeated_tokens(smollm2):
    lm = smollm2
    scores = characterize_heads(lm, max_tokens=16, window=16, n_random=2, random_length=32, seed=0)
    k = 6
    top = scores.ranking("induction")[:k]
    assert scores["induction"][top[-1]] > 0.3
    everyone = [(i, h) for i in range(lm.n_layers) for h in range(lm.n_heads) if (i, h) not in top]
    rng = np.random.default_rng(0)
    random_heads = [everyone[j] for j in rng.choice(len(everyone), size=k, replace=False)]
    ids, offset = induction_sequences(lm, n=2, length=32, seed=123)  # fresh sequences, not the scoring ones
    second = slice(offset + 32 - 1, None)  # losses predicting the tokens of the second copy

    def loss(heads):
        interventions = ablation_interventions(lm, heads) if heads else None
        return float(token_losses(lm, ids, interventions)[:, second].mean())

    clean, with_top, with_random = loss([]), loss(top), loss(random_heads)
    d_top, d_random = with_top - clean, with_random - clean
    print(
        f"\nrepeated-half loss: clean {clean:.3f}, top-{k} induction ablated {with_top:.3f} "
        f"(Δ {d_top:+.3f}), {k} random ablated {with_random:.3f} (Δ {d_random:+.3f}); top {top}"
    )
    assert d_top > 1.0
    assert d_top > 5 * max(d_random, 0.05)


def test_scores_on_head_pruned_model(make_tiny):
    from lmscope.compress.prune.heads import prune_heads

    lm = make_tiny("llama")
    prune_heads(lm, fraction=0.35, order="magnitude")
    per_layer = [lm.n_heads_at(i) for i in range(lm.n_layers)]
    assert len(set(per_layer)) > 1  # layers now differ in head count
    ids = _windows(lm)
    scores = head_importance(lm, input_ids=ids, methods=("zero", "grad"))
    scores = scores.merge(characterize_heads(lm, input_ids=ids, n_random=2, random_length=8))
    for i, n in enumerate(per_layer):
        assert (
            not np.isnan(scores["ablation_zero"][i, :n]).any()
            and np.isnan(scores["ablation_zero"][i, n:]).all()
        )
        assert not np.isnan(scores["induction"][i, :n]).any()
        kv = scores.kv_heads[i]
        assert len(set(kv)) == lm.n_kv_heads_at(i) and kv == sorted(kv)
    # the batched ablation still equals a plain forward with the head zeroed
    layer = per_layer.index(min(per_layer))
    clean = token_losses(lm, ids).mean(1)
    zeroed = token_losses(lm, ids, ablation_interventions(lm, [(layer, 1)])).mean(1)
    assert scores["ablation_zero"][layer, 1] == pytest.approx(float((zeroed - clean).mean()), abs=1e-5)
    assert len(scores.to_json()["heads"]) == sum(per_layer)


def test_fast_cross_entropy_equals_the_class_dim_1_layout():
    """The contiguous-vocabulary cross-entropy (a speed-up) gives the numbers the old layout gave."""
    from lmscope.explain.heads import next_token_ce

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5000, generator=gen) * 4
    target = torch.randint(0, 5000, (3, 7), generator=gen)
    old = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    assert torch.allclose(next_token_ce(logits, target), old, atol=1e-6, rtol=1e-6)
