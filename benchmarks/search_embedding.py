"""What int4 on smollm2's token embedding + tied LM head costs by itself (issue 12, goal 1): the embedding is
about a third of the bytes of uniform int4 g64, so an int4 embedding leaves those bytes to the blocks.

Fake-quantized weights (fp32 arithmetic, rest of the model fp32); held-out perplexity on 512 tokens of the
evaluation half (the windows ``benchmarks/search.py`` uses). GPTQ here quantizes the embedding matrix as the
tied head's weight, on the Hessian of the head's inputs (8 x 256 calibration tokens, what ``compress`` uses).
The "split" rows untie the two uses to see which one the error comes from (attribution only: a tied model
stores one matrix).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search_embedding.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import lmscope
from lmscope.compress.calibration import Calibration
from lmscope.compress.evaluate import evaluation_text
from lmscope.compress.quantize._common import INT8_CHANNEL, int4_spec
from lmscope.compress.quantize.affine import fake_quantize
from lmscope.compress.quantize.gptq import collect_hessians, gptq_quantize
from lmscope.compress.search.fitness import heldout_windows, perplexity


def main() -> None:
    t0 = time.time()
    lm = lmscope.load("smollm2", progress=False)
    held = heldout_windows(lm, evaluation_text()[0], 512)
    emb = lm.module(lm.family.embed)
    head = lm.module(lm.family.unembed)
    W = emb.weight.detach().clone()
    assert head.weight is emb.weight, "a tied head is assumed"

    def setw(w):
        with torch.no_grad():
            emb.weight.copy_(w)

    def show(name):
        p = perplexity(lm, held)
        print(f"{name}: ppl {p:.3f} ({p / ref - 1:+.1%})", flush=True)

    ref = perplexity(lm, held)
    print(f"fp32: ppl {ref:.3f}", flush=True)
    setw(fake_quantize(W, INT8_CHANNEL))
    show("int8 rows (today's embedding)")
    for g in (32, 64):
        setw(fake_quantize(W, int4_spec(g)))
        show(f"int4 g{g} RTN")
    setw(W)
    H = collect_hessians(lm, Calibration(lm, None).windows(), [lm.family.unembed])[lm.family.unembed]
    for g in (32, 64):
        Q = gptq_quantize(W, H, g)[3]
        setw(Q)
        show(f"int4 g{g} GPTQ (head's inputs)")
        setw(fake_quantize(W, INT8_CHANNEL))
        head.forward = lambda x, Q=Q: F.linear(x, Q)
        show(f"  split: head int4 g{g} GPTQ, embedding int8")
        setw(Q)
        head.forward = lambda x: F.linear(x, W)
        show(f"  split: head fp32, embedding int4 g{g} GPTQ")
        del head.forward
        setw(W)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
