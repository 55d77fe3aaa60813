"""Kernel SHAP (Lundberg & Lee 2017) as a sparse linear surrogate of the model over token presence.

Coalitions z ∈ {0,1}ⁿ (absent tokens → baseline embedding, length kept) are sampled from the Shapley
kernel (size s with probability ∝ (n−1)/(s(n−s)), then a uniform subset), f is measured on each, and
a linear model f(z) ≈ f(∅) + z·φ is fit by least squares under the efficiency constraint
Σφ = f(x) − f(∅). Sparse: only the ``max_features`` tokens with the largest |φ| are kept and the model
is refit on them (LIME's default of 10). ``info.r2`` is the surrogate's R² on the samples — how well
the explanatory model explains the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..targets import Objective
from .base import AttributionMethod, register


def constrained_lstsq(z: np.ndarray, y: np.ndarray, total: float, ridge: float = 1e-9) -> np.ndarray:
    """argmin ‖y − zφ‖² subject to Σφ = total (KKT system)."""
    m = z.shape[1]
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = z.T @ z + ridge * np.eye(m)
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.concatenate([z.T @ y, [total]])
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:m]


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0


@register
@dataclass
class KernelShap(AttributionMethod):
    name = "kernel_shap"
    kind = "perturbation"
    summary = "sparse linear surrogate over token presence (Shapley-kernel samples), with its fit R²"

    n_samples: int = 256
    max_features: int = 10
    seed: int = 0

    def compute(self, obj: Objective):
        free = np.nonzero(obj.free.numpy())[0]
        m = len(free)
        scores = torch.zeros(obj.n, dtype=torch.float64)
        if m == 0:
            return scores, {"r2": 1.0, "n_features": 0, "n_samples": 0}
        rng = np.random.default_rng(self.seed)
        z = np.ones((self.n_samples, m), dtype=bool)
        if m > 1:
            sizes = np.arange(1, m)
            p = (m - 1) / (sizes * (m - sizes))
            for row, s in zip(z, rng.choice(sizes, size=self.n_samples, p=p / p.sum())):
                row[rng.choice(m, size=m - s, replace=False)] = False
        masks = torch.ones(self.n_samples, obj.n, dtype=torch.bool)
        masks[:, torch.as_tensor(free)] = torch.as_tensor(z)
        y = obj.f_masks(masks).double().numpy() - obj.f_baseline
        total = obj.f_x - obj.f_baseline
        zf = z.astype(np.float64)
        phi = constrained_lstsq(zf, y, total)
        keep = np.arange(m)
        if self.max_features and m > self.max_features:
            keep = np.sort(np.argsort(-np.abs(phi))[: self.max_features])
            phi = np.zeros(m)
            phi[keep] = constrained_lstsq(zf[:, keep], y, total)
        scores[torch.as_tensor(free)] = torch.as_tensor(phi)
        info = {"r2": r_squared(y, zf @ phi), "n_features": int(len(keep)), "n_samples": self.n_samples}
        return scores, info
