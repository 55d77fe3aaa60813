"""Remove whole transformer blocks (depth pruning), keeping the model consistent so it still runs and reloads.

``block_influence`` (ShortGPT, Men et al. 2024) ranks blocks by 1 − cos(input, output) of the residual
stream on calibration text: a block that barely turns the residual is the cheapest to drop.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import LmscopeError
from ...progress import track
from ..calibration import calibration_inputs
from ._origin import get_origin, set_origin


def block_influence(lm, calib=None) -> list[float]:
    """1 − mean cosine(resid_pre, resid_post) per block over calibration tokens (higher = more important)."""
    from ...capture.session import hooks

    names = [f"blocks.{i}.{w}" for i in range(lm.n_layers) for w in ("resid_pre", "resid_post")]
    total = torch.zeros(lm.n_layers, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in track(calibration_inputs(lm, calib), "calibration", unit="window"):
            with hooks(lm, names) as s:
                lm.forward(batch)
            for i in range(lm.n_layers):
                a = s.tensors[f"blocks.{i}.resid_pre"][0].float()
                b = s.tensors[f"blocks.{i}.resid_post"][0].float()
                total[i] += (1 - nn.functional.cosine_similarity(a, b, dim=-1)).double().sum()
            count += batch["input_ids"].shape[1]
    return (total / max(count, 1)).tolist()


def _renumber(lm) -> None:
    """After blocks moved: fix each block's cache index, lmscope's layer tag and the config."""
    fam = lm.family
    for i, block in enumerate(lm.blocks):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
        block.get_submodule(fam.attn)._lmscope_layer = i
    cfg = lm.model.config
    cfg.num_hidden_layers = len(lm.blocks)


def remove_layers(lm, layers, track_origin: bool = True) -> dict:
    """Delete the blocks at ``layers`` (current numbering) from the model; returns the rebuild info."""
    layers = sorted({int(i) for i in layers})
    n = lm.n_layers
    if any(i < 0 or i >= n for i in layers):
        raise LmscopeError(f"layer(s) {layers} out of range for {n} layers", f"use indices 0..{n - 1}")
    if len(layers) >= n:
        raise LmscopeError("cannot remove every layer", "keep at least one layer")
    origin = get_origin(lm.model, n, lm.n_heads)
    kept = [i for i in range(n) if i not in layers]
    blocks = lm.blocks
    new = nn.ModuleList([blocks[i] for i in kept])
    parent, _, name = lm.family.blocks.rpartition(".")
    setattr(lm.model.get_submodule(parent) if parent else lm.model, name, new)
    cfg = lm.model.config
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:
        cfg.layer_types = [layer_types[i] for i in kept]
    _renumber(lm)
    if track_origin:
        set_origin(
            lm.model,
            {
                "layers": [origin["layers"][i] for i in kept],
                "heads": {str(j): origin["heads"][str(i)] for j, i in enumerate(kept)},
            },
        )
    return {"removed": layers, "kept": kept, "layers_before": n}


def prune_layers(lm, layers=None, n: int | None = None, calib=None) -> dict:
    """Remove the given ``layers``, or the ``n`` least influential blocks (block influence on ``calib``)."""
    scores = None
    if layers is None:
        if not n:
            raise LmscopeError("say which layers to remove, or how many", "e.g. --prune-layers 3,7")
        scores = block_influence(lm, calib)
        layers = sorted(sorted(range(lm.n_layers), key=lambda i: scores[i])[:n])
    info = remove_layers(lm, layers)
    if scores is not None:
        info["block_influence"] = [round(s, 6) for s in scores]
    return info


def rebuild_layers(model, info: dict) -> None:
    """Drop the same blocks from a freshly built model, unless its config already has the final depth."""
    from ...lm import LM

    lm = LM(model, None)
    if lm.n_layers == info["layers_before"]:
        remove_layers(lm, info["removed"], track_origin=False)
