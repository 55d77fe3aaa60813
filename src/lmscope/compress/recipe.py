"""Compression recipes: an ordered list of steps, each a frozen config dataclass that round-trips to a dict.

The shared contract (torchao style: plain config data + one registered handler per step kind):

* A step config is a frozen dataclass with a ``kind`` ClassVar. Bad values raise ``LmscopeError`` in
  ``__post_init__`` (so the CLI exits 2 before any work); checks that need the model (a group size
  that does not divide a layer's width, a layer index out of range) live in ``check(lm)``, which
  ``compress`` calls for every step before it changes anything.
* ``@register_step(ConfigClass)`` on a handler class registers one instance of it. A handler has
  ``apply(lm, step, calib) -> dict`` (mutates ``lm.model`` in place; returns JSON-able info/metrics
  for the report, saved in ``lmscope_recipe.json``) and ``rebuild(model, step, info) -> None``
  (re-creates module structure/shapes on a freshly constructed model *before* its saved state dict is
  loaded).
* ``calib`` is a :class:`Calibration`: calibration text and token windows, built lazily, never
  overlapping the evaluation text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..errors import LmscopeError
from .calibration import Calibration

# order in which stacked steps run: structure first, then factorization, quantization last
STAGE_PRUNE, STAGE_LOWRANK, STAGE_QUANTIZE = 0, 1, 2

QUANT_SCHEMES = ("int8", "int4", "w8a8", "w8a8-smooth", "gptq4")
GROUP_SIZES = (32, 64, 128)
HEAD_METHODS = ("importance", "magnitude", "random")
UNSTRUCTURED_METHODS = ("magnitude", "wanda")
NEURON_METHODS = ("magnitude", "activation", "random")


def _fraction(name: str, value, *, allow_zero: bool = True, allow_one: bool = False, flag: str = "") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LmscopeError(f"{name} must be a number, got {value!r}", f"e.g. {flag or name} 0.25") from None
    lo_ok = v >= 0 if allow_zero else v > 0
    hi_ok = v <= 1 if allow_one else v < 1
    if not (lo_ok and hi_ok) or v != v:
        lo = "0" if allow_zero else "0 (excluded)"
        hi = "1" if allow_one else "1 (excluded)"
        raise LmscopeError(
            f"{name} must be between {lo} and {hi}, got {value}",
            f"pass a fraction such as {flag or name} 0.25",
        )
    return v


def _choice(name: str, value, choices, flag: str = "") -> str:
    if value not in choices:
        raise LmscopeError(
            f"unknown {name} '{value}'",
            f"use one of: {', '.join(choices)}" + (f" (with {flag})" if flag else ""),
        )
    return value


# -- base -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """Base of every step config. Subclasses set ``kind`` (the JSON tag) and ``stage``."""

    kind: ClassVar[str] = ""
    stage: ClassVar[int] = STAGE_PRUNE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepConfig:
        d = dict(d)
        d.pop("kind", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LmscopeError(
                f"recipe step '{cls.kind}' has unknown field(s) {', '.join(unknown)}",
                f"allowed fields: {', '.join(sorted(names)) or '(none)'}",
            )
        return cls(**d)

    def check(self, lm) -> None:
        """Checks that need the model (shapes, layer counts). Raise LmscopeError; change nothing."""

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "kind" and v is not None)
        return f"{self.kind}({args})"


# -- quantization (lmscope.compress.quantize) ----------------------------------------------------------
@dataclass(frozen=True)
class Quantize(StepConfig):
    """Quantize the linear layers (and for int4/gptq4 the tied embedding as int8) with one scheme.

    ``scheme``: int8 (weight-only, per-channel), int4 (weight-only, group-wise, RTN), w8a8 (int8 weights,
    dynamic per-token int8 activations), w8a8-smooth (w8a8 with SmoothQuant scaling from calibration
    text; outlier channels kept in bf16 where smoothing is not enough), gptq4 (int4 via GPTQ).
    ``alpha``: SmoothQuant migration strength. ``skip``: module-name globs left in full precision.
    """

    scheme: str = "int8"
    group_size: int | None = None
    alpha: float = 0.5
    skip: tuple[str, ...] = ()

    kind: ClassVar[str] = "quantize"
    stage: ClassVar[int] = STAGE_QUANTIZE

    def __post_init__(self):
        _choice("quantization scheme", self.scheme, QUANT_SCHEMES, "--quantize")
        grouped = self.scheme in ("int4", "gptq4")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise LmscopeError(
                    f"group size must be an integer, got {self.group_size!r}",
                    "use --group-size 32, 64 or 128",
                )
            if not grouped:
                raise LmscopeError(
                    f"--group-size applies to int4/gptq4, not to '{self.scheme}' (which is per-channel)",
                    "drop --group-size, or use --quantize int4",
                )
            if self.group_size not in GROUP_SIZES:
                raise LmscopeError(
                    f"group size {self.group_size} is not supported",
                    f"use one of: {', '.join(map(str, GROUP_SIZES))}",
                )
        elif grouped:
            object.__setattr__(self, "group_size", 64)
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise LmscopeError(f"smoothing alpha must be in [0, 1], got {self.alpha}", "e.g. alpha 0.5")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "skip", tuple(self.skip))

    def check(self, lm) -> None:
        if not self.group_size:
            return
        from torch import nn

        for name, mod in lm.model.named_modules():
            if isinstance(mod, nn.Linear) and mod.in_features % self.group_size:
                raise LmscopeError(
                    f"group size {self.group_size} does not divide the width {mod.in_features} of '{name}'",
                    "choose a group size that divides every layer's input width (e.g. 32 or 64)",
                )


# -- pruning (lmscope.compress.prune) ---------------------------------------------------------------------
@dataclass(frozen=True)
class PruneHeads(StepConfig):
    """Remove ``fraction`` of the attention heads (GQA aware), ranked by ``method``."""

    fraction: float = 0.25
    method: str = "importance"
    seed: int = 0

    kind: ClassVar[str] = "prune_heads"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        object.__setattr__(self, "fraction", _fraction("head fraction", self.fraction, flag="--prune-heads"))
        _choice("head pruning method", self.method, HEAD_METHODS, "--prune-method")


@dataclass(frozen=True)
class PruneUnstructured(StepConfig):
    """Zero ``sparsity`` of the linear weights (magnitude or Wanda); ``n_m`` like "2:4" for N:M sparsity."""

    sparsity: float = 0.5
    method: str = "magnitude"
    n_m: str | None = None

    kind: ClassVar[str] = "prune_unstructured"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        s = _fraction("sparsity", self.sparsity, flag="--prune-unstructured")
        object.__setattr__(self, "sparsity", s)
        _choice("unstructured pruning method", self.method, UNSTRUCTURED_METHODS, "--prune-method")
        if self.n_m is not None:
            try:
                n, m = (int(x) for x in str(self.n_m).split(":"))
            except ValueError:
                raise LmscopeError(f"--n-m must look like 2:4, got '{self.n_m}'", "e.g. --n-m 2:4") from None
            if not 0 < n < m:
                raise LmscopeError(f"--n-m {self.n_m}: need 0 < N < M", "e.g. --n-m 2:4")
            if abs(s - n / m) > 1e-9 and s != 0.5:
                raise LmscopeError(
                    f"--n-m {self.n_m} zeroes {n}/{m} of the weights, but sparsity {s} was asked",
                    f"pass --prune-unstructured {n / m:g} with --n-m {self.n_m}",
                )
            object.__setattr__(self, "sparsity", n / m)

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.n_m is None:
            return None
        n, m = (int(x) for x in self.n_m.split(":"))
        return n, m


@dataclass(frozen=True)
class PruneNeurons(StepConfig):
    """Remove ``fraction`` of the MLP hidden neurons in every layer, ranked by ``method``."""

    fraction: float = 0.25
    method: str = "magnitude"
    seed: int = 0

    kind: ClassVar[str] = "prune_neurons"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        object.__setattr__(
            self, "fraction", _fraction("neuron fraction", self.fraction, flag="--prune-neurons")
        )
        _choice("neuron pruning method", self.method, NEURON_METHODS, "--prune-method")


@dataclass(frozen=True)
class PruneLayers(StepConfig):
    """Remove whole transformer blocks by index."""

    layers: tuple[int, ...] = ()

    kind: ClassVar[str] = "prune_layers"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        try:
            layers = tuple(int(i) for i in self.layers)
        except (TypeError, ValueError):
            raise LmscopeError(
                f"layers to prune must be integers, got {self.layers!r}", "e.g. --prune-layers 3,7"
            ) from None
        if not layers:
            raise LmscopeError("no layers given to prune", "e.g. --prune-layers 3,7")
        if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise LmscopeError(
                f"layers to prune must be distinct non-negative indices, got {list(layers)}",
                "e.g. --prune-layers 3,7",
            )
        object.__setattr__(self, "layers", tuple(sorted(layers)))

    def check(self, lm) -> None:
        bad = [i for i in self.layers if i >= lm.n_layers]
        if bad:
            raise LmscopeError(
                f"layer(s) {bad} out of range: the model has {lm.n_layers} layers (0..{lm.n_layers - 1})",
                "pass indices below the layer count",
            )
        if len(self.layers) >= lm.n_layers:
            raise LmscopeError("cannot remove every layer", "keep at least one layer")


@dataclass(frozen=True)
class LowRank(StepConfig):
    """Factor linear layers by SVD into two thinner ones: a fixed ``rank`` or the rank keeping ``energy``."""

    rank: int | None = None
    energy: float | None = None
    activation_aware: bool = False
    targets: tuple[str, ...] = ()  # module-name globs; empty = every block linear

    kind: ClassVar[str] = "lowrank"
    stage: ClassVar[int] = STAGE_LOWRANK

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise LmscopeError(
                "low-rank needs exactly one of a rank or an energy",
                "pass --lowrank-rank R or --lowrank-energy E",
            )
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise LmscopeError(
                f"rank must be a positive integer, got {self.rank!r}", "e.g. --lowrank-rank 64"
            )
        if self.energy is not None:
            e = _fraction("energy", self.energy, allow_zero=False, allow_one=True, flag="--lowrank-energy")
            object.__setattr__(self, "energy", e)
        object.__setattr__(self, "targets", tuple(self.targets))


STEP_TYPES: dict[str, type[StepConfig]] = {
    c.kind: c for c in (Quantize, PruneHeads, PruneUnstructured, PruneNeurons, PruneLayers, LowRank)
}


def register_step_type(cls: type[StepConfig]) -> type[StepConfig]:
    """Register a new step config class (a frozen StepConfig dataclass with ``kind``/``stage`` ClassVars)."""
    STEP_TYPES[cls.kind] = cls
    return cls


def step_from_dict(d: dict[str, Any]):
    if not isinstance(d, dict) or "kind" not in d:
        raise LmscopeError(
            f"a recipe step must be an object with a 'kind', got {d!r}"[:200],
            f'e.g. {{"kind": "quantize", "scheme": "int8"}}; kinds: {", ".join(STEP_TYPES)}',
        )
    cls = STEP_TYPES.get(d["kind"])
    if cls is None:
        raise LmscopeError(f"unknown recipe step kind '{d['kind']}'", f"use one of: {', '.join(STEP_TYPES)}")
    try:
        return cls.from_dict(d)
    except TypeError as e:
        raise LmscopeError(f"bad recipe step {d!r}: {e}"[:300], "check the field names and values") from None


# -- handlers --------------------------------------------------------------------------------------
class StepHandler(Protocol):
    def apply(self, lm, step, calib: Calibration) -> dict: ...

    def rebuild(self, model, step, info: dict) -> None: ...


HANDLERS: dict[str, StepHandler] = {}

# modules that register handlers when imported (a new step family adds its module here)
HANDLER_MODULES = (
    "lmscope.compress.quantize",
    "lmscope.compress.prune",
    "lmscope.compress.lowrank",
)


def register_step(config_cls: type):
    """Class decorator: ``@register_step(PruneHeads) class HeadPruner: def apply(...); def rebuild(...)``."""

    def deco(handler_cls):
        HANDLERS[config_cls.kind] = handler_cls() if isinstance(handler_cls, type) else handler_cls
        return handler_cls

    return deco


def _import_handlers() -> None:
    import importlib

    for mod in HANDLER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def handler_for(step) -> StepHandler:
    if step.kind not in HANDLERS:
        _import_handlers()
    if step.kind not in HANDLERS:
        raise LmscopeError(
            f"no handler is registered for recipe step '{step.kind}'",
            "this lmscope build does not implement it yet",
        )
    return HANDLERS[step.kind]


# -- recipes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps. Stacked steps run structure-first: pruning, low-rank, quantization."""

    steps: tuple = ()

    def __post_init__(self):
        steps = tuple(self.steps)
        if not steps:
            raise LmscopeError(
                "the recipe has no steps",
                "pass --quantize, --prune-heads, --prune-unstructured, --prune-neurons, --prune-layers, "
                "--lowrank-rank/--lowrank-energy or --recipe file.json",
            )
        for s in steps:
            if getattr(s, "kind", None) not in STEP_TYPES:
                raise LmscopeError(
                    f"not a recipe step: {s!r}"[:200], "build steps from lmscope.compress.recipe"
                )
        stages = [s.stage for s in steps]
        if stages != sorted(stages):
            raise LmscopeError(
                "recipe steps are out of order: " + " -> ".join(s.kind for s in steps),
                "put pruning first, then low-rank, then quantization (quantized weights cannot be pruned)",
            )
        if sum(s.stage == STAGE_QUANTIZE for s in steps) > 1:
            raise LmscopeError("the recipe quantizes twice", "keep one quantize step")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def of(cls, *steps) -> Recipe:
        """Build a recipe, ordering the steps structure-first (stable: same-stage steps keep their order)."""
        return cls(tuple(sorted(steps, key=lambda s: s.stage)))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d) -> Recipe:
        steps = d.get("steps") if isinstance(d, dict) else d
        if not isinstance(steps, list):
            raise LmscopeError(
                'a recipe must be {"steps": [...]} or a list of steps',
                'e.g. {"steps": [{"kind": "quantize", "scheme": "int8"}]}',
            )
        return cls(tuple(step_from_dict(s) for s in steps))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Recipe:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LmscopeError(
                f"recipe file '{path}' does not exist", "check the path given to --recipe"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmscopeError(f"recipe file '{path}' is not valid JSON: {e}", "fix the JSON") from None
        return cls.from_dict(data)

    def check(self, lm) -> None:
        for s in self.steps:
            s.check(lm)

    def describe(self) -> str:
        return " -> ".join(s.describe() for s in self.steps)
