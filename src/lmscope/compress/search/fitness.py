"""Fitness: KL divergence from the original model's next-token distribution to a candidate's, on calibration
tokens, in stages of growing token counts (EvoPress): a candidate is first scored on the first windows only,
and only survivors pay for more. Held-out perplexity confirms the finalists on text disjoint from calibration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _windows(lm, text: str, tokens: int, window: int) -> list[torch.Tensor]:
    from ...data import token_windows

    rows = token_windows(lm, text, max_tokens=tokens, window=window)  # [n, window]
    return [r[None] for r in rows]


class KLFitness:
    """Mean per-token KL(P_original || P_candidate) over the first ``stage_windows[s]`` windows."""

    def __init__(self, lm, text: str, tokens: int = 512, window: int = 64, stages: int = 3):
        self.windows = _windows(lm, text, tokens, window)  # each [1, window]
        n = len(self.windows)
        counts = sorted({max(1, round(n / 4**k)) for k in range(stages)})
        self.stage_windows: tuple[int, ...] = tuple(counts)
        self.stage_tokens: tuple[int, ...] = tuple(sum(w.shape[1] for w in self.windows[:c]) for c in counts)
        self._ref: list[torch.Tensor] = []
        with torch.no_grad():
            for ids in self.windows:  # the original's log-probabilities, once
                self._ref.append(self._log_probs(lm, ids))

    @property
    def n_stages(self) -> int:
        return len(self.stage_windows)

    @staticmethod
    def _log_probs(lm, ids: torch.Tensor) -> torch.Tensor:
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        return F.log_softmax(logits[0].double(), dim=-1)  # [T, V]; float64: KL of close models cancels

    @torch.no_grad()
    def window_kl(self, lm, index: int) -> float:
        """Sum over the window's positions of KL(P_ref || P_lm) (nats)."""
        ref = self._ref[index]
        cand = self._log_probs(lm, self.windows[index])
        return float((ref.exp() * (ref - cand)).sum())

    def kl(self, lm, stage: int, done: list[float] | None = None) -> tuple[float, list[float]]:
        """(mean KL per token at ``stage``, per-window sums); ``done``: per-window sums already known for this
        candidate (from an earlier stage), extended rather than recomputed."""
        sums = list(done or [])
        for i in range(len(sums), self.stage_windows[stage]):
            sums.append(self.window_kl(lm, i))
        n = self.stage_windows[stage]
        return sum(sums[:n]) / self.stage_tokens[stage], sums


@torch.no_grad()
def perplexity(lm, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over the windows (batch-1 [1, T] tensors)."""
    total, count = 0.0, 0
    for ids in windows:
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    return math.exp(total / max(count, 1))


def heldout_windows(lm, text: str, tokens: int, window: int = 128) -> list[torch.Tensor]:
    return _windows(lm, text, tokens, window)
