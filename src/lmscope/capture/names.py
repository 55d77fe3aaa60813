"""Capture names: the contract other tools rely on, and glob selection over them."""

from __future__ import annotations

import fnmatch

from ..errors import LmscopeError

#: per-block names, in forward order
BLOCK_NAMES = (
    "resid_pre",
    "attn.scores",
    "attn.pattern",
    "attn.head_out",
    "attn.out",
    "mlp.hidden",
    "mlp.out",
    "resid_post",
)
GLOBAL_NAMES = ("embed", "logits")

DEFAULT_CAPTURE = ("blocks.*.attn.pattern", "blocks.*.resid_post", "logits")


def default_capture(has_logits: bool) -> tuple[str, ...]:
    """What ``inspect`` records when not told: every layer's pattern and residual stream (+ logits)."""
    return DEFAULT_CAPTURE if has_logits else DEFAULT_CAPTURE[:-1]


def all_names(n_layers: int, has_logits: bool = True) -> list[str]:
    names = ["embed"]
    for i in range(n_layers):
        names += [f"blocks.{i}.{n}" for n in BLOCK_NAMES]
    if has_logits:
        names.append("logits")
    return names


def expand(patterns: str | list[str] | tuple[str, ...], n_layers: int, has_logits: bool = True) -> list[str]:
    """Resolve glob patterns (``blocks.*.attn.pattern``) to concrete names, in forward order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    universe = all_names(n_layers, has_logits)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in universe if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise LmscopeError(
                f"capture name '{pat}' matches nothing in this model ({n_layers} layers)",
                f"use names like 'embed', 'blocks.0.attn.pattern', 'blocks.*.resid_post', 'logits' "
                f"(per block: {', '.join(BLOCK_NAMES)}; layers 0..{n_layers - 1})",
            )
        chosen.update(hits)
    return [n for n in universe if n in chosen]


def split(name: str) -> tuple[int | None, str]:
    """``blocks.3.attn.pattern`` -> (3, 'attn.pattern'); ``logits`` -> (None, 'logits')."""
    if name.startswith("blocks."):
        _, idx, rest = name.split(".", 2)
        return int(idx), rest
    return None, name
