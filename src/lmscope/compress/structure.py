"""Structure diff: the module tree of two models with shapes, dtypes/bits, parameter counts and bytes,
side by side, with the rows that changed marked (``~`` changed, ``-`` removed, ``+`` added).

Blocks of a depth-pruned model are lined up with the original blocks they came from (``config.lmscope_origin``),
so removing layer 5 shows ``model.layers.5`` as removed, not every later layer as changed. Quantized
modules (lmscope.compress.quantize) are read duck-typed: ``bits``, ``scheme``, ``in_features``/``out_features``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .size import human_bytes, tensor_bytes, tensor_key


@dataclass
class ModuleInfo:
    path: str
    depth: int
    type: str
    shape: str
    dtype: str
    params: int  # logical parameters (a quantized linear counts in*out, however it is packed)
    bytes: int  # bytes of its parameters and buffers as stored


@dataclass
class DiffRow:
    path: str
    depth: int
    status: str  # same | changed | removed | added
    a: ModuleInfo | None
    b: ModuleInfo | None

    @property
    def changed(self) -> bool:
        return self.status != "same"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "status": self.status,
            "a": asdict(self.a) if self.a else None,
            "b": asdict(self.b) if self.b else None,
        }


MARK = {"same": " ", "changed": "~", "removed": "-", "added": "+"}


def _own_tensors(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def _describe(module: nn.Module) -> tuple[str, str, int]:
    """(shape text, dtype/bits text, logical parameter count) of a module's own tensors."""
    bits = getattr(module, "bits", None)
    scheme = getattr(module, "scheme", None)
    weight = getattr(module, "weight", None)
    if bits is not None and hasattr(module, "in_features"):
        group = getattr(module, "group_size", None)
        dtype = f"int{bits}" + (f" {scheme}" if scheme and scheme != f"int{bits}" else "")
        dtype += f" g{group}" if group else ""
        bias = getattr(module, "bias", None)
        n = module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
        return f"[{module.out_features}, {module.in_features}]", dtype, n
    if bits is not None and hasattr(module, "num_embeddings"):
        return (
            f"[{module.num_embeddings}, {module.embedding_dim}]",
            f"int{bits}",
            (module.num_embeddings * module.embedding_dim),
        )
    if bits is not None:  # e.g. a head tied to a quantized embedding: no tensors of its own
        return "(tied)", f"int{bits}", 0
    if getattr(module, "rank", None) is not None and hasattr(module, "in_features"):  # LowRankLinear
        return f"[{module.out_features}, {module.in_features}] rank {module.rank}", "", 0
    own = list(module.named_parameters(recurse=False))
    if isinstance(weight, torch.Tensor) and any(n == "weight" for n, _ in own):
        shape = list(weight.shape)
        if type(module).__name__ == "Conv1D":
            shape = shape[::-1]  # show [out, in] like nn.Linear
        return str(shape), str(weight.dtype).replace("torch.", ""), sum(p.numel() for _, p in own)
    if own:
        return (
            ", ".join(f"{n}{list(p.shape)}" for n, p in own),
            str(own[0][1].dtype).replace("torch.", ""),
            sum(p.numel() for _, p in own),
        )
    return "", "", 0


def module_table(model: nn.Module) -> list[ModuleInfo]:
    """Every module that holds tensors (itself or below), in model order, with totals for containers."""
    rows: dict[str, ModuleInfo] = {}
    order = []
    seen_tensors: set[tuple] = set()
    for path, mod in model.named_modules(remove_duplicate=False):
        shape, dtype, n = _describe(mod)
        own_bytes = 0
        for _, t in _own_tensors(mod):
            if tensor_key(t) not in seen_tensors:  # tied weights count once
                seen_tensors.add(tensor_key(t))
                own_bytes += tensor_bytes(t)
            else:
                n = 0 if getattr(mod, "bits", None) is None else n
                shape = shape + " (tied)" if shape and "(tied)" not in shape else shape
        name = path or "(model)"
        rows[name] = ModuleInfo(
            name, 0 if not path else path.count(".") + 1, type(mod).__name__, shape, dtype, n, own_bytes
        )
        order.append(name)
    # containers: add children's totals (deepest first)
    for name in sorted(order, key=lambda p: -rows[p].depth):
        if name == "(model)":
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else "(model)"
        if parent in rows:
            rows[parent].params += rows[name].params
            rows[parent].bytes += rows[name].bytes
    return [rows[n] for n in order if rows[n].bytes or rows[n].params or rows[n].dtype]


def _layer_map(model_b: nn.Module, blocks_prefix: str | None) -> dict[str, str]:
    """Path prefix in B -> path prefix in A for blocks that were renumbered by layer pruning."""
    origin = getattr(getattr(model_b, "config", None), "lmscope_origin", None) or {}
    layers = origin.get("layers")
    if not layers or not blocks_prefix:
        return {}
    return {f"{blocks_prefix}.{j}": f"{blocks_prefix}.{orig}" for j, orig in enumerate(layers) if j != orig}


def _rename(path: str, mapping: dict[str, str]) -> str:
    for src, dst in mapping.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src) :]
    return path


@dataclass
class StructureDiff:
    a_name: str
    b_name: str
    rows: list[DiffRow]

    @property
    def changed_rows(self) -> list[DiffRow]:
        return [r for r in self.rows if r.changed]

    def totals(self) -> dict:
        top_a = next((r.a for r in self.rows if r.a and r.a.depth == 0), None)
        top_b = next((r.b for r in self.rows if r.b and r.b.depth == 0), None)
        count = {s: sum(r.status == s for r in self.rows) for s in ("changed", "removed", "added")}
        return {
            "params": [top_a.params if top_a else None, top_b.params if top_b else None],
            "bytes": [top_a.bytes if top_a else None, top_b.bytes if top_b else None],
            **count,
        }

    def summary(self) -> str:
        t = self.totals()
        pa, pb = t["params"]
        ba, bb = t["bytes"]
        return (
            f"{self.a_name} -> {self.b_name}: params {pa / 1e6:.2f}M -> {pb / 1e6:.2f}M ({pb / pa:.1%}), "
            f"bytes {ba / 2**20:.1f} MB -> {bb / 2**20:.1f} MB ({bb / ba:.1%}); "
            f"{t['changed']} modules changed, {t['removed']} removed, {t['added']} added"
        )

    COLUMNS = ("", "module", "type", "shape", "dtype/bits", "params", "bytes")

    def _cells(self, r: DiffRow) -> list[str]:
        def both(f, fmt=str):
            if r.a is None or r.b is None:
                return fmt(getattr(r.a or r.b, f))
            va = fmt(getattr(r.a, f)) if r.a else "—"
            vb = fmt(getattr(r.b, f)) if r.b else "—"
            return va if va == vb else f"{va} → {vb}"

        name = "  " * r.depth + (r.path.rsplit(".", 1)[-1] if r.depth else r.path)
        return [
            MARK[r.status],
            name,
            both("type"),
            both("shape"),
            both("dtype"),
            both("params", _count),
            both("bytes", human_bytes),
        ]

    def table_rows(self, changed_only: bool = False) -> list[list[str]]:
        return [self._cells(r) for r in self.rows if r.changed or not changed_only]

    def to_text(self, changed_only: bool = False) -> str:
        rows = [list(self.COLUMNS), *self.table_rows(changed_only)]
        widths = [max(len(r[c]) for r in rows) for c in range(len(self.COLUMNS))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append("")
        lines.append(self.summary())
        lines.append("~ changed  - removed  + added")
        return "\n".join(lines)

    def to_html_rows(self, changed_only: bool = False) -> tuple[list[str], list[list[str]], list[int]]:
        """(columns, rows, highlighted row indices) for ``Section.table``."""
        rows = self.table_rows(changed_only)
        shown = [r for r in self.rows if r.changed or not changed_only]
        return list(self.COLUMNS), rows, [i for i, r in enumerate(shown) if r.changed]

    def add_to(self, report, changed_only: bool = False):
        """Append this diff as a section of ``report`` (``views.compress.structure_section``)."""
        from ..views.compress import structure_section

        return structure_section(report, self, changed_only)

    def to_dict(self) -> dict:
        return {
            "a": self.a_name,
            "b": self.b_name,
            "totals": self.totals(),
            "rows": [r.to_dict() for r in self.rows],
        }

    def __str__(self) -> str:
        return self.to_text()


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _model_of(x):
    return getattr(x, "model", x) if not isinstance(x, nn.Module) else x


def structure_diff(model_a, model_b, a_name: str | None = None, b_name: str | None = None) -> StructureDiff:
    """Diff the module trees of two models (``nn.Module`` or ``LM``); rows in A's order, additions after
    their parent."""
    a_name = a_name or getattr(model_a, "name", None) or "before"
    b_name = b_name or getattr(model_b, "name", None) or "after"
    ma, mb = _model_of(model_a), _model_of(model_b)
    blocks = None
    try:
        from ..models.families import family_of

        blocks = family_of(mb).blocks
    except Exception:
        pass
    mapping = _layer_map(mb, blocks)
    ta = module_table(ma)
    tb = {_rename(m.path, mapping): m for m in module_table(mb)}
    rows: list[DiffRow] = []
    for m in ta:
        other = tb.pop(m.path, None)
        if other is None:
            rows.append(DiffRow(m.path, m.depth, "removed", m, None))
            continue
        key = lambda x: (x.type, x.shape, x.dtype, x.params, x.bytes)  # noqa: E731
        rows.append(DiffRow(m.path, m.depth, "same" if key(m) == key(other) else "changed", m, other))
    for path, m in tb.items():  # only in B: after its parent's subtree
        parent = path.rsplit(".", 1)[0] if "." in path else "(model)"
        idx = len(rows)
        for i, r in enumerate(rows):
            if r.path == parent or r.path.startswith(parent + "."):
                idx = i + 1
        rows.insert(idx, DiffRow(path, m.depth, "added", None, m))
    return StructureDiff(a_name, b_name, rows)
