"""Explaining a sequence classifier's decision: the class logit is the objective, faithfulness and IG
completeness are measured on it, and bad labels are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmscope import LM
from lmscope.errors import LmscopeError
from lmscope.explain import explain
from lmscope.testing import tiny_model

TEXT = "the applicant has a stable income and no debt"


@pytest.fixture(scope="module", params=["bert", "roberta", "distilbert", "deberta-v2", "llama"])
def clf(request, causal_tokenizer, encoder_tokenizer):
    tok = causal_tokenizer if request.param == "llama" else encoder_tokenizer
    model = tiny_model(request.param, head="seq", pad_token_id=tok.pad_token_id or 0)
    return LM(model, tok, name=f"clf-{request.param}")


def test_default_target_is_the_predicted_class_and_ig_is_complete(clf):
    res = explain(clf, TEXT, methods="saliency,integrated_gradients", sanity=False)
    step = res.first
    with torch.no_grad():
        logits = clf.output_of(clf.forward(clf.encode(TEXT)))[0]
    predicted = int(logits.argmax())
    assert step.target["kind"] == "label" and step.target["label_index"] == predicted
    assert step.target["label"] == clf.labels[predicted]
    assert step.target["value"] == pytest.approx(float(logits[predicted]), rel=1e-4, abs=1e-5)
    ig = step.methods["integrated_gradients"]
    assert sum(ig.scores) == pytest.approx(
        step.target["value"] - step.target["baseline_value"], abs=0.02 * max(1.0, abs(step.target["value"]))
    )
    assert "aopc_sum" in ig.faithfulness


def test_named_label_and_contrast(clf):
    res = explain(clf, TEXT, methods="saliency", target_label="positive", contrast_label="0", sanity=False)
    t = res.first.target
    with torch.no_grad():
        logits = clf.output_of(clf.forward(clf.encode(TEXT)))[0]
    assert t["kind"] == "label_contrast" and t["label"] == "positive" and t["contrast_label"] == "negative"
    assert t["value"] == pytest.approx(float(logits[2] - logits[0]), rel=1e-4, abs=1e-5)


def test_bad_labels_and_flags_are_refused(clf):
    with pytest.raises(LmscopeError, match="not a class"):
        explain(clf, TEXT, methods="saliency", target_label="approve", sanity=False)
    with pytest.raises(LmscopeError, match="--target-label"):
        explain(clf, TEXT, methods="saliency", target=" Mary", sanity=False)


def test_target_label_on_a_language_model_is_refused(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(LmscopeError, match="sequence classifier"):
        explain(lm, TEXT, methods="saliency", target_label="positive", sanity=False)


def test_head_importance_on_the_class_decision(encoder_tokenizer):
    """Zero-ablation Δloss of each head equals a brute-force run with that head zeroed."""
    from lmscope.capture.session import hooks
    from lmscope.explain.heads import head_importance

    lm = LM(tiny_model("bert", head="seq"), encoder_tokenizer, name="clf")
    ids = lm.encode(["the applicant repaid every loan", "three missed payments"])["input_ids"]
    scores = head_importance(lm, methods=("zero", "grad"), input_ids=ids)
    assert scores.meta["objective"].startswith("cross-entropy of the predicted class")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = lm.output_of(lm.forward(inputs))
        pred = logits.argmax(-1)
        clean = torch.nn.functional.cross_entropy(logits, pred)

        def zero(t, name):
            t = t.clone()
            t[:, :, 2] = 0
            return t

        with hooks(lm, [], {"blocks.1.attn.head_out": zero}):
            ablated = torch.nn.functional.cross_entropy(lm.output_of(lm.forward(inputs)), pred)
    assert scores.scores["ablation_zero"][1, 2] == pytest.approx(float(ablated - clean), abs=1e-5)
    assert (scores.scores["grad_importance"] >= 0).all() and scores.scores["grad_importance"].max() > 0


def test_patching_a_classifier_decision(encoder_tokenizer):
    """Patching the clean residual at every position of the last layer restores the clean class logit."""
    from lmscope.explain.patching import patch

    lm = LM(tiny_model("bert", head="seq"), encoder_tokenizer, name="clf")
    clean, corrupt = "the applicant is good", "the applicant is bad"
    res = patch(lm, clean, corrupt, target="positive", contrast="negative", normalize=False)
    with torch.no_grad():
        a = lm.output_of(lm.forward(lm.encode(clean)))[0]
        b = lm.output_of(lm.forward(lm.encode(corrupt)))[0]
    assert res.metric_clean == pytest.approx(float(a[2] - a[0]), abs=1e-5)
    assert res.metric_corrupt == pytest.approx(float(b[2] - b[0]), abs=1e-5)
    assert np.isfinite(res.heads_raw).all() and np.isfinite(res.mlp_raw).all()
    with pytest.raises(LmscopeError, match="not a class"):
        patch(lm, clean, corrupt, target="maybe")


def test_albert_head_ablation_recomputes_instead_of_replaying(encoder_tokenizer):
    """ALBERT runs one module at every depth: ablation scores equal brute-force runs (no replay shortcut)."""
    from lmscope.capture.session import hooks
    from lmscope.explain.heads import head_importance

    lm = LM(tiny_model("albert", head="seq", num_hidden_layers=3), encoder_tokenizer, name="alb")
    ids = lm.encode(["the applicant repaid every loan"])["input_ids"]
    scores = head_importance(lm, methods=("zero",), input_ids=ids)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = lm.output_of(lm.forward(inputs))
        pred = logits.argmax(-1)
        clean = torch.nn.functional.cross_entropy(logits, pred)

        def zero(t, name):
            t = t.clone()
            t[:, :, 1] = 0
            return t

        with hooks(lm, [], {"blocks.2.attn.head_out": zero}):
            ablated = torch.nn.functional.cross_entropy(lm.output_of(lm.forward(inputs)), pred)
    assert scores.scores["ablation_zero"][2, 1] == pytest.approx(float(ablated - clean), abs=1e-5)
