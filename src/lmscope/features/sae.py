"""Sparse dictionaries: TopK and ReLU+L1 sparse autoencoders and transcoders, saved in SAELens's format.

One module, ``Dictionary``, holds all three kinds with SAELens's tensor names and conventions:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``;
``encode(x) = act((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)`` with ``act`` = ReLU (``standard``),
ReLU of the k largest (``topk``) — and ``decode(f) = f @ W_dec + b_dec``. A transcoder reads one site and
writes another (``d_out`` may differ from ``d_in``; SAELens's ``transcoder`` architecture: ReLU, trained with L1,
and no b_dec subtracted from its input).
A folder holds ``cfg.json`` (SAELens 6 layout: architecture, d_in, d_sae, k, metadata.hook_name …) and
``sae_weights.safetensors``; lmscope's own settings ride in ``metadata`` keys SAELens ignores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LmscopeError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
KINDS = ("topk", "relu", "transcoder")
#: lmscope kind -> SAELens architecture
ARCHITECTURE = {"topk": "topk", "relu": "standard", "transcoder": "transcoder"}
#: SAELens writes this version into metadata; loaders before 6.0 read a flat config (handled on load)
SAELENS_FORMAT_VERSION = "6.0.0"

#: lmscope site (after ``blocks.L.``) -> TransformerLens hook name (what SAELens's hook_name holds)
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn.out": "hook_attn_out",
    "mlp.out": "hook_mlp_out",
    "mlp.hidden": "mlp.hook_post",
    "attn.head_out": "attn.hook_z",
}


def hook_name(site: str) -> str:
    """``blocks.15.resid_post`` -> ``blocks.15.hook_resid_post`` (TransformerLens / SAELens naming)."""
    parts = site.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _TL_HOOKS:
        return f"blocks.{parts[1]}.{_TL_HOOKS[parts[2]]}"
    return site


def site_of_hook(name: str) -> str:
    """The inverse of ``hook_name`` (a name lmscope already uses passes through)."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks":
        for ours, theirs in _TL_HOOKS.items():
            if parts[2] == theirs:
                return f"blocks.{parts[1]}.{ours}"
    return name


@dataclass
class DictionaryConfig:
    """What a dictionary is: its kind, sizes, the site(s) it reads and writes, and how it was trained."""

    kind: str  # topk | relu | transcoder
    d_in: int
    d_sae: int
    site: str  # the site it reads (a transcoder: its input site)
    d_out: int | None = None  # transcoder output width (default: d_in)
    out_site: str | None = None  # transcoder: the site it writes
    k: int | None = None  # topk (and a topk transcoder)
    l1_coefficient: float | None = None  # relu
    model_name: str = ""
    context_size: int = 128
    extra: dict = field(default_factory=dict)  # training settings and provenance

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LmscopeError(f"unknown dictionary kind '{self.kind}'", f"use one of: {', '.join(KINDS)}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.kind == "topk" and not self.k:
            raise LmscopeError("a topk dictionary needs k", "pass --k (e.g. 64)")


class Dictionary(nn.Module):
    """A sparse autoencoder (``topk``, ``relu``) or transcoder, with SAELens's parameters and conventions."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))  # noqa: N815 (SAELens's names)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out))  # noqa: N815
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))

    @property
    def apply_b_dec_to_input(self) -> bool:
        return self.cfg.kind != "transcoder"  # b_dec lives in the output space of a transcoder

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random unit vectors, encoder its transpose (the usual tied init), biases zero."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=generator)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            if self.cfg.d_out == self.cfg.d_in:
                self.W_enc.copy_(w.T)
            else:
                e = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
                self.W_enc.copy_(e / e.norm(dim=0, keepdim=True))
            self.b_enc.zero_()
            self.b_dec.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` (``[..., d_in] -> [..., d_sae]``)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.k:
            values, index = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows back to unit norm (the scale moves into activations, as SAELens trains)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of W_dec's gradient along each row, so Adam does not fight the unit norm."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    # -- SAELens format ------------------------------------------------------------------------------
    def saelens_config(self) -> dict:
        c = self.cfg
        cfg = {
            "architecture": ARCHITECTURE[c.kind],
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "dtype": str(self.W_enc.dtype).replace("torch.", ""),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "sae_lens_training_version": None,
                "model_name": c.model_name,
                "hook_name": hook_name(c.site),
                "hook_head_index": None,
                "context_size": c.context_size,
                "prepend_bos": False,
                "lmscope": {k: v for k, v in asdict(c).items() if k not in ("d_in", "d_sae")},
            },
        }
        if c.kind == "topk":
            cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
        if c.kind == "transcoder":
            cfg["d_out"] = c.d_out
            cfg["metadata"]["hook_name_out"] = hook_name(c.out_site or c.site)
        return cfg

    def save(self, folder) -> Path:
        """``cfg.json`` + ``sae_weights.safetensors`` in ``folder`` (written by renames: whole or absent)."""
        from safetensors.torch import save_file

        from ..fsutil import atomic_directory

        folder = Path(folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_directory(folder) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CFG_FILE).write_text(json.dumps(self.saelens_config(), indent=1))
        return folder

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return f"Dictionary({c.kind}, {c.site}, d_in={c.d_in}, d_sae={c.d_sae}{k})"


def load(folder) -> Dictionary:
    """A dictionary from a SAELens-format folder (saved by lmscope or by SAELens; 6.x or older flat configs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise LmscopeError(
            f"'{folder}' is not a dictionary folder (needs {CFG_FILE} and {WEIGHTS_FILE})",
            "pass the --out of lmscope features train, or a SAELens save_model folder",
        )
    try:
        raw = json.loads(cfg_path.read_text())
        state = load_file(str(weights_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise LmscopeError(
            f"'{folder}' is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
            "retrain it, or point --sae at an intact folder",
        ) from None
    meta = raw.get("metadata") or {}
    ours = meta.get("lmscope") or {}
    arch = raw.get("architecture", "standard")
    kind = {"topk": "topk", "standard": "relu", "transcoder": "transcoder"}.get(arch)
    if kind is None:
        raise LmscopeError(
            f"'{folder}' holds a SAELens '{arch}' dictionary, which lmscope does not read",
            "use a topk, standard (ReLU) or transcoder dictionary",
        )
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or ""
    needed = {"W_enc", "W_dec", "b_enc", "b_dec"}
    if not needed <= set(state):
        raise LmscopeError(
            f"'{folder}' lacks tensors {', '.join(sorted(needed - set(state)))}",
            "pass a SAELens-format dictionary folder",
        )
    d_in, d_sae = state["W_enc"].shape
    if raw.get("rescale_acts_by_decoder_norm"):
        with torch.no_grad():  # fold the decoder norms in, as SAELens's fold_W_dec_norm does: same outputs
            norms = state["W_dec"].float().norm(dim=1).clamp_min(1e-8)
            state["W_dec"] = state["W_dec"].float() / norms[:, None]
            state["W_enc"] = state["W_enc"].float() * norms[None, :]
            state["b_enc"] = state["b_enc"].float() * norms
    if raw.get("apply_b_dec_to_input") is False and kind != "transcoder":
        raise LmscopeError(
            f"'{folder}' was saved with apply_b_dec_to_input=false, which lmscope does not read",
            "fold b_dec into b_enc before saving",
        )
    cfg = DictionaryConfig(
        kind=kind,
        d_in=int(d_in),
        d_sae=int(d_sae),
        site=ours.get("site") or site_of_hook(hook),
        d_out=int(state["W_dec"].shape[1]),
        out_site=ours.get("out_site")
        or (site_of_hook(meta["hook_name_out"]) if meta.get("hook_name_out") else None),
        k=raw.get("k") if kind == "topk" else None,
        l1_coefficient=ours.get("l1_coefficient"),
        model_name=meta.get("model_name") or raw.get("model_name") or "",
        context_size=int(meta.get("context_size") or raw.get("context_size") or 128),
        extra=ours.get("extra") or {},
    )
    sae = Dictionary(cfg)
    if tuple(state["W_dec"].shape) != (d_sae, cfg.d_out) or state["b_enc"].shape[0] != d_sae:
        raise LmscopeError(f"'{folder}' has inconsistent tensor shapes", "retrain or re-save it")
    sae.load_state_dict({k: state[k].float() for k in needed})
    sae.folder = folder  # where explanations.json may sit beside it (features.analysis.load_explanations)
    return sae.eval()
