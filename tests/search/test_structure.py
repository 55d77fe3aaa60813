"""The structured search (heads, neurons, layers under ``params=F``): the budget holds exactly (checked against
the parameters of the model ``compress`` builds from the recipe), the recipe reproduces the searched candidate
(equal logits after save and ``lmscope.load``), a fragile layer keeps more, determinism, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch

import lmscope
from lmscope.cli.main import main
from lmscope.compress import compress
from lmscope.compress.search import search
from lmscope.compress.search.structure import Refit, StructureDatabase, StructuredSpace, block_params
from lmscope.errors import LmscopeError

pytest.importorskip("optuna")

CALIB = " ".join(
    ["A class definition defines a class object; its suite runs in a new frame with a new namespace."] * 12
)
HELDOUT = " ".join(
    ["The for statement iterates over the elements of a sequence, in the order they appear."] * 8
)
FAST = dict(calibration_text=CALIB, calibration_tokens=64, window=16, heldout_text=HELDOUT, heldout_tokens=48)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def _block_params(lm) -> int:
    return sum(block_params(b) for b in lm.blocks)


@pytest.fixture()
def tiny(make_tiny):
    lm = make_tiny("llama")
    lm.model.eval()
    return lm


def test_budget_exact_and_recipe_reproduces_candidate(tiny, tmp_path):
    lm = tiny
    original_blocks = _block_params(lm)
    res = search(lm, "params=0.7", "heads,neurons,layers", max_evals=40, seed=3, **FAST)
    budget = int(0.7 * original_blocks)
    assert res.budget_bytes == budget and res.reference_params == original_blocks
    assert res.chosen is not None
    searched = [p for p in res.points if p["origin"] in ("search", "seed")]
    assert searched and all(p["params"] <= budget for p in searched)
    chosen = res.chosen_point
    assert chosen["params"] <= budget
    # the parameter table is exact: the model compress builds from the recipe has exactly those parameters
    recipe = res.recipe()
    kinds = [s.kind for s in recipe.steps]
    assert kinds == sorted(kinds, key=["keep_heads", "keep_neurons", "prune_layers"].index)
    done = compress(lm, recipe, calibration_text=CALIB)  # the refit needs the search's tokens
    assert _block_params(done.lm) == chosen["params"]
    assert sum(1 for p in res.points if p.get("ppl") is not None) >= 2
    # every evaluated point's parameter count equals the model assembled for it, counted independently
    space = StructuredSpace(lm, ("heads", "neurons", "layers"), priors=res.priors)
    db = StructureDatabase(lm, space, Refit(lm, CALIB))  # the search refits by default, so does its recipe
    spec = {k: res.settings["refit"][k] for k in ("tokens", "window", "damp", "digest")}
    assert all(s.refit == spec for s in recipe.steps if s.kind != "prune_layers")
    for p in res.points[:: max(1, len(res.points) // 6)]:
        if not p.get("baseline"):
            config = tuple(p["config"][u.name] for u in space.units)
            work = db.assemble(config)
            real = sum(block_params(b) for b in work.blocks if type(b).__name__ != "Skip")
            assert real == p["params"]
    # the recipe reproduces the candidate the search scored: equal logits, also after save and load
    config = tuple(chosen["config"][u.name] for u in space.units)
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    want = _logits(db.assemble(config).model, ids)
    torch.testing.assert_close(_logits(done.lm.model, ids), want, rtol=1e-5, atol=1e-5)
    done.save(tmp_path / "small")
    back = lmscope.load(str(tmp_path / "small"), progress=False)
    torch.testing.assert_close(_logits(back.model, ids), want, rtol=1e-5, atol=1e-5)
    assert _block_params(back) == chosen["params"]
    # and the model is really smaller than the original
    assert back.n_params() < lm.n_params()


def test_uniform_baselines_are_at_the_budget_and_drawn(tiny, tmp_path):
    res = search(tiny, "params=0.75", "heads,neurons", max_evals=20, seed=0, **FAST)
    base = [p for p in res.points if p.get("baseline")]
    assert {p["label"].split(" neurons")[0] for p in base} >= {"uniform"}
    for p in base:  # the fewest neurons removed that fit: one more neuron kept everywhere would not fit
        assert p["params"] <= res.budget_bytes and p["ppl"] > 0
    uniform = [p for p in res.points if p["origin"] == "uniform"]
    assert uniform and all(p["within_budget"] for p in uniform)
    res.write(tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "What the search kept" in html and "Architecture map" in html
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["budget"]["kind"] == "params" and data["head_roles"] is not None
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["steps"]


def test_fragile_layer_keeps_more_neurons(tiny):
    """A planted sensitivity: the MLPs of layers 0 and 2 barely write to the residual stream (outputs scaled
    by 0.01), layer 1's does (x4). Its probe measures it as the most sensitive, and the search keeps more of its
    neurons than of either other layer's, where uniform pruning would cut all three alike."""
    lm = tiny
    fam = lm.family
    with torch.no_grad():
        for i, scale in ((0, 0.01), (1, 4.0), (2, 0.01)):
            lm.blocks[i].get_submodule(fam.mlp_out).weight.mul_(scale)
    res = search(lm, "params=0.8", "neurons", max_evals=40, seed=0, **FAST)
    assert res.sensitivity["1.mlp"] > 10 * max(res.sensitivity["0.mlp"], res.sensitivity["2.mlp"])
    config = res.chosen_point["config"]
    kept = {int(k.split(".")[0]): float(v[3:]) for k, v in config.items()}
    assert kept[1] > max(kept[0], kept[2])
    uniform = [p for p in res.points if p["origin"] == "uniform"]
    assert uniform and all(res.chosen_point["kl"] < p["kl"] for p in uniform)


def test_deterministic_and_resume(tiny, tmp_path):
    a = search(tiny, "params=0.7", "heads,neurons,layers", max_evals=25, seed=5, **FAST)
    b = search(tiny, "params=0.7", "heads,neurons,layers", max_evals=25, seed=5, **FAST)
    key = lambda r: [(json.dumps(p["config"], sort_keys=True), p["kl"], p["params"]) for p in r.points]  # noqa: E731
    assert key(a) == key(b) and a.chosen == b.chosen
    # interrupted after 12 evaluations, resumed to 25: the same points as the uninterrupted run
    store = tmp_path / "s.db"
    search(tiny, "params=0.7", "heads,neurons,layers", max_evals=12, seed=5, store=store, **FAST)
    c = search(
        tiny, "params=0.7", "heads,neurons,layers", max_evals=25, seed=5, store=store, resume=True, **FAST
    )
    assert key(c) == key(a)


def test_refusals(tiny):
    with pytest.raises(LmscopeError, match="budget does not apply"):
        search(tiny, "bytes=0.5", "heads", **FAST)
    with pytest.raises(LmscopeError, match="below the smallest configuration"):
        search(tiny, "params=0.01", "heads,neurons", **FAST)
    with pytest.raises(LmscopeError, match="cannot be combined"):
        search(tiny, "params=0.5", "quant,heads", **FAST)


def _phi3_dir(tmp_path, tokenizer):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path / "phi3"
    Phi3ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_structured_errors(tiny, tmp_path, capsys, causal_tokenizer):
    path = _phi3_dir(tmp_path, causal_tokenizer)
    out = tmp_path / "found"
    capsys.readouterr()
    code = main(
        ["search", "--model", str(path), "--budget", "params=0.8", "--space", "heads", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "head pruning is not supported for phi3" in err[0]
    assert "--space neurons,layers" in err[0]
    assert not out.exists()
    code = main(
        ["search", "--model", "smollm2", "--budget", "bytes=0.5", "--space", "heads", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "params=" in err[0]
    code = main(
        ["search", "--model", "smollm2", "--budget", "params=0.5", "--space", "heads,wat", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown search space" in err[0]
    assert not out.exists()


def test_cli_structured_search_then_compress(make_tiny, tmp_path, capsys):
    lm = make_tiny("llama")
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d, safe_serialization=True)
    lm.tokenizer.save_pretrained(d)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "found"
    args = [
        "search",
        "--model",
        str(d),
        "--budget",
        "params=0.75",
        "--space",
        "heads,neurons,layers",
        "--prior",
        "priors",
    ]
    rc = main(
        [
            *args,
            "--out",
            str(out),
            "--quiet",
            "--max-evals",
            "20",
            "--calibration-file",
            str(calib),
            "--calibration-tokens",
            "32",
            "--heldout-tokens",
            "32",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "block parameters" in text and "recipe.json" in text
    pareto = json.loads((out / "pareto.json").read_text())
    chosen = pareto["points"][pareto["chosen"]]
    assert chosen["params"] <= pareto["budget"]["params"]
    small = tmp_path / "small"
    build = ["compress", "--model", str(d), "--recipe", str(out / "recipe.json"), "--out", str(small)]
    # the recipe's refit is recomputed on the search's calibration tokens: other tokens are refused, one line
    assert main(build) == 2
    err = capsys.readouterr().err.strip()
    assert "not the ones the recipe was refit on" in err and "\n" not in err and not small.exists()
    assert main([*build, "--calibration-file", str(calib)]) == 0
    back = lmscope.load(str(small), progress=False)
    assert _block_params(back) == chosen["params"]


def test_prior_seeds_keep_each_kinds_parameters(tiny):
    """prior='priors' (no probes): each uniform seed redistributed by the priors keeps the kind's parameters,
    and the whole search still respects the budget."""
    from lmscope.compress.search.structure import StructuredEvolution

    space = StructuredSpace(tiny, ("heads", "neurons"), CALIB)
    db = StructureDatabase(tiny, space)
    evo = StructuredEvolution(db, int(0.75 * db.reference_params), None, 2)
    weights = evo.prior_weights()
    assert sorted(weights) == sorted(u.name for u in space.units)
    for config in evo.uniform_seeds():
        moved = evo.redistribute(config, weights)
        assert db.total_bytes(moved) <= db.total_bytes(config)
    res = search(tiny, "params=0.75", "heads,neurons", max_evals=15, prior="priors", **FAST)
    assert res.chosen_point["params"] <= res.budget_bytes and not res.sensitivity


def test_keep_steps_refuse_bad_recipes(tiny):
    from lmscope.compress.recipe import Recipe
    from lmscope.compress.steps import KeepHeads, KeepNeurons

    with pytest.raises(LmscopeError, match="out of range"):
        compress(tiny, Recipe((KeepHeads(layers={"7": [0, 1]}),)))
    with pytest.raises(LmscopeError, match="out of range"):
        compress(tiny, Recipe((KeepNeurons(layers={"0": [0, 999]}),)))
    with pytest.raises(LmscopeError, match="non-empty list"):
        KeepNeurons(layers={"0": []})
    # a layout that breaks the KV grouping (2 heads of group 0, 1 of group 1) is refused, the model unchanged
    before = _block_params(tiny)
    with pytest.raises(LmscopeError, match="same number of query heads"):
        compress(tiny, Recipe((KeepHeads(layers={"0": [0, 1, 2]}),)))
    assert _block_params(tiny) == before
