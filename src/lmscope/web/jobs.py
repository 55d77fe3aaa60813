"""Background jobs for ``lmscope serve``: a small thread pool, one lock per model, progress and cancel.

A job is a function ``work(ctx)`` run on a worker thread. It reports progress with
``ctx.progress(fraction, message)`` and calls ``ctx.check()`` between steps: cancelling is cooperative,
so a cancelled job stops at its next step boundary (a single forward pass is never interrupted).
Jobs on the same model queue behind its lock; the web server's own thread never runs model work.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import LmscopeError

QUEUED, RUNNING, DONE, ERROR, CANCELLED = "queued", "running", "done", "error", "cancelled"
FINISHED = (DONE, ERROR, CANCELLED)


class Cancelled(Exception):
    """Raised inside a job by ``ctx.check()`` once the job was cancelled."""


@dataclass
class Job:
    id: str
    kind: str
    model: str
    status: str = QUEUED
    progress: float = 0.0
    message: str = "queued"
    error: str | None = None
    result: Any = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: bool = False
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "status": self.status,
            "progress": round(self.progress, 4),
            "message": self.message,
            "error": self.error,
        }

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class JobContext:
    """What a running job sees: progress reporting and the cancel check."""

    def __init__(self, job: Job):
        self.job = job

    def check(self) -> None:
        if self.job.cancel_requested:
            raise Cancelled()

    def progress(self, fraction: float, message: str) -> None:
        self.check()
        self.job.progress = max(0.0, min(1.0, float(fraction)))
        self.job.message = message


class JobManager:
    """Runs jobs on ``workers`` threads; jobs naming the same model run one at a time (queued).

    Finished jobs are kept (newest ``keep`` of them) so their results can be fetched and downloaded.
    """

    def __init__(self, workers: int = 4, keep: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lmscope-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._model_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def model_lock(self, model: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(model, threading.Lock())

    def submit(
        self,
        kind: str,
        models: str | list[str],
        work: Callable[[JobContext], Any],
        cleanup: Callable[[], None] | None = None,
    ) -> Job:
        """Queue ``work(ctx)``; it runs holding the lock of every model in ``models`` (in sorted order).
        ``cleanup()`` runs once the job ends, however it ends (done, failed, or cancelled while queued)."""
        names = sorted({models} if isinstance(models, str) else set(models))
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, model="+".join(names))
        with self._lock:
            self._jobs[job.id] = job
            self._trim()
        self._pool.submit(self._run, job, names, work, cleanup)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.status not in FINISHED:
            job.cancel_requested = True
            job.message = "cancelling…"
        return job

    def busy(self) -> int:
        with self._lock:
            return sum(j.status in (QUEUED, RUNNING) for j in self._jobs.values())

    def shutdown(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel_requested = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- internals --------------------------------------------------------------------------------
    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.status in FINISHED]
        for k in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[k]

    def _acquire(self, job: Job, locks: list[threading.Lock]) -> list[threading.Lock]:
        held = []
        try:
            for lock in locks:
                # poll so a job still waiting in the queue can be cancelled
                while not lock.acquire(timeout=0.05):
                    if job.cancel_requested:
                        raise Cancelled()
                held.append(lock)
        except BaseException:
            for lock in reversed(held):
                lock.release()
            raise
        return held

    def _run(self, job: Job, names: list[str], work: Callable[[JobContext], Any], cleanup=None) -> None:
        ctx = JobContext(job)
        held: list[threading.Lock] = []
        try:
            if len(names) and any(self.model_lock(n).locked() for n in names):
                job.message = "waiting: the model is busy with another job"
            held = self._acquire(job, [self.model_lock(n) for n in names])
            ctx.check()
            job.status, job.message = RUNNING, "running"
            job.result = work(ctx)
            ctx.check()
            job.status, job.progress, job.message = DONE, 1.0, "done"
        except Cancelled:
            job.status, job.message = CANCELLED, "cancelled"
        except LmscopeError as e:
            job.status, job.error, job.message = ERROR, str(e), "failed"
        except Exception as e:  # a bug, not bad input: keep the server alive and say what happened
            traceback.print_exc()
            job.status, job.error, job.message = ERROR, f"internal error: {type(e).__name__}: {e}", "failed"
        finally:
            for lock in reversed(held):
                lock.release()
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:  # a cleanup that fails must not hide the job's own outcome
                    traceback.print_exc()
            job.finished = time.time()
            job._done.set()
