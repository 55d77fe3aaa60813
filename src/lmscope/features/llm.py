"""The LLM explainer and scorer behind an OpenAI-compatible endpoint the user names (``--explainer http:URL``).

Nothing leaves the machine unless the user passes a URL. Delphi/OpenAI-style prompts: the explainer sees the
explain half's activating contexts with the active tokens marked ``<<like this>>`` and answers with one short
explanation (its raw answer is kept); the scorer — the same endpoint — reads the explanation and one held-out
context at a time and answers 1 (the feature fires here) or 0. Detection (balanced accuracy) is scored for the
explanation and, beside it, for a random explanation (rules over random tokens, as for ``rules``).
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

import numpy as np

from ..errors import LmscopeError
from .explain import (
    Vocab,
    _balanced,
    auroc,
    describe,
    random_rules,
    split_examples,
)

EXPLAIN_SYSTEM = (
    "We are studying a feature of a language model. Each example is a text in which the tokens where the feature "
    "is active are marked <<like this>>. Look at the marked tokens and the tokens just before them, and explain in "
    "one short sentence starting with 'fires on' what makes the feature fire."
)
SCORE_SYSTEM = (
    "We are studying a feature of a language model, explained as follows. Given a text, answer 1 if the feature "
    "fires somewhere in the text, 0 if it does not. Answer with the digit only."
)


class HttpModel:
    """A chat-completions endpoint: ``http://host:port/v1`` (``/chat/completions`` is appended)."""

    def __init__(self, url: str, model: str = "default", timeout: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise LmscopeError(
                f"'{url}' is not an http(s) URL", "pass --explainer http:http://127.0.0.1:8000/v1"
            )
        self.model = model
        self.timeout = timeout

    def complete(self, system: str, user: str, max_tokens: int = 60) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read())
            return str(data["choices"][0]["message"]["content"]).strip()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise LmscopeError(
                f"the explainer endpoint {self.url} is unreachable ({reason})",
                "start the server, check the URL, or use --explainer rules",
            ) from None
        except (KeyError, IndexError, TypeError, json.JSONDecodeError):
            raise LmscopeError(
                f"the explainer endpoint {self.url} did not answer as an OpenAI-compatible chat completion",
                "point --explainer at a /v1 chat-completions server",
            ) from None


def explainer_from(spec: str):
    """``rules`` -> None; ``http:URL`` -> an HttpModel; anything else is refused."""
    if spec == "rules":
        return None
    if spec.startswith("https://"):
        return HttpModel(spec)
    if spec.startswith("http:"):
        rest = spec[len("http:") :]
        return HttpModel(rest if rest.startswith(("http://", "https://")) else spec)
    raise LmscopeError(
        f"unknown or unavailable explainer '{spec}'",
        "use --explainer rules, or http:URL of an OpenAI-compatible server (local:DIR is not built yet)",
    )


def _marked(tokens: list[str], acts: np.ndarray, threshold: float) -> str:
    return "".join(f"<<{t}>>" if a > threshold else t for t, a in zip(tokens, acts))


def explain_unit_llm(client: HttpModel, ids, acts, vocab: Vocab, classes, seed: int) -> dict | None:
    """Like ``explain.explain_unit``, with the endpoint as explainer and detection scorer."""
    rng = random.Random(seed)
    split = split_examples(acts, rng)
    if split is None:
        return None
    threshold, ex, ho, activating_ho = split.threshold, split.explain, split.held_out, split.activating

    def text(c):
        return [vocab.text(i) for i in ids[c, 1:]]

    shown = [c for c in ex if acts[c].max() > threshold][:10]
    prompt = "\n".join(
        f"Example {n + 1}: {_marked(text(c), acts[c], threshold)}" for n, c in enumerate(shown)
    )
    raw = client.complete(EXPLAIN_SYSTEM, prompt)
    explanation = raw.splitlines()[0].strip() if raw.strip() else "fires on nothing it could name"
    baseline_text = describe(random_rules([], ids[np.concatenate([ex, ho])], rng), vocab)

    def detect(expl: str) -> dict:
        votes = []
        for c in ho:
            answer = client.complete(f"{SCORE_SYSTEM}\nExplanation: {expl}", "".join(text(c)), max_tokens=2)
            votes.append(answer.strip()[:1] == "1")
        pred = np.array(votes)
        return {
            "detection": _balanced(pred, activating_ho),
            "auroc": auroc(pred.astype(float), activating_ho),
            "fuzzing": None,
            "simulation": None,
        }

    return {
        "explanation": explanation,
        "raw_explanation": raw,
        "scores": detect(explanation),
        "random_baseline": detect(baseline_text),
        "random_explanation": baseline_text,
        **split.record,
    }
