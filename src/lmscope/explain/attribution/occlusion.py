"""Occlusion: f(x) − f(x with one token occluded), one forward per token.

Two variants: ``replace`` (default) swaps the token for the baseline (pad/eos/mask token embedding or
the zero embedding) and keeps the length, so positions do not shift; ``delete`` removes the token
from the sequence (registered as ``occlusion_delete``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LmscopeError
from ..targets import Objective
from .base import AttributionMethod, register


@register
@dataclass
class Occlusion(AttributionMethod):
    name = "occlusion"
    kind = "perturbation"
    summary = "f(x) − f(x with the token replaced by the baseline), per token"

    variant: str = "replace"  # replace | delete

    def compute(self, obj: Objective):
        if self.variant == "replace":
            masks = ~torch.eye(obj.n, dtype=torch.bool)
            return obj.f_x - obj.f_masks(masks).double(), {"variant": self.variant}
        if self.variant == "delete":
            if obj.n < 2:
                raise LmscopeError("occlusion by deletion needs at least 2 tokens", "use a longer text")
            vals = [obj.f_x - obj.f_deleted([i]) if obj.free[i] else 0.0 for i in range(obj.n)]
            return torch.tensor(vals, dtype=torch.float64), {"variant": self.variant}
        raise LmscopeError(f"unknown occlusion variant '{self.variant}'", "use replace or delete")


@register
@dataclass
class OcclusionDelete(Occlusion):
    name = "occlusion_delete"
    summary = "f(x) − f(x with the token removed from the sequence), per token"

    variant: str = "delete"
