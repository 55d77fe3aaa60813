"""W8A8 with outlier handling (``w8a8-smooth``): SmoothQuant scaling + outlier channels kept in bf16.

Small LMs carry a few activation channels 100x larger than the rest; a per-token int8 scale set by them
rounds every other channel to a handful of levels. On calibration text this scheme

1. measures each linear's per-input-channel activation max and keeps a token sample;
2. migrates difficulty from activations to weights, per group of linears sharing an input:
   ``s_j = max|X_j|^a / max|W_j|^(1-a)``, input divided by ``s`` (folded into the preceding RMSNorm
   weight, into ``v_proj`` rows for ``o_proj`` (GQA aware) and into ``up_proj`` rows for
   ``down_proj``), weight columns multiplied by ``s``. The strength ``a`` is searched per group on the
   sample (output error of simulated W8A8), so the model's fp function is unchanged (exact fold);
3. keeps the input channels that still dominate after smoothing (max above ``OUTLIER_RATIO`` x the
   median channel max, at most ``MAX_OUTLIERS``) out of int8: those columns run as a bf16 matmul.
"""

from __future__ import annotations

import torch

from ...progress import track
from . import Quantized, scheme
from . import _common as C
from .affine import fake_quantize

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_TOKENS = 256
OUTLIER_RATIO = 40.0
MAX_OUTLIERS = 8


@torch.no_grad()
def _activation_stats(lm, names, windows):
    amax = {n: None for n in names}
    sample: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    seen = {"tokens": 0}
    handles = []
    for n in names:

        def pre(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            m = x.abs().amax(dim=0)
            amax[n] = m if amax[n] is None else torch.maximum(amax[n], m)
            have = sum(len(t) for t in sample[n])
            if have < SAMPLE_TOKENS:
                sample[n].append(x[: SAMPLE_TOKENS - have])

        handles.append(lm.model.get_submodule(n).register_forward_pre_hook(pre))
    try:
        for ids in track(windows, "SmoothQuant statistics", unit="window"):
            lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            seen["tokens"] += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
    return amax, {n: torch.cat(v) for n, v in sample.items() if v}


def _fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xs = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(x / xs).clamp(-127, 127) * xs
    return xq @ fake_quantize(w, C.INT8_CHANNEL).t()


def _search(xs: list[torch.Tensor], ws: list[torch.Tensor], act_max, w_max, expand=None):
    """The alpha (and smoothing vector) minimising the simulated W8A8 output error of a linear group."""
    refs = [x @ w.t() for x, w in zip(xs, ws)]
    best = (float("inf"), None, None)
    for a in (None, *ALPHAS):
        if a is None:
            s = torch.ones_like(act_max)
        else:
            s = (act_max.clamp_min(1e-5) ** a / w_max.clamp_min(1e-5) ** (1 - a)).clamp(1e-4, 1e4)
        s_in = s if expand is None else s[expand]
        err = sum(
            float(((_fake_w8a8(x / s_in, w * s_in) - r) ** 2).sum() / (r**2).sum())
            for x, w, r in zip(xs, ws, refs)
        )
        if err < best[0]:
            best = (err, a, s)
    return best[1], best[2]


def _outliers(act_max_smoothed: torch.Tensor) -> list[int]:
    med = act_max_smoothed.median().clamp_min(1e-12)
    ratio = act_max_smoothed / med
    idx = torch.argsort(ratio, descending=True)[:MAX_OUTLIERS]
    return sorted(int(i) for i in idx if ratio[i] > OUTLIER_RATIO)


@scheme("w8a8-smooth")
@torch.no_grad()
def quantize_w8a8_smooth(lm, step, calib, targets) -> list[Quantized]:
    fam = lm.family
    by_name = dict(targets)
    names = list(by_name)
    amax, sample = _activation_stats(lm, names, calib.windows())
    scales: dict[str, torch.Tensor] = {}  # linear name -> its input divisor
    alphas: dict[str, float | None] = {}
    folds = not fam.post_ln and not fam.conv1d and not fam.fused_qkv
    if folds:
        for i, block in enumerate(lm.blocks):
            pre = f"{fam.blocks}.{i}."
            groups = []  # (module whose output rows absorb the scales, layers reading it, mode)
            if fam.ln_attn:  # only norms known to feed exactly q/k/v (models/families.py)
                groups.append((fam.ln_attn, [fam.q, fam.k, fam.v], None))
            if fam.ln_mlp and fam.mlp_in:
                groups.append((fam.ln_mlp, list(fam.mlp_in), None))
            if fam.gated_mlp and len(fam.mlp_in) == 2:  # act(gate) * up: up_proj rows -> down_proj input
                groups.append((fam.mlp_in[-1], [fam.mlp_out], None))
            groups.append((fam.v, [fam.o], "gqa"))
            for src, dsts, mode in groups:
                full = [pre + d for d in dsts]
                if not all(n in by_name for n in full) or any(n not in sample for n in full):
                    continue
                src_mod = block.get_submodule(src)
                ws = [by_name[n].weight.detach().float() for n in full]
                act = torch.stack([amax[n] for n in full]).amax(0)
                wmax = torch.cat(ws).abs().amax(0)
                expand = None
                if mode == "gqa":
                    if src_mod not in by_name.values():
                        continue
                    hd = lm.head_dim
                    n_heads = ws[0].shape[1] // hd
                    n_kv = src_mod.out_features // hd
                    rep = n_heads // max(1, n_kv)
                    # o input channel (h, d) reads v channel (h // rep, d)
                    expand = torch.tensor([(h // rep) * hd + d for h in range(n_heads) for d in range(hd)])
                    act = torch.zeros(n_kv * hd).scatter_reduce(0, expand, act, "amax", include_self=True)
                    wmax = torch.zeros(n_kv * hd).scatter_reduce(0, expand, wmax, "amax", include_self=True)
                if mode is None and not hasattr(src_mod, "weight"):
                    continue
                a, s = _search([sample[n] for n in full], ws, act, wmax, expand)
                for n in full:
                    alphas[n] = a
                if a is None:
                    continue
                s_in = s if expand is None else s[expand]
                # fold: source output / s (norm weight or linear rows), destination columns * s
                src_w = src_mod.weight
                if src_w.dim() == 1:
                    src_w.data.div_(s)
                else:
                    src_w.data.div_(s[:, None])
                    if getattr(src_mod, "bias", None) is not None:
                        src_mod.bias.data.div_(s)
                for n in full:
                    by_name[n].weight.data.mul_(s_in[None, :])
                    scales[n] = scales[n] * s_in if n in scales else s_in.clone()
            # a source that is itself a target (v_proj, up_proj) had its rows divided: its reference
            # weight is the folded one, which is what it now computes.
    out = []
    for n, lin in targets:
        s_in = scales.get(n)
        act = amax[n] / s_in if s_in is not None else amax[n]
        outl = _outliers(act)
        how = "w8a8 " + (f"smooth a={alphas[n]}" if alphas.get(n) is not None else "unsmoothed")
        if outl:
            how += f", {len(outl)} bf16 outlier ch"
        out.append(
            Quantized(
                n,
                C.make_w8a8(lin, outliers=outl or None),
                "w8a8",
                lin.weight.detach().float().clone(),
                lin.bias,
                how,
                input_scale=s_in,
                meta={"n_outliers": len(outl)},
            )
        )
    return out
