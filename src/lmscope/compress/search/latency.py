"""The latency table: how long each unit's layers take at each level, measured once on this machine (prefill of
``PREFILL_TOKENS`` tokens and one decode step), cached on disk, and summed for a candidate. Measured, not
counted: on a CPU without bf16 matmul units an int4 layer's prefill is *slower* than fp32 (it unpacks to bf16),
while its decode is faster (the int4 kernel reads fewer bytes) -- FLOPs say neither.

A candidate's latency = the working model's measured all-float time (int8 embedding and head, as in every
configuration) + the sum of its units' measured changes: for each group of units with the same layer shapes and
each level, the whole model is timed with that group at the level and the rest float, and each unit gets its
share of the change (exact for configurations uniform per group, additive in between). The budget is
``latency=F``: the mean of the prefill and decode ratios to the original model's measured times is at most F.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from ...errors import LmscopeError

PREFILL_TOKENS = 128
VERSION = 1


def _best_time(fn, reps: int) -> float:
    """Fastest of ``reps`` timed calls after one warm-up (the minimum is the estimator least disturbed by
    other processes on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shape(lm, unit) -> tuple:
    return tuple(
        (m.in_features, m.out_features, m.bias is not None) for m in (lm.module(p) for p in unit.paths)
    )


def table_key(lm, space) -> str:
    """What a table depends on: the architecture, the units' shapes, the levels, torch, threads, the CPU."""
    cfg = getattr(lm.model, "config", None)
    text = json.dumps(
        {
            "version": VERSION,
            "config": cfg.to_json_string(use_diff=False) if cfg is not None else repr(lm.model),
            "units": [[u.name, list(u.paths), _shape(lm, u)] for u in space.units],
            "levels": list(space.levels),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": _cpu(),
            "prefill_tokens": PREFILL_TOKENS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def default_table_path(lm, space) -> Path:
    from ...models.cache import cache_root

    return cache_root() / "latency" / f"{lm.name.replace('/', '_')}-{table_key(lm, space)}.json"


@torch.no_grad()
def measure_model(model, vocab_size: int, reps: int = 3) -> tuple[float, float]:
    """Measured (prefill of ``PREFILL_TOKENS`` tokens, one decode step after them) seconds of a whole model."""
    ids = torch.randint(0, vocab_size, (1, PREFILL_TOKENS + 1), generator=torch.Generator().manual_seed(0))
    prefill = _best_time(lambda: model(input_ids=ids[:, :-1], use_cache=False), reps)
    out = model(input_ids=ids[:, :-1], use_cache=True)
    past = getattr(out, "cache", None) or out.past_key_values
    step = ids[:, -1:]
    decode = _best_time(lambda: model(input_ids=step, cache=past, use_cache=True), reps * 3)
    return prefill, decode


class LatencyTable:
    """``unit[(u, level)] = (prefill_s, decode_s)``, ``fixed = (prefill_s, decode_s)``, ``reference`` (the
    original model's measured prefill / decode seconds), ``measured_seconds`` (what building it took)."""

    def __init__(self, data: dict, space):
        self.data = data
        self.space = space
        self.unit = {
            (int(u), lv): tuple(v) for u, levels in data["units"].items() for lv, v in levels.items()
        }
        self.fixed = tuple(data["fixed"])
        self.reference = tuple(data["reference"])

    # -- measuring -------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def measure(cls, lm, space, reps: int = 3, progress=None) -> LatencyTable:
        from ...lm import LM
        from ..quantize import SCHEMES, load_schemes
        from ..quantize import _common as C
        from ..steps import Quantize
        from .space import LEVELS

        start = time.perf_counter()
        load_schemes()

        def model_times(model):
            return measure_model(model, lm.vocab_size, reps)

        reference = model_times(lm.model)
        work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        C.quantize_embeddings(work)  # every configuration has the int8 embedding (and tied head)
        work_float = model_times(work.model)
        from ..targets import set_module

        # per group of units with the same shapes and per level: the whole working model measured with that
        # group at the level (the rest float); a unit's entry is its share of the change from all-float.
        # (Timing layers in isolation was tried first: it overstated them 2-50x against whole-model runs.)
        groups: dict[tuple, list[int]] = {}
        for i, unit in enumerate(space.units):
            groups.setdefault(_shape(lm, unit), []).append(i)
        units: dict[str, dict[str, list[float]]] = {str(i): {} for i in range(len(space.units))}
        done = 0
        for members in groups.values():
            floats = {p: work.module(p) for i in members for p in space.units[i].paths}
            for lv in space.levels:
                delta = [0.0, 0.0]
                if LEVELS[lv] is not None:
                    scheme, group = LEVELS[lv]
                    scheme = "int4" if scheme == "gptq4" else scheme  # same kernel: timed on RTN codes
                    step = Quantize(scheme, group_size=group)
                    built = SCHEMES[scheme](work, step, None, list(floats.items()))
                    try:
                        for q in built:
                            set_module(work.model, q.name, q.module)
                        t = model_times(work.model)
                    finally:
                        for path, m in floats.items():
                            set_module(work.model, path, m)
                    delta = [(t[k] - work_float[k]) / len(members) for k in (0, 1)]
                for i in members:
                    units[str(i)][lv] = list(delta)
            done += len(members)
            if progress is not None:
                progress(done, len(space.units))
        fixed = list(work_float)
        data = {
            "version": VERSION,
            "key": table_key(lm, space),
            "model": lm.name,
            "prefill_tokens": PREFILL_TOKENS,
            "threads": torch.get_num_threads(),
            "cpu": _cpu(),
            "levels": list(space.levels),
            "units": units,
            "fixed": fixed,
            "reference": list(reference),
            "working_float": list(work_float),
            "measured_seconds": round(time.perf_counter() - start, 1),
            "how": "whole working model timed (min of calls after a warm-up) with each group of same-shape "
            "units at each level; a unit's entry = its share of the change from all-float (float = 0)",
        }
        return cls(data, space)

    # -- disk -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, lm, space) -> LatencyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise LmscopeError(
                f"there is no readable latency table at '{path}'",
                "drop --latency-table to measure one on this machine",
            ) from None
        if data.get("key") != table_key(lm, space):
            raise LmscopeError(
                f"the latency table '{path}' was measured for another model, level set, thread count or CPU",
                "drop --latency-table to measure one for this setup",
            )
        return cls(data, space)

    @classmethod
    def cached(cls, lm, space, path=None, progress=None) -> LatencyTable:
        """The table at ``path`` (must exist and match), else the cached one for this setup, else measured
        now and cached."""
        if path is not None:
            return cls.load(path, lm, space)
        default = default_table_path(lm, space)
        if default.is_file():
            try:
                return cls.load(default, lm, space)
            except LmscopeError:
                pass
        table = cls.measure(lm, space, progress=progress)
        table.save(default)
        table.data["path"] = str(default)
        return table

    # -- costs -----------------------------------------------------------------------------------------
    def seconds(self, config) -> tuple[float, float]:
        """Estimated (prefill, decode) seconds of a configuration."""
        p, d = self.fixed
        for i, lv in enumerate(config):
            up, ud = self.unit[(i, lv)]
            p += up
            d += ud
        return p, d

    def fraction(self, config) -> float:
        p, d = self.seconds(config)
        return 0.5 * (p / self.reference[0] + d / self.reference[1])

    def unit_cost(self, u: int, level: str) -> float:
        up, ud = self.unit[(u, level)]
        return 0.5 * (up / self.reference[0] + ud / self.reference[1])


class ByteCost:
    """The byte budget as a cost: state-dict bytes exactly as ``compress`` counts them."""

    kind = "bytes"

    def __init__(self, db):
        self.db = db

    def unit(self, u: int, level: str) -> float:
        return self.db.bytes(u, level)

    def total(self, config) -> float:
        return self.db.total_bytes(config)


class LatencyCost:
    """The latency budget as a cost: the mean of the prefill and decode ratios to the original model."""

    kind = "latency"

    def __init__(self, table: LatencyTable):
        self.table = table

    def unit(self, u: int, level: str) -> float:
        return self.table.unit_cost(u, level)

    def total(self, config) -> float:
        return self.table.fraction(config)
