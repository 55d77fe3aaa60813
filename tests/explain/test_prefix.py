"""Shared prefixes (``explain.prefix``): a batch of perturbed inputs run with each distinct prefix computed
once gives every row the value it gets in the plain batch (within 1e-6), and the index is the brute-force
set of distinct prefixes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmscope.explain.faithfulness import _curve_masks, _random_orders, ranking
from lmscope.explain.prefix import prefix_index, shared_prefixes
from lmscope.explain.targets import Objective, encode_prompt, make_target
from lmscope.testing import DECODERS, tiny_model

TEXT = "When Mary and John went to the store, John gave a drink to"


def _curve_rows(obj: Objective, n_orders: int = 4) -> torch.Tensor:
    """Deletion/insertion masks of a few orders and every occlusion: the rows the default explain runs."""
    orders = _random_orders(obj, n_orders, seed=1) + [ranking(torch.randn(obj.n).tolist(), obj.free)]
    masks = [_curve_masks(obj.n, o, 33)[1] for o in orders]
    return torch.cat([*masks, ~torch.eye(obj.n, dtype=torch.bool)])


def test_prefix_index_is_the_set_of_distinct_prefixes():
    g = torch.Generator().manual_seed(0)
    vocab = torch.randn(3, 5, generator=g)
    rows = torch.randint(0, 3, (40, 6), generator=g)
    rows[::3, :3] = 0  # many shared prefixes
    index, inverse = prefix_index(vocab[rows])
    b, n = rows.shape
    brute = {}
    for r in range(b):
        for p in range(n):
            brute.setdefault((p, tuple(rows[r, : p + 1].tolist())), []).append(r * n + p)
    assert len(index) == len(brute)
    for flats in brute.values():
        ids = {int(inverse[f]) for f in flats}
        assert len(ids) == 1  # one id per prefix ...
        assert int(index[ids.pop()]) == min(flats)  # ... whose representative is its first occurrence
    # different prefixes never share an id
    assert len({int(inverse[flats[0]]) for flats in brute.values()}) == len(brute)


@pytest.mark.parametrize("whole_mlp", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefixes_change_no_value(make_tiny, family, whole_mlp):
    lm = make_tiny(family)
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"), cache=False)
    masks = _curve_rows(obj)
    embeds = obj.masked(masks)
    plain = obj.f_many(embeds)
    blocks = lm.module(lm.family.blocks)
    index, _ = prefix_index(embeds)
    assert len(index) < 0.7 * embeds.shape[0] * embeds.shape[1]  # the batch does share prefixes
    calls = []
    hook = blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad(), shared_prefixes(blocks, embeds, lm.family.mlp if whole_mlp else None):
        shared = obj.f_embeds(embeds)
    hook.remove()
    assert calls  # the blocks ran (the values are not a copy of ``plain``)
    assert torch.allclose(shared, plain, rtol=0, atol=1e-6), (shared - plain).abs().max()
    # restored: no linear keeps the wrapper
    assert not any("forward" in m.__dict__ for m in blocks.modules())
    # the cached objective uses shared prefixes and gets the plain values
    fast = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"))
    assert torch.allclose(fast.f_masks(masks).float(), plain, rtol=0, atol=1e-6)


def test_shared_prefixes_really_skip_rows(make_tiny):
    """The linears see one row per distinct prefix, not the whole batch."""
    lm = make_tiny("llama")
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"))
    embeds = obj.masked(_curve_rows(obj))
    index, _ = prefix_index(embeds)
    blocks = lm.module(lm.family.blocks)
    weight, rows = blocks[0].mlp.down_proj.weight, []

    class Record(TorchFunctionMode):  # the matmul's own operand, below any module hook
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear and args[1] is weight:
                rows.append(args[0].shape[:-1].numel())
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        obj.f_embeds(embeds)
        with shared_prefixes(blocks, embeds):
            obj.f_embeds(embeds)
        with shared_prefixes(blocks, embeds, lm.family.mlp):
            obj.f_embeds(embeds)
    assert rows == [embeds.shape[0] * embeds.shape[1], len(index), len(index)]

    # another thread's forward on the same model meanwhile (serve runs jobs in threads) runs plainly
    other = []

    def forward_elsewhere():
        with torch.no_grad(), Record():
            other.append(obj.f_embeds(embeds))

    with torch.no_grad(), shared_prefixes(blocks, embeds, lm.family.mlp):
        thread = threading.Thread(target=forward_elsewhere)
        thread.start()
        thread.join()
    assert rows[-1] == embeds.shape[0] * embeds.shape[1] and len(other) == 1


def test_encoders_and_gradients_do_not_share(make_tiny):
    """Bidirectional attention: every position sees the whole row, so nothing is shared there."""
    lm = make_tiny("bert")
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, None, pair="a drink"))
    masks = _curve_rows(obj, 1)
    ref = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, None, pair="a drink"), cache=False)
    assert np.allclose(obj.f_masks(masks).numpy(), ref.f_masks(masks).numpy(), rtol=0, atol=1e-6)


@pytest.mark.real
def test_default_explain_on_smollm2_matches_the_plain_path(smollm2):
    """The default explain (shared prefixes, one faithfulness batch) reports the numbers of the
    per-method path with plain batches, on the real model and the IOI prompt."""
    from lmscope.explain.api import explain

    def _numbers(x, path=""):  # every number in the JSON, keyed by its path (timings left out)
        if isinstance(x, dict):
            return {
                k2: v2
                for k, v in x.items()
                if k not in ("seconds", "timings")
                for k2, v2 in _numbers(v, f"{path}.{k}").items()
            }
        if isinstance(x, list):
            return {k2: v2 for i, v in enumerate(x) for k2, v2 in _numbers(v, f"{path}[{i}]").items()}
        return {path: x}

    res = explain(smollm2, TEXT, target=" Mary", share=True)
    # f(x), taken from the gradient pass, is the plain forward's value exactly
    obj = Objective(smollm2, encode_prompt(smollm2, TEXT), make_target(smollm2, " Mary"))
    with torch.no_grad():
        assert res.first.target["value"] == float(obj.f_embeds(obj.x[None])[0])
    fast = _numbers(res.to_json())
    slow = _numbers(explain(smollm2, TEXT, target=" Mary", share=False).to_json())
    assert fast.keys() == slow.keys()
    for key, a in fast.items():
        b = slow[key]
        if isinstance(a, float) and isinstance(b, float):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (key, a, b)
        else:
            assert a == b, key


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_f_x_from_the_gradient_pass_is_the_forward_value(make_tiny, family):
    """A gradient at the input also gives f(x): one forward fewer per objective, the same value."""
    lm = make_tiny(family)
    target = make_target(lm, None, pair="a drink") if family == "bert" else make_target(lm, " Mary")
    obj = Objective(lm, encode_prompt(lm, TEXT), target)
    before = obj.n_forwards
    obj.grad_at_input()
    fx = obj.f_x
    assert obj.n_forwards == before + 1  # the gradient's forward only
    with torch.no_grad():
        ref = float(obj.f_embeds(obj.x[None])[0])
    assert fx == pytest.approx(ref, rel=1e-6, abs=1e-6)
    plain = Objective(lm, encode_prompt(lm, TEXT), target)
    assert plain.f_x == ref  # asked for first: a forward of its own


def test_f_x_of_the_top_prediction_comes_from_the_forward_that_found_it(make_tiny):
    lm = make_tiny("llama")
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, None))
    assert obj.n_forwards == 1 and obj.target.token_id is not None
    with torch.no_grad():
        logits = obj._forward(obj.x[None])
    assert obj.f_x == float(logits[0, obj.target.token_id]) == float(logits[0].max())
    assert obj.n_forwards == 2  # only the check above ran another forward


def test_rows_without_shared_prefixes_keep_the_plain_batches(make_tiny):
    """IG's path points share no prefix: they run in the plain batches of ``batch_size`` rows, as before."""
    lm = make_tiny("llama")
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"))
    alphas = torch.linspace(0, 1, 70)[:, None, None]
    path = obj.b[None] + alphas * (obj.x - obj.b)[None]
    sizes = []
    forward = obj._forward
    obj._forward = lambda e: (sizes.append(e.shape[0]), forward(e))[1]
    obj.f_many(path)
    assert sizes == [32, 32, 6]
    sizes.clear()
    obj.f_many(obj.masked(_curve_rows(obj)))  # these share prefixes: one large batch
    assert len(sizes) == 1


@pytest.mark.parametrize("model_type", DECODERS)
def test_every_decoder_family_gets_the_plain_values(model_type, causal_tokenizer):
    """The wrappers are generic (every linear, each dense MLP whole): on every decoder family (MoE, ALiBi,
    sliding windows, parallel attention, fused qkv, Conv1D) shared prefixes give the plain batch's values."""
    from lmscope import LM

    lm = LM(tiny_model(model_type), causal_tokenizer, name=f"tiny-{model_type}")
    obj = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"))
    ref = Objective(lm, encode_prompt(lm, TEXT), make_target(lm, " Mary"), cache=False)
    masks = _curve_rows(obj, 2)
    fast, plain = obj.f_masks(masks), ref.f_masks(masks)
    assert torch.allclose(fast, plain, rtol=1e-6, atol=1e-5), (fast - plain).abs().max()
    assert not any("forward" in m.__dict__ for m in lm.model.modules())
