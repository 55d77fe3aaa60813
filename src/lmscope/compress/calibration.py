"""Calibration data for the data-aware steps (Wanda, activation ordering, ASVD, SmoothQuant, GPTQ, head
importance) and the statistics they take from it: one abstraction, ``Calibration``.

By default the calibration half of lmscope's built-in text (``lmscope.data.split_calibration_evaluation``),
which never overlaps the evaluation half. Token windows are cut by ``lmscope.data.token_windows``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..progress import track

#: calibration budget used when a step does not say: windows x tokens
DEFAULT_WINDOWS = 8
DEFAULT_WINDOW_TOKENS = 256


def default_calibration_text() -> str:
    """The calibration half of lmscope's built-in text (never overlaps the evaluation half)."""
    from ..data import builtin_text, split_calibration_evaluation

    return split_calibration_evaluation(builtin_text())[0]


def encoded_windows(lm, text: str, windows: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``windows`` consecutive windows of ``tokens`` tokens of ``text``, as batch-1 model inputs."""
    from ..data import token_windows

    rows = token_windows(lm, text, max_tokens=windows * tokens, window=tokens)  # [n, tokens]
    return [
        {"input_ids": r[None], "attention_mask": torch.ones(1, r.shape[0], dtype=torch.long)} for r in rows
    ]


class Calibration:
    """Calibration data for one ``compress`` call, built lazily (text -> token windows).

    ``Calibration.of(lm, calib)`` accepts what the step functions accept: None (the built-in text), a
    Calibration, a text, a list of texts, or already encoded inputs (a dict or a list of dicts).
    """

    def __init__(
        self,
        lm,
        text: str | None = None,
        window: int = DEFAULT_WINDOW_TOKENS,
        n_windows: int = DEFAULT_WINDOWS,
        batches: list[dict[str, torch.Tensor]] | None = None,
    ):
        self.lm = lm
        self._text = text
        self.window = window
        self.n_windows = n_windows
        self._batches = batches

    @classmethod
    def of(cls, lm, calib=None) -> Calibration:
        if isinstance(calib, Calibration):
            return calib
        if calib is None or isinstance(calib, str):
            return cls(lm, calib)
        if isinstance(calib, dict):
            return cls(lm, batches=[calib])
        items = list(calib)
        if items and isinstance(items[0], dict):
            return cls(lm, batches=items)
        out: list[dict] = []
        for text in items:  # several texts fill the window budget in turn
            out.extend(encoded_windows(lm, text, DEFAULT_WINDOWS - len(out), DEFAULT_WINDOW_TOKENS))
            if len(out) >= DEFAULT_WINDOWS:
                break
        return cls(lm, batches=out)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = default_calibration_text()
        return self._text

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """Encoded batch-1 inputs (``input_ids`` and ``attention_mask``), one per window."""
        if self._batches is None:
            window = min(self.window, self.lm.max_positions)
            self._batches = encoded_windows(self.lm, self.text, self.n_windows, window)
        return self._batches

    def windows(self) -> list[torch.Tensor]:
        """The token windows: a list of ``[1, window]`` LongTensors."""
        return [b["input_ids"] for b in self.batches()]


def calibration_inputs(lm, calib=None) -> list[dict[str, torch.Tensor]]:
    """Encoded calibration batches from anything ``Calibration.of`` accepts."""
    return Calibration.of(lm, calib).batches()


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
        for batch in track(calibration_inputs(lm, calib), "calibration", unit="window"):
            mask_holder["mask"] = batch["attention_mask"]
            lm.forward(batch)
    finally:
        for h in handles:
            h.remove()
    return sums


@torch.no_grad()
def capture_inputs(lm, names: list[str], windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input rows ``[tokens, in_features]`` each named module sees over ``windows`` (float32)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:

        def pre(mod, args, n=n):
            x = args[0]
            got[n].append(x.detach().reshape(-1, x.shape[-1]).float())

        handles.append(lm.model.get_submodule(n).register_forward_pre_hook(pre))
    try:
        for ids in windows:
            lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items() if v}
