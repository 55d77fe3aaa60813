"""Input × gradient: Σ_d embedding · ∂f/∂embedding per token (a first-order Taylor term)."""

from __future__ import annotations

from dataclasses import dataclass

from ..targets import Objective
from .base import AttributionMethod, register


@register
@dataclass
class InputXGradient(AttributionMethod):
    name = "input_x_gradient"
    kind = "gradient"
    summary = "Σ_d x·∂f/∂x per token (with baseline='zero' this is IG's one-step limit)"

    def compute(self, obj: Objective):
        return (obj.grad_at_input() * obj.x).sum(-1), {}
