"""Capture overhead and load time on smollm2 at 128 tokens, side by side in one run.

Rows: HF plain forward (SDPA, what transformers runs by default), HF eager with output_attentions +
output_hidden_states (what bertviz-style tools do), lmscope plain, lmscope full capture (every name,
every layer). Then cold (GGUF -> safetensors conversion) vs cached load, each in a fresh process.

    .venv/bin/python benchmarks/capture.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPEATS = 25
TOKENS = 128


def timeit_round_robin(fns: dict, repeats=REPEATS) -> dict:
    """Median seconds per function, timed in turn (round-robin) so machine noise hits all rows alike."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_seconds(cache_dir: str, wall: bool = False) -> float:
    code = (
        "import time, lmscope; t=time.perf_counter(); lmscope.load('smollm2', progress=False); "
        "print(time.perf_counter()-t)"
    )
    env = {**os.environ, "LMSCOPE_CACHE": cache_dir}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    if wall:  # the whole process: Python start, torch/transformers imports, load
        return time.perf_counter() - start
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import copy

    import lmscope
    from lmscope.capture.session import hooks
    from lmscope.data import builtin_text

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {TOKENS} tokens, median of {REPEATS}"
    )
    lm = lmscope.load("smollm2", progress=False)
    ids = lm.tokenizer(builtin_text()[:4000], return_tensors="pt")["input_ids"][:, :TOKENS]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert ids.shape[1] == TOKENS

    hf_sdpa = copy.deepcopy(lm.model)
    hf_sdpa.config._attn_implementation = "sdpa"
    hf_eager = copy.deepcopy(lm.model)
    hf_eager.config._attn_implementation = "eager"
    names = [n for n in lmscope.capture.names.all_names(lm.n_layers)]

    def capture_all():
        with hooks(lm, names) as s:
            lm.model(**inputs, use_cache=False)
        assert len(s.tensors) == len(names)

    with torch.no_grad():
        rows = list(
            timeit_round_robin(
                {
                    "HF plain forward (sdpa)": lambda: hf_sdpa(**inputs, use_cache=False),
                    "HF eager + output_attentions + hidden_states": lambda: hf_eager(
                        **inputs, use_cache=False, output_attentions=True, output_hidden_states=True
                    ),
                    "lmscope plain forward": lambda: lm.model(**inputs, use_cache=False),
                    f"lmscope full capture ({len(names)} tensors)": capture_all,
                }
            ).items()
        )
    base = rows[0][1]
    print(f"\n{'forward':<48} {'ms':>8} {'ratio vs HF plain':>18}")
    for name, t in rows:
        print(f"{name:<48} {t * 1e3:8.1f} {t / base:17.2f}x")
    full = rows[-1][1]
    print(
        f"\nfull capture / HF plain forward = {full / base:.2f}x (target <= 1.15x: {'met' if full / base <= 1.15 else 'MISSED'})"
    )

    with tempfile.TemporaryDirectory() as cache:
        cold = load_seconds(cache)
        warm = statistics.median(load_seconds(cache) for _ in range(3))
        warm_wall = statistics.median(load_seconds(cache, wall=True) for _ in range(3))
    print(f"\n{'load (fresh process, in-process time)':<48} {'s':>8}")
    print(f"{'cold: GGUF -> safetensors conversion + load':<48} {cold:8.2f}")
    print(f"{'cached load':<48} {warm:8.2f}   (target <= 3 s: {'met' if warm <= 3 else 'MISSED'})")
    print(f"{'cached, whole process incl. torch/transformers import':<48} {warm_wall:8.2f}")
    print(f"cold / cached = {cold / warm:.0f}x")


if __name__ == "__main__":
    main()
