"""Unstructured pruning: zero individual weights by magnitude or by Wanda's |W|·‖X‖ score, optionally N:M.

Wanda (Sun et al., 2023): score_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the norm of input channel j over the
calibration tokens; the lowest-scoring weights are removed *per output row*. Magnitude compares |W_ij| across
the whole layer. With N:M (e.g. 2:4) every group of M consecutive inputs of a row keeps its N best weights.

The zeros stay in dense tensors, so this step saves neither time nor bytes unless the result is stored in a
sparse format (or run on hardware with 2:4 sparse kernels); it is here to study accuracy versus sparsity.
"""

from __future__ import annotations

import torch

from ...errors import LmscopeError
from ...progress import track
from ..calibration import input_sq_norms
from ..targets import block_linears
from ._linear import weight_out_in

HONEST_NOTE = (
    "unstructured sparsity saves neither time nor bytes unless stored sparse: the pruned weights are "
    "zeros inside dense tensors, so size on disk and latency are unchanged"
)

METHODS = ("magnitude", "wanda")


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(x) for x in str(nm).split(":"))
    except ValueError:
        raise LmscopeError(f"N:M pattern '{nm}' is not of the form N:M", "use e.g. 2:4") from None
    if not 0 < n < m:
        raise LmscopeError(f"N:M pattern '{nm}' needs 0 < N < M", "use e.g. 2:4")
    return n, m


def _select_targets(lm, targets) -> list[tuple[str, torch.nn.Module]]:
    found = block_linears(lm)
    if not targets:
        return found
    from fnmatch import fnmatch

    chosen = [
        (p, m) for p, m in found if any(fnmatch(p, t) or fnmatch(p.rsplit(".", 1)[-1], t) for t in targets)
    ]
    if not chosen:
        raise LmscopeError(
            f"no linear layer matches targets {list(targets)}",
            "use module names like q_proj, mlp.*, or full paths like model.layers.0.mlp.down_proj",
        )
    return chosen


def keep_mask(
    score: torch.Tensor, sparsity: float, per_row: bool, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Boolean keep-mask over an [out, in] score: drop the lowest ``sparsity`` fraction (or N:M)."""
    keep = torch.ones(score.shape, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        out_f, in_f = score.shape
        if in_f % m:
            raise LmscopeError(
                f"a layer with {in_f} inputs cannot take an {n}:{m} pattern", "use M dividing the width"
            )
        groups = score.reshape(out_f, in_f // m, m)
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return keep.reshape(out_f, in_f // m, m).scatter(-1, drop, False).reshape(out_f, in_f)
    if sparsity <= 0:
        return keep
    if per_row:
        k = int(round(score.shape[1] * sparsity))
        if k:
            drop = torch.topk(score, k, dim=1, largest=False).indices
            keep.scatter_(1, drop, False)
        return keep
    k = int(round(score.numel() * sparsity))
    if k:
        drop = torch.topk(score.flatten(), k, largest=False).indices
        keep.view(-1)[drop] = False
    return keep


def scores(lm, method: str, paths_modules, calib=None) -> dict[str, torch.Tensor]:
    """The pruning score of every weight ([out, in] per module): |W| or |W|·‖X_j‖₂."""
    if method not in METHODS:
        raise LmscopeError(f"unknown unstructured method '{method}'", f"use one of: {', '.join(METHODS)}")
    out = {p: weight_out_in(m).detach().abs().float() for p, m in paths_modules}
    if method == "wanda":
        sq = input_sq_norms(lm, calib, [p for p, _ in paths_modules])
        for p in out:
            out[p] = out[p] * sq[p].sqrt()[None, :]
    return out


@torch.no_grad()
def prune_unstructured(
    lm, sparsity: float = 0.5, method: str = "wanda", nm: str | None = None, calib=None, targets=None
) -> dict:
    """Zero weights of the block linears in place; returns a JSON info dict with achieved sparsity per layer."""
    if not 0.0 <= sparsity < 1.0:
        raise LmscopeError(f"sparsity {sparsity} is outside [0, 1)", "use a fraction such as 0.5")
    pattern = parse_nm(nm)
    if pattern is not None:
        sparsity = 1 - pattern[0] / pattern[1]
    mods = _select_targets(lm, targets)
    layer_sparsity, zeros, total = {}, 0, 0
    if sparsity > 0:
        all_scores = scores(lm, method, mods, calib)
    for path, mod in track(mods, f"prune {method}", unit="layer"):
        w = weight_out_in(mod)
        if sparsity > 0:
            mask = keep_mask(all_scores[path], sparsity, per_row=(method == "wanda"), nm=pattern)
            w.mul_(mask.to(w.dtype))
        z = int((w == 0).sum())
        layer_sparsity[path] = round(z / w.numel(), 6)
        zeros += z
        total += w.numel()
    return {
        "method": method,
        "nm": nm,
        "sparsity_target": sparsity,
        "sparsity": zeros / max(total, 1),
        "zeroed_weights": zeros,
        "pruned_weights_total": total,
        "layers": layer_sparsity,
        "note": HONEST_NOTE,
    }
