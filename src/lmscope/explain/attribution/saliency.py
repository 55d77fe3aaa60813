"""Saliency (Simonyan et al. 2014): the L2 norm of ∂f/∂embedding for each token (unsigned)."""

from __future__ import annotations

from dataclasses import dataclass

from ..targets import Objective
from .base import AttributionMethod, register


@register
@dataclass
class Saliency(AttributionMethod):
    name = "saliency"
    kind = "gradient"
    summary = "gradient norm ‖∂f/∂embedding‖₂ per token"
    signed = False

    def compute(self, obj: Objective):
        return obj.grad_at_input().norm(dim=-1), {}
