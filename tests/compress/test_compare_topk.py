"""compare's top-k overlap: k never reaches the token count (where it is trivially 1), and says so."""

from __future__ import annotations

import copy

import numpy as np
import torch

from lmscope import LM
from lmscope.compress.compare import compare, overlap_k


def test_overlap_k_is_at_most_half_the_tokens():
    assert overlap_k(5, 5) == 2
    assert overlap_k(99, 5) == 2
    assert overlap_k(5, 40) == 5
    assert overlap_k(3, 1) == 1


def test_top_k_capped_and_noted(make_tiny):
    a = make_tiny("llama")
    b = LM(copy.deepcopy(a.model), a.tokenizer, name="noisy")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            if p.dim() == 2:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    text = "The capital of France is"
    c = compare(a, b, text, methods=("saliency",), k=99)
    n = len(c.tokens)
    v = c.attribution["saliency"]
    assert v["k"] == n // 2 and v["k_requested"] == 99
    # brute force: overlap of the top-k |score| positions
    top = lambda s: set(np.argsort(-np.abs(np.array(s)), kind="stable")[: v["k"]])  # noqa: E731
    assert v["topk_overlap"] == len(top(v["a"]) & top(v["b"])) / v["k"]
    assert any("not the 99 asked for" in line for line in c.notes)
    assert "not the 99 asked for" in c.to_text()
    assert compare(a, b, text, methods=("saliency",), k=1).notes == []
