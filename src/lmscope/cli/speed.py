"""CLI plumbing for long jobs (explain, patch, heads, dla): torch's thread count and progress bars.

Threads: torch defaults to one intra-op thread per core and ignores what else runs; on a shared
machine that oversubscribes the cores and makes every matmul wait (5–10× slower measured on 2 cores
at load 4). lmscope uses the cores it may run on (``os.sched_getaffinity``) minus the other processes
running now (the runnable count of ``/proc/loadavg``, median of a few samples; the 1-minute load average where
that file does not exist), at least 1 — unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise. The
1-minute average lags: a job that ended a few seconds ago still counts in it (measured: the default explain
took 17.8–19.4 s on 1 thread right after another job, 13.2–14.8 s on 2 on the then idle machine).
"""

from __future__ import annotations

import os

THREADS_HELP = (
    "torch intra-op threads (default: the CPUs this process may use minus the other processes running now, "
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
    load = others_running()
    return max(1, min(cpus, int(cpus - load + 0.5)))


def others_running(samples: int = 5, path: str = "/proc/loadavg") -> float:
    """Processes other than this one running or runnable now: the median of ``samples`` reads of the runnable
    count in ``/proc/loadavg`` (4th field ``running/total``, this process included), 10 ms apart; the 1-minute
    load average where the file cannot be read."""
    import time

    seen = []
    for i in range(samples):
        try:
            with open(path) as f:
                seen.append(max(0, int(f.read().split()[3].split("/")[0]) - 1))
        except (OSError, IndexError, ValueError):
            break
        if i + 1 < samples:
            time.sleep(0.01)
    if seen:
        return float(sorted(seen)[len(seen) // 2])
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


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
