"""Faithfulness flags: each rule fires exactly at its stated threshold, flagged methods rank after the
unflagged ones whatever their AOPC, and attributions.json / the report carry the flags."""

from __future__ import annotations

import json

import pytest

from lmscope.explain.attribution.base import Attribution
from lmscope.explain.faithfulness import (
    IG_COMPLETENESS_MAX,
    RANDOMIZATION_MAX,
    SURROGATE_R2_MIN,
    flags_for,
    rank_methods,
)

RANDOM = {"aopc_sum": 1.0}


def attr(name, aopc, rho=None, **info):
    fa = {"aopc_sum": aopc, "randomization_spearman": rho}
    return Attribution(method=name, scores=[0.0], info=info, faithfulness=fa)


def codes(a):
    return [f["flag"] for f in flags_for(a, RANDOM)]


def test_each_rule_at_its_threshold():
    assert codes(attr("a", 1.0)) == []  # equal to random is not below it
    assert codes(attr("a", 0.999)) == ["below_random"]
    assert codes(attr("a", 2.0, rho=RANDOMIZATION_MAX)) == []
    assert codes(attr("a", 2.0, rho=RANDOMIZATION_MAX + 1e-3)) == ["fails_randomization"]
    assert codes(attr("a", 2.0, rho=float("nan"))) == []  # constant scores: no verdict
    assert codes(attr("a", 2.0, r2=SURROGATE_R2_MIN, n_features=5)) == []
    assert codes(attr("a", 2.0, r2=0.103, n_features=5)) == ["low_surrogate_r2"]
    assert codes(attr("a", 2.0, relative_completeness_error=IG_COMPLETENESS_MAX)) == []
    assert codes(attr("a", 2.0, relative_completeness_error=0.05)) == ["ig_incomplete"]
    both = flags_for(attr("a", 0.5, rho=0.987), RANDOM)
    assert [f["flag"] for f in both] == ["below_random", "fails_randomization"]
    assert "0.987" in both[1]["why"] and str(RANDOMIZATION_MAX) in both[1]["why"]


def test_flagged_methods_rank_last():
    # the case: saliency / input×gradient below random, rollout fails randomization,
    # kernel SHAP with a poor surrogate — occlusion (lowest AOPC) must still come first
    results = {
        "saliency": attr("saliency", 0.8),
        "input_x_gradient": attr("input_x_gradient", 0.9),
        "attention_rollout": attr("attention_rollout", 3.0, rho=0.987),
        "kernel_shap": attr("kernel_shap", 2.5, r2=0.103, n_features=5),
        "occlusion": attr("occlusion", 1.5, rho=0.1),
        "integrated_gradients": attr("integrated_gradients", 2.0, rho=0.2, relative_completeness_error=0.004),
    }
    results["logit_lens"] = Attribution(method="logit_lens", scores=[0.0], unit="layer")
    ranking = rank_methods(results, RANDOM)
    assert ranking == [
        "integrated_gradients",
        "occlusion",
        "attention_rollout",
        "kernel_shap",
        "input_x_gradient",
        "saliency",
    ]
    assert [results[n].faithfulness["rank"] for n in ranking] == [1, 2, 3, 4, 5, 6]
    assert results["logit_lens"].flags == [] and "logit_lens" not in ranking
    d = results["saliency"].to_dict()
    assert d["flags"][0]["flag"] == "below_random"
    json.dumps(d)


def test_flags_reach_json_and_report(make_tiny, tmp_path):
    from lmscope.explain.api import explain

    lm = make_tiny("llama")
    res = explain(lm, "When Mary and John went", methods="saliency,occlusion,kernel_shap", sanity=True)
    data = res.to_json()
    rb = data["random_baseline"]["aopc_sum"]
    for name in data["ranking"]:
        m = data["methods"][name]
        expect = m["faithfulness"]["aopc_sum"] < rb
        assert ("below_random" in [f["flag"] for f in m["flags"]]) == expect
    flagged = [bool(data["methods"][n]["flags"]) for n in data["ranking"]]
    assert flagged == sorted(flagged)
    html = res.report(tmp_path / "r.html")
    assert "flags" in html and f"randomization ρ above {RANDOMIZATION_MAX}" in html
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html and html.startswith("<!DOCTYPE html>")
    inline = res._repr_html_()  # a notebook's inline view: the same report without the page around it
    assert not inline.startswith("<!DOCTYPE") and f"randomization ρ above {RANDOMIZATION_MAX}" in inline


@pytest.mark.parametrize("value", [None])
def test_no_reference_no_below_random(value):
    assert flags_for(attr("a", -5.0), value) == []
