"""Estimate a capture's memory before running it, and refuse one that would not fit."""

from __future__ import annotations

import math
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
    """Raise a clear error when the capture would take more than ``max_bytes`` (default: half of free
    RAM). The fix names what would work: the longest text that fits, or the limit that would let it run
    when the machine has that much memory."""
    need = estimate_bytes(lm, names, batch, seq)
    limit = max_bytes if max_bytes is not None else available_bytes() // 2
    if need > limit:
        fits = _longest_fitting(lm, names, batch, seq, limit)
        fixes = [f"shorten the text to at most {fits} tokens" if fits else "shorten the text"]
        gb = math.ceil(need / 2**30 * 10) / 10
        if need < available_bytes() * 0.9:
            fixes.append(f"or raise the limit with --max-capture-gb {gb:.1f}")
        else:
            fixes.append(f"or use a machine with more than {gb:.1f} GiB free")
        raise LmscopeError(
            f"capturing {len(names)} tensors for {batch}x{seq} tokens needs ~{need / 2**30:.1f} GiB, "
            f"over the {limit / 2**30:.1f} GiB limit",
            " ".join(fixes),
        )
    return need


def _longest_fitting(lm, names: list[str], batch: int, seq: int, limit: int) -> int:
    """The largest token count whose capture fits in ``limit`` (estimate grows with the length)."""
    lo, hi = 0, seq
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_bytes(lm, names, batch, mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo
