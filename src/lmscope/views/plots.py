"""Static figures (matplotlib, Agg backend: no display needed). Each function returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .attention import pool  # noqa: E402

MAX_LABELS = 48


def _show(t: str) -> str:
    return t.replace("\n", "↵").replace("\t", "⇥")


def _ticks(ax, labels, axis: str) -> None:
    n = len(labels)
    if n <= MAX_LABELS:
        pos, text = range(n), [_show(t) for t in labels]
    else:  # long inputs: a few index ticks, never 512 labels
        step = int(np.ceil(n / 16))
        pos = range(0, n, step)
        text = [str(i) for i in pos]
    if axis == "x":
        ax.set_xticks(list(pos), text, rotation=90 if n <= MAX_LABELS else 0, fontsize=7)
    else:
        ax.set_yticks(list(pos), text, fontsize=7)


def attention_head(att: np.ndarray, tokens: list[str], layer: int, head: int | str):
    """Heatmap of one head's pattern (or the mean of a layer's heads when ``head == 'mean'``)."""
    m = att[layer].mean(0) if head == "mean" else att[layer, head]
    n = len(tokens)
    size = min(9, 3 + n * 0.12)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    _ticks(ax, tokens, "x")
    _ticks(ax, tokens, "y")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"attention, layer {layer}, {'mean of heads' if head == 'mean' else f'head {head}'}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def model_view(att: np.ndarray, tokens: list[str]):
    """Grid of every layer x head pattern (long inputs pooled)."""
    att, _, _ = pool(att, tokens, 64)
    layers, heads = att.shape[:2]
    fig, axes = plt.subplots(layers, heads, figsize=(heads * 0.9, layers * 0.9), squeeze=False)
    for i in range(layers):
        for h in range(heads):
            ax = axes[i, h]
            ax.imshow(np.sqrt(att[i, h]), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(str(i), fontsize=6, rotation=0, labelpad=8)
            if i == 0:
                ax.set_title(f"h{h}", fontsize=7)
    fig.suptitle("model view: layers (rows) x heads (columns)", fontsize=9, y=1 - 0.1 / (layers * 0.9))
    height = layers * 0.9
    fig.subplots_adjust(wspace=0.05, hspace=0.05, top=1 - 0.45 / height, bottom=0.1 / height)
    return fig


def head_view(att: np.ndarray, tokens: list[str], layer: int, head: int | str, window: int = 40):
    """bertviz-style lines from each query token (left) to the keys it attends to (right)."""
    m = att[layer].mean(0) if head == "mean" else att[layer, head]
    n = len(tokens)
    start = max(0, n - window)
    idx = range(start, n)
    fig, ax = plt.subplots(figsize=(5, 0.22 * len(idx) + 1))
    for q in idx:
        for k in idx:
            w = m[q, k]
            if w >= 0.02:
                ax.plot(
                    [0, 1],
                    [q - start, k - start],
                    color="#2166ac",
                    alpha=float(min(1, w)),
                    lw=0.5 + 2 * float(w),
                )
    for i in idx:
        ax.text(
            -0.02, i - start, _show(tokens[i])[:18], ha="right", va="center", fontsize=7, family="monospace"
        )
        ax.text(
            1.02, i - start, _show(tokens[i])[:18], ha="left", va="center", fontsize=7, family="monospace"
        )
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(len(idx) - 0.5, -0.5)
    ax.axis("off")
    title = f"head view, layer {layer}, {'mean' if head == 'mean' else f'head {head}'}"
    if start:
        title += f" (last {window} of {n} tokens)"
    ax.set_title(title, fontsize=9)
    return fig


def residual_norms(norms: np.ndarray, tokens: list[str]):
    """Token x layer heatmap of the residual-stream norm."""
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.25 * len(tokens)), 0.18 * norms.shape[0] + 1.5))
    from matplotlib.colors import LogNorm

    im = ax.imshow(norms, cmap="viridis", aspect="auto", interpolation="nearest", norm=LogNorm())
    _ticks(ax, tokens, "x")
    ax.set_ylabel("layer")
    ax.set_title("residual stream norm after each block (log color scale)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def top_neurons(acts: np.ndarray, neuron_ids: list[int], tokens: list[str], layer: int):
    """Tokens x top neurons of one MLP layer."""
    fig, ax = plt.subplots(figsize=(0.4 * len(neuron_ids) + 2.5, min(12, 0.22 * len(tokens) + 1.5)))
    a = float(np.abs(acts).max()) or 1.0
    im = ax.imshow(acts, cmap="RdBu_r", vmin=-a, vmax=a, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(neuron_ids)), [str(i) for i in neuron_ids], rotation=90, fontsize=7)
    _ticks(ax, tokens, "y")
    ax.set_xlabel("neuron")
    ax.set_title(f"layer {layer}: most active MLP neurons")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def logit_lens(probs: np.ndarray, top_tokens: list[list[str]], tokens: list[str], final_prob: np.ndarray):
    """Left: top-1 prediction per (layer, position), colored by its probability. Right: p(final) by layer."""
    layers, n = probs.shape
    show = slice(max(0, n - 16), n)  # the last 16 positions are what a reader checks
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 0.25 * layers + 2), gridspec_kw={"width_ratios": [3, 1]})
    sub = probs[:, show]
    ax.imshow(sub, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    cols = list(range(n))[show]
    for i in range(layers):
        for j, c in enumerate(cols):
            ax.text(
                j,
                i,
                _show(top_tokens[i][c])[:7],
                ha="center",
                va="center",
                fontsize=5.5,
                color="white" if sub[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(cols)), [_show(tokens[c])[:10] for c in cols], rotation=60, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top-1 next-token prediction per layer (color = probability)")
    ax2.plot(final_prob, range(layers), marker="o", ms=3)
    ax2.set_ylim(layers - 0.5, -0.5)
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("p(final prediction)")
    ax2.set_title("last position", fontsize=9)
    fig.tight_layout()
    return fig
