"""Logit lens (nostalgebraist 2020): read each layer's residual stream through the model's final norm
and unembedding, to see what the model "would predict" after that layer.

    from lmscope.explain.lens import logit_lens
    run = lm.run(text, capture=["blocks.*.resid_post"])
    lens = logit_lens(lm, run, k=5)
    lens.top_tokens[layer][pos]      # k strings; lens.top_probs[layer, pos] their probabilities
    lens.final_token_prob[layer, pos]  # probability of the model's final top-1 token at that layer

At the last layer the lens equals the model's logits exactly (HF applies the same norm and head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LmscopeError


@dataclass
class LogitLens:
    """Top-k readings per layer and position (all tensors on CPU)."""

    top_ids: torch.Tensor  # [layers, pos, k] token ids
    top_probs: torch.Tensor  # [layers, pos, k] softmax probabilities
    top_tokens: list[list[list[str]]]  # [layers][pos][k] decoded strings
    final_token_prob: torch.Tensor  # [layers, pos] probability of the final layer's top-1 token
    final_ids: torch.Tensor  # [pos] the final layer's top-1 token per position

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0]

    def to_dict(self) -> dict:
        return {
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.tolist(),
            "top_tokens": self.top_tokens,
            "final_token_prob": self.final_token_prob.tolist(),
            "final_ids": self.final_ids.tolist(),
        }


def check_lens(lm) -> None:
    if lm.task != "lm" or not lm.family.unembed or not lm.family.final_norm:
        raise LmscopeError(
            f"the logit lens needs an unembedding; {lm.name} ({lm.family.name}) has none",
            "use a causal language model (e.g. --model smollm2)",
        )


def lens_logits(lm, resid: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding applied to residual vectors [..., d_model] -> logits [..., vocab]."""
    check_lens(lm)
    return lm.unembed(lm.final_norm(resid))


def residual_stack(lm, run_or_resid, index: int = 0) -> torch.Tensor:
    """[layers, pos, d_model] from a Run holding ``blocks.*.resid_post`` or from such a tensor."""
    if isinstance(run_or_resid, torch.Tensor):
        return run_or_resid
    tensors = run_or_resid.tensors
    names = [f"blocks.{i}.resid_post" for i in range(lm.n_layers)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise LmscopeError(
            f"the logit lens needs {missing[0]} (and every blocks.*.resid_post) in the run",
            'capture them: lm.run(text, capture=["blocks.*.resid_post"])',
        )
    n = int(run_or_resid.attention_mask[index].sum())
    return torch.stack([tensors[name][index, :n] for name in names])


@torch.no_grad()
def logit_lens(lm, run, k: int = 5, index: int = 0) -> LogitLens:
    """Logit lens of batch item ``index`` of ``run`` (a Run with ``blocks.*.resid_post``, or a tensor
    [layers, pos, d_model]): top-``k`` tokens and probabilities per layer and position, and the
    probability of the final prediction at every layer. Memory: one layer's logits at a time."""
    check_lens(lm)
    resid = residual_stack(lm, run, index)
    top_ids, top_probs, logprobs_final = [], [], []
    final_ids = None
    for layer in reversed(range(resid.shape[0])):  # last layer first: it defines the final top-1
        probs = lens_logits(lm, resid[layer].float()).softmax(-1)
        p, i = probs.topk(k, dim=-1)
        if final_ids is None:
            final_ids = probs.argmax(-1)
        top_ids.append(i)
        top_probs.append(p)
        logprobs_final.append(probs.gather(-1, final_ids[:, None])[:, 0])
    top_ids = torch.stack(top_ids[::-1])
    decode = {int(t): lm.tokenizer.decode([int(t)]) for t in top_ids.unique()}
    tokens = [[[decode[int(t)] for t in pos] for pos in layer] for layer in top_ids]
    return LogitLens(
        top_ids=top_ids,
        top_probs=torch.stack(top_probs[::-1]),
        top_tokens=tokens,
        final_token_prob=torch.stack(logprobs_final[::-1]),
        final_ids=final_ids,
    )
