"""Low-rank factorization: replace a linear layer W [out, in] by two thinner ones, W ≈ U·V (SVD).

The rank is fixed (``rank``) or the smallest keeping ``energy`` of the squared singular values. With
``activation_aware`` (ASVD-style) the columns are scaled by calibration input norms s_j before the SVD,
W·diag(s) ≈ U Σ Vᵀ, and unscaled after: W ≈ U Σ (Vᵀ diag(1/s)), so the truncation keeps what matters for
the actual inputs. A layer is only factorized when r·(in + out) < in·out (otherwise it would grow).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from ...errors import LmscopeError
from ...progress import track
from ..prune._linear import weight_out_in
from ..registry import register_step
from ..steps import LowRank
from ..targets import block_linears, is_conv1d, set_module


class LowRankLinear(nn.Module):
    """y = up(down(x)): ``down`` is [rank, in] without bias, ``up`` is [out, rank] with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def choose_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, len(singular))
    e = singular.double().pow(2)
    cum = torch.cumsum(e, 0) / e.sum()
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


@torch.no_grad()
def factorize(module: nn.Module, rank: int | None = None, energy: float | None = None, scale=None):
    """(LowRankLinear or None when it would not save parameters, chosen rank, kept energy)."""
    w = weight_out_in(module).detach().double()
    out_f, in_f = w.shape
    s = None
    if scale is not None:
        s = scale.double().clamp_min(1e-6 * float(scale.max().clamp_min(1e-12)))
        w = w * s[None, :]
    u, sig, vh = torch.linalg.svd(w, full_matrices=False)
    r = choose_rank(sig, rank, energy)
    kept_energy = float(sig[:r].pow(2).sum() / sig.pow(2).sum().clamp_min(1e-30))
    if r * (in_f + out_f) >= in_f * out_f:
        return None, r, kept_energy
    down = vh[:r] * sig[:r, None]
    if s is not None:
        down = down / s[None, :]
    bias = getattr(module, "bias", None)
    new = LowRankLinear(in_f, out_f, r, bias=bias is not None, dtype=module.weight.dtype)
    new.down.weight.copy_(down.to(new.down.weight.dtype))
    new.up.weight.copy_(u[:, :r].to(new.up.weight.dtype))
    if bias is not None:
        new.up.bias.copy_(bias.detach())
    return new, r, kept_energy


def lowrank_targets(lm, patterns=()) -> list[tuple[str, nn.Module]]:
    found = block_linears(lm)
    fam = lm.family
    # GPT-2's o / mlp_out are Conv1D whose weight layout lmscope reads for head and neuron counts: leave them
    protected = {fam.o, fam.mlp_out} if fam.conv1d else set()
    out = []
    for path, mod in found:
        rel = path.split(".", len(fam.blocks.split(".")) + 1)[-1]
        if rel in protected or (fam.conv1d and not is_conv1d(mod) and not isinstance(mod, nn.Linear)):
            continue
        if patterns and not any(
            fnmatch(path, p) or fnmatch(rel, p) or fnmatch(path.rsplit(".", 1)[-1], p) for p in patterns
        ):
            continue
        out.append((path, mod))
    if not out:
        raise LmscopeError(
            f"no linear layer matches low-rank targets {list(patterns)}",
            "use module names like mlp.*, q_proj or full paths",
        )
    return out


def lowrank(
    lm,
    rank: int | None = None,
    energy: float | None = None,
    activation_aware: bool = False,
    targets=(),
    calib=None,
    only=None,
) -> dict:
    """Factorize the block linears of ``lm`` in place; returns the info a rebuild needs (rank per layer)."""
    if (rank is None) == (energy is None):
        raise LmscopeError("low-rank needs exactly one of a rank or an energy", "pass rank=... or energy=...")
    mods = lowrank_targets(lm, targets)
    if only is not None:  # a step's module filter (paths already validated)
        mods = [(p, m) for p, m in mods if p in set(only)]
    norms = None
    if activation_aware:
        from ..calibration import input_sq_norms

        norms = {p: v.sqrt() for p, v in input_sq_norms(lm, calib, [p for p, _ in mods]).items()}
    layers, before, after = {}, 0, 0
    for path, mod in track(mods, "low-rank SVD", unit="layer"):
        n = weight_out_in(mod).numel()
        new, r, kept = factorize(mod, rank, energy, None if norms is None else norms[path])
        before += n
        if new is None:
            after += n
            layers[path] = {"rank": None, "would_be_rank": r, "energy": round(kept, 6), "skipped": True}
            continue
        set_module(lm.model, path, new)
        after += new.down.weight.numel() + new.up.weight.numel()
        layers[path] = {"rank": r, "energy": round(kept, 6), "in": new.in_features, "out": new.out_features}
    return {
        "rank": rank,
        "energy": energy,
        "activation_aware": activation_aware,
        "weights_before": before,
        "weights_after": after,
        "factorized": sum(1 for v in layers.values() if v["rank"]),
        "layers": layers,
    }


def rebuild_lowrank(model, info: dict) -> None:
    for path, v in info["layers"].items():
        if not v.get("rank"):
            continue
        mod = model.get_submodule(path)
        out_f, in_f = weight_out_in(mod).shape
        bias = getattr(mod, "bias", None) is not None
        set_module(model, path, LowRankLinear(in_f, out_f, v["rank"], bias=bias, dtype=mod.weight.dtype))


@register_step(LowRank)
class LowRankHandler:
    def apply(self, lm, step, calib) -> dict:
        only = step.selected_modules(lm) if step.modules else None
        return lowrank(lm, step.rank, step.energy, step.activation_aware, step.targets, calib, only=only)

    def rebuild(self, model, step, info) -> None:
        rebuild_lowrank(model, info)
