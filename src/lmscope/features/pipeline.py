"""From a model and a corpus (or a scan's dumps) to scored explanations of every latent or neuron, plus what the
dashboard shows beside each: activation histogram, top contexts, promoted / suppressed tokens, nearest features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..capture.names import split
from ..errors import LmscopeError
from .activations import check_site, corpus_windows, site_width, window_batches
from .explain import CONTEXT, contexts, explain_units, summary

CHUNK = 256  # units explained per pass over the stored activations


def check_dictionary(lm, sae) -> None:
    """Refuse a dictionary trained for another site or width than this model has."""
    site = check_site(lm, sae.cfg.site, "the dictionary's site")
    width = site_width(lm, site)
    if width != sae.cfg.d_in:
        raise LmscopeError(
            f"the dictionary reads {sae.cfg.d_in}-wide activations at {site}, but {lm.name} has {width} there",
            "pass the model the dictionary was trained on",
        )
    if sae.cfg.out_site:
        out = check_site(lm, sae.cfg.out_site, "the dictionary's output site")
        if site_width(lm, out) != sae.cfg.d_out:
            raise LmscopeError(
                f"the transcoder writes {sae.cfg.d_out}-wide {out}, but {lm.name} has {site_width(lm, out)}",
                "pass the model the transcoder was trained on",
            )


def harvest_windows(lm, site: str, corpus=None, scan_dir=None, tokens: int = 32_768, seq_len: int = 128):
    """``(ids [W, L], acts [W, L, d])`` for full-length windows: from the model over ``corpus``, or from the
    ``--dump`` shards of a scan (grouped back into windows)."""
    if scan_dir is not None:
        return _dump_windows(scan_dir, site, tokens)
    from .activations import capture

    ids_all, acts_all, n = [], [], 0
    for ids in window_batches(corpus_windows(lm, corpus, seq_len, "all"), 8):
        if ids.shape[1] < min(seq_len, CONTEXT):
            continue
        acts_all.append(capture(lm, ids, [site])[site].half())
        ids_all.append(ids)
        n += ids.numel()
        if n >= tokens:
            break
    length = max((i.shape[1] for i in ids_all), default=0)
    keep = [j for j, i in enumerate(ids_all) if i.shape[1] == length]
    if not keep:
        raise LmscopeError("too few tokens to explain: the corpus gave no window", "pass a larger corpus")
    return torch.cat([ids_all[j] for j in keep]), torch.cat([acts_all[j] for j in keep])


def _dump_windows(scan_dir, site: str, tokens: int):
    from safetensors.torch import load_file

    files = sorted((Path(scan_dir).expanduser() / "dump").glob("shard-*.safetensors"))
    if not files:
        raise LmscopeError(f"'{scan_dir}' holds no activation dumps", f"run lmscope scan with --dump {site}")
    rows: dict[int, list] = {}
    n = 0
    for f in files:
        data = load_file(str(f))
        if site not in data:
            have = [k for k in data if k not in ("input_ids", "window", "position")]
            raise LmscopeError(f"the scan dumped {', '.join(have)}, not {site}", f"rescan with --dump {site}")
        for w in torch.unique(data["window"]).tolist():
            sel = data["window"] == w
            order = torch.argsort(data["position"][sel])
            rows[w] = (data["input_ids"][sel][order].long(), data[site][sel][order])
            n += int(sel.sum())
        if n >= tokens:
            break
    length = max(len(v[0]) for v in rows.values())
    full = [rows[w] for w in sorted(rows) if len(rows[w][0]) == length]
    return torch.stack([r[0] for r in full]), torch.stack([r[1] for r in full])


def _directions(lm, sae, site: str, units: list[int]) -> torch.Tensor | None:
    """Each unit's write direction in the residual stream ([units, d_model]), or None where it has none."""
    layer, what = split(site)
    mlp_out = lm.blocks[layer].get_submodule(lm.family.mlp_out) if lm.family.mlp_out else None
    with torch.no_grad():
        if sae is not None:
            rows = sae.W_dec[units].float()
            where = split(sae.cfg.out_site or sae.cfg.site)[1]
            if where == "mlp.hidden":
                return rows @ mlp_out.weight.T.float() if mlp_out is not None else None
            return rows
        if what == "mlp.hidden" and mlp_out is not None and type(mlp_out).__name__ == "Linear":
            return mlp_out.weight[:, units].T.float()
        if what in ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out"):
            return torch.eye(lm.d_model)[units]
    return None


def logit_effects(lm, directions: torch.Tensor, n: int = 6) -> list[dict]:
    """Tokens each direction promotes and suppresses through the final norm and the unembedding."""
    if directions is None or not lm.is_causal:
        return [{} for _ in range(0 if directions is None else len(directions))]
    with torch.no_grad():
        logits = lm.unembed(lm.final_norm(directions.to(lm.dtype))).float()  # [units, vocab]
        logits = logits - logits.mean(-1, keepdim=True)
    out = []
    for row in logits:
        up, down = row.topk(n), (-row).topk(n)
        out.append(
            {
                "promoted": [
                    [lm.tokenizer.decode([int(i)]), float(v)] for v, i in zip(up.values, up.indices)
                ],
                "suppressed": [
                    [lm.tokenizer.decode([int(i)]), float(-v)] for v, i in zip(down.values, down.indices)
                ],
            }
        )
    return out


def explain_model(
    lm,
    corpus=None,
    sae=None,
    neurons: str | None = None,
    scan_dir=None,
    tokens: int = 32_768,
    seq_len: int = 128,
    units: list[int] | None = None,
    explainer="rules",
    seed: int = 0,
    progress=None,
) -> dict:
    """Scored explanations of a dictionary's latents (``sae``) or of the neurons at ``neurons``.

    Returns ``{units: [...], summary, site, kind}``; each unit also carries its dashboard extras
    (``histogram``, ``top_contexts``, ``logits``, ``nearest``).
    """
    if (sae is None) == (neurons is None):
        raise LmscopeError("explain needs one of --sae or --neurons", "pass --sae DIR or --neurons SITE")
    if sae is not None:
        check_dictionary(lm, sae)
        site, width = sae.cfg.site, sae.d_sae
    else:
        site = check_site(lm, neurons, "--neurons")
        width = site_width(lm, site)
    units = list(range(width)) if units is None else units
    bad = [u for u in units if not 0 <= u < width]
    if bad:
        raise LmscopeError(f"unit {bad[0]} is out of range", f"use units 0..{width - 1}")
    from .llm import explainer_from

    explainer = explainer_from(explainer) or "rules"  # a local model loads once, not once per chunk
    ids, raw = harvest_windows(lm, site, corpus, scan_dir, tokens, seq_len)
    if ids.numel() < 4 * CONTEXT:
        raise LmscopeError(
            f"too few tokens to explain ({ids.numel()})", f"pass a corpus of at least {4 * CONTEXT} tokens"
        )
    cids, _ = contexts(ids, raw[..., :1])
    sparse = _topk_codes(sae, raw) if sae is not None and sae.cfg.k else None
    results = []
    for start in range(0, len(units), CHUNK):
        chunk = units[start : start + CHUNK]
        with torch.no_grad():
            if sparse is not None:
                acts = _densify(sparse, chunk, raw.shape[:2], sae.d_sae)
            elif sae is not None:  # ReLU: each latent depends on its own pre-activation only
                x = raw.float() - (sae.b_dec if sae.apply_b_dec_to_input else 0)
                acts = (x @ sae.W_enc[:, chunk] + sae.b_enc[chunk]).relu()
            else:
                acts = raw[..., chunk].float()
        acts[:, 0] = 0  # the sink position (first of each window) is left out, for latents and neurons alike
        items = explain_units(ids, acts, lm.tokenizer, chunk, site=site, seed=seed, explainer=explainer)
        _, cacts = contexts(ids, acts)
        column = {u: j for j, u in enumerate(chunk)}
        for item in items:
            a = cacts[..., column[item["unit"]]].numpy()
            item["histogram"] = _histogram(a)
            item["top_contexts"] = [_context(lm, cids[c].numpy(), a[c]) for c in item["examples"]["top"][:5]]
        results += items
        if progress is not None:
            progress(min(start + CHUNK, len(units)), len(units))
    directions = _directions(lm, sae, site, [r["unit"] for r in results]) if results else None
    for r, eff in zip(results, logit_effects(lm, directions)):
        r["logits"] = eff
    if sae is not None and results:
        w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
        chosen = torch.tensor([r["unit"] for r in results])
        cos = w[chosen] @ w.T
        cos[torch.arange(len(chosen)), chosen] = -2
        best = cos.topk(min(3, w.shape[0] - 1), dim=1)
        for r, vals, idx in zip(results, best.values, best.indices):
            r["nearest"] = [[int(i), float(v)] for v, i in zip(vals, idx)]
    results.sort(key=lambda r: -(r["scores"]["detection"] or 0))
    return {
        "site": site,
        "kind": "latents" if sae is not None else "neurons",
        "tokens": int(ids.numel()),
        "units_asked": len(units),
        "summary": summary(results),
        "units": results,
    }


def _topk_codes(sae, raw: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The k active latents of every token, as (indices [N, k], values [N, k]): never the dense [N, d_sae]."""
    flat = raw.reshape(-1, raw.shape[-1])
    index, value = [], []
    with torch.no_grad():
        for i in range(0, len(flat), rows):
            pre = sae.pre_activations(flat[i : i + rows].float())
            v, j = pre.topk(sae.cfg.k, dim=-1)
            index.append(j)
            value.append(v.relu())
    return torch.cat(index), torch.cat(value)


def _densify(codes, chunk: list[int], shape, d_sae: int) -> torch.Tensor:
    """Activations ``[W, L, len(chunk)]`` of the latents in ``chunk`` from the sparse codes."""
    index, value = codes
    column = torch.full((d_sae,), len(chunk), dtype=torch.long)  # latents outside the chunk: a spill column
    column[torch.tensor(chunk)] = torch.arange(len(chunk))
    out = torch.zeros(index.shape[0], len(chunk) + 1)
    out.scatter_add_(1, column[index], value)
    return out[:, : len(chunk)].reshape(*shape, len(chunk))


def _histogram(a: np.ndarray, bins: int = 24) -> dict:
    nz = a[a > 0]
    if len(nz) == 0:
        return {"edges": [], "counts": [], "zero_fraction": 1.0}
    counts, edges = np.histogram(nz, bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "zero_fraction": float((a <= 0).mean())}


def _context(lm, ids: np.ndarray, acts: np.ndarray) -> dict:
    return {"tokens": [lm.tokenizer.decode([int(i)]) for i in ids[1:]], "acts": [float(x) for x in acts]}
