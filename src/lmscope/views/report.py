"""The ``inspect`` report: attention, activations and logit lens for one run, as HTML and PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import attention as A
from . import plots
from .html import Report


def _lens(run, k: int = 5):
    if not run.lm.is_causal or run.lm.family.unembed is None:
        return None
    if not all(f"blocks.{i}.resid_post" in run.tensors for i in range(run.lm.n_layers)):
        return None
    from ..explain.lens import logit_lens

    key = f"_logit_lens_k{k}"  # the report and the PNGs share one computation (a vocabulary-wide matmul per layer)
    if key not in run.meta:
        run.meta[key] = logit_lens(run.lm, run, k=k)
    return run.meta[key]


#: next-token predictions listed, in the report and in run.json alike
N_PREDICTIONS = 10


def _show(token: str) -> str:
    """A token as every widget shows it: · for a space, ↵ for a newline (a " " token is not a blank row)."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")


def inspect_report(run, index: int = 0, embedded: bool = False, lens_k: int = 5) -> str:
    return build_inspect_report(run, index, lens_k).render(embedded=embedded)


def build_inspect_report(
    run, index: int = 0, lens_k: int = 5, layer: int | None = None, head: int | str | None = None
) -> Report:
    """The inspect report; ``layer`` / ``head`` (a number or "mean"): where the attention explorer opens."""
    lm = run.lm
    tokens = run.tokens(index)
    n = len(tokens)
    rep = Report(
        f"lmscope inspect: {lm.name}",
        f"{lm.family.name} family, {lm.n_layers} layers, {lm.n_heads} query / {lm.n_kv_heads} KV heads, "
        f"d_model {lm.d_model}, {lm.n_params() / 1e6:.1f}M parameters · {n} tokens",
    )
    sec = rep.section("Input", "tokens as the model sees them (· = space, ↵ = newline)")
    sec.tokens(tokens, [None] * n, label="tokens")
    if lm.is_causal:
        last = int(run.attention_mask[index].sum()) - 1
        probs = torch.softmax(run.output[index, last].float(), -1)
        top = probs.topk(N_PREDICTIONS)
        sec.table(
            ["next token", "probability"],
            [[_show(lm.tokenizer.decode([int(i)])), float(p)] for p, i in zip(top.values, top.indices)],
            title="prediction at the last position",
        )
    if lm.task == "classifier":
        sec.table(
            ["class", "probability"],
            [[c["label"], c["prob"]] for c in class_distribution(run, index)],
            title="predicted class distribution (softmax of the classifier's logits)",
        )
    if lm.task == "token-classifier":
        labels = token_labels(run, index)
        sec.table(
            ["token", "label", "probability"],
            [[_show(t), c["label"], c["prob"]] for t, c in zip(tokens, labels)],
            title="label of each token",
        )
    if all(f"blocks.{i}.attn.pattern" in run.tensors for i in range(lm.n_layers)):
        note = "pick a view, a layer and a head; hover shows the attention weight (query → key)"
        if lm.n_kv_heads != lm.n_heads:
            note += f"; grouped-query attention: {lm.n_heads // lm.n_kv_heads} query heads share each KV head"
        where = {"layer": layer} if layer is not None else {}
        if head is not None:
            where["head"] = head
        rep.section("Attention", note).add(A.attention_widget(run, index, **where))
    if all(f"blocks.{i}.resid_post" in run.tensors for i in range(lm.n_layers)):
        sec = rep.section(
            "Activations",
            "residual stream norm after each block; MLP neurons with the largest mean |activation|",
        )
        norms = A.residual_norms(run, index)
        sec.heatmap(
            norms,
            x_labels=tokens,
            y_labels=[str(i) for i in range(lm.n_layers)],
            title="residual stream norm",
            x_title="token",
            y_title="layer",
            log=True,
            controls=["first", "log"],
        )
        if all(f"blocks.{i}.mlp.hidden" in run.tensors for i in range(lm.n_layers)):
            options = []
            for layer in range(lm.n_layers):
                acts, ids = A.top_neurons(run, layer, index)
                options.append(
                    (
                        f"layer {layer}",
                        {
                            "type": "heatmap",
                            "z": acts.T.round(4).tolist(),
                            "x_labels": tokens,
                            "y_labels": [f"n{i}" for i in ids],
                            "x_title": "token",
                            "y_title": "neuron",
                            "diverging": True,
                            "title": f"layer {layer}: top {len(ids)} neurons",
                        },
                    )
                )
            sec.choice(options, label="MLP layer")
    lens = _lens(run, lens_k)
    if lens is not None:
        sec = rep.section(
            "Logit lens",
            "each layer's residual stream through the final norm and unembedding: the top prediction per position "
            "(cell text) and its probability (color); hover shows the top-k",
        )
        probs = np.asarray(lens.top_probs)[:, :, 0]
        cell = [[lens.top_tokens[i][j][0] for j in range(n)] for i in range(lm.n_layers)]
        hover = [
            [
                "\n".join(
                    f"{t!r} {p:.3f}"
                    for t, p in zip(lens.top_tokens[i][j], np.asarray(lens.top_probs)[i, j].tolist())
                )
                for j in range(n)
            ]
            for i in range(lm.n_layers)
        ]
        sec.heatmap(
            probs,
            x_labels=tokens,
            y_labels=[str(i) for i in range(lm.n_layers)],
            title="top-1 prediction per layer",
            x_title="position",
            y_title="layer",
            cell_text=cell,
            hover=hover,
            value_range=(0, 1),
            cell=60,
        )
        final = np.asarray(lens.final_token_prob)[:, -1]
        final_tok = lens.top_tokens[-1][n - 1][0]
        sec.lines(
            [{"name": f"p({final_tok!r})", "x": list(range(lm.n_layers)), "y": final}],
            title=(f"probability of the final prediction {final_tok!r} at the last position, by layer"),
            x_title="layer",
            y_title="probability",
        )
    return rep


def save_pngs(
    run, out: str | Path, index: int = 0, layer: int | None = None, head: int | str = "mean"
) -> list[str]:
    """Write the static figures; return their file names."""
    out = Path(out)
    lm = run.lm
    written = []

    def save(fig, name):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    tokens = run.tokens(index)
    if all(f"blocks.{i}.attn.pattern" in run.tensors for i in range(lm.n_layers)):
        att, _ = A.patterns(run, index)
        layer = lm.n_layers - 1 if layer is None else layer
        save(
            plots.attention_head(att, tokens, layer, head),
            f"attention_L{layer}_{'mean' if head == 'mean' else f'H{head}'}.png",
        )
        save(plots.model_view(att, tokens), "attention_model_view.png")
        save(plots.head_view(att, tokens, layer, head), f"attention_head_view_L{layer}.png")
    if all(f"blocks.{i}.resid_post" in run.tensors for i in range(lm.n_layers)):
        save(plots.residual_norms(A.residual_norms(run, index), tokens), "residual_norms.png")
    mid = lm.n_layers // 2
    if f"blocks.{mid}.mlp.hidden" in run.tensors:
        acts, ids = A.top_neurons(run, mid, index)
        save(plots.top_neurons(acts, ids, tokens, mid), f"mlp_neurons_L{mid}.png")
    lens = _lens(run)
    if lens is not None:
        cell = [[lens.top_tokens[i][j][0] for j in range(len(tokens))] for i in range(lm.n_layers)]
        probs = np.asarray(lens.top_probs)[:, :, 0]
        save(
            plots.logit_lens(probs, cell, tokens, np.asarray(lens.final_token_prob)[:, -1]), "logit_lens.png"
        )
    return written


def class_distribution(run, index: int = 0) -> list[dict]:
    """A sequence classifier's class probabilities, most likely first."""
    probs = torch.softmax(run.output[index].float(), -1)
    order = torch.argsort(probs, descending=True)
    return [
        {"label": run.lm.labels[int(i)], "index": int(i), "prob": round(float(probs[i]), 5)} for i in order
    ]


def token_labels(run, index: int = 0) -> list[dict]:
    """A token classifier's most likely label per (unpadded) token."""
    keep = run.attention_mask[index].bool()
    probs = torch.softmax(run.output[index][keep].float(), -1)
    top = probs.max(-1)
    return [
        {"label": run.lm.labels[int(i)], "prob": round(float(p), 5)} for p, i in zip(top.values, top.indices)
    ]


def inspect_summary(run) -> dict:
    """run.json of ``lmscope inspect``: tokens, shapes, per-layer entropy and norms, the prediction."""
    lm = run.lm
    s = run.summary()
    s["n_tokens"] = len(s["tokens"][0])
    s["n_params"] = lm.n_params()
    layers = []
    for i in range(lm.n_layers):
        row = {"layer": i}
        p = run.tensors.get(f"blocks.{i}.attn.pattern")
        if p is not None:
            ent = -(p.clamp_min(1e-12).log() * p).sum(-1)  # [b, h, q]
            row["attention_entropy_mean"] = round(float(ent[0].mean()), 4)
            row["attention_entropy_per_head"] = [round(float(x), 4) for x in ent[0].mean(-1)]
        r = run.tensors.get(f"blocks.{i}.resid_post")
        if r is not None:
            row["resid_norm_mean"] = round(float(r[0].norm(dim=-1).mean()), 4)
        layers.append(row)
    s["layers"] = layers
    if lm.task == "classifier":
        s["classes"] = class_distribution(run)
        s["predicted_label"] = s["classes"][0]["label"]
    if lm.task == "token-classifier":
        s["token_labels"] = token_labels(run)
    if lm.is_causal:
        last = int(run.attention_mask[0].sum()) - 1
        probs = torch.softmax(run.output[0, last].float(), -1).topk(N_PREDICTIONS)
        s["prediction"] = [
            {"token": lm.tokenizer.decode([int(i)]), "prob": round(float(p), 5)}
            for p, i in zip(probs.values, probs.indices)
        ]
    return s
