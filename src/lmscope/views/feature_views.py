"""Report sections for dictionary features on one text: the features active on each token (``inspect --sae``),
a target attributed to features with the error term as its own row (``explain --sae``), and the features a
compressed model lost or distorted (``compare --sae``)."""

from __future__ import annotations

from .html import Report


def _show(token: str) -> str:
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")


def _name(f: dict) -> str:
    e = f.get("explanation")
    return f"f{f['feature']}" + (f" — {e} (detection {f['detection']:.2f})" if e else "")


def add_activity_section(rep: Report, activity) -> None:
    """The ``inspect --sae`` section: a tokens × features heatmap and each token's strongest features."""
    sec = rep.section(
        f"Dictionary features at {activity.site}",
        "each token's strongest dictionary features (activation); explanations only where scored; position 0, the "
        "attention sink, is not encoded (the dictionary is trained without it)",
    )
    tokens = [_show(t) for t in activity.tokens]
    if activity.features:
        sec.heatmap(
            activity.activations.T.numpy().round(4),
            x_labels=tokens,
            y_labels=[_name(f)[:60] for f in activity.features],
            title="features with the highest peak activation on this text",
            x_title="token",
            y_title="feature",
        )
    rows = []
    for pos, (tok, feats) in enumerate(zip(tokens, activity.per_token)):
        shown = "; ".join(f"f{f['feature']} {f['activation']:.3g}" for f in feats) or (
            "(not encoded)" if pos == 0 else "(none)"
        )
        labels = "; ".join(f"f{f['feature']}: {f['explanation']}" for f in feats if f.get("explanation"))
        err = activity.relative_error[pos]
        rows.append([pos, tok, shown, activity.l0[pos], err, labels])
    sec.table(
        ["pos", "token", "top features (activation)", "L0", "relative error", "explanations"],
        rows,
        title="per token",
    )


def attribution_report(attr) -> Report:
    """The ``explain --sae`` report: features by attribution, with error, bias and sink rows and the total."""
    rep = Report(
        f"lmscope explain --sae: {attr.target['description']}",
        f"{attr.site} · target value {attr.target['value']:.4g} · {attr.n_active} features active",
    )
    sec = rep.section(
        "Features that drove the target",
        "activation × gradient of the target with respect to each feature; the error term is the part of the "
        "site the dictionary leaves unexplained; all rows sum to the site's input × gradient total",
    )
    labels = [_name(f)[:70] for f in attr.features] + ["error (unexplained by the dictionary)"]
    sec.bars(labels, [f["attribution"] for f in attr.features] + [attr.error], title="attribution")
    rows = [
        [
            f"f{f['feature']}",
            f["attribution"],
            f["activation_sum"],
            f.get("explanation", ""),
            f.get("detection"),
        ]
        for f in attr.features
    ]
    rest = attr.features_sum - sum(f["attribution"] for f in attr.features)
    rows += [
        ["other features", rest, None, f"{attr.n_active - len(attr.features)} more active features", None],
        ["error", attr.error, None, "site − decode(encode(site))", None],
        ["decoder bias", attr.bias, None, "b_dec at every encoded position", None],
        ["position 0", attr.sink, None, "the attention sink, not encoded", None],
        ["total", attr.total, None, f"Σ site · gradient (rows sum to {attr.rows_sum:.6g})", None],
    ]
    sec.table(["row", "attribution", "activation (sum)", "explanation", "detection"], rows)
    tok = rep.section("Where the error sits", "the error term's attribution at each position")
    tok.tokens([_show(t) for t in attr.tokens], [0.0 if v is None else v for v in attr.error_per_position])
    return rep


def add_comparison_section(rep: Report, comparison) -> None:
    """The ``compare --sae`` section: the summary and the features the compressed model lost or distorted."""
    s = comparison.summary
    sec = rep.section(
        f"Dictionary features at {comparison.site}",
        f"{s['active']} features active on the original over {comparison.n_tokens} tokens; median correlation "
        f"original vs compressed {s['median_correlation']}; {s['lost']} lost, {s['distorted']} distorted "
        f"(r < {s['distorted_below']}), {s['new']} new; dictionary FVU {s['fvu_original']} (original) vs "
        f"{s['fvu_compressed']} (compressed)",
    )
    sec.table(
        [
            "feature",
            "status",
            "correlation",
            "mass ratio",
            "tokens (orig)",
            "tokens (compressed)",
            "explanation",
        ],
        [
            [
                f"f{f['feature']}",
                f["status"],
                f["correlation"],
                f["mass_ratio"],
                f["tokens_original"],
                f["tokens_compressed"],
                f.get("explanation", ""),
            ]
            for f in comparison.features
        ],
        title="worst features first",
    )
