"""The one exception type users see: a problem and its fix, printed as one line by the CLI."""

from __future__ import annotations


class LmscopeError(Exception):
    """A user-facing error. ``str(err)`` is one line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)
