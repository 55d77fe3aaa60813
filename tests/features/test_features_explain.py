"""The rules explainer: a planted rule ("fires on token X after token Y") is found and scores ≥ 0.95 on
held-out contexts, while a random explanation scores ≈ 0.5; scores equal independent computations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lmscope.features.explain import auroc, describe, explain_units, learn_rules, simulate, token_class


class WordTokenizer:
    """Token id i is the word ' w{i}' (enough for decode, which is all the explainer asks)."""

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def _stream(pairs, windows=400, length=64, vocab=60, seed=0):
    """Random token windows; unit u fires (≈1) exactly on token X_u right after Y_u, else 0 (plus tiny noise)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (windows, length), generator=g)
    acts = torch.zeros(windows, length, len(pairs))
    for u, (x, y) in enumerate(pairs):
        hit = torch.zeros_like(ids, dtype=torch.bool)
        hit[:, 1:] = (ids[:, 1:] == x) & (ids[:, :-1] == y)
        acts[..., u] = hit.float() * (1 + 0.1 * torch.rand(windows, length, generator=g))
    return ids, acts


def test_a_planted_rule_is_explained_and_beats_a_random_explanation():
    pairs = [(3, 7), (11, 5), (20, 21), (40, 2), (8, 8), (33, 17)]
    ids, acts = _stream(pairs)
    units = explain_units(ids, acts, WordTokenizer(), list(range(len(pairs))), site="synthetic")
    assert len(units) == len(pairs)
    for u, (x, y) in zip(units, pairs):
        assert u["explanation"] == f"fires on ' w{x}' right after ' w{y}'", u["explanation"]
        assert u["scores"]["detection"] >= 0.95
        assert u["scores"]["auroc"] >= 0.95
        assert u["scores"]["fuzzing"] >= 0.95
        assert u["scores"]["simulation"] >= 0.9
    random_detection = np.mean([u["random_baseline"]["detection"] for u in units])
    random_auroc = np.mean([u["random_baseline"]["auroc"] for u in units])
    assert abs(random_detection - 0.5) < 0.1 and abs(random_auroc - 0.5) < 0.1


def test_a_single_token_rule_needs_no_context():
    ids, _ = _stream([(0, 0)], seed=1)
    acts = (ids == 9).float()[..., None] * 2.0
    (u,) = explain_units(ids, acts, WordTokenizer(), [0], site="s")
    assert u["explanation"] == "fires on ' w9'" and u["scores"]["detection"] == 1.0


def test_a_unit_that_never_fires_gets_no_explanation():
    ids, _ = _stream([(0, 0)], windows=50)
    assert explain_units(ids, torch.zeros(50, 64, 1), WordTokenizer(), [0], site="s") == []


def test_auroc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))


def test_rules_are_executable_simulators():
    ids = np.array([[-1, 1, 2, 3, 2, 2]])  # column 0: the token before the context (none)
    classes = np.zeros_like(ids)
    acts = np.array([[0, 0, 0, 1.0, 0]])  # token 2 after token 3
    rules = learn_rules(ids, classes, acts, 0.5)
    assert np.array_equal(simulate(rules, ids, classes) > 0, acts > 0)
    assert (
        describe(rules, type("V", (), {"text": lambda self, i: f"t{i}"})())
        == "fires on 't2' right after 't3'"
    )
    assert (
        token_class(" The") == "capital" and token_class("42") == "digit" and token_class("\n") == "newline"
    )
    random.seed(0)


def test_http_explainer_and_scorer_against_a_local_endpoint():
    from lmscope.features.llm import explainer_from

    """An OpenAI-compatible server on 127.0.0.1: it explains with a fixed sentence and scores honestly (1 when the
    quoted previous+current tokens of the explanation occur in the text), so the planted explanation scores
    high and the random one ≈ 0.5; the raw answer is kept."""
    import json
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            if "Explanation:" not in system:
                answer = "fires on ' w3' right after ' w7'\nbecause it is planted"
            elif (
                "marked" in system
            ):  # fuzzing: is a marked token the quoted current token after the previous one
                quoted = re.findall(r"'([^']*)'", system.split("Explanation:", 1)[1])
                answer = "1" if len(quoted) >= 2 and f"{quoted[1]}<<{quoted[0]}>>" in user else "0"
            else:
                quoted = re.findall(r"'([^']*)'", system.split("Explanation:", 1)[1])
                answer = "1" if "".join(reversed(quoted[:2])) in user else "0"
            data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ids, acts = _stream(
            [(3, 7)] * 6
        )  # one planted unit, explained six times with different random baselines
        url = f"http:http://127.0.0.1:{server.server_port}/v1"
        units = explain_units(ids, acts, WordTokenizer(), list(range(6)), site="s", explainer=url)
        by_rules = explain_units(
            ids, acts, WordTokenizer(), [0], site="s", explainer=explainer_from(url, scorer="rules")
        )[0]
    finally:
        server.shutdown()
    u = units[0]
    assert u["explanation"] == "fires on ' w3' right after ' w7'" and "planted" in u["raw_explanation"]
    assert u["explainer"] == url and u["scorer"] == "explainer endpoint"
    assert all(u["scores"]["detection"] >= 0.95 for u in units)
    assert abs(np.mean([u["random_baseline"]["detection"] for u in units]) - 0.5) <= 0.1
    # fuzzing by the endpoint: the planted explanation tells the right marks from random ones, a random one cannot
    assert all(u["scores"]["fuzzing"] >= 0.95 for u in units)
    assert abs(np.mean([u["random_baseline"]["fuzzing"] for u in units]) - 0.5) <= 0.1
    assert u["scores"]["simulation"] is None  # an endpoint gives no per-token prediction
    # the user may have the rules simulator score the endpoint's explanation instead: all three scores
    assert by_rules["scorer"] == "rules simulator" and by_rules["explanation"] == u["explanation"]
    assert by_rules["scores"]["detection"] >= 0.95 and by_rules["scores"]["simulation"] > 0.9


class CasedTokenizer:
    """Ids i and i + 30 are the same word in two spellings: ' w{i}' and 'W{i}' (i < 30)."""

    def decode(self, ids):
        return "".join(f" w{i}" if i < 30 else f"W{i - 30}" for i in ids)


def test_a_word_in_any_spelling_and_a_token_shortly_before_are_found():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 60, (400, 64), generator=g)
    word = ((ids == 4) | (ids == 34)).float()[..., None]  # unit 0: the word w4, either spelling
    near = torch.zeros(400, 64)
    for back in range(2, 6):  # unit 1: ' w3' with ' w7' 2..5 tokens before (never right before)
        near[:, back:] += (
            (ids[:, back:] == 3) & (ids[:, :-back] == 7) & (ids[:, back - 1 : -1] != 7)
        ).float()
    acts = torch.cat([word, (near > 0).float()[..., None]], dim=-1)
    units = explain_units(ids, acts, CasedTokenizer(), [0, 1], site="s")
    by_unit = {u["unit"]: u for u in units}
    assert by_unit[0]["scores"]["detection"] >= 0.95 and "w4" in by_unit[0]["explanation"]
    assert by_unit[1]["explanation"].startswith("fires on ' w3' with ' w7' shortly before"), by_unit[1][
        "explanation"
    ]
    assert by_unit[1]["scores"]["detection"] >= 0.9
