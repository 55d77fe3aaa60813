"""Pruning: Wanda/magnitude masks against a direct computation, identity at 0%, and physical head/neuron/layer
removal equal to masking (the oracle) on tiny models of every family and on the real smollm2."""

from __future__ import annotations

import copy

import pytest
import torch

from lmscope import LM, LmscopeError
from lmscope.capture.session import hooks
from lmscope.compress.calibration import calibration_inputs
from lmscope.compress.prune import (
    plan_heads,
    prune_heads,
    prune_layers,
    prune_neurons,
    prune_unstructured,
    remove_heads,
    remove_layers,
    remove_neurons,
)
from lmscope.compress.prune._linear import weight_out_in
from lmscope.compress.prune.unstructured import HONEST_NOTE

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun."
CALIB = "Calibration text about compilers, parsers and the grammar of Python expressions. " * 4


def fresh(lm: LM) -> LM:
    return LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name)


def logits(lm, text=TEXT, interventions=None):
    return lm.run(text, capture=[], interventions=interventions).output


def head_mask(n: int, kept):
    m = torch.zeros(n)
    m[list(kept)] = 1.0
    return lambda t, name: t * m[None, None, :, None].to(t.dtype)


# -- unstructured ------------------------------------------------------------------------------------
def test_wanda_mask_equals_direct_topk_and_hits_sparsity(make_tiny):
    lm = make_tiny("llama")
    path = "model.layers.1.mlp.down_proj"
    w0 = lm.model.get_submodule(path).weight.detach().clone()
    # the oracle: ‖X_j‖₂ over calibration tokens, from the capture API (down_proj's input = mlp.hidden)
    sq = torch.zeros(w0.shape[1])
    for batch in calibration_inputs(lm, CALIB):
        with torch.no_grad(), hooks(lm, ["blocks.1.mlp.hidden"]) as s:
            lm.forward(batch)
        sq += s.tensors["blocks.1.mlp.hidden"][0].pow(2).sum(0)
    score = w0.abs() * sq.sqrt()[None, :]
    k = w0.shape[1] // 2
    expected = torch.ones_like(w0, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(score, dim=1)[:, :k], False)

    info = prune_unstructured(lm, 0.5, "wanda", calib=CALIB)
    w1 = lm.model.get_submodule(path).weight.detach()
    assert torch.equal(w1 != 0, expected)
    assert torch.equal(w1[expected], w0[expected])
    assert info["sparsity"] == 0.5 and info["layers"][path] == 0.5
    assert info["note"] == HONEST_NOTE and "saves neither time nor bytes" in HONEST_NOTE
    for row in (w1 == 0).sum(1):
        assert int(row) == k  # per output row, as in the paper


def test_magnitude_is_layerwise_and_exact(make_tiny):
    lm = make_tiny("gpt2")  # Conv1D weights stored [in, out]
    before = {p: weight_out_in(m).detach().clone() for p, m in lm.model.named_modules() if hasattr(m, "nf")}
    info = prune_unstructured(lm, 0.3, "magnitude")
    assert set(info["layers"]) == set(before)
    for path, s in info["layers"].items():
        w0, w = before[path], weight_out_in(lm.model.get_submodule(path))
        assert int((w == 0).sum()) == round(w.numel() * 0.3) and s == pytest.approx(0.3, abs=1e-4)
        assert w0[w != 0].abs().min() >= w0[w == 0].abs().max()  # the smallest |w| of the layer went


def test_two_four_pattern(make_tiny):
    lm = make_tiny("llama")
    info = prune_unstructured(lm, 0.5, "wanda", nm="2:4", calib=CALIB)
    w = lm.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert torch.all(groups == 2)
    assert info["sparsity"] == 0.5


def test_zero_pruning_is_identity(tiny_lm):
    base = logits(tiny_lm)
    for prune in (
        lambda lm: prune_unstructured(lm, 0.0, "wanda", calib=CALIB),
        lambda lm: prune_heads(lm, 0.0, "magnitude"),
        lambda lm: prune_neurons(lm, 0.0, "magnitude"),
    ):
        lm = fresh(tiny_lm)
        prune(lm)
        assert torch.equal(logits(lm), base)


def test_bad_sparsity_is_a_clear_error(make_tiny):
    with pytest.raises(LmscopeError, match="sparsity 1.5"):
        prune_unstructured(make_tiny("llama"), 1.5)
    with pytest.raises(LmscopeError, match="N:M"):
        prune_unstructured(make_tiny("llama"), 0.5, nm="4:2")


# -- heads --------------------------------------------------------------------------------------------
def test_head_removal_equals_masking_every_family(tiny_lm):
    lm = fresh(tiny_lm)
    n = lm.n_heads
    per_kv = n // lm.n_kv_heads
    # llama-GQA (4 q / 2 kv): keep one whole group in layer 0, one head per group in layer 2
    keep = {0: [0, 1], 2: [0, 2]} if per_kv == 2 else {0: [0, 3], 2: [1]}
    masked = logits(lm, interventions={f"blocks.{i}.attn.head_out": head_mask(n, k) for i, k in keep.items()})
    remove_heads(lm, keep)
    assert [lm.n_heads_at(i) for i in range(lm.n_layers)] == [len(keep.get(i, range(n))) for i in range(3)]
    if per_kv == 2:
        assert lm.n_kv_heads_at(0) == 1 and lm.n_kv_heads_at(2) == 2
        assert lm.model.model.layers[0].self_attn.k_proj.out_features == lm.head_dim
    torch.testing.assert_close(logits(lm), masked, atol=1e-5, rtol=0)
    run = lm.run(TEXT, capture=["*"])  # every capture works with fewer heads
    assert run["blocks.0.attn.pattern"].shape[1] == len(keep[0])
    assert run["blocks.2.attn.head_out"].shape[2] == len(keep[2])
    assert torch.allclose(run["blocks.0.attn.pattern"].sum(-1), torch.ones(1), atol=1e-5)


def test_uneven_gqa_groups_are_refused(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(LmscopeError, match="same number of query heads"):
        remove_heads(lm, {0: [0, 1, 2]})


def test_plan_respects_groups_and_prefers_low_scores(make_tiny):
    lm = make_tiny("llama")  # 3 layers x 4 heads, 2 per KV head
    scores = [torch.tensor([5.0, 6.0, 0.1, 0.2]), torch.tensor([1.0, 9.0, 1.0, 9.0]), torch.tensor([7.0] * 4)]
    keep = plan_heads(lm, scores, 2)
    assert keep[0] == [0, 1]  # the cheapest: drop the whole KV group {2, 3}
    keep = plan_heads(lm, scores, 4)
    assert keep[0] == [0, 1] and keep[1] == [1, 3] and keep[2] == [0, 1, 2, 3]


def test_prune_heads_orders_run_and_capture_works(make_tiny):
    for order in ("importance", "magnitude", "random"):
        lm = make_tiny("llama")
        info = prune_heads(lm, 0.25, order, calib=CALIB)
        assert info["heads_removed"] == 3
        assert sum(lm.n_heads_at(i) for i in range(3)) == 9
        lm.run(TEXT, capture=["*"])


def _feasible_kept_sets(n_q: int, per_kv: int):
    """Every kept-head set a GQA layer allows (brute force): each kept KV group keeps the same number."""
    for mask in range(1, 2**n_q):
        kept = [h for h in range(n_q) if mask >> h & 1]
        per_group = {}
        for h in kept:
            per_group[h // per_kv] = per_group.get(h // per_kv, 0) + 1
        if len(set(per_group.values())) == 1:
            yield kept


@pytest.mark.parametrize("order", ["magnitude", "importance"])
def test_pruned_heads_are_the_lowest_scored_ones(make_tiny, order):
    """Reference: brute force over every feasible removal (3 layers x 16 kept sets), not the pruner's DP."""
    import itertools

    lm = make_tiny("llama")  # 3 layers x 4 query heads, 2 per KV head
    wo = [b.self_attn.o_proj.weight.detach().clone() for b in lm.model.model.layers]
    wv = [b.self_attn.v_proj.weight.detach().clone() for b in lm.model.model.layers]
    info = prune_heads(lm, 0.25, order, calib=CALIB)
    scores = [torch.tensor(s, dtype=torch.float64) for s in info["scores"]]
    if order == "magnitude":  # ‖W_O[:, head h]‖ · ‖W_V[kv(h) rows]‖ from the original weights
        hd = wo[0].shape[1] // 4
        for i in range(3):
            o = wo[i].reshape(wo[i].shape[0], 4, hd).norm(dim=(0, 2))
            v = wv[i].reshape(2, hd, -1).norm(dim=(1, 2)).repeat_interleave(2)
            torch.testing.assert_close(scores[i], (o * v).double(), rtol=1e-5, atol=1e-6)
    kept = [info["layers"].get(str(i), {}).get("kept", list(range(4))) for i in range(3)]
    removed_cost = sum(float(scores[i].sum() - scores[i][kept[i]].sum()) for i in range(3))
    best = min(
        sum(float(scores[i].sum() - scores[i][k].sum()) for i, k in enumerate(combo))
        for combo in itertools.product(*[list(_feasible_kept_sets(4, 2))] * 3)
        if sum(4 - len(k) for k in combo) == info["heads_removed"]
    )
    assert info["heads_removed"] == 3
    assert removed_cost == pytest.approx(best, rel=1e-9, abs=1e-12)


# -- neurons and layers ---------------------------------------------------------------------------------
def test_neuron_removal_equals_masking(tiny_lm):
    lm = fresh(tiny_lm)
    d = lm.d_mlp_at(1)
    kept = list(range(0, d, 3))
    mask = torch.zeros(d)
    mask[kept] = 1
    masked = logits(lm, interventions={"blocks.1.mlp.hidden": lambda t, n: t * mask})
    remove_neurons(lm, {1: kept})
    assert lm.d_mlp_at(1) == len(kept)
    torch.testing.assert_close(logits(lm), masked, atol=1e-5, rtol=0)
    lm.run(TEXT, capture=["*"])


def test_prune_neurons_fraction(make_tiny):
    lm = make_tiny("llama")
    info = prune_neurons(lm, 0.25, "activation", calib=CALIB)
    assert [lm.d_mlp_at(i) for i in range(3)] == [96] * 3 and info["neurons_removed"] == 96


def test_layer_removal_equals_skipping_the_block(tiny_lm):
    lm = fresh(tiny_lm)
    # oracle: make block 1 the identity by replacing its output with its input
    keep_in = {}
    skipped = logits(
        lm,
        interventions={
            "blocks.1.resid_pre": lambda t, n: keep_in.setdefault("x", t),
            "blocks.1.resid_post": lambda t, n: keep_in["x"],
        },
    )
    info = remove_layers(lm, [1])
    assert info["kept"] == [0, 2] and lm.n_layers == 2 and lm.model.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(lm), skipped, atol=1e-5, rtol=0)
    run = lm.run(TEXT, capture=["*"])
    assert "blocks.1.attn.pattern" in run.tensors and "blocks.2.attn.pattern" not in run.tensors


def test_prune_layers_by_influence_and_range_error(make_tiny):
    lm = make_tiny("llama")
    # reference: block influence 1 - cos(block input, block output) per token, from HF's hidden states (the
    # last block's output is taken before the final norm, so compare the first two blocks)
    want, count = torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in calibration_inputs(lm, CALIB):
            hs = lm.model(**batch, output_hidden_states=True).hidden_states
            for i in range(2):
                want[i] += (
                    (1 - torch.nn.functional.cosine_similarity(hs[i][0], hs[i + 1][0], dim=-1)).double().sum()
                )
            count += batch["input_ids"].shape[1]
    info = prune_layers(lm, n=1, calib=CALIB)
    assert len(info["removed"]) == 1 and len(info["block_influence"]) == 3
    assert info["block_influence"][:2] == pytest.approx((want / count).tolist(), rel=1e-4, abs=1e-6)
    influence = info["block_influence"]
    assert info["removed"] == [min(range(3), key=lambda i: influence[i])]  # the least influential block
    with pytest.raises(LmscopeError, match="out of range"):
        remove_layers(lm, [5])


# -- real model -----------------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_head_removal_equals_masking(smollm2):
    # float64: in fp32 the two computations differ by summation order alone (~5e-5 on logits of ~20)
    lm = LM(copy.deepcopy(smollm2.model).double(), smollm2.tokenizer)
    assert lm.n_heads == 9 and lm.n_kv_heads == 3
    # layer 3: drop the whole middle group; layer 10: keep 2 of 3 in every group; layer 20: 1 head of group 0
    keep = {3: [0, 1, 2, 6, 7, 8], 10: [0, 2, 3, 4, 6, 8], 20: [1]}
    masked = logits(lm, interventions={f"blocks.{i}.attn.head_out": head_mask(9, k) for i, k in keep.items()})
    remove_heads(lm, keep)
    assert (lm.n_heads_at(3), lm.n_kv_heads_at(3), lm.n_heads_at(10), lm.n_kv_heads_at(10)) == (6, 2, 6, 3)
    assert lm.n_heads_at(20) == 1 and lm.n_kv_heads_at(20) == 1
    torch.testing.assert_close(logits(lm), masked, atol=1e-5, rtol=0)
    assert lm.run(TEXT, capture=["blocks.20.attn.pattern"])["blocks.20.attn.pattern"].shape[1] == 1
