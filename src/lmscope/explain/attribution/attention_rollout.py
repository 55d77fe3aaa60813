"""Attention rollout (Abnar & Zuidema 2020): multiply the head-averaged attention matrices, each
mixed with the identity for the residual stream (½A + ½I, rows renormalized), from the first layer up.
Row t of the product says how much of position t's final state came from each input token; works for
decoders (causal rows) and encoders (the score is the mean row, matching mean pooling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..targets import Objective
from .base import AttributionMethod, register


def residual_attention(patterns: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer: ½·mean_heads(A) + ½·I, rows renormalized to sum 1 ([n, n] each)."""
    out = []
    for p in patterns:
        a = p.double().mean(0)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        out.append(a / a.sum(-1, keepdim=True))
    return out


def rollout(patterns: list[torch.Tensor]) -> torch.Tensor:
    """The rollout matrix [n, n]: row i = how much each input token flows into position i at the top."""
    mats = residual_attention(patterns)
    r = torch.eye(mats[0].shape[-1], dtype=torch.float64)
    for a in mats:
        r = a @ r
    return r


def sink_weights(obj: Objective) -> torch.Tensor:
    """Which top-layer positions the target reads: the last one (causal LMs and decoder classifiers), the
    first one (an encoder classifier's [CLS] pooler), or all equally (mean-pooled encoder embeddings)."""
    w = torch.zeros(obj.n, dtype=torch.float64)
    lm = obj.lm
    if lm.causal_attention:
        w[-1] = 1.0
    elif getattr(lm, "task", "") == "classifier":
        w[0] = 1.0
    else:
        w[:] = 1.0 / obj.n
    return w


@register
@dataclass
class AttentionRollout(AttributionMethod):
    name = "attention_rollout"
    kind = "attention"
    summary = "product of head-averaged attention (+ residual) across layers (Abnar & Zuidema 2020)"
    signed = False

    def compute(self, obj: Objective):
        r = rollout(obj.attention_patterns())
        return sink_weights(obj) @ r, {"_matrix": r}
