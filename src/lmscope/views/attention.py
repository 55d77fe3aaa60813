"""Pack captured attention patterns for the interactive views (compact, readable at 512 tokens)."""

from __future__ import annotations

import base64

import numpy as np
import torch

#: above this many tokens, views pool the sequence into this many bins (each bin labelled by its span)
MAX_VIEW_TOKENS = 96


def patterns(run, index: int = 0) -> tuple[np.ndarray, list[str]]:
    """[layers, heads, n, n] probabilities for batch item ``index`` (padding removed), and its tokens.

    Layers with fewer heads (after pruning) are padded with zero heads so the grid stays rectangular.
    """
    lm = run.lm
    keep = run.attention_mask[index].bool()
    tokens = run.tokens(index)
    n = len(tokens)
    layers = [run.tensors[f"blocks.{i}.attn.pattern"][index] for i in range(lm.n_layers)]
    max_heads = max(p.shape[0] for p in layers)
    out = np.zeros((lm.n_layers, max_heads, n, n), dtype=np.float32)
    for i, p in enumerate(layers):
        p = p[:, keep][:, :, keep] if p.shape[-1] != n else p
        out[i, : p.shape[0]] = p.float().numpy()
    return out, tokens


def pool(att: np.ndarray, tokens: list[str], max_tokens: int = MAX_VIEW_TOKENS):
    """Pool a long sequence into ``max_tokens`` bins: mean over query rows, sum over key columns.

    Rows still sum to 1 (attention mass per key bin). Labels say which tokens a bin holds.
    """
    n = att.shape[-1]
    if n <= max_tokens:
        return att, tokens, None
    bins = np.array_split(np.arange(n), max_tokens)
    pooled = np.stack([att[..., b, :].mean(-2) for b in bins], axis=-2)
    pooled = np.stack([pooled[..., b].sum(-1) for b in bins], axis=-1)
    labels = [f"{b[0]}–{b[-1]} {tokens[b[0]].strip()[:8]}…" for b in bins]
    note = f"{n} tokens pooled into {max_tokens} bins of ~{n // max_tokens} (rows: mean over query tokens, columns: attention mass)"
    return pooled, labels, note


def attention_widget(
    run, index: int = 0, layer: int = 0, head: int = 0, max_tokens: int = MAX_VIEW_TOKENS
) -> dict:
    att, tokens = patterns(run, index)
    att, labels, note = pool(att, tokens, max_tokens)
    packed = np.clip(np.round(np.sqrt(np.clip(att, 0, 1)) * 255), 0, 255).astype(np.uint8)
    lm = run.lm
    kv = [lm.kv_group(h) for h in range(att.shape[1])] if lm.n_kv_heads != lm.n_heads else None
    return {
        "type": "attention",
        "n_layers": att.shape[0],
        "n_heads": att.shape[1],
        "n": att.shape[-1],
        "labels": labels,
        "packed": base64.b64encode(packed.tobytes()).decode(),
        "kv_groups": kv,
        "layer": layer,
        "head": head,
        "note": (note + ". " if note else "") + "values are stored to ~3 significant digits",
    }


def residual_norms(run, index: int = 0) -> np.ndarray:
    """[layers, tokens] L2 norm of the residual stream after each block."""
    keep = run.attention_mask[index].bool()
    rows = [run.tensors[f"blocks.{i}.resid_post"][index][keep].norm(dim=-1) for i in range(run.lm.n_layers)]
    return torch.stack(rows).float().numpy()


def top_neurons(run, layer: int, index: int = 0, k: int = 16) -> tuple[np.ndarray, list[int]]:
    """[tokens, k] activations of the k neurons with the largest mean |activation| in ``layer``."""
    keep = run.attention_mask[index].bool()
    h = run.tensors[f"blocks.{layer}.mlp.hidden"][index][keep].float()
    idx = h.abs().mean(0).topk(min(k, h.shape[-1])).indices
    return h[:, idx].numpy(), idx.tolist()
