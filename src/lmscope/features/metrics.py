"""How good a dictionary is, on held-out windows: L0, FVU, cross-entropy loss recovered, dead / dense latents.

- FVU: squared reconstruction error over the variance around the **mean** (SAELens once divided by the
  variance around zero, which flatters every dictionary).
- CE loss recovered: the reconstruction is spliced into the forward in place of the site (a transcoder's
  output in place of the MLP's), and the next-token loss is placed between zero-ablating the site (0) and the
  clean model (1): ``(L_zero - L_spliced) / (L_zero - L_clean)``.
- dead: latents that never fire on the held-out tokens; dense: latents that fire on more than 10% of them.
The first position of each window (the attention sink) is never spliced, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from ..capture.session import hooks
from .activations import corpus_windows, window_batches

DENSE = 0.1


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy of predicting ids[:, 1:], number of predictions)."""
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return float(F.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="sum")), pred.shape[0]


def _splice(sae, in_site: str, out_site: str, how: str):
    """Interventions that replace ``out_site`` at positions 1: by the reconstruction (``how="sae"``) or 0."""
    seen: dict = {}

    def read(t, name):
        seen["x"] = t
        return None

    def write(t, name):
        x = seen.get("x", t) if in_site != out_site else t
        new = t.clone()
        if how == "zero":
            new[:, 1:] = 0
        else:
            new[:, 1:] = sae(x[:, 1:].float()).to(t.dtype)
        return new

    return {out_site: write} if in_site == out_site else {in_site: read, out_site: write}


@torch.no_grad()
def evaluate(lm, sae, corpus, tokens: int = 32_768, seq_len: int = 128, ce: bool = True) -> dict:
    """Metrics of ``sae`` on up to ``tokens`` held-out tokens of ``corpus`` (``ce=False``: skip the two extra
    forwards of CE loss recovered). ``frequency`` holds each latent's firing rate (for the dashboard)."""
    in_site = sae.cfg.site
    out_site = sae.cfg.out_site or in_site
    sites = [in_site] if in_site == out_site else [in_site, out_site]
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    sq_err = sum_y2 = 0.0
    sum_vec = torch.zeros(sae.cfg.d_out, dtype=torch.float64)
    l0 = 0.0
    n = 0
    loss = {"clean": 0.0, "zero": 0.0, "spliced": 0.0}
    n_pred = 0
    for ids in window_batches(corpus_windows(lm, corpus, seq_len, "eval"), 8):
        if n >= tokens:
            break
        # the clean run captures the site(s) and gives the clean loss in one forward
        with hooks(lm, sites) as session:
            out = lm.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if ce and lm.is_causal:
            clean, count = _next_token_loss(lm.output_of(out), ids)
            loss["clean"] += clean
            n_pred += count
            for how, key in (("sae", "spliced"), ("zero", "zero")):
                with hooks(lm, (), _splice(sae, in_site, out_site, how)):
                    logits = lm.output_of(
                        lm.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                    )
                loss[key] += _next_token_loss(logits, ids)[0]
        x = session.tensors[in_site][:, 1:].reshape(-1, sae.cfg.d_in).float()
        y = session.tensors[out_site][:, 1:].reshape(-1, sae.cfg.d_out).float()
        f = sae.encode(x)
        recon = sae.decode(f)
        active = f > 0
        fired += active.sum(0).double()
        l0 += float(active.sum())
        sq_err += float((recon - y).double().pow(2).sum())
        sum_y2 += float(y.double().pow(2).sum())
        sum_vec += y.double().sum(0)
        n += len(x)
    if n == 0:
        from ..errors import LmscopeError

        raise LmscopeError(
            "too few tokens to evaluate: the corpus has no held-out window",
            "pass a larger corpus (every 10th window is held out)",
        )
    variance = sum_y2 - float(sum_vec.pow(2).sum()) / n  # sum of squares around the mean
    frequency = fired / n
    metrics = {
        "tokens": n,
        "l0": l0 / n,
        "fvu": sq_err / variance,
        "mse": sq_err / n / sae.cfg.d_out,
        "dead_fraction": float((frequency == 0).double().mean()),
        "dense_fraction": float((frequency > DENSE).double().mean()),
        "frequency": frequency.float(),
    }
    if ce and lm.is_causal and n_pred:
        clean, zero, spliced = (loss[k] / n_pred for k in ("clean", "zero", "spliced"))
        metrics.update(
            ce_clean=clean,
            ce_zero_ablation=zero,
            ce_spliced=spliced,
            ce_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        )
    return metrics
