"""Activation patching: which internals carry the difference between a clean and a corrupted prompt.

Run the corrupted prompt, but copy one activation from the clean run into it, and measure how much
of the clean answer comes back: ``(m_patched - m_corrupt) / (m_clean - m_corrupt)`` (0 = corrupted,
1 = clean), where ``m`` is the logit difference target - contrast at the last position (or the target
logit alone). Sites: the residual stream entering each block (``resid_pre``) at each position, each
attention head's output (all positions), and each MLP's output (all positions).

Speed: all patches at one layer run as one batch, and the blocks before that layer are not run again:
they return what they computed in the corrupted run (``replay_blocks``), since a patch at layer L
cannot change anything before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture.session import hooks
from ..errors import LmscopeError
from .replay import base_forward, check_layers, record_block_outputs, replay_blocks, unembed
from .targets import single_token_id

# the replay helpers used to live here; kept importable under their old names
_check_layers = check_layers
__all__ = ["PatchingResult", "patch", "base_forward", "record_block_outputs", "replay_blocks", "unembed"]

RESID_SITE = "resid_pre"


def single_token(lm, text: str, role: str = "target") -> int:
    """The id of ``text`` when it is exactly one token; otherwise an error that shows its tokenization."""
    return single_token_id(lm, text, flag=f"--{role}")


# -- patching -------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """Patched metrics per site. ``resid``/``heads``/``mlp`` are normalized to [0, 1]-ish (None if undefined)."""

    model: str
    tokens: list[str]  # clean prompt tokens
    corrupt_tokens: list[str]
    target: str
    contrast: str | None
    target_id: int
    contrast_id: int | None
    metric_clean: float
    metric_corrupt: float
    resid_raw: np.ndarray  # [layers, pos] metric with resid_pre[layer, pos] patched
    heads_raw: np.ndarray  # [layers, heads]
    mlp_raw: np.ndarray  # [layers]
    layers: list[int]
    resid_site: str = RESID_SITE
    meta: dict = field(default_factory=dict)
    #: attribution-patching estimates (APPROXIMATE): raw metric grids "resid", "heads", "heads_pos"
    #: [layers, heads, pos] and "mlp", plus "correlation" with the exact grids when both were computed
    approx: dict | None = None
    exact: bool = True  # False: only the approximation was computed (the exact grids are NaN)

    @property
    def metric_name(self) -> str:
        if self.contrast is None:
            return f"logit[{self.target!r}]"
        return f"logit[{self.target!r}] - logit[{self.contrast!r}]"

    def _normalize(self, raw: np.ndarray) -> np.ndarray | None:
        span = self.metric_clean - self.metric_corrupt
        if span == 0:
            return None
        return (raw - self.metric_corrupt) / span

    @property
    def resid(self) -> np.ndarray | None:
        return self._normalize(self.resid_raw)

    @property
    def heads(self) -> np.ndarray | None:
        return self._normalize(self.heads_raw)

    @property
    def mlp(self) -> np.ndarray | None:
        return self._normalize(self.mlp_raw)

    def approx_normalized(self, site: str) -> np.ndarray | None:
        """An APPROXIMATE grid ("resid", "heads", "heads_pos", "mlp") normalized like the exact ones."""
        return None if self.approx is None else self._normalize(self.approx[site])

    def to_json(self) -> dict:
        def grid(a):
            if a is None:
                return None
            if a.ndim == 3:
                return [grid(x) for x in a]
            return [[_num(v) for v in row] for row in a] if a.ndim == 2 else [_num(v) for v in a]

        approx = None
        if self.approx is not None:
            sites = ("resid", "resid_linear", "heads", "heads_pos", "mlp")
            approx = {
                "approximate": True,
                "method": self.approx["method"],
                "label": self.approx["label"],
                "resid_qk_fix": self.approx.get("qk_fix", False),
                **{site: grid(self.approx_normalized(site)) for site in sites},
                "raw": {site: grid(self.approx[site]) for site in sites},
                "correlation_with_exact": self.approx.get("correlation"),
            }
            if "graddrop" in self.approx:  # magnitudes |Δm|, normalized by |m_clean − m_corrupt|
                span = abs(self.metric_clean - self.metric_corrupt)
                gd = self.approx["graddrop"]
                approx["graddrop"] = {
                    "approximate": True,
                    "label": self.approx["graddrop_label"],
                    **{site: grid(gd[site] / span) if span else None for site in gd},
                    "raw": {site: grid(gd[site]) for site in gd},
                }
        exact = {} if self.exact else {"exact_computed": False}
        return {
            "model": self.model,
            "tokens": self.tokens,
            "corrupt_tokens": self.corrupt_tokens,
            "target": self.target,
            "contrast": self.contrast,
            "target_id": self.target_id,
            "contrast_id": self.contrast_id,
            "metric": self.metric_name,
            "metric_clean": self.metric_clean,
            "metric_corrupt": self.metric_corrupt,
            "normalization": "(m_patched - m_corrupt) / (m_clean - m_corrupt): 0 = corrupted, 1 = clean",
            "layers": self.layers,
            "resid_site": self.resid_site,
            "resid": grid(self.resid),
            "heads": grid(self.heads),
            "mlp": grid(self.mlp),
            "raw": {"resid": grid(self.resid_raw), "heads": grid(self.heads_raw), "mlp": grid(self.mlp_raw)},
            **exact,
            "approx": approx,
            **self.meta,
        }


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 6)


def patch(
    lm,
    clean: str,
    corrupt: str,
    target: str,
    contrast: str | None = None,
    layers: Sequence[int] | None = None,
    normalize: bool = True,
    skip_identical: bool = True,
    approx: str | None = None,
    exact: bool = True,
    progress=None,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one site at a time; see the module docstring.

    ``normalize=True`` raises when the clean and corrupted metrics are equal (nothing to restore);
    ``normalize=False`` allows it (the raw grids are still right, the normalized ones are None).
    ``skip_identical``: a residual position whose clean and corrupted activations are equal (e.g. the
    tokens before the first changed one) is not run; patching it cannot change anything, so its
    metric is the corrupted one. ``approx="atp"`` adds attribution-patching estimates of every site
    and of each head at each position (APPROXIMATE; ``explain.atp``) in ``result.approx``, with their
    correlation to the exact grids; ``exact=False`` (only with ``approx``) skips the exact runs.
    ``progress(done, total)`` is called after each layer of exact runs.
    """
    if approx not in (None, "atp", "atp-graddrop"):
        raise LmscopeError(
            f"unknown approximation '{approx}'",
            "use --approx atp or --approx atp-graddrop (or leave it out: exact)",
        )
    if not exact and not approx:
        raise LmscopeError(
            "nothing to compute: exact patching is off and no approximation is asked for", "add --approx atp"
        )
    classifier = lm.task == "classifier"
    if not lm.is_causal and not classifier:
        raise LmscopeError(
            f"activation patching needs a causal language model or a sequence classifier; {lm.name} is a"
            f"{'n' if lm.task == 'encoder' else ''} {lm.task}",
            "use a causal model such as smollm2, or a classifier",
        )
    if classifier and approx:
        raise LmscopeError("--approx atp is for causal LMs", "drop --approx for classifiers (exact patching)")
    layers = check_layers(lm, layers)
    if classifier:  # target / contrast are classes (names or indices); the metric is their logit (difference)
        from .targets import label_index

        target_id = label_index(lm, target, "--target")
        contrast_id = label_index(lm, contrast, "--contrast") if contrast is not None else None
    else:
        target_id = single_token(lm, target, "target")
        contrast_id = single_token(lm, contrast, "contrast") if contrast is not None else None
    clean_in, corrupt_in = lm.encode(clean), lm.encode(corrupt)
    n_clean, n_corrupt = clean_in["input_ids"].shape[1], corrupt_in["input_ids"].shape[1]
    if n_clean != n_corrupt:
        raise LmscopeError(
            f"the clean prompt is {n_clean} tokens and the corrupted one {n_corrupt}; they must be equally long",
            "change words for words of the same token count (e.g. swap one name for another)",
        )

    def from_logits(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        m = logits[:, target_id]
        return m - logits[:, contrast_id] if contrast_id is not None else m

    def metric(hidden_last: torch.Tensor) -> torch.Tensor:
        return from_logits(unembed(lm, hidden_last))

    def run_metric(batch) -> torch.Tensor:
        """The metric of one forward over ``batch`` (a classifier's head reads the whole sequence)."""
        if classifier:
            return from_logits(lm.output_of(lm.forward(batch)))
        return metric(base_forward(lm, batch)[:, -1])

    site_names = [f"blocks.{i}.{s}" for i in layers for s in (RESID_SITE, "attn.head_out", "mlp.out")]
    clean_hidden, _, clean_acts = record_block_outputs(lm, clean_in, site_names)
    resid_names = [f"blocks.{i}.{RESID_SITE}" for i in layers]
    corrupt_hidden, corrupt_blocks, corrupt_acts = record_block_outputs(lm, corrupt_in, resid_names)
    with torch.no_grad():
        if classifier:
            m_clean, m_corrupt = float(run_metric(clean_in)[0]), float(run_metric(corrupt_in)[0])
        else:
            m_clean = float(metric(clean_hidden[:, -1])[0])
            m_corrupt = float(metric(corrupt_hidden[:, -1])[0])
    if normalize and abs(m_clean - m_corrupt) < 1e-6:
        raise LmscopeError(
            f"the metric is the same for both prompts ({m_clean:.4f}), so there is nothing to restore",
            "make the corrupted prompt change the answer (e.g. swap the names), or pick another target",
        )

    seq = n_clean
    n_heads = max(lm.n_heads_at(i) for i in range(lm.n_layers))
    resid_raw = np.full((lm.n_layers, seq), np.nan)
    heads_raw = np.full((lm.n_layers, n_heads), np.nan)
    mlp_raw = np.full(lm.n_layers, np.nan)
    n_runs = 0
    for done, layer in enumerate(layers if exact else []):
        h_here = lm.n_heads_at(layer)
        clean_resid = clean_acts[f"blocks.{layer}.{RESID_SITE}"][0]
        clean_heads = clean_acts[f"blocks.{layer}.attn.head_out"][0]
        clean_mlp = clean_acts[f"blocks.{layer}.mlp.out"][0]
        pos = torch.arange(seq)
        if skip_identical:
            same = (clean_resid == corrupt_acts[f"blocks.{layer}.{RESID_SITE}"][0]).all(-1)
            pos = pos[~same]
            resid_raw[layer, same.numpy()] = m_corrupt
        n_pos = len(pos)
        rows = n_pos + h_here + 1  # one row per patched position, per head, and the MLP
        resid_rows = torch.arange(n_pos)

        def put_resid(x, name, clean_resid=clean_resid, pos=pos, resid_rows=resid_rows):
            x = x.clone()
            x[resid_rows, pos] = clean_resid[pos]
            return x

        def put_heads(x, name, clean_heads=clean_heads, h_here=h_here, n_pos=n_pos):
            x = x.clone()
            for h in range(h_here):
                x[n_pos + h, :, h] = clean_heads[:, h]
            return x

        def put_mlp(x, name, clean_mlp=clean_mlp, n_pos=n_pos, h_here=h_here):
            x = x.clone()
            x[n_pos + h_here] = clean_mlp
            return x

        interventions = {
            f"blocks.{layer}.{RESID_SITE}": put_resid,
            f"blocks.{layer}.attn.head_out": put_heads,
            f"blocks.{layer}.mlp.out": put_mlp,
        }
        batch = {k: v.expand(rows, -1) for k, v in corrupt_in.items()}
        zeros = torch.zeros(rows, dtype=torch.long)
        with torch.no_grad(), replay_blocks(lm, layer, corrupt_blocks, zeros), hooks(lm, (), interventions):
            values = run_metric(batch).double().numpy()
        n_runs += rows
        resid_raw[layer, pos.numpy()] = values[:n_pos]
        heads_raw[layer, :h_here] = values[n_pos : n_pos + h_here]
        mlp_raw[layer] = values[n_pos + h_here]
        if progress is not None:
            progress(done + 1, len(layers))

    approx_grids = None
    if approx:
        from .atp import GRADDROP_LABEL, LABEL, patch_atp, rank_correlation

        graddrop = approx == "atp-graddrop"
        approx_grids = patch_atp(lm, clean_in, corrupt_in, layers, metric, graddrop=graddrop)
        approx_grids.update(method=approx, label=LABEL)
        if graddrop:
            approx_grids["graddrop_label"] = GRADDROP_LABEL
        if exact:
            pairs = (
                ("resid", resid_raw),
                ("resid_linear", resid_raw),
                ("heads", heads_raw),
                ("mlp", mlp_raw),
            )
            approx_grids["correlation"] = {
                site: rank_correlation(approx_grids[site], grid) for site, grid in pairs
            }
            if graddrop:  # magnitudes, compared with |exact effect| beside |plain AtP effect|
                for site, grid in pairs[2:] + pairs[:1]:
                    effect = np.abs(grid - m_corrupt)
                    approx_grids["correlation"][f"{site}_graddrop_vs_abs"] = rank_correlation(
                        approx_grids["graddrop"][site], effect
                    )
                    atp_site = "resid_linear" if site == "resid" else site
                    approx_grids["correlation"][f"{site}_abs_vs_abs"] = rank_correlation(
                        np.abs(approx_grids[atp_site] - m_corrupt), effect
                    )

    return PatchingResult(
        model=lm.name,
        tokens=lm.token_strings(clean_in["input_ids"][0]),
        corrupt_tokens=lm.token_strings(corrupt_in["input_ids"][0]),
        target=target,
        contrast=contrast,
        target_id=target_id,
        contrast_id=contrast_id,
        metric_clean=m_clean,
        metric_corrupt=m_corrupt,
        resid_raw=resid_raw,
        heads_raw=heads_raw,
        mlp_raw=mlp_raw,
        layers=layers,
        meta={"kv_heads": [lm.kv_group(h) for h in range(n_heads)], "patched_runs": n_runs},
        approx=approx_grids,
        exact=exact,
    )
