"""Token attributions merged into words for reading, and the attribution mass on given character spans.

Each token belongs to exactly one unit (the word holding its first non-space character, or a unit of its
own for special tokens and tokens outside the text), and a word's score is the sum of its tokens' scores,
so merging never changes the total attribution.
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+|[^\w\s]")


def merge_words(tokens: list[str], scores: list[float], spans: list, text: str) -> list[dict]:
    """Units in order: {"text", "score", "tokens": [token indices], "span": [start, end] or None}. A
    word's span grows to cover its tokens' characters (a token "'s" counted under "'" shows as "'s")."""
    words = [(m.start(), m.end()) for m in WORD.finditer(text)]
    units: list[dict] = []
    by_word: dict[int, dict] = {}
    w = 0
    for i, (tok, score, span) in enumerate(zip(tokens, scores, spans)):
        if span is None:
            units.append({"text": tok, "score": float(score), "tokens": [i], "span": None})
            continue
        start, end = span
        first = start
        while first < end and text[first].isspace():
            first += 1
        while w < len(words) and words[w][1] <= first:  # spans arrive in order: walk the words once
            w += 1
        if w < len(words) and words[w][0] <= first < words[w][1]:
            if w in by_word:
                unit = by_word[w]
                unit["score"] += float(score)
                unit["tokens"].append(i)
            else:
                unit = {"score": float(score), "tokens": [i], "span": [words[w][0], words[w][1]]}
                by_word[w] = unit
                units.append(unit)
            # a token running past its word ("'s" after "'") widens the unit: no character goes unshown
            unit["span"][1] = max(unit["span"][1], end)
            unit["text"] = text[unit["span"][0] : unit["span"][1]]
        else:  # a whitespace-only token: a unit of its own
            units.append({"text": tokens[i], "score": float(score), "tokens": [i], "span": [start, end]})
    return units


def token_units(tokens: list[str], scores: list[float], spans: list) -> list[dict]:
    return [
        {"text": t, "score": float(s), "tokens": [i], "span": list(sp) if sp else None}
        for i, (t, s, sp) in enumerate(zip(tokens, scores, spans))
    ]


def mass_on(
    scores: list[float], spans: list, targets: list[tuple[int, int]], special: list[bool]
) -> float | None:
    """Share of the absolute attribution on the case's text (tokens with a span, special tokens and a prompt
    template's tokens left out) that sits on tokens overlapping ``targets``."""
    inside = [(abs(s), span) for s, span, sp in zip(scores, spans, special) if span is not None and not sp]
    total = sum(a for a, _ in inside)
    if total == 0:
        return None
    on = sum(a for a, span in inside if any(span[0] < e and s0 < span[1] for s0, e in targets))
    return on / total
