"""compare: a model against itself is identical inside; a pruned copy reports its removed heads and layers."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscope import LM
from lmscope.compress.compare import compare, js_divergence, topk_overlap
from lmscope.compress.prune import remove_heads, remove_layers

TEXT = "When Mary and John went to the store, John gave a drink to"


def test_js_divergence_bounds():
    p = torch.tensor([1.0, 0.0])
    assert float(js_divergence(p, p)) == 0.0
    assert float(js_divergence(p, torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)
    assert topk_overlap([3, 2, 1, 0], [0, 1, 2, 3], 2) == 0.0


def test_compare_with_itself_is_zero_divergence(make_tiny):
    lm = make_tiny("llama")
    c = compare(lm, lm, TEXT, methods=("saliency", "occlusion"))
    assert c.top1_agreement == 1.0 and c.output_kl == pytest.approx(0.0, abs=1e-9)
    assert all(h["status"] == "kept" and h["js"] == pytest.approx(0.0, abs=1e-9) for h in c.heads)
    assert len(c.heads) == lm.n_layers * lm.n_heads
    assert all(x["lens_kl"] == pytest.approx(0.0, abs=1e-9) for x in c.layers)
    for v in c.attribution.values():
        assert v["spearman"] == pytest.approx(1.0) and v["topk_overlap"] == 1.0


def test_compare_pruned_reports_removed(make_tiny, tmp_path):
    a = make_tiny("llama")
    b = LM(copy.deepcopy(a.model), a.tokenizer, name="pruned")
    remove_heads(b, {2: [2, 3]})
    remove_layers(b, [1])
    c = compare(a, b, TEXT, methods=("saliency",))
    assert sorted(c.removed_heads) == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    assert [x["status"] for x in c.layers] == ["kept", "removed", "kept"]
    kept = {(h["layer"], h["head"]): h for h in c.heads if h["status"] == "kept"}
    assert kept[(0, 0)]["js"] == pytest.approx(0.0, abs=1e-9)  # layer 0 is upstream of every change
    assert kept[(2, 3)]["b_head"] == 1 and kept[(2, 3)]["b_layer"] == 1
    assert c.top1_agreement < 1.0 or c.output_kl > 0
    d = c.to_dict()
    assert d["most_changed_heads"][0]["layer"] == 2
    c.to_json(tmp_path / "compare.json")
    assert (tmp_path / "compare.json").stat().st_size > 0
