"""LLM explainers: a local causal LM that lmscope loads (``--explainer local:DIR``), or an OpenAI-compatible endpoint
the user names (``--explainer http:URL``).

Nothing leaves the machine unless the user passes a URL. A local model is opened by lmscope's own loader
(safetensors / GGUF only, never remote code) and answers greedily; its explanations are scored by the ``rules``
simulator: the tokens it quotes (or names), the token classes it names and an "after X" become executable rules,
scored on the held-out half exactly as the ``rules`` explainer's are (detection, fuzzing, simulation), beside a
random explanation of the same shape. An endpoint is its own scorer by default (``scorer="explainer"``), or the
user picks the rules simulator for it too (``scorer="rules"``, ``--scorer rules``). Delphi/OpenAI-style prompts:
the explainer sees the explain half's activating contexts with the active tokens marked ``<<like this>>`` and
answers with one short explanation (its raw answer is kept). The endpoint as scorer answers 1 or 0 to:
- detection: one held-out context at a time, does the feature fire somewhere in it (balanced accuracy);
- fuzzing: one held-out activating context at a time with tokens marked ``<<like this>>`` — either the tokens
  where the feature fires, or as many random tokens where it does not — are the marked tokens the ones it fires
  on (balanced accuracy over the correctly and the wrongly marked copies).
Simulation needs a per-token prediction an endpoint does not give: it is reported as None. Each score is
computed for the explanation and, beside it, for a random explanation (rules over random tokens, as for
``rules``).
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

import numpy as np

from ..errors import LmscopeError
from .explain import (
    Rule,
    Vocab,
    _balanced,
    auroc,
    describe,
    random_rules,
    score,
    simulate,
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
FUZZ_SYSTEM = (
    "We are studying a feature of a language model, explained as follows. In the text, some tokens are marked "
    "<<like this>>. Answer 1 if the feature fires on the marked tokens, 0 if it does not. Answer with the digit only."
)
SCORERS = ("explainer", "rules")


class HttpModel:
    """A chat-completions endpoint: ``http://host:port/v1`` (``/chat/completions`` is appended)."""

    def __init__(self, url: str, model: str = "default", timeout: float = 60.0, scorer: str = "explainer"):
        self.scores_itself = scorer == "explainer"  # else the rules simulator scores its explanations
        self.spec = f"http:{url}"
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


class LocalModel:
    """A causal LM in a local folder, opened by lmscope's loader, answering greedily; its raw output is kept."""

    scores_itself = False  # scored by the rules simulator (a small local model is no reliable judge)

    def __init__(self, folder: str, lm=None):
        from pathlib import Path

        self.spec = f"local:{folder}"
        path = Path(folder).expanduser()
        if lm is None:
            if not path.is_dir():
                raise LmscopeError(
                    f"the explainer model folder '{folder}' does not exist",
                    "pass --explainer local:DIR with a model folder (config.json + safetensors)",
                )
            import lmscope

            lm = lmscope.load(str(path), progress=False)
        if not lm.is_causal:
            raise LmscopeError(
                f"the explainer model in '{folder}' is not a causal language model ({lm.task})",
                "pass a causal LM folder (an instruct model writes the best explanations)",
            )
        self.lm = lm

    def prompt_ids(self, system: str, user: str, max_tokens: int):
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{user}\n\nExplanation: the feature"
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        room = max(8, self.lm.max_positions - max_tokens)
        if len(ids) > room:  # the examples are cut from the front; the instruction at the end stays
            ids = ids[-room:]
        return ids

    def complete(self, system: str, user: str, max_tokens: int = 40) -> str:
        import torch

        ids = self.prompt_ids(system, user, max_tokens)[None]
        tok = self.lm.tokenizer
        room = max(1, min(max_tokens, self.lm.max_positions - ids.shape[1]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():  # greedy, with the KV cache
            out = self.lm.model.generate(
                ids.to(self.lm.device),
                attention_mask=torch.ones_like(ids).to(self.lm.device),
                max_new_tokens=room,
                do_sample=False,
                pad_token_id=pad,
            )
        return tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def explainer_from(spec, scorer: str = "explainer"):
    """``rules`` -> None; ``http:URL`` -> an HttpModel; ``local:DIR`` -> a LocalModel (loaded here, once); an
    explainer object passes through; anything else is refused. ``scorer``: ``explainer`` (an endpoint scores its
    own explanations; a local model's are scored by the rules simulator) or ``rules`` (the rules simulator)."""
    if scorer not in SCORERS:
        raise LmscopeError(f"unknown scorer '{scorer}'", "use --scorer explainer or --scorer rules")
    if not isinstance(spec, str):
        return spec
    if spec == "rules":
        return None
    client = None
    if spec.startswith("https://"):
        client = HttpModel(spec, scorer=scorer)
    elif spec.startswith("http:"):
        rest = spec[len("http:") :]
        client = HttpModel(rest if rest.startswith(("http://", "https://")) else spec, scorer=scorer)
    elif spec.startswith("local:") and spec[len("local:") :].strip():
        client = LocalModel(spec[len("local:") :])
    if client is not None:
        client.spec = spec  # explanations.json names the explainer as the user did
        return client
    raise LmscopeError(
        f"unknown or unavailable explainer '{spec}'",
        "use --explainer rules, local:DIR (a causal LM folder) or http:URL of an OpenAI-compatible server",
    )


def explainer_name(explainer) -> str:
    return explainer if isinstance(explainer, str) else explainer.spec


# -- reading a free-text explanation as rules (the rules simulator scores LLM explanations) --------------------
_CLASS_WORDS = {
    "number": "digit",
    "numbers": "digit",
    "digit": "digit",
    "digits": "digit",
    "punctuation": "punct",
    "capitalized": "capital",
    "capital": "capital",
    "newline": "newline",
    "newlines": "newline",
    "line break": "newline",
    "whitespace": "space",
}
_STOP = set(
    "fires on the a an of to in and or after before token tokens word words when it is are that this feature "
    "right just with for at by as be like text marked each one".split()
)


def rules_from_text(explanation: str, pool, vocab: Vocab) -> list:
    """Executable rules read from an explanation: the tokens of ``pool`` (ids) it quotes — or, when it quotes
    none, the ones it names as words — the token classes it names, and a previous-token condition from a
    quoted token after the word "after"."""
    import re

    from .explain import CLASSES, Rule

    def quoted(text):
        return [a or b or c for a, b, c in re.findall(r"'([^']+)'|\"([^\"]+)\"|<<(.+?)>>", text)]

    head, _, tail = explanation.partition(" after ")
    names = quoted(head) or [w for w in re.findall(r"[A-Za-z0-9]+", head) if w.lower() not in _STOP]
    by_text: dict[str, list[int]] = {}
    for i in pool:
        by_text.setdefault(vocab.text(int(i)).strip().casefold(), []).append(int(i))
    current = [("tok", i) for n in names for i in by_text.get(n.strip().casefold(), [])]
    classes = list(CLASSES)
    lowered = head.lower()
    current += [
        ("class", classes.index(c)) for w, c in _CLASS_WORDS.items() if re.search(rf"\b{w}\b", lowered)
    ]
    previous = [("tok", i) for n in quoted(tail) for i in by_text.get(n.strip().casefold(), [])][:1]
    prev = previous[0] if previous else None
    seen, rules = set(), []
    for c in current:
        if c not in seen:
            seen.add(c)
            rules.append(Rule(c, prev))
    return rules[:24]


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
    first = next((line.strip() for line in raw.splitlines() if line.strip()), "")
    explanation = first or "fires on nothing it could name"
    if not client.scores_itself:
        return _scored_by_rules(explanation, raw, ids, acts, vocab, classes, split, rng)
    baseline_text = describe(random_rules([], ids[np.concatenate([ex, ho])], rng), vocab)

    # fuzzing: each held-out activating context twice, its active tokens marked (right) and as many random
    # inactive tokens marked (wrong); the scorer says whether the marked tokens are where the feature fires
    fuzz = []
    for c in ho[activating_ho]:
        on = np.flatnonzero(
            acts[c] > threshold
        )  # acts [contexts, T]; ids carry one token before: [contexts, T + 1]
        off = np.flatnonzero(acts[c] <= threshold)
        wrong = np.zeros(len(acts[c]))
        if len(off):
            wrong[rng.sample(list(off), min(len(on), len(off)))] = 1.0
        right = np.zeros(len(acts[c]))
        right[on] = 1.0
        fuzz += [(c, right, True), (c, wrong, False)]

    def ask(expl: str) -> dict:
        votes = []
        for c in ho:
            answer = client.complete(f"{SCORE_SYSTEM}\nExplanation: {expl}", "".join(text(c)), max_tokens=2)
            votes.append(answer.strip()[:1] == "1")
        pred = np.array(votes)
        fuzz_votes = [
            client.complete(f"{FUZZ_SYSTEM}\nExplanation: {expl}", _marked(text(c), marks, 0.5), max_tokens=2)
            for c, marks, _ in fuzz
        ]
        fuzz_pred = np.array([a.strip()[:1] == "1" for a in fuzz_votes])
        fuzz_true = np.array([truth for _, _, truth in fuzz])
        return {
            "detection": _balanced(pred, activating_ho),
            "auroc": auroc(pred.astype(float), activating_ho),
            "fuzzing": _balanced(fuzz_pred, fuzz_true) if len(fuzz) else None,
            "simulation": None,  # an endpoint gives no per-token prediction
        }

    return {
        "explanation": explanation,
        "raw_explanation": raw,
        "scorer": "explainer endpoint",
        "scores": ask(explanation),
        "random_baseline": ask(baseline_text),
        "random_explanation": baseline_text,
        **split.record,
    }


def _scored_by_rules(explanation, raw, ids, acts, vocab, classes, split, rng) -> dict:
    """An LLM's explanation read as rules and scored by the rules simulator, beside a random explanation."""
    ex, ho, threshold = split.explain, split.held_out, split.threshold
    pool = np.unique(ids[np.concatenate([ex, ho])])
    read = rules_from_text(explanation, pool[pool >= 0], vocab)
    valued = []  # each rule's simulated activation: its mean on the explain half, as the rules explainer does
    for r in read:
        sim = simulate([r], ids[ex], classes[ex]) > 0
        valued.append(Rule(r.current, r.previous, float(acts[ex][sim].mean()) if sim.any() else 1.0))
    scores = score(valued, ids[ho], classes[ho], acts[ho], split.activating, threshold, rng)
    baseline_rules = random_rules(valued, ids[np.concatenate([ex, ho])], rng)
    baseline = score(baseline_rules, ids[ho], classes[ho], acts[ho], split.activating, threshold, rng)
    return {
        "explanation": explanation,
        "raw_explanation": raw,
        "scorer": "rules simulator",
        "rules": [r.to_json(vocab) for r in valued],
        "scores": scores,
        "random_baseline": baseline,
        "random_explanation": describe(baseline_rules, vocab),
        **split.record,
    }
