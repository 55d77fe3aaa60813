"""Compression step configs: frozen dataclasses that validate themselves and round-trip to a dict.

The shared contract (torchao style: plain config data + one registered handler per step kind,
``lmscope.compress.registry``):

* A step config is a frozen dataclass with ``kind`` and ``stage`` ClassVars; defining the subclass
  registers it in ``STEP_TYPES`` (``__init_subclass__``), so a recipe file can name it. Bad values raise
  ``LmscopeError`` in ``__post_init__`` (so the CLI exits 2 before any work); checks that need the model
  (a group size that does not divide a layer's width, a layer index out of range, a module filter that
  matches nothing) live in ``check(lm)``, which ``compress`` calls for every step before it changes anything.
* Every step takes ``modules``: fqn globs of the modules it may change (torchao's ``filter_fn`` as data);
  empty means every module the step would act on, and a glob that matches none of them is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import LmscopeError

# order in which stacked steps run: structure first, then factorization, quantization last
STAGE_PRUNE, STAGE_LOWRANK, STAGE_QUANTIZE = 0, 1, 2

QUANT_SCHEMES = ("int8", "int4", "int4m", "w8a8", "w8a8-smooth", "gptq4")
GROUP_SIZES = (32, 64, 128)
#: how a quantize step stores the token embedding (and a tied LM head) when it selects it
EMBEDDING_LEVELS = ("int8", *(f"{s}-g{g}" for s in ("int4", "int4m", "gptq4") for g in GROUP_SIZES))
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


def _matches_any(name: str, patterns) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, p) for p in patterns)


def _selected_layers(step, lm) -> list[int] | None:
    if not step.modules:
        return None
    chosen = set(step.selected_modules(lm))
    return [i for i, m in enumerate(step.module_candidates(lm)) if m in chosen]


# -- base -----------------------------------------------------------------------------------------
#: every step config class by its ``kind`` (filled by ``StepConfig.__init_subclass__``)
STEP_TYPES: dict[str, type[StepConfig]] = {}


@dataclass(frozen=True)
class StepConfig:
    """Base of every step config. Subclasses set ``kind`` (the JSON tag) and ``stage``; defining one
    registers it. ``modules``: fqn globs of the modules the step may change (empty = all it acts on)."""

    modules: tuple[str, ...] = field(default=(), kw_only=True)

    kind: ClassVar[str] = ""
    stage: ClassVar[int] = STAGE_PRUNE

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind:
            STEP_TYPES[cls.kind] = cls

    def __post_init__(self):
        modules = (self.modules,) if isinstance(self.modules, str) else self.modules
        try:
            modules = tuple(str(m) for m in modules)
        except TypeError:
            raise LmscopeError(
                f"the module filter of step '{self.kind}' must be a list of globs, got {self.modules!r}",
                'e.g. "modules": ["model.layers.*.mlp.*"]',
            ) from None
        object.__setattr__(self, "modules", modules)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if (f.name == "modules" and not v) or (f.name == "refit" and v is None):
                continue  # recipes without a filter (or a refit) keep their old JSON
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

    def module_candidates(self, lm) -> list[str]:
        """Model-relative paths of the modules this step would change with no filter (for ``modules``)."""
        from .targets import block_linears

        return [n for n, _ in block_linears(lm)]

    def selected_modules(self, lm) -> list[str]:
        """The candidates the module filter keeps; a filter glob matching no candidate is an error."""
        from .targets import filter_modules

        return filter_modules(self.module_candidates(lm), self.modules, self.kind)

    def check(self, lm) -> None:
        """Checks that need the model (shapes, layer counts, the module filter). Raise; change nothing."""
        if self.modules:
            self.selected_modules(lm)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "kind" and v is not None)
        return f"{self.kind}({args})"


# -- quantization (lmscope.compress.quantize) ----------------------------------------------------------
@dataclass(frozen=True)
class Quantize(StepConfig):
    """Quantize the linear layers (and for int4/gptq4 the tied embedding as int8) with one scheme.

    ``scheme``: int8 (weight-only, per-channel), int4 (weight-only, group-wise, RTN, uint8 zero point), int4m
    (the same with an fp16 minimum per group instead: GGUF Q4_1's "scale and min"), w8a8 (int8 weights,
    dynamic per-token int8 activations), w8a8-smooth (w8a8 with SmoothQuant scaling from calibration
    text; outlier channels kept in bf16 where smoothing is not enough), gptq4 (int4 via GPTQ).
    ``alpha``: SmoothQuant migration strength. ``skip``: module-name globs left in full precision.
    ``sequential`` (gptq4 only): True (default) quantizes block by block on the quantized earlier blocks'
    outputs; False takes every layer's Hessian from the unquantized model (each layer independent of the
    others: the per-layer GPTQ levels of ``lmscope search``); such steps come before other quantize steps.
    ``embedding``: the token embedding's storage when the step selects it: int8 rows (default), or int4 with
    a tied LM head, "int4-gN" / "int4m-gN" (round to nearest) or "gptq4-gN" (GPTQ on the head's inputs in the unquantized
    model; such a step comes first among the quantize steps).
    """

    scheme: str = "int8"
    group_size: int | None = None
    alpha: float = 0.5
    skip: tuple[str, ...] = ()
    sequential: bool = True
    embedding: str = "int8"

    kind: ClassVar[str] = "quantize"
    stage: ClassVar[int] = STAGE_QUANTIZE

    def __post_init__(self):
        super().__post_init__()
        _choice("quantization scheme", self.scheme, QUANT_SCHEMES, "--quantize")
        grouped = self.scheme in ("int4", "int4m", "gptq4")
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
        if not isinstance(self.sequential, bool):
            raise LmscopeError(
                f"sequential must be true or false, got {self.sequential!r}", '"sequential": false'
            )
        if not self.sequential and self.scheme != "gptq4":
            raise LmscopeError(
                f"sequential applies to gptq4, not to '{self.scheme}'", 'drop "sequential", or use gptq4'
            )

        _choice("embedding level", self.embedding, EMBEDDING_LEVELS)

    @property
    def independent(self) -> bool:
        """Its statistics come from the unquantized model (it must run before other quantize steps)."""
        return not self.sequential or self.embedding.startswith("gptq4")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name, default in (("sequential", True), ("embedding", "int8")):
            if out[name] == default:  # recipes written before these options keep their JSON
                del out[name]
        return out

    def module_candidates(self, lm) -> list[str]:
        from .quantize._common import experts_of
        from .targets import block_linears

        fam = lm.family
        names = [n for n, _ in block_linears(lm) if not _matches_any(n, self.skip)]
        names += [n for n, _ in experts_of(lm)]  # MoE experts, int8 per row
        # causal LMs: the token embedding too (an LM head, tied or not, goes with it)
        return names + ([fam.embed] if fam.embed and fam.causal else [])

    def check(self, lm) -> None:
        super().check(lm)
        if self.embedding != "int8" and lm.family.embed:
            from .quantize._common import embedding_level

            emb = lm.module(lm.family.embed)
            group = embedding_level(self.embedding)[1]
            if getattr(emb, "embedding_dim", 0) % group:
                raise LmscopeError(
                    f"embedding group size {group} does not divide the embedding width {emb.embedding_dim}",
                    "choose an embedding level whose group size divides it (e.g. int4-g32)",
                )
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
        super().__post_init__()
        object.__setattr__(self, "fraction", _fraction("head fraction", self.fraction, flag="--prune-heads"))
        _choice("head pruning method", self.method, HEAD_METHODS, "--prune-method")

    def module_candidates(self, lm) -> list[str]:  # the attention module of every block
        return [f"{lm.family.blocks}.{i}.{lm.family.attn}" for i in range(lm.n_layers)]

    def check(self, lm) -> None:
        super().check(lm)
        if self.fraction > 0:  # families whose heads cannot be sliced exactly are refused before any work
            from .prune.heads import check_head_surgery

            check_head_surgery(lm)

    def selected_layers(self, lm) -> list[int] | None:
        """Indices of the blocks whose heads may go (None: all)."""
        return _selected_layers(self, lm)


@dataclass(frozen=True)
class PruneUnstructured(StepConfig):
    """Zero ``sparsity`` of the linear weights (magnitude or Wanda); ``n_m`` like "2:4" for N:M sparsity."""

    sparsity: float = 0.5
    method: str = "magnitude"
    n_m: str | None = None

    kind: ClassVar[str] = "prune_unstructured"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        super().__post_init__()
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
        super().__post_init__()
        object.__setattr__(
            self, "fraction", _fraction("neuron fraction", self.fraction, flag="--prune-neurons")
        )
        _choice("neuron pruning method", self.method, NEURON_METHODS, "--prune-method")

    def module_candidates(self, lm) -> list[str]:  # the MLP of every block
        mlp = lm.family.mlp_out.rpartition(".")[0]
        return [f"{lm.family.blocks}.{i}.{mlp}" for i in range(lm.n_layers)]

    def selected_layers(self, lm) -> list[int] | None:
        """Indices of the blocks whose MLP neurons may go (None: all)."""
        return _selected_layers(self, lm)


@dataclass(frozen=True)
class PruneLayers(StepConfig):
    """Remove whole transformer blocks by index."""

    layers: tuple[int, ...] = ()

    kind: ClassVar[str] = "prune_layers"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        super().__post_init__()
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

    def module_candidates(self, lm) -> list[str]:
        return [f"{lm.family.blocks}.{i}" for i in range(lm.n_layers)]

    def check(self, lm) -> None:
        bad = [i for i in self.layers if i >= lm.n_layers]
        if bad:
            raise LmscopeError(
                f"layer(s) {bad} out of range: the model has {lm.n_layers} layers (0..{lm.n_layers - 1})",
                "pass indices below the layer count",
            )
        if len(self.layers) >= lm.n_layers:
            raise LmscopeError("cannot remove every layer", "keep at least one layer")
        if self.modules:
            kept = set(self.selected_modules(lm))
            outside = [i for i in self.layers if f"{lm.family.blocks}.{i}" not in kept]
            if outside:
                raise LmscopeError(
                    f"layer(s) {outside} to prune are outside the step's module filter {list(self.modules)}",
                    "widen the filter or drop those layers",
                )


def _keep_lists(name: str, value) -> dict[str, list[int]]:
    """{layer: [kept indices]} with string keys (JSON), non-empty lists of distinct non-negative ints."""
    if not isinstance(value, dict) or not value:
        raise LmscopeError(
            f"{name} must map layer indices to kept indices", f'e.g. "{name}": {{"0": [0, 1]}}'
        )
    out = {}
    for k, v in value.items():
        try:
            layer, kept = int(k), sorted(int(i) for i in v)
        except (TypeError, ValueError):
            raise LmscopeError(
                f"{name}: layer {k!r} -> {v!r} is not a list of indices", "fix the recipe"
            ) from None
        if layer < 0 or not kept or kept[0] < 0 or len(set(kept)) != len(kept):
            raise LmscopeError(
                f"{name}: layer {k} must keep a non-empty list of distinct indices", "fix the recipe"
            )
        out[str(layer)] = kept
    return out


REFIT_FIELDS = ("tokens", "window", "damp", "digest")


def _refit_spec(name: str, value) -> dict | None:
    """``refit`` of a keep step: None, or {tokens, window, damp, digest} — the least-squares compensation of
    the consuming projection (``prune.refit``) on the first ``tokens`` calibration tokens in windows of
    ``window``, ridge ``damp``; ``digest`` fingerprints those tokens so compress refuses other ones."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(REFIT_FIELDS):
        raise LmscopeError(
            f"{name} refit must be an object with {', '.join(REFIT_FIELDS)}, got {value!r}"[:200],
            'e.g. "refit": {"tokens": 4096, "window": 128, "damp": 0.01, "digest": "..."} (as search wrote it)',
        )
    try:
        out = {
            "tokens": int(value["tokens"]),
            "window": int(value["window"]),
            "damp": float(value["damp"]),
            "digest": str(value["digest"]),
        }
    except (TypeError, ValueError):
        raise LmscopeError(f"{name} refit has a bad value in {value!r}"[:200], "fix the recipe") from None
    if out["tokens"] < 2 or out["window"] < 2 or not out["damp"] >= 0:
        raise LmscopeError(
            f"{name} refit needs tokens and window >= 2 and damp >= 0, got {value!r}"[:200], "fix the recipe"
        )
    return out


@dataclass(frozen=True)
class KeepHeads(StepConfig):
    """Keep exactly the listed query heads of each listed layer (original numbering; GQA: every kept KV group
    keeps the same count). Written by ``lmscope search`` so a searched architecture reproduces exactly."""

    layers: dict = field(default_factory=dict)
    refit: dict | None = None  # least-squares compensation of the output projection (``_refit_spec``)

    kind: ClassVar[str] = "keep_heads"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "layers", _keep_lists("keep_heads layers", self.layers))
        object.__setattr__(self, "refit", _refit_spec("keep_heads", self.refit))

    def check(self, lm) -> None:
        from .prune.heads import check_head_surgery

        check_head_surgery(lm)
        for k, kept in self.layers.items():
            if int(k) >= lm.n_layers or kept[-1] >= lm.n_heads_at(int(k)):
                raise LmscopeError(
                    f"keep_heads: layer {k} / heads {kept} out of range for this model",
                    "use the model the recipe was searched on",
                )


@dataclass(frozen=True)
class KeepNeurons(StepConfig):
    """Keep exactly the listed MLP hidden units of each listed layer (original numbering)."""

    layers: dict = field(default_factory=dict)
    refit: dict | None = None  # least-squares compensation of the down projection (``_refit_spec``)

    kind: ClassVar[str] = "keep_neurons"
    stage: ClassVar[int] = STAGE_PRUNE

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "layers", _keep_lists("keep_neurons layers", self.layers))
        object.__setattr__(self, "refit", _refit_spec("keep_neurons", self.refit))

    def check(self, lm) -> None:
        for k, kept in self.layers.items():
            if int(k) >= lm.n_layers or kept[-1] >= lm.d_mlp_at(int(k)):
                raise LmscopeError(
                    f"keep_neurons: layer {k} / neuron {kept[-1]} out of range for this model",
                    "use the model the recipe was searched on",
                )

    def describe(self) -> str:
        kept = sum(len(v) for v in self.layers.values())
        refit = ", refit" if self.refit else ""
        return f"{self.kind}({len(self.layers)} layers, {kept} neurons kept{refit})"


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
        super().__post_init__()
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

    def module_candidates(self, lm) -> list[str]:
        from .lowrank import lowrank_targets

        return [p for p, _ in lowrank_targets(lm, self.targets)]


def register_step_type(cls: type[StepConfig]) -> type[StepConfig]:
    """Kept for callers that decorate: subclasses of StepConfig with a ``kind`` register themselves."""
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
