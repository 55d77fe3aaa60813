"""Which modules a compression step acts on: the block linears, module swaps by path, and the module filter
(fqn globs, like torchao's ``filter_fn``) every step takes."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from ..errors import LmscopeError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (relative to ``root``) by ``new``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def block_linears(lm, conv1d: bool = True) -> list[tuple[str, nn.Module]]:
    """(model-relative path, module) of every ``nn.Linear`` inside the transformer blocks, in model order;
    with ``conv1d`` GPT-2's ``Conv1D`` layers too (the pruners and low-rank handle both layouts)."""
    prefix = lm.family.blocks
    return [
        (f"{prefix}.{name}", mod)
        for name, mod in lm.model.get_submodule(prefix).named_modules()
        if isinstance(mod, nn.Linear) or (conv1d and is_conv1d(mod))
    ]


def matches(path: str, patterns) -> bool:
    """``path`` matches one of the fqn globs (an empty filter matches everything)."""
    return not patterns or any(fnmatchcase(path, p) for p in patterns)


def filter_modules(paths, patterns, kind: str, what: str = "module") -> list[str]:
    """The ``paths`` a step may change under its module filter ``patterns`` (fqn globs such as
    ``model.layers.*.mlp.*``). A glob that matches none of ``paths`` is an error naming examples."""
    paths = list(paths)
    if not patterns:
        return paths
    for p in patterns:
        if not any(fnmatchcase(x, p) for x in paths):
            examples = ", ".join(paths[:3]) + (f", … ({len(paths)} in all)" if len(paths) > 3 else "")
            raise LmscopeError(
                f"module filter '{p}' of step '{kind}' matches no {what} it acts on",
                f"use fqn globs over these names: {examples or '(none)'}",
            )
    return [x for x in paths if matches(x, patterns)]
