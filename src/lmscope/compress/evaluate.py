"""Evaluate models side by side: quality (perplexity, top-1 agreement and KL vs the first model), size
(parameters, bytes on disk), peak memory and speed (prefill and decode tokens/s on CPU).

The evaluation text is the evaluation half of lmscope's built-in text (never the calibration half) or any
text given; it is cut into ``windows`` windows of ``window_tokens`` tokens so the cost stays bounded.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import LmscopeError
from .size import state_bytes

MEMORY_METHOD = (
    "peak RSS increase during one prefill forward (resident set sampled every 0.5 ms from /proc/self/statm)"
)


@dataclass
class ModelStats:
    name: str
    params: int
    bytes: int
    bytes_source: str  # "disk" (safetensors files) or "state dict" (in memory, not saved)
    perplexity: float | None = None
    nll: float | None = None
    top1_agreement: float | None = None  # with the reference model's argmax, over evaluation tokens
    kl: float | None = None  # mean KL(reference || model) per token, nats
    peak_memory_bytes: int | None = None
    weights_memory_bytes: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """The side-by-side table. ``models[0]`` is the reference."""

    models: list[ModelStats]
    settings: dict

    def to_dict(self) -> dict:
        return {"settings": self.settings, "models": [asdict(m) for m in self.models]}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    # -- rendering ----------------------------------------------------------------------------------
    COLUMNS = (
        "model",
        "params",
        "bytes",
        "ppl",
        "Δppl",
        "top-1 agree",
        "KL",
        "peak mem",
        "prefill tok/s",
        "decode tok/s",
    )

    def rows(self) -> list[list[str]]:
        ref = self.models[0]
        out = []
        for m in self.models:
            dppl = (
                f"{100 * (m.perplexity / ref.perplexity - 1):+.2f}%"
                if m.perplexity is not None and ref.perplexity
                else "-"
            )
            speed = [
                _fmt(m.prefill_tokens_per_s, "{:.0f}")
                + (_ratio(m.prefill_tokens_per_s, ref.prefill_tokens_per_s) if m is not ref else ""),
                _fmt(m.decode_tokens_per_s, "{:.1f}")
                + (_ratio(m.decode_tokens_per_s, ref.decode_tokens_per_s) if m is not ref else ""),
            ]
            out.append(
                [
                    m.name,
                    f"{m.params / 1e6:.2f}M",
                    _bytes(m.bytes) + ("" if m.bytes_source == "disk" else "*"),
                    _fmt(m.perplexity, "{:.3f}"),
                    dppl,
                    _fmt(m.top1_agreement, "{:.2%}"),
                    _fmt(m.kl, "{:.4f}"),
                    _bytes(m.peak_memory_bytes) if m.peak_memory_bytes is not None else "-",
                    *speed,
                ]
            )
        return out

    def to_text(self) -> str:
        rows = [list(self.COLUMNS), *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [
            "  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        s = self.settings
        lines.append("")
        lines.append(
            f"perplexity on {s['eval_tokens']} tokens ({s['windows']} windows x {s['window_tokens']}) of "
            f"{s['text_source']}; KL and agreement vs {self.models[0].name}"
        )
        if any(m.bytes_source != "disk" for m in self.models):
            lines.append("* bytes of the in-memory state dict (not saved on disk)")
        if s.get("latency"):
            lines.append(
                f"prefill: {s['prefill_tokens']} tokens, batch 1, median of {s['repeats']} (models timed in turn); "
                f"decode: {s['decode_tokens']} greedy steps with the KV cache after an untimed prefill, same way; "
                f"torch threads {s['threads']}"
            )
            lines.append(f"peak mem: {MEMORY_METHOD}")
        for m in self.models:
            for n in m.notes:
                lines.append(f"{m.name}: {n}")
        return "\n".join(lines)

    def figure(self):
        """Bars relative to the reference: perplexity, bytes, prefill and decode speed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ref = self.models[0]
        metrics = [
            ("perplexity", "perplexity"),
            ("bytes", "bytes"),
            ("prefill tok/s", "prefill_tokens_per_s"),
            ("decode tok/s", "decode_tokens_per_s"),
        ]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0))
        names = [m.name for m in self.models]
        for ax, (title, attr) in zip(axes, metrics, strict=True):
            base = getattr(ref, attr)
            vals = [(getattr(m, attr) or 0) / base if base else 0 for m in self.models]
            ax.bar(range(len(vals)), vals, color=["#888"] + ["#3b7dd8"] * (len(vals) - 1))
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xticks(range(len(vals)), [n[:14] for n in names], rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{title} (x reference)", fontsize=9)
        fig.tight_layout()
        return fig

    def report(self, path=None):
        from ..views.html import Report

        rep = Report(
            "Evaluate: " + " vs ".join(m.name for m in self.models), subtitle=self.settings["text_source"]
        )
        sec = rep.section("Before / after", note="first row is the reference; Δ and ratios are against it")
        sec.table(list(self.COLUMNS), self.rows(), highlight=list(range(1, len(self.models))))
        for line in self.to_text().split("\n\n", 1)[-1].splitlines():
            sec.text(line)
        plot = rep.section("Relative to the reference")
        plot.bars([m.name for m in self.models], [m.perplexity or 0 for m in self.models], title="perplexity")
        plot.image(self.figure(), alt="ratios vs reference")
        if path is not None:
            rep.write(path)
        return rep

    def _repr_html_(self) -> str:
        return self.report()._repr_html_()


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _ratio(v, ref):
    return f" ({v / ref:.2f}x)" if v and ref else ""


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- measurements -----------------------------------------------------------------------------------
def model_bytes(lm) -> tuple[int, str]:
    """(bytes, "disk") from the safetensors files of a loaded directory, else (state dict bytes, "state dict")."""
    if lm.path and Path(lm.path).is_dir():
        files = list(Path(lm.path).glob("*.safetensors"))
        if files and not getattr(lm, "_lmscope_modified", False):
            return sum(f.stat().st_size for f in files), "disk"
    return state_bytes(lm.model), "state dict"


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return None


def peak_rss_during(fn) -> int | None:
    """Run ``fn()`` while sampling RSS; return peak − start (bytes), or None where /proc is unavailable."""
    start = _rss()
    if start is None:
        fn()
        return None
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            r = _rss()
            if r and r > peak[0]:
                peak[0] = r
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(0, peak[0] - start)


def _round_robin(models, fn, repeats: int) -> list[float]:
    """Median seconds of ``fn(model)`` per model, timing the models in turn (after one warm-up each)."""
    for lm in models:
        fn(lm)
    times = [[] for _ in models]
    for _ in range(repeats):
        for k, lm in enumerate(models):
            t = time.perf_counter()
            fn(lm)
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def _prefill(lm, inputs):
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


def evaluation_text(text: str | None = None) -> tuple[str, str]:
    if text is not None:
        if not text.strip():
            raise LmscopeError("the evaluation text is empty", "pass a non-empty --text-file")
        return text, "the given text"
    from ..data import builtin_text, split_calibration_evaluation

    return split_calibration_evaluation(builtin_text())[
        1
    ], "the built-in evaluation text (pydoc topics, 2nd half)"


@torch.no_grad()
def evaluate(
    models,
    text: str | None = None,
    windows: int = 8,
    window_tokens: int = 256,
    latency: bool = True,
    prefill_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
) -> Evaluation:
    """Evaluate ``models`` (LM objects; the first is the reference) on the same token windows."""
    from .calibration import encoded_windows

    models = list(models)
    if not models:
        raise LmscopeError("no model to evaluate", "pass at least one --model")
    ref = models[0]
    text, source = evaluation_text(text)
    wins = encoded_windows(ref, text, windows, window_tokens)
    if not wins:
        raise LmscopeError("the evaluation text is too short (under 8 tokens)", "pass a longer text")
    stats = []
    for lm in models:
        b, src = model_bytes(lm)
        stats.append(
            ModelStats(
                name=lm.name,
                params=lm.n_params(),
                bytes=b,
                bytes_source=src,
                weights_memory_bytes=state_bytes(lm.model),
            )
        )
    same_vocab = all(lm.is_causal and lm.vocab_size == ref.vocab_size for lm in models)
    if all(lm.is_causal for lm in models):
        nll = [0.0] * len(models)
        agree = [0] * len(models)
        kl = [0.0] * len(models)
        count = 0
        for w in wins:
            ref_logp = None
            for k, lm in enumerate(models):
                logits = lm.output_of(lm.forward(w)).float()[0, :-1]
                logp = torch.log_softmax(logits, -1)
                target = w["input_ids"][0, 1:]
                nll[k] += float(-logp.gather(1, target[:, None]).sum())
                if k == 0:
                    ref_logp = logp
                elif same_vocab:
                    agree[k] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                    kl[k] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            count += w["input_ids"].shape[1] - 1
        for k, s in enumerate(stats):
            s.nll = nll[k] / count
            s.perplexity = float(torch.tensor(s.nll).exp())
            if same_vocab:
                s.top1_agreement = 1.0 if k == 0 else agree[k] / count
                s.kl = 0.0 if k == 0 else kl[k] / count
    else:
        count = sum(w["input_ids"].shape[1] - 1 for w in wins)
        for s in stats:
            s.notes.append("perplexity needs a causal LM; only size and speed are measured")
    if latency:
        ids = torch.cat([w["input_ids"] for w in wins], 1)[:, :prefill_tokens]
        if ids.shape[1] < prefill_tokens:
            ids = ref.encode("hello " * prefill_tokens)["input_ids"][:, :prefill_tokens]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for lm, s in zip(models, stats, strict=True):
            s.peak_memory_bytes = peak_rss_during(lambda lm=lm: lm.forward(inputs))
        # round-robin over models, so a busy machine slows every model alike; median per model
        prefill = _round_robin(models, lambda lm: _prefill(lm, inputs), repeats)
        for s, t in zip(stats, prefill, strict=True):
            s.prefill_tokens_per_s = ids.shape[1] / t
        causal = [k for k, lm in enumerate(models) if lm.is_causal]
        if decode_tokens and causal:
            try:
                times = _round_robin(
                    [models[k] for k in causal], lambda lm: decode_time(lm, ids, decode_tokens), repeats
                )
                for k, t in zip(causal, times, strict=True):
                    stats[k].decode_tokens_per_s = decode_tokens / t
            except Exception as e:  # a compressed module without cache support: say so, keep going
                for k in causal:
                    stats[k].notes.append(f"decode not measured: {type(e).__name__}: {str(e)[:120]}")
    settings = {
        "text_source": source,
        "windows": len(wins),
        "window_tokens": window_tokens,
        "eval_tokens": count,
        "latency": latency,
        "prefill_tokens": prefill_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "memory_method": MEMORY_METHOD,
        "reference": ref.name,
    }
    return Evaluation(stats, settings)
