"""--truncate keeps the closing special token and records what it cut; the memory-limit error names a
token count that fits (checked by brute force) and a limit that would work."""

from __future__ import annotations

import pytest

from lmscope.capture.memory import check_fits, estimate_bytes
from lmscope.errors import LmscopeError


def test_truncate_keeps_sep_and_says_how_much(make_tiny):
    lm = make_tiny("bert")
    text = "word " * (lm.max_positions + 40)
    full = lm.n_tokens(text)
    assert full > lm.max_positions
    run = lm.run(text, capture=["blocks.0.resid_post"], truncate=True)
    ids = run.input_ids[0].tolist()
    assert len(ids) == lm.max_positions
    assert ids[0] == lm.tokenizer.cls_token_id and ids[-1] == lm.tokenizer.sep_token_id
    s = run.summary()
    assert s["truncated"] == {"tokens": full, "kept": lm.max_positions}
    assert len(s["texts"][0]) < len(text) and s["texts"][0].split() == ["word"] * (lm.max_positions - 2)


def test_untruncated_run_has_no_note(make_tiny):
    run = make_tiny("bert").run("a short text", capture=["blocks.0.resid_post"], truncate=True)
    assert "truncated" not in run.summary() and run.summary()["texts"] == ["a short text"]


def test_memory_error_suggests_a_length_that_fits(make_tiny):
    lm = make_tiny("llama")
    names = [f"blocks.{i}.attn.pattern" for i in range(lm.n_layers)]
    seq = 200
    limit = estimate_bytes(lm, names, 1, seq) // 3
    with pytest.raises(LmscopeError) as e:
        check_fits(lm, names, 1, seq, max_bytes=limit)
    fits = next(n for n in range(seq, 0, -1) if estimate_bytes(lm, names, 1, n) <= limit)  # brute force
    assert f"at most {fits} tokens" in e.value.fix
    assert "--max-capture-gb" in e.value.fix and "--capture" not in e.value.fix
