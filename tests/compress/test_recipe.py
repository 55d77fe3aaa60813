"""Recipe contract: steps round-trip through dicts/JSON, bad values fail at construction with LmscopeError."""

from __future__ import annotations

import json

import pytest

from lmscope.compress.recipe import (
    STEP_TYPES,
    LowRank,
    PruneHeads,
    PruneLayers,
    PruneNeurons,
    PruneUnstructured,
    Quantize,
    Recipe,
    step_from_dict,
)
from lmscope.errors import LmscopeError

STEPS = [
    Quantize("int8"),
    Quantize("int4", group_size=32),
    Quantize("gptq4"),
    Quantize("w8a8-smooth", alpha=0.6, skip=("*.down_proj",)),
    PruneHeads(0.25, "random", seed=3),
    PruneUnstructured(0.5, "wanda", n_m="2:4"),
    PruneNeurons(0.1),
    PruneLayers((5, 2)),
    LowRank(rank=32),
    LowRank(energy=0.9, activation_aware=True),
]


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.describe())
def test_every_step_round_trips(step):
    d = step.to_dict()
    assert d["kind"] == step.kind and json.loads(json.dumps(d)) == d
    assert step_from_dict(d) == step
    assert type(step) is STEP_TYPES[step.kind]


def test_recipe_json_round_trip_and_ordering(tmp_path):
    r = Recipe.of(Quantize("int4", group_size=64), LowRank(rank=8), PruneHeads(0.25))
    assert [s.kind for s in r.steps] == ["prune_heads", "lowrank", "quantize"]
    path = tmp_path / "r.json"
    r.to_json(path)
    assert Recipe.from_json(path) == r
    assert Recipe.from_dict(r.to_dict()["steps"]) == r  # a bare list works too
    assert Quantize("int4").group_size == 64  # default group


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PruneUnstructured(1.5), "sparsity must be between 0 and 1"),
        (lambda: PruneHeads(-0.1), "head fraction must be between"),
        (lambda: Quantize("int3"), "unknown quantization scheme 'int3'"),
        (lambda: Quantize("int4", group_size=48), "group size 48 is not supported"),
        (lambda: Quantize("int8", group_size=64), "--group-size applies to int4/gptq4"),
        (lambda: PruneHeads(0.25, "wanda"), "unknown head pruning method"),
        (lambda: PruneUnstructured(0.5, n_m="4:2"), "need 0 < N < M"),
        (lambda: PruneLayers(()), "no layers given"),
        (lambda: LowRank(), "exactly one of a rank or an energy"),
        (lambda: LowRank(rank=0), "rank must be a positive integer"),
        (lambda: step_from_dict({"kind": "distill"}), "unknown recipe step kind 'distill'"),
        (lambda: step_from_dict({"kind": "quantize", "scheme": "int8", "bits": 3}), "unknown field"),
        (lambda: Recipe(()), "no steps"),
        (lambda: Recipe((Quantize(), PruneHeads())), "out of order"),
        (lambda: Recipe((Quantize(), Quantize("int4"))), "quantizes twice"),
    ],
)
def test_bad_values_fail_at_construction(make, message):
    with pytest.raises(LmscopeError, match=message) as err:
        make()
    assert err.value.fix  # every error says how to fix it


def test_model_dependent_checks(make_tiny):
    lm = make_tiny("llama")  # width 64, 3 layers
    Recipe((Quantize("int4", group_size=32),)).check(lm)
    with pytest.raises(LmscopeError, match="group size 128 does not divide the width 64"):
        Recipe((Quantize("int4", group_size=128),)).check(lm)
    with pytest.raises(LmscopeError, match="out of range"):
        PruneLayers((7,)).check(lm)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(LmscopeError, match="does not exist"):
        Recipe.from_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmscopeError, match="not valid JSON"):
        Recipe.from_json(bad)
    bad.write_text(json.dumps({"steps": [{"kind": "quantize", "scheme": "fp3"}]}))
    with pytest.raises(LmscopeError, match="unknown quantization scheme"):
        Recipe.from_json(bad)
