"""Findings in plain language: each states its number, the threshold it crossed and the evidence cases."""

from __future__ import annotations


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if x is not None else "n/a"


def findings(result) -> list[dict]:
    from .engine import THRESHOLDS

    out: list[dict] = []
    cases = result.cases
    n = len(cases)
    for inv in result.invariance:
        if not inv["n_cases"]:
            out.append(
                {
                    "kind": "invariance",
                    "severity": "info",
                    "text": f"the swap list '{inv['swap']}' matched none of the {n} cases; nothing was tested",
                    "value": 0,
                    "evidence": [],
                }
            )
            continue
        rate = inv["flip_rate"]
        if rate > THRESHOLDS["flip_rate"]:
            top = inv["by_pair"][0] if inv["by_pair"] else None
            text = (
                f"swapping {inv['swap']} words flips {_pct(rate)} of decisions "
                f"({inv['flips']} of {inv['n_cases']} cases where the list applies)"
            )
            if top and top["flips"]:
                text += f"; the most frequent pair in flipped cases is {top['pair']} ({top['flips']} flips)"
            if inv["mass_on_flipped"] is not None:
                text += (
                    f"; on the flipped cases {_pct(inv['mass_on_flipped'])} of the attribution sits on the "
                    "swapped words"
                )
            out.append(
                {
                    "kind": "invariance",
                    "severity": "high" if rate > 2 * THRESHOLDS["flip_rate"] else "medium",
                    "text": text,
                    "value": rate,
                    "threshold": THRESHOLDS["flip_rate"],
                    "evidence": inv["flipped_ids"][:20],
                }
            )
        else:
            out.append(
                {
                    "kind": "invariance",
                    "severity": "ok",
                    "text": (
                        f"swapping {inv['swap']} words flips {_pct(rate)} of decisions ({inv['flips']} of "
                        f"{inv['n_cases']}); mean probability shift {inv['mean_abs_shift']:.3f}, max "
                        f"{inv['max_abs_shift']:.3f}"
                    ),
                    "value": rate,
                    "threshold": THRESHOLDS["flip_rate"],
                    "evidence": [w["id"] for w in inv["worst"][:5]],
                }
            )
    m = result.metrics
    by_group = m.get("by_group", {})
    if len(by_group) > 1:
        for key, what in (
            ("demographic_parity_difference", "selection rate"),
            ("equalized_odds_difference", "true/false positive rate"),
            ("accuracy_difference", "accuracy"),
        ):
            value = m.get(key)
            if value is None:
                continue
            metric = {
                "demographic_parity_difference": "selection_rate",
                "equalized_odds_difference": None,
                "accuracy_difference": "accuracy",
            }[key]
            detail = ""
            evidence: list = []
            if metric:
                vals = {g: v[metric] for g, v in by_group.items() if v.get(metric) is not None}
                ranked = sorted(vals, key=lambda g: (vals[g], g))
                lo, hi = ranked[0], ranked[-1]
                detail = f" ({hi}: {vals[hi]:.3f}, {lo}: {vals[lo]:.3f})"
                if metric == "selection_rate":  # the low group's cases that were not selected
                    evidence = [
                        c["id"] for c in result.cases if c["group"] == lo and c["prediction"] != m["positive"]
                    ][:20]
                else:
                    evidence = [c["id"] for c in result.cases if c["group"] == lo and not c["correct"]][:20]
            high = value > THRESHOLDS[key]
            out.append(
                {
                    "kind": "groups",
                    "severity": "high"
                    if high and value > 2 * THRESHOLDS[key]
                    else "medium"
                    if high
                    else "ok",
                    "text": f"the {what} differs by {value:.3f} between groups{detail}"
                    + (f" — above the {THRESHOLDS[key]} threshold" if high else ""),
                    "value": value,
                    "threshold": THRESHOLDS[key],
                    "evidence": evidence if high else [],
                }
            )
    cal = result.calibration.get("overall") if result.calibration else None
    if cal and cal["ece"] is not None:
        high = cal["ece"] > THRESHOLDS["ece"]
        text = f"expected calibration error {cal['ece']:.3f} over {cal['n']} cases"
        worst_group = None
        for g, c in (result.calibration.get("by_group") or {}).items():
            if c["ece"] is not None and (worst_group is None or c["ece"] > worst_group[1]):
                worst_group = (g, c["ece"])
        if worst_group:
            text += f"; worst group {worst_group[0]} ({worst_group[1]:.3f})"
        wrong_sure = sorted(
            (c for c in cases if c["correct"] == 0), key=lambda c: -max(c["probabilities"].values())
        )
        out.append(
            {
                "kind": "calibration",
                "severity": "medium" if high else "ok",
                "text": text + (" — the stated probabilities are not reliable" if high else ""),
                "value": cal["ece"],
                "threshold": THRESHOLDS["ece"],
                "evidence": [c["id"] for c in wrong_sure[:10]],
            }
        )
    explained = [c for c in cases if c.get("explanation")]
    if explained:
        flagged = [c["id"] for c in explained if c["explanation"]["all_flagged"]]
        share = len(flagged) / len(explained)
        used: dict = {}
        for c in explained:
            used[c["explanation"]["method"]] = used.get(c["explanation"]["method"], 0) + 1
        methods = ", ".join(f"{k} {v}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
        out.append(
            {
                "kind": "explanations",
                "severity": "medium" if share > THRESHOLDS["all_flagged_share"] else "ok",
                "text": f"every explanation method failed a faithfulness check on {_pct(share)} of cases "
                f"({len(flagged)} of {len(explained)}); the most faithful method per case: {methods}",
                "value": share,
                "threshold": THRESHOLDS["all_flagged_share"],
                "evidence": flagged[:20],
            }
        )
    order = {"high": 0, "medium": 1, "info": 2, "ok": 3}
    out.sort(key=lambda f: order[f["severity"]])
    return out
