"""MLP neuron pruning that physically removes hidden units: gate/up rows and down-projection columns go.

Every layer loses the same ``fraction`` of its hidden units. Order: ``magnitude`` (‖W_down[:, j]‖ times the
norms of the input rows), ``activation`` (mean |h_j| on calibration text times ‖W_down[:, j]‖, i.e. the
expected size of unit j's contribution to the residual stream) or ``random`` (seeded baseline).
"""

from __future__ import annotations

import torch

from ...errors import LmscopeError
from ...progress import track
from ..calibration import calibration_inputs
from ..targets import set_module
from ._linear import keep_inputs, keep_outputs, weight_out_in
from ._origin import get_origin

ORDERS = ("magnitude", "activation", "random")


def neuron_scores(lm, order: str = "magnitude", calib=None, seed: int = 0) -> list[torch.Tensor]:
    fam = lm.family
    down_norm = [weight_out_in(b.get_submodule(fam.mlp_out)).detach().float().norm(dim=0) for b in lm.blocks]
    if order == "magnitude":
        out = []
        for b, dn in zip(lm.blocks, down_norm, strict=True):
            s = dn.clone()
            for path in fam.mlp_in:
                s = s * weight_out_in(b.get_submodule(path)).detach().float().norm(dim=1)
            out.append(s)
        return out
    if order == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(len(d), generator=g) for d in down_norm]
    if order == "activation":
        sums = [torch.zeros(len(d)) for d in down_norm]
        count = 0
        handles = []

        def make(i):
            def hook(mod, args):
                sums[i].add_(args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0))

            return hook

        for i, b in enumerate(lm.blocks):
            handles.append(b.get_submodule(fam.mlp_out).register_forward_pre_hook(make(i)))
        try:
            with torch.no_grad():
                for batch in track(calibration_inputs(lm, calib), "calibration", unit="window"):
                    lm.forward(batch)
                    count += int(batch["attention_mask"].sum())
        finally:
            for h in handles:
                h.remove()
        return [s / max(count, 1) * d for s, d in zip(sums, down_norm, strict=True)]
    raise LmscopeError(f"unknown neuron order '{order}'", f"use one of: {', '.join(ORDERS)}")


@torch.no_grad()
def remove_neurons(lm, keep: dict[int, list[int]]) -> dict:
    """Keep only hidden units ``keep[i]`` (current numbering) of layer i's MLP; returns the rebuild info."""
    fam = lm.family
    info = {}
    for i in sorted(keep):
        kept = sorted(int(j) for j in keep[i])
        block = lm.blocks[i]
        d = lm.d_mlp_at(i)
        if not kept or kept[0] < 0 or kept[-1] >= d or len(set(kept)) != len(kept):
            raise LmscopeError(f"layer {i}: cannot keep neurons {kept[:5]}... of {d}", "keep at least one")
        for path in fam.mlp_in:
            set_module(block, path, keep_outputs(block.get_submodule(path), kept))
        set_module(block, fam.mlp_out, keep_inputs(block.get_submodule(fam.mlp_out), kept))
        info[str(i)] = {"kept": kept, "before": d, "original_layer": get_origin(lm.model)["layers"][i]}
    return info


def prune_neurons(
    lm, fraction: float = 0.25, order: str = "magnitude", calib=None, seed: int = 0, layers=None
) -> dict:
    """Remove ``fraction`` of every layer's MLP hidden units, chosen by ``order``; returns the step info.

    ``layers``: only these layers lose neurons (None: every layer)."""
    if not 0.0 <= fraction < 1.0:
        raise LmscopeError(f"neuron fraction {fraction} is outside [0, 1)", "use e.g. 0.25")
    before = sum(lm.d_mlp_at(i) for i in range(lm.n_layers))
    if fraction == 0:
        return {"order": order, "neurons_before": before, "neurons_removed": 0, "layers": {}}
    scores = neuron_scores(lm, order, calib, seed)
    keep = {}
    for i, s in enumerate(scores):
        if layers is not None and i not in layers:
            continue
        n_keep = max(1, len(s) - int(round(len(s) * fraction)))
        keep[i] = torch.topk(s, n_keep).indices.tolist()
    layers = remove_neurons(lm, keep)
    after = sum(lm.d_mlp_at(i) for i in range(lm.n_layers))
    return {
        "order": order,
        "n_layers": lm.n_layers,
        "neurons_before": before,
        "neurons_removed": before - after,
        "layers": layers,
    }


def rebuild_neurons(model, info: dict) -> None:
    from ...lm import LM
    from .heads import _current_layers

    lm = LM(model, None)
    keep = _current_layers(lm, info)
    remove_neurons(lm, {i: info["layers"][k]["kept"] for i, k in keep.items()})
