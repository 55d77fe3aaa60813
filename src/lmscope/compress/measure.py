"""Measurements for ``evaluate``: forward timing (models in turn), greedy decode time, and peak memory.

Peak memory: the growth of the process's resident set during one prefill forward, read from the kernel's
high-water mark (``VmHWM``) after resetting it (``/proc/self/clear_refs``) and after returning freed heap
pages to the OS (``malloc_trim``) -- without that, a forward reuses memory freed by earlier forwards and the
growth reads as a few KB. Activations and logits only: the weights are resident before it starts.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch

MEMORY_METHOD = (
    "peak resident-set growth during one prefill forward (kernel high-water mark VmHWM, reset before it, "
    "freed heap returned to the OS first); activations and logits, not the weights"
)


def round_robin(models, fn, repeats: int, tick=None) -> list[float]:
    """Median seconds of ``fn(model)`` per model, timing the models in turn (after one warm-up each)."""
    for lm in models:
        fn(lm)
        if tick:
            tick()
    times = [[] for _ in models]
    for _ in range(repeats):
        for k, lm in enumerate(models):
            t = time.perf_counter()
            fn(lm)
            times[k].append(time.perf_counter() - t)
            if tick:
                tick()
    return [statistics.median(t) for t in times]


@torch.no_grad()
def prefill(lm, inputs):
    return lm.forward(inputs)


@torch.no_grad()
def decode_time(lm, ids: torch.Tensor, new_tokens: int = 32) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache, after an untimed prefill of ``ids``."""
    out = lm.model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    nxt = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = lm.model(input_ids=nxt, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        nxt = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def peak_memory_during(fn) -> int | None:
    """Bytes the resident set grows to above its level at the start while ``fn()`` runs; None where the
    kernel's counters are unavailable (not Linux). What ``fn`` returns is held until the peak is read."""
    try:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        start = _status()
    except OSError:
        fn()
        return None
    result = fn()
    end = _status()
    del result
    return max(0, end["VmHWM"] - start["VmRSS"])
