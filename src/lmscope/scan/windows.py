"""Documents -> token windows: each document tokenized alone, cut into windows that never cross documents.

Every window carries the model's own special tokens: the ones its tokenizer adds around a text (a BOS for
Llama-style tokenizers that add one, [CLS] ... [SEP] for BERT), inside ``seq_len``. The body of document
``d`` is cut into consecutive chunks; the last chunk of a document may be shorter. The stream stops at
``max_tokens`` window tokens (the last window is cut to fit).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import LmscopeError


@dataclass(frozen=True)
class Window:
    index: int  # global window number in the corpus
    doc: int  # global document number
    start: int  # offset of the window's first body token in the document's tokens
    ids: tuple[int, ...]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer puts around any text (BOS / CLS ... SEP), found by asking it."""
    body = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if full[i : i + len(body)] == body:
            return list(full[:i]), list(full[i + len(body) :])
    return [], []


def windows(lm, documents, seq_len: int, max_tokens: int | None) -> Iterator[Window]:
    """Token windows over ``documents`` (an iterable of strings), in order."""
    prefix, suffix = special_tokens(lm.tokenizer)
    body_len = seq_len - len(prefix) - len(suffix)
    if body_len < 1:
        raise LmscopeError(
            f"--seq-len {seq_len} leaves no room for text beside the {len(prefix) + len(suffix)} special tokens",
            "pass a larger --seq-len",
        )
    if seq_len > lm.max_positions:
        raise LmscopeError(
            f"--seq-len {seq_len} is longer than this model's context of {lm.max_positions}",
            f"pass --seq-len {lm.max_positions} or less",
        )
    done = 0
    index = 0
    for doc, text in enumerate(documents):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body_len):
            chunk = ids[start : start + body_len]
            if max_tokens is not None:
                room = max_tokens - done - len(prefix) - len(suffix)
                if room < 1:
                    return
                chunk = chunk[:room]
            window = tuple(prefix + chunk + suffix)
            yield Window(index, doc, start, window)
            index += 1
            done += len(window)


def batches(stream, seq_len: int, batch_tokens: int) -> Iterator[list[Window]]:
    """Forward batches, formed from the window stream alone (never from shard boundaries).

    Full windows go ``batch_tokens // seq_len`` to a batch; a shorter window (a document's tail) is a
    batch of its own. Batches therefore have the same members and shapes however the scan is sharded or
    distributed, so every activation is computed by the same kernels and top-k is identical.
    """
    per_batch = max(1, batch_tokens // seq_len)
    full: list[Window] = []
    for w in stream:
        if len(w.ids) < seq_len:
            yield [w]
            continue
        full.append(w)
        if len(full) == per_batch:
            yield full
            full = []
    if full:
        yield full
