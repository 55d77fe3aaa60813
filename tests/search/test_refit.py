"""Least-squares compensation of structured pruning (``prune.refit``) and its use by the structured search:
the refit equals numpy's least squares on the same inputs, it never reconstructs a block's output worse than
plain slicing on the calibration inputs, the recipe reproduces the compensated candidate (equal logits, also
after save and ``lmscope.load``), the budget stays exact, and compress refuses other calibration tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmscope
from lmscope.compress import compress
from lmscope.compress.prune._linear import weight_out_in
from lmscope.compress.prune.refit import clear_cache, collect_grams, head_columns, refit_weight
from lmscope.compress.search import search
from lmscope.compress.search.structure import Refit, StructureDatabase, StructuredSpace, block_params
from lmscope.data import token_windows
from lmscope.errors import LmscopeError

CALIB = " ".join(
    ["A class definition defines a class object; its suite runs in a new frame with a new namespace."] * 12
)
HELDOUT = " ".join(
    ["The for statement iterates over the elements of a sequence, in the order they appear."] * 8
)
FAST = dict(calibration_text=CALIB, calibration_tokens=64, window=16, heldout_text=HELDOUT, heldout_tokens=48)


@pytest.fixture()
def tiny(make_tiny):
    lm = make_tiny("llama")
    lm.model.eval()
    return lm


def _inputs(lm, windows, path_of_block):
    """The inputs of one module per block, captured by hooks (independently of ``collect_grams``)."""
    got: dict[int, list] = {}
    hooks = [
        lm.blocks[i]
        .get_submodule(path_of_block)
        .register_forward_pre_hook(
            lambda m, a, i=i: got.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i in range(lm.n_layers)
    ]
    with torch.no_grad():
        for row in windows:
            lm.model(input_ids=row[None], attention_mask=torch.ones_like(row[None]), use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v).double().numpy() for i, v in got.items()}


@pytest.mark.parametrize("damp", [0.0, 0.05])
def test_refit_equals_numpy_least_squares(tiny, damp):
    windows = token_windows(tiny, CALIB, max_tokens=512, window=64)
    grams = collect_grams(tiny, windows)
    xs = _inputs(tiny, windows, tiny.family.mlp_out)
    rng = np.random.default_rng(0)
    for i in range(tiny.n_layers):
        x = xs[i]
        assert x.shape[0] > x.shape[1]  # more tokens than inputs: the least squares problem is determined
        # one window's product in fp32, windows summed in fp64
        np.testing.assert_allclose(grams[("mlp", i)].numpy(), x.T @ x, rtol=1e-5, atol=1e-5)
        w = weight_out_in(tiny.blocks[i].get_submodule(tiny.family.mlp_out)).detach().double()
        kept = sorted(rng.choice(x.shape[1], size=x.shape[1] * 5 // 8, replace=False).tolist())
        # the solver on the exact Gram matrix of these inputs (collect_grams' fp32 products, checked above,
        # would move an undamped solution by its condition number)
        new, err, err_plain = refit_weight(w, torch.from_numpy(x.T @ x), kept, damp)
        xk, y = x[:, kept], x @ w.numpy().T
        lam = damp * float(np.mean(np.sum(xk * xk, axis=0)))
        a = np.vstack([xk, np.sqrt(lam) * np.eye(len(kept))])  # ridge as an augmented least squares
        b = np.vstack([y, np.zeros((len(kept), y.shape[1]))])
        want = np.linalg.lstsq(a, b, rcond=None)[0].T
        np.testing.assert_allclose(new.numpy(), want, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(err, np.sum((xk @ new.numpy().T - y) ** 2), rtol=1e-6)
        np.testing.assert_allclose(err_plain, np.sum((xk @ w.numpy()[:, kept].T - y) ** 2), rtol=1e-6)
        assert err < err_plain


def test_refit_never_increases_the_block_output_error(tiny):
    """Every level of the database, compensated or not, on the original model's calibration inputs: the MLP's
    and the attention's output (what the block adds to the residual stream) is reconstructed at least as well
    with the refit as with plain slicing."""
    space = StructuredSpace(tiny, ("heads", "neurons"), CALIB, prior_tokens=128)
    refit = Refit(tiny, CALIB, tokens=512, window=64)
    db = StructureDatabase(tiny, space, refit)
    windows = token_windows(tiny, CALIB, max_tokens=512, window=64)
    fam = tiny.family
    mlp = fam.mlp_out.rpartition(".")[0]

    def outputs(lm, path):  # (inputs, outputs) of each block's submodule
        ins, outs = {}, {}

        def keep(i):
            def hook(module, args, out):
                ins.setdefault(i, []).append(args[0])
                outs.setdefault(i, []).append(out)

            return hook

        hooks = [lm.blocks[i].get_submodule(path).register_forward_hook(keep(i)) for i in range(lm.n_layers)]
        with torch.no_grad():
            for row in windows:
                lm.model(input_ids=row[None], attention_mask=torch.ones_like(row[None]), use_cache=False)
        for h in hooks:
            h.remove()
        return {i: torch.cat(v, 1) for i, v in ins.items()}, {i: torch.cat(v, 1) for i, v in outs.items()}

    mlp_in, mlp_out = outputs(tiny, mlp)
    checked = 0
    for (i, lv), kept in space.neuron_keep.items():
        if len(kept) == tiny.d_mlp_at(i):
            continue
        errors = []
        for compensate in (False, True):
            db.compensate = compensate
            work = db.assemble_states([(None, kept if j == i else None, False) for j in range(tiny.n_layers)])
            with torch.no_grad():
                got = work.blocks[i].get_submodule(mlp)(mlp_in[i])
            errors.append(float(((got - mlp_out[i]) ** 2).sum()))
        assert errors[1] <= errors[0] * (1 + 1e-6), (i, lv, errors)
        checked += errors[1] < errors[0]
    assert checked > 0  # the refit helps somewhere, not only "does no harm"
    # attention: the o_proj output from the original o_proj inputs, for each head level
    o_in, o_out = outputs(tiny, fam.o)
    for (i, lv), heads in space.head_keep.items():
        if len(heads) == tiny.n_heads_at(i):
            continue
        cols = head_columns(tiny, heads)
        errors = []
        for compensate in (False, True):
            db.compensate = compensate
            work = db.assemble_states(
                [(heads if j == i else None, None, False) for j in range(tiny.n_layers)]
            )
            with torch.no_grad():
                got = work.blocks[i].get_submodule(fam.o)(o_in[i][..., cols])
            errors.append(float(((got - o_out[i]) ** 2).sum()))
        assert errors[1] <= errors[0] * (1 + 1e-6), (i, lv, errors)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def test_recipe_reproduces_the_compensated_candidate_and_budget_is_exact(tiny, tmp_path):
    res = search(tiny, "params=0.7", "heads,neurons,layers", max_evals=30, seed=1, **FAST)
    chosen = res.chosen_point
    assert res.settings["refit"] is not None and chosen["params"] <= res.budget_bytes
    assert res.budget_bytes == int(0.7 * sum(block_params(b) for b in tiny.blocks))
    recipe = res.recipe()
    assert any(s.refit for s in recipe.steps if s.kind in ("keep_heads", "keep_neurons"))
    # the recipe round-trips through JSON with its refit spec
    recipe.to_json(tmp_path / "recipe.json")
    back_recipe = type(recipe).from_json(tmp_path / "recipe.json")
    assert back_recipe.to_dict() == recipe.to_dict()
    clear_cache()  # compress collects its own Gram matrices, as in a fresh process
    done = compress(tiny, back_recipe, calibration_text=CALIB)
    assert sum(block_params(b) for b in done.lm.blocks) == chosen["params"]
    infos = [i for s, i in zip(recipe.steps, done.infos) if s.kind in ("keep_heads", "keep_neurons")]
    assert any(r["refit"] for info in infos for r in info["refit"].values())
    # the candidate the search scored, rebuilt independently: compensated database, same priors
    space = StructuredSpace(tiny, ("heads", "neurons", "layers"), priors=res.priors)
    db = StructureDatabase(tiny, space, Refit(tiny, CALIB))
    config = tuple(chosen["config"][u.name] for u in space.units)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(db.assemble(config).model, ids)
    torch.testing.assert_close(_logits(done.lm.model, ids), want, rtol=1e-5, atol=1e-5)
    db.compensate = False  # and the compensation is really in it: the uncompensated candidate differs
    assert (_logits(db.assemble(config).model, ids) - want).abs().max() > 1e-3
    done.save(tmp_path / "small")
    back = lmscope.load(str(tmp_path / "small"), progress=False)
    torch.testing.assert_close(_logits(back.model, ids), want, rtol=1e-5, atol=1e-5)
    # other calibration tokens cannot reproduce the refit: refused with one line, nothing changed
    with pytest.raises(LmscopeError, match="not the ones the recipe was refit on"):
        compress(tiny, recipe, calibration_text=HELDOUT)


def test_baselines_with_and_without_refit_and_switch_off(tiny):
    res = search(tiny, "params=0.75", "heads,neurons", max_evals=12, prior="priors", **FAST)
    labels = [p["label"] for p in res.points if p.get("baseline")]
    assert labels and all(lab + " + refit" in labels for lab in labels if not lab.endswith("+ refit"))
    off = search(
        tiny, "params=0.75", "heads,neurons", max_evals=12, prior="priors", structure={"refit": False}, **FAST
    )
    assert off.settings["refit"] is None
    assert all(s.refit is None for s in off.recipe().steps if s.kind != "prune_layers")
    assert not any(p.get("refit") for p in off.points)


def test_a_bad_refit_spec_is_refused():
    from lmscope.compress.steps import KeepHeads, KeepNeurons

    with pytest.raises(LmscopeError, match="refit must be an object"):
        KeepNeurons(layers={"0": [0]}, refit={"tokens": 64})
    with pytest.raises(LmscopeError, match="damp >= 0"):
        KeepHeads(layers={"0": [0]}, refit={"tokens": 64, "window": 16, "damp": -1, "digest": "x"})
    assert "refit" not in KeepNeurons(layers={"0": [0]}).to_dict()  # recipes without a refit keep their JSON
