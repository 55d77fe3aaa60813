"""Direct logit attribution: the target logit split into what each head, each MLP and the embedding
writes directly into the residual stream at the last position.

The residual stream entering the final norm at the last position is a sum of parts: the embedding
(block 0's ``resid_pre``), each head's output through its slice of the attention output projection
(plus that projection's bias, if any) and each MLP's output. The final norm is not linear; as is
standard (TransformerLens ``apply_ln_to_stack``), its scale is frozen at the value it takes on this
input, so the logit becomes linear in the parts:

    logit = Σ_parts u · center(part) + constants,   u = W_U[target] ⊙ norm.weight · scale

(``center`` subtracts the mean for LayerNorm and is the identity for RMSNorm; the constants are the
norm's and the unembedding's biases, reported as parts of their own). ``residual_error`` = the logit
the model computed − Σ parts: rounding, plus anything that reaches the residual stream outside the
parts (a family whose blocks add something else); it is reported, never spread over the parts.

With a contrast token, ``W_U[target] − W_U[contrast]`` replaces ``W_U[target]`` (the logit
difference). Per-position breakdown of a head at the last position: its output is
Σ_k pattern[last, k] · v_k, so its direct contribution splits exactly over the source positions k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..capture.session import hooks
from ..errors import LmscopeError
from ..views.html import Reportable
from .targets import encode_prompt, make_target


@dataclass
class DLAPart:
    name: str
    layer: int | None
    head: int | None
    value: float

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "head": self.head, "value": self.value}


@dataclass
class DLAResult(Reportable):
    """Direct logit attribution of one target at the last position (see the module docstring)."""

    model: str
    text: str
    tokens: list[str]
    target: dict
    logit: float  # the metric the model computed: logit, or logit difference with a contrast
    parts: list[DLAPart]
    residual_error: float
    heads: np.ndarray  # [layers, heads] direct contribution of each head (NaN where the layer has fewer)
    mlp: np.ndarray  # [layers]
    sources: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (layer, head) -> per source
    meta: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(p.value for p in self.parts))

    def top(self, n: int = 20) -> list[DLAPart]:
        """The ``n`` parts with the largest |value|."""
        return sorted(self.parts, key=lambda p: -abs(p.value))[:n]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "text": self.text,
            "tokens": self.tokens,
            "target": self.target,
            "logit": self.logit,
            "parts": [p.to_dict() for p in self.parts],
            "residual_error": self.residual_error,
            "per_position": [
                {"layer": layer, "head": head, "sources": [round(v, 8) for v in vals]}
                for (layer, head), vals in self.sources.items()
            ],
            **self.meta,
        }

    def write_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)

    def build_report(self):
        from ..views.dla import dla_report

        return dla_report(self)


# -- the frozen final norm ----------------------------------------------------------------------
def _frozen_norm(norm: nn.Module, x: torch.Tensor):
    """(u_scale [d], center: bool, bias [d] or None) such that norm(y) ≈ u_scale ⊙ center(y) + bias for
    y near ``x`` with the scale frozen at ``x`` (float64); exact at y = x."""
    weight = getattr(norm, "weight", None)
    w = torch.ones_like(x) if weight is None else weight.detach().double()
    if isinstance(norm, nn.LayerNorm):
        scale = 1.0 / torch.sqrt(x.var(unbiased=False) + norm.eps)
        bias = None if norm.bias is None else norm.bias.detach().double()
        return w * scale, True, bias
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm, "eps", None)
    if eps is None or not type(norm).__name__.endswith("RMSNorm"):
        raise LmscopeError(
            f"direct logit attribution does not know the final norm {type(norm).__name__}",
            "use a model whose final norm is LayerNorm or RMSNorm (llama, gpt2 families)",
        )
    scale = 1.0 / torch.sqrt(x.pow(2).mean() + eps)
    return w * scale, False, getattr(norm, "bias", None)


def _unembed_rows(lm, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U rows [len(ids), d], unembedding bias at those ids [len(ids)]) in float64."""
    head = lm.module(lm.family.unembed)
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == lm.vocab_size:
        rows = weight.detach()[ids].double()
        b = bias.detach()[ids].double() if isinstance(bias, torch.Tensor) else torch.zeros(len(ids))
        return rows, b.double()
    # a module without a plain weight (quantized): read the rows off its outputs
    with torch.no_grad():
        eye = torch.eye(lm.d_model, dtype=lm.model.dtype)
        zero = head(torch.zeros(1, lm.d_model, dtype=lm.model.dtype)).double()[0, ids]
        rows = (head(eye).double()[:, ids] - zero).T
    return rows, zero


def _per_head_out(o_proj: nn.Module, z: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's output through the attention output projection, without its bias.

    z: [..., heads, head_dim] -> ([..., heads, d_model], bias [d_model]). Runs the module itself (one
    row per head, the others zero), so it works for Linear, Conv1D and quantized projections alike."""
    lead = z.shape[:-2]
    hd = z.shape[-1]
    eye = torch.eye(n_heads, dtype=z.dtype)
    # [..., heads(row), heads, hd]: row r keeps only head r
    spread = z.unsqueeze(-3) * eye[:, :, None]
    flat = spread.reshape(*lead, n_heads, n_heads * hd)
    with torch.no_grad():
        bias = o_proj(torch.zeros(1, n_heads * hd, dtype=z.dtype))[0]
        out = o_proj(flat) - bias
    return out, bias


def dla(
    lm,
    text: str,
    target: str | None = None,
    contrast: str | None = None,
    top_heads: int = 6,
    interventions: dict | None = None,
    chat: bool = False,
) -> DLAResult:
    """Direct logit attribution of ``target`` (default: the top prediction) at the last position of
    ``text``; with ``contrast`` the logit difference target − contrast. ``interventions`` (capture
    name -> function, as in ``lm.run``) change the forward being explained. ``top_heads``: how many
    heads (largest |value|) get a per-source-position breakdown."""
    if not lm.is_causal or not lm.family.unembed:
        raise LmscopeError(
            f"direct logit attribution needs a causal language model; {lm.name} is an encoder",
            "use a causal model such as smollm2",
        )
    if not lm.family.final_norm:
        raise LmscopeError(f"{lm.name}'s family names no final norm", "add final_norm to its Family entry")
    if top_heads < 0:
        raise LmscopeError(f"--top-heads must be 0 or more, got {top_heads}", "e.g. --top-heads 6")
    tgt = make_target(lm, target, contrast)
    ids = encode_prompt(lm, text, chat=chat)
    n = len(ids)
    fam = lm.family
    names = ["blocks.0.resid_pre"]
    for i in range(lm.n_layers):
        names += [f"blocks.{i}.attn.head_out", f"blocks.{i}.mlp.out"]
    if top_heads:
        names += [f"blocks.{i}.attn.pattern" for i in range(lm.n_layers)]
    final_in, values = {}, {}
    handles = [
        lm.module(fam.final_norm).register_forward_pre_hook(
            lambda mod, args: final_in.__setitem__("x", args[0].detach())
        )
    ]
    if top_heads:
        for i, block in enumerate(lm.blocks):

            def keep_v(mod, args, out, i=i):
                values[i] = (out[0] if isinstance(out, tuple) else out).detach()

            handles.append(block.get_submodule(fam.v).register_forward_hook(keep_v))
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, n, dtype=torch.long)}
    try:
        with torch.no_grad(), hooks(lm, names, interventions) as session:
            logits = lm.forward(inputs).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    acts = session.tensors
    if tgt.kind == "token" and tgt.token_id is None:
        top = int(logits.argmax())
        tgt = type(tgt)(kind="token", token_id=top, token=lm.tokenizer.decode([top]))
    row_ids = [tgt.token_id] + ([tgt.contrast_id] if tgt.kind == "contrast" else [])
    rows, ubias = _unembed_rows(lm, row_ids)
    direction = rows[0] - rows[1] if len(rows) == 2 else rows[0]  # [d]
    logit = float(logits[tgt.token_id] - (logits[tgt.contrast_id] if tgt.kind == "contrast" else 0.0))

    x = final_in["x"][0, -1].double()
    u_scale, center, norm_bias = _frozen_norm(lm.module(fam.final_norm), x)
    u = direction * u_scale  # [d]: logit contribution per unit of residual (frozen scale)

    def value_of(vec: torch.Tensor) -> torch.Tensor:  # vec [..., d] float64 -> [...]
        if center:
            vec = vec - vec.mean(-1, keepdim=True)
        return vec @ u

    parts: list[DLAPart] = [
        DLAPart("embed", None, None, float(value_of(acts["blocks.0.resid_pre"][0, -1].double())))
    ]
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    heads = np.full((lm.n_layers, n_heads), np.nan)
    mlp = np.zeros(lm.n_layers)
    for i, block in enumerate(lm.blocks):
        o_proj = block.get_submodule(fam.o)
        n_h = lm.n_heads_at(i)
        z = acts[f"blocks.{i}.attn.head_out"][0, -1]  # [heads, hd]
        out, bias = _per_head_out(o_proj, z, n_h)  # [heads, d]
        vals = value_of(out.double())
        heads[i, :n_h] = vals.numpy()
        for h in range(n_h):
            parts.append(DLAPart(f"L{i}H{h}", i, h, float(vals[h])))
        if bool((bias != 0).any()):
            parts.append(DLAPart(f"L{i}.attn_bias", i, None, float(value_of(bias.double()))))
        mlp[i] = float(value_of(acts[f"blocks.{i}.mlp.out"][0, -1].double()))
        parts.append(DLAPart(f"L{i}.mlp", i, None, mlp[i]))
    const = 0.0
    if norm_bias is not None:
        const = float(direction @ norm_bias.double())
        parts.append(DLAPart("final_norm.bias", None, None, const))
    ub = float(ubias[0] - ubias[1]) if len(ubias) == 2 else float(ubias[0])
    if ub != 0.0:
        parts.append(DLAPart("unembed.bias", None, None, ub))
    total = float(sum(p.value for p in parts))

    sources = {}
    if top_heads:
        ranked = sorted(
            ((i, h) for i in range(lm.n_layers) for h in range(lm.n_heads_at(i))),
            key=lambda ih: -abs(heads[ih]),
        )[:top_heads]
        for i, h in ranked:
            sources[(i, h)] = _head_sources(lm, i, h, acts, values, value_of).tolist()

    # how well the frozen norm reproduces the real one at this input (0 up to rounding by construction)
    with torch.no_grad():
        real = lm.module(fam.final_norm)(final_in["x"][:, -1:])[0, -1].double()
    frozen = u_scale * (x - x.mean() if center else x) + (
        norm_bias.double() if norm_bias is not None else 0.0
    )
    return DLAResult(
        model=lm.name,
        text=text,
        tokens=lm.token_strings(ids),
        target=tgt.to_dict() | {"description": tgt.describe(), "position": n - 1},
        logit=logit,
        parts=parts,
        residual_error=logit - total,
        heads=heads,
        mlp=mlp,
        sources=sources,
        meta={
            "method": "direct logit attribution, final norm frozen at its scale on this input",
            "final_norm": type(lm.module(fam.final_norm)).__name__,
            "final_norm_scale": _norm_scale(lm.module(fam.final_norm), x, center),
            "frozen_norm_error": float((real - frozen).abs().max()),
            "interventions": sorted(interventions or {}),
        },
    )


def _norm_scale(norm, x, center) -> float:
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 0.0)
    ms = x.var(unbiased=False) if center else x.pow(2).mean()
    return float(1.0 / torch.sqrt(ms + eps))


def _head_sources(lm, layer: int, head: int, acts, values, value_of) -> np.ndarray:
    """Direct contribution of (layer, head) at the last position split over source positions [n]."""
    fam = lm.family
    pattern = acts[f"blocks.{layer}.attn.pattern"][0, head, -1]  # [n] (keys)
    v = values[layer][0]  # [n, kv*hd] (or [n, 3d] fused)
    hd = lm.head_dim
    n_h = lm.n_heads_at(layer)
    if fam.fused_qkv:
        v = v[:, 2 * n_h * hd :]
    n_kv = v.shape[-1] // hd
    kv = head // max(1, n_h // n_kv)
    v_h = v[:, kv * hd : (kv + 1) * hd]  # [n, hd]
    z = torch.zeros(len(pattern), n_h, hd, dtype=v.dtype)
    z[:, head] = pattern[:, None].to(v.dtype) * v_h
    out, _ = _per_head_out(lm.blocks[layer].get_submodule(fam.o), z, n_h)  # [n, heads, d]
    return value_of(out[:, head].double()).numpy()
