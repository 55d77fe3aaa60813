"""Is an explanation faithful? Measured by perturbing the input in the order the attribution ranks it.

"Deleting" a token means replacing its embedding with the baseline (the pad/eos/mask token, or the zero
embedding; the same one integrated gradients uses) and keeping the length, so positions never shift
and the model sees a sequence of the usual shape. All numbers are in the target's units (logits, or
cosine for encoders), measured on the same ``f`` the attribution explains. Tokens are ranked by score,
highest first (for signed methods "most in favour of the target" first).

- deletion curve: f after removing the top-k tokens, k = 0..n. ``deletion_aopc`` = mean_k (f(x) − f_k):
  high when removing the top tokens destroys the target fast (Samek et al. 2017).
- insertion curve: f when only the top-k tokens are present. ``insertion_aopc`` = mean_k (f_k − f(∅)):
  high when the top tokens alone rebuild the target.
- ERASER (DeYoung et al. 2020) at the top 1/5/10/20/50 % tokens (at least one token), averaged:
  ``comprehensiveness`` = f(x) − f(x without them) (higher is better), ``sufficiency`` =
  f(x) − f(only them) (lower is better).
- ``aopc_sum`` = deletion_aopc + insertion_aopc ranks methods (it equals the area between the insertion
  and deletion curves minus a per-input constant); a random order scores about |f(x) − f(∅)| on a model
  that is linear in token presence — ``random_aopc_sum`` is measured for comparison.
- sanity check (Adebayo et al. 2018): attributions on a copy of the model whose top layers are
  re-initialized must change; ``randomization_spearman`` is the rank correlation with the original
  (near 1 = the method ignores the model = not faithful).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def ranking(scores, free: torch.Tensor) -> np.ndarray:
    """Positions of the perturbable tokens, highest score first (ties: earlier position first)."""
    s = np.asarray(scores, dtype=np.float64)
    idx = np.nonzero(free.numpy())[0]
    return idx[np.argsort(-s[idx], kind="stable")]


def _grid(m: int, max_points: int) -> list[int]:
    ks = set(range(m + 1)) if m + 1 <= max_points else {int(round(v)) for v in np.linspace(0, m, max_points)}
    ks |= {max(1, math.ceil(q * m)) for q in FRACTIONS if m}
    return sorted(ks)


def curves(objective, order: np.ndarray, max_points: int = 33) -> dict:
    """Deletion and insertion curves along ``order``: {"k": [...], "deletion": [...], "insertion": [...]}."""
    n, m = objective.n, len(order)
    ks = _grid(m, max_points)
    delete = torch.ones(len(ks), n, dtype=torch.bool)
    insert = torch.zeros(len(ks), n, dtype=torch.bool)
    for row, k in enumerate(ks):
        top = torch.as_tensor(order[:k], dtype=torch.long)
        delete[row, top] = False
        insert[row, top] = True
    f = objective.f_masks(torch.cat([delete, insert])).double().numpy()
    return {"k": ks, "deletion": f[: len(ks)].tolist(), "insertion": f[len(ks) :].tolist()}


def scores_from_curves(objective, c: dict, m: int) -> dict:
    ks = c["k"]
    f_x, dele, ins = objective.f_x, np.array(c["deletion"]), np.array(c["insertion"])
    f_empty = ins[0]
    at = {k: i for i, k in enumerate(ks)}
    top = [at[max(1, math.ceil(q * m))] for q in FRACTIONS] if m else [0]
    out = {
        "deletion_aopc": float(np.mean(f_x - dele)),
        "insertion_aopc": float(np.mean(ins - f_empty)),
        "comprehensiveness": float(np.mean([f_x - dele[i] for i in top])),
        "sufficiency": float(np.mean([f_x - ins[i] for i in top])),
    }
    out["aopc_sum"] = out["deletion_aopc"] + out["insertion_aopc"]
    return out


def faithfulness(objective, scores, max_points: int = 33) -> dict:
    """Deletion/insertion AOPC, comprehensiveness and sufficiency of ``scores`` (one per token) on
    ``objective``; also returns the two curves (``curves``)."""
    order = ranking(scores, objective.free)
    c = curves(objective, order, max_points)
    out = scores_from_curves(objective, c, len(order))
    out["curves"] = c
    return out


def random_baseline(objective, n_orders: int = 3, seed: int = 0, max_points: int = 33) -> dict:
    """The same metrics for random token orders (mean over ``n_orders``): what "no information" scores."""
    rng = np.random.default_rng(seed)
    free = np.nonzero(objective.free.numpy())[0]
    runs = []
    for _ in range(n_orders):
        order = rng.permutation(free)
        runs.append(scores_from_curves(objective, curves(objective, order, max_points), len(order)))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def spearman(a, b) -> float | None:
    """Spearman rank correlation; 1.0 for two identical sequences (even constant ones: nothing changed),
    None where it is undefined (under two values, or one side constant and the other not)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) >= 1 and a.shape == b.shape and np.array_equal(a, b):
        return 1.0
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def randomized_copy(lm, n_top: int | None = None, seed: int = 0):
    """A copy of ``lm`` whose top ``n_top`` blocks (default: the top half) have re-initialized weight
    matrices (normal, each with its original standard deviation); norms and biases are kept."""
    from ..lm import LM

    n_top = max(1, lm.n_layers // 2) if n_top is None else n_top
    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    blocks = model.get_submodule(lm.family.blocks)
    with torch.no_grad():
        for block in list(blocks)[lm.n_layers - n_top :]:
            for p in block.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.std())
    return LM(model, lm.tokenizer, name=f"{lm.name}+random-top-{n_top}"), n_top
