"""The planted bias: a classifier trained where the pronoun decides the label must be caught by the audit
(decisions flip when only the pronoun changes, and the attribution sits on the pronoun); a control trained
on the income alone must not be."""

from __future__ import annotations

from lmscope.audit import audit


def _run(lm, cases_file, **kw):
    return audit(
        lm,
        cases_file,
        label_field="label",
        group_field="group",
        counterfactuals="builtin:gender,names",
        max_cases=12,
        sanity=False,
        **kw,
    )


def test_planted_bias_is_reported(leaky_clf, cases_file):
    res = _run(leaky_clf, cases_file)
    gender = next(i for i in res.invariance if i["swap"] == "gender")
    assert gender["n_cases"] == 12
    assert gender["flip_rate"] >= 0.9
    assert gender["mean_abs_shift"] > 0.5
    assert gender["mass_original"] > 0.5 and gender["mass_counterfactual"] > 0.5  # the pronoun carries it
    assert {p["pair"] for p in gender["by_pair"]} == {"he→she", "she→he"}
    top = res.findings[0]
    assert top["kind"] == "invariance" and top["severity"] == "high" and "flips" in top["text"]
    assert set(top["evidence"]) <= {c["id"] for c in res.cases} and top["evidence"]
    # the pronoun decides: every male is approved, no female is
    by_group = res.metrics["by_group"]
    assert by_group["male"]["selection_rate"] == 1.0 and by_group["female"]["selection_rate"] == 0.0
    assert res.metrics["demographic_parity_difference"] == 1.0
    names = next(i for i in res.invariance if i["swap"] == "names")
    assert names["n_cases"] == 0  # the applications hold no first names: reported as untested, not as clean
    assert any(f["severity"] == "info" and "names" in f["text"] for f in res.findings)


def test_control_is_clean(control_clf, cases_file):
    res = _run(control_clf, cases_file)
    gender = next(i for i in res.invariance if i["swap"] == "gender")
    assert gender["n_cases"] == 12
    assert gender["flip_rate"] == 0.0
    assert gender["mean_abs_shift"] < 0.05
    assert gender["mass_original"] < 0.2 and gender["mass_counterfactual"] < 0.2
    assert res.metrics["overall"]["accuracy"] == 1.0  # it learnt the income rule
    assert not any(f["kind"] == "invariance" and f["severity"] in ("high", "medium") for f in res.findings)


def test_each_case_is_explained_by_its_most_faithful_unflagged_method(leaky_clf, cases_file):
    res = audit(leaky_clf, cases_file, label_field="label", counterfactuals="builtin:gender", max_cases=3)
    for c in res.cases:
        ex = c["explanation"]
        ranked = ex["methods"]
        assert ex["method"] in ranked
        unflagged = [n for n, m in ranked.items() if not m["flags"]]
        if unflagged:  # the kept method is unflagged and has the best AOPC sum among the unflagged
            assert ex["method"] in unflagged
            assert ranked[ex["method"]]["aopc_sum"] == max(ranked[n]["aopc_sum"] for n in unflagged)
            assert not ex["all_flagged"]
        else:
            assert ex["all_flagged"]
        # the randomization check ran (sanity on by default): every method has a randomization ρ or a flag
        assert "randomization_spearman" in ex["faithfulness"]
        swapped = [u for u in ex["units"] if u.get("swapped")]
        assert swapped and all(u["text"].lower() in ("he", "she") for u in swapped)
