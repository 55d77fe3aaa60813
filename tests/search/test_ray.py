"""``--ray``: candidates scored on Ray actors give the same search as in-process for a fixed seed; an
unreachable cluster address is one line, exit 2, nothing written."""

from __future__ import annotations

import pytest

import lmscope
from lmscope.cli.main import main
from lmscope.compress.search import search

from .test_search import FAST, _fraction_between, _front, _one_line_error, tiny_dir  # noqa: F401  (fixture)

pytest.importorskip("optuna")


@pytest.mark.ray
def test_ray_search_equals_in_process(tiny_dir):  # noqa: F811
    pytest.importorskip("ray")
    lm = lmscope.load(str(tiny_dir), progress=False)
    frac = _fraction_between(lm, "int4-g64", "int8", 0.5)
    kw = dict(max_evals=24, seed=3, offspring=4, **FAST)
    local = search(lm, f"bytes={frac}", **kw)
    remote = search(lm, f"bytes={frac}", ray="auto", workers=2, **kw)
    assert remote.stats["workers"] == "ray auto x2" and local.stats["workers"] == "in-process"
    assert remote.stats["evaluations"] == local.stats["evaluations"]
    assert _front(remote) == _front(local)
    # the same configurations in the same order; KL equal up to float summation order (a Ray actor runs 1
    # torch thread, this process may run 2: reductions split differently, the last bit can differ)
    assert [p["config"] for p in remote.points] == [p["config"] for p in local.points]
    for r, q in zip(remote.points, local.points):
        assert r["kl"] == pytest.approx(q["kl"], rel=1e-9, abs=1e-15)
    assert remote.chosen_point["config"] == local.chosen_point["config"]


@pytest.mark.ray
def test_unreachable_ray_address_exits_2(tiny_dir, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("ray")
    out = tmp_path / "found"
    rc = main(
        ["search", "--model", str(tiny_dir), "--budget", "bytes=0.3", "--ray", "127.0.0.1:1"]
        + ["--out", str(out), "--quiet", "--max-evals", "3"]
    )
    _one_line_error(capsys, rc, "cannot reach the Ray cluster")
    assert not out.exists()


@pytest.mark.ray
def test_ray_structured_search_equals_in_process(tiny_dir):  # noqa: F811
    """The structured search (with its least-squares refit) on two Ray actors: each builds the database from
    the driver's priors and recomputes the same refit; the same evaluations, front and chosen point."""
    pytest.importorskip("ray")
    from .test_refit import FAST as STRUCT_FAST

    lm = lmscope.load(str(tiny_dir), progress=False)
    kw = dict(max_evals=20, seed=2, offspring=4, prior="priors", **STRUCT_FAST)
    local = search(lm, "params=0.75", "heads,neurons,layers", **kw)
    remote = search(lm, "params=0.75", "heads,neurons,layers", ray="auto", workers=2, **kw)
    assert remote.stats["workers"] == "ray auto x2" and local.stats["workers"] == "in-process"
    assert local.settings["refit"] is not None and remote.settings["refit"] == local.settings["refit"]
    assert remote.stats["evaluations"] == local.stats["evaluations"]
    # the same configurations in the same order; KL equal up to float summation order (threads differ)
    assert [p["config"] for p in remote.points] == [p["config"] for p in local.points]
    for r, q in zip(remote.points, local.points):
        assert r["kl"] == pytest.approx(q["kl"], rel=1e-6, abs=1e-12)
    assert [p.get("pareto", False) for p in remote.points] == [p.get("pareto", False) for p in local.points]
    assert remote.chosen_point["config"] == local.chosen_point["config"]


@pytest.mark.ray
def test_ray_combined_search_equals_in_process(tiny_dir):  # noqa: F811
    """Precision and structure together on two Ray actors (each builds the combined database from the driver's
    priors): the same evaluations, configurations, front and chosen point as in-process."""
    pytest.importorskip("ray")
    from lmscope.compress.search.combined import CombinedDatabase, CombinedSpace
    from lmscope.compress.search.space import fp32_bytes

    from .test_search import CALIB

    lm = lmscope.load(str(tiny_dir), progress=False)
    levels = ("float", "int8", "int4-g32")
    space = CombinedSpace(lm, ("quant", "heads", "neurons"), levels, calib=CALIB)
    db = CombinedDatabase(lm, space)
    int8 = db.total_bytes(space.full()[: space.n_struct] + ("int8",) * (len(space.units) - space.n_struct))
    low = db.total_bytes(tuple(lvs[-1] for lvs in space.unit_levels))
    budget = f"bytes={(low + 0.5 * (int8 - low)) / fp32_bytes(lm.model)}"  # below uniform int8: cut, or int4
    kw = dict(levels=levels, max_evals=16, seed=2, offspring=4, prior="priors", **FAST)
    local = search(lm, budget, "quant,heads,neurons", **kw)
    remote = search(lm, budget, "quant,heads,neurons", ray="auto", workers=2, **kw)
    assert remote.stats["workers"] == "ray auto x2" and local.stats["workers"] == "in-process"
    assert remote.stats["evaluations"] == local.stats["evaluations"] and local.stats["computed"] > 4
    assert [p["config"] for p in remote.points] == [p["config"] for p in local.points]
    for r, q in zip(remote.points, local.points):
        assert r["kl"] == pytest.approx(q["kl"], rel=1e-6, abs=1e-12)
    assert [p.get("pareto", False) for p in remote.points] == [p.get("pareto", False) for p in local.points]
    assert remote.chosen_point["config"] == local.chosen_point["config"]
