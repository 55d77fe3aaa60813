"""Compression benchmark on smollm2 (fp32 reference): perplexity change, bytes, prefill/decode speed vs fp32.

Rows: fp32, bf16, torchao Int8WeightOnly / Int8DynamicActivationInt8Weight, every lmscope quantization
scheme, then any rows contributed through ``ROW_PROVIDERS`` (the pruning rows: benchmarks/pruning_rows.py).
Evaluation: the built-in evaluation half of pydoc topics (never the calibration half), ``WINDOWS`` x
``WINDOW_TOKENS`` tokens. Latency: models timed round-robin (so load changes hit all rows alike), median of
``REPEATS``; prefill = one forward of ``PREFILL_TOKENS`` tokens, decode = per-token time of greedy steps
with the KV cache. The machine is shared: timings are noisy.

    .venv/bin/python benchmarks/compression.py            # prints the table, writes results/compression.txt
"""

from __future__ import annotations

import copy
import importlib
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WINDOWS, WINDOW_TOKENS = 8, 256
PREFILL_TOKENS, DECODE_STEPS, REPEATS = 128, 8, 5
CALIBRATION_CHARS = 20000  # the calibration half's first ~4.5k tokens; schemes use their default 8 x 256
THREADS = 2

#: (module, function) pairs; each function(ctx) returns a list of (label, LM, note) rows to measure like the
#: others. ``ctx`` has ``fresh()`` (a mutable copy of the fp32 LM), ``calibration_text`` and ``base``.
ROW_PROVIDERS: list[tuple[str, str]] = [("pruning_rows", "benchmark_rows")]  # benchmarks/pruning_rows.py


@dataclass
class Row:
    label: str
    model: torch.nn.Module
    note: str = ""
    ppl: float = math.nan
    bytes: int = 0
    prefill_s: float = math.nan
    decode_s: float = math.nan


class Context:
    def __init__(self, lm, calibration_text: str):
        self.base = lm
        self.calibration_text = calibration_text

    def fresh(self):
        from lmscope import LM

        return LM(copy.deepcopy(self.base.model), self.base.tokenizer, name=self.base.name)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state dict as held (torchao tensor subclasses: their inner tensors); shared once."""
    seen, total = set(), 0

    def inner(t):
        if (
            hasattr(t, "__tensor_flatten__")
            and type(t) is not torch.Tensor
            and type(t) is not torch.nn.Parameter
        ):
            names, _ = t.__tensor_flatten__()
            for n in names:
                yield from inner(getattr(t, n))
        else:
            yield t

    for t in model.state_dict().values():
        for leaf in inner(t):
            key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset(), tuple(leaf.shape), leaf.dtype)
            if key not in seen:
                seen.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


@torch.no_grad()
def perplexity(model, windows) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model(input_ids=w, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum"))
        n += w.shape[1] - 1
    return math.exp(nll / n)


@torch.no_grad()
def _prefill(model, ids):
    model(input_ids=ids, use_cache=False)


@torch.no_grad()
def _decode(model, ids) -> float:
    out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(DECODE_STEPS):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        nxt = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / DECODE_STEPS


def time_round_robin(rows: list[Row], ids) -> None:
    prefill = {r.label: [] for r in rows}
    decode = {r.label: [] for r in rows}
    for r in rows:  # warm-up
        _prefill(r.model, ids)
        _decode(r.model, ids[:, :32])
    for _ in range(REPEATS):
        for r in rows:
            t = time.perf_counter()
            _prefill(r.model, ids)
            prefill[r.label].append(time.perf_counter() - t)
            decode[r.label].append(_decode(r.model, ids[:, :32]))
    for r in rows:
        r.prefill_s = statistics.median(prefill[r.label])
        r.decode_s = statistics.median(decode[r.label])


def build_rows(lm, calib: str, log) -> list[Row]:
    from lmscope.compress.apply import compress
    from lmscope.compress.recipe import Quantize

    rows = [Row("fp32", lm.model, "reference")]
    m = copy.deepcopy(lm.model).to(torch.bfloat16)
    rows.append(Row("bf16 (all weights+activations)", m))
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        for label, cfg in [
            ("torchao Int8WeightOnly", Int8WeightOnlyConfig()),
            ("torchao Int8DynActInt8W", Int8DynamicActivationInt8WeightConfig()),
        ]:
            m = copy.deepcopy(lm.model)
            quantize_(m, cfg)
            rows.append(Row(label, m, "all nn.Linear incl. lm_head"))
    except Exception as e:  # torchao missing or incompatible: say so, keep going
        log(f"torchao rows skipped: {type(e).__name__}: {e}")
    for label, step in [
        ("lmscope int8 (weight-only)", Quantize("int8")),
        ("lmscope w8a8 (naive)", Quantize("w8a8")),
        ("lmscope w8a8-smooth", Quantize("w8a8-smooth")),
        ("lmscope int4 g64 (RTN)", Quantize("int4", group_size=64)),
        ("lmscope gptq4 g64", Quantize("gptq4", group_size=64)),
    ]:
        t = time.perf_counter()
        result = compress(lm, step, calibration_text=calib)
        log(f"built {label} in {time.perf_counter() - t:.0f} s")
        rows.append(Row(label, result.lm.model, f"{time.perf_counter() - t:.0f} s to compress"))
    return rows


def provider_rows(lm, calib: str, log) -> list[Row]:
    ctx = Context(lm, calib)
    out = []
    for module, fn in ROW_PROVIDERS:
        try:
            provider = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError):
            log(f"(no rows from {module}.{fn}: not present)")
            continue
        for label, clm, note in provider(ctx):
            out.append(Row(label, getattr(clm, "model", clm), note))
    return out


TARGETS = [
    # label, ppl change limit (%), min prefill speed-up, max bytes ratio
    ("lmscope int8 (weight-only)", 0.5, 1.0, None),
    ("lmscope w8a8-smooth", 1.5, 1.2, None),
    ("lmscope int4 g64 (RTN)", 6.0, None, 0.3),
]


def main() -> int:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    import lmscope
    from lmscope.data import builtin_text, split_calibration_evaluation

    lines: list[str] = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    start = time.perf_counter()
    lm = lmscope.load("smollm2", progress=False)
    calib, evaluation = split_calibration_evaluation(builtin_text())
    calib = calib[:CALIBRATION_CHARS]
    ids = lm.tokenizer(evaluation[: WINDOWS * WINDOW_TOKENS * 8], return_tensors="pt")["input_ids"][0]
    windows = [ids[i * WINDOW_TOKENS : (i + 1) * WINDOW_TOKENS][None] for i in range(WINDOWS)]
    log(
        f"lmscope compression benchmark: smollm2 fp32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    log(
        f"eval: {WINDOWS} x {WINDOW_TOKENS} tokens of the built-in evaluation text; prefill {PREFILL_TOKENS} tokens;"
    )
    log(
        f"decode {DECODE_STEPS} greedy steps with KV cache; median of {REPEATS}, round-robin. Shared 2-core machine: noisy."
    )
    log(
        f"calibration (smoothing, GPTQ, Wanda, importance): first {CALIBRATION_CHARS} characters of the calibration half"
    )
    rows = build_rows(lm, calib, log) + provider_rows(lm, calib, log)
    for r in rows:
        r.ppl = perplexity(r.model, windows)
        r.bytes = tensor_bytes(r.model)
        log(f"  ppl {r.label}: {r.ppl:.3f}")
    time_round_robin(rows, windows[0][:, :PREFILL_TOKENS])
    ref = rows[0]
    log("")
    head = (
        f"{'model':<34} {'ppl':>8} {'Δppl':>8} {'MB':>7} {'bytes×':>7} {'prefill×':>9} {'decode×':>8}  note"
    )
    log(head)
    log("-" * len(head))
    for r in rows:
        log(
            f"{r.label:<34} {r.ppl:8.3f} {(r.ppl / ref.ppl - 1) * 100:+7.2f}% {r.bytes / 2**20:7.1f} "
            f"{r.bytes / ref.bytes:7.3f} {ref.prefill_s / r.prefill_s:8.2f}x {ref.decode_s / r.decode_s:7.2f}x  {r.note}"
        )
    log(
        f"fp32 prefill {ref.prefill_s * 1e3:.0f} ms / {PREFILL_TOKENS} tokens, decode {ref.decode_s * 1e3:.1f} ms/token"
    )
    log(
        "(prefill×/decode× = fp32 time / row time: above 1 is faster than fp32; bytes× = state dict bytes / fp32)"
    )
    log("")
    log("targets:")
    by = {r.label: r for r in rows}
    for label, dppl, speed, nbytes in TARGETS:
        r = by.get(label)
        if r is None:
            continue
        d = (r.ppl / ref.ppl - 1) * 100
        checks = [f"ppl {d:+.2f}% <= +{dppl}%: {'met' if d <= dppl else 'MISSED'}"]
        if speed:
            s = ref.prefill_s / r.prefill_s
            checks.append(f"prefill {s:.2f}x >= {speed}x: {'met' if s >= speed else 'MISSED'}")
        if nbytes:
            b = r.bytes / ref.bytes
            checks.append(f"bytes {b:.3f}x <= {nbytes}x: {'met' if b <= nbytes else 'MISSED'}")
        log(f"  {label}: " + "; ".join(checks))
    g, rtn = by.get("lmscope gptq4 g64"), by.get("lmscope int4 g64 (RTN)")
    if g and rtn:
        log(
            f"  GPTQ vs RTN (int4 g64): ppl {g.ppl:.3f} vs {rtn.ppl:.3f}: {'met' if g.ppl < rtn.ppl else 'MISSED'}"
        )
    log(f"total {time.perf_counter() - start:.0f} s")
    out = Path(__file__).parent / "results" / "compression.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
