"""Pruned / factorized models go through compress -> save -> lmscope.load with equal logits, and every
capture still works on the reloaded model."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.compress.recipe import LowRank, PruneHeads, PruneLayers, PruneNeurons, PruneUnstructured, Recipe

TEXT = "The parser turns the token stream into a syntax tree, which the compiler turns into bytecode."
CALIB = "Calibration prose about lists, dictionaries, generators and the import system of Python. " * 20


@pytest.mark.parametrize(
    "steps",
    [
        # heads first, then a layer: the heads' rebuild must find its layers on the shallower fresh model
        (PruneHeads(0.5, "magnitude"), PruneLayers((1,)), PruneNeurons(0.25, "activation"), LowRank(rank=8)),
        (PruneLayers((0,)), PruneHeads(0.25, "random", seed=3), PruneUnstructured(0.5, "wanda", n_m="2:4")),
    ],
    ids=["heads-layers-neurons-lowrank", "layers-heads-wanda24"],
)
def test_pruned_model_saves_and_reloads_exactly(make_tiny, tmp_path, steps):
    from lmscope.compress.apply import compress

    lm = make_tiny("llama")
    result = compress(lm, Recipe.of(*steps), calibration_text=CALIB)
    small = result.lm
    assert small.n_params() < lm.n_params() or steps[-1].kind == "prune_unstructured"
    result.save(tmp_path / "small")
    back = lmscope.load(str(tmp_path / "small"), progress=False)
    assert back.n_layers == small.n_layers
    assert [back.n_heads_at(i) for i in range(back.n_layers)] == [
        small.n_heads_at(i) for i in range(small.n_layers)
    ]
    assert [back.d_mlp_at(i) for i in range(back.n_layers)] == [
        small.d_mlp_at(i) for i in range(small.n_layers)
    ]
    a = small.run(TEXT, capture=[]).output
    b = back.run(TEXT, capture=["*"])
    torch.testing.assert_close(b.output, a, atol=1e-6, rtol=0)
    assert b["blocks.0.attn.pattern"].shape[1] == back.n_heads_at(0)
