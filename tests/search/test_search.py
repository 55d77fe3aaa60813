"""``lmscope.compress.search``: exact byte budget, a planted sensitivity gets the bits, determinism, resume
after an interruption, the recipe reproduces the searched candidate, KL against scipy, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmscope
from lmscope.cli.main import main
from lmscope.compress import compress
from lmscope.compress.recipe import Quantize, Recipe
from lmscope.compress.search import QuantSpace, bits_per_weight, search
from lmscope.compress.search.fitness import KLFitness
from lmscope.compress.search.levels import LevelDatabase
from lmscope.compress.search.space import fp32_bytes
from lmscope.compress.size import state_bytes

pytest.importorskip("optuna")

CALIB = " ".join(
    ["A class definition defines a class object; its suite runs in a new frame with a new namespace."] * 12
)
HELDOUT = " ".join(
    ["The for statement iterates over the elements of a sequence, in the order they appear."] * 8
)
FAST = dict(calibration_text=CALIB, calibration_tokens=64, window=16, heldout_text=HELDOUT, heldout_tokens=48)


def _fraction_between(lm, low_level: str, high_level: str, t: float) -> float:
    """A bytes budget a fraction ``t`` of the way from uniform ``low_level`` to uniform ``high_level``."""
    space = QuantSpace(lm)
    db = LevelDatabase(lm, space)
    lo, hi = db.total_bytes(space.uniform(low_level)), db.total_bytes(space.uniform(high_level))
    return (lo + t * (hi - lo)) / fp32_bytes(lm.model)


def _logits(lm, text="a short text to compare the two models on"):
    ids = lm.encode(text)
    with torch.no_grad():
        return lm.model(input_ids=ids["input_ids"], use_cache=False).logits


def test_budget_is_exact_and_respected(make_tiny):
    lm = make_tiny("llama")
    frac = _fraction_between(lm, "int4-g64", "int8", 0.4)
    rtn = Recipe((Quantize("int4", group_size=64),))
    res = search(lm, f"bytes={frac}", max_evals=30, seed=1, baselines={"rtn": rtn}, **FAST)
    # a baseline compressed by ``compress`` scores exactly as the same uniform point assembled from the database
    base = next(p for p in res.points if p["label"] == "rtn")
    uniform = next(p for p in res.points if p["label"] == "int4-g64")
    assert base["bytes"] == uniform["bytes"] and base["ppl"] == pytest.approx(uniform["ppl"], rel=1e-9)
    assert base["kl"] == pytest.approx(uniform["kl"], rel=1e-9, abs=1e-12)
    assert res.chosen is not None and res.chosen_point["bytes"] <= res.budget_bytes
    # every configuration the evolution proposed is within the budget (uniform baselines may not be)
    assert all(p["within_budget"] for p in res.points if p["origin"] in ("search", "seed"))
    # the byte table is the counter compress uses: compress the chosen point and two others, compare exactly
    others = [p for p in res.points if p is not res.chosen_point][:2]
    for p in [res.chosen_point, *others]:
        config = tuple(p["config"][u["name"]] for u in res.units)
        if set(config) == {"float"}:
            continue
        out = compress(lm, res.space.recipe(config))
        assert out.bytes_after == p["bytes"] == state_bytes(out.lm.model)
    assert res.chosen_point["ppl"] > 1 and res.reference_ppl > 1


def test_recipe_reproduces_the_searched_candidate(make_tiny, tmp_path):
    lm = make_tiny("llama")
    space = QuantSpace(lm)
    db = LevelDatabase(lm, space)
    config = ("int8", "int4-g32", "float", "int4-g64", "int8", "int4-g32")
    assembled = _logits(db.assemble(config))
    recipe = space.recipe(config)
    out = compress(lm, recipe)
    assert torch.equal(_logits(out.lm), assembled)
    # and through the file: recipe.json -> compress -> save -> lmscope.load
    recipe.to_json(tmp_path / "recipe.json")
    again = compress(lm, tmp_path / "recipe.json")
    loaded = lmscope.load(str(again.save(tmp_path / "small")), progress=False)
    assert torch.equal(_logits(loaded), assembled)
    # swapping back and forth leaves no trace: the same config assembled again gives the same logits
    db.assemble(space.uniform("int4-g64"))
    assert torch.equal(_logits(db.assemble(config)), assembled)


def test_kl_matches_scipy(make_tiny):
    from scipy.special import rel_entr, softmax

    lm = make_tiny("llama")
    space = QuantSpace(lm)
    db = LevelDatabase(lm, space)
    fit = KLFitness(lm, CALIB, tokens=32, window=16, stages=1)
    cand = db.assemble(space.uniform("int4-g32"))
    kl, sums = fit.kl(cand, 0)
    total = 0.0
    for ids in fit.windows:
        with torch.no_grad():
            p = softmax(lm.model(input_ids=ids).logits[0].double().numpy(), axis=-1)
            q = softmax(cand.model(input_ids=ids).logits[0].double().numpy(), axis=-1)
        total += rel_entr(p, q).sum()
    assert kl > 0
    assert abs(kl - total / fit.stage_tokens[0]) <= 1e-6 * abs(total / fit.stage_tokens[0]) + 1e-7


def _plant_fragile_mlp(lm, block: int = 1) -> None:
    """Make block ``block``'s down_proj fragile: one huge weight per group of 32 input channels, in channels
    whose activations are zeroed (their up_proj rows are 0). The float model's output is unchanged; any int4
    grid (step = range/15) now rounds the layer's real weights to nothing, int8 (range/127) keeps them."""
    mlp = lm.model.model.layers[block].mlp
    with torch.no_grad():
        cols = list(range(0, mlp.down_proj.in_features, 32))
        mlp.up_proj.weight[cols] = 0.0
        big = 25 * mlp.down_proj.weight.abs().max()
        mlp.down_proj.weight[:, cols] = big
        mlp.down_proj.weight.mul_(4.0)  # and make the layer matter


def test_planted_sensitivity_gets_more_bits(make_tiny):
    lm = make_tiny("llama")
    _plant_fragile_mlp(lm, block=1)
    frac = _fraction_between(lm, "int4-g32", "int8", 0.3)  # int8 everywhere does not fit
    res = search(lm, f"bytes={frac}", max_evals=40, seed=0, **FAST)
    uniform = max(
        (p for p in res.points if p["origin"] == "uniform" and p["within_budget"]),
        key=lambda p: p["bytes"],
    )
    sens = res.sensitivity
    assert max(sens, key=sens.get) == "1.mlp"  # the measurement sees the plant
    chosen = res.chosen_point
    assert bits_per_weight(chosen["config"]["1.mlp"]) > bits_per_weight(uniform["label"])
    assert chosen["kl"] < uniform["kl"] and chosen["bytes"] <= res.budget_bytes


def _front(res):
    return [(tuple(sorted(p["config"].items())), round(p["kl"], 12), p["stage"]) for p in res.points]


def test_fixed_seed_is_deterministic(make_tiny):
    lm = make_tiny("llama")
    frac = _fraction_between(lm, "int4-g64", "int8", 0.5)
    a = search(lm, f"bytes={frac}", max_evals=24, seed=3, **FAST)
    b = search(lm, f"bytes={frac}", max_evals=24, seed=3, **FAST)
    assert _front(a) == _front(b) and a.chosen_point["config"] == b.chosen_point["config"]


def test_resume_after_interruption_finishes_with_the_same_front(make_tiny, tmp_path):
    lm = make_tiny("llama")
    frac = _fraction_between(lm, "int4-g64", "int8", 0.5)
    full = search(lm, f"bytes={frac}", max_evals=26, seed=5, store=tmp_path / "full.db", **FAST)

    def kill(n):
        if n == 11:
            raise KeyboardInterrupt  # stands for a kill: the 11th evaluation is stored, nothing after it

    with pytest.raises(KeyboardInterrupt):
        search(lm, f"bytes={frac}", max_evals=26, seed=5, store=tmp_path / "cut.db", on_eval=kill, **FAST)
    resumed = search(
        lm, f"bytes={frac}", max_evals=26, seed=5, store=tmp_path / "cut.db", resume=True, **FAST
    )
    assert resumed.stats["computed"] == full.stats["computed"] - 11  # the stored 11 were not recomputed
    assert _front(resumed) == _front(full)
    assert resumed.chosen_point["config"] == full.chosen_point["config"]
    # a resume with other settings is refused
    with pytest.raises(lmscope.LmscopeError, match="different settings"):
        search(lm, f"bytes={frac}", max_evals=26, seed=6, store=tmp_path / "cut.db", resume=True, **FAST)


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_dir(make_tiny, tmp_path):
    lm = make_tiny("llama")
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d, safe_serialization=True)
    lm.tokenizer.save_pretrained(d)
    return d


def _one_line_error(capsys, rc, needle):
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmscope: error:") and needle in err, err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--budget", "bytes=0.01"], "below the smallest configuration"),
        (["--budget", "bytes=0.3", "--space", "quant,wings"], "unknown search space 'wings'"),
        (["--budget", "params=0.75", "--space", "quant,heads"], "cannot be combined with quant"),
        (["--budget", "params=0.75"], "does not apply to --space quant"),
        (["--budget", "size=3"], "KIND=FRACTION"),
        (["--budget", "bytes=1.5"], "must be in (0, 1]"),
        (["--budget", "bytes=0.3", "--resume"], "no search to resume"),
        (["--budget", "bytes=0.3", "--time-limit", "soon"], "not a duration"),
        (["--budget", "bytes=0.3", "--levels", "int3"], "unknown precision level 'int3'"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys, flags, needle):
    out = tmp_path / "found"
    rc = main(["search", "--model", str(tiny_dir), *flags, "--out", str(out), "--quiet"])
    _one_line_error(capsys, rc, needle)
    assert not out.exists()


def test_cli_search_then_compress_reproduces(tiny_dir, tmp_path, capsys):
    lm = lmscope.load(str(tiny_dir), progress=False)
    frac = _fraction_between(lm, "int4-g64", "int8", 0.5)
    out = tmp_path / "found"
    args = ["search", "--model", str(tiny_dir), "--budget", f"bytes={frac:.4f}", "--out", str(out), "--quiet"]
    rc = main([*args, "--max-evals", "14", "--calibration-tokens", "32", "--heldout-tokens", "32"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "chosen:" in text and "recipe.json" in text
    pareto = json.loads((out / "pareto.json").read_text())
    chosen = pareto["points"][pareto["chosen"]]
    assert chosen["bytes"] <= pareto["budget"]["bytes"] and len(pareto["points"]) >= 4
    html = (out / "report.html").read_text()
    assert "Pareto front" in html and "Architecture map" in html and "sensitivity" in html
    # running it again into the same folder needs --resume; with it, nothing is recomputed
    _one_line_error(capsys, main([*args, "--max-evals", "14"]), "already holds a search")
    assert (
        main([*args, "--max-evals", "14", "--resume", "--calibration-tokens", "32", "--heldout-tokens", "32"])
        == 0
    )
    assert "(0 computed here" in capsys.readouterr().out
    # lmscope compress --recipe found/recipe.json gives the searched candidate
    small = tmp_path / "small"
    assert (
        main(
            ["compress", "--model", str(tiny_dir), "--recipe", str(out / "recipe.json"), "--out", str(small)]
        )
        == 0
    )
    space = QuantSpace(lm)
    config = tuple(chosen["config"][u.name] for u in space.units)
    expected = _logits(LevelDatabase(lm, space).assemble(config))
    got = _logits(lmscope.load(str(small), progress=False))
    assert torch.equal(got, expected)
    assert np.isfinite(chosen["ppl"])


def test_cli_resume_after_sigkill_gives_the_same_front(tiny_dir, tmp_path, capsys):
    """A real kill: the search runs in a subprocess, is SIGKILLed once a few trials are in search.db, then
    ``--resume`` finishes it; pareto.json equals that of an uninterrupted run with the same options."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    lm = lmscope.load(str(tiny_dir), progress=False)
    frac = _fraction_between(lm, "int4-g64", "int8", 0.5)
    opts = ["--budget", f"bytes={frac:.4f}", "--max-evals", "18", "--calibration-tokens", "32", "--quiet"]
    opts += ["--heldout-tokens", "32", "--seed", "2", "--model", str(tiny_dir)]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmscope.cli.main", "search", *opts, "--out", str(cut)], env=env
    )
    db, deadline, killed = cut / "search.db", time.monotonic() + 300, False
    while proc.poll() is None and time.monotonic() < deadline:
        try:  # read-only: connecting must never create the file the search is about to create
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                n = con.execute("select count(*) from trials").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= 4:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the search ended before it could be killed"
    assert not (cut / "pareto.json").exists()  # killed before the end: no half-written output
    assert main(["search", *opts, "--out", str(cut), "--resume"]) == 0
    assert main(["search", *opts, "--out", str(whole)]) == 0
    a = json.loads((cut / "pareto.json").read_text())
    b = json.loads((whole / "pareto.json").read_text())
    assert [(p["config"], p["kl"], p["stage"]) for p in a["points"]] == [
        (p["config"], p["kl"], p["stage"]) for p in b["points"]
    ]
    assert a["chosen"] == b["chosen"]


def test_simulated_levels_count_the_same_bytes_and_match_the_real_kernels(make_tiny):
    """``simulate``: the real kernels' prefill arithmetic (bf16 rounding of inputs, weights and products) in
    fp32 matmuls. Same byte table; logits equal to the real compressed model's up to the fp32 accumulation
    order (a bf16 rounding flipped here and there), far closer than plain fake quantization gets."""
    from lmscope.compress.search.levels import EmulatedLinear

    lm = make_tiny("llama")
    space = QuantSpace(lm)
    real, sim = LevelDatabase(lm, space), LevelDatabase(lm, space, simulate=True)
    if lm.model.config.tie_word_embeddings:
        assert isinstance(sim.work.module(lm.family.unembed), EmulatedLinear)
    fit = KLFitness(lm, CALIB, tokens=32, window=16, stages=1)
    ids = fit.windows[0]
    for config in (space.uniform("int4-g32"), ("int8", "int4-g64", "float", "int4-g32", "int8", "int4-g64")):
        assert sim.total_bytes(config) == real.total_bytes(config)
        with torch.no_grad():
            a = real.assemble(config).model(input_ids=ids, use_cache=False).logits
            b = sim.assemble(config).model(input_ids=ids, use_cache=False).logits
        err = float((a - b).abs().max())
        assert err <= 0.02 * float(a.abs().max())
        kl_real, _ = fit.kl(real.assemble(config), 0)
        kl_sim, _ = fit.kl(sim.assemble(config), 0)
        assert abs(kl_sim - kl_real) <= 0.05 * kl_real


def test_emulated_linear_equals_the_int4_kernel_on_one_layer():
    """One layer, no propagation: the emulation equals ``Int4Linear``'s prefill to within one bf16 rounding of
    the output, on most elements exactly."""
    from lmscope.compress.quantize import _common as C
    from lmscope.compress.search.levels import EmulatedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    q = C.make_int4(lin, 32)
    em = EmulatedLinear(q)
    x = torch.randn(40, 128)
    with torch.no_grad():
        a, b = q(x), em(x)
    assert float((a - b).abs().max()) <= 2**-7 * float(a.abs().max())
    assert float((a == b).float().mean()) > 0.9
    # plain fake quantization (no bf16 rounding) is further off than the emulation
    with torch.no_grad():
        fake = torch.nn.functional.linear(x, q.dequantized_weight(), q.bias)
    assert float((a - fake).abs().mean()) > float((a - b).abs().mean())
