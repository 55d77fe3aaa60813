"""Step handlers by step kind: ``@register_step(ConfigClass)`` on a handler class registers one instance.

A handler has ``apply(lm, step, calib) -> dict`` (mutates ``lm.model`` in place; returns JSON-able
info/metrics for the report, saved in ``lmscope_recipe.json``) and ``rebuild(model, step, info) -> None``
(re-creates module structure/shapes on a freshly constructed model *before* its saved state dict is loaded).

Handlers are found, not listed: every subpackage of ``lmscope.compress`` (one per step family: quantize/,
prune/, lowrank/) is imported once, and the handlers it defines register themselves. A new step family is a
new subpackage with a config (``lmscope.compress.steps``) and a decorated handler; nothing else to edit.
An import error inside a family is raised, never swallowed.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Protocol

from ..errors import LmscopeError


class StepHandler(Protocol):
    def apply(self, lm, step, calib) -> dict: ...

    def rebuild(self, model, step, info: dict) -> None: ...


HANDLERS: dict[str, StepHandler] = {}
_discovered = False


def register_step(config_cls: type):
    """Class decorator: ``@register_step(PruneHeads) class HeadPruner: def apply(...); def rebuild(...)``."""

    def deco(handler_cls):
        HANDLERS[config_cls.kind] = handler_cls() if isinstance(handler_cls, type) else handler_cls
        return handler_cls

    return deco


def discover_handlers() -> None:
    """Import every step-family subpackage of ``lmscope.compress`` once (importing registers)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__name__.rpartition(".")[0])
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def handler_for(step) -> StepHandler:
    if step.kind not in HANDLERS:
        discover_handlers()
    if step.kind not in HANDLERS:
        raise LmscopeError(
            f"no handler is registered for recipe step '{step.kind}'",
            "this lmscope build does not implement it yet",
        )
    return HANDLERS[step.kind]
