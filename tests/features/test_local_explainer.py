"""``--explainer local:DIR``: a causal LM in a folder, opened by lmscope's loader, writes the explanation (raw
output kept), and the rules simulator scores it on the held-out half beside a random explanation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmscope.cli.main import main
from lmscope.errors import LmscopeError
from lmscope.features.explain import Vocab, explain_units, simulate
from lmscope.features.llm import LocalModel, explainer_from, rules_from_text


class WordTokenizer:
    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def _stream(x=3, y=7, windows=400, length=64, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (windows, length), generator=g)
    hit = torch.zeros_like(ids, dtype=torch.bool)
    hit[:, 1:] = (ids[:, 1:] == x) & (ids[:, :-1] == y)
    return ids, (hit.float() * (1 + 0.1 * torch.rand(windows, length, generator=g)))[..., None]


def test_free_text_is_read_as_rules():
    vocab = Vocab(WordTokenizer())
    pool = np.arange(60)
    (r,) = rules_from_text("fires on ' w3' right after ' w7'", pool, vocab)
    assert r.current == ("tok", 3) and r.previous == ("tok", 7)
    named = rules_from_text("fires on the word w12 and on numbers", pool, vocab)
    assert ("tok", 12) in [x.current for x in named] and any(x.current[0] == "class" for x in named)
    assert rules_from_text("something unrelated entirely", pool, vocab) == []
    ids = np.array([[-1, 7, 3, 3, 7, 3]])
    classes = np.zeros_like(ids)
    assert (simulate([r], ids, classes) > 0).tolist() == [[False, True, False, False, True]]


class Scripted(LocalModel):
    """A LocalModel whose generation is replaced by a fixed answer (the rest — scoring — is the real code)."""

    def __init__(self, answer):
        self.spec, self.answer = "local:scripted", answer

    def complete(self, system, user, max_tokens=40):
        assert "<<" in user  # the activating tokens are marked, delphi-style
        return self.answer


def test_a_right_explanation_scores_high_by_the_rules_simulator_and_random_about_half():
    units = []
    for seed in range(6):
        ids, acts = _stream(seed=seed)
        units += explain_units(
            ids,
            acts,
            WordTokenizer(),
            [0],
            site="s",
            explainer=Scripted("fires on ' w3' after ' w7'\nreasoning…"),
        )
    for u in units:
        assert u["explanation"] == "fires on ' w3' after ' w7'" and "reasoning" in u["raw_explanation"]
        assert u["scorer"] == "rules simulator" and u["explainer"] == "local:scripted"
        assert u["scores"]["detection"] >= 0.95 and u["scores"]["fuzzing"] >= 0.95
    assert abs(np.mean([u["random_baseline"]["detection"] for u in units]) - 0.5) <= 0.1
    (wrong,) = explain_units(
        *_stream(), WordTokenizer(), [0], site="s", explainer=Scripted("fires on ' w50'")
    )
    assert wrong["scores"]["detection"] <= 0.6


def test_a_tiny_local_model_explains_and_is_scored(tiny_dir):
    """Its output is gibberish, but it is generated, kept raw, read as rules and scored; nothing is unscored."""
    client = explainer_from(f"local:{tiny_dir}")
    assert isinstance(client, LocalModel) and client.spec == f"local:{tiny_dir}"
    ids, acts = _stream()
    (u,) = explain_units(ids, acts, WordTokenizer(), [0], site="s", explainer=client)
    assert u["explainer"] == f"local:{tiny_dir}" and u["scorer"] == "rules simulator"
    assert isinstance(u["raw_explanation"], str) and len(u["raw_explanation"]) > 0
    assert u["scores"]["detection"] is not None and u["random_baseline"]["detection"] is not None
    # greedy: the answer is the argmax continuation, token by token (a plain loop over the HF model, no cache)
    prompt = client.prompt_ids("sys", "user text", 8)[None]
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = client.lm.model(input_ids=seq).logits[0, -1].argmax()
            if int(nxt) == client.lm.tokenizer.eos_token_id:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    want = client.lm.tokenizer.decode(seq[0, prompt.shape[1] :].tolist(), skip_special_tokens=True)
    assert client.complete("sys", "user text", 8) == want


def test_bad_local_explainers(tmp_path):
    with pytest.raises(LmscopeError, match="does not exist"):
        explainer_from(f"local:{tmp_path / 'nowhere'}")
    with pytest.raises(LmscopeError, match="unknown or unavailable"):
        explainer_from("local:")


def test_an_encoder_folder_is_no_explainer(tmp_path, build_tiny, encoder_tokenizer):
    build_tiny("bert").save_pretrained(tmp_path / "bert")
    encoder_tokenizer.save_pretrained(tmp_path / "bert")
    with pytest.raises(LmscopeError, match="not a causal language model"):
        explainer_from(f"local:{tmp_path / 'bert'}")


def test_cli_local_explainer(tiny_dir, text_corpus, tmp_path, capsys):
    from lmscope.features import Dictionary, DictionaryConfig

    sae = Dictionary(DictionaryConfig(kind="topk", d_in=64, d_sae=8, site="blocks.1.resid_post", k=2))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.save(tmp_path / "sae")
    base = ["features", "explain", "--model", str(tiny_dir), "--sae", str(tmp_path / "sae"), "--corpus",
            str(text_corpus), "--seq-len", "64", "--tokens", "1024", "--units", "0,1,2"]  # fmt: skip
    out = tmp_path / "feats"
    assert main([*base, "--explainer", f"local:{tiny_dir}", "--out", str(out)]) == 0
    data = json.loads((out / "explanations.json").read_text())
    for u in data["units"]:
        assert u["explainer"] == f"local:{tiny_dir}" and "raw_explanation" in u
        assert u["scores"]["detection"] is not None
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*base, "--explainer", f"local:{tmp_path / 'nowhere'}", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "Traceback" not in err and not bad.exists()
