"""Activation patching: identity, oracles against a plain hooked forward, error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.errors import LmscopeError
from lmscope.explain.patching import patch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture()
def causal_tiny(tiny_lm):
    if not tiny_lm.is_causal:
        pytest.skip("patching needs a causal model")
    return tiny_lm


def _metric(lm, text, interventions=None, target=" Mary", contrast=" John"):
    t, c = (lm.tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in (target, contrast))
    logits = lm.run(text, capture=[], interventions=interventions).output[0, -1].double()
    return float(logits[t] - logits[c])


def test_clean_into_clean_is_identity(causal_tiny):
    r = patch(causal_tiny, CLEAN, CLEAN, " Mary", " John", normalize=False, skip_identical=False)
    assert r.resid is None  # undefined: nothing to restore
    for grid in (r.resid_raw, r.heads_raw, r.mlp_raw):
        np.testing.assert_allclose(grid, r.metric_clean, atol=1e-4)


def test_patched_cells_equal_plain_forward(causal_tiny):
    lm = causal_tiny
    r = patch(lm, CLEAN, CORRUPT, " Mary", " John")
    assert r.metric_clean == pytest.approx(_metric(lm, CLEAN), abs=1e-4)
    assert r.metric_corrupt == pytest.approx(_metric(lm, CORRUPT), abs=1e-4)
    clean = lm.run(
        CLEAN, capture=["blocks.*.resid_pre", "blocks.*.attn.head_out", "blocks.*.mlp.out"]
    ).tensors

    def put(name, index):
        def fn(x, _):
            x = x.clone()
            x[index] = clean[name][index]
            return x

        return {name: fn}

    span = r.metric_clean - r.metric_corrupt
    for layer, pos in [(1, 10), (2, 13), (0, 3)]:
        name = f"blocks.{layer}.resid_pre"
        got = (_metric(lm, CORRUPT, put(name, (0, pos))) - r.metric_corrupt) / span
        assert r.resid[layer, pos] == pytest.approx(got, abs=1e-4)
    for layer, head in [(0, 1), (2, 3)]:
        name = f"blocks.{layer}.attn.head_out"
        got = (_metric(lm, CORRUPT, put(name, (0, slice(None), head))) - r.metric_corrupt) / span
        assert r.heads[layer, head] == pytest.approx(got, abs=1e-4)
    name = "blocks.1.mlp.out"
    got = (_metric(lm, CORRUPT, put(name, (0,))) - r.metric_corrupt) / span
    assert r.mlp[1] == pytest.approx(got, abs=1e-4)


def test_skip_identical_positions_changes_nothing(causal_tiny):
    fast = patch(causal_tiny, CLEAN, CORRUPT, " Mary", " John")
    full = patch(causal_tiny, CLEAN, CORRUPT, " Mary", " John", skip_identical=False)
    np.testing.assert_allclose(fast.resid, full.resid, atol=1e-4)
    assert fast.meta["patched_runs"] < full.meta["patched_runs"]
    # layer 0's input is the embedding: only the changed token carries the difference, and fully
    changed = [i for i, (a, b) in enumerate(zip(fast.tokens, fast.corrupt_tokens)) if a != b]
    assert changed == [9]
    assert fast.resid[0, 9] == pytest.approx(1.0, abs=1e-4)
    assert np.abs(np.delete(fast.resid[0], 9)).max() < 1e-6


def test_patching_json(causal_tiny):
    r = patch(causal_tiny, CLEAN, CORRUPT, " Mary", None, layers=[0, 2])
    data = json.loads(json.dumps(r.to_json()))
    lm = causal_tiny
    assert data["tokens"] == r.tokens and len(data["tokens"]) == 14
    assert data["contrast"] is None and data["metric"] == "logit[' Mary']"
    assert len(data["resid"]) == lm.n_layers and len(data["resid"][0]) == 14
    assert len(data["heads"]) == lm.n_layers and len(data["heads"][0]) == lm.n_heads
    assert len(data["mlp"]) == lm.n_layers
    assert data["resid"][1][5] is None and data["mlp"][1] is None  # layer 1 not patched
    assert data["resid_site"] == "resid_pre" and data["layers"] == [0, 2]


def test_patching_errors(causal_tiny):
    lm = causal_tiny
    with pytest.raises(LmscopeError, match=r"clean prompt is 14 tokens and the corrupted one 15"):
        patch(lm, CLEAN, CORRUPT + " her", " Mary", " John")
    with pytest.raises(LmscopeError, match=r"is \d tokens \(.*\+.*\), it must be exactly one token"):
        patch(lm, CLEAN, CORRUPT, " Maryanne-Louise", " John")
    with pytest.raises(LmscopeError, match="nothing to restore"):
        patch(lm, CLEAN, CLEAN, " Mary", " John")
    with pytest.raises(LmscopeError, match=f"layer {lm.n_layers} is out of range"):
        patch(lm, CLEAN, CORRUPT, " Mary", " John", layers=[lm.n_layers])


def test_patching_needs_causal(tiny_lm):
    if tiny_lm.is_causal:
        pytest.skip("encoder only")
    with pytest.raises(LmscopeError, match="needs a causal language model"):
        patch(tiny_lm, "a b", "a c", "b")


@pytest.mark.real
def test_smollm2_patching_identity_and_ioi(smollm2):
    lm = smollm2
    layers = [20, 29]
    same = patch(lm, CLEAN, CLEAN, " Mary", " John", layers=layers, normalize=False, skip_identical=False)
    for grid in (same.resid_raw[layers], same.heads_raw[layers], same.mlp_raw[layers]):
        np.testing.assert_allclose(grid, same.metric_clean, atol=1e-3)
    r = patch(lm, CLEAN, CORRUPT, " Mary", " John", layers=[0, 29])
    print(f"\nIOI metric clean {r.metric_clean:.3f}, corrupt {r.metric_corrupt:.3f}")
    assert r.metric_clean > 0 > r.metric_corrupt  # the model prefers the indirect object
    assert r.resid[0, 9] == pytest.approx(1.0, abs=1e-3)
    assert torch.tensor(r.resid[29]).argmax() == 13  # by the last layer, only the last position matters
