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

``rank_methods`` orders methods by ``aopc_sum`` but puts every *flagged* method after the unflagged ones
(``FLAG_RULES``: below the random order, fails the randomization check, surrogate R² too low, IG
completeness error too large), so the top of the ranking is never a method its own numbers disqualify.
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


def _curve_masks(n: int, order: np.ndarray, max_points: int) -> tuple[list[int], torch.Tensor]:
    """(ks, masks [2·len(ks), n]): the deletion rows, then the insertion rows."""
    ks = _grid(len(order), max_points)
    delete = torch.ones(len(ks), n, dtype=torch.bool)
    insert = torch.zeros(len(ks), n, dtype=torch.bool)
    for row, k in enumerate(ks):
        top = torch.as_tensor(order[:k], dtype=torch.long)
        delete[row, top] = False
        insert[row, top] = True
    return ks, torch.cat([delete, insert])


def curves(objective, order: np.ndarray, max_points: int = 33) -> dict:
    """Deletion and insertion curves along ``order``: {"k": [...], "deletion": [...], "insertion": [...]}."""
    return curves_many(objective, [order], max_points)[0]


def curves_many(objective, orders: list[np.ndarray], max_points: int = 33) -> list[dict]:
    """``curves`` for several orders with one batched evaluation (rows shared between orders — the
    full and the empty input, common top-k sets — run once)."""
    grids = [_curve_masks(objective.n, order, max_points) for order in orders]
    f = objective.f_masks(torch.cat([masks for _, masks in grids])).double().numpy()
    out, at = [], 0
    for ks, masks in grids:
        part = f[at : at + len(masks)]
        at += len(masks)
        out.append({"k": ks, "deletion": part[: len(ks)].tolist(), "insertion": part[len(ks) :].tolist()})
    return out


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
    return faithfulness_many(objective, [scores], max_points)[0]


def faithfulness_many(
    objective, score_lists: list, max_points: int = 33, random_orders: int = 0, seed: int = 0
):
    """``faithfulness`` of several score lists at once, plus (``random_orders`` > 0) the
    ``random_baseline``, all perturbations in one batched evaluation. Returns the list of results,
    or (list, random baseline) when ``random_orders``."""
    orders = [ranking(s, objective.free) for s in score_lists]
    rand = _random_orders(objective, random_orders, seed)
    all_curves = curves_many(objective, orders + rand, max_points)
    out = []
    for order, c in zip(orders, all_curves):
        res = scores_from_curves(objective, c, len(order))
        res["curves"] = c
        out.append(res)
    if not random_orders:
        return out
    runs = [scores_from_curves(objective, c, len(o)) for o, c in zip(rand, all_curves[len(orders) :])]
    return out, {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def _random_orders(objective, n_orders: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    free = np.nonzero(objective.free.numpy())[0]
    return [rng.permutation(free) for _ in range(n_orders)]


def random_baseline(objective, n_orders: int = 3, seed: int = 0, max_points: int = 33) -> dict:
    """The same metrics for random token orders (mean over ``n_orders``): what "no information" scores."""
    return faithfulness_many(objective, [], max_points, random_orders=n_orders, seed=seed)[1]


def spearman(a, b) -> float | None:
    """Spearman rank correlation; 1.0 for two identical sequences (even constant ones: nothing changed),
    None where it is undefined (under two values, or one side constant and the other not)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) >= 1 and a.shape == b.shape and np.array_equal(a, b):
        return 1.0
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    # scipy.stats.spearmanr's definition (Pearson of average ranks) without importing scipy.stats
    # (about a second of a fresh process's start; tests compare with scipy)
    ra, rb = _average_ranks(a) - (len(a) + 1) / 2, _average_ranks(b) - (len(b) + 1) / 2
    return float(np.clip((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)), -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    ends = np.r_[first[1:], len(x)]
    mean_rank = (first + ends + 1) / 2.0  # ranks first+1 .. ends, averaged
    out = np.empty(len(x))
    out[order] = mean_rank[group]
    return out


def randomized_copy(lm, n_top: int | None = None, seed: int = 0):
    """A copy of ``lm`` whose top ``n_top`` blocks (default: the top half) have re-initialized weight
    matrices (normal, each with its original standard deviation); norms and biases are kept.

    Only the re-initialized matrices are new tensors: every other parameter and buffer (embeddings,
    the lower blocks, norms) is shared with ``lm`` — read-only here, and half the model's memory and
    copy time saved. The random draws are those of a full copy (same generator, same order)."""
    from ..lm import LM

    n_top = max(1, lm.n_layers // 2) if n_top is None else n_top
    blocks = lm.model.get_submodule(lm.family.blocks)
    renew = [p for block in list(blocks)[lm.n_layers - n_top :] for p in block.parameters() if p.dim() >= 2]
    # deepcopy's memo maps each kept tensor to itself (the copy's modules reference the originals) and
    # each renewed matrix to an uninitialized one of its shape (filled below: its old values are never copied)
    memo = {id(t): t for t in (*lm.model.parameters(), *lm.model.buffers())}
    fresh = [torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad) for p in renew]
    memo.update({id(p): q for p, q in zip(renew, fresh)})
    model = copy.deepcopy(lm.model, memo)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(renew, fresh):  # the order of a full copy's loop: the same random draws
            torch.randn(p.shape, generator=gen, dtype=p.dtype, out=q.data).mul_(p.std())
    return LM(model, lm.tokenizer, name=f"{lm.name}+random-top-{n_top}"), n_top


#: thresholds of the flags (stated in the report and in attributions.json)
RANDOMIZATION_MAX = 0.7  # Spearman ρ with the randomized model above this: the method ignores the model
SURROGATE_R2_MIN = 0.5  # kernel SHAP's linear surrogate explains less than half of f's variance
IG_COMPLETENESS_MAX = 0.01  # |Σ IG − Δf| / |Δf| above 1%: too few integration steps

FLAG_RULES = {
    "below_random": "AOPC sum below the random token order",
    "fails_randomization": f"randomization ρ above {RANDOMIZATION_MAX} (attributions barely change when the "
    "top layers are re-initialized)",
    "low_surrogate_r2": f"surrogate R² below {SURROGATE_R2_MIN} (the linear model does not fit f)",
    "ig_incomplete": f"integrated-gradients completeness error above {100 * IG_COMPLETENESS_MAX:g}% of |Δf|",
}


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def flags_for(attribution, random_reference: dict | None) -> list[dict]:
    """The checks ``attribution`` fails: [{"flag": name, "why": one line with the numbers}, ...]."""
    fa, info, out = attribution.faithfulness or {}, attribution.info, []
    if random_reference and "aopc_sum" in fa and fa["aopc_sum"] < random_reference["aopc_sum"]:
        out.append(
            {
                "flag": "below_random",
                "why": f"AOPC sum {fa['aopc_sum']:.3g} < {random_reference['aopc_sum']:.3g} of a random order",
            }
        )
    rho = fa.get("randomization_spearman")
    if _finite(rho) and rho > RANDOMIZATION_MAX:
        out.append({"flag": "fails_randomization", "why": f"randomization ρ {rho:.3f} > {RANDOMIZATION_MAX}"})
    r2 = info.get("r2")
    if _finite(r2) and info.get("n_features", 1) and r2 < SURROGATE_R2_MIN:
        out.append({"flag": "low_surrogate_r2", "why": f"surrogate R² {r2:.3f} < {SURROGATE_R2_MIN}"})
    err = info.get("relative_completeness_error")
    if _finite(err) and err > IG_COMPLETENESS_MAX:
        out.append(
            {
                "flag": "ig_incomplete",
                "why": f"completeness error {100 * err:.2f}% of |Δf| > {100 * IG_COMPLETENESS_MAX:g}%",
            }
        )
    return out


def rank_methods(results: dict, random_reference: dict | None) -> list[str]:
    """Names of the scored methods, unflagged first, each group by ``aopc_sum`` (highest first). Sets
    each attribution's ``flags`` and its ``faithfulness["rank"]``."""
    scored = [n for n, r in results.items() if r.faithfulness and "aopc_sum" in r.faithfulness]
    for res in results.values():
        res.flags = flags_for(res, random_reference)
    scored.sort(key=lambda n: (bool(results[n].flags), -results[n].faithfulness["aopc_sum"]))
    for place, n in enumerate(scored, 1):
        results[n].faithfulness["rank"] = place
    return scored
