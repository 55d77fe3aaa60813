"""Progress bars with an ETA on stderr (tqdm) for long library work, shown only when asked.

The CLI turns them on for a verb with ``with progress.enabled(not args.quiet):``; library code wraps its long
loops in ``progress.track(items, "what")``, which is the plain iterable unless progress is on and stderr is a
terminal. So the Python API stays silent, and piped or redirected output never gets bar fragments.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("lmscope_progress", default=False)


@contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within the block, ``track`` shows bars (when stderr is a terminal)."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def showing() -> bool:
    return _ON.get() and sys.stderr.isatty()


def track(items: Iterable, desc: str, total: int | None = None, unit: str = "it") -> Iterable:
    """``items``, with a bar (ETA from the rate so far) while progress is on and stderr is a terminal."""
    if not showing():
        return items
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextmanager
def bar(total: int, desc: str, unit: str = "it"):
    """A bar advanced by hand (``b.update(n)``); a no-op object when progress is off."""
    if not showing():
        yield _NoBar()
        return
    from tqdm import tqdm

    b = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        yield b
    finally:
        b.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass
