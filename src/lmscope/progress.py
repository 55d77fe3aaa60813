"""Progress bars with an ETA on stderr (tqdm) for long library work, shown only when asked.

The CLI turns them on for a verb with ``with progress.enabled(not args.quiet):``; library code wraps its long
loops in ``progress.track(items, "what")``, which is the plain iterable unless progress is on and stderr is a
terminal. So the Python API stays silent, and piped or redirected output never gets bar fragments. Verbs that
drive a bar from a progress callback use ``Bar`` directly (``cli.speed.progress_bar``).
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


class Bar:
    """A tqdm bar on stderr with an ETA; every method is a no-op when ``quiet`` or stderr is not a terminal.

    Advance it by steps (``update(n)``) or to a point (``update_to(done, total, message)``, the shape of the
    progress callbacks in ``lmscope.explain``)."""

    def __init__(self, desc: str, unit: str = "it", total: int | None = None, quiet: bool = False):
        self._bar = None
        if quiet or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def update_to(self, done, total, message: str | None = None) -> None:
        """``done`` of ``total`` finished (numbers or fractions)."""
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.n = done
        self._bar.refresh()

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def bar(total: int, desc: str, unit: str = "it") -> Iterator[Bar]:
    """A ``Bar`` for the block, shown only while progress is on (``enabled``)."""
    b = Bar(desc, unit, total, quiet=not _ON.get())
    try:
        yield b
    finally:
        b.close()
