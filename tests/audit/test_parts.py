"""The parts of the audit against independent references: choice log-probabilities against a brute-force
sum over tokens, word merging against the token total, group metrics against hand counts and fairlearn,
calibration against a hand computation, counterfactual swaps against expected texts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.audit.counterfactuals import load_swap, load_swaps
from lmscope.audit.decider import ChoiceDecider
from lmscope.audit.metrics import calibration, group_metrics
from lmscope.audit.words import mass_on, merge_words
from lmscope.errors import LmscopeError

PROMPT = "Application: {text}\nDecision:"
TEXTS = ["She earns a lot and has no debt.", "Unemployed, owes money to three banks since 2019."]


def test_choice_logprob_is_the_sum_over_its_tokens(make_tiny):
    lm = make_tiny("llama")
    choices = [" approve the loan", " deny", " approve"]  # several tokens, one token, a shared prefix
    d = ChoiceDecider(lm, PROMPT, choices, batch_size=2)
    assert len(d.choice_ids[0]) > 1
    got = d.choice_logprobs(TEXTS)  # batched, right-padded rows
    for b, text in enumerate(TEXTS):
        prompt_ids = lm.tokenizer(PROMPT.replace("{text}", text))["input_ids"]
        for c, cids in enumerate(d.choice_ids):
            total, ids = 0.0, list(prompt_ids)
            for tid in cids:  # one unpadded forward per token: the next-token log-probability
                with torch.no_grad():
                    logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
                total += float(torch.log_softmax(logits, -1)[tid])
                ids.append(tid)
            assert float(got[b, c]) == pytest.approx(total, abs=1e-4)
    probs = d.probabilities(TEXTS)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)


def test_choice_decider_refuses_bad_setups(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(LmscopeError, match=r"\{text\} exactly once"):
        ChoiceDecider(lm, "Decision:", [" yes", " no"])
    with pytest.raises(LmscopeError, match="same"):
        ChoiceDecider(lm, PROMPT, [" yes", " yes"])
    with pytest.raises(LmscopeError, match="at least two"):
        ChoiceDecider(lm, PROMPT, [" yes"])


@pytest.mark.parametrize("which", ["encoder", "causal"])
def test_word_merging_keeps_the_total(which, encoder_tokenizer, causal_tokenizer):
    tok = encoder_tokenizer if which == "encoder" else causal_tokenizer
    text = "Unbelievably, John's co-signer earns 12,500 EUR/month — approve?"
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    special = set(tok.all_special_ids)
    spans = [None if i in special or e <= s else (s, e) for i, (s, e) in zip(ids, enc["offset_mapping"])]
    tokens = [tok.decode([i]) for i in ids]
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(ids)).tolist()
    units = merge_words(tokens, scores, spans, text)
    assert sum(u["score"] for u in units) == pytest.approx(sum(scores), abs=1e-12)
    assert sorted(i for u in units for i in u["tokens"]) == list(range(len(ids)))  # each token once
    assert len(units) < len(ids)  # subwords were merged
    words = [u["text"] for u in units if u["span"]]
    assert "Unbelievably" in words and "John" in words and "500" in words
    for u in units:  # a word's score is the sum of exactly its tokens' scores
        assert u["score"] == pytest.approx(sum(scores[i] for i in u["tokens"]), abs=1e-12)
        if u["span"]:  # and it shows every character of its tokens
            assert u["text"] == text[u["span"][0] : u["span"][1]]
            for i in u["tokens"]:
                assert u["span"][0] <= spans[i][1] and spans[i][1] <= u["span"][1]
    shown = "".join(u["text"] for u in units if u["span"])
    assert shown.replace(" ", "") == text.replace(" ", "")  # nothing of the text is lost
    # mass on "John": the tokens of that word over all non-special tokens
    start = text.index("John")
    is_special = [s is None and i in special for s, i in zip(spans, ids)]
    john = [i for i, s in enumerate(spans) if s and s[0] < start + 4 and start < s[1]]
    inside = [i for i, s in enumerate(spans) if s is not None]  # the text's tokens (no specials)
    expected = sum(abs(scores[i]) for i in john) / sum(abs(scores[i]) for i in inside)
    assert mass_on(scores, spans, [(start, start + 4)], is_special) == pytest.approx(expected)


TABLE = [  # (label, prediction, group)
    ("approve", "approve", "a"),
    ("approve", "deny", "a"),
    ("deny", "approve", "a"),
    ("deny", "deny", "a"),
    ("approve", "approve", "a"),
    ("approve", "approve", "b"),
    ("deny", "deny", "b"),
    ("deny", "deny", "b"),
    ("approve", "deny", "b"),
    ("deny", "deny", "b"),
    ("deny", "deny", "b"),
]


def test_group_metrics_match_hand_counts_and_fairlearn():
    import fairlearn.metrics as fm

    y, p, g = map(list, zip(*TABLE))
    m = group_metrics(y, p, g, "approve")
    # group a: 5 cases, labels A A D D A, predictions A D A D A
    a, b = m["by_group"]["a"], m["by_group"]["b"]
    assert a["count"] == 5 and b["count"] == 6
    assert a["accuracy"] == pytest.approx(3 / 5) and b["accuracy"] == pytest.approx(5 / 6)
    assert a["selection_rate"] == pytest.approx(3 / 5) and b["selection_rate"] == pytest.approx(1 / 6)
    assert a["true_positive_rate"] == pytest.approx(2 / 3) and b["true_positive_rate"] == pytest.approx(1 / 2)
    assert a["false_positive_rate"] == pytest.approx(1 / 2) and b["false_positive_rate"] == pytest.approx(0)
    assert m["demographic_parity_difference"] == pytest.approx(3 / 5 - 1 / 6)
    assert m["equalized_odds_difference"] == pytest.approx(max(2 / 3 - 1 / 2, 1 / 2 - 0))
    assert m["accuracy_difference"] == pytest.approx(5 / 6 - 3 / 5)
    yt = [int(v == "approve") for v in y]
    yp = [int(v == "approve") for v in p]
    assert m["equalized_odds_difference"] == pytest.approx(
        fm.equalized_odds_difference(yt, yp, sensitive_features=g)
    )
    assert m["demographic_parity_ratio"] == pytest.approx(
        fm.demographic_parity_ratio(yt, yp, sensitive_features=g)
    )
    # no labels: selection rates and demographic parity only
    m2 = group_metrics(None, p, g, "approve")
    assert "equalized_odds_difference" not in m2 and "accuracy" not in m2["overall"]
    assert m2["demographic_parity_difference"] == pytest.approx(3 / 5 - 1 / 6)


def test_calibration_matches_a_hand_computation():
    conf = [0.95, 0.91, 0.85, 0.62, 0.55, 1.0, 0.67]
    hit = [1, 0, 1, 1, 0, 1, 0]
    c = calibration(conf, hit, bins=10)
    # bins: [0.9,1.0]: 0.95 0.91 1.0 (hits 1 0 1); [0.8,0.9): 0.85 (1); [0.6,0.7): 0.62 0.67 (1 0); [0.5,0.6): 0.55 (0)
    expected = (
        3 / 7 * abs(2 / 3 - (0.95 + 0.91 + 1.0) / 3)
        + 1 / 7 * abs(1 - 0.85)
        + 2 / 7 * abs(1 / 2 - (0.62 + 0.67) / 2)
        + 1 / 7 * abs(0 - 0.55)
    )
    assert c["ece"] == pytest.approx(expected)
    assert [b["count"] for b in c["bins"]] == [1, 2, 1, 3]
    assert c["bins"][-1]["lo"] == 0.9 and c["bins"][-1]["accuracy"] == pytest.approx(2 / 3)


def test_builtin_swaps_keep_case_and_possessives():
    gender, names = load_swaps("builtin:gender,names")
    new, changes = gender.apply("He said his wife's car was hers. SHE agreed; the man left. Shell")
    assert new == "She said her husband's car was his. HE agreed; the woman left. Shell"
    for c in changes:  # spans point at the words in both texts
        assert "He said his wife's car was hers. SHE agreed; the man left. Shell"[slice(*c.old_span)] == c.old
        assert new[slice(*c.new_span)] == c.new
    new, _ = names.apply("John's loan; Mary and JOHN signed. Johnson")
    assert new == "Mary's loan; John and MARY signed. Johnson"
    same, none = names.apply("no names here")
    assert same == "no names here" and none == []


def test_user_swap_files(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([["Catholic", "Muslim"]]))
    s = load_swap(str(pairs))
    assert s.name == "pairs" and s.apply("a Catholic school")[0] == "a Muslim school"
    rules = tmp_path / "age.json"
    rules.write_text(
        json.dumps(
            {"name": "age", "regex": [{"pattern": r"\b(\d+) years old", "replacement": r"70 years old"}]}
        )
    )
    new, changes = load_swap(str(rules)).apply("She is 34 years old and 34 years old.")
    assert new == "She is 70 years old and 70 years old."
    assert [new[slice(*c.new_span)] for c in changes] == ["70 years old"] * 2


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"pairs": [["he"]]}', "not a pair"),
        ('{"pairs": [["he", "he"]]}', "with itself"),
        ('{"pairs": [["he", "she"], ["he", "they"]]}', "maps to both"),
        ('{"regex": [{"pattern": "(", "replacement": "x"}]}', "not valid"),
        ('{"regex": [{"pattern": "a", "replacement": "\\\\2"}]}', "group 2"),
        ('{"regex": [{"pattern": "a*", "replacement": "b"}]}', "empty string"),
        ('{"words": []}', "unknown key"),
        ("{}", "no pairs and no rules"),
        ('"he"', "not pairs or rules"),
    ],
)
def test_invalid_swap_files_are_refused(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(LmscopeError, match=match):
        load_swap(str(f))


def test_unknown_builtin_and_duplicates():
    with pytest.raises(LmscopeError, match="no built-in swap list 'race'"):
        load_swaps("builtin:race")
    with pytest.raises(LmscopeError, match="given twice"):
        load_swaps(["builtin:gender", "builtin:gender"])
