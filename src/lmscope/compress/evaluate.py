"""Evaluate models side by side: quality (perplexity, top-1 agreement and KL vs the first model), size
(parameters, bytes on disk), peak memory and speed (prefill and decode tokens/s on CPU).

The evaluation text is the evaluation half of lmscope's built-in text (never the calibration half) or any
text given; it is cut into ``windows`` windows of ``window_tokens`` tokens so the cost stays bounded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import progress
from ..errors import LmscopeError
from ..views.html import Reportable
from .measure import MEMORY_METHOD, decode_time, peak_memory_during, prefill, round_robin
from .size import state_bytes


@dataclass
class ModelStats:
    name: str
    params: int
    bytes: int
    bytes_source: str  # "disk" (safetensors files) or "state dict" (in memory, not saved)
    perplexity: float | None = None
    nll: float | None = None
    top1_agreement: float | None = None  # with the reference model's argmax, over evaluation tokens
    kl: float | None = None  # mean KL(reference || model) per token (classifiers: per text), nats
    accuracy: float | None = None  # classifiers with labelled cases: fraction predicted right
    peak_memory_bytes: int | None = None
    weights_memory_bytes: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Evaluation(Reportable):
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

    # -- rendering (lmscope.views.evaluate) ------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        from ..views.evaluate import rows

        return rows(self)

    def to_text(self) -> str:
        from ..views.evaluate import text

        return text(self)

    def figure(self):
        from ..views.evaluate import figure

        return figure(self)

    def build_report(self):
        from ..views.evaluate import report

        return report(self)


# -- sizes -----------------------------------------------------------------------------------
def model_bytes(lm) -> tuple[int, str]:
    """(bytes, "disk") from the safetensors files of a loaded directory, else (state dict bytes, "state dict")."""
    if lm.path and Path(lm.path).is_dir():
        files = list(Path(lm.path).glob("*.safetensors"))
        if files and not getattr(lm, "_lmscope_modified", False):
            return sum(f.stat().st_size for f in files), "disk"
    return state_bytes(lm.model), "state dict"


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
    labels: list[tuple[str, object]] | None = None,
) -> Evaluation:
    """Evaluate ``models`` (LM objects; the first is the reference) on the same token windows.

    Sequence classifiers are compared by their decisions instead of perplexity: label agreement with the
    reference and KL of the class distributions on the windows, and with ``labels`` (``[(text, label)]``,
    a label being a class name or index) the accuracy and agreement on those texts."""
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
    causal = [k for k, lm in enumerate(models) if lm.is_causal]
    all_causal = len(causal) == len(models)
    work = (len(wins) * len(models) if all_causal else 0) + (
        len(models) * (2 + repeats) + (len(causal) * (1 + repeats) if decode_tokens else 0) if latency else 0
    )
    classifiers = all(lm.task == "classifier" for lm in models)
    if classifiers:
        work += len(models) * (len(labels) if labels else len(wins))
    with progress.bar(work, "evaluate", unit="pass") as bar:
        if classifiers:
            count = _decisions(models, stats, wins, labels, bar)
        else:
            count = _quality(models, stats, wins, same_vocab, all_causal, bar)
        if latency:
            _latency(models, stats, wins, ref, prefill_tokens, decode_tokens, repeats, bar)
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
        "task": "classifier" if classifiers else ref.task,
        "labelled_cases": len(labels) if classifiers and labels else 0,
    }
    return Evaluation(stats, settings)


def _decisions(models, stats, wins, labels, bar) -> int:
    """Classifiers: label agreement and class-distribution KL vs ``models[0]`` (and accuracy on ``labels``).
    Returns the number of texts compared."""
    from ..explain.targets import label_index

    ref = models[0]
    names = [tuple(lm.labels) for lm in models]
    if any(n != names[0] for n in names):
        raise LmscopeError(
            "the classifiers have different classes: "
            + " vs ".join(", ".join(n) for n in dict.fromkeys(names)),
            "compare classifiers with the same id2label",
        )
    if labels:
        inputs = [ref.encode(text, truncate=True) for text, _ in labels]
        gold = [label_index(ref, y, "label") for _, y in labels]
    else:
        inputs, gold = wins, None
    logp = []
    for lm in models:
        rows = []
        for x in inputs:
            rows.append(torch.log_softmax(lm.output_of(lm.forward(x)).float()[0], -1))
            bar.update(1)
        logp.append(torch.stack(rows))
    for k, s in enumerate(stats):
        s.top1_agreement = float((logp[k].argmax(-1) == logp[0].argmax(-1)).float().mean())
        s.kl = float((logp[0].exp() * (logp[0] - logp[k])).sum(-1).mean())
        if gold is not None:
            s.accuracy = float((logp[k].argmax(-1) == torch.tensor(gold)).float().mean())
        s.notes.append(
            f"a classifier: label agreement and class KL vs {ref.name} on "
            + (f"{len(inputs)} labelled texts" if gold else f"{len(inputs)} windows of the evaluation text")
            + (", accuracy against the labels" if gold else " (pass labelled texts for accuracy)")
        )
    return len(inputs)


def _quality(models, stats, wins, same_vocab: bool, all_causal: bool, bar) -> int:
    """Perplexity, and top-1 agreement and KL vs ``models[0]``, over the same windows; returns the count of
    predicted tokens."""
    if not all_causal:
        for s in stats:
            s.notes.append("perplexity needs a causal LM; only size and speed are measured")
        return sum(w["input_ids"].shape[1] - 1 for w in wins)
    nll = [0.0] * len(models)
    agree = [0] * len(models)
    kl = [0.0] * len(models)
    count = 0
    for w in wins:
        ref_logp = None
        for k, lm in enumerate(models):
            logits = lm.output_of(lm.forward(w)).float()[0, :-1]  # [tokens-1, vocab]
            logp = torch.log_softmax(logits, -1)
            target = w["input_ids"][0, 1:]
            nll[k] += float(-logp.gather(1, target[:, None]).sum())
            if k == 0:
                ref_logp = logp
            elif same_vocab:
                agree[k] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                kl[k] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            bar.update(1)
        count += w["input_ids"].shape[1] - 1
    for k, s in enumerate(stats):
        s.nll = nll[k] / count
        s.perplexity = float(torch.tensor(s.nll).exp())
        if same_vocab:
            s.top1_agreement = 1.0 if k == 0 else agree[k] / count
            s.kl = 0.0 if k == 0 else kl[k] / count
    return count


def _latency(models, stats, wins, ref, prefill_tokens: int, decode_tokens: int, repeats: int, bar) -> None:
    """Peak memory of one prefill, then prefill and decode speed (models timed in turn, median)."""
    ids = torch.cat([w["input_ids"] for w in wins], 1)[:, :prefill_tokens]
    if ids.shape[1] < prefill_tokens:
        ids = ref.encode("hello " * prefill_tokens)["input_ids"][:, :prefill_tokens]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for lm, s in zip(models, stats, strict=True):
        s.peak_memory_bytes = peak_memory_during(lambda lm=lm: prefill(lm, inputs))
        bar.update(1)
    # round-robin over models, so a busy machine slows every model alike; median per model
    times = round_robin(models, lambda lm: prefill(lm, inputs), repeats, tick=bar.update)
    for s, t in zip(stats, times, strict=True):
        s.prefill_tokens_per_s = ids.shape[1] / t
    causal = [k for k, lm in enumerate(models) if lm.is_causal]
    if decode_tokens and causal:
        try:
            times = round_robin(
                [models[k] for k in causal],
                lambda lm: decode_time(lm, ids, decode_tokens),
                repeats,
                tick=bar.update,
            )
            for k, t in zip(causal, times, strict=True):
                stats[k].decode_tokens_per_s = decode_tokens / t
        except Exception as e:  # a compressed module without cache support: say so, keep going
            for k in causal:
                stats[k].notes.append(f"decode not measured: {type(e).__name__}: {str(e)[:120]}")
