"""The compress report: sizes in MB, pruned heads counted (checked against the pruned model itself),
identical blocks shown once, names indented so the tree survives HTML."""

from __future__ import annotations

from lmscope.compress import PruneHeads, Quantize, compress
from lmscope.views.compress import compress_report, grouped_structure_rows, removed_counts


def _table(rep, title):
    sec = next(s for s in rep.sections if s.title.startswith(title))
    return next(w for w in sec.widgets if w["type"] == "table")


def test_summary_counts_pruned_heads_and_uses_mb(make_tiny):
    lm = make_tiny("llama")
    before = sum(lm.n_heads_at(i) for i in range(lm.n_layers))
    res = compress(lm, [PruneHeads(0.25), Quantize("int8")])
    after = sum(res.lm.n_heads_at(i) for i in range(res.lm.n_layers))
    assert after < before
    assert removed_counts(res) == [("attention heads", before, after, before - after)]
    rows = _table(compress_report(res), "Summary")["rows"]
    assert rows[0][0] == "size" and rows[0][1].endswith(" MB") and "e+" not in rows[0][1]
    assert ["attention heads", str(before), str(after), f"{before - after} removed"] in rows


def test_identical_blocks_are_grouped_and_indented(make_tiny):
    lm = make_tiny("llama")
    res = compress(lm, [Quantize("int8")])
    diff = res.structure_diff()
    shown = grouped_structure_rows(diff)
    names = [cells[1] for cells, _ in shown]
    block = f"0–{lm.n_layers - 1} ({lm.n_layers} identical blocks)"
    assert block in [n.strip("\u00a0") for n in names]
    per_block = sum(
        1 for r in diff.rows if r.path.startswith("model.layers.0.") or r.path == "model.layers.0"
    )
    assert len(shown) == len(diff.rows) - (lm.n_layers - 1) * per_block
    q = next(n for n in names if n.strip("\u00a0") == "q_proj")
    assert q.startswith("\u00a0" * 2 * 4)  # depth 4 (model.layers.N.self_attn.q_proj), two nbsp per level
    assert not any("model.layers.1." in cells[1] for cells, _ in shown)
