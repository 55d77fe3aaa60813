"""Group metrics (fairlearn) and calibration (expected calibration error, reliability curve).

fairlearn computes the per-group table and the disparity numbers; nothing here re-implements them.
Binary rates (selection rate, TPR, FPR) are about one ``positive`` class (one-vs-rest for more classes).
Calibration is on the top-class confidence: ``bins`` equal-width bins over [0, 1] (a confidence of 1.0
falls in the last bin); ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b|.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import LmscopeError


def _require_fairlearn():
    try:
        import fairlearn.metrics as fm
    except ImportError:
        raise LmscopeError(
            "group metrics need fairlearn, which is not installed", "pip install 'lmscope[audit]'"
        ) from None
    return fm


def _num(x):
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def group_metrics(y_true, y_pred, groups, positive: str) -> dict:
    """Per group and overall: count, accuracy, selection rate, TPR, FPR (labels needed for all but
    count and selection rate); demographic parity and equalized odds differences (fairlearn)."""
    fm = _require_fairlearn()
    from sklearn.metrics import accuracy_score

    y_pred = np.asarray(y_pred, dtype=object)
    pred_pos = (y_pred == positive).astype(int)
    has_labels = y_true is not None
    if has_labels:
        y_true = np.asarray(y_true, dtype=object)
        true_pos = (y_true == positive).astype(int)
    else:
        true_pos = pred_pos  # unused by selection_rate; fairlearn wants a y_true of the right length
    groups = np.asarray(groups if groups is not None else ["all"] * len(y_pred), dtype=object)

    metrics = {"count": fm.count, "selection_rate": fm.selection_rate}
    if has_labels:
        metrics.update(true_positive_rate=fm.true_positive_rate, false_positive_rate=fm.false_positive_rate)
    frame = fm.MetricFrame(metrics=metrics, y_true=true_pos, y_pred=pred_pos, sensitive_features=groups)
    by_group = {}
    for g, row in frame.by_group.iterrows():
        by_group[str(g)] = {k: _num(v) for k, v in row.items()}
    overall = {k: _num(v) for k, v in frame.overall.items()}
    if has_labels:  # accuracy on the full labels (all classes), per group
        acc = fm.MetricFrame(
            metrics=accuracy_score, y_true=list(y_true), y_pred=list(y_pred), sensitive_features=groups
        )
        for g, v in acc.by_group.items():
            by_group[str(g)]["accuracy"] = _num(v)
        overall["accuracy"] = _num(acc.overall)
    out = {"positive": positive, "overall": overall, "by_group": by_group}
    out["demographic_parity_difference"] = _num(
        fm.demographic_parity_difference(true_pos, pred_pos, sensitive_features=groups)
    )
    out["demographic_parity_ratio"] = _num(
        fm.demographic_parity_ratio(true_pos, pred_pos, sensitive_features=groups)
    )
    if has_labels:
        out["equalized_odds_difference"] = _num(
            fm.equalized_odds_difference(true_pos, pred_pos, sensitive_features=groups)
        )
        accs = [v["accuracy"] for v in by_group.values() if v.get("accuracy") is not None]
        out["accuracy_difference"] = (max(accs) - min(accs)) if accs else None
    return out


def calibration(confidence, correct, bins: int = 10) -> dict:
    """ECE and the reliability curve of top-class ``confidence`` against ``correct`` (0/1)."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        return {"ece": None, "bins": [], "n": 0}
    which = np.minimum((conf * bins).astype(int), bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        k = int(sel.sum())
        if not k:
            continue
        acc, mean_conf = float(hit[sel].mean()), float(conf[sel].mean())
        ece += k / n * abs(acc - mean_conf)
        curve.append(
            {"lo": b / bins, "hi": (b + 1) / bins, "count": k, "confidence": mean_conf, "accuracy": acc}
        )
    return {"ece": ece, "bins": curve, "n": n}


def calibration_by_group(confidence, correct, groups, bins: int = 10) -> dict:
    conf, hit = np.asarray(confidence), np.asarray(correct)
    groups = np.asarray(groups, dtype=object)
    return {
        str(g): calibration(conf[groups == g], hit[groups == g], bins) for g in sorted(set(groups.tolist()))
    }


def confusion(y_true, y_pred, classes: list[str]) -> list[list[int]]:
    """counts[i][j]: cases labelled ``classes[i]`` predicted ``classes[j]``."""
    index = {c: i for i, c in enumerate(classes)}
    m = [[0] * len(classes) for _ in classes]
    for t, p in zip(y_true, y_pred):
        m[index[t]][index[p]] += 1
    return m
