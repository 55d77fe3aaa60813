"""Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): every patching or ablation effect
estimated to first order from one forward and one backward pass. APPROXIMATE by construction.

For an activation ``a`` replaced by ``a'`` the effect on a scalar ``m`` is estimated as
``m(a') − m(a) ≈ Σ ∂m/∂a · (a' − a)`` (the sum runs over the activation's positions and features).
It is exact when ``m`` is linear in ``a`` and degrades where the model is far from linear between
``a`` and ``a'`` — attention softmaxes that saturate and flip, or large effects that cancel.

What is done about AtP*'s two failure modes, precisely:
- saturation (AtP*'s QK fix: recompute the softmax for the patched node's query/key contributions):
  a residual-stream patch at (layer L, position p) changes layer L's queries at p and keys at p.
  ``patch_atp`` recomputes layer L's attention exactly for the patched input (the real softmax over
  the new scores, its values and output projection: one attention layer per patched position), and
  linearises only from the residual stream after that attention (``resid_mid``) on:
  ``m_corrupt + ∂m/∂resid_mid · (resid_mid_patched − resid_mid_corrupt)``. The plain first-order
  estimate is kept as ``resid_linear``. Head outputs and MLP outputs are nodes *after* their own
  softmax, so the fix does not apply to them; softmaxes downstream of any node are linearised, as in
  AtP*. How much that matters is measured, not assumed: with the exact scores computed beside the
  estimates their rank correlation is reported.
- cancellation across positions: a head's estimate is a sum of per-position terms that can cancel
  (and then the first-order sum is unreliable even when each term is fine). Every head gets
  ``cancellation`` = 1 − |Σ_p e_p| / Σ_p |e_p| (0: all positions agree, 1: they cancel completely);
  cancellation across *paths* (a node's direct effect cancelled by its effect through later layers)
  is AtP*'s GradDrop, asked for with ``graddrop=True`` (``--approx atp-graddrop``): for every
  downstream sublayer u (each block's attention and MLP, U = 2·layers in all) the estimate is
  recomputed with the gradient through u's output dropped, and the node's score is
  (1/(U−1)) Σ_u |estimate_u| — a magnitude (no sign) that stays large when paths cancel. The dropped
  gradient is the full one minus the vector–Jacobian product of u's output with its gradient
  (exact chain rule; one partial backward from u down, per u), so the cost is about as many
  backward passes as there are layers, not a forward per node.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..capture.session import hooks
from .replay import base_forward, record_block_outputs, replay_blocks


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needs is recorded."""


LABEL = "APPROXIMATE: attribution patching (first-order gradient estimate, one forward + one backward)"
GRADDROP_LABEL = (
    "APPROXIMATE: AtP with GradDrop (Kramár et al. 2024): (1/(U−1)) Σ_u |AtP estimate with the gradient "
    "through sublayer u dropped|, U = 2·layers; a magnitude |Δ| (no sign) robust to cancellation between paths"
)


def unit_names(lm) -> list[str]:
    """GradDrop's sublayers in forward order: each block's attention output, then its MLP output."""
    return [f"blocks.{i}.{s}" for i in range(lm.n_layers) for s in ("attn.out", "mlp.out")]


def first_unit(name: str) -> int:
    """Index (in ``unit_names``) of the first sublayer downstream of the node ``name``."""
    layer = int(name.split(".")[1])
    if name.endswith("resid_pre"):
        return 2 * layer  # this block's attention reads it
    if name.endswith("mlp.out"):
        return 2 * layer + 2
    return 2 * layer + 1  # attention internals: this block's MLP (no path in parallel blocks: no change)


def dropped_gradients(loss, acts: list, firsts: list[int], units: list):
    """GradDrop's gradients. Yields ``(None, plain)`` then, for each unit u, ``(u, grads)`` where
    ``grads[i]`` = ∂loss/∂acts[i] with the gradient through ``units[u]`` dropped — the plain gradient
    where u is not downstream of ``acts[i]`` (``firsts[i] > u``). A gradient is None where ``acts[i]``
    does not reach the loss. Uses chain rule: dropped = plain − (∂units[u]/∂acts[i])ᵀ · ∂loss/∂units[u]."""
    n = len(acts)
    grads = torch.autograd.grad(loss, list(acts) + list(units), retain_graph=bool(units), allow_unused=True)
    plain, unit_grads = list(grads[:n]), grads[n:]
    yield None, plain
    for u, (out, g_out) in enumerate(zip(units, unit_grads)):
        idx = [i for i in range(n) if firsts[i] <= u and plain[i] is not None]
        if g_out is None or not idx:
            yield u, plain
            continue
        through = torch.autograd.grad(
            out, [acts[i] for i in idx], grad_outputs=g_out, retain_graph=True, allow_unused=True
        )
        dropped = list(plain)
        for i, t in zip(idx, through):
            if t is not None:
                dropped[i] = plain[i] - t
        yield u, dropped


@contextmanager
def activation_grads_only(lm):
    """Parameters stop requiring gradients inside the block (only activations need them), then are restored."""
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _grad_root(x, name):
    """Parameters are frozen: the embedding output becomes the leaf the graph grows from."""
    return x.detach().requires_grad_(True)


def _through(x, name):
    """A copy that the forward continues from, so the captured tensor is on the path to the loss."""
    return x.clone()


def _taps(names) -> dict:
    return {"embed": _grad_root, **{n: _through for n in names}}


def head_ablation_atp(
    lm, ids: torch.Tensor, layers: list[int], loss_fn, modes=("zero", "mean"), graddrop: bool = False
) -> dict:
    """AtP estimates of Δloss when each head's output is zeroed / set to its mean over all positions.

    ``loss_fn(hidden, ids) -> [windows]`` (the per-window mean loss the exact ablation measures).
    Returns {mode: [layers, heads] estimates, "cancellation_<mode>": [layers, heads]} (NaN off ``layers``);
    with ``graddrop`` also "graddrop_<mode>": GradDrop's magnitude estimate of |Δloss| (module docstring).
    """
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    names = [f"blocks.{i}.attn.head_out" for i in layers]
    units = unit_names(lm) if graddrop else []
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gd_sum = {mode: np.zeros((lm.n_layers, n_heads)) for mode in modes}
    with activation_grads_only(lm), hooks(lm, names + units, _taps(names + units), keep_grad=True) as session:
        hidden = base_forward(lm, inputs)
        loss = loss_fn(hidden, ids).mean()  # mean over windows of the per-window mean loss
        acts = [session.tensors[n] for n in names]
        deltas = {mode: [_ablation_delta(a.detach().double(), mode) for a in acts] for mode in modes}
        passes = dropped_gradients(
            loss, acts, [first_unit(n) for n in names], [session.tensors[n] for n in units]
        )
        _, grads = next(passes)
        for _, dropped in passes if graddrop else ():
            for mode in modes:
                for j, (layer, g) in enumerate(zip(layers, dropped)):
                    if g is None:  # the head does not reach the loss
                        continue
                    total = (g.double() * deltas[mode][j]).sum(dim=(0, 1, 3))  # [heads]
                    gd_sum[mode][layer, : len(total)] += total.abs().numpy()
    out = {}
    for mode in modes:
        if graddrop:
            gd = np.full((lm.n_layers, n_heads), np.nan)
            gd[layers] = gd_sum[mode][layers] / max(1, len(units) - 1)
            for layer in layers:
                gd[layer, lm.n_heads_at(layer) :] = np.nan
            out[f"graddrop_{mode}"] = gd
        est = np.full((lm.n_layers, n_heads), np.nan)
        cancel = np.full((lm.n_layers, n_heads), np.nan)
        for layer, delta, g in zip(layers, deltas[mode], grads):
            g = torch.zeros_like(delta) if g is None else g.double()
            per_pos = (g * delta).sum(-1)  # [win, pos, heads]
            total = per_pos.sum(dim=(0, 1))
            spread = per_pos.abs().sum(dim=(0, 1))
            n_h = lm.n_heads_at(layer)
            est[layer, :n_h] = total.numpy()
            cancel[layer, :n_h] = np.where(
                spread > 0, 1.0 - (total.abs() / spread.clamp(min=1e-30)).numpy(), 0.0
            )
        out[mode] = est
        out[f"cancellation_{mode}"] = cancel
    return out


def _ablation_delta(a: torch.Tensor, mode: str) -> torch.Tensor:
    """ablated − clean for head outputs a [win, pos, heads, hd]: zero, or the mean over windows and positions."""
    target = torch.zeros_like(a) if mode == "zero" else a.mean(dim=(0, 1), keepdim=True).expand_as(a)
    return target - a


def patch_atp(
    lm, clean_in, corrupt_in, layers: list[int], metric, resid_site: str = "resid_pre", graddrop: bool = False
) -> dict:
    """AtP estimates of the patched metric for every site ``patch`` measures, plus per head per position.

    ``metric(hidden_last [B, d]) -> [B]``. One no-grad forward on the clean prompt, one forward +
    backward on the corrupted one, and (QK fix, pre-norm families) one attention layer per patched
    residual position. Returns raw metric estimates (``m_corrupt + Σ g·Δ``): resid [layers, pos]
    (QK-fixed where possible), resid_linear (plain AtP), heads [layers, heads], heads_pos
    [layers, heads, pos], mlp [layers]. With ``graddrop``: also "graddrop" = {resid, heads, heads_pos,
    mlp}, GradDrop's estimates of |m_patched − m_corrupt| (magnitudes; module docstring).
    """
    fam = lm.family
    names = [f"blocks.{i}.{s}" for i in layers for s in (resid_site, "attn.head_out", "mlp.out")]
    with torch.no_grad(), hooks(lm, names) as clean_session:
        base_forward(lm, clean_in)
    mids: dict[int, torch.Tensor] = {}
    handles = []
    qk_fix = not fam.post_ln and resid_site == "resid_pre"
    if qk_fix:  # the residual stream after attention = the input of the pre-MLP norm
        for i in layers:

            def keep(mod, args, i=i):
                mids[i] = args[0]

            handles.append(lm.blocks[i].get_submodule(fam.ln_mlp).register_forward_pre_hook(keep))
    units = unit_names(lm) if graddrop else []
    taps = list(dict.fromkeys(names + units))
    dropped_terms = None
    try:
        with activation_grads_only(lm), hooks(lm, taps, _taps(taps), keep_grad=True) as session:
            hidden = base_forward(lm, corrupt_in)
            m = metric(hidden[:, -1])[0]
            acts = [session.tensors[n] for n in names]
            mid_list = [mids[i] for i in layers] if qk_fix else []
            grads = torch.autograd.grad(m, acts + mid_list, allow_unused=True, retain_graph=graddrop)
            if graddrop:
                dropped_terms = _patch_graddrop(
                    lm, m, names, acts, [session.tensors[n] for n in units], clean_session.tensors, layers
                )
    finally:
        for h in handles:
            h.remove()
    mid_grads = dict(zip(layers, grads[len(acts) :]))
    grads = grads[: len(acts)]
    m_corrupt = float(m.detach())
    seq = corrupt_in["input_ids"].shape[1]
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    resid = np.full((lm.n_layers, seq), np.nan)
    heads = np.full((lm.n_layers, n_heads), np.nan)
    heads_pos = np.full((lm.n_layers, n_heads, seq), np.nan)
    mlp = np.full(lm.n_layers, np.nan)
    for name, a, g in zip(names, acts, grads):
        layer = int(name.split(".")[1])
        delta = clean_session.tensors[name][0].double() - a.detach()[0].double()
        g = torch.zeros_like(delta) if g is None else g[0].double()
        terms = g * delta
        if name.endswith(resid_site):  # [pos, d]
            resid[layer] = m_corrupt + terms.sum(-1).numpy()
        elif name.endswith("attn.head_out"):  # [pos, heads, hd]
            n_h = lm.n_heads_at(layer)
            per = terms.sum(-1)  # [pos, heads]
            heads_pos[layer, :n_h] = m_corrupt + per.T.numpy()
            heads[layer, :n_h] = m_corrupt + per.sum(0).numpy()
        else:
            mlp[layer] = m_corrupt + float(terms.sum())
    out = {"metric_corrupt": m_corrupt, "resid_linear": resid.copy(), "heads": heads, "heads_pos": heads_pos}
    out["mlp"] = mlp
    if qk_fix:
        clean_resid = {i: clean_session.tensors[f"blocks.{i}.{resid_site}"][0] for i in layers}
        resid = _resid_qk_fixed(lm, corrupt_in, layers, clean_resid, mids, mid_grads, m_corrupt, resid)
    out["resid"] = resid
    out["qk_fix"] = qk_fix
    if dropped_terms is not None:
        out["graddrop"] = dropped_terms
    return out


def _patch_graddrop(lm, m, names, acts, units, clean, layers) -> dict:
    """GradDrop magnitudes for ``patch_atp``'s sites: (1/(U−1)) Σ_u |Σ g_u·Δ| per site (see module docstring)."""
    seq = acts[0].shape[1]
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    sums = {
        "resid": np.zeros((lm.n_layers, seq)),
        "heads": np.zeros((lm.n_layers, n_heads)),
        "heads_pos": np.zeros((lm.n_layers, n_heads, seq)),
        "mlp": np.zeros(lm.n_layers),
    }
    deltas = [clean[n][0].double() - a.detach()[0].double() for n, a in zip(names, acts)]
    passes = dropped_gradients(m, acts, [first_unit(n) for n in names], units)
    next(passes)  # the plain gradients: patch_atp has them
    for _, grads in passes:
        for name, delta, g in zip(names, deltas, grads):
            if g is None:
                continue
            layer = int(name.split(".")[1])
            terms = g[0].double() * delta
            if name.endswith("attn.head_out"):  # [pos, heads, hd]
                per = terms.sum(-1)  # [pos, heads]
                sums["heads_pos"][layer, : per.shape[1]] += per.T.abs().numpy()
                sums["heads"][layer, : per.shape[1]] += per.sum(0).abs().numpy()
            elif name.endswith("mlp.out"):
                sums["mlp"][layer] += float(terms.sum().abs())
            else:  # the residual stream [pos, d]
                sums["resid"][layer] += terms.sum(-1).abs().numpy()
    scale = 1.0 / max(1, len(units) - 1)
    out = {}
    for site, total in sums.items():
        grid = np.full_like(total, np.nan)
        grid[layers] = total[layers] * scale
        out[site] = grid
    for layer in layers:  # heads a pruned layer lacks stay NaN
        out["heads"][layer, lm.n_heads_at(layer) :] = np.nan
        out["heads_pos"][layer, lm.n_heads_at(layer) :] = np.nan
    return out


def _resid_qk_fixed(lm, corrupt_in, layers, clean_resid, mids, mid_grads, m_corrupt, resid):
    """Residual-stream estimates with layer L's attention recomputed exactly for each patched position."""
    fam = lm.family
    _, blocks, corrupt_acts = record_block_outputs(lm, corrupt_in, [f"blocks.{i}.resid_pre" for i in layers])
    out = resid.copy()
    for layer in layers:
        corrupt_resid = corrupt_acts[f"blocks.{layer}.resid_pre"][0]
        pos = torch.nonzero(~(clean_resid[layer] == corrupt_resid).all(-1)).flatten()
        if len(pos) == 0 or mid_grads[layer] is None:
            continue
        rows = torch.arange(len(pos))

        def put(x, name, pos=pos, rows=rows, clean=clean_resid[layer]):
            x = x.clone()
            x[rows, pos] = clean[pos]
            return x

        got = {}

        def stop(mod, args, got=got):
            got["mid"] = args[0]
            raise _Stop

        batch = {k: v.expand(len(pos), -1) for k, v in corrupt_in.items()}
        handle = lm.blocks[layer].get_submodule(fam.ln_mlp).register_forward_pre_hook(stop)
        try:
            with (
                torch.no_grad(),
                replay_blocks(lm, layer, blocks, torch.zeros(len(pos), dtype=torch.long)),
                hooks(lm, (), {f"blocks.{layer}.resid_pre": put}),
            ):
                try:
                    base_forward(lm, batch)
                except _Stop:
                    pass
        finally:
            handle.remove()
        delta = got["mid"].double() - mids[layer].detach().double()  # [rows, pos, d]
        est = (delta * mid_grads[layer].double()).sum(dim=(1, 2))
        out[layer, pos.numpy()] = m_corrupt + est.numpy()
    return out


def rank_correlation(approx: np.ndarray, exact: np.ndarray) -> dict:
    """Spearman and Pearson correlation over the entries both define (NaN-free)."""
    from scipy.stats import pearsonr, spearmanr

    a, b = np.asarray(approx, dtype=np.float64).ravel(), np.asarray(exact, dtype=np.float64).ravel()
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": None, "pearson": None, "n": int(len(a))}
    return {
        "spearman": round(float(spearmanr(a, b).statistic), 6),
        "pearson": round(float(pearsonr(a, b).statistic), 6),
        "n": int(len(a)),
    }
