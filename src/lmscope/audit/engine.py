"""``audit``: run a model over a dataset of cases; decisions, their explanations, counterfactual invariance,
group metrics, calibration and findings. Cases are streamed in batches; per case only small numbers and the
merged word attributions are kept.

from lmscope.audit import audit
res = audit(lm, "cases.jsonl", text_field="text", label_field="label", group_field="group",
            counterfactuals="builtin:gender,names")
res.write("audit/")        # audit.json, cases.csv, report.html (atomically)
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import progress as _progress
from ..errors import LmscopeError
from ..explain.api import explain_objective, resolve_methods
from ..views.html import Reportable
from .counterfactuals import Swap, load_swaps
from .data import Case, Cases
from .decider import Decider, make_decider
from .words import mass_on, merge_words, token_units

#: what each case is explained with: the fast methods (one gradient, one batch of occlusions)
AUDIT_METHODS = ("saliency", "input_x_gradient", "occlusion")
GRANULARITIES = ("word", "token")

#: thresholds above which a number becomes a finding (stated in the report and in audit.json)
THRESHOLDS = {
    "flip_rate": 0.05,  # CheckList INV: more than 5% of decisions change when only the attribute changes
    "demographic_parity_difference": 0.1,
    "equalized_odds_difference": 0.1,
    "accuracy_difference": 0.05,
    "ece": 0.1,
    "all_flagged_share": 0.2,  # share of cases where every explanation method failed a check
}


def _round(x, d=4):
    return None if x is None else round(float(x), d)


@dataclass
class AuditResult(Reportable):
    model: str
    data: dict
    decider: dict
    cases: list[dict]
    metrics: dict
    calibration: dict
    invariance: list[dict]
    findings: list[dict]
    confusion: dict | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "decider": self.decider,
            "settings": self.settings,
            "thresholds": THRESHOLDS,
            "seconds": round(self.seconds, 3),
            "findings": self.findings,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "confusion": self.confusion,
            "invariance": self.invariance,
            "cases": self.cases,
        }

    def build_report(self):
        from ..views.audit import audit_report

        return audit_report(self)

    def write_cases_csv(self, path) -> None:
        """One row per case and per counterfactual (spreadsheets)."""
        classes = self.decider["classes"]
        cols = ["case_id", "variant", "changes", "text", "label", "group", "prediction", "confidence"]
        cols += [f"p[{c.strip()}]" for c in classes]
        cols += [
            "correct",
            "flipped",
            "probability_shift",
            "attribution_on_swapped",
            "method",
            "aopc_sum",
            "flags",
        ]
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for c in self.cases:
                w.writerow(_csv_row(c, c, "original", classes))
                for cf in c.get("counterfactuals", []):
                    w.writerow(_csv_row(c, cf, cf["swap"], classes))

    def write(self, out, report: bool = True) -> str:
        """audit.json, cases.csv and (``report``) report.html in ``out``, all or nothing."""
        from ..fsutil import atomic_directory

        with atomic_directory(out) as tmp:
            with open(Path(tmp) / "audit.json", "w", encoding="utf-8") as f:
                json.dump(_finite(self.to_json()), f, indent=1, allow_nan=False)
            self.write_cases_csv(Path(tmp) / "cases.csv")
            if report:
                self.report(Path(tmp) / "report.html")
        return str(out)


def _finite(x):
    from ..explain.api import _finite as finite

    return finite(x)


def _csv_row(case: dict, v: dict, variant: str, classes: list[str]) -> list:
    ex = v.get("explanation") or {}
    return [
        case["id"],
        variant,
        "; ".join(v.get("pairs", [])) if variant != "original" else "",
        v["text"],
        case.get("label"),
        case.get("group"),
        v["prediction"],
        _round(max(v["probabilities"].values())),
        *[_round(v["probabilities"][c]) for c in classes],
        case.get("correct") if variant == "original" else None,
        v.get("flipped") if variant != "original" else None,
        _round(v.get("probability_shift")) if variant != "original" else None,
        _round(v.get("mass_counterfactual") if variant != "original" else case.get("mass_on_swappable")),
        ex.get("method"),
        _round((ex.get("faithfulness") or {}).get("aopc_sum")),
        "; ".join(f["flag"] for f in ex.get("flags", [])),
    ]


def _clip(span, start: int, length: int):
    """A token's span in the prompt -> its span in the case text (clipped: " He" after "Application:" starts
    at the space, which belongs to the template); None for tokens wholly outside the text."""
    if span is None:
        return None
    s, e = max(span[0], start) - start, min(span[1], start + length) - start
    return (s, e) if e > s else None


def explain_decision(
    decider: Decider,
    text: str,
    target: int,
    contrast: int,
    methods,
    granularity: str,
    sanity: bool,
    seed: int = 0,
) -> tuple[dict, list, list, list]:
    """The most faithful unflagged method's attribution of ``target`` over ``contrast`` on ``text``.
    Returns (summary, token scores, token spans in the case text, special mask)."""
    objective, enc = decider.objective(text, target, contrast)
    ex = explain_objective(objective, methods, sanity=sanity, seed=seed)
    if not ex.ranking:
        raise LmscopeError(
            "no attribution method gave per-token scores on this model",
            f"use --methods {','.join(AUDIT_METHODS)}",
        )
    best = ex.ranking[0]  # rank_methods puts every flagged method after the unflagged ones
    att = ex.methods[best]
    tokens = objective.tokens
    # spans relative to the case's own text (tokens of the prompt template fall outside it)
    spans = [_clip(sp, enc.text_start, len(text)) for sp in enc.spans]
    special = list(objective.special)
    if granularity == "word":
        units = merge_words(tokens, att.scores, spans, text)
        outside = [u for u in units if u["span"] is None]
        for u in outside:  # template and special tokens: shown, marked as not the case's text
            u["outside"] = True
    else:
        units = token_units(tokens, att.scores, spans)
    fa = att.faithfulness or {}
    summary = {
        "method": best,
        "target": objective.target.describe(),
        "value": _round(objective.f_x),
        "faithfulness": {
            k: _round(v) for k, v in fa.items() if k != "curves" and isinstance(v, (int, float))
        },
        "flags": att.flags,
        "all_flagged": all(bool(ex.methods[n].flags) for n in ex.ranking),
        "methods": {
            n: {
                "aopc_sum": _round((ex.methods[n].faithfulness or {}).get("aopc_sum")),
                "flags": [f["flag"] for f in ex.methods[n].flags],
            }
            for n in ex.ranking
        },
        "random_aopc_sum": _round((ex.random_baseline or {}).get("aopc_sum")),
        "units": [{"text": u["text"], "score": _round(u["score"], 5), "span": u["span"]} for u in units],
    }
    return summary, att.scores, spans, special


def audit(
    lm,
    data,
    text_field: str = "text",
    label_field: str | None = None,
    group_field: str | None = None,
    id_field: str | None = None,
    prompt: str | None = None,
    choices=None,
    counterfactuals=None,
    positive: str | None = None,
    explain: bool = True,
    methods=None,
    granularity: str = "word",
    sanity: bool = True,
    max_cases: int | None = None,
    batch_size: int = 16,
    bins: int = 10,
    worst: int = 10,
    truncate: bool = False,
    seed: int = 0,
    progress=None,
    checkpoint=None,
    resume: bool = False,
    ray: str | None = None,
    workers: int = 2,
) -> AuditResult:
    """Audit ``lm``'s decisions on the cases in ``data`` (JSONL, CSV or Parquet).

    prompt/choices: use a causal LM as a classifier. counterfactuals: ``"builtin:gender,names"`` and/or
    swap files. positive: the class whose rate is the "selection rate" (default: the second class of a
    classifier with two, else the first choice/class). explain: attribute each decision (and each
    counterfactual's) with ``methods``, picking the most faithful unflagged one per case.
    """
    t0 = time.perf_counter()
    methods = AUDIT_METHODS if methods is None else methods
    if granularity not in GRANULARITIES:
        raise LmscopeError(f"unknown --granularity '{granularity}'", "use word or token")
    if max_cases is not None and max_cases < 1:
        raise LmscopeError("--max-cases must be positive", "e.g. --max-cases 500")
    if batch_size < 1:
        raise LmscopeError("--batch-size must be positive", "e.g. --batch-size 16")
    if explain:
        resolve_methods(methods)
    cases_in = (
        data if isinstance(data, Cases) else Cases(data, text_field, label_field, group_field, id_field)
    )
    swaps: list[Swap] = load_swaps(counterfactuals) if counterfactuals else []
    decider = make_decider(lm, prompt, choices, batch_size, truncate)
    classes = decider.classes
    pos = _positive_index(decider, positive)

    identity = {
        "model": lm.name,
        "data": cases_in.fingerprint(),
        "fields": cases_in.fields,
        "decider": {"kind": decider.kind, "classes": classes, "prompt": prompt},
        "counterfactuals": [
            s.summary() | {"words": s.words, "rules": [[r.pattern, t] for r, t in s.rules]} for s in swaps
        ],
        "explain": explain,
        "methods": list(resolve_methods(methods)) if explain else [],
        "granularity": granularity,
        "sanity": sanity,
        "seed": seed,
        "max_cases": max_cases,
    }
    ckpt = _Checkpoint(checkpoint, identity, resume) if checkpoint is not None else None
    records: list[dict] = ckpt.records if ckpt else []
    stream = cases_in.cases()
    for _ in range(len(records)):  # resumed: these cases are done
        next(stream)
    done = resumed = len(records)
    total = cases_in.count()
    total = min(total, max_cases) if (total is not None and max_cases) else total or max_cases

    def batches():
        taken = done
        while not (max_cases and taken >= max_cases):
            batch: list[Case] = []
            for case in stream:
                batch.append(case)
                if len(batch) >= batch_size or (max_cases and taken + len(batch) >= max_cases):
                    break
            if not batch:
                return
            taken += len(batch)
            yield batch

    settings = dict(
        swaps=swaps, explain=explain, methods=methods, granularity=granularity, sanity=sanity, seed=seed
    )
    if ray:
        from .distributed import run_on_ray

        decider_args = dict(prompt=prompt, choices=choices, batch_size=batch_size, truncate=truncate)
        results = run_on_ray(lm, batches(), decider_args, settings, ray, workers)
    else:
        results = ((b, _audit_batch(decider, b, **settings)) for b in batches())
    with _progress.bar(total or 0, "audit", unit="case") as bar:
        for batch, new in results:
            if ckpt:
                new = ckpt.add(new)
            records += new
            done += len(batch)
            bar.update(len(batch))
            if progress:
                progress(done, total, (done - resumed) / max(time.perf_counter() - t0, 1e-9))

    labelled = label_field is not None
    y_pred = [r["prediction"] for r in records]
    y_true = [r["label"] for r in records] if labelled else None
    groups = [r["group"] for r in records] if group_field else None
    from .metrics import calibration, calibration_by_group, confusion, group_metrics

    metrics = group_metrics(y_true, y_pred, groups, classes[pos])
    calib = {}
    if labelled:
        conf = [max(r["probabilities"].values()) for r in records]
        hit = [r["correct"] for r in records]
        calib = {"overall": calibration(conf, hit, bins)}
        if groups:
            calib["by_group"] = calibration_by_group(conf, hit, groups, bins)
    conf_matrix = {"classes": classes, "counts": confusion(y_true, y_pred, classes)} if labelled else None
    invariance = _invariance(records, swaps, worst)
    result = AuditResult(
        model=lm.name,
        data={
            "path": str(cases_in.path),
            "fingerprint": cases_in.fingerprint(),
            "n_cases": len(records),
            "fields": {k: v for k, v in cases_in.fields.items() if v},
            "label_counts": _counts(y_true) if labelled else None,
            "group_counts": _counts(groups) if groups else None,
        },
        decider={
            "kind": decider.kind,
            "classes": classes,
            "positive": classes[pos],
            **({"prompt": decider.prompt} if decider.kind == "choices" else {}),
        },
        cases=records,
        metrics=metrics,
        calibration=calib,
        invariance=invariance,
        findings=[],
        confusion=conf_matrix,
        settings={
            "counterfactuals": [s.summary() for s in swaps],
            "explain": explain,
            "methods": list(resolve_methods(methods)) if explain else [],
            "granularity": granularity,
            "sanity_check": sanity,
            "bins": bins,
            "seed": seed,
        },
    )
    from .findings import findings

    result.findings = findings(result)
    result.seconds = time.perf_counter() - t0
    return result


class _Checkpoint:
    """Finished cases, one JSON line each, in ``folder/records.jsonl``; ``folder/state.json`` holds what
    the run was (data fingerprint and settings), so a resume with other data or settings is refused."""

    def __init__(self, folder, identity: dict, resume: bool):
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))
        self.records: list[dict] = []
        state = self.folder / "state.json"
        if resume and state.is_file():
            saved = json.loads(state.read_text())
            if saved != self.identity:
                differs = sorted(k for k in self.identity if saved.get(k) != self.identity[k])
                raise LmscopeError(
                    f"cannot resume: the interrupted audit used another {', '.join(differs)}",
                    "rerun without --resume, or with the same data and options",
                )
            with open(self.folder / "records.jsonl", encoding="utf-8") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break  # a line cut by the kill: that batch is redone
                    self.records.append(json.loads(line))
            self._rewrite()
            return
        if self.folder.exists():
            import shutil

            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        state.write_text(json.dumps(self.identity))
        (self.folder / "records.jsonl").write_text("")

    def _rewrite(self) -> None:
        with open(self.folder / "records.jsonl", "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def add(self, records: list[dict]) -> list[dict]:
        """Append a batch durably; returns the records as a resumed run reads them (JSON round trip), so
        a resumed and an uninterrupted run compute their metrics from identical values."""
        import os

        lines = [json.dumps(r) for r in records]
        with open(self.folder / "records.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        return [json.loads(line) for line in lines]

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _positive_index(decider: Decider, positive) -> int:
    if positive is None:
        return 1 if decider.kind == "classifier" and len(decider.classes) == 2 else 0
    return decider.class_index(str(positive), "--positive")


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _audit_batch(decider, batch, swaps, explain, methods, granularity, sanity, seed=0) -> list[dict]:
    classes = decider.classes
    labels = [
        decider.classes[decider.class_index(c.label, c.where)] if c.label is not None else None for c in batch
    ]
    cf_texts, cf_where = [], []
    for b, case in enumerate(batch):
        for s in swaps:
            new, changes = s.apply(case.text)
            if changes and new != case.text:
                cf_texts.append(new)
                cf_where.append((b, s, changes))
    probs = decider.probabilities([c.text for c in batch] + cf_texts)  # [B + K, C]
    out = []
    for b, case in enumerate(batch):
        p = probs[b]
        order = torch.argsort(p, descending=True).tolist()
        pred, runner = order[0], order[1]
        rec = {
            "id": case.id,
            "text": case.text,
            "label": labels[b],
            "group": case.group,
            "prediction": classes[pred],
            "probabilities": {c: _round(float(p[i]), 6) for i, c in enumerate(classes)},
            "correct": None if labels[b] is None else int(labels[b] == classes[pred]),
            "counterfactuals": [],
        }
        scores = spans = special = None
        if explain:
            rec["explanation"], scores, spans, special = explain_decision(
                decider, case.text, pred, runner, methods, granularity, sanity, seed
            )
        all_swapped = []
        for k, (cb, swap, changes) in enumerate(cf_where):
            if cb != b:
                continue
            q = probs[len(batch) + k]
            cf_pred = int(q.argmax())
            cf = {
                "swap": swap.name,
                "text": cf_texts[k],
                "pairs": sorted({c.pair for c in changes}),
                "changes": [
                    {"old": c.old, "new": c.new, "old_span": c.old_span, "new_span": c.new_span}
                    for c in changes
                ],
                "prediction": classes[cf_pred],
                "probabilities": {c: _round(float(q[i]), 6) for i, c in enumerate(classes)},
                "flipped": cf_pred != pred,
                # change in the probability of the original decision (negative: the model is less sure)
                "probability_shift": _round(float(q[pred] - p[pred]), 6),
            }
            old_spans = [c.old_span for c in changes]
            all_swapped += old_spans
            if explain:
                cf["mass_original"] = _round(mass_on(scores, spans, old_spans, special))
                # the same decision margin (original prediction vs runner-up) on the counterfactual text
                cf["explanation"], s2, sp2, spec2 = explain_decision(
                    decider, cf_texts[k], pred, runner, methods, granularity, sanity, seed
                )
                cf["mass_counterfactual"] = _round(mass_on(s2, sp2, [c.new_span for c in changes], spec2))
                _mark_units(cf["explanation"]["units"], [c.new_span for c in changes])
            rec["counterfactuals"].append(cf)
        if explain:
            _mark_units(rec["explanation"]["units"], all_swapped)
            rec["mass_on_swappable"] = (
                _round(mass_on(scores, spans, all_swapped, special)) if all_swapped else None
            )
        out.append(rec)
    return out


def _mark_units(units: list[dict], spans: list) -> None:
    for u in units:
        if u.get("span") and any(u["span"][0] < e and s < u["span"][1] for s, e in spans):
            u["swapped"] = True


def _invariance(records: list[dict], swaps: list[Swap], worst: int) -> list[dict]:
    """Per swap list (and per word pair within it): cases it applies to, flip rate, probability shift,
    attribution mass on the swapped words, the worst cases."""
    out = []
    for s in swaps:
        rows = [(r, cf) for r in records for cf in r["counterfactuals"] if cf["swap"] == s.name]
        entry = {"swap": s.name, "description": s.description, **_inv_stats(rows)}
        entry["n_cases_total"] = len(records)
        pairs: dict[str, list] = {}
        for r, cf in rows:
            for p in cf["pairs"]:
                pairs.setdefault(p, []).append((r, cf))
        entry["by_pair"] = sorted(
            ({"pair": p, **_inv_stats(v, with_cases=False)} for p, v in pairs.items()),
            key=lambda d: (-d["flips"], -d["n_cases"], d["pair"]),
        )
        ranked = sorted(rows, key=lambda rc: (-int(rc[1]["flipped"]), -abs(rc[1]["probability_shift"])))
        entry["worst"] = [
            {
                "id": r["id"],
                "pairs": cf["pairs"],
                "prediction": r["prediction"],
                "counterfactual_prediction": cf["prediction"],
                "flipped": cf["flipped"],
                "probability_shift": cf["probability_shift"],
                "mass_original": cf.get("mass_original"),
                "mass_counterfactual": cf.get("mass_counterfactual"),
            }
            for r, cf in ranked[:worst]
        ]
        out.append(entry)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _inv_stats(rows, with_cases: bool = True) -> dict:
    n = len(rows)
    flips = [r["id"] for r, cf in rows if cf["flipped"]]
    shifts = [abs(cf["probability_shift"]) for _, cf in rows]
    d = {
        "n_cases": n,
        "flips": len(flips),
        "flip_rate": _round(len(flips) / n) if n else None,
        "mean_abs_shift": _round(_mean(shifts)),
        "max_abs_shift": _round(max(shifts)) if shifts else None,
        "mass_original": _round(_mean([cf.get("mass_original") for _, cf in rows])),
        "mass_counterfactual": _round(_mean([cf.get("mass_counterfactual") for _, cf in rows])),
        "mass_on_flipped": _round(_mean([cf.get("mass_original") for _, cf in rows if cf["flipped"]])),
    }
    if with_cases:
        d["flipped_ids"] = flips
    return d
