"""Structure diff: unchanged models have no changed rows; pruning and factorization mark exactly what changed."""

from __future__ import annotations

import copy

from lmscope import LM
from lmscope.compress.lowrank import lowrank
from lmscope.compress.prune import remove_heads, remove_layers
from lmscope.compress.structure import structure_diff


def test_identical_models_have_no_changes(tiny_lm):
    d = structure_diff(tiny_lm, LM(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer))
    assert d.rows and not d.changed_rows
    t = d.totals()
    assert t["params"][0] == t["params"][1] == tiny_lm.n_params()
    assert "0 modules changed, 0 removed, 0 added" in d.to_text()


def test_pruning_marks_changed_removed_and_added_rows(make_tiny):
    a = make_tiny("llama")
    b = LM(copy.deepcopy(a.model), a.tokenizer)
    remove_heads(b, {0: [0, 1]})
    remove_layers(b, [1])
    lowrank(b, rank=8, targets=["model.layers.1.mlp.up_proj"])  # the block that was layer 2
    d = structure_diff(a, b, "orig", "small")
    status = {r.path: r.status for r in d.rows}
    assert status["model.layers.0.self_attn.q_proj"] == "changed"
    assert status["model.layers.0.self_attn.k_proj"] == "changed"
    assert status["model.layers.0.mlp.gate_proj"] == "same"
    assert status["model.layers.1"] == "removed"  # lined up by origin, not by position
    assert status["model.layers.2.self_attn.q_proj"] == "same"
    assert status["model.layers.2.mlp.up_proj"] == "changed"
    assert status["model.layers.2.mlp.up_proj.down"] == "added"
    q = next(r for r in d.rows if r.path == "model.layers.0.self_attn.q_proj")
    assert (q.a.shape, q.b.shape, q.a.params, q.b.params) == ("[64, 64]", "[32, 64]", 4096, 2048)
    assert d.totals()["params"] == [a.n_params(), b.n_params()]
    text = d.to_text()
    line = next(ln for ln in text.splitlines() if "q_proj" in ln and "[32, 64]" in ln)
    assert line.startswith("~") and "[64, 64] → [32, 64]" in line
    assert any(ln.startswith("-") for ln in text.splitlines())
    cols, rows, highlight = d.to_html_rows()
    assert len(rows) == len(d.rows) and {rows[i][0] for i in highlight} <= {"~", "-", "+"}
    assert len(highlight) == len(d.changed_rows)
    assert len(d.to_text(changed_only=True).splitlines()) < len(text.splitlines())


def test_quantized_modules_show_their_bits(make_tiny):
    """The real int4 module (not a fake): 4 bits per weight, plus an fp16 scale and a uint8 zero per group."""
    from lmscope.compress.quantize._common import make_int4, make_int8

    a = make_tiny("llama")
    b = LM(copy.deepcopy(a.model), a.tokenizer)
    mlp = b.model.model.layers[0].mlp
    out_f, in_f = mlp.up_proj.out_features, mlp.up_proj.in_features
    mlp.up_proj = make_int4(mlp.up_proj, 32)
    mlp.down_proj = make_int8(mlp.down_proj)
    rows = {r.path: r for r in structure_diff(a, b).rows}
    row = rows["model.layers.0.mlp.up_proj"]
    assert row.status == "changed" and row.b.dtype == "int4 g32" and row.b.params == in_f * out_f
    assert row.b.bytes == out_f * in_f // 2 + (out_f * in_f // 32) * (2 + 1)
    assert row.a.bytes == out_f * in_f * 4  # fp32 before
    down, d_out = rows["model.layers.0.mlp.down_proj"], a.model.model.layers[0].mlp.down_proj.out_features
    assert down.b.dtype.startswith("int8")  # int8 weights (1 byte each) and one fp32 scale per output row
    assert down.b.bytes == down.a.bytes // 4 + 4 * d_out
