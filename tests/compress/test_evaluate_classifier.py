"""evaluate on classifiers: decisions (accuracy, label agreement, class KL), not perplexity."""

from __future__ import annotations

import pytest
import torch

from lmscope import LM
from lmscope.compress import Quantize, compress
from lmscope.compress.evaluate import evaluate
from lmscope.errors import LmscopeError
from lmscope.testing import tiny_model

CASES = [
    ("the applicant repaid every loan", "positive"),
    ("missed three payments", 0),
    ("no history", "neutral"),
] * 3


def test_classifier_evaluation_matches_a_brute_force_count(encoder_tokenizer):
    lm = LM(tiny_model("bert", head="seq"), encoder_tokenizer, name="clf")
    small = compress(lm, Quantize("int8")).lm
    small.name = "clf-int8"
    ev = evaluate([lm, small], labels=CASES, latency=False)
    assert ev.settings["task"] == "classifier" and ev.settings["labelled_cases"] == len(CASES)
    with torch.no_grad():
        p_ref = [int(lm.output_of(lm.forward(lm.encode(t)))[0].argmax()) for t, _ in CASES]
        p_small = [int(small.output_of(small.forward(small.encode(t)))[0].argmax()) for t, _ in CASES]
    gold = [lm.labels.index(y) if isinstance(y, str) else y for _, y in CASES]
    ref, cmp = ev.models
    assert ref.accuracy == pytest.approx(sum(a == b for a, b in zip(p_ref, gold)) / len(CASES))
    assert cmp.accuracy == pytest.approx(sum(a == b for a, b in zip(p_small, gold)) / len(CASES))
    assert cmp.top1_agreement == pytest.approx(sum(a == b for a, b in zip(p_ref, p_small)) / len(CASES))
    assert ref.top1_agreement == 1.0 and ref.kl == pytest.approx(0.0, abs=1e-7) and cmp.kl >= 0
    assert ref.perplexity is None
    assert "accuracy" in ev.to_text() and "label agree" in ev.to_text()


def test_unknown_label_is_refused(encoder_tokenizer):
    lm = LM(tiny_model("bert", head="seq"), encoder_tokenizer, name="clf")
    with pytest.raises(LmscopeError, match="not a class"):
        evaluate([lm], labels=[("text", "approve")], latency=False)


def test_compare_classifier_before_and_after(encoder_tokenizer):
    from lmscope.compress import PruneHeads
    from lmscope.compress.compare import compare

    lm = LM(tiny_model("distilbert", head="seq"), encoder_tokenizer, name="clf")
    small = compress(lm, [PruneHeads(0.25, method="magnitude"), Quantize("int8")]).lm
    cmp = compare(lm, small, "the applicant repaid every loan on time", methods=["saliency"], k=2)
    with torch.no_grad():
        a = lm.output_of(lm.forward(lm.encode("the applicant repaid every loan on time")))[0]
    assert cmp.attribution["saliency"]["target"] == lm.labels[int(a.argmax())]
    assert any(h["status"] == "removed" for h in cmp.heads) and any(h["js"] for h in cmp.heads)
    assert cmp.top1_agreement in (0.0, 1.0) and cmp.output_kl >= 0
    assert all(layer["lens_kl"] is None for layer in cmp.layers)


def test_evaluate_cli_with_a_labelled_file(tmp_path, encoder_tokenizer, capsys):
    import json

    from lmscope.cli.main import main

    d = tmp_path / "clf"
    tiny_model("distilbert", head="seq").save_pretrained(d)
    encoder_tokenizer.save_pretrained(d)
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CASES))
    out = tmp_path / "ev"
    code = main(
        [
            "evaluate",
            "--model",
            str(d),
            "--model",
            str(d),
            "--labels",
            str(data),
            "--no-latency",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ev = json.loads((out / "evaluate.json").read_text())
    assert ev["settings"]["labelled_cases"] == len(CASES)
    assert ev["models"][1]["top1_agreement"] == 1.0 and 0 <= ev["models"][0]["accuracy"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["evaluate", "--model", str(d), "--labels", str(bad), "--no-latency", "--quiet"]) == 2
    assert "no field 'label'" in capsys.readouterr().err
