"""One shard of a scan: run the model over a list of windows and return its mergeable partial state.

This is the unit of work of both executors (in-process and Ray): a pure function of the model, the
windows and the settings. Captures go through lmscope's hook session as interventions that reduce each
tensor as soon as it exists and keep nothing, so memory does not grow with the shard.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from ..capture.names import split
from ..capture.session import hooks
from .stats import SiteStats, TopK

#: per-head corpus sums kept by --heads (text metrics; induction comes from random repeated sequences)
HEAD_SUMS = ("previous_token", "first_token", "self", "mean_distance", "entropy")
HEAD_HITS = ("previous_token", "first_token", "self")


@dataclass(frozen=True)
class Settings:
    """Everything that decides a scan's result (a resumed scan must have the same)."""

    sites: tuple[str, ...]
    seq_len: int
    max_tokens: int | None
    top_k: int
    hist_bins: int
    shard_tokens: int
    batch_tokens: int
    heads: bool
    dump: tuple[str, ...]
    dump_max_gb: float
    seed: int = 0

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _units(tensor: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[b, pos, ...] -> [b * pos, units] float32."""
    return tensor.reshape(batch * length, -1).float()


def _head_partial(pattern: torch.Tensor, sums: dict, hits: dict, layer: int) -> int:
    """Add one batch of attention patterns [b, h, q, k] to the per-head sums; returns query positions used."""
    b, h, q_len, _ = pattern.shape
    if q_len < 2:
        return 0
    pat = pattern.float()
    q = torch.arange(1, q_len)
    targets = {"previous_token": q - 1, "first_token": torch.zeros_like(q), "self": q}
    rows = pat[:, :, 1:]  # [b, h, q-1, k] queries from position 1 on, as explain.heads scores them
    best = rows.argmax(-1)  # [b, h, q-1]
    for metric, k in targets.items():
        sums[metric][layer, :h] += pat[:, :, q, k].double().sum(dim=(0, 2))
        hits[metric][layer, :h] += (best == k).sum(dim=(0, 2))
    distance = (q[:, None] - torch.arange(q_len)[None, :]).abs().float()  # [q-1, k] |query - key|
    sums["mean_distance"][layer, :h] += (rows * distance).sum(-1).double().sum(dim=(0, 2))
    plogp = torch.where(rows > 0, rows * rows.clamp_min(1e-30).log(), torch.zeros_like(rows))
    sums["entropy"][layer, :h] += (-plogp.sum(-1)).double().sum(dim=(0, 2))
    return b * (q_len - 1)


def site_units(lm, site: str) -> int:
    layer, what = split(site)
    if what == "mlp.hidden":
        return lm.d_mlp_at(layer)
    if what == "attn.head_out":
        return lm.n_heads_at(layer) * lm.head_dim
    return lm.d_model


def run_shard(
    lm, batches: list[list[tuple[int, tuple[int, ...]]]], settings: Settings
) -> dict[str, torch.Tensor]:
    """Scan ``batches`` of windows [(global window index, ids)] (equal lengths within a batch); returns the
    shard's partial state as flat tensors.

    Keys: ``stats.{site}.{field}``, ``topk.{site}``, ``heads.*`` (with --heads), ``dump.{site}`` /
    ``dump.slot`` (fp16 activations and their token slots, ordered by slot).
    """
    from ..explain.patching import base_forward

    stats = {s: SiteStats(site_units(lm, s), settings.hist_bins) for s in settings.sites}
    tops = {s: TopK(site_units(lm, s), settings.top_k) for s in settings.sites}
    n_layers = lm.n_layers
    n_heads = max(lm.n_heads_at(i) for i in range(n_layers))
    head_sums = {m: torch.zeros(n_layers, n_heads, dtype=torch.float64) for m in HEAD_SUMS}
    head_hits = {m: torch.zeros(n_layers, n_heads, dtype=torch.int64) for m in HEAD_HITS}
    head_queries = torch.zeros(n_layers, dtype=torch.int64)
    dumped: dict[str, list[torch.Tensor]] = defaultdict(list)
    dump_slots: list[torch.Tensor] = []

    current: dict = {}

    def observe(tensor: torch.Tensor, name: str):
        b, length, slots = current["b"], current["len"], current["slots"]
        layer, what = split(name)
        if what == "attn.pattern":
            head_queries[layer] += _head_partial(tensor.detach(), head_sums, head_hits, layer)
            return None
        x = _units(tensor.detach(), b, length)  # [tokens, units]
        if name in stats:
            stats[name].update(x)
            tops[name].update_values(x, slots)
        if name in settings.dump:
            dumped[name].append(x.half())
        return None

    names = set(settings.sites) | set(settings.dump)
    if settings.heads:
        names |= {f"blocks.{i}.attn.pattern" for i in range(n_layers)}
    interventions = {n: observe for n in names}
    for batch in batches:
        length = len(batch[0][1])
        ids = torch.tensor([w[1] for w in batch], dtype=torch.long)  # [b, len], equal lengths
        index = torch.tensor([w[0] for w in batch], dtype=torch.int64)
        slots = (index[:, None] * settings.seq_len + torch.arange(length)).reshape(-1)  # [b * len]
        current.update(b=len(batch), len=length, slots=slots)
        if settings.dump:
            dump_slots.append(slots)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad(), hooks(lm, (), interventions):
            base_forward(lm, inputs)

    state: dict[str, torch.Tensor] = {}
    for s in settings.sites:
        state.update(stats[s].state(f"stats.{s}"))
        state[f"topk.{s}"] = tops[s].keys
    if settings.heads:
        for m in HEAD_SUMS:
            state[f"heads.sum.{m}"] = head_sums[m]
        for m in HEAD_HITS:
            state[f"heads.hits.{m}"] = head_hits[m]
        state["heads.queries"] = head_queries
    if settings.dump:
        slots = torch.cat(dump_slots)
        order = torch.argsort(slots)
        state["dump.slot"] = slots[order]
        for s in settings.dump:
            state[f"dump.{s}"] = torch.cat(dumped[s])[order]
    return state


def merge_state(total: dict[str, torch.Tensor] | None, part: dict[str, torch.Tensor], settings: Settings):
    """``total`` with shard ``part`` folded in (exact: Chan for moments, sums, top-k over unique keys)."""
    part = {k: v for k, v in part.items() if not k.startswith("dump.")}
    if total is None:
        return {k: v.clone() for k, v in part.items()}
    out = dict(total)
    for s in settings.sites:
        a = SiteStats.from_state(total, f"stats.{s}")
        a.merge(SiteStats.from_state(part, f"stats.{s}"))
        out.update(a.state(f"stats.{s}"))
        top = TopK(total[f"topk.{s}"].shape[1], settings.top_k)
        top.keys = total[f"topk.{s}"]
        top.update(part[f"topk.{s}"])
        out[f"topk.{s}"] = top.keys
    for k in part:
        if k.startswith("heads."):
            out[k] = total[k] + part[k]
    return out
