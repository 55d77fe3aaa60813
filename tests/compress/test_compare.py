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


def test_js_divergence_equals_scipy_at_intermediate_values():
    """Reference: scipy's Jensen-Shannon distance (squared, base 2) on random rows, some with zeros."""
    from scipy.spatial.distance import jensenshannon

    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 7, generator=g, dtype=torch.float64) ** 3
    q = torch.rand(64, 7, generator=g, dtype=torch.float64) ** 3
    p[::4, 0] = 0.0  # zeros in one distribution only
    q[::3, 1:3] = 0.0
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    ours = js_divergence(p, q).numpy()
    want = jensenshannon(p.double().numpy(), q.double().numpy(), base=2, axis=-1) ** 2
    assert 0.01 < want.min() and want.max() < 0.99  # intermediate, not the bounds
    assert ours == pytest.approx(want, abs=1e-12)


def test_compare_with_itself_is_zero_divergence(make_tiny):
    lm = make_tiny("llama")
    c = compare(lm, lm, TEXT, methods=("saliency", "occlusion"))
    assert c.top1_agreement == 1.0 and c.output_kl == pytest.approx(0.0, abs=1e-9)
    assert all(h["status"] == "kept" and h["js"] == pytest.approx(0.0, abs=1e-9) for h in c.heads)
    assert len(c.heads) == lm.n_layers * lm.n_heads
    assert all(x["lens_kl"] == pytest.approx(0.0, abs=1e-9) for x in c.layers)
    for v in c.attribution.values():
        assert v["spearman"] == pytest.approx(1.0) and v["topk_overlap"] == 1.0


def _eager(lm, inputs):
    model = copy.deepcopy(lm.model)
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(**inputs, output_attentions=True)


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
    # independent references for the numbers: HF eager attentions and logits of both models
    ids = a.encode(TEXT)
    out_a, out_b = _eager(a, ids), _eager(b, ids)
    la, lb = torch.log_softmax(out_a.logits[0].double(), -1), torch.log_softmax(out_b.logits[0].double(), -1)
    kl = torch.nn.functional.kl_div(lb, la, log_target=True, reduction="none").sum(-1).mean()
    assert c.output_kl == pytest.approx(float(kl), rel=1e-4, abs=1e-9) and c.output_kl > 0
    assert c.top1_agreement == pytest.approx(float((la.argmax(-1) == lb.argmax(-1)).double().mean()))
    from scipy.spatial.distance import jensenshannon

    pa, pb = out_a.attentions[2][0, 3].double().numpy(), out_b.attentions[1][0, 1].double().numpy()
    want = float((jensenshannon(pa, pb, base=2, axis=-1) ** 2).mean())
    assert kept[(2, 3)]["js"] == pytest.approx(want, rel=1e-3, abs=1e-9) and want > 0
    d = c.to_dict()
    assert d["most_changed_heads"][0]["layer"] == 2
    c.to_json(tmp_path / "compare.json")
    assert (tmp_path / "compare.json").stat().st_size > 0
