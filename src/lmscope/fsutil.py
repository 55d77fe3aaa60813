"""Atomic output directories: write everything into a temporary sibling, move it into place on success."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# set by the CLI's SIGINT handler: a Ctrl-C that some library swallowed (a bare ``except`` around an optional
# import) is still honoured before anything is moved into place
INTERRUPTED = threading.Event()


@contextmanager
def atomic_directory(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; when the block succeeds its files move into ``final``.

    A new ``final`` appears in one rename; into an existing one, each file is replaced by a rename
    (or, with ``keep_existing``, the existing directory wins: a concurrent writer finished first).
    If the block raises, or Ctrl-C was pressed meanwhile (``INTERRUPTED``), nothing is written and the temporary
    directory is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        _apply_umask(tmp)  # mkdtemp makes 0700 and some writers 0600: give what a plain mkdir/open would
        if not final.exists():
            os.replace(tmp, final)
        elif not keep_existing:
            for item in tmp.iterdir():
                target = final / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """chmod ``root`` and everything under it to the modes the user's umask gives new folders/files."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)
