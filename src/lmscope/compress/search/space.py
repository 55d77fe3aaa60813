"""The search space: which parts of the model get a choice (units) and the choices (levels), the budget,
and the recipe a configuration stands for.

The quantization space gives every block (or every block x projection kind: ``self_attn``, ``mlp``) one
precision level. The token embedding (and a tied LM head) is int8 in every configuration, as in a uniform
``lmscope compress --quantize int4``, so the uniform configurations are exactly the uniform baselines; or, with
``embedding="gptq4-g32"`` (or another int4 level), int4 in every configuration, its bytes left to the blocks;
or, with ``embedding="float"``, as in the original model in every configuration (its fp32 bytes counted): on a
CPU without bf16 matmul units the int8 tied head's prefill is slower than fp32, which a latency budget feels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LmscopeError

#: precision levels by name: (scheme, group size); "float" keeps the layer as it is. ``gptq-gN``: int4 by GPTQ
#: from the unquantized model's calibration inputs (``Quantize(sequential=False)``), so each unit's variant
#: is independent of the others and is built once, like the round-to-nearest ones
LEVELS: dict[str, tuple[str, int | None] | None] = {
    "float": None,
    "int8": ("int8", None),
    "int4-g32": ("int4", 32),
    "int4-g64": ("int4", 64),
    "int4-g128": ("int4", 128),
    "int4m-g32": ("int4m", 32),  # fp16 scale and minimum per group (GGUF Q4_1's grid at g32)
    "int4m-g64": ("int4m", 64),
    "int4m-g128": ("int4m", 128),
    "gptq-g32": ("gptq4", 32),
    "gptq-g64": ("gptq4", 64),
    "gptq-g128": ("gptq4", 128),
    "w8a8": ("w8a8", None),  # int8 weights x dynamic per-token int8 activations (the bytes of int8)
}
#: the levels searched unless others are asked for (GPTQ levels cost a calibration pass and a GPTQ per variant)
DEFAULT_LEVELS = ("float", "int8", "int4-g32", "int4-g64", "int4-g128")
SPACES = ("quant", "heads", "neurons", "layers", "sparsity")
BUDGET_KINDS = ("bytes", "params", "latency")
GRANULARITIES = ("kind", "block")


@dataclass(frozen=True)
class Budget:
    """``kind`` (bytes | params | latency) and ``fraction`` of the original (fp32 bytes, parameters)."""

    kind: str
    fraction: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, sep, value = str(text).partition("=")
        kind = kind.strip()
        if not sep or kind not in BUDGET_KINDS:
            raise LmscopeError(
                f"budget '{text}' is not of the form KIND=FRACTION with KIND one of {', '.join(BUDGET_KINDS)}",
                "e.g. --budget bytes=0.16",
            )
        try:
            f = float(value)
        except ValueError:
            raise LmscopeError(
                f"budget fraction '{value}' is not a number", "e.g. --budget bytes=0.16"
            ) from None
        if not 0 < f <= 1:
            raise LmscopeError(f"budget fraction must be in (0, 1], got {f}", "e.g. --budget bytes=0.16")
        return cls(kind, f)

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def parse_spaces(text: str | None) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (text or "quant").split(",") if s.strip())
    bad = [s for s in names if s not in SPACES]
    if bad or not names:
        raise LmscopeError(
            f"unknown search space '{','.join(bad) or text}'", f"use one of: {', '.join(SPACES)}"
        )
    return names


@dataclass(frozen=True)
class Unit:
    """One choice of the search: a name ("3.mlp"), its block index, kind and the module paths it covers."""

    name: str
    block: int
    kind: str
    paths: tuple[str, ...]


def fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state with every floating tensor counted as float32 (the budget's reference)."""
    from ..size import tensor_key

    seen, total = set(), 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and tensor_key(t) not in seen:
            seen.add(tensor_key(t))
            total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


class QuantSpace:
    """Per-unit precision levels over the block linears of a causal LM."""

    name = "quant"

    def __init__(self, lm, levels=DEFAULT_LEVELS, granularity: str = "kind", embedding: str = "int8"):
        from ..steps import Quantize
        from ..targets import block_linears, is_conv1d

        if not lm.is_causal:
            raise LmscopeError(
                f"'{lm.name}' is not a causal LM: the search's fitness is the next-token distribution",
                "search a decoder such as smollm2",
            )
        if granularity not in GRANULARITIES:
            raise LmscopeError(
                f"unknown granularity '{granularity}'", f"use one of: {', '.join(GRANULARITIES)}"
            )
        unknown = [lv for lv in levels if lv not in LEVELS]
        if unknown:
            raise LmscopeError(f"unknown precision level '{unknown[0]}'", f"use some of: {', '.join(LEVELS)}")
        linears = block_linears(lm, conv1d=True)
        if any(is_conv1d(m) for _, m in linears) or not linears:
            raise LmscopeError(
                f"the quantization search does not support family '{lm.family.name}' (Conv1D or no linears)",
                "search a Linear-based family such as llama/qwen2/mistral",
            )
        if lm.family.embed is None or not isinstance(lm.module(lm.family.embed), torch.nn.Embedding):
            raise LmscopeError(
                f"family '{lm.family.name}' has no plain token embedding to quantize",
                "search a family such as llama/qwen2/mistral",
            )
        usable = []
        for lv in dict.fromkeys(levels):  # a group size must divide every width (Quantize.check says which)
            spec = LEVELS[lv]
            if spec is not None:
                try:
                    Quantize(spec[0], group_size=spec[1]).check(lm)
                except LmscopeError:
                    continue
            usable.append(lv)
        if len([lv for lv in usable if lv != "float"]) < 1:
            raise LmscopeError(
                f"none of the levels {', '.join(levels)} fits this model's widths",
                "add int8 or a smaller int4 group size to --levels",
            )
        self.levels: tuple[str, ...] = tuple(usable)
        self.granularity = granularity
        prefix = lm.family.blocks + "."
        groups: dict[tuple[int, str], list[str]] = {}
        for path, _ in linears:
            index, _, rest = path[len(prefix) :].partition(".")
            kind = rest.split(".")[0] if granularity == "kind" else "block"
            groups.setdefault((int(index), kind), []).append(path)
        self.units: tuple[Unit, ...] = tuple(
            Unit(f"{b}.{k}" if granularity == "kind" else str(b), b, k, tuple(p))
            for (b, k), p in groups.items()
        )
        self.embed = lm.family.embed
        # the token embedding (+ tied head), fixed for every configuration: int8 rows, or int4 (RTN / GPTQ on
        # the head's inputs), which leaves the blocks more of a bytes budget
        if embedding != "float":  # float: no step ever selects the embedding
            Quantize("int8", embedding=embedding, modules=(self.embed,)).check(lm)
        head = lm.module(lm.family.unembed) if lm.family.unembed else None
        if (
            embedding not in ("int8", "float")
            and getattr(head, "weight", None) is not lm.module(self.embed).weight
        ):
            raise LmscopeError(
                f"embedding level '{embedding}' needs an LM head tied to the embedding", "keep it int8"
            )
        self.embedding = embedding

    # -- configurations: one level name per unit ---------------------------------------------------------
    def uniform(self, level: str) -> tuple[str, ...]:
        return tuple(level for _ in self.units)

    def as_dict(self, config) -> dict[str, str]:
        return {u.name: lv for u, lv in zip(self.units, config)}

    def recipe(self, config):
        """The Recipe this configuration stands for: one quantize step per level used, each owning its units'
        linears; the embedding goes with the first step (int8 rows whatever the scheme), or with none when it stays
        float. GPTQ steps come first:
        their Hessians are the unquantized model's, as in the level database."""
        from ..recipe import Quantize, Recipe

        by_level: dict[str, list[str]] = {}
        for unit, lv in zip(self.units, config):
            if lv != "float":
                by_level.setdefault(lv, []).extend(unit.paths)
        if not by_level:
            raise LmscopeError("the all-float configuration is the original model", "nothing to compress")
        steps = []
        order = sorted(
            by_level.items(), key=lambda kv: (LEVELS[kv[0]][0] != "gptq4", self.levels.index(kv[0]))
        )
        for i, (lv, paths) in enumerate(order):
            scheme, group = LEVELS[lv]
            extra = {"sequential": False} if scheme == "gptq4" else {}
            with_embed = i == 0 and self.embedding != "float"
            if with_embed:
                extra["embedding"] = self.embedding
            modules = tuple(paths) + ((self.embed,) if with_embed else ())
            steps.append(Quantize(scheme, group_size=group, modules=modules, **extra))
        return Recipe.of(*steps)

    def describe(self, config) -> str:
        counts: dict[str, int] = {}
        for lv in config:
            counts[lv] = counts.get(lv, 0) + 1
        return ", ".join(
            f"{n}x {lv}" for lv, n in sorted(counts.items(), key=lambda kv: self.levels.index(kv[0]))
        )


def bits_per_weight(level: str) -> float:
    """Storage bits per weight of a level (int4, GPTQ too: 4 bits + fp16 scale and uint8 zero per group; int4m:
    4 bits + fp16 scale and fp16 minimum per group)."""
    spec = LEVELS[level]
    if spec is None:
        return 32.0
    if spec[0] in ("int8", "w8a8"):
        return 8.0
    return 4.0 + (32.0 if spec[0] == "int4m" else 24.0) / spec[1]
