"""The audit report: summary, findings, confusion matrix, group table, calibration, invariance, and a
drill-down of the worst cases with the original and each counterfactual shaded by attribution."""

from __future__ import annotations

from .html import Report


def _r(x, d=3):
    return None if x is None else round(float(x), d)


def audit_report(result, drill: int = 12):
    d = result.decider
    data = result.data
    subtitle = (
        f"{data['n_cases']} cases from {data['path']} · "
        + (
            f"classifier ({', '.join(d['classes'])})"
            if d["kind"] == "classifier"
            else f"causal LM choosing {' / '.join(repr(c) for c in d['classes'])} after the prompt {d['prompt']!r}"
        )
        + f" · positive class {d['positive']!r} · {result.seconds:.1f} s"
    )
    rep = Report(f"lmscope audit: {result.model}", subtitle)

    sec = rep.section(
        "Findings",
        "each finding states its number, the threshold it is compared with, and the cases that show it "
        "(ids as in the data); thresholds are in audit.json",
    )
    rows = [
        [f["severity"], f["kind"], f["text"], ", ".join(map(str, f.get("evidence", [])[:10])) or "—"]
        for f in result.findings
    ]
    sec.table(["severity", "kind", "finding", "evidence (case ids)"], rows)

    sec = rep.section("Dataset summary")
    summary = [["cases", data["n_cases"]]]
    for k, v in (data.get("label_counts") or {}).items():
        summary.append([f"label {k}", v])
    for k, v in (data.get("group_counts") or {}).items():
        summary.append([f"group {k}", v])
    pred_counts: dict = {}
    for c in result.cases:
        pred_counts[c["prediction"]] = pred_counts.get(c["prediction"], 0) + 1
    for k, v in sorted(pred_counts.items()):
        summary.append([f"predicted {k}", v])
    sec.table(["", "count"], summary)

    if result.confusion:
        classes = [c.strip() for c in result.confusion["classes"]]
        counts = result.confusion["counts"]
        sec = rep.section("Confusion matrix", "rows: the label in the data; columns: the model's decision")
        sec.heatmap(
            counts,
            x_labels=classes,
            y_labels=classes,
            x_title="predicted",
            y_title="label",
            cell_text=[[str(v) for v in row] for row in counts],
        )

    m = result.metrics
    sec = rep.section(
        "Group metrics (fairlearn)",
        f"selection rate, TPR and FPR are about the positive class {m['positive']!r}; demographic parity "
        "difference = max − min selection rate over groups; equalized odds difference = the larger of the TPR "
        "and FPR gaps",
    )
    cols = ["group", "count", "accuracy", "selection rate", "TPR", "FPR", "ECE"]
    cal_groups = (result.calibration or {}).get("by_group", {})
    rows = []
    for g, v in list(m["by_group"].items()) + [("overall", m["overall"])]:
        ece = (result.calibration or {}).get("overall", {}) if g == "overall" else cal_groups.get(g, {})
        rows.append(
            [
                g,
                v.get("count"),
                _r(v.get("accuracy")),
                _r(v.get("selection_rate")),
                _r(v.get("true_positive_rate")),
                _r(v.get("false_positive_rate")),
                _r(ece.get("ece")) if ece else None,
            ]
        )
    sec.table(cols, rows)
    gaps = [
        ["demographic parity difference", _r(m.get("demographic_parity_difference"))],
        ["demographic parity ratio", _r(m.get("demographic_parity_ratio"))],
    ]
    if "equalized_odds_difference" in m:
        gaps += [
            ["equalized odds difference", _r(m.get("equalized_odds_difference"))],
            ["accuracy difference", _r(m.get("accuracy_difference"))],
        ]
    sec.table(["disparity", "value"], gaps)

    if result.calibration:
        sec = rep.section(
            "Calibration",
            "reliability curve: in each confidence bin, the mean top-class probability (x) against the share of "
            "correct decisions (y); on the diagonal the probabilities mean what they say. ECE = Σ (bin share) · "
            "|accuracy − confidence|",
        )
        series = [{"name": "perfect", "x": [0, 1], "y": [0, 1]}]
        curves = [("overall", result.calibration["overall"])] + list(cal_groups.items())
        for name, c in curves:
            if c["bins"]:
                series.append(
                    {
                        "name": f"{name} (ECE {c['ece']:.3f})",
                        "x": [b["confidence"] for b in c["bins"]],
                        "y": [b["accuracy"] for b in c["bins"]],
                    }
                )
        sec.lines(series, x_title="confidence", y_title="accuracy")

    if result.invariance:
        sec = rep.section(
            "Counterfactual invariance (CheckList INV)",
            "each swap list changes only a protected attribute; the decision should not change. Shift: change of "
            "the probability of the original decision. Attribution on swapped words: share of the absolute "
            "attribution over the case text (not the prompt template or special tokens) that sits on the swapped "
            "words, in the original and in the counterfactual",
        )
        rows = []
        for inv in result.invariance:
            rows.append(
                [
                    inv["swap"],
                    "all pairs",
                    inv["n_cases"],
                    inv["flips"],
                    _r(inv["flip_rate"]),
                    _r(inv["mean_abs_shift"]),
                    _r(inv["max_abs_shift"]),
                    _r(inv["mass_original"]),
                    _r(inv["mass_counterfactual"]),
                ]
            )
            for p in inv["by_pair"]:
                rows.append(
                    [
                        inv["swap"],
                        p["pair"],
                        p["n_cases"],
                        p["flips"],
                        _r(p["flip_rate"]),
                        _r(p["mean_abs_shift"]),
                        _r(p["max_abs_shift"]),
                        _r(p["mass_original"]),
                        _r(p["mass_counterfactual"]),
                    ]
                )
        sec.table(
            [
                "swap list",
                "pair",
                "cases",
                "flips",
                "flip rate",
                "mean |shift|",
                "max |shift|",
                "attribution on swapped (original)",
                "(counterfactual)",
            ],
            rows,
        )

    _drilldown(rep, result, drill)
    return rep


def _pick_cases(result, n: int) -> list[dict]:
    """The worst counterfactual cases first, then evidence of the findings, then the least confident."""
    by_id = {c["id"]: c for c in result.cases}
    picked: list[str] = []
    for inv in result.invariance:
        picked += [w["id"] for w in inv["worst"]]
    for f in result.findings:
        picked += [e for e in f.get("evidence", [])[:3]]
    picked += [c["id"] for c in sorted(result.cases, key=lambda c: max(c["probabilities"].values()))]
    return [by_id[i] for i in dict.fromkeys(picked) if i in by_id][:n]


def _units_widget(sec, explanation: dict, label: str) -> None:
    units = explanation["units"]
    tokens = [f"[{u['text']}]" if u.get("swapped") else u["text"] for u in units]
    excluded = [u["span"] is None for u in units]
    flags = "; ".join(f["flag"] for f in explanation["flags"]) or "no flags"
    aopc = explanation["faithfulness"].get("aopc_sum")
    sec.tokens(
        tokens,
        [u["score"] for u in units],
        label=f"{label} · {explanation['method']} (AOPC sum {aopc}, {flags}) · {explanation['target']}",
        excluded=excluded,
    )


def _drilldown(rep, result, n: int) -> None:
    cases = _pick_cases(result, n)
    if not cases:
        return
    sec = rep.section(
        "Case drill-down",
        "the original and each counterfactual, words shaded by the attribution of the decision margin "
        "(blue: towards the original decision, red: against it; the counterfactual is explained on the same margin) from the most faithful unflagged method for that case; swapped "
        "words in [brackets]; grey: tokens outside the case text (special tokens, the prompt template)",
    )
    for c in cases:
        probs = ", ".join(f"{k.strip()} {v:.3f}" for k, v in c["probabilities"].items())
        head = f"case {c['id']}: decision {c['prediction'].strip()!r} ({probs})"
        if c.get("label") is not None:
            head += f"; label {c['label'].strip()!r}"
        if c.get("group") is not None:
            head += f"; group {c['group']}"
        sec.text(head)
        if c.get("explanation"):
            _units_widget(sec, c["explanation"], "original")
        else:
            sec.text(c["text"])
        for cf in c["counterfactuals"]:
            cprobs = ", ".join(f"{k.strip()} {v:.3f}" for k, v in cf["probabilities"].items())
            line = (
                f"{cf['swap']} ({', '.join(cf['pairs'])}): decision {cf['prediction'].strip()!r} ({cprobs})"
                + (" — FLIPPED" if cf["flipped"] else "")
                + f"; shift {cf['probability_shift']:+.3f}"
            )
            if cf.get("explanation"):
                _units_widget(sec, cf["explanation"], line)
            else:
                sec.text(line + ": " + cf["text"])
