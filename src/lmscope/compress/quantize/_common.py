"""Shared plumbing for the quantization schemes: target layers, module construction, calibration inputs,
the tied int8 embedding/head, and the per-layer error rows."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import LmscopeError
from ..targets import set_module
from .affine import (
    QuantSpec,
    affine_params,
    pack_int4,
    quantize,
    quantize_scale_min,
    scale_min_params,
    sqnr,
)
from .modules import (
    Int4Embedding,
    Int4Linear,
    Int4TiedHead,
    Int8Embedding,
    Int8Linear,
    Int8TiedHead,
    QuantizedLinear,
    W8A8Linear,
)

INT8_CHANNEL = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
ERROR_TOKENS = 64  # calibration tokens used for the per-layer output error


def int4_spec(group_size: int) -> QuantSpec:
    return QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=group_size)


def _copy_bias(linear: nn.Linear, q: QuantizedLinear) -> None:
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.detach().float())


def make_int8(linear: nn.Linear, weight: torch.Tensor | None = None) -> Int8Linear:
    w = (linear.weight if weight is None else weight).detach().float()
    q = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)
    scale, zero = affine_params(w, INT8_CHANNEL)
    q.qweight.copy_(quantize(w, scale, zero, INT8_CHANNEL))
    q.scale.copy_(scale.flatten())
    _copy_bias(linear, q)
    return q


def make_w8a8(linear: nn.Linear, weight: torch.Tensor | None = None, outliers=None) -> W8A8Linear:
    w = (linear.weight if weight is None else weight).detach().float().clone()
    n_out = 0 if outliers is None else len(outliers)
    q = W8A8Linear(linear.in_features, linear.out_features, linear.bias is not None, n_outliers=n_out)
    if n_out:
        idx = torch.as_tensor(outliers, dtype=torch.long)
        q.outlier_index.copy_(idx)
        q.outlier_weight.copy_(w[:, idx].to(torch.bfloat16))
        w[:, idx] = 0.0
    scale, zero = affine_params(w, INT8_CHANNEL)
    q.qweight.copy_(quantize(w, scale, zero, INT8_CHANNEL))
    q.scale.copy_(scale.flatten())
    _copy_bias(linear, q)
    return q


def make_int4(linear: nn.Linear, group_size: int, codes=None, scale=None, zero=None) -> Int4Linear:
    """RTN int4 from the weight, or from given (codes, scale, zero) (GPTQ)."""
    q = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size)
    if codes is None:
        spec = int4_spec(group_size)
        w = linear.weight.detach().float()
        scale, zero = affine_params(w, spec)
        codes = quantize(w, scale, zero, spec)
    q.qweight.copy_(pack_int4(codes.reshape(linear.out_features, -1)))
    q.scale.copy_(scale.reshape(linear.out_features, -1).to(torch.float16))
    q.zero.copy_(zero.reshape(linear.out_features, -1).to(torch.uint8))
    _copy_bias(linear, q)
    return q


def make_int4m(linear: nn.Linear, group_size: int) -> Int4Linear:
    """int4 on the "scale and min" grid (fp16 scale and minimum per group), round to nearest."""
    q = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size, minimum=True)
    _fill_scale_min(q, linear.weight.detach().float(), group_size)
    _copy_bias(linear, q)
    return q


def _fill_scale_min(q: nn.Module, w: torch.Tensor, group_size: int) -> None:
    scale, minimum = scale_min_params(w, group_size)
    q.qweight.copy_(pack_int4(quantize_scale_min(w, scale, minimum)))
    q.scale.copy_(scale.reshape(w.shape[0], -1).to(torch.float16))
    q.zero.copy_(minimum.reshape(w.shape[0], -1).to(torch.float16))


def as_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (``x @ W + b``, W stored [in, out]) as the nn.Linear computing the same map."""
    w = conv.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


def io_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or a GPT-2 Conv1D (weight stored [in, out])."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def experts_of(lm) -> list[tuple[str, nn.Module]]:
    """Mixture-of-experts modules (3-D ``gate_up_proj`` / ``down_proj`` parameters), model-relative names."""
    fam = lm.family
    if not fam.moe:
        return []
    return [
        (f"{fam.blocks}.{i}.{fam.experts}", b.get_submodule(fam.experts)) for i, b in enumerate(lm.blocks)
    ]


def empty_module(kind: str, in_features: int, out_features: int, bias: bool, meta: dict) -> nn.Module:
    """An uninitialised quantized module of the saved kind/shape (filled by load_state_dict)."""
    if kind == "int8":
        return Int8Linear(in_features, out_features, bias)
    if kind == "w8a8":
        return W8A8Linear(in_features, out_features, bias, n_outliers=int(meta.get("n_outliers", 0)))
    if kind in ("int4", "int4m"):
        return Int4Linear(in_features, out_features, bias, int(meta["group_size"]), minimum=kind == "int4m")
    raise LmscopeError(f"unknown quantized module kind '{kind}' in the saved recipe", "re-save the model")


# -- embedding / LM head ------------------------------------------------------------------------------
def embedding_level(level: str) -> tuple[str, int | None]:
    """("int8", None) | ("int4" | "int4m" | "gptq4", group) from "int8", "int4-g64", "int4m-g32", ..."""
    scheme, _, group = level.partition("-g")
    return scheme, (int(group) if group else None)


def quantize_embeddings(lm, level: str = "int8", hessian: torch.Tensor | None = None) -> dict | None:
    """Store the token embedding (and a tied LM head) as int8 rows, or at ``level`` "int4-gN" (round to
    nearest) / "gptq4-gN" (GPTQ on ``hessian``, the tied head's input Hessian: the head's output error is
    what it minimizes). Returns info for rebuild, or None."""
    fam = lm.family
    if not fam.causal or fam.embed is None:
        return None
    emb = lm.module(fam.embed)
    if type(emb) is not nn.Embedding:  # a subclass (Gemma's scaled embedding) computes more than a lookup
        return None
    head = lm.module(fam.unembed) if fam.unembed else None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    w = emb.weight.detach().float()
    scheme, group = embedding_level(level)
    if scheme != "int8":
        if not tied:
            raise LmscopeError(
                f"embedding level '{level}' needs an LM head tied to the embedding ('{lm.name}' has none)",
                "keep the embedding int8",
            )
        q4 = Int4Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group, scheme == "int4m")
        if scheme == "int4m":
            _fill_scale_min(q4, w, group)
        elif scheme == "gptq4":
            from .gptq import gptq_quantize

            if hessian is None:
                raise LmscopeError(
                    f"embedding level '{level}' needs the LM head's calibration Hessian",
                    "use int4-gN for the embedding, or quantize it in a step with calibration",
                )

            codes, scale, zero, _ = gptq_quantize(w, hessian, group)
        else:
            spec = int4_spec(group)
            scale, zero = affine_params(w, spec)
            codes = quantize(w, scale, zero, spec)
        if scheme != "int4m":
            q4.qweight.copy_(pack_int4(codes.reshape(emb.num_embeddings, -1)))
            q4.scale.copy_(scale.reshape(emb.num_embeddings, -1).to(torch.float16))
            q4.zero.copy_(zero.reshape(emb.num_embeddings, -1).to(torch.uint8))
        how = f"int4 g{group} " + {"gptq4": "GPTQ (tied head's inputs)", "int4m": "scale+min RTN"}.get(
            scheme, "RTN"
        )
        rows = [_row("(embedding) " + fam.embed, w, q4.dequantized_weight(), 4, how)]
        set_module(lm.model, fam.embed, q4)
        set_module(lm.model, fam.unembed, Int4TiedHead(q4))
        return {"embed": fam.embed, "head": fam.unembed, "head_mode": "tied", "level": level, "rows": rows}
    q = Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
    scale, zero = affine_params(w, INT8_CHANNEL)
    q.qweight.copy_(quantize(w, scale, zero, INT8_CHANNEL))
    q.scale.copy_(scale.flatten())
    rows = [_row("(embedding) " + fam.embed, w, q.dequantized_weight(), 8, "int8 per row")]
    set_module(lm.model, fam.embed, q)
    head_info = None
    if tied:
        set_module(lm.model, fam.unembed, Int8TiedHead(q))
        head_info = "tied"
    elif isinstance(head, nn.Linear) and head.bias is None:
        hq = make_int8(head)
        rows.append(_row(fam.unembed, head.weight.detach().float(), hq.dequantized_weight(), 8, "int8"))
        set_module(lm.model, fam.unembed, hq)
        head_info = "int8"
    return {"embed": fam.embed, "head": fam.unembed, "head_mode": head_info, "rows": rows}


def rebuild_embeddings(model: nn.Module, info: dict) -> None:
    emb = model.get_submodule(info["embed"])
    scheme, group = embedding_level(info.get("level", "int8"))
    if scheme != "int8":
        q4 = Int4Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group, scheme == "int4m")
        set_module(model, info["embed"], q4)
        set_module(model, info["head"], Int4TiedHead(q4))
        return
    q = Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
    set_module(model, info["embed"], q)
    if info.get("head_mode") == "tied":
        set_module(model, info["head"], Int8TiedHead(q))
    elif info.get("head_mode") == "int8":
        head = model.get_submodule(info["head"])
        set_module(model, info["head"], Int8Linear(head.in_features, head.out_features, False))


# -- calibration inputs and error rows -------------------------------------------------------------------
def _row(name, w, w_hat, bits, how, out_sqnr=None, rel_err=None) -> dict:
    return {
        "layer": name,
        "shape": list(w.shape),
        "bits": bits,
        "how": how,
        "weight_sqnr_db": round(sqnr(w, w_hat), 2),
        "output_sqnr_db": None if out_sqnr is None else round(out_sqnr, 2),
        "output_rel_error": None if rel_err is None else round(rel_err, 6),
    }


@torch.no_grad()
def error_row(
    name: str, weight: torch.Tensor, bias, module: nn.Module, x: torch.Tensor | None, how: str
) -> dict:
    """Weight SQNR and the output error of ``module`` vs the original linear on calibration inputs ``x``."""
    w = weight.detach().float()
    w_hat = module.dequantized_weight()
    out_sqnr = rel = None
    if x is not None and len(x):
        ref = torch.nn.functional.linear(x, w, None if bias is None else bias.detach().float())
        got = module(x).float()
        out_sqnr = sqnr(ref, got)
        rel = float((ref - got).norm() / ref.norm().clamp_min(1e-30))
    return _row(name, w, w_hat, getattr(module, "bits", 8), how, out_sqnr, rel)


def rank_rows(rows: list[dict]) -> list[dict]:
    """Worst first: by output SQNR when measured, else by weight SQNR."""

    def key(r):
        v = r["output_sqnr_db"] if r["output_sqnr_db"] is not None else r["weight_sqnr_db"]
        return v if v is not None else float("inf")

    return sorted(rows, key=key)
