"""The attribution base class, its result type and the registry that finds methods by name.

A method is one file in this package: a dataclass whose fields are its configuration (plain data,
``to_dict()`` round-trips), decorated with ``@register``, with one method ``attribute(objective)``.
Adding a method adds a file (``_load_all`` finds it) and a row in the contract-test table
(tests/explain/test_attribution.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...errors import LmscopeError
from ..targets import Objective

REGISTRY: dict[str, type[AttributionMethod]] = {}


@dataclass
class Attribution:
    """What one method says about one input: ``scores`` has one value per token (or per layer when
    ``unit == "layer"``); ``info`` holds method-specific numbers (IG: steps, completeness error...)."""

    method: str
    scores: list[float]
    unit: str = "token"
    info: dict = field(default_factory=dict)
    faithfulness: dict | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    flags: list[dict] = field(default_factory=list)  # checks it fails (faithfulness.flags_for)

    def to_dict(self) -> dict:
        d = {"scores": [float(s) for s in self.scores], "unit": self.unit, "faithfulness": self.faithfulness}
        d["flags"] = self.flags
        d.update({k: v for k, v in self.info.items() if not k.startswith("_")})
        d["seconds"] = round(self.seconds, 4)
        d["config"] = self.config
        return d


@dataclass
class AttributionMethod:
    """Base of every method. Subclasses set the class attributes and implement ``compute``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "gradient"  # gradient | perturbation | attention | layer
    unit: ClassVar[str] = "token"
    summary: ClassVar[str] = ""
    causal_only: ClassVar[bool] = False
    signed: ClassVar[bool] = True  # scores can be negative (direction matters)

    def supports(self, lm) -> str | None:
        """None when the method applies to ``lm``; otherwise why not (one line)."""
        if self.causal_only and not lm.is_causal:
            return f"{self.name} needs a causal LM with an unembedding"
        return None

    def compute(self, objective: Objective) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def attribute(self, objective: Objective) -> Attribution:
        why = self.supports(objective.lm)
        if why:
            raise LmscopeError(why, "choose another method (lmscope explain --methods list)")
        t0 = time.perf_counter()
        scores, info = self.compute(objective)
        scores = scores.detach().double().reshape(-1)
        if self.unit == "token":
            scores = torch.where(objective.free, scores, torch.zeros_like(scores))
        return Attribution(
            method=self.name,
            scores=scores.tolist(),
            unit=self.unit,
            info=info,
            seconds=time.perf_counter() - t0,
            config=self.to_dict(),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: make ``cls`` findable by ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"attribution method name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    _load_all()
    return list(REGISTRY)


def get_method(name: str, **config) -> AttributionMethod:
    """An instance of the method registered as ``name``. A ``config`` key the method does not have is an
    error naming the ones it has; a value of None means "the default"."""
    _load_all()
    if name not in REGISTRY:
        raise LmscopeError(
            f"unknown attribution method '{name}'", f"use one of: {', '.join(REGISTRY)} (or --methods list)"
        )
    cls = REGISTRY[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise LmscopeError(
            f"attribution method '{name}' has no setting {', '.join(map(repr, unknown))}",
            f"its settings are: {', '.join(fields) or '(none)'}",
        )
    return cls(**{k: v for k, v in config.items() if v is not None})


#: modules of this package that hold no method
NOT_METHODS = frozenset({"base", "report"})
_loaded = False


def _load_all() -> None:
    """Import every module of this package once: each ``@register``-decorated method registers itself.

    Found with ``pkgutil``, so adding a method is adding a file; ``_private`` modules and ``NOT_METHODS``
    are skipped.
    """
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    package = importlib.import_module(__name__.rpartition(".")[0])
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name not in NOT_METHODS:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True
