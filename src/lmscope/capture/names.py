"""Capture names: the contract other tools rely on, one table of every site's shape, and glob selection."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LmscopeError


@dataclass(frozen=True)
class Site:
    """One capture site: its name (per block, after ``blocks.{i}.``, or global), shape and meaning."""

    name: str
    shape: str
    what: str
    numel: Callable  # (lm, layer, batch, seq) -> number of values
    per_block: bool = True
    moe_only: bool = False
    dense_only: bool = False


def _d(lm, layer, b, s):
    return b * s * lm.d_model


def _heads_sq(lm, layer, b, s):
    return b * lm.n_heads_at(layer) * s * s


def _heads_hd(lm, layer, b, s):
    return b * s * lm.n_heads_at(layer) * lm.head_dim


def _kv_hd(lm, layer, b, s):
    return b * s * lm.n_kv_heads_at(layer) * lm.head_dim


#: every site, in forward order
SITES: tuple[Site, ...] = (
    Site("embed", "[b, pos, d_model]", "token embedding output", _d, per_block=False),
    Site("resid_pre", "[b, pos, d_model]", "residual stream into the block", _d),
    Site(
        "attn.q",
        "[b, heads, pos, head_dim]",
        "queries as they enter attention (after rotary / q-norm)",
        _heads_hd,
    ),
    Site("attn.k", "[b, kv_heads, pos, head_dim]", "keys as they enter attention", _kv_hd),
    Site("attn.v", "[b, kv_heads, pos, head_dim]", "values as they enter attention", _kv_hd),
    Site("attn.scores", "[b, heads, q, k]", "pre-softmax scores (masked entries are −inf)", _heads_sq),
    Site("attn.pattern", "[b, heads, q, k]", "softmax probabilities", _heads_sq),
    Site("attn.head_out", "[b, pos, heads, head_dim]", "per-head input of the output projection", _heads_hd),
    Site("attn.out", "[b, pos, d_model]", "attention output (after the output projection)", _d),
    Site(
        "resid_mid", "[b, pos, d_model]", "residual stream between attention and MLP (sequential blocks)", _d
    ),
    Site(
        "mlp.router",
        "[b, pos, experts]",
        "MoE router probabilities (softmax of the router logits)",
        lambda lm, layer, b, s: b * s * lm.n_experts,
        moe_only=True,
    ),
    Site(
        "mlp.experts",
        "[b, pos, top_k]",
        "MoE experts chosen per token (indices)",
        lambda lm, layer, b, s: b * s * lm.experts_per_token,
        moe_only=True,
    ),
    Site(
        "mlp.hidden",
        "[b, pos, d_mlp]",
        "post-activation MLP neurons",
        lambda lm, layer, b, s: b * s * lm.d_mlp_at(layer),
        dense_only=True,
    ),
    Site("mlp.out", "[b, pos, d_model]", "MLP (or MoE block) output", _d),
    Site("resid_post", "[b, pos, d_model]", "residual stream out of the block", _d),
    Site(
        "logits",
        "[b, pos, vocab]",
        "next-token logits (causal LMs only)",
        lambda lm, layer, b, s: b * s * lm.vocab_size,
        per_block=False,
    ),
)
SITE = {s.name: s for s in SITES}
BLOCK_NAMES = tuple(s.name for s in SITES if s.per_block)
GLOBAL_NAMES = tuple(s.name for s in SITES if not s.per_block)
ATTENTION_INTERNALS = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern")

DEFAULT_CAPTURE = ("blocks.*.attn.pattern", "blocks.*.resid_post", "logits")


def default_capture(has_logits: bool) -> tuple[str, ...]:
    """What ``inspect`` records when not told: every layer's pattern and residual stream (+ logits)."""
    return DEFAULT_CAPTURE if has_logits else DEFAULT_CAPTURE[:-1]


def block_names(moe: bool = False) -> tuple[str, ...]:
    return tuple(
        s.name for s in SITES if s.per_block and not (s.moe_only and not moe) and not (s.dense_only and moe)
    )


def all_names(n_layers: int, has_logits: bool = True, moe: bool = False) -> list[str]:
    names = ["embed"]
    per_block = block_names(moe)
    for i in range(n_layers):
        names += [f"blocks.{i}.{n}" for n in per_block]
    if has_logits:
        names.append("logits")
    return names


def expand(
    patterns: str | list[str] | tuple[str, ...], n_layers: int, has_logits: bool = True, moe: bool = False
) -> list[str]:
    """Resolve glob patterns (``blocks.*.attn.pattern``) to concrete names, in forward order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    universe = all_names(n_layers, has_logits, moe)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in universe if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise LmscopeError(
                f"capture name '{pat}' matches nothing in this model ({n_layers} layers)",
                f"use names like 'embed', 'blocks.0.attn.pattern', 'blocks.*.resid_post', 'logits' "
                f"(per block: {', '.join(block_names(moe))}; layers 0..{n_layers - 1})",
            )
        chosen.update(hits)
    return [n for n in universe if n in chosen]


def split(name: str) -> tuple[int | None, str]:
    """``blocks.3.attn.pattern`` -> (3, 'attn.pattern'); ``logits`` -> (None, 'logits')."""
    if name.startswith("blocks."):
        _, idx, rest = name.split(".", 2)
        return int(idx), rest
    return None, name


def numel(lm, name: str, batch: int, seq: int) -> int:
    """Values a capture of ``name`` holds for a [batch, seq] input."""
    layer, what = split(name)
    return SITE[what].numel(lm, layer, batch, seq)
