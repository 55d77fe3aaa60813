"""``embedding="float"`` (``--embedding float``): the token embedding and tied LM head stay as in the original model
in every configuration of the quantization and combined spaces. The recipe leaves them float (``compress`` builds
the candidate exactly, logits equal, ``embed_tokens`` still an ``nn.Embedding``), the bytes are ``compress``'s
(the embedding's fp32 bytes counted), latency tables are measured with the space's embedding and keyed by it (an
int8 table is never reused for float), and an unreachable latency budget with the int8 embedding suggests
``--embedding float``.

Timing is replaced by the deterministic stand-in of ``test_structure_latency`` wherever an assertion depends on
it; no test asserts a wall-clock time."""

from __future__ import annotations

import random

import pytest
import torch

import lmscope
from lmscope.cli.main import main
from lmscope.compress import compress
from lmscope.compress.search import QuantSpace, search
from lmscope.compress.search import latency as L
from lmscope.compress.search.combined import CombinedDatabase, CombinedSpace
from lmscope.compress.search.latency import LatencyTable, StructureLatencyTable, default_table_path
from lmscope.compress.search.levels import LevelDatabase
from lmscope.compress.search.space import fp32_bytes
from lmscope.compress.size import state_bytes
from lmscope.errors import LmscopeError

from .test_search import CALIB, FAST, _one_line_error, tiny_dir  # noqa: F401  (fixture)
from .test_structure_latency import stand_in_timer

pytest.importorskip("optuna")

LEVELS = ("float", "int8", "int4-g32")


@pytest.fixture()
def tiny(make_tiny):
    lm = make_tiny("llama")
    lm.model.eval()
    return lm


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _float_embedding(lm):
    emb = lm.module(lm.family.embed)
    assert type(emb) is torch.nn.Embedding
    assert lm.module(lm.family.unembed).weight is emb.weight  # still tied, still the original's head
    return emb


def test_quant_recipe_reproduces_the_candidate_with_a_float_embedding(tiny):
    """Mixed configurations: no quantize step selects the embedding, the model ``compress`` builds from the recipe
    has the assembled candidate's logits exactly and compress's byte count, and its embedding is the original's.
    With the int8 embedding the same configuration is smaller by exactly the embedding's fp32 - int8 bytes."""
    space = QuantSpace(tiny, LEVELS, embedding="float")
    db = LevelDatabase(tiny, space)
    int8_space = QuantSpace(tiny, LEVELS)
    int8_db = LevelDatabase(tiny, int8_space)
    _float_embedding(db.work)
    rng = random.Random(0)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    emb = tiny.module(tiny.family.embed)
    int8_emb = int8_db.work.module(tiny.family.embed)
    for k in range(3):
        config = tuple(rng.choice(LEVELS[1:] if k == 0 else LEVELS) for _ in space.units)
        recipe = space.recipe(config)
        assert all(space.embed not in st.modules for st in recipe.steps)
        assert all(getattr(st, "embedding", "int8") == "int8" for st in recipe.steps)  # the default, unused
        done = compress(tiny, recipe)
        _float_embedding(done.lm)
        torch.testing.assert_close(
            _logits(done.lm.model, ids), _logits(db.assemble(config).model, ids), rtol=0, atol=0
        )
        assert done.bytes_after == db.total_bytes(config) == state_bytes(done.lm.model)
        assert db.total_bytes(config) - int8_db.total_bytes(config) == emb.weight.numel() * 4 - state_bytes(
            int8_emb
        )
    # and the int8 embedding's recipe still quantizes it (the default is unchanged)
    assert any(int8_space.embed in st.modules for st in int8_space.recipe(config).steps)


def test_combined_recipe_reproduces_the_candidate_with_a_float_embedding(tiny):
    space = CombinedSpace(
        tiny, ("quant", "heads", "neurons", "layers"), LEVELS, calib=CALIB, embedding="float"
    )
    db = CombinedDatabase(tiny, space)
    _float_embedding(db.work)
    rng = random.Random(1)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    configs = []
    for _ in range(3):
        c = [rng.choice(lvs) for lvs in space.unit_levels]
        if all(lv == "drop" for u, lv in zip(space.units, c) if u.kind == "block"):
            c[[u.kind for u in space.units].index("block")] = "keep"
        configs.append(space.canonical(c))
    # structure only, every precision float: the recipe has no quantize step at all
    n = space.n_struct
    s_only = space.canonical(
        [space.unit_levels[i][-1] if i == 0 else lvs[0] for i, lvs in enumerate(space.unit_levels[:n])]
        + ["float"] * (len(space.units) - n)
    )
    configs.append(s_only)
    for config in configs:
        recipe = space.recipe(config)
        assert all(space.qspace.embed not in getattr(st, "modules", ()) for st in recipe.steps)
        done = compress(tiny, recipe)
        _float_embedding(done.lm)
        torch.testing.assert_close(
            _logits(done.lm.model, ids), _logits(db.assemble(config).model, ids), rtol=0, atol=0
        )
        assert done.bytes_after == db.total_bytes(config), space.describe(config)
    assert not any(st.kind == "quantize" for st in space.recipe(s_only).steps)


def test_bytes_budget_with_a_float_embedding(tiny):
    """A bytes budget still works with a float embedding, with less room: the chosen point's bytes are
    compress's and within the budget, and it is rebuilt with the embedding float."""
    space = QuantSpace(tiny, LEVELS, embedding="float")
    db = LevelDatabase(tiny, space)
    lo, hi = db.total_bytes(space.uniform("int4-g32")), db.total_bytes(space.uniform("int8"))
    frac = (lo + 0.5 * (hi - lo)) / fp32_bytes(tiny.model)
    res = search(tiny, f"bytes={frac:.6f}", levels=LEVELS, embedding="float", max_evals=10, seed=0, **FAST)
    assert res.chosen is not None
    point = res.chosen_point
    assert point["bytes"] <= res.budget_bytes
    done = compress(tiny, res.recipe())
    _float_embedding(done.lm)
    assert done.bytes_after == point["bytes"]
    # the int8-embedding minimum is below the float-embedding one: a budget between them is refused
    int8_low = LevelDatabase(tiny, QuantSpace(tiny, LEVELS)).total_bytes(space.uniform("int4-g32"))
    between = (int8_low + lo) / 2 / fp32_bytes(tiny.model)
    with pytest.raises(LmscopeError, match="below the smallest configuration"):
        search(tiny, f"bytes={between:.6f}", levels=LEVELS, embedding="float", max_evals=5, **FAST)


def test_quant_latency_table_is_keyed_by_the_embedding(tiny, tmp_path, monkeypatch):
    """The table is measured with the space's embedding (the stand-in times a float embedding's prefill below the
    int8 one's) and cached under a key that includes it: the int8 table is not reused for float, and a table
    file measured with int8 is refused for a float space."""
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "measure_model", lambda model, vocab, reps=3: stand_in_timer(model))
    int8_space, float_space = QuantSpace(tiny, LEVELS), QuantSpace(tiny, LEVELS, embedding="float")
    assert L.table_key(tiny, int8_space) != L.table_key(tiny, float_space)
    t8 = LatencyTable.cached(tiny, int8_space)
    stamp = default_table_path(tiny, int8_space).stat().st_mtime_ns
    tf = LatencyTable.cached(tiny, float_space)
    assert default_table_path(tiny, float_space).is_file()
    assert default_table_path(tiny, int8_space).stat().st_mtime_ns == stamp
    assert tf.data["key"] != t8.data["key"] and (tf.data["embedding"], t8.data["embedding"]) == (
        "float",
        "int8",
    )
    # measured, not copied: the working model's timing follows its embedding (the stand-in: an int element
    # costs 1.5x a float one in prefill; the float embedding stores 4x the bytes)
    assert tf.fixed[0] < t8.fixed[0] and tf.fixed[1] > t8.fixed[1]
    emb = tiny.module(tiny.family.embed).weight
    assert tf.fixed[0] == pytest.approx(stand_in_timer(tiny.model)[0])
    assert t8.fixed[0] - tf.fixed[0] == pytest.approx(0.5 * emb.numel() * 1e-9, rel=0.05)
    path = t8.save(tmp_path / "int8.json")
    with pytest.raises(LmscopeError, match="embedding"):
        LatencyTable.cached(tiny, float_space, path)


def test_combined_latency_table_is_keyed_by_the_embedding(tiny, tmp_path):
    dbs = {
        e: CombinedDatabase(tiny, CombinedSpace(tiny, ("quant", "heads"), LEVELS, calib=CALIB, embedding=e))
        for e in ("int8", "float")
    }
    assert L.structure_table_key(tiny, dbs["int8"], 3) != L.structure_table_key(tiny, dbs["float"], 3)
    tables = {
        e: StructureLatencyTable.measure(tiny, db, grid=3, timer=stand_in_timer) for e, db in dbs.items()
    }
    assert tables["float"].fixed[0] < tables["int8"].fixed[0]  # the float embedding's stand-in prefill
    path = tables["int8"].save(tmp_path / "int8.json")
    with pytest.raises(LmscopeError, match="embedding"):
        StructureLatencyTable.cached(tiny, dbs["float"], path, grid=3)


def test_unreachable_latency_budget_suggests_a_float_embedding(tiny_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """One line, exit 2, nothing written; the fix names ``--embedding float`` with the int8 embedding, and not
    when the embedding is already float."""
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "measure_model", lambda model, vocab, reps=3: stand_in_timer(model))
    out = tmp_path / "found"
    base = ["search", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--levels", ",".join(LEVELS)]
    base += ["--budget", "latency=0.01", "--max-evals", "4", "--calibration-tokens", "32"]
    rc = main(base)
    _one_line_error(capsys, rc, "or --embedding float")
    assert not out.exists()
    rc = main([*base, "--embedding", "float"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "below the fastest configuration" in err and "--embedding float" not in err
    assert not out.exists()
    # the combined space too (a table file measured with the stand-in timer and the int8 embedding)
    lm = lmscope.load(str(tiny_dir), progress=False)
    db = CombinedDatabase(lm, CombinedSpace(lm, ("quant", "heads"), LEVELS, calib=CALIB))
    path = StructureLatencyTable.measure(lm, db, timer=stand_in_timer).save(tmp_path / "t.json")
    with pytest.raises(LmscopeError, match="or --embedding float"):
        search(lm, "latency=0.01", "quant,heads", levels=LEVELS, latency_table=str(path), max_evals=4, **FAST)
