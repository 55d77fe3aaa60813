"""Activations for dictionaries: streamed from the model over a corpus (the forward stops after the last
needed block), or read from ``lmscope scan --dump`` shards.

Windows come from ``scan``'s corpus readers and window cutter, so a corpus means the same thing to both
verbs. Every ``HELD_OUT``-th window is held out for evaluation and never trained on. The first position of
every window is left out of training and of the splice: it is the attention sink, whose residual norm is tens
of times the rest (SAELens users drop the BOS token for the same reason).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..capture.names import expand, split
from ..capture.session import hooks
from ..errors import LmscopeError

HELD_OUT = 10  # every 10th window is held out
#: per-token sites a dictionary can read or write
DICTIONARY_SITES = (
    "resid_pre",
    "attn.out",
    "resid_mid",
    "mlp.hidden",
    "mlp.out",
    "resid_post",
)  # forward order


class _Stop(Exception):  # noqa: N818 - control flow: everything needed was captured
    pass


def check_site(lm, site: str, flag: str = "--site") -> str:
    """One concrete per-token site of ``lm`` (an error naming the valid ones otherwise)."""
    try:
        names = expand([site], lm.n_layers, has_logits=lm.is_causal, moe=lm.family.moe)
    except LmscopeError as e:
        raise LmscopeError(f"{flag} '{site}' is not a site of {lm.name} ({e.problem})", e.fix) from None
    if len(names) != 1 or split(names[0])[0] is None or split(names[0])[1] not in DICTIONARY_SITES:
        raise LmscopeError(
            f"{flag} '{site}' is not one per-token site",
            f"use one of blocks.N.{{{','.join(DICTIONARY_SITES)}}} with N in 0..{lm.n_layers - 1}",
        )
    return names[0]


def site_width(lm, site: str) -> int:
    layer, what = split(site)
    return lm.d_mlp_at(layer) if what == "mlp.hidden" else lm.d_model


def transcoder_input(lm, out_site: str) -> str:
    """The site a transcoder of ``blocks.L.mlp.out`` reads: the residual the MLP reads (before its norm)."""
    layer, what = split(out_site)
    if what != "mlp.out":
        raise LmscopeError(
            f"a transcoder writes an MLP's output, not '{out_site}'", f"pass --site blocks.{layer}.mlp.out"
        )
    return f"blocks.{layer}.resid_mid" if lm.family.mid is not None else f"blocks.{layer}.resid_pre"


def corpus_windows(lm, corpus, seq_len: int, part: str) -> Iterator:
    """``part`` = ``train`` (all but every HELD_OUT-th window), ``eval`` (those) or ``all``."""
    from ..scan.windows import windows

    for w in windows(lm, corpus.documents(), seq_len, None):
        if part == "all" or (w.index % HELD_OUT == HELD_OUT - 1) == (part == "eval"):
            yield w


def window_batches(stream, batch_windows: int) -> Iterator[torch.Tensor]:
    """Equal-length windows stacked into ``[b, len]`` id tensors (a shorter tail window goes alone)."""
    cur: list = []
    for w in stream:
        if cur and len(w.ids) != len(cur[0].ids):
            yield torch.tensor([x.ids for x in cur])
            cur = []
        cur.append(w)
        if len(cur) == batch_windows:
            yield torch.tensor([x.ids for x in cur])
            cur = []
    if cur:
        yield torch.tensor([x.ids for x in cur])


def capture(lm, ids: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
    """``{site: [b, len, d]}`` float32 for one batch of ids, running only as far as the last site's block."""
    got: dict[str, torch.Tensor] = {}
    last = max(sites, key=lambda s: (split(s)[0], DICTIONARY_SITES.index(split(s)[1])))

    def keep(t, name):
        got[name] = t.detach().float()
        if len(got) == len(sites) and name == last:
            raise _Stop
        return None

    try:
        with torch.no_grad(), hooks(lm, (), {s: keep for s in sites}):
            lm.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    except _Stop:
        pass
    return got


def stream(lm, corpus, sites: list[str], seq_len: int, part: str, batch_windows: int = 8):
    """Yield ``(ids [b, len], {site: [b, len, d]})`` over the ``part`` windows of ``corpus``."""
    for ids in window_batches(corpus_windows(lm, corpus, seq_len, part), batch_windows):
        yield ids, capture(lm, ids, sites)


def dump_stream(scan_dir, sites: list[str]) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Activations from ``lmscope scan --dump`` shards: ``(token ids [n], {site: [n, d]})`` per shard, with
    the window's first position dropped as in the streamed path."""
    from safetensors.torch import load_file

    folder = Path(scan_dir).expanduser() / "dump"
    files = sorted(folder.glob("shard-*.safetensors"))
    if not files:
        raise LmscopeError(
            f"'{scan_dir}' holds no activation dumps", "run lmscope scan with --dump SITE first"
        )
    for f in files:
        data = load_file(str(f))
        missing = [s for s in sites if s not in data]
        if missing:
            have = [k for k in data if k not in ("input_ids", "window", "position")]
            raise LmscopeError(
                f"the scan dumped {', '.join(have)}, not {missing[0]}", f"rescan with --dump {missing[0]}"
            )
        keep = data["position"] > 0
        yield data["input_ids"][keep].long(), {s: data[s][keep].float() for s in sites}
