"""``--space sparsity``: per-block Wanda levels from one ranking (equal to ``prune_unstructured``'s Wanda at
the same sparsity), OWL's allocation (mean kept exactly, outlier-rich blocks sparsified less), and a search
that keeps to the budget."""

from __future__ import annotations

import pytest
import torch

from lmscope.compress.prune.unstructured import prune_unstructured
from lmscope.compress.search.sparsity import SparsityDatabase, SparsitySpace, search_sparsity

from .test_search import CALIB, FAST, _one_line_error, tiny_dir  # noqa: F401  (fixture)

pytest.importorskip("optuna")


def test_a_level_equals_wanda_pruning(make_tiny):
    lm = make_tiny("llama")
    space = SparsitySpace(lm)
    db = SparsityDatabase(lm, space, CALIB)
    work = db.assemble(space.uniform("0.7"))
    ref = make_tiny("llama")
    ref.model.load_state_dict(lm.model.state_dict())
    prune_unstructured(ref, 0.7, "wanda", calib=CALIB)
    for unit in space.units:
        for p in unit.paths:
            assert torch.equal(work.module(p).weight, ref.module(p).weight), p
    # back to another level and again: assembling never drifts
    db.assemble(space.uniform("0.5"))
    work = db.assemble(space.uniform("0.7"))
    p = space.units[0].paths[0]
    assert torch.equal(work.module(p).weight, ref.module(p).weight)
    assert db.total_bytes(space.uniform("0.7")) == sum(
        int((ref.module(p).weight != 0).sum()) for u in space.units for p in u.paths
    )


def test_owl_allocation(make_tiny):
    lm = make_tiny("llama")
    space = SparsitySpace(lm)
    db = SparsityDatabase(lm, space, CALIB)
    ratios = db.outlier_ratios()
    owl = db.owl_allocation(0.7, lam=0.08)
    w = [db.numel[u] for u in range(len(owl))]
    assert sum(o * n for o, n in zip(owl, w)) / sum(w) == pytest.approx(0.7, abs=1e-9)
    assert max(owl) - min(owl) <= 0.16 + 1e-9
    order = sorted(range(len(owl)), key=lambda u: ratios[u])
    assert all(owl[a] >= owl[b] - 1e-12 for a, b in zip(order, order[1:]))  # more outliers, less sparsity


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def test_sparsity_search_keeps_the_budget_and_its_recipe_reproduces_the_candidate(make_tiny, tmp_path):
    import json

    import lmscope
    from lmscope.compress import compress

    lm = make_tiny("llama")
    lm.model.eval()
    res = search_sparsity(lm, 0.7, max_evals=30, seed=0, offspring=4, **FAST)
    space = SparsitySpace(lm)
    db = SparsityDatabase(lm, space, CALIB)
    budget = res.budget_bytes
    assert budget >= int(round(0.3 * db.total_weights)) and res.reference_params == db.total_weights
    searched = [p for p in res.points if p["origin"] in ("search", "seed")]
    assert searched and all(p["params"] <= budget for p in searched)
    chosen = res.chosen_point
    uniform = next(p for p in res.points if p["label"] == "uniform 0.7")
    assert uniform["within_budget"] and uniform["ppl"] > 1  # the uniform target is always a feasible seed
    assert chosen["kl"] <= uniform["kl"] and chosen["sparsity"] >= 0.7 - 1e-6
    owl = next(p for p in res.points if p["label"] == "OWL")
    assert owl["ppl"] > 1 and abs(owl["sparsity"] - 0.7) < 0.01
    # the recipe: Wanda steps, last blocks first; compress builds exactly the candidate the search scored
    recipe = res.recipe()
    assert {s.kind for s in recipe.steps} == {"prune_unstructured"}
    done = compress(lm, recipe, calibration_text=CALIB)
    config = res.chosen_config()
    work = db.assemble(config)
    kept = 0
    for unit, lv in zip(space.units, config):
        for p in unit.paths:  # zeros counted independently of the search's cost table
            w = done.lm.module(p).weight
            kept += int((w != 0).sum())
            assert torch.equal(w, work.module(p).weight), p
            assert int((w == 0).sum()) == int(round(w.shape[1] * float(lv))) * w.shape[0]
    assert kept == chosen["params"] <= budget  # exact: the budget counts the weights compress keeps
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    want = _logits(work.model, ids)
    assert torch.equal(_logits(done.lm.model, ids), want)
    done.save(tmp_path / "small")
    back = lmscope.load(str(tmp_path / "small"), progress=False)
    assert torch.equal(_logits(back.model, ids), want)
    # written: pareto.json, recipe.json that loads back to the same recipe, report with the baselines
    res.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["budget"]["kept_weights"] == budget and data["space"] == "sparsity"
    from lmscope.compress.recipe import Recipe

    assert Recipe.from_json(tmp_path / "out" / "recipe.json") == recipe
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Architecture map" in html and "OWL" in html and "Pareto front" in html


def test_cli_sparsity_search(tiny_dir, tmp_path, capsys):  # noqa: F811
    import json

    import lmscope
    from lmscope.cli.main import main

    out = tmp_path / "found"
    base = ["search", "--model", str(tiny_dir), "--space", "sparsity", "--out", str(out), "--quiet"]
    for flags, needle in (
        (["--budget", "bytes=0.3"], "does not apply to --space sparsity"),
        (["--budget", "params=0.01"], "outside the levels"),
        (["--budget", "params=0.3", "--levels", "0.5,x"], "sparsity levels must be numbers"),
        (["--budget", "params=0.3", "--resume"], "no search to resume"),
    ):
        rc = main([*base, *flags])
        _one_line_error(capsys, rc, needle)
        assert not out.exists()
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    rc = main(
        [*base, "--budget", "params=0.3", "--max-evals", "12", "--calibration-tokens", "32"]
        + ["--heldout-tokens", "32", "--offspring", "2", "--calibration-file", str(calib)]
    )
    assert rc == 0, capsys.readouterr().err
    assert "recipe.json" in capsys.readouterr().out
    res = json.loads((out / "pareto.json").read_text())
    assert res["budget"]["sparsity"] == pytest.approx(0.7) and any(p["label"] == "OWL" for p in res["points"])
    assert (out / "report.html").is_file()
    chosen = res["points"][res["chosen"]]
    small = tmp_path / "small"
    rc = main(
        ["compress", "--model", str(tiny_dir), "--recipe", str(out / "recipe.json"), "--out", str(small)]
        + ["--calibration-file", str(calib)]
    )
    assert rc == 0, capsys.readouterr().err
    back = lmscope.load(str(small), progress=False)
    kept = sum(int((back.module(p).weight != 0).sum()) for u in res["units"] for p in u["paths"])
    assert kept == chosen["params"] <= res["budget"]["kept_weights"]
