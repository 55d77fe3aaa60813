"""Built-in text and its calibration / evaluation split."""

from __future__ import annotations

import pytest

from lmscope.data import builtin_text, split_calibration_evaluation, token_windows
from lmscope.errors import LmscopeError


def test_builtin_text_is_prose():
    text = builtin_text()
    assert len(text) > 100_000
    paragraphs = text.split("\n\n")
    assert all(p and not p[0].isspace() for p in paragraphs)  # code/grammar blocks are indented: dropped
    assert not any(set(p) <= set("*=-~^") for p in paragraphs)  # no heading underlines
    assert "assert" in text and builtin_text() == text


def test_split_does_not_overlap():
    text = builtin_text()
    calib, evaluation = split_calibration_evaluation()
    assert calib and evaluation
    assert text.startswith(calib) and text.endswith(evaluation)
    assert len(calib) + len(evaluation) < len(text)  # the separator between them belongs to neither
    # no paragraph is cut in two: the last calibration paragraph and first evaluation one are whole
    paragraphs = set(text.split("\n\n"))
    assert calib.split("\n\n")[-1] in paragraphs and evaluation.split("\n\n")[0] in paragraphs
    assert abs(len(calib) - len(evaluation)) < 0.05 * len(text)


def test_split_fraction_and_errors():
    calib, evaluation = split_calibration_evaluation("a b c d e f g h i j", calibration_fraction=0.3)
    assert (calib, evaluation) == ("a b c", "d e f g h i j")
    with pytest.raises(LmscopeError, match="one word"):
        split_calibration_evaluation("word")
    with pytest.raises(LmscopeError, match="empty"):
        split_calibration_evaluation("   ")
    with pytest.raises(LmscopeError, match="between 0 and 1"):
        split_calibration_evaluation("a b", calibration_fraction=1.0)


def test_token_windows(tiny_lm):
    ids = token_windows(tiny_lm, max_tokens=40, window=16)
    assert ids.shape == (2, 16)
    if tiny_lm.is_causal:  # consecutive, non-overlapping windows of the text's tokens
        first = tiny_lm.tokenizer(builtin_text()[:2000], add_special_tokens=False)["input_ids"]
        assert ids.flatten().tolist() == first[:32]
    else:
        assert ids[:, 0].eq(tiny_lm.tokenizer.cls_token_id).all()
    short = token_windows(tiny_lm, "hello world", max_tokens=64, window=32)
    assert short.shape[0] == 1 and short.shape[1] < 32
    with pytest.raises(LmscopeError, match="empty"):
        token_windows(tiny_lm, "  ")
