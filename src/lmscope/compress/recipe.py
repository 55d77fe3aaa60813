"""Compression recipes: an ordered, validated list of step configs (``lmscope.compress.steps``) that
round-trips to JSON and reproduces exactly. Handlers live in ``lmscope.compress.registry``, calibration in
``lmscope.compress.calibration``; their names are re-exported here for existing imports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import LmscopeError
from .calibration import Calibration
from .registry import HANDLERS, StepHandler, handler_for, register_step
from .steps import (
    GROUP_SIZES,
    HEAD_METHODS,
    NEURON_METHODS,
    QUANT_SCHEMES,
    STAGE_LOWRANK,
    STAGE_PRUNE,
    STAGE_QUANTIZE,
    STEP_TYPES,
    UNSTRUCTURED_METHODS,
    LowRank,
    PruneHeads,
    PruneLayers,
    PruneNeurons,
    PruneUnstructured,
    Quantize,
    StepConfig,
    register_step_type,
    step_from_dict,
)

__all__ = [
    "GROUP_SIZES",
    "HANDLERS",
    "HEAD_METHODS",
    "NEURON_METHODS",
    "QUANT_SCHEMES",
    "STAGE_LOWRANK",
    "STAGE_PRUNE",
    "STAGE_QUANTIZE",
    "STEP_TYPES",
    "UNSTRUCTURED_METHODS",
    "Calibration",
    "LowRank",
    "PruneHeads",
    "PruneLayers",
    "PruneNeurons",
    "PruneUnstructured",
    "Quantize",
    "Recipe",
    "StepConfig",
    "StepHandler",
    "handler_for",
    "register_step",
    "register_step_type",
    "step_from_dict",
]


# -- recipes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps. Stacked steps run structure-first: pruning, low-rank, quantization."""

    steps: tuple = ()

    def __post_init__(self):
        steps = tuple(self.steps)
        if not steps:
            raise LmscopeError(
                "the recipe has no steps",
                "pass --quantize, --prune-heads, --prune-unstructured, --prune-neurons, --prune-layers, "
                "--lowrank-rank/--lowrank-energy or --recipe file.json",
            )
        for s in steps:
            if getattr(s, "kind", None) not in STEP_TYPES:
                raise LmscopeError(
                    f"not a recipe step: {s!r}"[:200], "build steps from lmscope.compress.recipe"
                )
        stages = [s.stage for s in steps]
        if stages != sorted(stages):
            raise LmscopeError(
                "recipe steps are out of order: " + " -> ".join(s.kind for s in steps),
                "put pruning first, then low-rank, then quantization (quantized weights cannot be pruned)",
            )
        quantizers = [s for s in steps if s.stage == STAGE_QUANTIZE]
        if len(quantizers) > 1 and not all(s.modules for s in quantizers):
            # several quantize steps = per-layer schemes; each must say which modules it owns
            raise LmscopeError(
                "the recipe quantizes twice",
                'keep one quantize step, or give each quantize step its own "modules" (per-layer schemes)',
            )
        independent = [i for i, s in enumerate(quantizers) if getattr(s, "independent", False)]
        if independent and independent != list(range(len(independent))):
            # their Hessians come from the unquantized model: no other quantization may run before them
            raise LmscopeError(
                "a gptq4 step with sequential false (or a gptq4 embedding) comes after another quantize step",
                "put the non-sequential gptq4 steps (and the one with a gptq4 embedding) first among the "
                "quantize steps",
            )
        object.__setattr__(self, "steps", steps)

    @classmethod
    def of(cls, *steps) -> Recipe:
        """Build a recipe, ordering the steps structure-first (stable: same-stage steps keep their order)."""
        return cls(tuple(sorted(steps, key=lambda s: s.stage)))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d) -> Recipe:
        steps = d.get("steps") if isinstance(d, dict) else d
        if not isinstance(steps, list):
            raise LmscopeError(
                'a recipe must be {"steps": [...]} or a list of steps',
                'e.g. {"steps": [{"kind": "quantize", "scheme": "int8"}]}',
            )
        return cls(tuple(step_from_dict(s) for s in steps))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Recipe:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LmscopeError(
                f"recipe file '{path}' does not exist", "check the path given to --recipe"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmscopeError(f"recipe file '{path}' is not valid JSON: {e}", "fix the JSON") from None
        return cls.from_dict(data)

    def check(self, lm) -> None:
        for s in self.steps:
            s.check(lm)
        owner: dict[str, str] = {}
        for s in (s for s in self.steps if s.stage == STAGE_QUANTIZE and len(self.steps) > 1):
            for name in s.selected_modules(lm) if s.modules else ():
                if name in owner:
                    raise LmscopeError(
                        f"'{name}' is selected by two quantize steps ({owner[name]} and {s.describe()})",
                        "give each quantize step a disjoint module filter",
                    )
                owner[name] = s.describe()

    def describe(self) -> str:
        return " -> ".join(s.describe() for s in self.steps)
