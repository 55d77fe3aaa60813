"""``--space quant,heads,neurons[,layers] --budget bytes=F``: precision and structure in one search. The byte
table equals what ``compress`` builds from the recipe, the recipe reproduces the candidate (equal logits, also
after save and ``lmscope.load``), a seed fixes the search, impossible budgets and unsupported mixes are refused
in one line."""

from __future__ import annotations

import random

import pytest
import torch

import lmscope
from lmscope.compress import compress
from lmscope.compress.search.combined import CombinedDatabase, CombinedSpace

from .test_search import CALIB, FAST, _one_line_error, tiny_dir  # noqa: F401  (fixture)

pytest.importorskip("optuna")

LEVELS = ("float", "int8", "int4-g32")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


@pytest.fixture()
def tiny(make_tiny):
    lm = make_tiny("llama")
    lm.model.eval()
    return lm


def test_bytes_and_recipe_equal_what_compress_builds(tiny, tmp_path):
    """Random (structure, precision) candidates: the byte table equals ``compress``'s count of the model the
    recipe builds, and that model's logits equal the assembled candidate's exactly."""
    space = CombinedSpace(tiny, ("quant", "heads", "neurons", "layers"), LEVELS, calib=CALIB)
    db = CombinedDatabase(tiny, space)
    rng = random.Random(0)
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    configs = []
    for _ in range(4):
        c = [rng.choice(lvs) for lvs in space.unit_levels]
        if all(lv == "drop" for u, lv in zip(space.units, c) if u.kind == "block"):
            c[[u.kind for u in space.units].index("block")] = "keep"
        configs.append(space.canonical(c))
    configs.append(
        space.canonical(
            [lvs[0] for lvs in space.unit_levels[: space.n_struct]]
            + ["int8"] * (len(space.units) - space.n_struct)
        )
    )
    for k, config in enumerate(configs):
        want = _logits(db.assemble(config).model, ids)
        done = compress(tiny, space.recipe(config))
        assert done.bytes_after == db.total_bytes(config), space.describe(config)
        torch.testing.assert_close(_logits(done.lm.model, ids), want, rtol=0, atol=0)
        if k == 0:
            done.save(tmp_path / "small")
            back = lmscope.load(str(tmp_path / "small"), progress=False)
            torch.testing.assert_close(_logits(back.model, ids), want, rtol=0, atol=0)
    # assembling in another order changes nothing (modules swapped back and forth, never drifting)
    torch.testing.assert_close(
        _logits(db.assemble(configs[0]).model, ids),
        _logits(compress(tiny, space.recipe(configs[0])).lm.model, ids),
        rtol=0,
        atol=0,
    )


def test_search_keeps_the_budget_and_is_deterministic(tiny, tmp_path):
    import json

    from lmscope.compress.search import search

    space = CombinedSpace(tiny, ("quant", "heads", "neurons"), LEVELS, calib=CALIB)
    db = CombinedDatabase(tiny, space)
    full = space.full()[: space.n_struct]
    int8 = db.total_bytes(full + ("int8",) * (len(space.units) - space.n_struct))
    from lmscope.compress.search.space import fp32_bytes

    low = db.total_bytes(tuple(lvs[-1] for lvs in space.unit_levels))
    frac = (low + 0.5 * (int8 - low)) / fp32_bytes(tiny.model)  # below uniform int8: cut, or int4
    kw = dict(levels=LEVELS, max_evals=24, seed=2, offspring=4, prior="priors", **FAST)
    res = search(tiny, f"bytes={frac}", "quant,heads,neurons", **kw)
    assert res.chosen is not None and res.budget_bytes == int(frac * fp32_bytes(tiny.model))
    searched = [p for p in res.points if p["origin"] in ("search", "seed")]
    assert searched and all(p["bytes"] <= res.budget_bytes for p in searched)
    chosen = res.chosen_point
    # exact: compress's count of the model the chosen recipe builds is the byte table's
    done = compress(tiny, res.recipe())
    assert done.bytes_after == chosen["bytes"] <= res.budget_bytes
    uniform = [p for p in res.points if p.get("label") == "uniform int8"]
    assert uniform and not uniform[0]["within_budget"] and uniform[0]["ppl"] > 1  # drawn, over the budget
    # a fixed seed fixes the search
    again = search(tiny, f"bytes={frac}", "quant,heads,neurons", **kw)
    assert [(p["config"], p["kl"]) for p in again.points] == [(p["config"], p["kl"]) for p in res.points]
    res.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["budget"]["kind"] == "bytes" and data["chosen"] == res.chosen
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Architecture map" in html and "Pareto front" in html and "bits: self_attn" in html


def test_cli_combined_search_then_compress(tiny_dir, tmp_path, capsys):  # noqa: F811
    import json

    from lmscope.cli.main import main

    out = tmp_path / "found"
    base = [
        "search",
        "--model",
        str(tiny_dir),
        "--space",
        "quant,heads,neurons",
        "--out",
        str(out),
        "--quiet",
    ]
    base += ["--levels", ",".join(LEVELS)]
    for flags, needle in (
        (["--budget", "bytes=0.01"], "below the smallest configuration"),
        (["--budget", "params=0.7"], "cannot be combined with quant"),
        (
            ["--budget", "bytes=0.5", "--space", "quant,heads,sparsity"],
            "sparsity space is searched on its own",
        ),
    ):
        rc = main([*base, *flags])
        _one_line_error(capsys, rc, needle)
        assert not out.exists()
    rc = main(
        [*base, "--budget", "bytes=0.3", "--max-evals", "10", "--calibration-tokens", "32"]
        + ["--heldout-tokens", "32", "--offspring", "2", "--prior", "priors"]
    )
    assert rc == 0, capsys.readouterr().err
    assert "recipe.json" in capsys.readouterr().out
    pareto = json.loads((out / "pareto.json").read_text())
    chosen = pareto["points"][pareto["chosen"]]
    assert chosen["bytes"] <= pareto["budget"]["bytes"]
    small = tmp_path / "small"
    rc = main(
        ["compress", "--model", str(tiny_dir), "--recipe", str(out / "recipe.json"), "--out", str(small)]
    )
    assert rc == 0, capsys.readouterr().err
    from lmscope.compress.size import state_bytes

    back = lmscope.load(str(small), progress=False)
    assert state_bytes(back.model) == chosen["bytes"]
