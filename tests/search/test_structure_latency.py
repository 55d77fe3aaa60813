"""``--budget latency=F`` for the structured (heads, neurons, layers) and combined (quant with structure) searches:
the table of structural choices x precision has the structure claimed (fewer heads / neurons never predicted
slower, interpolation exact for a cost linear in the kept count, a planted non-monotone bump pooled away), the
search keeps to the predicted budget, the chosen point's prediction equals its measurement under an additive
stand-in timer, the recipe reproduces the candidate, a killed combined search resumes to the same front, and
impossible budgets are one line, exit 2, nothing written.

Timing is replaced by a deterministic stand-in (``stand_in_timer``: prefill ~ stored elements, int kernels 1.5x;
decode ~ stored bytes) wherever an assertion depends on it: real timings on a shared machine would make these
tests flaky, and no test asserts a wall-clock time."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import isotonic_regression

import lmscope
from lmscope.cli.main import main
from lmscope.compress import compress
from lmscope.compress.search import search
from lmscope.compress.search.combined import CombinedDatabase, CombinedEvolution, CombinedSpace
from lmscope.compress.search.fitness import KLFitness
from lmscope.compress.search.latency import StructureLatencyCost, StructureLatencyTable, _pava
from lmscope.compress.search.structure import StructureDatabase, StructuredEvolution, StructuredSpace

from .test_search import CALIB, FAST, _one_line_error, tiny_dir  # noqa: F401  (fixture)

pytest.importorskip("optuna")

LEVELS = ("float", "int8", "int4-g32")
QUICK = dict(offspring=4, prior="priors", **FAST)


def stand_in_timer(model):
    """(prefill, decode) 'seconds' of a model: additive over its stored tensors, monotone in their sizes."""
    prefill = decode = 0.0
    for t in itertools.chain(model.parameters(), model.buffers()):
        prefill += t.numel() * (1.0 if t.is_floating_point() else 1.5)
        decode += t.numel() * t.element_size()
    return prefill * 1e-9, decode * 1e-9


@pytest.fixture()
def tiny(make_tiny):
    lm = make_tiny("llama")
    lm.model.eval()
    return lm


def _minimum(evolution_cls, db, table):
    """The predicted fraction of the space's fastest configuration, as the search's refusal computes it."""
    evolution = evolution_cls(db, 1.0, None, 3, cost=StructureLatencyCost(table, db))
    return evolution, evolution.minimum_bytes()


def test_pava_is_isotonic_regression():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=int(rng.integers(1, 9))).tolist()
        np.testing.assert_allclose(_pava(v), isotonic_regression(v).x, rtol=0, atol=1e-12)


def test_table_structure(tiny):
    """Combined table, stand-in timer: monotone in heads and neurons kept at every precision; a neuron level off
    the measured grid predicted exactly (the stand-in is linear in the neuron count); uniform configurations
    predicted as the timer times the assembled model; a planted non-monotone bump is pooled away."""
    space = CombinedSpace(tiny, ("quant", "heads", "neurons", "layers"), LEVELS, calib=CALIB)
    db = CombinedDatabase(tiny, space)
    table = StructureLatencyTable.measure(tiny, db, grid=3, timer=stand_in_timer)
    (grp,) = table.groups  # three layers of one shape share one set of measurements
    assert grp["layers"] == [0, 1, 2] and set(grp["attn"]) == set(LEVELS) == set(grp["mlp"])
    n_heads, n_neurons = grp["heads"], grp["neurons"]
    measured_neurons = [r[0] for r in grp["mlp"]["float"]]
    assert len(measured_neurons) == 3 < len({len(v) for v in space.neuron_keep.values()})
    for q in LEVELS:
        for kind, top in (("attn", n_heads), ("mlp", n_neurons)):
            # every kept count from 1 to all: never slower with fewer kept
            for p in (0, 1):
                pred = [
                    table.layer_seconds(
                        0, k if kind == "attn" else None, k if kind == "mlp" else None, False, q, q
                    )[p]
                    for k in range(1, top + 1)
                ]
                assert all(a <= b + 1e-18 for a, b in zip(pred, pred[1:])), (kind, q, p)
    # uniform configurations: predicted = the timer on the assembled model (off-grid neuron levels included)
    cost = StructureLatencyCost(table, db)
    n = space.n_struct
    mlp_units = [k for k, u in enumerate(space.units[:n]) if u.kind == "mlp"]
    off_grid = [
        lv
        for lv in space.unit_levels[mlp_units[0]]
        if len(space.neuron_keep[(0, lv)]) not in measured_neurons
    ]
    assert off_grid
    for lv, q in itertools.product(off_grid[:2], LEVELS):
        config = list(space.full()[:n]) + [q] * (len(space.units) - n)
        for k in mlp_units:
            config[k] = lv
        want = stand_in_timer(db.assemble(tuple(config)).model)
        assert cost.seconds(tuple(config)) == pytest.approx(want, rel=1e-9)
    # a timer with a bump at one kept size (slower with fewer neurons): the table pools it away, keeps it raw
    bump = len(space.neuron_keep[(0, space.unit_levels[mlp_units[0]][2])])

    def bumpy(model):
        p, d = stand_in_timer(model)
        widths = {m.weight.shape[0] for name, m in model.named_modules() if name.endswith("up_proj")}
        return (p + 1e-3, d) if bump in widths else (p, d)

    sdb_table = StructureLatencyTable.measure(
        tiny, StructureDatabase(tiny, space.sspace), grid=7, timer=bumpy
    )
    raw = [r for r in sdb_table.data["raw"][0]["mlp"]["float"]]
    rows = sdb_table.groups[0]["mlp"]["float"]
    assert any(a[1] > b[1] for a, b in zip(sorted(raw), sorted(raw)[1:]))  # the raw bump is not monotone
    assert all(a[1] <= b[1] for a, b in zip(rows, rows[1:]))


def test_structured_latency_search(tiny, tmp_path):
    """params -> latency: every searched point within the predicted budget; the chosen one's prediction equals the
    stand-in measurement of the model compress builds from its recipe, whose KL is the candidate's."""
    spaces = ("heads", "neurons", "layers")
    space = StructuredSpace(tiny, spaces, CALIB)
    db = StructureDatabase(tiny, space)
    table = StructureLatencyTable.measure(tiny, db, timer=stand_in_timer)
    _, low = _minimum(StructuredEvolution, db, table)
    frac = low + 0.4 * (1 - low)
    res = search(
        tiny,
        f"latency={frac:.6f}",
        ",".join(spaces),
        max_evals=14,
        seed=1,
        structure={"latency_timer": stand_in_timer, "head_roles": False},
        **QUICK,
    )
    searched = [p for p in res.points if p["origin"] in ("search", "seed")]
    assert searched and all(p["latency_fraction"] <= frac + 1e-12 for p in searched)
    c = res.chosen_point
    assert c is not None and c["latency_fraction"] <= frac
    m = res.stats["chosen_measured"]
    assert m["latency_fraction"] == pytest.approx(c["latency_fraction"], abs=2e-5) and m[
        "error"
    ] == pytest.approx(0, abs=1e-4)
    # the uniform baselines are at the same predicted latency budget
    base = [p for p in res.points if p.get("baseline")]
    assert base and all(p["within_budget"] and p["latency_fraction"] <= frac for p in base)
    # the recipe reproduces the candidate: the model compress builds has the candidate's KL
    done = compress(tiny, res.recipe(), calibration_text=CALIB)
    fitness = KLFitness(tiny, CALIB, FAST["calibration_tokens"], FAST["window"], 3)
    assert fitness.kl(done.lm, fitness.n_stages - 1)[0] == pytest.approx(c["kl"], rel=1e-6, abs=1e-9)
    res.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["budget"] == {"kind": "latency", "fraction": float(f"{frac:.6f}")}
    front = [p for p in data["points"] if p.get("pareto")]
    lat = sorted((p["latency_fraction"], p["kl"]) for p in front)
    assert all(b[1] < a[1] for a, b in zip(lat, lat[1:]))  # a front over latency: slower points have lower KL
    html = (tmp_path / "out" / "report.html").read_text()
    assert "chosen latency: predicted" in html
    assert "of the original&#x27;s measured latency" in html or "of the original's measured latency" in html
    assert (
        "latency predicted from the measured latency table" in html and "block parameters kept (" not in html
    )
    assert "chosen latency: predicted" in res.to_text()


def test_combined_latency_search_resumes_to_the_same_front(tiny, tmp_path):
    """quant,heads,neurons under latency=F: within the predicted budget, prediction = stand-in measurement of
    the built model, recipe KL = candidate KL; killed after 6 evaluations and resumed: the same points."""
    space = CombinedSpace(tiny, ("quant", "heads", "neurons"), LEVELS, calib=CALIB)
    db = CombinedDatabase(tiny, space)
    table = StructureLatencyTable.measure(tiny, db, timer=stand_in_timer)
    evolution, low = _minimum(CombinedEvolution, db, table)
    full = StructureLatencyCost(table, db).total(space.full())
    frac = low + 0.5 * (full - low)
    stand_in = {"latency_timer": stand_in_timer, "head_roles": False}
    kw = dict(levels=LEVELS, max_evals=14, seed=2, structure=stand_in, **QUICK)
    whole = search(tiny, f"latency={frac:.6f}", "quant,heads,neurons", store=tmp_path / "whole.db", **kw)
    searched = [p for p in whole.points if p["origin"] in ("search", "seed")]
    assert searched and all(p["latency_fraction"] <= frac + 1e-12 for p in searched)
    c = whole.chosen_point
    assert c is not None and whole.stats["chosen_measured"]["error"] == pytest.approx(0, abs=1e-4)
    done = compress(tiny, whole.recipe())
    fitness = KLFitness(tiny, CALIB, FAST["calibration_tokens"], FAST["window"], 3)
    assert fitness.kl(done.lm, fitness.n_stages - 1)[0] == pytest.approx(c["kl"], rel=1e-6, abs=1e-9)

    def kill(n):
        if n == 6:
            raise KeyboardInterrupt  # stands for a kill: the 6th evaluation is stored, nothing after it

    cut = tmp_path / "cut.db"
    with pytest.raises(KeyboardInterrupt):
        search(tiny, f"latency={frac:.6f}", "quant,heads,neurons", store=cut, on_eval=kill, **kw)
    resumed = search(tiny, f"latency={frac:.6f}", "quant,heads,neurons", store=cut, resume=True, **kw)
    assert resumed.stats["computed"] == whole.stats["computed"] - 6  # the stored 6 were not recomputed
    key = lambda r: [  # noqa: E731
        (json.dumps(p["config"], sort_keys=True), p["kl"], p["latency_fraction"], p.get("pareto", False))
        for p in r.points
    ]
    assert key(resumed) == key(whole) and resumed.chosen == whole.chosen


def test_cli_latency_budgets(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The CLI path with a latency table file (measured with the stand-in timer): the combined search runs and
    compress rebuilds its chosen point; impossible budgets -> one line, exit 2, nothing written (the structured
    one measured on this machine, into a private cache)."""
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    lm = lmscope.load(str(tiny_dir), progress=False)
    space = CombinedSpace(lm, ("quant", "heads", "neurons"), LEVELS, calib=CALIB)
    db = CombinedDatabase(lm, space)
    table = StructureLatencyTable.measure(lm, db, timer=stand_in_timer)
    path = table.save(tmp_path / "table.json")
    _, low = _minimum(CombinedEvolution, db, table)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    out = tmp_path / "found"
    base = [
        "search",
        "--model",
        str(tiny_dir),
        "--out",
        str(out),
        "--quiet",
        "--calibration-file",
        str(calib),
    ]
    quick = ["--max-evals", "8", "--calibration-tokens", "32", "--heldout-tokens", "32", "--offspring", "2"]
    quick += ["--prior", "priors"]
    combined = ["--space", "quant,heads,neurons", "--levels", ",".join(LEVELS), "--latency-table", str(path)]
    for flags, needle in (
        ([*combined, "--budget", f"latency={low * 0.9:.4f}"], "below the fastest configuration"),
        (["--space", "heads,neurons,layers", "--budget", "latency=0.05"], "below the fastest configuration"),
        (["--space", "heads,neurons", "--budget", "bytes=0.5"], "does not apply to --space heads,neurons"),
    ):
        rc = main([*base, *quick, *flags])
        _one_line_error(capsys, rc, needle)
        assert not out.exists()
    rc = main([*base, *quick, *combined, "--budget", f"latency={min(1.0, low + 0.02):.4f}"])
    assert rc == 0, capsys.readouterr().err
    assert "chosen latency: predicted" in capsys.readouterr().out
    pareto = json.loads((out / "pareto.json").read_text())
    chosen = pareto["points"][pareto["chosen"]]
    assert (
        pareto["budget"]["kind"] == "latency" and chosen["latency_fraction"] <= pareto["budget"]["fraction"]
    )
    assert "chosen_measured" in pareto["stats"]
    small = tmp_path / "small"
    assert (
        main(
            ["compress", "--model", str(tiny_dir), "--recipe", str(out / "recipe.json"), "--out", str(small)]
        )
        == 0
    )
    back = lmscope.load(str(small), progress=False)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    want = compress(lm, space.recipe(tuple(chosen["config"][u.name] for u in space.units)))
    with torch.no_grad():
        torch.testing.assert_close(
            back.model(input_ids=ids).logits, want.lm.model(input_ids=ids).logits, rtol=0, atol=0
        )
