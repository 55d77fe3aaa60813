"""Estimate a capture's memory before running it, and refuse one that would not fit."""

from __future__ import annotations

import os

from ..errors import LmscopeError
from .names import numel


def available_bytes() -> int:
    """Memory the OS says is available now (MemAvailable), or total physical memory as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_bytes(lm, names: list[str], batch: int, seq: int, bytes_per_value: int = 4) -> int:
    """Bytes the captured tensors will take for a [batch, seq] input (shapes from the site table)."""
    return sum(numel(lm, name, batch, seq) for name in names) * bytes_per_value


def check_fits(lm, names: list[str], batch: int, seq: int, max_bytes: int | None = None) -> int:
    """Raise a clear error when the capture would take more than ``max_bytes`` (default: half of free RAM)."""
    need = estimate_bytes(lm, names, batch, seq)
    limit = max_bytes if max_bytes is not None else available_bytes() // 2
    if need > limit:
        raise LmscopeError(
            f"capturing {len(names)} tensors for {batch}x{seq} tokens needs ~{need / 2**30:.1f} GiB, "
            f"over the {limit / 2**30:.1f} GiB limit",
            "capture fewer names (--capture 'blocks.*.resid_post'), shorten the text, "
            "or raise the limit with --max-capture-gb",
        )
    return need
