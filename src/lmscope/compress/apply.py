"""``compress(lm, recipe)``: run a recipe's steps in order and return what changed (``CompressResult``)."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LmscopeError
from ..progress import track
from .recipe import Calibration, Recipe, StepConfig, handler_for
from .size import state_bytes


def as_recipe(recipe) -> Recipe:
    """A Recipe from a Recipe, one step, a list of steps, a dict or a path to a JSON file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, StepConfig):
        return Recipe((recipe,))
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_json(recipe)
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (list, tuple)):
        if all(isinstance(s, StepConfig) for s in recipe):
            return Recipe.of(*recipe)
        return Recipe.from_dict(list(recipe))
    raise LmscopeError(
        f"cannot read a recipe from {type(recipe).__name__}", "pass a Recipe, steps or a JSON path"
    )


def _params(model) -> int:
    """Logical parameter count: a quantized linear counts in*out however it is packed; tied tensors once."""
    from ..lm import count_params

    return count_params(model)


@dataclass
class CompressResult:
    """The compressed model and, per step, what its handler reported (``infos``, JSON)."""

    lm: Any  # the compressed LM
    recipe: Recipe
    infos: list[dict]
    bytes_before: int
    bytes_after: int
    params_before: int
    params_after: int
    seconds: float
    original: Any = None  # the untouched LM (None when compressed in place)
    meta: dict = field(default_factory=dict)

    def layer_errors(self) -> list[dict]:
        """Per-layer quantization error rows (SQNR, output error), worst first."""
        for step, info in zip(self.recipe.steps, self.infos):
            if step.kind == "quantize":
                return info.get("layers", [])
        return []

    def structure_diff(self):
        if self.original is None:
            return None
        from .structure import structure_diff

        return structure_diff(self.original.model, self.lm.model, "original", "compressed")

    def summary(self) -> dict:
        return {
            "model": getattr(self.lm, "name", "model"),
            "recipe": self.recipe.to_dict(),
            "describe": self.recipe.describe(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_ratio": round(self.bytes_after / max(1, self.bytes_before), 4),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": round(self.seconds, 2),
            "steps": [{"step": s.to_dict(), "info": i} for s, i in zip(self.recipe.steps, self.infos)],
        }

    def to_text(self, worst: int = 5) -> str:
        mb = 2**20
        lines = [
            f"recipe: {self.recipe.describe()}",
            f"bytes:  {self.bytes_before / mb:.1f} MB -> {self.bytes_after / mb:.1f} MB "
            f"({self.bytes_after / max(1, self.bytes_before):.1%})",
            f"params: {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M",
        ]
        rows = self.layer_errors()
        if rows:
            lines.append(f"worst {min(worst, len(rows))} layers (SQNR, dB; output on calibration text):")
            for r in rows[:worst]:
                out = "—" if r["output_sqnr_db"] is None else f"{r['output_sqnr_db']:.1f}"
                lines.append(
                    f"  {r['layer']:<40} weight {r['weight_sqnr_db']:6.1f}  output {out:>6}  {r['how']}"
                )
        return "\n".join(lines)

    def report(self, path: str | os.PathLike | None = None) -> str:
        """Self-contained HTML: summary, structure diff, per-layer SQNR (``views.compress``)."""
        from ..views.compress import compress_report

        rep = compress_report(self)
        if path is not None:
            rep.write(path)
        return rep.render()

    def save(self, directory: str | os.PathLike) -> Path:
        from .storage import save

        return save(self, directory)


def compress(lm, recipe, calibration_text: str | None = None, inplace: bool = False) -> CompressResult:
    """Apply ``recipe`` to ``lm`` (a copy unless ``inplace``) and return the result.

    ``calibration_text`` defaults to the calibration half of lmscope's built-in text, which never overlaps
    the evaluation half. Every step's config is validated against the model before any step runs.
    """
    from ..lm import LM

    recipe = as_recipe(recipe)
    recipe.check(lm)
    handlers = [handler_for(s) for s in recipe.steps]
    original = None
    if not inplace:
        original = lm
        lm = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
    before_bytes, before_params = state_bytes(lm.model), _params(lm.model)
    calib = Calibration(lm, calibration_text)
    infos = []
    start = time.perf_counter()
    with torch.no_grad():
        steps = list(zip(recipe.steps, handlers))
        for step, handler in track(steps, "compress", unit="step") if len(steps) > 1 else steps:
            t = time.perf_counter()
            info = handler.apply(lm, step, calib) or {}
            info.setdefault("seconds", round(time.perf_counter() - t, 2))
            infos.append(info)
    lm.model.eval()
    lm._lmscope_modified = True
    lm.compressed_by = recipe
    return CompressResult(
        lm=lm,
        recipe=recipe,
        infos=infos,
        bytes_before=before_bytes,
        bytes_after=state_bytes(lm.model),
        params_before=before_params,
        params_after=_params(lm.model),
        seconds=time.perf_counter() - start,
        original=original,
    )
