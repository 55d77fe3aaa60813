"""Where each remaining layer and head came from, kept in ``config.lmscope_origin`` (saved in config.json).

``{"layers": [original index of each current layer], "heads": {"<current layer>": [original head indices]}}``
lets ``compare`` line up a pruned model with its original and name the heads that were removed.
"""

from __future__ import annotations

KEY = "lmscope_origin"


def get_origin(model, n_layers: int | None = None, n_heads: int | None = None) -> dict:
    cfg = model.config
    raw = getattr(cfg, KEY, None) or {}
    n_layers = n_layers if n_layers is not None else cfg.num_hidden_layers
    n_heads = n_heads if n_heads is not None else cfg.num_attention_heads
    layers = list(raw.get("layers") or range(n_layers))
    heads = {str(i): list(raw.get("heads", {}).get(str(i), range(n_heads))) for i in range(len(layers))}
    return {"layers": layers, "heads": heads}


def set_origin(model, origin: dict) -> None:
    setattr(model.config, KEY, {"layers": list(origin["layers"]), "heads": dict(origin["heads"])})
