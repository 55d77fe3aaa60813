"""The Ray executor: a pool of actors, each holding the model once, runs shards; the driver merges in order.

The driver tokenizes and cuts shards (cheap), the actors run ``shard.run_shard`` (the forward passes),
and results come back through Ray's ``ActorPool`` in submission order, so the merge is the same exact,
ordered fold as in-process: identical top-k, and statistics equal up to float rounding of the batches.
At most ``2 * workers`` shards are in flight, so memory stays flat whatever the corpus size.
Ray is optional (``pip install lmscope[scale]``) and imported only here.
"""

from __future__ import annotations

import os

from ..errors import LmscopeError


def require_ray():
    try:
        import ray
    except ImportError:
        raise LmscopeError(
            "--ray needs Ray, which is not installed",
            "pip install 'lmscope[scale]' (or pip install 'ray[data]')",
        ) from None
    return ray


def _start(ray, address: str, workers: int) -> bool:
    """Connect to ``address`` or start a local runtime ('auto'/'local'); True when this call started it."""
    if ray.is_initialized():
        return False
    env = {
        k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ
    }
    common = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": "ERROR"}
    if address in ("auto", "local") and not os.environ.get("RAY_ADDRESS"):
        ray.init(
            num_cpus=max(workers, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            **common,
        )
    else:
        try:
            ray.init(address=None if address in ("auto", "local") else address, **common)
        except ConnectionError as e:
            raise LmscopeError(
                f"cannot reach the Ray cluster at '{address}': {e}", "check --ray ADDRESS"
            ) from None
    return True


def _scanner_class(ray):
    @ray.remote(num_cpus=1)
    class ShardScanner:
        """One actor: opens the model once, then scans the shards it is handed."""

        def __init__(self, model: str, dtype: str, threads: int):
            import torch

            import lmscope

            torch.set_num_threads(threads)
            self.lm = lmscope.load(model, progress=False)
            if str(next(self.lm.model.parameters()).dtype).replace("torch.", "") != dtype:
                self.lm.model.to(getattr(torch, dtype))

        def run(self, batches, settings):
            from .shard import run_shard

            return {k: v.numpy() for k, v in run_shard(self.lm, batches, settings).items()}

    return ShardScanner


def run_on_ray(lm, todo, settings, address: str, workers: int):
    """Yield (index, shard, partial state) for every (index, shard) of ``todo``, in order, computed on Ray."""
    import torch

    from .engine import as_jobs

    ray = require_ray()
    if not lm.path:
        raise LmscopeError(
            "--ray needs a model that workers can open by name or path (this one was built in memory)",
            "save it with save_pretrained and lmscope.load the directory",
        )
    started = _start(ray, address, workers)
    try:
        from ray.util import ActorPool

        dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
        cls = _scanner_class(ray)
        threads = max(1, int(ray.available_resources().get("CPU", workers)) // workers)
        pool = ActorPool([cls.remote(lm.path, dtype, threads) for _ in range(workers)])
        pending = []  # (index, shard) submitted and not yet returned, in order

        def submit(index, shard):
            pool.submit(lambda actor, job: actor.run.remote(*job), (as_jobs(shard), settings))
            pending.append((index, shard))

        for index, shard in todo:
            submit(index, shard)
            if len(pending) >= 2 * workers:
                i, s = pending.pop(0)
                yield i, s, {k: torch.from_numpy(v.copy()) for k, v in pool.get_next().items()}
        while pending:
            i, s = pending.pop(0)
            yield i, s, {k: torch.from_numpy(v.copy()) for k, v in pool.get_next().items()}
    finally:
        if started:
            ray.shutdown()
