"""Built-in text for runs that need some (head importance, calibration, evaluation) and token windows over it.

The text is Python's own reference prose (``pydoc_data.topics``, shipped with every CPython), so lmscope
works offline with no data set to download. ``split_calibration_evaluation`` gives two non-overlapping
parts, so a method calibrated on one part is never evaluated on the text it saw.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from .errors import LmscopeError

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'#+])\1{3,}\s*$")


@lru_cache(maxsize=1)
def builtin_text() -> str:
    """English prose of ``pydoc_data.topics``: code, grammar and heading underlines dropped, lines unwrapped.

    Topics come in sorted order and paragraphs are separated by one blank line, so the text is the same
    on every run of the same Python.
    """
    from pydoc_data.topics import topics

    paragraphs: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [ln for ln in block.splitlines() if ln.strip() and not _UNDERLINE.match(ln)]
            # indented blocks are code, grammar rules or tables, not prose
            if not lines or any(ln[:1].isspace() for ln in lines):
                continue
            paragraphs.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(paragraphs)


def split_calibration_evaluation(
    text: str | None = None, calibration_fraction: float = 0.5
) -> tuple[str, str]:
    """Cut ``text`` (default: ``builtin_text()``) into (calibration, evaluation) at a paragraph boundary.

    The two parts do not overlap: calibration is a prefix, evaluation the rest. The cut falls at the
    paragraph break (else the whitespace) nearest ``calibration_fraction`` of the characters.
    """
    if text is None:
        text = builtin_text()
    if not 0.0 < calibration_fraction < 1.0:
        raise LmscopeError(
            f"calibration_fraction must be between 0 and 1, got {calibration_fraction}", "e.g. 0.5"
        )
    if not text or not text.strip():
        raise LmscopeError("the text is empty", "pass some text to split into calibration and evaluation")
    target = len(text) * calibration_fraction
    for separator in (r"\n\s*\n", r"\s+"):
        cuts = [
            m for m in re.finditer(separator, text) if text[: m.start()].strip() and text[m.end() :].strip()
        ]
        if cuts:
            best = min(cuts, key=lambda m: abs(m.start() - target))
            return text[: best.start()], text[best.end() :]
    raise LmscopeError(
        "the text is one word and cannot be split into calibration and evaluation parts",
        "pass a longer text",
    )


def token_windows(
    lm, text: str | None = None, max_tokens: int = 256, window: int = 128, min_window: int = 2
) -> torch.Tensor:
    """Up to ``max_tokens`` tokens of ``text`` (default: built-in) as consecutive windows: LongTensor [n, window].

    Windows do not overlap. When the text is shorter than one window, it is one shorter window.
    Encoders get their special tokens ([CLS] ... [SEP]) around each window, inside the window length.
    """
    if text is None:
        text = builtin_text()
    if not text or not text.strip():
        raise LmscopeError("the text is empty", "pass some text with --text-file")
    if max_tokens < min_window or window < min_window:
        raise LmscopeError(
            f"need at least {min_window} tokens per window (max_tokens={max_tokens}, window={window})",
            f"pass --max-tokens {min_window} or more",
        )
    window = min(window, max_tokens, lm.max_positions)
    tok = lm.tokenizer
    start, end = [], []
    if not lm.causal_attention:  # [CLS] ... [SEP] (or <s> ... </s>) around each window
        start = [
            i
            for i in (tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id,)
            if i is not None
        ]
        end = [
            i
            for i in (tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id,)
            if i is not None
        ]
    body = window - len(start) - len(end)
    # tokenizing 465 KB takes a while; a prefix of ~8 characters per token is plenty
    ids: list[int] = tok(text[: max_tokens * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens and len(text) > max_tokens * 8:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    n_windows = max(1, min(max_tokens // window, len(ids) // body))
    if len(ids) < min_window:
        raise LmscopeError(
            f"the text is only {len(ids)} token(s)", f"pass a text of at least {min_window} tokens"
        )
    if len(ids) < body:
        body = len(ids)
    rows = []
    for i in range(n_windows):
        chunk = ids[i * body : (i + 1) * body]
        rows.append(start + chunk + end)
    return torch.tensor(rows, dtype=torch.long)
