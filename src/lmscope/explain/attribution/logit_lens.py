"""Logit-lens attribution by layer: how the target (logit, or logit A − logit B) builds up across
layers at the explained position. ``scores[l]`` is the change of the target read through the logit
lens from before layer l to after it (the first reading is the lens of the token embeddings), so the
scores sum to the final target minus the lens of the embeddings. One score per *layer*, not per token:
it has no token faithfulness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...capture.session import hooks
from ..lens import lens_logits
from ..targets import Objective
from .base import AttributionMethod, register


@register
@dataclass
class LogitLensAttribution(AttributionMethod):
    name = "logit_lens"
    kind = "layer"
    unit = "layer"
    summary = "change of the target's logit-lens reading at each layer (scores per layer)"
    causal_only = True

    def compute(self, obj: Objective):
        lm = obj.lm
        names = [f"blocks.{i}.resid_post" for i in range(lm.n_layers)]
        with torch.no_grad(), hooks(lm, names) as s:
            lm.forward(
                {"inputs_embeds": obj.x[None], "attention_mask": torch.ones(1, obj.n, dtype=torch.long)}
            )
            resid = [obj.x[-1]] + [s.tensors[n][0, -1] for n in names]
            logits = lens_logits(lm, torch.stack(resid).float())  # [layers + 1, vocab]
        metric = obj.metric(logits).double()
        probs = logits.softmax(-1).double()
        info = {
            "target_by_layer": metric[1:].tolist(),
            "embedding_reading": float(metric[0]),
            "prob_by_layer": probs[1:, obj.target.token_id].tolist(),
            "top1_by_layer": [lm.tokenizer.decode([int(i)]) for i in logits[1:].argmax(-1)],
        }
        return metric[1:] - metric[:-1], info
