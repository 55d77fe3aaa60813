"""The module filter every compression step takes (fqn globs, torchao's ``filter_fn`` as data), and the
handler registry that finds step families by listing the package."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import lmscope
from lmscope.compress import compress
from lmscope.compress.lowrank import LowRankLinear
from lmscope.compress.quantize.modules import QuantizedLinear
from lmscope.compress.recipe import (
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

CALIB = " ".join(["A class definition defines a class object; its suite runs in a new frame."] * 20)
STEPS = [
    Quantize("int8"),
    PruneHeads(0.5, "magnitude"),
    PruneUnstructured(0.5),
    PruneNeurons(0.5),
    PruneLayers((0,)),
    LowRank(rank=2),
]


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.kind)
def test_a_glob_matching_nothing_is_an_error_before_any_change(make_tiny, step):
    lm = make_tiny("llama")
    before = _state(lm)
    bad = type(step).from_dict({**step.to_dict(), "modules": ["model.layers.*.atention.*"]})
    with pytest.raises(
        LmscopeError, match="module filter 'model.layers.\\*.atention.\\*'.*matches no"
    ) as err:
        compress(lm, bad, CALIB, inplace=True)
    assert "model.layers.0" in str(err.value)  # names valid choices
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.kind)
def test_filter_round_trips_and_old_json_is_unchanged(step):
    assert "modules" not in step.to_dict()
    filtered = step_from_dict({**step.to_dict(), "modules": ["model.layers.1*"]})
    assert filtered.modules == ("model.layers.1*",)
    assert Recipe.from_dict(Recipe((filtered,)).to_dict()).steps[0] == filtered


def test_quantize_only_the_selected_layers(make_tiny):
    res = compress(make_tiny("llama"), Quantize("int8", modules=("model.layers.1.mlp.*",)), CALIB)
    quantized = {n for n, m in res.lm.model.named_modules() if isinstance(m, QuantizedLinear)}
    mlp1 = {
        n
        for n, m in res.original.model.named_modules()
        if n.startswith("model.layers.1.mlp.") and isinstance(m, nn.Linear)
    }
    assert quantized == mlp1 and mlp1
    assert isinstance(res.lm.model.get_submodule("model.embed_tokens"), nn.Embedding)  # not selected


def test_filtered_quantization_saves_and_loads(make_tiny, tmp_path):
    res = compress(make_tiny("llama"), Quantize("int4", group_size=32, modules=("model.layers.0.*",)), CALIB)
    loaded = lmscope.load(str(res.save(tmp_path / "q")), progress=False)
    ids = res.lm.encode("a short text to compare")
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).logits, res.lm.forward(ids).logits)


def test_per_layer_schemes_stack_and_reload(make_tiny, tmp_path):
    """Several quantize steps with disjoint filters = one scheme per layer (what ``lmscope search`` writes)."""
    from lmscope.compress.quantize.modules import Int4Linear, Int8Linear

    recipe = Recipe.of(
        Quantize("int8", modules=("model.layers.0.*", "model.embed_tokens")),
        Quantize("int4", group_size=32, modules=("model.layers.1.*",)),
    )
    res = compress(make_tiny("llama"), recipe, CALIB)
    kinds = {n: type(m) for n, m in res.lm.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {k for n, k in kinds.items() if n.startswith("model.layers.0.")} == {Int8Linear}
    assert {k for n, k in kinds.items() if n.startswith("model.layers.1.")} == {Int4Linear}
    assert not any(n.startswith("model.layers.2.") for n in kinds)  # no filter picked block 2
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    loaded = lmscope.load(str(res.save(tmp_path / "mixed")), progress=False)
    ids = res.lm.encode("a short text to compare")
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).logits, res.lm.forward(ids).logits)


def test_per_layer_schemes_must_not_overlap(make_tiny):
    with pytest.raises(LmscopeError, match="quantizes twice"):
        Recipe.of(Quantize("int8", modules=("model.layers.0.*",)), Quantize("int4"))
    overlap = Recipe.of(
        Quantize("int8", modules=("model.layers.0.*",)), Quantize("int4", modules=("model.layers.*",))
    )
    with pytest.raises(LmscopeError, match="selected by two quantize steps"):
        compress(make_tiny("llama"), overlap, CALIB)


def test_unstructured_zeros_only_selected_weights(make_tiny):
    res = compress(make_tiny("llama"), PruneUnstructured(0.5, modules=("*.mlp.*",)), CALIB)
    for name, m in res.lm.model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("model.layers."):
            zeros = float((m.weight == 0).float().mean())
            assert (zeros >= 0.49) if ".mlp." in name else (zeros == 0.0), name


def test_heads_and_neurons_leave_unselected_layers_whole(make_tiny):
    lm = make_tiny("llama")
    heads = [lm.n_heads_at(i) for i in range(lm.n_layers)]
    res = compress(lm, PruneHeads(0.5, "magnitude", modules=("model.layers.1.self_attn",)), CALIB)
    after = [res.lm.n_heads_at(i) for i in range(lm.n_layers)]
    assert after[1] < heads[1] and [a for i, a in enumerate(after) if i != 1] == [
        h for i, h in enumerate(heads) if i != 1
    ]
    d = [lm.d_mlp_at(i) for i in range(lm.n_layers)]
    res = compress(lm, PruneNeurons(0.5, modules=("model.layers.0.mlp",)), CALIB)
    after = [res.lm.d_mlp_at(i) for i in range(lm.n_layers)]
    assert after[0] == d[0] // 2 and after[1:] == d[1:]


def test_layers_outside_the_filter_are_an_error(make_tiny):
    with pytest.raises(LmscopeError, match="outside the step's module filter"):
        compress(make_tiny("llama"), PruneLayers((0,), modules=("model.layers.1",)), CALIB)


def test_lowrank_factors_only_selected(make_tiny):
    res = compress(make_tiny("llama"), LowRank(rank=2, modules=("model.layers.0.mlp.up_proj",)), CALIB)
    low = {n for n, m in res.lm.model.named_modules() if isinstance(m, LowRankLinear)}
    assert low == {"model.layers.0.mlp.up_proj"}


def test_every_step_kind_has_a_discovered_handler():
    from lmscope.compress.registry import HANDLERS, discover_handlers
    from lmscope.compress.steps import STEP_TYPES

    discover_handlers()
    assert set(STEP_TYPES) <= set(HANDLERS)


def test_a_new_step_family_package_registers_itself(tmp_path, monkeypatch):
    import lmscope.compress as package
    from lmscope.compress import registry

    fam = tmp_path / "identity_family"
    fam.mkdir()
    (fam / "__init__.py").write_text(
        "from dataclasses import dataclass\n"
        "from lmscope.compress.registry import register_step\n"
        "from lmscope.compress.steps import StepConfig\n\n"
        "@dataclass(frozen=True)\nclass Identity(StepConfig):\n    kind = 'identity_test'\n\n"
        "@register_step(Identity)\nclass IdentityHandler:\n"
        "    def apply(self, lm, step, calib):\n        return {'done': True}\n"
        "    def rebuild(self, model, step, info):\n        pass\n"
    )
    broken = tmp_path / "broken_family"
    broken.mkdir()
    (broken / "__init__.py").write_text("import lmscope_no_such_dependency\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "HANDLERS", dict(registry.HANDLERS))
    monkeypatch.setattr(registry, "_discovered", False)
    from lmscope.compress import steps

    monkeypatch.setattr(steps, "STEP_TYPES", dict(steps.STEP_TYPES))
    try:
        with pytest.raises(ModuleNotFoundError, match="lmscope_no_such_dependency"):
            registry.discover_handlers()  # a family that fails to import is an error, never skipped
        broken.joinpath("__init__.py").write_text("")
        sys.modules.pop("lmscope.compress.broken_family", None)
        registry.discover_handlers()
        step = step_from_dict({"kind": "identity_test"})
        assert registry.handler_for(step).apply(None, step, None) == {"done": True}
    finally:
        for name in ("lmscope.compress.identity_family", "lmscope.compress.broken_family"):
            sys.modules.pop(name, None)


def test_quantization_schemes_are_found_and_match_what_configs_accept():
    from lmscope.compress.quantize import load_schemes
    from lmscope.compress.steps import QUANT_SCHEMES

    assert set(load_schemes()) == set(QUANT_SCHEMES)


def test_gpt2_filter_swaps_and_quantizes_only_the_selected_conv1d(make_tiny, tmp_path):
    lm = make_tiny("gpt2")
    res = compress(lm, Quantize("int8", modules=("transformer.h.0.attn.c_attn",)), CALIB)
    quantized = {n for n, m in res.lm.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {"transformer.h.0.attn.c_attn"}
    assert type(res.lm.model.get_submodule("transformer.h.1.attn.c_attn")).__name__ == "Conv1D"  # untouched
    loaded = lmscope.load(str(res.save(tmp_path / "g")), progress=False)
    ids = res.lm.encode("a short text to compare")
    with torch.no_grad():
        assert torch.equal(loaded.forward(ids).logits, res.lm.forward(ids).logits)


def test_moe_filter_selects_experts_alone(causal_tokenizer):
    from lmscope import LM
    from lmscope.testing import tiny_model

    lm = LM(tiny_model("mixtral"), causal_tokenizer, name="mixtral")
    experts = [n for n, _ in __import__("lmscope.compress.quantize._common", fromlist=["x"]).experts_of(lm)]
    res = compress(lm, Quantize("int8", modules=(experts[0],)), None)
    info = res.infos[0]
    assert set(info["experts"]) == {experts[0]} and not info["modules"] and info["embedding"] is None
