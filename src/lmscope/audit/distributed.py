"""Cases on Ray: a pool of actors, each holding the model once, audits batches; results come back in
submission order (Ray's ``ActorPool``), so the records — and every metric computed from them — equal an
in-process run's. Uses ``scan``'s Ray start-up; at most ``2 * workers`` batches are in flight."""

from __future__ import annotations

from ..errors import LmscopeError
from ..scan.distributed import _start, require_ray


def _auditor_class(ray):
    @ray.remote(num_cpus=1)
    class CaseAuditor:
        def __init__(self, model: str, dtype: str, threads: int, decider_args: dict):
            import torch

            import lmscope

            from .decider import make_decider

            torch.set_num_threads(threads)
            lm = lmscope.load(model, progress=False)
            if str(next(lm.model.parameters()).dtype).replace("torch.", "") != dtype:
                lm.model.to(getattr(torch, dtype))
            self.decider = make_decider(lm, **decider_args)

        def run(self, batch, settings):
            from .engine import _audit_batch

            return _audit_batch(self.decider, batch, **settings)

    return CaseAuditor


def run_on_ray(lm, batches, decider_args: dict, settings: dict, address: str, workers: int):
    """Yield (batch, records) for every batch, in order, computed on Ray actors."""
    ray = require_ray()
    if not lm.path:
        raise LmscopeError(
            "--ray needs a model that workers can open by name or path (this one was built in memory)",
            "save it with save_pretrained and audit the directory",
        )
    if workers < 1:
        raise LmscopeError("--workers must be positive", "e.g. --workers 2")
    started = _start(ray, address, workers)
    try:
        from ray.util import ActorPool

        dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        cls = _auditor_class(ray)
        threads = max(1, int(ray.available_resources().get("CPU", workers)) // workers)
        pool = ActorPool([cls.remote(lm.path, dtype, threads, decider_args) for _ in range(workers)])
        pending = []
        for batch in batches:
            pool.submit(lambda actor, job: actor.run.remote(*job), (batch, settings))
            pending.append(batch)
            if len(pending) >= 2 * workers:
                yield pending.pop(0), pool.get_next()
        while pending:
            yield pending.pop(0), pool.get_next()
    finally:
        if started:
            ray.shutdown()
