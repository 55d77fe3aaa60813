"""Sharing work between methods (one batch of perturbations, each distinct input once, one gradient
at the input) changes no number: the shared path equals the per-method path within 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope.explain.api import DEFAULT_METHODS, explain, resolve_methods
from lmscope.explain.faithfulness import faithfulness, faithfulness_many, random_baseline
from lmscope.explain.targets import Objective, encode_prompt, make_target

TEXT = "When Mary and John went to the store, John gave a drink to"
METHODS = "saliency,input_x_gradient,occlusion,occlusion_delete,kernel_shap,integrated_gradients"


def _numbers(x, path=""):
    """Every number in a JSON tree, keyed by its path (timings left out)."""
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if k not in ("seconds", "timings"):
                out.update(_numbers(v, f"{path}.{k}"))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: x}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_path_changes_no_number(make_tiny, family):
    lm = make_tiny(family)
    kw = dict(target=" Mary", methods=METHODS, steps=16)
    fast = _numbers(explain(lm, TEXT, share=True, **kw).to_json())
    slow = _numbers(explain(lm, TEXT, share=False, **kw).to_json())
    assert fast.keys() == slow.keys()
    for key, a in fast.items():
        b = slow[key]
        if isinstance(a, float) and isinstance(b, float):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (key, a, b)
        else:
            assert a == b, key


def test_one_batch_runs_each_distinct_input_once(make_tiny):
    lm = make_tiny("llama")
    ids = encode_prompt(lm, TEXT)
    scores = [torch.randn(len(ids)).tolist() for _ in range(3)]
    shared = Objective(lm, ids, make_target(lm, " Mary"))
    before = shared.n_forwards
    fas, rand = faithfulness_many(shared, scores, random_orders=3)
    shared_runs = shared.n_forwards - before
    plain = Objective(lm, ids, make_target(lm, " Mary"), cache=False)
    before = plain.n_forwards
    ref = [faithfulness(plain, s) for s in scores]
    ref_rand = random_baseline(plain)
    assert shared_runs < plain.n_forwards - before
    for a, b in zip(fas, ref):
        assert a["curves"]["deletion"] == pytest.approx(b["curves"]["deletion"], abs=1e-6)
        assert a["aopc_sum"] == pytest.approx(b["aopc_sum"], abs=1e-6)
    assert rand == pytest.approx(ref_rand, abs=1e-6)


def test_default_methods_are_the_fast_ones_and_all_means_all():
    assert resolve_methods(None) == list(DEFAULT_METHODS)
    assert len(resolve_methods("all")) > len(DEFAULT_METHODS)
