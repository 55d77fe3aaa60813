"""A dictionary's features on one text: which are active on each token (``active_features``, behind
``inspect --sae``), which drove the output (``attribute_features``, behind ``explain --sae``), and which a
compressed model lost or distorted (``compare_features``, behind ``compare --sae``).

Every view decomposes the site's activation exactly, at every position after the first:
``site = Σ_i f_i · W_dec[i] + b_dec + error`` with ``f = encode(x)`` (a transcoder: ``x`` is its input site,
``site`` its output site) and ``error`` the part the dictionary leaves unexplained. The first position is the
attention sink, which the dictionaries are trained without (``activations.py``): it is never encoded, and where a
view sums over positions it is its own row.

Explanations come from an ``explanations.json`` written by ``lmscope features explain`` for the same site
(``load_explanations``); only scored explanations are shown, with their detection score beside them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..capture.session import hooks
from ..errors import LmscopeError
from ..views.html import Reportable

#: a feature's correlation (original vs compressed) below this marks it distorted in ``compare_features``
DISTORTED = 0.8


# -- explanations ----------------------------------------------------------------------------------------
def load_explanations(sae, path=None) -> dict[int, dict]:
    """``{unit: {explanation, detection}}`` of ``sae``'s site from an ``explanations.json``.

    ``path``: the file or the folder holding it; None looks in the dictionary's folder and beside it
    (``sae/explanations.json``, ``sae/../explanations.json``) and returns ``{}`` when there is none. A named
    path that is missing, unreadable or for another site is an error."""
    site = sae.cfg.site
    if path is None:
        folder = getattr(sae, "folder", None)
        candidates = [] if folder is None else [Path(folder) / "explanations.json"]
        candidates += [] if folder is None else [Path(folder).parent / "explanations.json"]
        for c in candidates:
            if c.is_file():
                try:
                    return _read_explanations(c, site)
                except LmscopeError:
                    continue  # a file found by looking around (another site, another format) is not this one's
        return {}
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "explanations.json"
    if not p.is_file():
        raise LmscopeError(
            f"no explanations file at '{path}'",
            "pass the --out of lmscope features explain (or its explanations.json)",
        )
    return _read_explanations(p, site)


def _read_explanations(p: Path, site: str) -> dict[int, dict]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        units = data["units"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LmscopeError(
            f"'{p}' is not an explanations.json ({type(e).__name__})", "rerun lmscope features explain"
        ) from None
    out = {}
    sites = set()
    for u in units:
        sites.add(u.get("site"))
        detection = (u.get("scores") or {}).get("detection")
        if u.get("site") == site and detection is not None and u.get("explanation"):
            out[int(u["unit"])] = {"explanation": u["explanation"], "detection": float(detection)}
    if units and not out:
        raise LmscopeError(
            f"'{p}' explains {', '.join(sorted(str(s) for s in sites))}, not the dictionary's site {site}",
            "pass the explanations written for this dictionary",
        )
    return out


def _label(unit: int, explanations: dict[int, dict]) -> dict:
    e = explanations.get(unit)
    return {} if e is None else {"explanation": e["explanation"], "detection": round(e["detection"], 4)}


# -- shared ----------------------------------------------------------------------------------------------
def _sites(sae) -> tuple[str, str]:
    return sae.cfg.site, sae.cfg.out_site or sae.cfg.site


@torch.no_grad()
def site_activations(lm, sae, ids: torch.Tensor, sites: tuple[str, str] | None = None):
    """(the dictionary's input ``[n, d_in]``, the site it reconstructs ``[n, d_out]``) on one sequence of ids
    (``sites``: other names for the two, e.g. in a depth-pruned model)."""
    from .activations import capture

    in_site, out_site = sites or _sites(sae)
    got = capture(lm, ids[None], sorted({in_site, out_site}))
    return got[in_site][0].float(), got[out_site][0].float()


def decompose(sae, x_in: torch.Tensor, x_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """``codes [n, d_sae]``, ``reconstruction``, ``error`` with ``x_out = codes @ W_dec + b_dec + error``."""
    codes = sae.encode(x_in.float())
    recon = sae.decode(codes)
    return {"codes": codes, "reconstruction": recon, "error": x_out.float() - recon}


def _encode_text(lm, text: str, truncate: bool) -> torch.Tensor:
    ids = lm.encode(text, truncate=truncate)["input_ids"][0]
    if len(ids) < 2:
        raise LmscopeError(
            "the text is one token; the dictionary never encodes the first position (the attention sink)",
            "pass a longer text",
        )
    return ids


def _check(lm, sae) -> None:
    from .pipeline import check_dictionary

    check_dictionary(lm, sae)


# -- inspect --sae -----------------------------------------------------------------------------------
@dataclass
class FeatureActivity:
    """The dictionary features active on each token of one text."""

    site: str
    tokens: list[str]
    per_token: list[
        list[dict]
    ]  # per position: [{feature, activation, explanation?, detection?}], strongest first
    features: list[dict]  # the features active anywhere, by peak activation
    l0: list[int]  # active features per position (position 0: None, not encoded)
    relative_error: list[float | None]  # |error| / |site − b_dec| per position
    activations: torch.Tensor = field(repr=False, default=None)  # [n, len(features)] for the heatmap

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "tokens": self.tokens,
            "per_token": self.per_token,
            "features": self.features,
            "l0": self.l0,
            "relative_error": self.relative_error,
            "note": "position 0 (the attention sink) is not encoded: dictionaries are trained without it; "
            "relative_error = |site − decode(encode(site))| / |site − b_dec|",
        }


def active_features(
    lm,
    sae,
    text: str,
    top: int = 5,
    explanations: dict | None = None,
    truncate: bool = False,
    max_features: int = 24,
) -> FeatureActivity:
    """The ``top`` strongest active features of ``sae`` on each token of ``text`` (and, over the text, the
    ``max_features`` features with the highest peak activation), labelled from ``explanations``
    (``load_explanations``) where a scored explanation exists."""
    if top < 1:
        raise LmscopeError(f"--sae-top must be at least 1, got {top}", "e.g. --sae-top 5")
    _check(lm, sae)
    explanations = explanations or {}
    ids = _encode_text(lm, text, truncate)
    x_in, x_out = site_activations(lm, sae, ids)
    with torch.no_grad():
        parts = decompose(sae, x_in[1:], x_out[1:])
    codes = parts["codes"]  # [n-1, d_sae]
    # the decoder bias stands for the mean activation (SAELens initializes it there): error against the rest
    centred = (x_out[1:] - sae.b_dec.detach()).norm(dim=-1).clamp_min(1e-12)
    rel = (parts["error"].norm(dim=-1) / centred).tolist()
    per_token: list[list[dict]] = [[]]
    for row in codes:
        k = min(top, int((row > 0).sum()))
        vals, idx = row.topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        per_token.append(
            [
                {"feature": int(i), "activation": round(float(v), 5), **_label(int(i), explanations)}
                for v, i in zip(vals, idx)
            ]
        )
    peak = codes.max(0).values
    n_active = (codes > 0).sum(0)
    order = [int(i) for i in torch.argsort(peak, descending=True) if peak[i] > 0][:max_features]
    features = [
        {
            "feature": i,
            "peak": round(float(peak[i]), 5),
            "peak_token": int(codes[:, i].argmax()) + 1,
            "tokens_active": int(n_active[i]),
            **_label(i, explanations),
        }
        for i in order
    ]
    acts = torch.zeros(len(ids), len(order))
    if order:
        acts[1:] = codes[:, order]
    return FeatureActivity(
        site=sae.cfg.out_site or sae.cfg.site,
        tokens=lm.token_strings(ids),
        per_token=per_token,
        features=features,
        l0=[None] + [int(x) for x in (codes > 0).sum(-1)],
        relative_error=[None] + [round(x, 5) for x in rel],
        activations=acts,
    )


# -- explain --sae -----------------------------------------------------------------------------------
@dataclass
class FeatureAttribution(Reportable):
    """A target attributed to dictionary features (activation × gradient), the dictionary's error term, its
    decoder bias and the unencoded first position; the rows sum to ``total`` = Σ_p site[p] · ∂target/∂site[p]
    (the first-order, input-×-gradient attribution of the whole site)."""

    site: str
    tokens: list[str]
    target: dict
    features: list[
        dict
    ]  # [{feature, attribution, activation_sum, positions: [[pos, attr], ...], explanation?}]
    error: float  # Σ_p error[p] · g[p]
    bias: float  # Σ_p b_dec · g[p]
    sink: float  # site[0] · g[0]
    total: float  # Σ_p site[p] · g[p]
    features_sum: float  # Σ over every feature (not just the listed ones)
    error_per_position: list[float | None]
    n_active: int  # features with a nonzero activation anywhere

    @property
    def rows_sum(self) -> float:
        return self.features_sum + self.error + self.bias + self.sink

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "tokens": self.tokens,
            "target": self.target,
            "features": self.features,
            "error": self.error,
            "bias": self.bias,
            "sink": self.sink,
            "features_sum": self.features_sum,
            "total": self.total,
            "rows_sum": self.rows_sum,
            "n_active": self.n_active,
            "error_per_position": self.error_per_position,
            "method": "activation × gradient: feature i at position p gets f_i[p] · (W_dec[i] · ∂target/∂site[p]); "
            "error = (site − decode(encode(x))) · ∂target/∂site; bias = b_dec · ∂target/∂site; sink = position 0 "
            "(not encoded); features_sum + error + bias + sink = total = Σ_p site[p] · ∂target/∂site[p]",
        }

    def build_report(self):
        from ..views.feature_views import attribution_report

        return attribution_report(self)


def attribute_features(
    lm,
    sae,
    text: str,
    target: str | None = None,
    contrast: str | None = None,
    target_label=None,
    contrast_label=None,
    pair: str | None = None,
    top: int = 20,
    explanations: dict | None = None,
    truncate: bool = False,
    chat: bool = False,
) -> FeatureAttribution:
    """Attribute the target (a token's logit, a logit difference, a class logit, an encoder's cosine; as
    ``lmscope explain`` builds it) to the ``top`` features of ``sae`` with the largest |attribution|."""
    from ..explain.targets import Objective, encode_prompt, make_target

    if top < 1:
        raise LmscopeError(f"--sae-top must be at least 1, got {top}", "e.g. --sae-top 20")
    _check(lm, sae)
    explanations = explanations or {}
    t = make_target(lm, target, contrast, pair, target_label, contrast_label)
    ids = encode_prompt(lm, text, chat=chat, truncate=truncate)
    if len(ids) < 2:
        raise LmscopeError(
            "the text is one token; the dictionary never encodes the first position (the attention sink)",
            "pass a longer text",
        )
    obj = Objective(lm, ids, t)
    in_site, out_site = _sites(sae)
    held: dict[str, torch.Tensor] = {}

    def read(tensor, name):
        held["in"] = tensor.detach()[0].float()
        return None

    def leaf(tensor, name):  # the site as a leaf: the forward is unchanged, its gradient lands here
        x = tensor.detach().requires_grad_(True)
        held["out"] = x
        return x

    interventions = {out_site: leaf} if in_site == out_site else {in_site: read, out_site: leaf}
    with torch.enable_grad(), hooks(lm, (), interventions):
        value = obj.f_embeds(obj.x[None])[0]
        (grad,) = torch.autograd.grad(value, held["out"])
    x_out = held["out"].detach()[0].float()
    x_in = x_out if in_site == out_site else held["in"]
    g = grad[0].float()  # [n, d_out]
    with torch.no_grad():
        parts = decompose(sae, x_in[1:], x_out[1:])
        codes = parts["codes"]  # [n-1, d_sae]
        per = codes * (g[1:] @ sae.W_dec.T.float())  # [n-1, d_sae]: f_i[p] · (W_dec[i] · g[p])
        per_feature = per.sum(0)
        err_pos = (parts["error"] * g[1:]).sum(-1)
        bias = float((sae.b_dec.float() * g[1:]).sum())
        sink = float((x_out[0] * g[0]).sum())
        total = float((x_out * g).sum())
    active = (codes > 0).any(0)
    order = [int(i) for i in torch.argsort(per_feature.abs(), descending=True) if active[i]][:top]
    features = []
    for i in order:
        col = per[:, i]
        nz = [(p + 1, float(v)) for p, v in enumerate(col.tolist()) if codes[p, i] > 0]
        nz.sort(key=lambda pv: -abs(pv[1]))
        features.append(
            {
                "feature": i,
                "attribution": float(per_feature[i]),
                "activation_sum": float(codes[:, i].sum()),
                "positions": [[p, round(v, 6)] for p, v in nz[:8]],
                **_label(i, explanations),
            }
        )
    return FeatureAttribution(
        site=out_site,
        tokens=obj.tokens,
        target=obj.describe(),
        features=features,
        error=float(err_pos.sum()),
        bias=bias,
        sink=sink,
        total=total,
        features_sum=float(per_feature.sum()),
        error_per_position=[None] + [float(v) for v in err_pos],
        n_active=int(active.sum()),
    )


# -- compare --sae -----------------------------------------------------------------------------------
@dataclass
class FeatureComparison:
    """Per-feature activation agreement of an original and a compressed model under one dictionary."""

    site: str
    n_tokens: int
    features: list[dict]  # the worst features first: [{feature, correlation, mass_ratio, status, ...}]
    summary: dict

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "n_tokens": self.n_tokens,
            "summary": self.summary,
            "worst": self.features,
            "method": "each feature's activations on every token (position 0 left out) under the original and the "
            "compressed model; Pearson correlation over tokens; lost = active on the original, never on the "
            f"compressed; distorted = correlation < {DISTORTED}; mass_ratio = Σ compressed / Σ original",
        }

    def to_text(self) -> str:
        s = self.summary
        lines = [
            f"features at {self.site} on {self.n_tokens} tokens: {s['active']} active in the original, "
            f"median correlation {_fmt(s['median_correlation'])}, {s['lost']} lost, {s['distorted']} distorted, "
            f"{s['new']} new ({100 * s['changed_mass_fraction']:.1f}% of the activation mass in lost or distorted "
            f"features); dictionary FVU {_fmt(s['fvu_original'])} -> {_fmt(s['fvu_compressed'])}"
        ]
        for f in self.features[:5]:
            e = f" ({f['explanation']})" if f.get("explanation") else ""
            lines.append(f"  feature {f['feature']}: {f['status']}, r = {_fmt(f['correlation'])}{e}")
        return "\n".join(lines)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fvu(sae, x_in, x_out) -> float:
    with torch.no_grad():
        err = decompose(sae, x_in, x_out)["error"]
        var = ((x_out - x_out.mean(0)) ** 2).sum()
    return float((err**2).sum() / var.clamp_min(1e-12))


def _pruned_sites(lm_a, lm_b, sae) -> tuple[str, str]:
    """The dictionary's sites in ``lm_b``, whose blocks may be a depth-pruned subset of ``lm_a``'s (lined up by
    ``config.lmscope_origin``, as ``compress.compare`` does)."""
    from ..capture.names import split
    from ..compress.prune._origin import get_origin

    layers_a = get_origin(lm_a.model, lm_a.n_layers, lm_a.n_heads)["layers"]
    layers_b = get_origin(lm_b.model, lm_b.n_layers, lm_b.n_heads)["layers"]
    out = []
    for site in _sites(sae):
        layer, what = split(site)
        original = layers_a[layer]
        if original not in layers_b:
            raise LmscopeError(
                f"the compressed model removed block {original}, where the dictionary reads or writes ({site})",
                "pass a dictionary of a block the compressed model kept",
            )
        out.append(f"blocks.{layers_b.index(original)}.{what}")
    return out[0], out[1]


def compare_features(
    lm_a,
    lm_b,
    sae,
    texts,
    worst: int = 20,
    explanations: dict | None = None,
    truncate: bool = False,
    min_tokens: int = 3,
) -> FeatureComparison:
    """Which features of ``sae`` the compressed ``lm_b`` lost or distorted relative to ``lm_a`` on ``texts``
    (one text or a list): per-feature Pearson correlation of the two models' activations over the tokens.

    ``summary``: features active on the original, lost / distorted / new counts, median and mass-weighted
    correlation, the fraction of the original's activation mass in lost or distorted features, and the
    dictionary's FVU on each model. ``features``: the ``worst`` features (those active on at least
    ``min_tokens`` original tokens first), then up to 5 new ones."""
    _check(lm_a, sae)
    sites_b = _pruned_sites(lm_a, lm_b, sae)
    renamed = copy.copy(sae)  # the width check of lm_b at the sites it has there
    renamed.cfg = dataclasses.replace(sae.cfg, site=sites_b[0], out_site=sae.cfg.out_site and sites_b[1])
    _check(lm_b, renamed)
    explanations = explanations or {}
    texts = [texts] if isinstance(texts, str) else list(texts)
    ins_a, outs_a, ins_b, outs_b = [], [], [], []
    for text in texts:
        ids = _encode_text(lm_a, text, truncate)
        a_in, a_out = site_activations(lm_a, sae, ids)
        b_in, b_out = site_activations(lm_b, sae, ids, sites_b)
        ins_a.append(a_in[1:])
        outs_a.append(a_out[1:])
        ins_b.append(b_in[1:])
        outs_b.append(b_out[1:])
    xa, ya, xb, yb = (torch.cat(t) for t in (ins_a, outs_a, ins_b, outs_b))
    with torch.no_grad():
        fa, fb = sae.encode(xa).double(), sae.encode(xb).double()  # [N, d_sae]
    n = fa.shape[0]
    on_a, on_b = (fa > 0).any(0), (fb > 0).any(0)
    ca, cb = fa - fa.mean(0), fb - fb.mean(0)
    denom = (ca.norm(dim=0) * cb.norm(dim=0)).clamp_min(1e-30)
    corr = (ca * cb).sum(0) / denom
    constant_b = cb.norm(dim=0) == 0
    corr = torch.where(constant_b & on_a, torch.zeros_like(corr), corr)  # lost (or constant): no agreement
    mass_a, mass_b = fa.sum(0), fb.sum(0)
    rows = []
    for i in torch.nonzero(on_a | on_b).flatten().tolist():
        status = (
            "new"
            if not on_a[i]
            else "lost"
            if not on_b[i]
            else "distorted"
            if float(corr[i]) < DISTORTED
            else "kept"
        )
        rows.append(
            {
                "feature": i,
                "correlation": None if not on_a[i] else round(float(corr[i]), 5),
                "mass_ratio": None if not on_a[i] else round(float(mass_b[i] / mass_a[i]), 5),
                "tokens_original": int((fa[:, i] > 0).sum()),
                "tokens_compressed": int((fb[:, i] > 0).sum()),
                "status": status,
                **_label(i, explanations),
            }
        )
    on_original = [r for r in rows if r["status"] != "new"]
    # worst first: lowest correlation, ties (e.g. every lost feature at 0) by how much of the original it carried;
    # features active on fewer than min_tokens original tokens (a top-k flip on one token) come after the others
    on_original.sort(
        key=lambda r: (r["tokens_original"] < min_tokens, r["correlation"], -float(mass_a[r["feature"]]))
    )
    corrs = torch.tensor([r["correlation"] for r in on_original], dtype=torch.float64)
    weights = torch.tensor([float(mass_a[r["feature"]]) for r in on_original], dtype=torch.float64)
    summary = {
        "active": len(on_original),
        "lost": sum(r["status"] == "lost" for r in rows),
        "distorted": sum(r["status"] == "distorted" for r in rows),
        "new": sum(r["status"] == "new" for r in rows),
        "median_correlation": round(float(corrs.median()), 5) if len(corrs) else None,
        "mass_weighted_correlation": round(float((corrs * weights).sum() / weights.sum()), 5)
        if len(corrs)
        else None,
        "changed_mass_fraction": round(
            float(
                sum(float(mass_a[r["feature"]]) for r in on_original if r["status"] != "kept") / mass_a.sum()
            ),
            5,
        ),
        "fvu_original": round(_fvu(sae, xa, ya), 5),
        "fvu_compressed": round(_fvu(sae, xb, yb), 5),
        "distorted_below": DISTORTED,
    }
    new = [r for r in rows if r["status"] == "new"]
    new.sort(key=lambda r: -r["tokens_compressed"])
    return FeatureComparison(
        site=sae.cfg.out_site or sae.cfg.site,
        n_tokens=n,
        features=on_original[:worst] + new[:5],
        summary=summary,
    )
