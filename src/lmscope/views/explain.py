"""The explain report: attributions per method ranked by measured faithfulness (views.html.Report)."""

from __future__ import annotations

from ..explain.faithfulness import FLAG_RULES
from .html import Report


def _fmt(x, digits=3):
    return None if x is None else round(float(x), digits)


def explain_report(result):
    first = result.first
    t = first.target
    rep = Report(
        f"lmscope explain: {result.model}",
        f"{t['description']} · value {t['value']:.4g} (baseline '{t['baseline']}' input: {t['baseline_value']:.4g})"
        f" · {len(first.tokens)} tokens · {result.seconds:.1f} s",
    )
    for s, step in enumerate(result.steps):
        prefix = f"Step {s + 1}: " if len(result.steps) > 1 else ""
        _step_sections(rep, step, prefix)
    return rep


def _step_sections(rep, step, prefix: str) -> None:
    tokens, t = step.tokens, step.target
    excluded = [bool(s) for s in step.special]
    sec = rep.section(
        f"{prefix}Faithfulness ranking",
        "methods ranked by deletion AOPC + insertion AOPC on this input (higher = removing the top-ranked "
        "tokens destroys the target faster and keeping them alone rebuilds it faster); tokens are 'removed' "
        f"by replacing them with the {t['baseline']} baseline, length kept. Comprehensiveness: higher is "
        "better; sufficiency: lower is better; randomization ρ: rank correlation with the same method on a "
        "model whose top layers are re-initialized (near 1 = the method ignores the model). "
        "Flagged methods rank after every unflagged one, whatever their AOPC: "
        + "; ".join(FLAG_RULES.values())
        + ".",
    )
    rows = []
    for name in step.ranking:
        fa = step.methods[name].faithfulness
        rows.append(
            [
                fa.get("rank"),
                name,
                _fmt(fa["aopc_sum"]),
                _fmt(fa["deletion_aopc"]),
                _fmt(fa["insertion_aopc"]),
                _fmt(fa["comprehensiveness"]),
                _fmt(fa["sufficiency"]),
                _fmt(fa.get("randomization_spearman")),
                _fmt(step.methods[name].seconds, 2),
                "; ".join(f["why"] for f in step.methods[name].flags) or "—",
            ]
        )
    if step.random_baseline:
        rb = step.random_baseline
        rows.append(
            [
                "—",
                "random order (reference)",
                _fmt(rb["aopc_sum"]),
                _fmt(rb["deletion_aopc"]),
                _fmt(rb["insertion_aopc"]),
                _fmt(rb["comprehensiveness"]),
                _fmt(rb["sufficiency"]),
                None,
                None,
                "",
            ]
        )
    sec.table(
        [
            "rank",
            "method",
            "AOPC sum",
            "deletion AOPC",
            "insertion AOPC",
            "comprehensiveness",
            "sufficiency",
            "randomization ρ",
            "seconds",
            "flags",
        ],
        rows,
        highlight=[0] if step.ranking and not step.methods[step.ranking[0]].flags else None,
    )
    flagged = [n for n in step.ranking if step.methods[n].flags]
    if flagged and len(flagged) == len(step.ranking):
        sec.text(
            "Every method is flagged on this input: read the ranking as a comparison, not a recommendation."
        )
    for name, why in step.skipped.items():
        sec.text(f"{name}: skipped — {why}")

    sec = rep.section(
        f"{prefix}Token attributions",
        f"target: {t['description']}; hover a token for its score"
        + ("; special tokens are marked" if any(excluded) else ""),
    )
    for name in step.ranking + [
        n for n in step.methods if n not in step.ranking and step.methods[n].unit == "token"
    ]:
        a = step.methods[name]
        extra = ""
        if name == "integrated_gradients":
            extra = (
                f" · {a.info['steps']} steps ({a.info['method']}), completeness error "
                f"{a.info['completeness_error']:.3g} = {100 * a.info['relative_completeness_error']:.2f}% of "
                f"|f(x) − f(baseline)| = {abs(a.info['delta_f']):.3g}"
            )
        if name == "kernel_shap":
            extra = f" · surrogate R² {a.info['r2']:.3f} on {a.info['n_samples']} samples, {a.info['n_features']} tokens"
        sec.tokens(tokens, a.scores, label=name + extra, excluded=excluded)

    curves = [(n, step.methods[n].faithfulness.get("curves")) for n in step.ranking]
    curves = [(n, c) for n, c in curves if c]
    if curves:
        sec = rep.section(
            f"{prefix}Deletion and insertion curves",
            "f after removing (deletion) or keeping only (insertion) the top-k tokens",
        )
        sec.lines(
            [{"name": n, "x": c["k"], "y": c["deletion"]} for n, c in curves],
            title="deletion",
            x_title="tokens removed",
            y_title="target",
        )
        sec.lines(
            [{"name": n, "x": c["k"], "y": c["insertion"]} for n, c in curves],
            title="insertion",
            x_title="tokens kept",
            y_title="target",
        )

    lens = step.methods.get("logit_lens")
    if lens is not None:
        sec = rep.section(
            f"{prefix}Logit lens: the target across layers",
            "the target read through the final norm and unembedding after each layer",
        )
        layers = list(range(len(lens.scores)))
        sec.lines(
            [{"name": "target", "x": layers, "y": lens.info["target_by_layer"]}],
            x_title="layer",
            y_title="target",
        )
        sec.lines(
            [{"name": "probability", "x": layers, "y": lens.info["prob_by_layer"]}],
            x_title="layer",
            y_title="p(target)",
        )
        sec.bars([f"L{i}" for i in layers], lens.scores, title="change per layer")
    roll = step.methods.get("attention_rollout")
    if roll is not None and "_matrix" in roll.info:
        sec = rep.section(
            f"{prefix}Attention rollout matrix",
            "row = position at the top layer, column = input token; the first token (an attention sink) is "
            "left out of the color scale and the scale is logarithmic (a product over every layer spans orders of "
            "magnitude) — untick either to change it",
        )
        sec.heatmap(
            roll.info["_matrix"],
            x_labels=tokens,
            y_labels=tokens,
            x_title="input token",
            y_title="position",
            controls=["first", "log"],
            exclude_first=True,
            log=True,
        )
