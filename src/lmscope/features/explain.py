"""Explain every latent or neuron from its activations over a corpus, and score every explanation on held-out text.

Per unit: contexts (``CONTEXT`` tokens) are cut from the corpus windows; the examples are the top-activating
contexts, contexts sampled across the quantiles of the rest of the activating ones, and random non-activating
contexts. Each set is split alternately into an *explain* half and a *held-out* half.

The ``rules`` explainer (offline, no language model) learns from the explain half a short disjunction of rules
``current ∈ {token | word in any case/spacing | token class}`` optionally ``right after {token | word | class}``
or ``with token shortly before`` (within ``NEAR`` tokens) that predicts which tokens are active (activation
above ``ACTIVE`` × the unit's largest). Rules are added greedily by token-level F1 plus context-level balanced
accuracy on the explain half (what detection measures), and rendered as one sentence. Being executable it is its own simulator: a matching token is predicted to have the mean activation
its rule saw in the explain half.

Scores, on the held-out half only (as delphi scores): **detection** (activating vs non-activating contexts:
balanced accuracy, and AUROC of the simulated maximum), **fuzzing** (a context with its truly active tokens
marked vs the same number of other tokens marked: balanced accuracy of telling them apart by whether the marked
tokens match), **simulation** (Pearson correlation of simulated and true activations over every token). A random
explanation — rules of the same shape over random tokens of the same contexts — is scored the same way beside
it. A unit without activating contexts in both halves gets no explanation (never an unscored one).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

import numpy as np
import torch

CONTEXT = 32
ACTIVE = 0.2  # a token is active above this fraction of the unit's largest activation
N_TOP, N_QUANTILE, N_RANDOM = 20, 20, 40
# MAX_RULES was chosen on development latents disjoint from the benchmark's reported ones (3 -> 5: +0.025 median)
MAX_RULES = 5
N_CURRENT = 12  # candidate current tokens: the most frequent among the active ones
# rule selection: token F1 + DETECTION_WEIGHT x context-level balanced accuracy (explain half only)
DETECTION_WEIGHT = 1.0


# -- token classes ---------------------------------------------------------------------------------
CLASSES = {
    "newline": "a line break",
    "digit": "a number",
    "punct": "punctuation",
    "capital": "a capitalized word",
    "word": "a word start",
    "piece": "the middle of a word",
    "space": "whitespace",
    "other": "a symbol",
}


def token_class(text: str) -> str:
    core = text.strip()
    if "\n" in text:
        return "newline"
    if not core:
        return "space"
    if core.isdigit():
        return "digit"
    if all(c in string.punctuation for c in core):
        return "punct"
    if core.isalpha():
        if core[0].isupper():
            return "capital"
        return "word" if text[0] == " " else "piece"
    return "other"


class Vocab:
    """Token texts, classes and normalized forms of ids, decoded once each."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._norm: dict[str, int] = {}  # normalized text -> code
        self._norm_text: list[str] = []

    def text(self, i: int) -> str:
        i = int(i)
        if i not in self._text:
            self._text[i] = self.tokenizer.decode([i])
        return self._text[i]

    def norm_code(self, i: int) -> int:
        """One code for every token of the same word up to case and surrounding whitespace (' In', 'in')."""
        key = self.text(i).strip().casefold()
        if key not in self._norm:
            self._norm[key] = len(self._norm_text)
            self._norm_text.append(key)
        return self._norm[key]

    def norm_text(self, code: int) -> str:
        return self._norm_text[code]

    def classes(self, ids: np.ndarray) -> np.ndarray:
        """``[..., 2]``: each id's class index and its normalized-form code (-1, -1 for -1, "no token")."""
        names = list(CLASSES)
        table = {
            int(i): (names.index(token_class(self.text(i))), self.norm_code(i)) if i >= 0 else (-1, -1)
            for i in np.unique(ids)
        }
        cls = np.vectorize(lambda i: table[int(i)][0], otypes=[int])(ids)
        norm = np.vectorize(lambda i: table[int(i)][1], otypes=[int])(ids)
        return np.stack([cls, norm], axis=-1)


# -- rules -------------------------------------------------------------------------------------------
NEAR = 6  # a "near" condition: the token occurs among the NEAR tokens before


@dataclass(frozen=True)
class Rule:
    """``current`` / ``previous`` conditions: ("tok", id), ("norm", code: the same word up to case and spaces)
    or ("class", index); ``previous`` may also be ("near", id) — the token among the ``NEAR`` before — or None."""

    current: tuple
    previous: tuple | None
    value: float = 1.0  # the simulated activation of a matching token

    def to_json(self, vocab: Vocab) -> dict:
        def cond(c):
            if c is None:
                return None
            if c[0] in ("tok", "near"):
                return {"token" if c[0] == "tok" else "near": vocab.text(c[1]), "id": int(c[1])}
            if c[0] == "norm":
                return {"word": vocab.norm_text(c[1])}
            return {"class": list(CLASSES)[c[1]]}

        return {"current": cond(self.current), "previous": cond(self.previous), "value": self.value}


def _channels(ids: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class index, normalized code) arrays; a plain 2-D ``classes`` carries classes only."""
    if classes.ndim == ids.ndim + 1:
        return classes[..., 0], classes[..., 1]
    return classes, np.full(ids.shape, -2)


def _match(cond, ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if cond is None:
        return np.ones(ids.shape, dtype=bool)
    cls, norm = _channels(ids, classes)
    if cond[0] == "tok":
        return ids == cond[1]
    if cond[0] == "norm":
        return norm == cond[1]
    return cls == cond[1]


def _shifted(a: np.ndarray) -> np.ndarray:
    """The previous token's value at each position: contexts carry the token before them in column 0."""
    return a[:, :-1]


def _near(ids: np.ndarray, token: int) -> np.ndarray:
    """``[C, len]``: whether ``token`` is among the ``NEAR`` tokens before each position (``ids [C, 1 + len]``)."""
    hit = ids == token
    out = np.zeros((ids.shape[0], ids.shape[1] - 1), dtype=bool)
    for back in range(1, NEAR + 1):  # position j (column j + 1) looks at columns j + 1 - back
        out[:, back - 1 :] |= hit[:, : ids.shape[1] - back]
    return out


def _match_previous(cond, ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """A previous-context condition at each body position of ``ids [C, 1 + len]``."""
    if cond is not None and cond[0] == "near":
        return _near(ids, cond[1])
    return _match(cond, _shifted(ids), _shifted(classes))


def simulate(rules: list[Rule], ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Predicted activations [contexts, len]: the largest value among the rules each token matches.

    ``ids`` and ``classes`` are ``[contexts, 1 + len]``: column 0 is the token before the context (-1: none).
    """
    body, body_classes = ids[:, 1:], classes[:, 1:]
    sim = np.zeros(body.shape)
    for r in rules:
        hit = _match(r.current, body, body_classes) & _match_previous(r.previous, ids, classes)
        sim = np.where(hit, np.maximum(sim, r.value), sim)
    return sim


def _f1(pred: np.ndarray, label: np.ndarray) -> float:
    tp = float((pred & label).sum())
    if tp == 0:
        return 0.0
    return 2 * tp / (float(pred.sum()) + float(label.sum()))


def learn_rules(ids: np.ndarray, classes: np.ndarray, acts: np.ndarray, threshold: float) -> list[Rule]:
    """Greedy disjunction of (current, previous) rules on the explain half. Each step adds the rule that most
    raises token-level F1 plus context-level balanced accuracy (telling activating from silent contexts: what
    detection scores), so a rule that matches everywhere in silent contexts loses to a narrower one."""
    label = acts > threshold
    if not label.any():
        return []
    body, body_classes = ids[:, 1:], classes[:, 1:]
    cls, norm = _channels(body, body_classes)
    prev_ids = _shifted(ids)
    prev_cls, prev_norm = _channels(prev_ids, _shifted(classes))
    ctx_label = label.any(1)

    def top(values, n, where=label):
        u, c = np.unique(values[where], return_counts=True)
        return [int(v) for v in u[np.argsort(-c, kind="stable")][:n] if v >= 0]

    cur = [("tok", t) for t in top(body, N_CURRENT)] + [("class", c) for c in top(cls, 4)]
    if (norm >= 0).any():
        cur += [("norm", c) for c in top(norm, 8)]
    prev = [None] + [("tok", t) for t in top(prev_ids, 8)] + [("class", c) for c in top(prev_cls, 4)]
    if (prev_norm >= 0).any():
        prev += [("norm", c) for c in top(prev_norm, 4)]
    near_counts: dict[int, int] = {}
    for t in top(prev_ids, 24, np.ones_like(label)):  # tokens frequent before active tokens, within NEAR
        near_counts[t] = int((_near(ids, t) & label).sum())
    prev += [("near", t) for t in sorted(near_counts, key=lambda t: -near_counts[t])[:6]]
    cur_m = np.stack([_match(c, body, body_classes) for c in cur])  # [n_cur, C, len]
    prev_m = np.stack([_match_previous(p, ids, classes) for p in prev])  # [n_prev, C, len]
    n_ctx = label.shape[0]
    flat_label = label.reshape(-1)
    chosen: list[tuple] = []
    covered = np.zeros(label.shape, dtype=bool)
    best = 0.0
    cost = (
        np.array([0.0 if p is None else 0.02 if p[0] == "near" else 0.01 for p in prev])[None, :]
        + np.array([0.0 if c[0] == "tok" else 0.005 for c in cur])[:, None]
    )
    for _ in range(MAX_RULES):
        hits = cur_m[:, None] & prev_m[None, :]  # [n_cur, n_prev, C, len]
        union = hits | covered
        flat = union.reshape(len(cur), len(prev), -1)
        tp = (flat & flat_label).sum(-1)
        f1 = 2 * tp / (flat.sum(-1) + flat_label.sum())
        ctx_hit = union.any(-1)  # [n_cur, n_prev, C]
        if ctx_label.all() or not ctx_label.any():
            detect = np.zeros(f1.shape)
        else:
            detect = (ctx_hit[..., ctx_label].mean(-1) + (~ctx_hit[..., ~ctx_label]).mean(-1)) / 2
        value = f1 + DETECTION_WEIGHT * detect
        i, j = np.unravel_index(np.argmax(value - cost), value.shape)
        if value[i, j] < best + 0.01:
            break
        best = float(value[i, j])
        chosen.append((cur[i], prev[j]))
        covered = union[i, j]
    del n_ctx
    rules = []
    for c, p in chosen:
        hit = _match(c, body, body_classes) & _match_previous(p, ids, classes)
        rules.append(Rule(c, p, float(acts[hit].mean()) if hit.any() else 0.0))
    return rules


def describe(rules: list[Rule], vocab: Vocab) -> str:
    """One plain sentence: ``fires on ' the' / ' a' right after 'of'``."""
    if not rules:
        return "fires on nothing it could name"

    def cond(c):
        if c[0] in ("tok", "near"):
            return repr(vocab.text(c[1]))
        if c[0] == "norm":
            return f"the word {vocab.norm_text(c[1])!r} (any case or spacing)"
        return CLASSES[list(CLASSES)[c[1]]]

    groups: dict = {}
    for r in rules:  # rules with the same previous condition read as one clause
        groups.setdefault(r.previous, []).append(cond(r.current))
    parts = []
    for previous, currents in groups.items():
        clause = " / ".join(currents)
        if previous is not None and previous[0] == "near":
            clause += f" with {cond(previous)} shortly before"
        elif previous is not None:
            clause += f" right after {cond(previous)}"
        parts.append(clause)
    return "fires on " + "; or on ".join(parts)


# -- scoring -----------------------------------------------------------------------------------------
def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann–Whitney, ties counted half)."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    ranks_sorted = np.arange(1, len(order) + 1, dtype=float)
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks_sorted[i : j + 1] = (i + j + 2) / 2
        i = j + 1
    ranks[order] = ranks_sorted
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _balanced(pred: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.all() or not labels.any():
        return None
    return float((pred[labels].mean() + (~pred[~labels]).mean()) / 2)


def score(
    rules: list[Rule],
    ids: np.ndarray,
    classes: np.ndarray,
    acts: np.ndarray,
    activating: np.ndarray,
    threshold: float,
    rng: random.Random,
) -> dict:
    """Detection (balanced accuracy, AUROC), fuzzing and simulation of ``rules`` on held-out contexts."""
    sim = simulate(rules, ids, classes)
    ctx_score = sim.max(1)
    detection = _balanced(ctx_score > 0, activating)
    # fuzzing: each activating context twice — its active tokens marked, or as many other tokens marked
    right, fuzzed = [], []
    for c in np.nonzero(activating)[0]:
        active = np.nonzero(acts[c] > threshold)[0]
        others = np.nonzero(acts[c] <= threshold)[0]
        if len(active) == 0 or len(others) == 0:
            continue
        wrong = rng.sample(list(others), min(len(active), len(others)))
        right.append((sim[c, active] > 0).mean() >= 0.5)
        fuzzed.append((sim[c, wrong] > 0).mean() >= 0.5)
    fuzzing = None
    if right:
        fuzzing = float((np.mean(right) + 1 - np.mean(fuzzed)) / 2)
    true, pred = acts.ravel(), sim.ravel()
    simulation = 0.0
    if pred.std() > 0 and true.std() > 0:
        simulation = float(np.corrcoef(pred, true)[0, 1])
    return {
        "detection": detection,
        "auroc": auroc(ctx_score, activating),
        "fuzzing": fuzzing,
        "simulation": simulation,
    }


def random_rules(rules: list[Rule], ids: np.ndarray, rng: random.Random) -> list[Rule]:
    """Rules of the same shape as ``rules`` (at least one) over tokens drawn at random from the contexts."""
    pool = [int(t) for t in np.unique(ids) if t >= 0]
    shape = rules or [Rule(("tok", 0), None)]
    out = []
    for r in shape:
        prev = None if r.previous is None else ("tok", rng.choice(pool))
        out.append(Rule(("tok", rng.choice(pool)), prev, r.value or 1.0))
    return out


# -- examples ----------------------------------------------------------------------------------------
def contexts(ids: torch.Tensor, acts: torch.Tensor, length: int = CONTEXT):
    """Windows ``[W, L]`` (and activations ``[W, L, U]``) cut into contexts: ids ``[C, 1 + length]`` whose
    column 0 is the token before the context (-1 at a window's start), activations ``[C, length, U]``."""
    w, seq = ids.shape
    n = max(1, seq // length)
    length = min(length, seq)
    before = torch.cat([torch.full((w, 1), -1, dtype=ids.dtype), ids[:, :-1]], dim=1)  # [W, L]
    body = ids[:, : n * length].reshape(w * n, length)
    first = before[:, : n * length : length].reshape(w * n, 1)
    acts = acts[:, : n * length].reshape(w * n, length, -1)
    return torch.cat([first, body], dim=1), acts


def pick_examples(ctx_max: np.ndarray, threshold: float, rng: random.Random) -> tuple[list, list, list]:
    """(top, quantile samples, random non-activating) context indices for one unit."""
    order = np.argsort(-ctx_max, kind="stable")
    activating = [int(i) for i in order if ctx_max[i] > threshold]
    top = activating[:N_TOP]
    rest = activating[N_TOP:]
    quantile = []
    if rest:  # N_QUANTILE spread over 4 quantile bins of the remaining activating contexts
        bins = np.array_split(np.array(rest), 4)
        for b in bins:
            if len(b):
                quantile += rng.sample(list(map(int, b)), min(len(b), N_QUANTILE // 4))
    silent = [int(i) for i in np.nonzero(ctx_max <= threshold)[0]]
    negative = rng.sample(silent, min(len(silent), N_RANDOM))
    return top, quantile, negative


@dataclass
class Split:
    """A unit's examples dealt into an explain half and a held-out half."""

    threshold: float
    explain: np.ndarray  # context indices
    held_out: np.ndarray
    activating: np.ndarray  # which held-out contexts activate
    record: dict  # threshold, max_activation and examples, as explanations.json keeps them


def split_examples(acts: np.ndarray, rng: random.Random) -> Split | None:
    """The examples of a unit with activations ``acts [C, len]``: top, quantile and silent contexts dealt
    alternately into the two halves. None when the held-out half cannot score an explanation (no
    activation, or all / none of it activating): such a unit gets no explanation."""
    peak = float(acts.max())
    if not peak > 0:
        return None
    threshold = ACTIVE * peak
    ctx_max = acts.max(1)
    top, quantile, negative = pick_examples(ctx_max, threshold, rng)
    halves = {"explain": [], "held_out": []}
    for group in (top, quantile, negative):
        for i, c in enumerate(group):
            halves["explain" if i % 2 == 0 else "held_out"].append(c)
    ex, ho = np.array(halves["explain"], dtype=int), np.array(halves["held_out"], dtype=int)
    activating_ho = ctx_max[ho] > threshold
    if len(ex) == 0 or not activating_ho.any() or activating_ho.all():
        return None
    record = {
        "threshold": threshold,
        "max_activation": peak,
        "examples": {
            "top": top,
            "quantile": quantile,
            "non_activating": negative,
            "held_out": [int(c) for c in ho],
        },
    }
    return Split(threshold, ex, ho, activating_ho, record)


def explain_unit(
    ids: np.ndarray, acts: np.ndarray, vocab: Vocab, classes: np.ndarray, seed: int
) -> dict | None:
    """Explain one unit from all contexts ``ids [C, len]`` and its activations ``acts [C, len]``."""
    rng = random.Random(seed)
    split = split_examples(acts, rng)
    if split is None:
        return None  # nothing to score it on: no explanation is shown
    threshold, ex, ho, activating_ho = split.threshold, split.explain, split.held_out, split.activating
    rules = learn_rules(ids[ex], classes[ex], acts[ex], threshold)
    scores = score(rules, ids[ho], classes[ho], acts[ho], activating_ho, threshold, rng)
    baseline_rules = random_rules(rules, ids[np.concatenate([ex, ho])], rng)
    baseline = score(baseline_rules, ids[ho], classes[ho], acts[ho], activating_ho, threshold, rng)
    return {
        "explanation": describe(rules, vocab),
        "rules": [r.to_json(vocab) for r in rules],
        "scores": scores,
        "random_baseline": baseline,
        "random_explanation": describe(baseline_rules, vocab),
        **split.record,
    }


def explain_units(
    ids: torch.Tensor,
    acts: torch.Tensor,
    tokenizer,
    units: list[int],
    site: str,
    seed: int = 0,
    context: int = CONTEXT,
    explainer="rules",
) -> list[dict]:
    """Explanations of ``units`` from windows ``ids [W, L]`` and their activations ``acts [W, L, len(units)]``.

    ``explainer``: ``rules``, ``local:DIR`` (a causal LM lmscope loads), ``http:URL`` (an OpenAI-compatible
    server), or an explainer already made by ``llm.explainer_from`` (so a local model loads once).

    Each item: ``site``, ``unit``, ``explanation``, ``scores``, ``random_baseline``, ``explainer`` and the
    rules, examples (context indices) and threshold behind them. Units with nothing to score are left out.
    """
    from .llm import explain_unit_llm, explainer_from, explainer_name

    client = explainer_from(explainer)  # None for rules; refuses what it does not know before any work
    name = explainer_name(explainer)
    vocab = Vocab(tokenizer)
    cids, cacts = contexts(ids, acts, context)
    cids_np = cids.numpy()
    classes = vocab.classes(cids_np)
    out = []
    for j, unit in enumerate(units):
        a = cacts[..., j].float().numpy()
        if client is None:
            item = explain_unit(cids_np, a, vocab, classes, seed + unit)
        else:
            item = explain_unit_llm(client, cids_np, a, vocab, classes, seed + unit)
        if item is None:
            continue
        out.append({"site": site, "unit": int(unit), **item, "explainer": name})
    return out


def summary(units: list[dict]) -> dict:
    """Medians of every score, and of the random baseline."""

    def med(which, key):
        vals = [u[which][key] for u in units if u[which].get(key) is not None]
        return float(np.median(vals)) if vals else math.nan

    keys = ("detection", "auroc", "fuzzing", "simulation")
    return {
        "units": len(units),
        "median": {k: med("scores", k) for k in keys},
        "random_median": {k: med("random_baseline", k) for k in keys},
    }
