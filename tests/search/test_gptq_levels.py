"""GPTQ int4 levels of the search: non-sequential GPTQ (every layer's Hessian from the unquantized model) equals
a hand computation and the block-sequential GPTQ on a one-block model; the level database's GPTQ variants are
what ``compress --recipe`` builds, through recipe.json, save and ``lmscope.load``; recipe checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmscope
from lmscope.compress import compress
from lmscope.compress.calibration import Calibration, capture_inputs
from lmscope.compress.quantize.gptq import gptq_quantize, original_hessians
from lmscope.compress.recipe import Quantize, Recipe
from lmscope.compress.search import QuantSpace, search
from lmscope.compress.search.levels import LevelDatabase
from lmscope.compress.targets import block_linears
from lmscope.errors import LmscopeError

CALIB = " ".join(
    ["A class definition defines a class object; its suite runs in a new frame with a new namespace."] * 12
)


def _logits(lm, text="a short text to compare the two models on"):
    ids = lm.encode(text)
    with torch.no_grad():
        return lm.model(input_ids=ids["input_ids"], use_cache=False).logits


def _one_block(lm):
    lm.model.model.layers = nn.ModuleList(lm.model.model.layers[:1])
    lm.model.config.num_hidden_layers = 1
    return lm


def test_hessians_equal_a_hand_computation(make_tiny):
    lm = make_tiny("llama")
    calib = Calibration(lm, CALIB, window=32, n_windows=3)
    H = original_hessians(lm, calib)
    names = [n for n, _ in block_linears(lm)] + ["lm_head"]  # the head: for a GPTQ embedding + tied head
    assert sorted(H) == sorted(names)
    X = capture_inputs(lm, names, calib.windows())  # [tokens, in] per layer, from HF's own forward
    for n in names:
        x = X[n].double()
        expected = 2.0 / x.shape[0] * x.T @ x
        assert torch.allclose(H[n].double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    # cached per calibration: the same tensors again, not a second pass
    assert original_hessians(lm, calib) is H


def test_non_sequential_equals_sequential_gptq_on_one_block(make_tiny):
    lm = _one_block(make_tiny("llama"))
    seq = compress(lm, Quantize("gptq4", group_size=32), calibration_text=CALIB)
    ind = compress(lm, Quantize("gptq4", group_size=32, sequential=False), calibration_text=CALIB)
    qa = dict(seq.lm.model.named_modules())
    qb = dict(ind.lm.model.named_modules())
    for n, _ in block_linears(lm):
        assert type(qa[n]).__name__ == type(qb[n]).__name__ == "Int4Linear"
        assert torch.equal(qa[n].qweight, qb[n].qweight) and torch.equal(qa[n].scale, qb[n].scale)
    assert torch.equal(_logits(seq.lm), _logits(ind.lm))


def test_gptq_variant_is_gptq_of_the_original_hessian(make_tiny):
    """A level-database variant is ``gptq_quantize`` of that layer's weight on the unquantized model's
    Hessian, and lowers the output error below round-to-nearest at the same bytes."""
    lm = make_tiny("llama")
    space = QuantSpace(lm, ("float", "int8", "int4-g32", "gptq-g32"), granularity="block")
    db = LevelDatabase(lm, space, calibration_text=CALIB)
    H = original_hessians(lm, Calibration(lm, CALIB))
    path = space.units[1].paths[0]
    w = lm.module(path).weight
    _, _, _, expected = gptq_quantize(w, H[path], 32)
    got = db.modules(1, "gptq-g32")[path].dequantized_weight()
    # the module stores an fp16 scale: equal to the fp32 GPTQ result up to that rounding
    assert torch.allclose(got, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    for u in range(len(space.units)):
        assert db.bytes(u, "gptq-g32") == db.bytes(u, "int4-g32")
        assert db.error(u, "gptq-g32") < db.error(u, "int4-g32")


@pytest.mark.parametrize("embedding", ["int8", "gptq4-g32"])
def test_recipe_with_gptq_levels_reproduces_the_candidate(make_tiny, tmp_path, embedding):
    lm = make_tiny("llama")
    levels = ("float", "int8", "int4-g32", "int4-g64", "gptq-g32", "gptq-g64")
    space = QuantSpace(lm, levels, embedding=embedding)
    db = LevelDatabase(lm, space)  # default calibration: what compress uses without --calibration
    config = ("gptq-g64", "int8", "gptq-g32", "int4-g64", "float", "gptq-g64")
    assembled = _logits(db.assemble(config))
    recipe = space.recipe(config)
    kinds = [(s.scheme, s.sequential) for s in recipe.steps]
    assert kinds[:2] == [("gptq4", False), ("gptq4", False)]  # before the other quantize steps
    assert recipe.steps[0].embedding == embedding
    out = compress(lm, recipe)
    assert torch.equal(_logits(out.lm), assembled)
    head = type(out.lm.module("lm_head")).__name__
    assert head == ("Int8TiedHead" if embedding == "int8" else "Int4TiedHead")
    assert out.bytes_after == db.total_bytes(config)
    recipe.to_json(tmp_path / "recipe.json")
    assert '"sequential": false' in (tmp_path / "recipe.json").read_text()
    again = compress(lm, tmp_path / "recipe.json")
    loaded = lmscope.load(str(again.save(tmp_path / "small")), progress=False)
    assert torch.equal(_logits(loaded), assembled)


def test_search_with_gptq_levels_stays_in_budget_and_reproduces(make_tiny):
    lm = make_tiny("llama")
    levels = ("int8", "int4-g64", "gptq-g32", "gptq-g64")
    space = QuantSpace(lm, levels)
    db = LevelDatabase(lm, space, calibration_text=CALIB)
    lo, hi = db.total_bytes(space.uniform("gptq-g64")), db.total_bytes(space.uniform("int8"))
    from lmscope.compress.search.space import fp32_bytes

    frac = (lo + 0.3 * (hi - lo)) / fp32_bytes(lm.model)
    res = search(
        lm,
        f"bytes={frac}",
        levels=levels,
        calibration_text=CALIB,
        calibration_tokens=32,
        window=16,
        heldout_text=CALIB,
        heldout_tokens=32,
        max_evals=20,
        seed=0,
    )
    chosen = res.chosen_point
    assert chosen is not None and chosen["bytes"] <= res.budget_bytes
    config = res.chosen_config()
    out = compress(lm, res.recipe(), calibration_text=CALIB)
    assert out.bytes_after == chosen["bytes"]
    assert torch.equal(_logits(out.lm), _logits(db.assemble(config)))


def test_recipe_checks_for_non_sequential_gptq():
    with pytest.raises(LmscopeError, match="sequential applies to gptq4"):
        Quantize("int4", sequential=False)
    with pytest.raises(LmscopeError, match="sequential must be true or false"):
        Quantize("gptq4", sequential="no")
    with pytest.raises(LmscopeError, match="comes after another quantize step"):
        Recipe.of(
            Quantize("int8", modules=("model.layers.0.*",)),
            Quantize("gptq4", sequential=False, modules=("model.layers.1.*",)),
        )
    # the default stays out of the JSON; false round-trips
    assert "sequential" not in Quantize("gptq4").to_dict()
    step = Quantize("gptq4", sequential=False)
    assert Quantize.from_dict(step.to_dict()) == step


def test_int4_embedding_and_tied_head(make_tiny, tmp_path):
    """The int4 embedding looks up its de-quantized rows; the tied head is ``Int4Linear`` on the same codes
    (prefill and decode kernels), close to an fp32 matmul of the de-quantized weight; bytes are exact; save
    and ``lmscope.load`` give the same logits."""
    from lmscope.compress.quantize.modules import Int4Linear
    from lmscope.compress.size import state_bytes

    lm = make_tiny("llama")
    int8 = compress(lm, Quantize("int4", group_size=32))
    out = compress(lm, Quantize("int4", group_size=32, embedding="int4-g32"))
    emb, head = out.lm.module("model.embed_tokens"), out.lm.module("lm_head")
    assert type(emb).__name__ == "Int4Embedding" and head._embedding is emb
    V, D = emb.num_embeddings, emb.embedding_dim
    # bytes: int4 codes + fp16 scale + uint8 zero per group of 32, instead of int8 rows + fp32 scale per row
    assert int8.bytes_after - out.bytes_after == (V * D + 4 * V) - (V * D // 2 + 3 * V * (D // 32))
    assert out.bytes_after == state_bytes(out.lm.model)
    w = emb.dequantized_weight()
    ids = torch.tensor([[0, 5, 17, V - 1]])
    assert torch.equal(emb(ids), w[ids])
    # de-quantized rows are RTN int4 of the float embedding
    from lmscope.compress.quantize._common import int4_spec
    from lmscope.compress.quantize.affine import fake_quantize

    assert torch.allclose(
        w, fake_quantize(lm.module("model.embed_tokens").weight.float(), int4_spec(32)), atol=1e-2
    )
    lin = Int4Linear(D, V, False, 32)
    lin.qweight, lin.scale, lin.zero = emb.qweight, emb.scale, emb.zero
    for rows in (1, 40):  # decode kernel, prefill path
        x = torch.randn(1, rows, D)
        with torch.no_grad():
            y = head(x)
            assert torch.equal(y, lin(x))
            ref = x @ w.T
        assert torch.allclose(y, ref, rtol=0, atol=0.02 * float(ref.abs().max()))
    again = lmscope.load(str(out.save(tmp_path / "small")), progress=False)
    assert type(again.module("lm_head")).__name__ == "Int4TiedHead"
    assert torch.equal(_logits(again), _logits(out.lm))


def test_gptq_embedding_lowers_the_head_output_error(make_tiny):
    lm = make_tiny("llama")
    calib = Calibration(lm, CALIB, window=32, n_windows=3)
    H = original_hessians(lm, calib)["lm_head"]
    w = lm.module("lm_head").weight.detach().float()
    errs = {}
    for level in ("int4-g32", "gptq4-g32"):
        out = compress(lm, Quantize("int8", embedding=level), calibration_text=CALIB)
        d = out.lm.module("model.embed_tokens").dequantized_weight() - w
        errs[level] = float((d @ H * d).sum())
    assert errs["gptq4-g32"] < 0.8 * errs["int4-g32"]
    with pytest.raises(LmscopeError, match="unknown embedding level"):
        Quantize("int8", embedding="int3")
    with pytest.raises(LmscopeError, match="comes after another quantize step"):
        Recipe.of(
            Quantize("int8", modules=("model.layers.0.*",)),
            Quantize("int4", embedding="gptq4-g32", modules=("model.embed_tokens",)),
        )


def test_w8a8_level_reproduces_and_costs_the_bytes_of_int8(make_tiny):
    lm = make_tiny("llama")
    space = QuantSpace(lm, ("float", "int8", "w8a8", "int4-g32"))
    db = LevelDatabase(lm, space, simulate=True)  # w8a8 stays the real module in simulate mode
    for u in range(len(space.units)):
        assert db.bytes(u, "w8a8") == db.bytes(u, "int8")
    config = ("w8a8", "int8", "int4-g32", "w8a8", "float", "w8a8")
    w8a8 = [type(m).__name__ for m in db.modules(0, "w8a8").values()]
    assert set(w8a8) == {"W8A8Linear"}
    exact = LevelDatabase(lm, space)
    out = compress(lm, space.recipe(config))
    assert out.bytes_after == exact.total_bytes(config)
    assert torch.equal(_logits(out.lm), _logits(exact.assemble(config)))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--embedding", "int3"], "unknown embedding level 'int3'"),
        (["--levels", "int8,gptq-g48"], "unknown precision level 'gptq-g48'"),
    ],
)
def test_cli_bad_embedding_or_gptq_level_exits_2_and_writes_nothing(
    make_tiny, tmp_path, capsys, flags, needle
):
    from lmscope.cli.main import main

    lm = make_tiny("llama")
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d, safe_serialization=True)
    lm.tokenizer.save_pretrained(d)
    capsys.readouterr()  # transformers' save progress bar is not the CLI's output
    out = tmp_path / "found"
    rc = main(["search", "--model", str(d), "--budget", "bytes=0.3", *flags, "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmscope: error:") and needle in err, err
    assert not out.exists()


def test_search_with_an_int4_embedding_says_so_and_reproduces(make_tiny, tmp_path):
    """The embedding level is the same in every configuration (uniform baselines too): the printout and the
    report say which, and the chosen recipe rebuilds the chosen bytes."""
    lm = make_tiny("llama")
    res = search(
        lm,
        "bytes=0.5",
        levels=("int8", "int4-g32"),
        embedding="int4-g32",
        calibration_text=CALIB,
        calibration_tokens=32,
        window=16,
        heldout_text=CALIB,
        heldout_tokens=32,
        max_evals=8,
        seed=0,
    )
    assert res.settings["embedding"] == "int4-g32"
    assert "token embedding int4-g32 in every configuration" in res.to_text()
    assert "token embedding (and a tied head) int4-g32 in every configuration" in res.report(
        tmp_path / "r.html"
    )
    out = compress(lm, res.recipe(), calibration_text=CALIB)
    assert out.bytes_after == res.chosen_point["bytes"]


def test_int4m_levels_count_their_bytes_and_reproduce(make_tiny):
    """The "scale and min" levels: 4 bits + an fp16 scale and an fp16 minimum per group (2 bytes more per group
    than int4's uint8 zero); the level table counts what compress stores, and the recipe, with an int4m
    embedding, rebuilds the candidate's logits exactly (simulated candidates to within the emulation)."""
    from lmscope.compress.search.space import bits_per_weight

    lm = make_tiny("llama")
    space = QuantSpace(lm, ("float", "int4-g32", "int4m-g32", "int4m-g64"), embedding="int4m-g32")
    exact = LevelDatabase(lm, space)
    for u, unit in enumerate(space.units):
        n = sum(lm.module(p).weight.numel() for p in unit.paths)
        assert exact.bytes(u, "int4m-g32") - exact.bytes(u, "int4-g32") == n // 32  # one byte more per group
        assert exact.bytes(u, "int4m-g64") == n * bits_per_weight("int4m-g64") / 8
    config = ("int4m-g32", "int4m-g64", "float", "int4-g32", "int4m-g32", "int4m-g64")
    out = compress(lm, space.recipe(config))
    assert out.bytes_after == exact.total_bytes(config)
    assert type(out.lm.module("model.embed_tokens")).__name__ == "Int4Embedding"
    assert out.lm.module("model.embed_tokens").zero.dtype == torch.float16
    assert torch.equal(_logits(out.lm), _logits(exact.assemble(config)))
    sim = LevelDatabase(lm, space, simulate=True)
    a, b = _logits(out.lm), _logits(sim.assemble(config))
    assert float((a - b).abs().max()) <= 0.02 * float(a.abs().max())
