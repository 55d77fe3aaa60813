"""The latency table: how long each unit's layers take at each level, measured once on this machine (prefill of
``PREFILL_TOKENS`` tokens and one decode step), cached on disk, and summed for a candidate. Measured, not
counted: on a CPU without bf16 matmul units an int4 layer's prefill is *slower* than fp32 (it unpacks to bf16),
while its decode is faster (the int4 kernel reads fewer bytes) -- FLOPs say neither.

A candidate's latency = the working model's measured all-float time (the token embedding and tied head stored
as the space stores them in every configuration: int8 by default, or float, or int4) + the sum of its units' measured changes: for each group of units with the same layer shapes and
each level, the whole model is timed with that group at the level and the rest float, and each unit gets its
share of the change (exact for configurations uniform per group, additive in between). The budget is
``latency=F``: the mean of the prefill and decode ratios to the original model's measured times is at most F.

``StructureLatencyTable`` does the same for the structured and combined searches: heads kept, MLP neurons kept
and blocks dropped (at a grid of kept sizes, interpolated), each at every precision level in the combined space.
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
            # the embedding the working model is timed with (absent for int8: tables measured before keep
            # their key)
            **({} if embedding_of(space) == "int8" else {"embedding": embedding_of(space)}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def embedding_of(space) -> str:
    """How a quantization or combined space stores the token embedding (+ tied head) in every configuration."""
    return getattr(getattr(space, "qspace", space), "embedding", "int8")


def embed_as_timed(work, embedding: str) -> None:
    """Store ``work``'s token embedding (+ tied head) as ``embedding`` for timing: float leaves it; a GPTQ level
    is timed on round-to-nearest codes (the same kernel, no Hessian needed)."""
    from ..quantize import _common as C

    if embedding == "float":
        return
    scheme, group = C.embedding_level(embedding)
    C.quantize_embeddings(work, f"int4-g{group}" if scheme == "gptq4" else embedding)


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


@torch.no_grad()
def paired_difference(model, base, vocab_size: int, rounds: int = 3) -> tuple[float, float]:
    """Median over ``rounds`` of (``model`` - ``base``) (prefill of ``PREFILL_TOKENS`` tokens, one decode step)
    seconds, both timed back to back in each round: on a shared machine the load drifts by more than a layer's
    cost between measurements taken minutes apart, and a paired difference cancels what both calls share."""
    import statistics

    ids = torch.randint(0, vocab_size, (1, PREFILL_TOKENS + 1), generator=torch.Generator().manual_seed(0))
    step = ids[:, -1:]
    past = {}
    for key, m in (("model", model), ("base", base)):  # also the warm-up
        out = m(input_ids=ids[:, :-1], use_cache=True)
        past[key] = getattr(out, "cache", None) or out.past_key_values

    def prefill(m) -> float:
        t = time.perf_counter()
        m(input_ids=ids[:, :-1], use_cache=False)
        return time.perf_counter() - t

    def decode(m, key) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            m(input_ids=step, cache=past[key], use_cache=True)
            best = min(best, time.perf_counter() - t)
        return best

    dp, dd = [], []
    for _ in range(rounds):
        dp.append(prefill(model) - prefill(base))
        dd.append(decode(model, "model") - decode(base, "base"))
    return statistics.median(dp), statistics.median(dd)


#: what ``stats`` and pareto.json say of a latency table: where it is, what it was measured on, the reference
SUMMARY_KEYS = ("path", "key", "prefill_tokens", "threads", "cpu", "reference", "fixed", "measured_seconds")


def table_summary(table, *extra: str) -> dict:
    return {k: table.data.get(k) for k in SUMMARY_KEYS + extra}


def _read_table(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LmscopeError(
            f"there is no readable latency table at '{path}'",
            "drop --latency-table to measure one on this machine",
        ) from None


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
        from ..steps import Quantize
        from .space import LEVELS

        start = time.perf_counter()
        load_schemes()

        def model_times(model):
            return measure_model(model, lm.vocab_size, reps)

        reference = model_times(lm.model)
        work = LM(copy.deepcopy(lm.model), lm.tokenizer, name=lm.name, path=None)
        embed_as_timed(work, space.embedding)  # as every configuration stores it
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
            "embedding": space.embedding,
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
        data = _read_table(path)
        if data.get("key") != table_key(lm, space):
            raise LmscopeError(
                f"the latency table '{path}' was measured for another model, level set, embedding, thread count "
                "or CPU",
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


# -- structure (heads kept, MLP neurons kept, block dropped), alone or with the precision of what is kept ------
STRUCTURE_VERSION = (
    3  # 2: paired differences (1, min of calls, was swamped by a drifting load); 3: fixed twice
)
#: kept sizes measured per layer kind (the rest interpolated): evenly spaced over the kind's levels, ends included
DEFAULT_GRID = 4


def _pava(values: list[float]) -> list[float]:
    """The non-decreasing sequence nearest ``values`` in least squares (pool adjacent violators)."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([v, 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            s, c = pools.pop()
            pools[-1][0] += s
            pools[-1][1] += c
    return [s / c for s, c in pools for _ in range(int(c))]


def _interpolate(rows: list[list[float]], x: float) -> tuple[float, float]:
    """(prefill, decode) at kept size ``x`` from ``rows`` [kept, prefill, decode] sorted by kept: linear between
    the two nearest measured sizes (exact at a measured size; clamped outside the measured range)."""
    if x <= rows[0][0]:
        return rows[0][1], rows[0][2]
    for (x0, p0, d0), (x1, p1, d1) in zip(rows, rows[1:]):
        if x <= x1:
            t = (x - x0) / (x1 - x0)
            return p0 + t * (p1 - p0), d0 + t * (d1 - d0)
    return rows[-1][1], rows[-1][2]


def _grid(sizes: list, points: int) -> list:
    """``points`` of ``sizes`` (largest first), evenly spaced by index, both ends included."""
    if len(sizes) <= points:
        return list(sizes)
    picks = sorted({round(k * (len(sizes) - 1) / (points - 1)) for k in range(points)})
    return [sizes[k] for k in picks]


def _layer_signature(block_modules: dict) -> tuple:
    return tuple(
        (p, tuple(m.weight.shape), getattr(m, "bias", None) is not None)
        for p, m in sorted(block_modules.items())
    )


def _struct_parts(db):
    """(structure database, combined database or None) of a structured or combined search's database."""
    return (db.sdb, db) if hasattr(db, "sdb") else (db, None)


def structure_table_key(lm, db, grid: int) -> str:
    """What a structure table depends on: the architecture, the units and their levels, the precision levels,
    the grid, torch, threads, the CPU."""
    sdb, cdb = _struct_parts(db)
    space = cdb.space if cdb is not None else sdb.space
    cfg = getattr(lm.model, "config", None)
    text = json.dumps(
        {
            "version": STRUCTURE_VERSION,
            "kind": "combined" if cdb is not None else "structure",
            "config": cfg.to_json_string(use_diff=False) if cfg is not None else repr(lm.model),
            "units": [[u.name, list(u.paths)] for u in space.units],
            "unit_levels": [list(lvs) for lvs in space.unit_levels],
            "grid": grid,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": _cpu(),
            "prefill_tokens": PREFILL_TOKENS,
            **(
                {"embedding": embedding_of(space)}
                if cdb is not None and embedding_of(space) != "int8"
                else {}
            ),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class StructureLatencyTable:
    """Measured latency of structural choices for the structured and combined searches, per group of layers
    with the same shapes: for each precision level (float only without ``quant``), the change in (prefill,
    decode) seconds per layer from the all-float full model when every layer of the group keeps ``k`` heads
    (the rest of the model full and float; the median of differences paired with the all-float model, timed back
    to back), at a grid of ``k``; the same for MLP neurons kept; and for the
    block dropped. Between grid sizes a layer's change is interpolated linearly in the kept count. Slicing never
    adds work, so each measured curve is made non-decreasing in the kept count (pool adjacent violators; the raw
    measurements stay in ``data["raw"]``). A candidate = the all-float time (the embedding stored in the
    combined space as in every candidate there: int8 by default, or float) + per kept block its attention change at (heads kept, attention
    precision) + its MLP change at (neurons kept, MLP precision), per dropped block the drop change: precision
    and structure interact within a part (a narrower int4 layer is timed as such), parts and blocks add.

    Approximations, checked on the chosen point by ``measure_chosen``: additivity across parts and blocks;
    linear interpolation between grid sizes; head layouts with the same count but different KV groups share
    one measurement (k and v are the small projections)."""

    def __init__(self, data: dict):
        self.data = data
        self.fixed = tuple(data["fixed"])
        self.reference = tuple(data["reference"])
        self.groups = data["groups"]
        self.group_of = {i: g for g, grp in enumerate(self.groups) for i in grp["layers"]}

    # -- prediction ------------------------------------------------------------------------------------
    def layer_seconds(self, i, heads, neurons, dropped, attn_level="float", mlp_level="float"):
        """Change in (prefill, decode) seconds of block ``i`` from full float: ``heads`` / ``neurons`` kept
        (counts; None = all), ``dropped``, the precision of its attention and MLP linears."""
        grp = self.groups[self.group_of[i]]
        if dropped:
            return tuple(grp["drop"])
        a = _interpolate(grp["attn"][attn_level], grp["heads"] if heads is None else heads)
        m = _interpolate(grp["mlp"][mlp_level], grp["neurons"] if neurons is None else neurons)
        return a[0] + m[0], a[1] + m[1]

    def seconds(self, layers) -> tuple[float, float]:
        """Predicted (prefill, decode) seconds; ``layers``: per block (heads, neurons, dropped, attn level,
        mlp level) as ``layer_seconds`` takes them."""
        p, d = self.fixed
        for i, spec in enumerate(layers):
            lp, ld = self.layer_seconds(i, *spec)
            p += lp
            d += ld
        return p, d

    def fraction_of(self, seconds) -> float:
        return 0.5 * (seconds[0] / self.reference[0] + seconds[1] / self.reference[1])

    # -- measuring -------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def measure(cls, lm, db, grid: int = DEFAULT_GRID, reps: int = 3, timer=None, progress=None):
        """Measure on this machine through the search's own database (its working model, assembled as the
        search assembles candidates). ``timer(model) -> (prefill_s, decode_s)``: how a model is timed
        (default ``measure_model``; tests inject a deterministic one)."""
        sdb, cdb = _struct_parts(db)
        if cdb is not None and cdb.simulate:  # emulated layers are not timed: a real-kernel database
            from .combined import CombinedDatabase

            cdb = CombinedDatabase(lm, cdb.space)
        space = sdb.space
        given = timer is not None
        timer = timer or (lambda model: measure_model(model, lm.vocab_size, reps))
        struct_levels = (cdb.space.unit_levels if cdb is not None else space.unit_levels)[: len(space.units)]
        precisions = list(cdb.space.qspace.levels) if cdb is not None else ["float"]
        n = len(sdb.blocks)
        layer_of = {p: i for i, ps in (cdb.qpaths.items() if cdb is not None else ()) for p in ps}
        start = time.perf_counter()

        def assembled(states, layers=(), attn="float", mlp="float"):
            if cdb is None:
                return sdb.assemble_states(states).model

            def level_of(p):
                if layer_of[p] not in layers:
                    return "float"
                return attn if cdb._is_attn(p) else mlp

            return cdb.assemble_levels(states, level_of).model

        full = [(None, None, False)] * n
        fixed = timer(assembled(full))
        # the all-float working model, kept aside: without a given timer every other timing is the fixed time
        # plus a paired difference to it (see paired_difference)
        base = None if given else copy.deepcopy(assembled(full))

        def timed(states, layers=(), attn="float", mlp="float"):
            model = assembled(states, layers, attn, mlp)
            if given:
                return timer(model)
            dp, dd = paired_difference(model, base, lm.vocab_size, max(reps, 1))
            return fixed[0] + dp, fixed[1] + dd

        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(_layer_signature(sdb.originals[i]), []).append(i)
        unit_at = {(u.block, u.kind): k for k, u in enumerate(space.units)}
        plan = []  # (group, kind, precision, kept, level)
        out_groups, raw_groups = [], []
        for members in groups.values():
            i0 = members[0]
            n_heads = len(space.priors["heads"][i0]) if "heads" in space.spaces else lm.n_heads_at(i0)
            n_neurons = len(space.priors["neurons"][i0]) if "neurons" in space.spaces else 0
            sizes = {"attn": [(n_heads, None)], "mlp": [(n_neurons, None)]}
            for kind, keep in (("attn", space.head_keep), ("mlp", space.neuron_keep)):
                if (i0, kind) not in unit_at:
                    continue
                common = [
                    lv
                    for lv in struct_levels[unit_at[(i0, kind)]]
                    if all(lv in struct_levels[unit_at[(i, kind)]] for i in members)
                ]
                found = sorted(((len(keep[(i0, lv)]), lv) for lv in common), key=lambda s: -s[0])
                sizes[kind] = [(k, None if k == sizes[kind][0][0] else lv) for k, lv in _grid(found, grid)]
            out_groups.append({"layers": members, "heads": n_heads, "neurons": n_neurons})
            raw_groups.append({"attn": {}, "mlp": {}})
            for kind in ("attn", "mlp"):
                for q in precisions:
                    for k, lv in sizes[kind]:
                        plan.append((len(out_groups) - 1, kind, q, k, lv))
            if "layers" in space.spaces:
                plan.append((len(out_groups) - 1, "drop", None, None, None))
        from ... import progress as bars

        for done, (g, kind, q, k, lv) in bars.track(
            list(enumerate(plan)), "latency table (whole-model timings)", unit="timing"
        ):
            members = out_groups[g]["layers"]
            if kind == "drop":
                t = timed([(None, None, i in members) for i in range(n)])
                out_groups[g]["drop"] = [(t[j] - fixed[j]) / len(members) for j in (0, 1)]
            else:
                if lv is None and q == "float":
                    row = [k, 0.0, 0.0]
                else:
                    keep = space.head_keep if kind == "attn" else space.neuron_keep
                    states = [
                        (
                            keep[(i, lv)] if kind == "attn" and lv is not None and i in members else None,
                            keep[(i, lv)] if kind == "mlp" and lv is not None and i in members else None,
                            False,
                        )
                        for i in range(n)
                    ]
                    t = timed(
                        states,
                        set(members),
                        q if kind == "attn" else "float",
                        q if kind == "mlp" else "float",
                    )
                    row = [k, *((t[j] - fixed[j]) / len(members) for j in (0, 1))]
                raw_groups[g][kind].setdefault(q, []).append(row)
            if progress is not None:
                progress(done + 1, len(plan))
        if (
            not given
        ):  # the all-float time again after the rest, the faster kept: one load spike does not set it
            again = timer(base)
            fixed = tuple(min(a, b) for a, b in zip(fixed, again))
        if cdb is None:
            reference = fixed  # structure only: the same model
        elif given:
            reference = timer(lm.model)
        else:
            dp, dd = paired_difference(lm.model, base, lm.vocab_size, max(reps, 1))
            reference = (fixed[0] + dp, fixed[1] + dd)
        for grp, raw in zip(out_groups, raw_groups):
            for kind in ("attn", "mlp"):
                grp[kind] = {}
                for q, rows in raw[kind].items():
                    rows = sorted(rows)
                    mono = [_pava([r[1] for r in rows]), _pava([r[2] for r in rows])]
                    grp[kind][q] = [[r[0], mono[0][j], mono[1][j]] for j, r in enumerate(rows)]
        data = {
            "version": STRUCTURE_VERSION,
            "key": structure_table_key(lm, db, grid),
            "kind": "combined" if cdb is not None else "structure",
            "model": lm.name,
            "prefill_tokens": PREFILL_TOKENS,
            "threads": torch.get_num_threads(),
            "cpu": _cpu(),
            "levels": precisions,
            "grid": grid,
            "groups": out_groups,
            "raw": raw_groups,
            "fixed": list(fixed),
            "reference": list(reference),
            "timings": len(plan) + (3 if cdb is not None else 2),
            "measured_seconds": round(time.perf_counter() - start, 1),
            "how": "per group of same-shape layers, the whole working model timed with every layer of the group at "
            "a kept size (heads, neurons) and precision, or dropped, the rest full and float: the change from the "
            "all-float working model is the median of paired differences (both timed back to back in each "
            "round); a layer's entry = its share of the change; linear in the kept count between measured "
            "sizes; curves made non-decreasing in the kept count",
        }
        data["timer"] = "given (not this machine's measurements)" if given else "measure_model"
        return cls(data)

    # -- disk -------------------------------------------------------------------------------------------
    save = LatencyTable.save

    @classmethod
    def load(cls, path, lm, db, grid: int = DEFAULT_GRID) -> StructureLatencyTable:
        path = Path(path)
        table = cls._read(path, lm, db, grid)
        table.data["path"] = str(path)
        return table

    @classmethod
    def _read(cls, path: Path, lm, db, grid: int) -> StructureLatencyTable:
        data = _read_table(path)
        if data.get("key") != structure_table_key(lm, db, grid):
            raise LmscopeError(
                f"the latency table '{path}' was measured for another model, space, level set, embedding, "
                "thread count or CPU",
                "drop --latency-table to measure one for this setup",
            )
        return cls(data)

    @classmethod
    def cached(cls, lm, db, path=None, grid: int = DEFAULT_GRID, timer=None, progress=None):
        """The table at ``path`` (must exist and match), else the cached one for this setup, else measured now
        and cached. A given ``timer`` is never cached (its table is not this machine's)."""
        if path is not None:
            return cls.load(path, lm, db, grid)
        if timer is not None:
            return cls.measure(lm, db, grid, timer=timer, progress=progress)
        from ...models.cache import cache_root

        default = (
            cache_root() / "latency" / f"{lm.name.replace('/', '_')}-{structure_table_key(lm, db, grid)}.json"
        )
        if default.is_file():
            try:
                table = cls.load(default, lm, db, grid)
                table.data["path"] = str(default)
                return table
            except LmscopeError:
                pass
        table = cls.measure(lm, db, grid, progress=progress)
        table.save(default)
        table.data["path"] = str(default)
        return table


class StructureLatencyCost:
    """The latency budget of the structured and combined searches as a cost: the predicted mean of the prefill
    and decode ratios to the original, from a ``StructureLatencyTable``."""

    kind = "latency"

    def __init__(self, table: StructureLatencyTable, db):
        self.table = table
        self.sdb, self.cdb = _struct_parts(db)
        self.space = db.space
        n = len(self.sdb.blocks)
        self.parts = [self.cdb.part_units(i) for i in range(n)] if self.cdb is not None else None
        self._memo: dict[tuple, tuple[float, float]] = {}

    def layers_of_states(self, states, qconfig=None) -> list[tuple]:
        out = []
        for i, (heads, neurons, dropped) in enumerate(states):
            attn = mlp = "float"
            if qconfig is not None:
                a, m = self.parts[i]
                attn = "float" if a is None else qconfig[a]
                mlp = "float" if m is None else qconfig[m]
            out.append(
                (
                    None if heads is None else len(heads),
                    None if neurons is None else len(neurons),
                    dropped,
                    attn,
                    mlp,
                )
            )
        return out

    def seconds(self, config) -> tuple[float, float]:
        config = tuple(config)
        if config not in self._memo:
            if self.cdb is not None:
                s, q = self.space.split(config)
            else:
                s, q = config, None
            self._memo[config] = self.table.seconds(self.layers_of_states(self.sdb.block_states(s), q))
        return self._memo[config]

    def total(self, config) -> float:
        return self.table.fraction_of(self.seconds(config))

    def states_fraction(self, states, qconfig=None) -> float:
        return self.table.fraction_of(self.table.seconds(self.layers_of_states(states, qconfig)))

    def unit(self, u: int, level: str) -> float:
        """Unit ``u`` at ``level``, everything else full and float: its change in the budget's fraction."""
        full = list(self.space.full())
        base = self.total(full)
        full[u] = level
        return self.total(full) - base

    def fields(self, config) -> dict:
        p, d = self.seconds(config)
        return {
            "prefill_s": round(p, 5),
            "decode_s": round(d, 5),
            "latency_fraction": round(self.total(config), 5),
        }


def measure_chosen(
    lm, recipe, table, predicted: dict, calibration_text=None, timer=None, rounds: int = 3
) -> dict:
    """The predicted latency of the chosen point checked on the real model ``compress`` builds from its recipe: it
    and the original timed back to back in each of ``rounds`` rounds (so both see the same load), the measured
    fraction the median of the rounds' ratios, beside the prediction (whose denominator is the table's reference,
    timed when the table was measured)."""
    from ..apply import compress

    real = compress(lm, recipe, calibration_text=calibration_text)
    timer = timer or (lambda m: measure_model(m, lm.vocab_size))
    runs = []
    for _ in range(rounds):
        ref_p, ref_d = timer(lm.model)
        p, d = timer(real.lm.model)
        runs.append((p, d, ref_p, ref_d, 0.5 * (p / ref_p + d / ref_d)))
    p, d, ref_p, ref_d, measured = sorted(runs, key=lambda r: r[-1])[len(runs) // 2]
    return {
        "prefill_s": round(p, 5),
        "decode_s": round(d, 5),
        "reference_prefill_s": round(ref_p, 5),
        "reference_decode_s": round(ref_d, 5),
        "latency_fraction": round(measured, 5),
        "rounds": [round(r[-1], 5) for r in runs],
        "predicted_fraction": predicted["latency_fraction"],
        "predicted_prefill_s": predicted["prefill_s"],
        "predicted_decode_s": predicted["decode_s"],
        "error": round(measured / predicted["latency_fraction"] - 1, 4),
    }
