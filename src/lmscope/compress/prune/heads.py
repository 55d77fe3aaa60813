"""Attention-head pruning that physically removes heads (the model gets smaller and faster).

Grouped-query aware: in a layer with G KV heads, each serving h query heads, query heads are removed within
their KV group, every kept group keeps the same number h' of query heads (attention repeats each KV head
h' times, so ``num_key_value_groups`` stays one number per layer) and a KV head with its k/v rows goes only
when its whole group goes. Per-layer head counts may differ; ``lm.n_heads_at(i)`` reads them from o_proj.

Which heads go is chosen by an exact dynamic program over layers: for a target number of removed heads it
minimises the summed score of the removed heads under the grouping constraint. Scores come from
``importance`` (gradient of the calibration loss w.r.t. a per-head gate, Michel et al. 2019, computed by
``lmscope.explain.heads.head_importance``), ``magnitude`` (‖W_O^h‖·‖W_V^kv(h)‖) or ``random`` (a seeded
baseline).
"""

from __future__ import annotations

import torch

from ...errors import LmscopeError
from ..calibration import calibration_inputs
from ..targets import set_module
from ._linear import keep_inputs, keep_outputs, weight_out_in
from ._origin import get_origin, set_origin

ORDERS = ("importance", "magnitude", "random")


# -- layout of one attention layer --------------------------------------------------------------------
def layer_layout(lm, layer: int) -> tuple[int, int]:
    """(query heads, query heads per KV head) currently in ``layer``."""
    attn = lm.blocks[layer].get_submodule(lm.family.attn)
    n_q = lm.n_heads_at(layer)
    per_kv = int(getattr(attn, "num_key_value_groups", 1) or 1)
    return n_q, per_kv


def check_head_surgery(lm) -> None:
    """Refuse, in one line, families whose head layout lmscope cannot slice exactly."""
    fam = lm.family
    why = None
    if fam.shared:
        why = "one attention module serves every depth, so a head cannot go at one layer only"
    elif fam.fused_qkv and fam.qkv_layout not in ("concat", "per_head"):
        why = f"its fused qkv projection ({fam.q}) interleaves heads in a layout lmscope does not slice"
    elif fam.name in ("bloom", "mpt") or getattr(lm.config, "alibi", False):
        why = "its ALiBi position biases are built once for the model's full head count"
    elif fam.name == "phi3":
        why = "its attention splits the fused qkv projection by the config's head count, shared by all layers"
    else:
        attn = lm.blocks[0].get_submodule(fam.attn)
        width = lm.n_heads * lm.head_dim
        for norm in ("q_norm", "k_norm"):
            w = getattr(getattr(attn, norm, None), "weight", None)
            if (
                w is not None
                and w.numel() in (width, lm.n_kv_heads * lm.head_dim)
                and w.numel() != lm.head_dim
            ):
                why = f"its {norm} normalizes all heads together, so removing one changes the others"
    if why:
        raise LmscopeError(
            f"head pruning is not supported for {fam.name}: {why}",
            "prune neurons or layers instead (--prune-neurons / --prune-layers), or quantize",
        )


def _fused_rows(lm, layer: int, which: str, q_heads=None, kv_heads=None) -> list[int]:
    """Rows of the fused qkv projection holding ``which`` (q, k, v or qkv) for the given heads."""
    fam, hd = lm.family, lm.head_dim
    n_q = lm.n_heads_at(layer)
    n_kv = lm.n_kv_heads_at(layer)
    q_heads = range(n_q) if q_heads is None else q_heads
    kv_heads = range(n_kv) if kv_heads is None else kv_heads
    if fam.qkv_layout == "per_head":  # [h0: q k v | h1: q k v | ...], one KV head per query head
        part = {"q": [0], "k": [1], "v": [2], "qkv": [0, 1, 2]}[which]
        return [h * 3 * hd + p * hd + d for h in q_heads for p in part for d in range(hd)]
    q_width, kv_width = n_q * hd, n_kv * hd
    rows = []
    if which in ("q", "qkv"):
        rows += [h * hd + d for h in q_heads for d in range(hd)]
    if which in ("k", "qkv"):
        rows += [q_width + g * hd + d for g in kv_heads for d in range(hd)]
    if which in ("v", "qkv"):
        rows += [q_width + kv_width + g * hd + d for g in kv_heads for d in range(hd)]
    return rows


_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "head_count")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTH_ATTRS = ("embed_dim", "all_head_size", "split_size", "hidden_size", "inner_dim")


def _update_counts(attn, n_q: int, new_q: int, n_kv: int, new_kv: int, hd: int) -> None:
    """Head counts and widths a family's attention keeps as attributes follow the slicing."""
    for name in _HEAD_COUNT_ATTRS:
        if getattr(attn, name, None) == n_q:
            setattr(attn, name, new_q)
    for name in _KV_COUNT_ATTRS:
        if getattr(attn, name, None) == n_kv and n_kv != n_q:
            setattr(attn, name, new_kv)
    for name in _WIDTH_ATTRS:
        if getattr(attn, name, None) == n_q * hd:
            setattr(attn, name, new_q * hd)


# -- scores ---------------------------------------------------------------------------------------------
def magnitude_scores(lm) -> list[torch.Tensor]:
    """‖W_O columns of head h‖_F · ‖W_V rows of its KV head‖_F per layer (higher = keep)."""
    fam, hd = lm.family, lm.head_dim
    out = []
    for i, block in enumerate(lm.blocks):
        n_q, per_kv = layer_layout(lm, i)
        wo = weight_out_in(block.get_submodule(fam.o)).detach().float()
        o_norm = wo.reshape(wo.shape[0], n_q, hd).pow(2).sum((0, 2)).sqrt()
        wv = weight_out_in(block.get_submodule(fam.v)).detach().float()
        if fam.fused_qkv:
            wv = wv[_fused_rows(lm, i, "v")]
        v_norm = wv.reshape(-1, hd, wv.shape[1]).pow(2).sum((1, 2)).sqrt()
        out.append(o_norm * v_norm.repeat_interleave(per_kv))
    return out


def random_scores(lm, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(lm.n_heads_at(i), generator=g) for i in range(lm.n_layers)]


def gradient_importance(lm, calib=None) -> list[torch.Tensor]:
    """Michel et al. head importance (|∂loss/∂gate_h| averaged over calibration windows), computed by
    ``lmscope.explain.heads.head_importance`` on the calibration text."""
    from ...explain.heads import head_importance

    batches = calibration_inputs(lm, calib)
    by_length: dict[int, list[torch.Tensor]] = {}
    for batch in batches:  # head_importance takes equal-length windows
        by_length.setdefault(batch["input_ids"].shape[1], []).append(batch["input_ids"])
    total = None
    for rows in by_length.values():
        ids = torch.cat(rows)
        grad = head_importance(lm, methods=("grad",), input_ids=ids).scores["grad_importance"] * len(ids)
        total = grad if total is None else total + grad
    return [torch.from_numpy(total[i, : lm.n_heads_at(i)]).float() for i in range(lm.n_layers)]


def head_scores(lm, order: str = "importance", calib=None, seed: int = 0) -> list[torch.Tensor]:
    """One score per current head per layer; higher means more worth keeping."""
    if order == "magnitude":
        return magnitude_scores(lm)
    if order == "random":
        return random_scores(lm, seed)
    if order == "importance":
        return gradient_importance(lm, calib)
    raise LmscopeError(f"unknown head order '{order}'", f"use one of: {', '.join(ORDERS)}")


# -- planning -------------------------------------------------------------------------------------------
def _layer_options(scores: torch.Tensor, per_kv: int) -> dict[int, tuple[float, list[int]]]:
    """For one layer: removed-count -> (cost = summed score of removed heads, kept heads), best per count."""
    n_q = len(scores)
    n_kv = n_q // per_kv
    s = scores.double().reshape(n_kv, per_kv)
    total = float(s.sum())
    options: dict[int, tuple[float, list[int]]] = {}
    order_in_group = torch.argsort(s, dim=1, descending=True)
    for keep_per in range(1, per_kv + 1):
        kept_in = torch.gather(s, 1, order_in_group[:, :keep_per])
        group_value = kept_in.sum(1)
        group_rank = torch.argsort(group_value, descending=True)
        for keep_groups in range(1, n_kv + 1):
            groups = sorted(group_rank[:keep_groups].tolist())
            kept = sorted(g * per_kv + int(j) for g in groups for j in order_in_group[g, :keep_per])
            removed = n_q - len(kept)
            cost = total - float(group_value[groups].sum())
            if removed not in options or cost < options[removed][0]:
                options[removed] = (cost, kept)
    return options


def plan_heads(lm, scores: list[torch.Tensor], n_remove: int, layers=None) -> dict[int, list[int]]:
    """Kept heads per layer (current numbering) removing ``n_remove`` heads in total, or the nearest count
    the grouping allows; minimises the summed score of the removed heads (exact DP over layers).
    ``layers``: the only layers that may lose heads (None: all)."""
    allowed = set(range(lm.n_layers)) if layers is None else set(layers)
    options = [
        _layer_options(scores[i], layer_layout(lm, i)[1])
        if i in allowed
        else {0: (0.0, list(range(len(scores[i]))))}
        for i in range(lm.n_layers)
    ]
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # removed so far -> (cost, choice per layer)
    for opts in options:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for done, (cost, choice) in best.items():
            for r, (c, _) in opts.items():
                key = done + r
                if key not in nxt or cost + c < nxt[key][0]:
                    nxt[key] = (cost + c, [*choice, r])
        best = nxt
    reachable = sorted(best, key=lambda r: (abs(r - n_remove), r))
    choice = best[reachable[0]][1]
    return {i: options[i][r][1] for i, r in enumerate(choice)}


# -- physical removal ---------------------------------------------------------------------------------
@torch.no_grad()
def remove_heads(lm, keep: dict[int, list[int]], track_origin: bool = True) -> dict:
    """Slice q/k/v/o so that layer i keeps only query heads ``keep[i]`` (current numbering, any order).

    Returns the JSON info a rebuild needs: kept heads per layer and the resulting layout.
    """
    fam, hd = lm.family, lm.head_dim
    origin = get_origin(lm.model, lm.n_layers, lm.n_heads)
    info = {}
    for i in sorted(keep):
        kept = sorted(int(h) for h in keep[i])
        n_q, per_kv = layer_layout(lm, i)
        if not kept or len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= n_q:
            raise LmscopeError(
                f"layer {i}: cannot keep heads {kept} of {n_q}", "keep at least one existing head per layer"
            )
        groups: dict[int, list[int]] = {}
        for h in kept:
            groups.setdefault(h // per_kv, []).append(h)
        sizes = {len(v) for v in groups.values()}
        if len(sizes) != 1:
            raise LmscopeError(
                f"layer {i}: every kept KV group must keep the same number of query heads, got "
                f"{ {g: len(v) for g, v in groups.items()} }",
                "remove query heads evenly across the KV groups that stay",
            )
        new_per_kv = sizes.pop()
        kv_kept = sorted(groups)
        block = lm.blocks[i]
        attn = block.get_submodule(fam.attn)
        n_kv = lm.n_kv_heads_at(i)
        q_rows = [h * hd + d for h in kept for d in range(hd)]
        kv_rows = [g * hd + d for g in kv_kept for d in range(hd)]
        if fam.fused_qkv:  # one projection producing q, k and v
            rows = _fused_rows(lm, i, "qkv", kept, kv_kept)
            set_module(block, fam.q, keep_outputs(block.get_submodule(fam.q), rows))
        else:
            set_module(block, fam.q, keep_outputs(block.get_submodule(fam.q), q_rows))
            set_module(block, fam.k, keep_outputs(block.get_submodule(fam.k), kv_rows))
            set_module(block, fam.v, keep_outputs(block.get_submodule(fam.v), kv_rows))
        set_module(block, fam.o, keep_inputs(block.get_submodule(fam.o), q_rows))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = new_per_kv
        _update_counts(attn, n_q, len(kept), n_kv, len(kv_kept), hd)
        if track_origin:
            before = origin["heads"][str(i)]
            origin["heads"][str(i)] = [before[h] for h in kept]
        info[str(i)] = {
            "kept": kept,
            "kv_kept": kv_kept,
            "per_kv": new_per_kv,
            "heads_before": n_q,
            "original_layer": origin["layers"][i],
        }
    if track_origin:
        set_origin(lm.model, origin)
    return info


def prune_heads(
    lm, fraction: float = 0.25, order: str = "importance", calib=None, seed: int = 0, layers=None
) -> dict:
    """Remove ``fraction`` of the query heads (GQA aware) chosen by ``order``; returns the step info.

    ``layers``: only these layers lose heads, and ``fraction`` is of their heads (None: every layer)."""
    if not 0.0 <= fraction < 1.0:
        raise LmscopeError(f"head fraction {fraction} is outside [0, 1)", "use e.g. 0.25")
    total = sum(lm.n_heads_at(i) for i in range(lm.n_layers))
    eligible = total if layers is None else sum(lm.n_heads_at(i) for i in layers)
    target = int(round(eligible * fraction))
    if target == 0:
        return {"order": order, "heads_before": total, "heads_removed": 0, "layers": {}}
    check_head_surgery(lm)
    scores = head_scores(lm, order, calib, seed)
    keep = plan_heads(lm, scores, target, layers)
    before = {i: lm.n_heads_at(i) for i in keep}
    changed = {i: k for i, k in keep.items() if len(k) < before[i]}
    probe, masked = _masked_reference(lm, changed)
    layers = remove_heads(lm, changed)
    _check_exact(lm, probe, masked)
    removed = sum(before[i] - len(k) for i, k in keep.items())
    return {
        "order": order,
        "heads_before": total,
        "n_layers": lm.n_layers,
        "heads_removed": removed,
        "heads_removed_target": target,
        "fraction_removed": removed / total,
        "layers": layers,
        "scores": [[round(float(x), 6) for x in s] for s in scores],
        "note": ""
        if removed == target
        else f"nearest count the KV grouping allows: {removed} (asked {target})",
    }


@torch.no_grad()
def _masked_reference(lm, keep: dict[int, list[int]]):
    """Output of the model with the heads about to be removed zeroed at the output projection's input:
    what physical removal must reproduce."""
    from ...capture.session import hooks

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(lm.vocab_size, 1000), (1, 12), generator=g)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def zero(kept):
        def fn(t, name):
            t = t.clone()
            drop = [h for h in range(t.shape[2]) if h not in set(kept)]
            t[:, :, drop] = 0
            return t

        return fn

    interventions = {f"blocks.{i}.attn.head_out": zero(k) for i, k in keep.items()}
    with hooks(lm, [], interventions):
        return probe, lm.output_of(lm.forward(probe)).float()


@torch.no_grad()
def _check_exact(lm, probe, masked) -> None:
    try:
        got = lm.output_of(lm.forward(probe)).float()
        err = float((got - masked).abs().max() / masked.abs().max().clamp_min(1e-6))
        how = f"differs from masking them by {err:.1e}"
    except RuntimeError as e:  # the family's attention assumes the original head count somewhere
        got, err, how = None, float("inf"), f"breaks its forward: {str(e).splitlines()[0][:80]}"
    if got is None or got.shape != masked.shape or not err <= 1e-4:
        raise LmscopeError(
            f"head pruning is not exact for {lm.family.name} (removing heads {how}); "
            "the model you passed in is unchanged",
            "prune neurons or layers instead (--prune-neurons / --prune-layers), or quantize",
        )


def rebuild_heads(model, info: dict) -> None:
    """Re-create the pruned head shapes of ``info`` on a freshly built model (weights come from the state dict)."""
    from ...lm import LM

    lm = LM(model, None)
    keep = _current_layers(lm, info)
    remove_heads(lm, {i: info["layers"][k]["kept"] for i, k in keep.items()}, track_origin=False)


def _current_layers(lm, info: dict) -> dict[int, str]:
    """Map info's layer keys to the fresh model's layers (it may already have its final, shallower depth)."""
    if lm.n_layers == info.get("n_layers", lm.n_layers):
        return {int(k): k for k in info["layers"]}
    where = {orig: i for i, orig in enumerate(get_origin(lm.model)["layers"])}
    out = {}
    for k, v in info["layers"].items():
        if v.get("original_layer") in where:
            out[where[v["original_layer"]]] = k
    return out
