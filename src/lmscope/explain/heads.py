"""Attention heads: how much each one matters (importance) and what it does (characterization).

Importance over a text set (default: ``lmscope.data.builtin_text()``), per head:
- ``ablation_zero`` / ``ablation_mean``: loss with that head's output (``attn.head_out``) set to zero /
  to its mean over the text set positions, minus the clean loss (Δ nats per token);
- ``grad_importance``: Michel et al. 2019, |∂L/∂mask_h| for a mask multiplying the head's output,
  averaged (of the absolute value) over text windows.
Ablations run batched: one batch per layer where each row ablates a different head, and the blocks
before that layer are replayed from the clean run rather than recomputed.

Characterization, per head (attention pattern statistics, 0..1):
- ``induction``: on random token sequences repeated twice, attention from the second copy to the
  token after the previous occurrence of the current token;
- ``previous_token``, ``first_token`` (attention sink), ``self``: on the text windows.

Encoders (no LM head) use a stand-in loss: the cosine distance of the mean-pooled last hidden state
to the clean one for ablations, and random projections of it for the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture.session import hooks
from ..data import token_windows
from ..errors import LmscopeError
from .replay import base_forward, check_layers, record_block_outputs, replay_blocks, unembed

#: metric names: importance (Δ loss / gradient) and characterization (attention fractions)
IMPORTANCE = ("ablation_zero", "ablation_mean", "grad_importance")
PATTERNS = ("induction", "previous_token", "first_token", "self")
METHODS = {"zero": "ablation_zero", "mean": "ablation_mean", "grad": "grad_importance"}
#: approximate metrics (attribution patching): estimates of the ablation metrics, and how much their
#: per-position terms cancel; present only when asked for (``approx="atp"``)
APPROX = (
    "atp_zero",
    "atp_mean",
    "atp_zero_cancellation",
    "atp_mean_cancellation",
    "atp_zero_graddrop",
    "atp_mean_graddrop",
)
#: ``approx`` values: plain AtP, or AtP plus GradDrop's magnitudes (AtP*'s fix for cancelling paths)
APPROX_MODES = (None, "atp", "atp-graddrop")
APPROX_NOTES = {
    "atp_zero": "APPROXIMATE (attribution patching): first-order estimate of ablation_zero",
    "atp_mean": "APPROXIMATE (attribution patching): first-order estimate of ablation_mean",
    "atp_zero_cancellation": "1 − |Σ_pos e| / Σ_pos |e| of atp_zero's per-position terms (1 = they cancel)",
    "atp_mean_cancellation": "1 − |Σ_pos e| / Σ_pos |e| of atp_mean's per-position terms (1 = they cancel)",
    "atp_zero_graddrop": "APPROXIMATE (AtP + GradDrop): estimate of |ablation_zero| robust to cancelling paths",
    "atp_mean_graddrop": "APPROXIMATE (AtP + GradDrop): estimate of |ablation_mean| robust to cancelling paths",
}


@dataclass
class HeadScores:
    """Per-head scores: ``scores[metric]`` is a float array [layers, heads] (NaN where not computed).

    ``argmax_fraction[metric]`` (pattern metrics only): the fraction of positions where that head's
    strongest attention goes to the position the metric names.
    """

    model: str
    n_layers: int
    n_heads: int  # max query heads per layer
    heads_per_layer: list[int]
    kv_heads: list[list[int]]  # [layer][head] -> the KV head it reads
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    argmax_fraction: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, metric: str) -> np.ndarray:
        return self.scores[metric]

    def ranking(self, metric: str = "ablation_mean", descending: bool = True) -> list[tuple[int, int]]:
        """(layer, head) pairs ordered by ``metric`` (most important first); NaN heads are left out."""
        if metric not in self.scores:
            raise LmscopeError(f"no '{metric}' scores here", f"computed: {', '.join(self.scores) or 'none'}")
        a = self.scores[metric]
        pairs = [(i, h) for i in range(self.n_layers) for h in range(self.heads_per_layer[i])]
        pairs = [p for p in pairs if not np.isnan(a[p])]
        return sorted(pairs, key=lambda p: a[p], reverse=descending)

    def kv_groups(self, layer: int) -> list[list[int]]:
        """Query heads grouped by the KV head they share (grouped-query attention)."""
        groups: dict[int, list[int]] = {}
        for h, kv in enumerate(self.kv_heads[layer]):
            groups.setdefault(kv, []).append(h)
        return [groups[k] for k in sorted(groups)]

    def merge(self, other: HeadScores) -> HeadScores:
        """These scores plus ``other``'s (same model); ``other`` wins on a metric both have."""
        return HeadScores(
            self.model,
            self.n_layers,
            self.n_heads,
            self.heads_per_layer,
            self.kv_heads,
            {**self.scores, **other.scores},
            {**self.argmax_fraction, **other.argmax_fraction},
            {**self.meta, **other.meta},
        )

    def summary(self, layer: int, head: int) -> str:
        return summarize_head(self, layer, head)

    def to_json(self) -> dict:
        heads = []
        for i in range(self.n_layers):
            for h in range(self.heads_per_layer[i]):
                row = {"layer": i, "head": h, "kv_head": self.kv_heads[i][h]}
                for m in IMPORTANCE + PATTERNS:
                    row[m] = _num(self.scores[m][i, h]) if m in self.scores else None
                for m in APPROX:
                    if m in self.scores:
                        row[m] = _num(self.scores[m][i, h])
                row["shares_kv_with"] = [g for g in _group_of(self, i, h) if g != h]
                row["summary"] = self.summary(i, h)
                heads.append(row)
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "heads_per_layer": self.heads_per_layer,
            "kv_groups": [self.kv_groups(i) for i in range(self.n_layers)],
            "metrics": {
                "ablation_zero": "loss with the head's output zeroed minus clean loss (nats/token)",
                "ablation_mean": "loss with the head's output set to its mean minus clean loss (nats/token)",
                "grad_importance": "|dL/dmask| for a mask multiplying the head's output (Michel et al. 2019)",
                "induction": "attention to the token after the previous occurrence (repeated random tokens)",
                "previous_token": "attention to the previous position",
                "first_token": "attention to the first position (attention sink)",
                "self": "attention to its own position",
                **{m: APPROX_NOTES[m] for m in APPROX if m in self.scores},
            },
            **self.meta,
            "heads": heads,
        }


def _group_of(scores: HeadScores, layer: int, head: int) -> list[int]:
    kv = scores.kv_heads[layer][head]
    return [h for h, k in enumerate(scores.kv_heads[layer]) if k == kv]


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 6)


def _empty(lm, metrics: Sequence[str], meta: dict | None = None) -> HeadScores:
    per_layer = [lm.n_heads_at(i) for i in range(lm.n_layers)]
    n_heads = max(per_layer)
    # kv_group numbers heads of the unpruned model; after pruning, fall back to per-layer groups
    kv = [
        [
            lm.kv_group(h) if per_layer[i] == lm.n_heads else h // max(1, per_layer[i] // lm.n_kv_heads_at(i))
            for h in range(per_layer[i])
        ]
        for i in range(lm.n_layers)
    ]
    return HeadScores(
        model=lm.name,
        n_layers=lm.n_layers,
        n_heads=n_heads,
        heads_per_layer=per_layer,
        kv_heads=kv,
        scores={m: np.full((lm.n_layers, n_heads), np.nan) for m in metrics},
        meta=dict(meta or {}),
    )


# -- losses -------------------------------------------------------------------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the model runs in float64 (finite-difference checks)."""
    return t if t.dtype == torch.float64 else t.float()


def _pool(hidden: torch.Tensor) -> torch.Tensor:
    return _wide(hidden).mean(dim=1)


def _row_losses(lm, hidden: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None):
    """Per-row loss: mean next-token cross-entropy (causal) or cosine distance to ``reference`` (encoder)."""
    if not lm.is_causal:
        pooled = _pool(hidden)
        return 1.0 - torch.nn.functional.cosine_similarity(pooled, reference[: len(pooled)], dim=-1)
    losses = []
    chunk = max(1, 4096 // hidden.shape[1])  # keeps the [rows, pos, vocab] logits small
    for start in range(0, hidden.shape[0], chunk):
        logits = _wide(unembed(lm, hidden[start : start + chunk, :-1]))
        losses.append(next_token_ce(logits, ids[start : start + chunk, 1:]).mean(dim=1))
    return torch.cat(losses)


def next_token_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position: logits [B, T, V], target [B, T] -> [B, T].

    Rows of vocabulary stay contiguous ([B·T, V]); the class-dim-1 layout ([B, V, T]) that
    ``cross_entropy`` otherwise needs runs ~30× slower on CPU (it was a third of head ablation's time)."""
    b, t, v = logits.shape
    return torch.nn.functional.cross_entropy(
        logits.reshape(b * t, v), target.reshape(b * t), reduction="none"
    ).view(b, t)


def token_losses(lm, input_ids: torch.Tensor, interventions=None) -> torch.Tensor:
    """Next-token cross-entropy per position [batch, pos-1] (no grad), with optional interventions."""
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad(), hooks(lm, (), interventions):
        hidden = base_forward(lm, inputs)
        logits = _wide(unembed(lm, hidden[:, :-1]))
    return next_token_ce(logits, input_ids[:, 1:])


def ablation_interventions(lm, heads: Sequence[tuple[int, int]], mean_values: dict | None = None) -> dict:
    """Interventions that ablate ``heads`` [(layer, head)] in every row: zero, or the mean in ``mean_values``."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def make(layer: int, hs: list[int]):
        def ablate(x, name):
            x = x.clone()
            for h in hs:
                x[:, :, h] = 0.0 if mean_values is None else mean_values[layer][h].to(x.dtype)
            return x

        return ablate

    return {f"blocks.{i}.attn.head_out": make(i, hs) for i, hs in by_layer.items()}


# -- importance ---------------------------------------------------------------------------------
def head_importance(
    lm,
    texts: str | Sequence[str] | None = None,
    max_tokens: int = 64,
    window: int = 64,
    methods: Sequence[str] = ("zero", "mean", "grad"),
    layers: Sequence[int] | None = None,
    input_ids: torch.Tensor | None = None,
    progress=None,
    approx: str | None = None,
    compare_exact: bool = False,
) -> HeadScores:
    """Importance of every head over ``texts`` (default: built-in text), ``max_tokens`` tokens in windows.

    ``methods``: any of ``zero``, ``mean`` (ablation Δloss) and ``grad`` (|∂L/∂mask|). ``layers``
    restricts the ablations and gradients to those layers (others stay NaN). ``input_ids`` [n, len]
    overrides the text. ``progress(done, total)`` is called after each layer of ablations.
    Larger is more important for every metric (a negative Δloss: the model is better without the head).
    ``approx="atp"``: the zero/mean ablations are estimated by attribution patching (``atp_zero``,
    ``atp_mean``: one forward + backward, approximate; see ``explain.atp``) instead of run; with
    ``compare_exact`` they are also run exactly and ``meta["atp_vs_exact"]`` holds the rank correlation.
    ``approx="atp-graddrop"``: also ``atp_zero_graddrop`` / ``atp_mean_graddrop``, AtP*'s GradDrop
    magnitude estimates (about one extra backward pass per layer; ``explain.atp``).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LmscopeError(
            f"unknown head-importance method '{unknown[0] if unknown else ''}'",
            f"use some of: {', '.join(METHODS)}",
        )
    if approx not in APPROX_MODES:
        raise LmscopeError(
            f"unknown approximation '{approx}'",
            "use --approx atp or --approx atp-graddrop (or leave it out: exact)",
        )
    if approx and not lm.is_causal:
        raise LmscopeError(
            "--approx atp needs a causal LM: the encoder stand-in loss is at its minimum on the clean run, "
            "so its gradient (and every first-order estimate) is zero",
            "drop --approx for encoders (exact ablation)",
        )
    layers = check_layers(lm, layers)
    ids = input_ids if input_ids is not None else _windows(lm, texts, max_tokens, window)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    n_win, seq = ids.shape
    result = _empty(
        lm,
        [METHODS[m] for m in methods],
        {"tokens_used": int(ids.numel()), "windows": n_win, "window": seq, "layers_scored": layers},
    )
    if getattr(lm, "task", "lm") == "classifier":
        if approx:
            raise LmscopeError(
                "--approx atp is for causal LMs", "drop --approx for classifiers (exact ablation)"
            )
        return _classifier_importance(lm, result, inputs, layers, methods, progress)

    head_names = [f"blocks.{i}.attn.head_out" for i in layers]
    hidden, blocks, acts = record_block_outputs(lm, inputs, head_names if "mean" in methods else ())
    reference = _pool(hidden) if not lm.is_causal else None
    with torch.no_grad():
        clean = _row_losses(lm, hidden, ids, reference)  # [n_win]
    result.meta["clean_loss"] = round(float(clean.mean()), 6)

    ablate = [m for m in ("zero", "mean") if m in methods]
    if approx and ablate:
        from .atp import GRADDROP_LABEL, LABEL, head_ablation_atp, rank_correlation

        graddrop = approx == "atp-graddrop"
        est = head_ablation_atp(lm, ids, layers, lambda h, i: _row_losses(lm, h, i), ablate, graddrop)
        for mode in ablate:
            result.scores[f"atp_{mode}"] = est[mode]
            result.scores[f"atp_{mode}_cancellation"] = est[f"cancellation_{mode}"]
            if graddrop:
                result.scores[f"atp_{mode}_graddrop"] = est[f"graddrop_{mode}"]
        result.meta["approximate"] = {f"atp_{mode}": LABEL for mode in ablate}
        if graddrop:
            result.meta["approximate"].update({f"atp_{mode}_graddrop": GRADDROP_LABEL for mode in ablate})
        if not compare_exact:
            for mode in ablate:
                del result.scores[METHODS[mode]]
            ablate = []
    for done, layer in enumerate(layers):
        if ablate:
            _ablate_layer(lm, result, layer, ablate, ids, inputs, blocks, acts, clean, reference)
        if progress is not None:
            progress(done + 1, len(layers))
    if approx and compare_exact:
        result.meta["atp_vs_exact"] = {
            f"atp_{m}": rank_correlation(result.scores[f"atp_{m}"], result.scores[METHODS[m]])
            for m in ("zero", "mean")
            if m in methods
        }
        for m in ("zero", "mean"):  # GradDrop estimates a magnitude: compared with |exact|, beside |AtP|
            if f"atp_{m}_graddrop" in result.scores:
                exact_abs = np.abs(result.scores[METHODS[m]])
                result.meta["atp_vs_exact"][f"atp_{m}_graddrop_vs_abs"] = rank_correlation(
                    result.scores[f"atp_{m}_graddrop"], exact_abs
                )
                result.meta["atp_vs_exact"][f"atp_{m}_abs_vs_abs"] = rank_correlation(
                    np.abs(result.scores[f"atp_{m}"]), exact_abs
                )
    if "grad" in methods:
        result.scores["grad_importance"][:] = _grad_importance(lm, ids, layers)
    return result


def _class_loss(lm, inputs, predicted: torch.Tensor, interventions=None, keep_grad=False) -> torch.Tensor:
    """Cross-entropy of the classifier's logits against the class it predicts on the clean input, per row."""
    with hooks(lm, (), interventions, keep_grad=keep_grad):
        logits = _wide(lm.output_of(lm.forward(inputs)))
    return torch.nn.functional.cross_entropy(logits, predicted, reduction="none")


def _classifier_importance(lm, result, inputs, layers, methods, progress) -> HeadScores:
    """Head importance on a sequence classifier's decision: Δ cross-entropy of the clean predicted class when a
    head is zeroed or set to its mean, and |∂loss/∂mask| of a mask on each head (Michel et al.)."""
    with torch.no_grad():
        predicted = lm.output_of(lm.forward(inputs)).argmax(-1)
        clean = _class_loss(lm, inputs, predicted)
    result.meta["clean_loss"] = round(float(clean.mean()), 6)
    result.meta["objective"] = "cross-entropy of the predicted class (classifier)"
    acts = {}
    if "mean" in methods:
        names = [f"blocks.{i}.attn.head_out" for i in layers]
        with torch.no_grad(), hooks(lm, names) as s:
            lm.forward(inputs)
        acts = {i: s.tensors[f"blocks.{i}.attn.head_out"].float().mean(dim=(0, 1)) for i in layers}
    for done, layer in enumerate(layers):
        for mode in [m for m in ("zero", "mean") if m in methods]:
            for h in range(lm.n_heads_at(layer)):
                iv = ablation_interventions(lm, [(layer, h)], acts if mode == "mean" else None)
                with torch.no_grad():
                    loss = _class_loss(lm, inputs, predicted, iv)
                result.scores[METHODS[mode]][layer, h] = float((loss - clean).mean())
        if progress is not None:
            progress(done + 1, len(layers))
    if "grad" in methods:
        gates = {i: torch.ones(lm.n_heads_at(i), requires_grad=True) for i in layers}

        def gate(i):
            return lambda x, name: x * gates[i].to(x.dtype)[None, None, :, None]

        with torch.enable_grad():
            loss = _class_loss(lm, inputs, predicted, {f"blocks.{i}.attn.head_out": gate(i) for i in layers})
            grads = torch.autograd.grad(loss.sum(), [gates[i] for i in layers])
        for i, g in zip(layers, grads):
            result.scores["grad_importance"][i, : len(g)] = (g.abs() / len(loss)).numpy()
    return result


def _windows(lm, texts, max_tokens: int, window: int) -> torch.Tensor:
    if texts is None or isinstance(texts, str):
        return token_windows(lm, texts, max_tokens=max_tokens, window=window)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LmscopeError("the text is empty", "pass some text with --text-file")
    return token_windows(lm, "\n\n".join(texts), max_tokens=max_tokens, window=window)


def _ablate_layer(lm, result, layer, modes, ids, inputs, blocks, acts, clean, reference):
    n_win, seq = ids.shape
    n_h = lm.n_heads_at(layer)
    variants = [(mode, h) for mode in modes for h in range(n_h)]
    mean = None
    if "mean" in modes:
        mean = acts[f"blocks.{layer}.attn.head_out"].float().mean(dim=(0, 1))  # [heads, head_dim]
    # a batch per window keeps memory flat: rows = one ablated head each
    per_variant = torch.zeros(len(variants), dtype=torch.float64)
    rows = len(variants)
    for w in range(n_win):

        def ablate(x, name):
            x = x.clone()
            for r, (mode, h) in enumerate(variants):
                x[r, :, h] = 0.0 if mode == "zero" else mean[h].to(x.dtype)
            return x

        batch = {k: v[w : w + 1].expand(rows, -1) for k, v in inputs.items()}
        index = torch.full((rows,), w, dtype=torch.long)
        ref = reference[w : w + 1].expand(rows, -1) if reference is not None else None
        with (
            torch.no_grad(),
            replay_blocks(lm, layer, blocks, index),
            hooks(lm, (), {f"blocks.{layer}.attn.head_out": ablate}),
        ):
            hidden = base_forward(lm, batch)
            losses = _row_losses(lm, hidden, batch["input_ids"], ref)
        per_variant += (losses - clean[w]).double()
    per_variant /= n_win
    for (mode, h), value in zip(variants, per_variant.tolist()):
        result.scores[METHODS[mode]][layer, h] = value


def _grad_importance(lm, ids: torch.Tensor, layers: list[int], probes: int = 4) -> np.ndarray:
    """Mean over windows of |∂L_window/∂mask| (causal); encoders: RMS over random projections."""
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    out = np.full((lm.n_layers, n_heads), np.nan)
    if not lm.is_causal:  # each window repeated once per random probe direction
        ids = ids.repeat_interleave(probes, dim=0)
    batch_size = max(1, 1024 // ids.shape[1])  # logits and their gradient: ~0.4 GB per 1024 tokens
    total = torch.zeros(len(layers), n_heads, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size]
        b = chunk.shape[0]
        masks = {i: torch.ones(b, lm.n_heads_at(i), dtype=lm.model.dtype, requires_grad=True) for i in layers}

        def scale(x, name, masks=masks):
            layer = int(name.split(".")[1])
            return x * masks[layer][:, None, :, None]

        interventions = {f"blocks.{i}.attn.head_out": scale for i in layers}
        inputs = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        with torch.enable_grad(), hooks(lm, (), interventions, keep_grad=True):
            hidden = base_forward(lm, inputs)
            if lm.is_causal:
                loss = _row_losses(lm, hidden, chunk).sum()
            else:
                probe = torch.randn(b, hidden.shape[-1], generator=gen)
                loss = (_pool(hidden) * probe).sum()
            grads = torch.autograd.grad(loss, [masks[i] for i in layers])
        for j, g in enumerate(grads):
            g = g.double()
            total[j, : g.shape[1]] += (g.abs() if lm.is_causal else g.pow(2)).sum(0)
    total /= ids.shape[0]
    if not lm.is_causal:
        total = total.sqrt()
    for j, i in enumerate(layers):
        out[i, : lm.n_heads_at(i)] = total[j, : lm.n_heads_at(i)].numpy()
    return out


# -- characterization ---------------------------------------------------------------------------
def induction_sequences(lm, n: int = 4, length: int = 48, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``n`` random token sequences, each ``length`` tokens repeated twice (after a BOS token when the
    tokenizer has one). Returns (ids [n, offset + 2*length], offset: where the first copy starts)."""
    tok = lm.tokenizer
    high = min(len(tok), lm.vocab_size)
    low = min(1000, high // 10)  # skip special, byte and unused tokens at the start of most vocabularies
    special = set(tok.all_special_ids)
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(low, high, (n, length), generator=gen)
    for tid in special:  # redraw the rare special token that falls in range
        seqs[seqs == tid] = low
    prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
    if not lm.is_causal:
        prefix = [tok.cls_token_id] if tok.cls_token_id is not None else prefix
    body = torch.cat([seqs, seqs], dim=1)
    ids = torch.cat([torch.tensor([prefix] * n, dtype=torch.long).reshape(n, len(prefix)), body], dim=1)
    return ids, len(prefix)


def characterize_heads(
    lm,
    texts: str | Sequence[str] | None = None,
    max_tokens: int = 64,
    window: int = 64,
    n_random: int = 4,
    random_length: int = 48,
    seed: int = 0,
    input_ids: torch.Tensor | None = None,
) -> HeadScores:
    """Induction, previous-token, first-token and self scores of every head (see module docstring)."""
    ids = input_ids if input_ids is not None else _windows(lm, texts, max_tokens, window)
    rand, offset = induction_sequences(lm, n_random, random_length, seed)
    result = _empty(
        lm, PATTERNS, {"induction_sequences": {"n": n_random, "length": random_length, "seed": seed}}
    )
    names = [f"blocks.{i}.attn.pattern" for i in range(lm.n_layers)]
    text_run = lm_run_ids(lm, ids, names)
    rand_run = lm_run_ids(lm, rand, names)
    seq = ids.shape[1]
    q = torch.arange(1, seq)
    targets = {"previous_token": q - 1, "first_token": torch.zeros_like(q), "self": q}
    rq = torch.arange(offset + random_length, offset + 2 * random_length)
    rk = rq - random_length + 1  # the token after the previous occurrence
    for name in PATTERNS:
        result.argmax_fraction[name] = np.full_like(result.scores[name], np.nan)
    for i in range(lm.n_layers):
        n_h = lm.n_heads_at(i)
        pat = text_run[f"blocks.{i}.attn.pattern"].float()  # [b, h, q, k]
        for metric, k in targets.items():
            att = pat[:, :, q, k]  # [b, h, q]
            result.scores[metric][i, :n_h] = att.mean(dim=(0, 2)).numpy()
            hit = pat[:, :, q].argmax(-1) == k
            result.argmax_fraction[metric][i, :n_h] = hit.float().mean(dim=(0, 2)).numpy()
        rpat = rand_run[f"blocks.{i}.attn.pattern"].float()
        att = rpat[:, :, rq, rk]
        result.scores["induction"][i, :n_h] = att.mean(dim=(0, 2)).numpy()
        hit = rpat[:, :, rq].argmax(-1) == rk
        result.argmax_fraction["induction"][i, :n_h] = hit.float().mean(dim=(0, 2)).numpy()
    return result


def lm_run_ids(lm, input_ids: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Capture ``names`` for token ids (no text round trip)."""
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad(), hooks(lm, names) as session:
        base_forward(lm, inputs)
    return session.tensors


def analyze_heads(
    lm,
    texts: str | Sequence[str] | None = None,
    max_tokens: int = 64,
    window: int = 64,
    methods: Sequence[str] = ("zero", "mean", "grad"),
    layers: Sequence[int] | None = None,
    seed: int = 0,
    progress=None,
    approx: str | None = None,
    compare_exact: bool = False,
) -> HeadScores:
    """Importance and characterization together (what ``lmscope heads`` writes)."""
    ids = _windows(lm, texts, max_tokens, window)
    importance = head_importance(
        lm,
        methods=methods,
        layers=layers,
        input_ids=ids,
        progress=progress,
        approx=approx,
        compare_exact=compare_exact,
    )
    return importance.merge(characterize_heads(lm, input_ids=ids, seed=seed))


# -- plain-language summaries -------------------------------------------------------------------
#: a head is called by a pattern when it puts at least this much attention there on average; the sink
#: bar is high because most heads of a trained LM park most of their attention on the first token
#: (77 of smollm2's 270 heads put >= 0.7 there), which would make nearly every head 'notable'
PATTERN_THRESHOLD = {"induction": 0.3, "previous_token": 0.5, "self": 0.5, "first_token": 0.9}


def _describe(scores: HeadScores, metric: str, layer: int, head: int) -> str:
    mean = scores.scores[metric][layer, head]
    frac = scores.argmax_fraction.get(metric)
    top = f"{frac[layer, head]:.0%} of positions" if frac is not None else "most positions"
    if metric == "induction":
        return (
            f"induction head: attends to the token after the previous occurrence of the current token "
            f"in {top} (mean attention {mean:.2f})"
        )
    if metric == "previous_token":
        return f"previous-token head: attends most to the previous token in {top} (mean attention {mean:.2f})"
    if metric == "self":
        return f"self head: attends most to its own position in {top} (mean attention {mean:.2f})"
    return f"attention sink: puts {mean:.0%} of its attention on the first token (strongest in {top})"


def summarize_head(scores: HeadScores, layer: int, head: int) -> str:
    """One line: the pattern the head follows (if any) and how much removing it costs."""
    parts = []
    called = [
        m
        for m in ("induction", "previous_token", "self", "first_token")
        if m in scores.scores and scores.scores[m][layer, head] >= PATTERN_THRESHOLD[m]
    ]
    if called:
        parts.append(_describe(scores, called[0], layer, head))
    for metric in ("ablation_mean", "ablation_zero"):
        if metric in scores.scores and not np.isnan(scores.scores[metric][layer, head]):
            ranked = scores.ranking(metric)
            rank = ranked.index((layer, head)) + 1
            if rank <= max(3, len(ranked) // 20):
                kind = "mean" if metric == "ablation_mean" else "zero"
                delta = scores.scores[metric][layer, head]
                parts.append(
                    f"important: {kind}-ablating it raises loss by {delta:+.3f} (rank {rank}/{len(ranked)})"
                )
            break
    return "; ".join(parts)
