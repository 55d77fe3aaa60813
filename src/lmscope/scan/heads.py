"""``--heads``: the head characterization of ``lmscope heads``, averaged over every query position of the corpus.

The text metrics (previous-token, first-token/sink, self, and the argmax fractions) are the definitions of
``explain.heads.characterize_heads`` summed in the scan's own forward passes (``shard._head_partial``);
induction is corpus-independent (random repeated tokens) and comes from ``characterize_heads`` itself.
Two more per-head numbers: mean attention distance |query - key| and attention entropy (nats).
"""

from __future__ import annotations

import numpy as np

from ..explain.heads import characterize_heads, induction_sequences
from .shard import HEAD_HITS, HEAD_SUMS

EXTRA = {
    "mean_distance": "mean |query - key| position distance, weighted by attention (tokens)",
    "entropy": "entropy of the attention row (nats)",
}


def corpus_head_scores(lm, state: dict, settings):
    """(HeadScores, heads.json dict) from the merged scan state."""
    rand, _ = induction_sequences(lm, seed=settings.seed)
    # characterize_heads also scores a text; the random sequences stand in, and those text scores are replaced
    scores = characterize_heads(lm, input_ids=rand[:1], seed=settings.seed)
    queries = state["heads.queries"].double().clamp(min=1)[:, None].numpy()  # [layers, 1]
    for m in HEAD_SUMS:
        per_head = state[f"heads.sum.{m}"].numpy() / queries
        per_head = _mask_missing(lm, per_head)
        if m in scores.scores:
            scores.scores[m] = per_head
        else:
            scores.meta.setdefault("_extra", {})[m] = per_head
    for m in HEAD_HITS:
        scores.argmax_fraction[m] = _mask_missing(lm, state[f"heads.hits.{m}"].double().numpy() / queries)
    extra = scores.meta.pop("_extra")
    scores.meta.update(
        {"corpus_query_positions": int(state["heads.queries"][0]), "source": "lmscope scan --heads"}
    )
    data = scores.to_json()
    data["metrics"] = {**data["metrics"], **EXTRA}
    for row in data["heads"]:
        for m, values in extra.items():
            v = float(values[row["layer"], row["head"]])
            row[m] = None if np.isnan(v) else round(v, 6)
    return scores, data


def _mask_missing(lm, a: np.ndarray) -> np.ndarray:
    a = a.copy()
    for i in range(lm.n_layers):
        a[i, lm.n_heads_at(i) :] = np.nan
    return a
