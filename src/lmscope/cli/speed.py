"""CLI plumbing for long jobs (explain, patch, heads, dla): torch's thread count and progress bars.

Threads: torch defaults to one intra-op thread per core and ignores what else runs; on a shared
machine that oversubscribes the cores and makes every matmul wait (5–10× slower measured on 2 cores
at load 4). lmscope uses the cores it may run on (``os.sched_getaffinity``) minus the current load
(1-minute load average), at least 1 — unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import os

THREADS_HELP = (
    "torch intra-op threads (default: the CPUs this process may use minus the 1-minute load average, "
    "at least 1; OMP_NUM_THREADS, when set, is the default instead)"
)


def add_speed_args(p) -> None:
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def choose_threads(requested: int | None = None) -> int:
    """The intra-op thread count lmscope uses (see the module docstring)."""
    if requested is not None:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cpus, int(cpus - load + 0.5)))


def apply_threads(args) -> int:
    """Set torch's thread count from ``--threads`` (validated) or the machine; returns it."""
    from ..errors import LmscopeError

    requested = getattr(args, "threads", None)
    if requested is not None and requested < 1:
        raise LmscopeError(f"--threads must be at least 1, got {requested}", "e.g. --threads 2")
    import torch

    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


def progress_bar(desc: str, unit: str, quiet: bool = False, total: int | None = None):
    """tqdm on stderr with ETA, silent when stderr is not a terminal or with --quiet (``lmscope.progress.Bar``)."""
    from ..progress import Bar

    return Bar(desc, unit, total, quiet)
