"""Least-squares compensation for structured pruning (the refit of ZipLM, SlimGPT and GPTQ's OBS update
without the quantizer): after heads or MLP neurons go, the layer that consumes them (the attention output
projection, the MLP's down projection) is re-solved on calibration inputs so the block writes what the
original wrote from what is kept.

With X the original layer's calibration inputs and Σ = XᵀX their Gram matrix, keeping the input columns K
gives ``W' = argmin ‖X_K W'ᵀ − X Wᵀ‖² + λ‖W'‖² = W Σ[:, K] (Σ[K, K] + λI)⁻¹`` with λ = ``damp`` x the mean of
diag Σ[K, K] (ridge damping, as SparseGPT / GPTQ). Σ is collected once, from the *original* model's inputs,
for every layer at once, so each layer's refit is independent of what happens to the others (the search caches
one per layer and level). The refit is kept only where it reconstructs better than plain slicing (errors
computed exactly from Σ), so it never increases the layer's output error on the calibration inputs.
"""

from __future__ import annotations

import hashlib

import torch

from ...errors import LmscopeError
from ._linear import _new_like, weight_out_in

#: defaults: calibration tokens and window for the Gram matrices, ridge damping
REFIT_TOKENS, REFIT_WINDOW, REFIT_DAMP = 8192, 128, 0.01


def refit_windows(lm, text: str | None, tokens: int = REFIT_TOKENS, window: int = REFIT_WINDOW):
    """The token windows the Gram matrices are collected on: [n, window] LongTensor."""
    from ...data import token_windows

    return token_windows(lm, text, max_tokens=tokens, window=window)


def tokens_digest(windows: torch.Tensor) -> str:
    """A short fingerprint of the calibration tokens, so compress can tell it refits on the search's tokens."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def collect_grams(lm, windows: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Σ = XᵀX (float64) of the input of every block's attention output projection (``("attn", i)``) and MLP
    down projection (``("mlp", i)``) over the calibration windows, in one pass of the model as it is."""
    fam = lm.family
    grams: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []

    def hook(key):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            g = (x.T @ x).to(torch.float64)  # one window in fp32, the sum over windows in fp64
            grams[key] = grams[key] + g if key in grams else g

        return pre

    try:
        for i, block in enumerate(lm.blocks):
            hooks.append(block.get_submodule(fam.o).register_forward_pre_hook(hook(("attn", i))))
            if fam.mlp_out is not None:
                hooks.append(block.get_submodule(fam.mlp_out).register_forward_pre_hook(hook(("mlp", i))))
        for row in windows:
            ids = row[None]
            lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return grams


def refit_weight(
    weight: torch.Tensor, gram: torch.Tensor, kept: list[int], damp: float = REFIT_DAMP
) -> tuple[torch.Tensor, float, float]:
    """(W' [out, |kept|], error of W', error of plain slicing W[:, kept]) for an [out, in] weight whose input
    Gram matrix is ``gram``; errors are ‖X_K W'ᵀ − X Wᵀ‖² on the calibration inputs, exact from Σ."""
    W = weight.detach().to(torch.float64)
    idx = torch.as_tensor(list(kept), dtype=torch.long)
    rest = torch.ones(W.shape[1], dtype=torch.bool)
    rest[idx] = False
    s_kk = gram[idx][:, idx]
    lam = damp * float(s_kk.diagonal().mean()) if damp > 0 else 0.0
    a = s_kk + lam * torch.eye(len(idx), dtype=torch.float64)
    rhs = gram[idx] @ W.T  # Σ[K, :] Wᵀ: [|K|, out]
    new = torch.linalg.solve(a, rhs).T  # [out, |K|]

    def error(w_kept):
        d = -W.clone()
        d[:, idx] += w_kept
        return float(torch.einsum("oi,ij,oj->", d, gram, d))

    return new, error(new), error(W[:, idx])


def head_columns(lm, heads: list[int]) -> list[int]:
    """The attention output projection's input columns that belong to query heads ``heads``."""
    hd = lm.head_dim
    return [h * hd + d for h in sorted(heads) for d in range(hd)]


def refit_projection(
    block, path: str, weight_full: torch.Tensor, gram, kept, damp: float = REFIT_DAMP
) -> dict:
    """Replace ``block.path`` (already sliced to the input columns ``kept`` of ``weight_full``, its [out, in]
    weight before slicing) by the refit when that reconstructs better than the slice. Returns
    {"refit": used, "error": ..., "error_plain": ...}, errors relative to ‖X Wᵀ‖²."""
    from ..targets import set_module

    module = block.get_submodule(path)
    new, err, err_plain = refit_weight(weight_full, gram, kept, damp)
    w = weight_full.detach().to(torch.float64)
    total = max(float(torch.einsum("oi,ij,oj->", w, gram, w)), 1e-300)
    used = err < err_plain
    if used:
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        set_module(block, path, _new_like(module, new.to(weight_out_in(module).dtype), bias))
    return {"refit": used, "error": err / total, "error_plain": err_plain / total}


def calibration_grams(lm, calib, spec: dict, step: str) -> dict[tuple[str, int], torch.Tensor]:
    """The Gram matrices a keep step's ``refit`` spec asks for, collected once per ``compress`` call (cached on
    its Calibration, so a keep_neurons step after keep_heads still refits on the unpruned model's inputs, as
    the search did) after checking the tokens are the ones the search refit on."""
    cache = calib.__dict__.setdefault("_refit_grams", {})
    key = (spec["tokens"], spec["window"])
    if key not in cache:
        windows = refit_windows(lm, calib.text, spec["tokens"], spec["window"])
        digest = tokens_digest(windows)
        if digest != spec["digest"]:
            raise LmscopeError(
                f"{step} refit: these calibration tokens (digest {digest}) are not the ones the recipe was "
                f"refit on ({spec['digest']})",
                "pass compress the same --calibration-file the search used (none: the built-in text)",
            )
        cache[key] = cached_grams(lm, windows)
    return cache[key]


#: the last Gram matrices collected, keyed by (fingerprint of every weight, of the tokens): a search and the
#: compress calls after it in one process (benchmarks) collect them once; any other weights or tokens miss
_LAST: list = []


def weights_fingerprint(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_grams(lm, windows: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """``collect_grams``, reusing the last result when the model's weights and the tokens are the same."""
    key = (weights_fingerprint(lm.model), tokens_digest(windows), windows.shape)
    if _LAST and _LAST[0] == key:
        return _LAST[1]
    grams = collect_grams(lm, windows)
    _LAST[:] = [key, grams]
    return grams


def clear_cache() -> None:
    _LAST.clear()
