"""A finished scan, read back: statistics per unit, top contexts rebuilt from the stored window ids."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import LmscopeError


class ScanResult:
    """``s = lmscope.scan.load("scan/")``; ``s.top_contexts(site, unit, k)``, ``s.stats(site)``."""

    def __init__(self, out, info: dict, stats: dict, topk: dict, tokenizer=None):
        self.out = Path(out)
        self.info = info
        self._stats = stats
        self._topk = topk
        self.tokenizer = tokenizer
        self._index = None  # global window -> (shard, row), read on first use

    # -- description ------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.info["settings"]["sites"])

    @property
    def seq_len(self) -> int:
        return self.info["settings"]["seq_len"]

    def units(self, site: str) -> int:
        return self._stats[f"{self._site(site)}.mean"].shape[0]

    def _site(self, site: str) -> str:
        if site not in self.sites:
            raise LmscopeError(f"site '{site}' was not scanned", f"scanned sites: {', '.join(self.sites)}")
        return site

    def stats(self, site: str) -> dict[str, torch.Tensor]:
        """Per-unit ``count``, ``mean``, ``var``, ``min``, ``max``, ``frac_active``, ``hist``, ``hist_edges``."""
        site = self._site(site)
        out = {k.split(".")[-1]: v for k, v in self._stats.items() if k.startswith(f"{site}.")}
        out["hist_edges"] = self._stats["hist_edges"]
        return out

    def heads(self) -> dict | None:
        path = self.out / "heads.json"
        return json.loads(path.read_text()) if path.exists() else None

    # -- contexts ---------------------------------------------------------------------------------
    @lru_cache(maxsize=8)  # noqa: B019 - a result is long-lived and reads few shards
    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.out / "windows" / f"shard-{index:05d}.safetensors"))

    def window_ids(self, window: int) -> list[int]:
        """The token ids of global window ``window``."""
        if self._index is None:
            from safetensors.torch import load_file

            self._index = load_file(str(self.out / "windows" / "index.safetensors"))
        shard, row = int(self._index["shard"][window]), int(self._index["row"][window])
        data = self._shard(shard)
        a, b = int(data["offsets"][row]), int(data["offsets"][row + 1])
        return data["ids"][a:b].tolist()

    def top_contexts(self, site: str, unit: int, k: int | None = None) -> list[dict]:
        """The ``k`` (default: all kept) strongest activations of ``unit``, best first, with their contexts.

        Each: ``activation``, ``doc``, ``window``, ``position``, ``token`` (its text), ``token_id``,
        ``text`` (the window up to and including the token), ``input_ids`` (those ids: for a causal model,
        running it on exactly them reproduces ``activation`` at the last position), ``window_ids``.
        """
        site = self._site(site)
        n_units = self.units(site)
        if not 0 <= unit < n_units:
            raise LmscopeError(f"unit {unit} is out of range for {site}", f"use 0..{n_units - 1}")
        act = self._topk[f"{site}.activation"][unit]
        kept = int((~torch.isnan(act)).sum())
        k = kept if k is None else min(k, kept)
        out = []
        for j in range(k):
            window = int(self._topk[f"{site}.window"][unit, j])
            position = int(self._topk[f"{site}.position"][unit, j])
            ids = self.window_ids(window)
            item = {
                "activation": float(act[j]),
                "doc": int(self._topk[f"{site}.doc"][unit, j]),
                "window": window,
                "position": position,
                "token_id": ids[position],
                "input_ids": ids[: position + 1],
                "window_ids": ids,
            }
            if self.tokenizer is not None:
                item["token"] = self.tokenizer.decode([ids[position]])
                item["text"] = self.tokenizer.decode(ids[: position + 1])
            out.append(item)
        return out

    def __repr__(self) -> str:
        return (
            f"ScanResult({str(self.out)!r}, model={self.info['model']['name']!r}, tokens={self.info['tokens']:,}, "
            f"sites={len(self.sites)})"
        )


def load(out, tokenizer=None) -> ScanResult:
    """Open a finished scan directory. The tokenizer (default: the scanned model's, if it opens) gives text."""
    from safetensors.torch import load_file

    out = Path(out).expanduser()
    info_path = out / "scan.json"
    if not info_path.exists():
        hint = (
            "it is unfinished: rerun the scan with --resume" if (out / "state.safetensors").exists() else ""
        )
        raise LmscopeError(
            f"'{out}' holds no finished scan (no scan.json)", hint or "pass a --out of lmscope scan"
        )
    info = json.loads(info_path.read_text())
    if tokenizer is None:
        tokenizer = _tokenizer(info["model"])
    return ScanResult(
        out,
        info,
        load_file(str(out / "stats.safetensors")),
        load_file(str(out / "topk.safetensors")),
        tokenizer,
    )


def _tokenizer(model: dict):
    path = model.get("path")
    if not path or not Path(path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
