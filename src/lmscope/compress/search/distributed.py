"""Candidate evaluation on Ray (``lmscope search --ray auto|ADDRESS --workers N``): a pool of actors, each
opening the model once and building its own level database and KL fitness from the same settings, scores the
configurations of one generation stage in parallel (the precision search's level database, the structured
search's database with the driver's priors and the same refit, or the combined search's database with the
driver's priors); results come back in submission order (Ray's
``ActorPool``), and the driver stores and ranks them exactly as in-process, so a fixed seed gives the same
front. Uses ``scan``'s Ray start-up (local runtime for ``auto``, or a cluster address). Ray is optional
(``pip install 'lmscope[scale]'``) and imported only here.
"""

from __future__ import annotations

from ...errors import LmscopeError
from ...scan.distributed import _start, require_ray


def _evaluator_class(ray):
    @ray.remote(num_cpus=1)
    class CandidateScorer:
        """One actor: the model, the level database and the fitness, built once; then KL of configurations."""

        def __init__(
            self, model: str, threads: int, space_args: dict, fitness_args: dict, simulate: bool, kind: str
        ):
            import torch

            import lmscope

            from .fitness import KLFitness

            torch.set_num_threads(threads)
            lm = lmscope.load(model, progress=False)
            if kind == "structure":  # heads / neurons / layers: the driver's priors, the same refit
                from .structure import Refit, StructureDatabase, StructuredSpace

                args = dict(space_args)
                refit = args.pop("refit")
                space = StructuredSpace(lm, **args)
                compensation = None
                if refit is not None:
                    compensation = Refit(
                        lm, fitness_args["text"], refit["tokens"], refit["window"], refit["damp"]
                    )
                    if compensation.spec != refit:
                        raise LmscopeError(
                            "a Ray worker's refit differs from the driver's (other weights or tokens)",
                            "give every worker the same model",
                        )
                    space.refit_spec = compensation.spec
                self.db = StructureDatabase(lm, space, compensation)
            elif kind == "combined":  # precision and structure: the driver's priors, the same levels
                from .combined import CombinedDatabase, CombinedSpace

                args = dict(space_args)
                space = CombinedSpace(
                    lm,
                    args["spaces"],
                    args["levels"],
                    args["granularity"],
                    priors=args["priors"],
                    embedding=args.get("embedding", "int8"),
                )
                self.db = CombinedDatabase(lm, space, simulate=simulate)
            else:
                from .levels import LevelDatabase
                from .space import QuantSpace

                self.db = LevelDatabase(
                    lm, QuantSpace(lm, **space_args), simulate=simulate, calibration_text=fitness_args["text"]
                )
            self.fitness = KLFitness(lm, **fitness_args)

        def run(self, config, stage, done):
            import torch

            with torch.no_grad():
                return self.fitness.kl(self.db.assemble(tuple(config)), stage, done)

    return CandidateScorer


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that refuses a TCP connection fails in seconds, not after
    Ray's minute of retries."""
    import socket

    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # let Ray judge other forms
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise LmscopeError(
            f"cannot reach the Ray cluster at '{address}': {e.strerror or e}",
            "check --ray ADDRESS, or use --ray auto for a local runtime",
        ) from None


class RayScorers:
    """``map(jobs)`` -> [(kl, window sums)] in the order of ``jobs`` (each job: config, stage, done)."""

    def __init__(
        self,
        lm,
        address: str,
        workers: int,
        space_args: dict,
        fitness_args: dict,
        simulate: bool,
        kind: str = "quant",
    ):
        if not isinstance(workers, int) or workers < 1:
            raise LmscopeError(f"--workers must be a positive integer, got {workers!r}", "e.g. --workers 2")
        if not lm.path:
            raise LmscopeError(
                "--ray needs a model that workers can open by name or path (this one was built in memory)",
                "save it with save_pretrained and search the directory",
            )
        self.ray = require_ray()
        _check_reachable(address)
        try:
            self.started = _start(self.ray, address, workers)
        except LmscopeError:
            raise
        except Exception as e:  # an unreachable or malformed address fails in several ways
            raise LmscopeError(
                f"cannot reach the Ray cluster at '{address}': {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                "check --ray ADDRESS, or use --ray auto for a local runtime",
            ) from None
        try:
            from ray.util import ActorPool

            cls = _evaluator_class(self.ray)
            threads = max(1, int(self.ray.available_resources().get("CPU", workers)) // workers)
            self.workers = workers
            self.pool = ActorPool(
                [
                    cls.remote(lm.path, threads, space_args, fitness_args, simulate, kind)
                    for _ in range(workers)
                ]
            )
        except BaseException:
            self.close()
            raise

    def map(self, jobs: list[tuple]) -> list[tuple[float, list[float]]]:
        return list(self.pool.map(lambda actor, job: actor.run.remote(*job), jobs))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
