"""``lmscope scan`` on smollm2: overhead over a plain forward, dump cost, memory flatness, in-process vs Ray.

One run, same windows for every row (the built-in corpus, --seq-len 128, batches of 2048 tokens):
- plain forward: ``base_model`` over exactly the scan's batches, nothing captured (the floor);
- scan, all MLP neurons (30 x 1536 units) + --heads (every head's pattern statistics);
- scan, all MLP neurons + --dump of one site (blocks.15.resid_post, fp16);
- peak RSS of a scan of N and 10·N tokens, each in a fresh process (all MLP neurons);
- in-process vs --ray auto --workers 2 on the same cores (all MLP neurons): wall time, and the
  steady-state rate between the first and last checkpoint (what each worker adds to a cluster).

    .venv/bin/python benchmarks/scan.py --tokens 2048 --rss-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

SITES = "blocks.*.mlp.hidden"
SEQ = 128
BATCH = 1024


class Rate:
    """Progress callback: keeps (time, tokens) of every checkpoint."""

    def __init__(self):
        self.points = []

    def __call__(self, done, total, rate):
        self.points.append((time.perf_counter(), done))

    def steady(self) -> float:
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def plain_forward_seconds(lm, tokens: int) -> float:
    from lmscope.explain.patching import base_forward
    from lmscope.scan.corpus import Corpus
    from lmscope.scan.windows import batches, windows

    stream = batches(windows(lm, Corpus("builtin").documents(), SEQ, tokens), SEQ, BATCH)
    jobs = [torch.tensor([w.ids for w in b]) for b in stream]
    t = time.perf_counter()
    for ids in jobs:
        with torch.no_grad():
            base_forward(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return time.perf_counter() - t


def timed_scan(lm, tokens: int, out: str, **kwargs) -> tuple[float, Rate]:
    from lmscope.scan import scan

    rate = Rate()
    t = time.perf_counter()
    scan(
        lm,
        "builtin",
        out,
        sites=[SITES],
        seq_len=SEQ,
        max_tokens=tokens,
        batch_tokens=BATCH,
        shard_tokens=kwargs.pop("shard_tokens", BATCH),
        progress=rate,
        report=False,
        **kwargs,
    )
    return time.perf_counter() - t, rate


RSS_CODE = """
import resource, sys, tempfile, lmscope
from lmscope.scan import scan
lm = lmscope.load("smollm2", progress=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as d:
    scan(lm, "builtin", d + "/out", sites=["blocks.*.mlp.hidden"], seq_len=128, max_tokens=int(sys.argv[1]),
         shard_tokens=2048, report=False)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(tokens: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CODE, str(tokens)], capture_output=True, text=True, check=True
    )
    after_load, peak = map(int, out.stdout.split()[-2:])
    return after_load / 1024, peak / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens for the throughput rows")
    ap.add_argument("--rss-tokens", type=int, default=2048, help="N of the N vs 10N memory rows")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()

    import lmscope

    lm = lmscope.load("smollm2", progress=False)
    n = args.tokens
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, smollm2, "
        f"{n} tokens of the built-in corpus in windows of {SEQ}, batches of {BATCH} tokens"
    )
    rows = []
    with tempfile.TemporaryDirectory() as d:
        plain_forward_seconds(lm, 2 * BATCH)  # warm-up
        plain = plain_forward_seconds(lm, n)
        rows.append(("plain forward (base model, nothing captured)", plain, None))
        t, r = timed_scan(lm, n, f"{d}/heads", heads=True)
        rows.append(("scan: all MLP neurons (46,080) + --heads", t, r))
        t, r = timed_scan(lm, n, f"{d}/dump", dump=["blocks.15.resid_post"], dump_max_gb=10)
        dump_mb = (
            sum(os.path.getsize(os.path.join(f"{d}/dump/dump", f)) for f in os.listdir(f"{d}/dump/dump"))
            / 1e6
        )
        rows.append((f"scan: all MLP neurons + --dump blocks.15.resid_post ({dump_mb:.1f} MB)", t, r))
        t_local, r_local = timed_scan(lm, n, f"{d}/local")
        rows.append(("scan: all MLP neurons, in-process", t_local, r_local))
        if not args.no_ray:
            t_ray, r_ray = timed_scan(lm, n, f"{d}/ray", ray="auto", workers=2)
            rows.append(("scan: all MLP neurons, --ray auto --workers 2 (incl. Ray start)", t_ray, r_ray))
            same = (
                open(f"{d}/local/topk.safetensors", "rb").read()
                == open(f"{d}/ray/topk.safetensors", "rb").read()
            )
        print()
        print("| run | seconds | tokens/s | × plain | steady tokens/s (first→last checkpoint) |")
        print("|---|---:|---:|---:|---:|")
        for name, t, r in rows:
            steady = f"{r.steady():,.0f}" if r is not None and len(r.points) > 1 else "–"
            print(f"| {name} | {t:.1f} | {n / t:,.0f} | {t / plain:.2f} | {steady} |")
        if not args.no_ray:
            print(f"\nRay top-k byte-identical to in-process: {same}")
    print()
    small, big = args.rss_tokens, 10 * args.rss_tokens
    (load_a, peak_a), (load_b, peak_b) = peak_rss_mb(small), peak_rss_mb(big)
    print(
        "| scan (all MLP neurons), fresh process | RSS after load (MB) | peak RSS (MB) | peak − load (MB) |"
    )
    print("|---|---:|---:|---:|")
    print(f"| N = {small:,} tokens | {load_a:,.0f} | {peak_a:,.0f} | {peak_a - load_a:,.0f} |")
    print(f"| 10·N = {big:,} tokens | {load_b:,.0f} | {peak_b:,.0f} | {peak_b - load_b:,.0f} |")
    print(f"\npeak RSS 10·N / N: {peak_b / peak_a:.3f} (goal ≤ 1.10)")
    print(json.dumps({"plain_s": plain, "rows": [(a, b) for a, b, _ in rows], "rss": [peak_a, peak_b]}))


if __name__ == "__main__":
    main()
