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


def test_sparsity_search_keeps_the_budget(make_tiny):
    lm = make_tiny("llama")
    res = search_sparsity(lm, 0.7, max_evals=30, seed=0, offspring=4, **FAST)
    budget = res["budget"]["kept_weights"]
    searched = [p for p in res["points"] if p["origin"] in ("search", "seed")]
    assert searched and all(p["kept_weights"] <= budget for p in searched)
    chosen = res["points"][res["chosen"]]
    uniform = next(p for p in res["points"] if p["label"] == "uniform 0.7")
    assert uniform["within_budget"] and uniform["ppl"] > 1  # the uniform target is always a feasible seed
    assert chosen["kl"] <= uniform["kl"] and chosen["sparsity"] >= 0.7 - 1e-6
    owl = next(p for p in res["points"] if p["label"] == "OWL")
    assert owl["ppl"] > 1 and abs(owl["sparsity"] - 0.7) < 0.01


def test_cli_sparsity_search(tiny_dir, tmp_path, capsys):  # noqa: F811
    import json

    from lmscope.cli.main import main

    out = tmp_path / "found"
    base = ["search", "--model", str(tiny_dir), "--space", "sparsity", "--out", str(out), "--quiet"]
    rc = main([*base, "--budget", "bytes=0.3"])
    _one_line_error(capsys, rc, "does not apply to --space sparsity")
    assert not out.exists()
    rc = main(
        [*base, "--budget", "params=0.3", "--max-evals", "12", "--calibration-tokens", "32"]
        + ["--heldout-tokens", "32", "--offspring", "2"]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "sparsity" / "pareto.json").read_text())
    assert res["budget"]["sparsity"] == pytest.approx(0.7) and any(p["label"] == "OWL" for p in res["points"])
