"""``scan``: the driver. Cuts the corpus into shards, runs them (in-process or on Ray), merges, checkpoints.

Layout of ``out/`` while a scan runs and after:
- ``windows/shard-NNNNN.safetensors``: every window's token ids (int32), document and start, per shard;
- ``dump/shard-NNNNN.safetensors`` (``--dump``): fp16 activations with their token ids, per shard;
- ``state.safetensors``: the merged state after the shards done so far (the checkpoint ``--resume`` reads);
- at the end ``stats.safetensors``, ``topk.safetensors``, ``heads.json``, ``scan.json``, ``report.html``.
Each file appears by a rename (``fsutil.atomic_directory``), so a kill leaves a file whole or absent. A
shard's windows and dump land before the checkpoint that counts it, so a resumed run redoes at most the
shard it was in, with the same inputs, and ends with byte-identical outputs.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..capture.names import expand, split
from ..errors import LmscopeError
from ..fsutil import atomic_directory
from .corpus import Corpus
from .shard import Settings, merge_state, run_shard
from .stats import decode, hist_edges
from .windows import Window, batches, windows

FORMAT_VERSION = 1
#: what a scan writes into --out (anything else there: not ours)
SCAN_FILES = {"windows", "dump", "state.safetensors", "scan.json", "stats.safetensors", "topk.safetensors"}
SCAN_FILES |= {"heads.json", "report.html"}
NOT_SCANNABLE = {"attn.pattern": "--heads", "attn.scores": "--heads", "logits": "lmscope inspect"}


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file by a rename: ``write(tmp_path)`` fills a temporary copy first."""
    with atomic_directory(path.parent) as tmp:
        write(tmp / path.name)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    metadata = {"lmscope": json.dumps(meta)} if meta is not None else None
    _write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata))


def _save_json(path: Path, data: dict) -> None:
    _write(path, lambda p: p.write_text(json.dumps(data, indent=1, ensure_ascii=False)))


def resolve_sites(lm, patterns, flag: str = "--sites") -> tuple[str, ...]:
    """Glob patterns -> concrete capture names that hold units (neurons, residual dimensions, head outputs)."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    names = expand(list(patterns), lm.n_layers, has_logits=lm.is_causal)
    bad = [n for n in names if split(n)[1] in NOT_SCANNABLE]
    if bad:
        what = split(bad[0])[1]
        raise LmscopeError(
            f"{flag} '{bad[0]}' has no units to scan ({what} is per position pair or per vocabulary entry)",
            f"use neurons or residual sites such as 'blocks.*.mlp.hidden', 'blocks.3.resid_post'"
            f"{' (heads: --heads)' if what.startswith('attn') else ''}",
        )
    return tuple(names)


def model_identity(lm) -> dict:
    return {
        "name": lm.name,
        "path": lm.path,
        "family": lm.family.name,
        "params": lm.n_params(),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "layers": lm.n_layers,
    }


def shards(stream: Iterator[list[Window]], shard_tokens: int) -> Iterator[list[list[Window]]]:
    """Consecutive batches grouped until ``shard_tokens`` tokens (at least one batch per shard)."""
    cur, size = [], 0
    for batch in stream:
        tokens = sum(len(w.ids) for w in batch)
        if cur and size + tokens > shard_tokens:
            yield cur
            cur, size = [], 0
        cur.append(batch)
        size += tokens
    if cur:
        yield cur


def as_jobs(shard: list[list[Window]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """A shard's batches as plain (window index, ids) pairs: what ``run_shard`` takes (and Ray ships)."""
    return [[(w.index, w.ids) for w in batch] for batch in shard]


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def stderr_progress(done: int, total: int | None, rate: float) -> None:
    """``scan: 12,288/100,000 tokens · 950 tok/s · ETA 1m32s`` on one refreshed stderr line."""
    eta = f" · ETA {_fmt_time((total - done) / rate)}" if total and rate > 0 else ""
    of = f"/{total:,}" if total else ""
    print(f"\rscan: {done:,}{of} tokens · {rate:,.0f} tok/s{eta}   ", end="", file=sys.stderr, flush=True)


class _Checkpoint:
    """The state of an ``out`` directory: what was done, the merged statistics so far."""

    def __init__(self, out: Path, identity: dict, resume: bool):
        self.out = out
        self.identity = identity
        self.state: dict[str, torch.Tensor] | None = None
        self.meta = {"shards": [], "dump_bytes": 0, "dump_shards": 0, "dump_stopped_at_shard": None}
        self.complete = False
        state_file, scan_file = out / "state.safetensors", out / "scan.json"
        if out.exists() and not out.is_dir():
            raise LmscopeError(f"--out '{out}' exists and is not a directory", "choose another --out")
        entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
        started = any(
            name in SCAN_FILES for name in entries
        )  # a run was here (maybe killed before a checkpoint)
        if started and not resume:
            raise LmscopeError(
                f"--out '{out}' already holds a scan",
                "pass --resume to continue it, or choose another --out",
            )
        if entries and not started:
            raise LmscopeError(f"--out '{out}' is not empty", "choose a new or empty --out directory")
        existing = state_file.exists() or scan_file.exists()
        if not existing:  # nothing checkpointed yet: start from the first shard
            return
        saved = json.loads(scan_file.read_text())["identity"] if scan_file.exists() else None
        if state_file.exists():
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(state_file), "pt") as f:
                stored = json.loads(f.metadata()["lmscope"])
            saved = stored["identity"]
            self.meta = stored["meta"]
            self.state = load_file(str(state_file))
        self.complete = saved is not None and not state_file.exists()
        differs = [k for k in ("model", "corpus", "settings") if saved.get(k) != identity[k]]
        if differs:
            raise LmscopeError(
                f"cannot resume: --out '{out}' holds a scan with another {' and '.join(differs)}",
                "rerun with the same --model, --corpus and settings, or choose another --out",
            )

    @property
    def done(self) -> int:
        return len(self.meta["shards"])


def scan(
    lm,
    corpus,
    out,
    *,
    field: str | None = None,
    sites=("blocks.*.mlp.hidden",),
    seq_len: int = 128,
    max_tokens: int | None = None,
    top_k: int = 20,
    heads: bool = False,
    dump=(),
    dump_max_gb: float = 4.0,
    hist_bins: int = 64,
    shard_tokens: int = 65536,
    batch_tokens: int = 2048,
    resume: bool = False,
    ray: str | None = None,
    workers: int = 2,
    progress: Callable[[int, int | None, float], None] | None = None,
    report: bool = True,
):
    """Scan ``corpus`` (paths, ``"builtin"`` or a ``Corpus``) with ``lm``; writes ``out`` and returns ``load(out)``.

    ``sites``: capture-name globs whose units get statistics and top-k contexts. ``heads``: corpus
    averages of the head characterization. ``dump``: sites whose fp16 activations are saved (up to
    ``dump_max_gb``). ``ray``: ``"auto"`` (a local Ray runtime) or a cluster address; ``workers`` actors.
    """
    from .result import load

    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus, field)
    for name, value, low in (
        ("--seq-len", seq_len, 2),
        ("--top-k", top_k, 1),
        ("--hist-bins", hist_bins, 2),
        ("--shard-tokens", shard_tokens, 1),
        ("--batch-tokens", batch_tokens, 1),
        ("--workers", workers, 1),
    ):
        if value < low:
            raise LmscopeError(f"{name} must be at least {low}, got {value}", f"pass {name} {low} or more")
    if max_tokens is not None and max_tokens < 1:
        raise LmscopeError(f"--max-tokens must be positive, got {max_tokens}", "e.g. --max-tokens 100000")
    if dump_max_gb <= 0:
        raise LmscopeError(f"--dump-max-gb must be positive, got {dump_max_gb}", "e.g. --dump-max-gb 4")
    settings = Settings(
        sites=resolve_sites(lm, sites),
        seq_len=seq_len,
        max_tokens=max_tokens,
        top_k=top_k,
        hist_bins=hist_bins,
        shard_tokens=shard_tokens,
        batch_tokens=batch_tokens,
        heads=heads,
        dump=resolve_sites(lm, dump, "--dump") if dump else (),
        dump_max_gb=float(dump_max_gb),
    )
    out = Path(out).expanduser()
    identity = {"model": model_identity(lm), "corpus": corpus.fingerprint(), "settings": settings.to_json()}

    stream = windows(lm, corpus.documents(), seq_len, max_tokens)
    first = next(stream, None)  # refuse an empty corpus before anything is written
    if first is None:
        skipped = corpus.skipped
        raise LmscopeError(
            f"the corpus has no text to scan ({skipped['not_utf8_or_binary']} non-UTF-8/binary and "
            f"{skipped['empty']} empty documents skipped)",
            "pass UTF-8 text files, or JSONL/Parquet with the text in --field",
        )
    ckpt = _Checkpoint(out, identity, resume)
    if ckpt.complete:
        return load(out, lm.tokenizer)

    def all_windows():
        yield first
        yield from stream

    total = max_tokens
    tokens_done = sum(s["tokens"] for s in ckpt.meta["shards"])
    t0, tokens_at_start = time.perf_counter(), tokens_done

    def commit(index: int, shard_batches: list[list[Window]], part: dict[str, torch.Tensor]) -> None:
        nonlocal tokens_done
        shard = sorted((w for b in shard_batches for w in b), key=lambda w: w.index)
        ids = torch.tensor([t for w in shard for t in w.ids], dtype=torch.int32)
        lengths = torch.tensor([len(w.ids) for w in shard], dtype=torch.int64)
        _save(
            out / "windows" / f"shard-{index:05d}.safetensors",
            {
                "ids": ids,
                "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
                "window": torch.tensor([w.index for w in shard], dtype=torch.int64),
                "doc": torch.tensor([w.doc for w in shard], dtype=torch.int64),
                "start": torch.tensor([w.start for w in shard], dtype=torch.int64),
            },
        )
        if settings.dump:
            _dump_shard(out, index, shard, part, settings, ckpt.meta)
        ckpt.state = merge_state(ckpt.state, part, settings)
        ckpt.meta["shards"].append(
            {"first_window": shard[0].index, "windows": len(shard), "tokens": int(lengths.sum())}
        )
        _save(out / "state.safetensors", ckpt.state, {"identity": identity, "meta": ckpt.meta})
        tokens_done += int(lengths.sum())
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress(tokens_done, total, (tokens_done - tokens_at_start) / max(elapsed, 1e-9))

    stream_batches = batches(all_windows(), seq_len, batch_tokens)
    todo = ((i, s) for i, s in enumerate(shards(stream_batches, shard_tokens)) if i >= ckpt.done)
    if ray:
        from .distributed import run_on_ray

        for i, shard, part in run_on_ray(lm, todo, settings, ray, workers):
            commit(i, shard, part)
    else:
        for i, shard in todo:
            commit(i, shard, run_shard(lm, as_jobs(shard), settings))
    if progress is not None:
        print(file=sys.stderr)
    _finalize(lm, out, ckpt, identity, settings, corpus, report)
    return load(out, lm.tokenizer)


def _dump_shard(out: Path, index: int, shard, part: dict, settings: Settings, meta: dict) -> None:
    """Write the shard's fp16 activations beside its token ids, unless --dump-max-gb would be passed."""
    if meta["dump_stopped_at_shard"] is not None:
        return
    tensors = {s: part[f"dump.{s}"] for s in settings.dump}
    slots = part["dump.slot"]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if meta["dump_bytes"] + nbytes > settings.dump_max_gb * 1e9:
        meta["dump_stopped_at_shard"] = index
        print(
            f"\nlmscope: --dump stops at shard {index}: --dump-max-gb {settings.dump_max_gb} reached "
            f"({meta['dump_shards']} shards, {meta['dump_bytes'] / 1e9:.2f} GB kept)",
            file=sys.stderr,
        )
        return
    by_window = {w.index: w for w in shard}
    window = torch.div(slots, settings.seq_len, rounding_mode="floor")
    position = slots - window * settings.seq_len
    token = torch.tensor(
        [by_window[int(w)].ids[int(p)] for w, p in zip(window.tolist(), position.tolist())], dtype=torch.int32
    )
    tensors.update(input_ids=token, window=window, position=position.to(torch.int32))
    try:
        _save(out / "dump" / f"shard-{index:05d}.safetensors", tensors)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LmscopeError(
                f"disk full while writing dump shard {index} ({meta['dump_shards']} finished dump shards kept "
                f"in {out / 'dump'})",
                "free some space or lower --dump-max-gb, then rerun with --resume",
            ) from None
        raise
    meta["dump_bytes"] += nbytes
    meta["dump_shards"] += 1


def _finalize(lm, out: Path, ckpt: _Checkpoint, identity: dict, settings: Settings, corpus, report: bool):
    from safetensors.torch import load_file

    state, meta = ckpt.state, ckpt.meta
    n_windows = sum(s["windows"] for s in meta["shards"])
    docs = torch.full((n_windows,), -1, dtype=torch.int64)  # document of each global window
    shard_of = torch.full((n_windows,), -1, dtype=torch.int32)
    row_of = torch.full((n_windows,), -1, dtype=torch.int32)
    for i in range(len(meta["shards"])):
        data = load_file(str(out / "windows" / f"shard-{i:05d}.safetensors"))
        docs[data["window"]] = data["doc"]
        shard_of[data["window"]] = i
        row_of[data["window"]] = torch.arange(len(data["window"]), dtype=torch.int32)
    _save(out / "windows" / "index.safetensors", {"shard": shard_of, "row": row_of})
    stats, topk = {"hist_edges": hist_edges(settings.hist_bins)}, {}
    for s in settings.sites:
        count = state[f"stats.{s}.count"]
        n = max(1, int(count))
        stats.update(
            {
                f"{s}.count": count,
                f"{s}.mean": state[f"stats.{s}.mean"],
                f"{s}.var": state[f"stats.{s}.m2"] / n,
                f"{s}.min": state[f"stats.{s}.min"],
                f"{s}.max": state[f"stats.{s}.max"],
                f"{s}.frac_active": state[f"stats.{s}.positive"].double() / n,
                f"{s}.hist": state[f"stats.{s}.hist"],
            }
        )
        act, slot = decode(state[f"topk.{s}"])  # [k, units]
        window = torch.div(slot, settings.seq_len, rounding_mode="floor")
        valid = slot >= 0
        topk.update(
            {
                f"{s}.activation": act.T.contiguous(),  # [units, k], best first
                f"{s}.window": window.masked_fill(~valid, -1).T.contiguous(),
                f"{s}.doc": torch.where(valid, docs[window.clamp(min=0)], -1).T.contiguous(),
                f"{s}.position": (slot - window * settings.seq_len)
                .masked_fill(~valid, -1)
                .to(torch.int32)
                .T.contiguous(),
            }
        )
    _save(out / "stats.safetensors", stats)
    _save(out / "topk.safetensors", topk)
    if settings.heads:
        from .heads import corpus_head_scores

        _save_json(out / "heads.json", corpus_head_scores(lm, state, settings)[1])
    tokens = sum(s["tokens"] for s in meta["shards"])
    info = {
        "lmscope_version": _version(),
        "format": FORMAT_VERSION,
        "model": identity["model"],
        "corpus": {**identity["corpus"], "skipped": corpus.skipped},
        "settings": identity["settings"],
        "identity": identity,
        "tokens": tokens,
        "windows": sum(s["windows"] for s in meta["shards"]),
        "documents": int(docs.max()) + 1 if len(docs) else 0,
        "shards_done": len(meta["shards"]),
        "shards": meta["shards"],
        "dump": {
            "sites": list(settings.dump),
            "bytes": meta["dump_bytes"],
            "shards": meta["dump_shards"],
            "stopped_at_shard": meta["dump_stopped_at_shard"],
        }
        if settings.dump
        else None,
        "complete": True,
    }
    if report:
        from ..views.scan import scan_report
        from .result import ScanResult

        result = ScanResult(out, info, stats, topk, lm.tokenizer)
        _write(out / "report.html", lambda p: scan_report(result, lm).write(p))
    _save_json(out / "scan.json", info)
    (out / "state.safetensors").unlink(missing_ok=True)
    # temporary siblings a killed run left behind (atomic_directory puts them beside their target)
    for tmp in [*out.glob(".*.tmp-*"), *out.parent.glob(f".{out.name}.tmp-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def _version() -> str:
    from .. import __version__

    return __version__
