"""Calibration inputs and activation statistics for the data-aware pruners (Wanda, activation ordering, ASVD)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: calibration budget used when a step does not say: windows x tokens
DEFAULT_WINDOWS = 8
DEFAULT_WINDOW_TOKENS = 256


def default_calibration_text() -> str:
    """The calibration half of lmscope's built-in text (never overlaps the evaluation half)."""
    from ...data import builtin_text, split_calibration_evaluation

    return split_calibration_evaluation(builtin_text())[0]


def token_windows(
    lm, text: str, windows: int = DEFAULT_WINDOWS, tokens: int = DEFAULT_WINDOW_TOKENS
) -> list[dict[str, torch.Tensor]]:
    """Up to ``windows`` consecutive windows of ``tokens`` tokens (``lmscope.data.token_windows``), as
    encoded batch-1 inputs."""
    from ...data import token_windows as windows_of

    rows = windows_of(lm, text, max_tokens=windows * tokens, window=tokens)
    return [
        {"input_ids": r[None], "attention_mask": torch.ones(1, r.shape[0], dtype=torch.long)} for r in rows
    ]


def calibration_inputs(lm, calib=None, windows: int = DEFAULT_WINDOWS, tokens: int = DEFAULT_WINDOW_TOKENS):
    """Normalise ``calib`` (None, text, list of texts, encoded dict or list of them) to encoded batches."""
    if calib is None:
        calib = default_calibration_text()
    if hasattr(calib, "windows") and callable(calib.windows):  # lmscope.compress.recipe.Calibration
        return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in calib.windows()]
    if isinstance(calib, dict):
        return [calib]
    if isinstance(calib, str):
        return token_windows(lm, calib, windows, tokens)
    items = list(calib)
    if items and isinstance(items[0], dict):
        return items
    out = []
    for text in items:
        out.extend(token_windows(lm, text, windows - len(out), tokens))
        if len(out) >= windows:
            break
    return out


@torch.no_grad()
def input_sq_norms(lm, calib, paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """Sum over calibration tokens of x_j^2 for each input channel j of each module in ``paths``.

    ``sqrt`` of it is the ‖X_j‖₂ Wanda uses. Padding positions are excluded.
    """
    paths = list(paths)
    sums: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    handles = []

    def make(path):
        def hook(mod, args):
            x = args[0].detach().float()
            m = mask_holder.get("mask")
            if m is not None and m.shape == x.shape[:-1]:
                x = x[m.bool()]
            s = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[path] = sums[path] + s if path in sums else s

        return hook

    for p in paths:
        handles.append(lm.model.get_submodule(p).register_forward_pre_hook(make(p)))
    try:
        for batch in calibration_inputs(lm, calib):
            mask_holder["mask"] = batch["attention_mask"]
            lm.forward(batch)
    finally:
        for h in handles:
            h.remove()
    return sums
