"""A hook session: record named internals and apply interventions during one forward pass.

Every hook it registers is removed on exit, even when the forward raises. Attention scores and
patterns come from lmscope's own attention function (registered with transformers as ``"lmscope"``):
it runs SDPA when nothing about attention is requested, and the exact eager computation when it is,
so captured patterns are the true softmax probabilities, never a silent zero from SDPA.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .names import split

ATTN_IMPL = "lmscope"

#: an intervention receives the tensor and the hook name; it returns a replacement or None (keep)
Intervention = Callable[[torch.Tensor, str], "torch.Tensor | None"]

_ACTIVE: contextvars.ContextVar[HookSession | None] = contextvars.ContextVar("lmscope_session", default=None)


def lmscope_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    session = _ACTIVE.get()
    layer = getattr(module, "_lmscope_layer", None)
    if session is None or layer is None or not session.wants_attention(layer):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # Exact eager attention (the computation HF's `eager` runs), so captured patterns are the real ones.
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: each KV head serves n_rep query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask
    if mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
        # SDPA's mask builder skips a purely causal mask (is_causal fast path); rebuild it here
        q_len, k_len = query.shape[2], key.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=scores.dtype).masked_fill(
                ~mask, torch.finfo(scores.dtype).min
            )
        scores = scores + mask
        shown = scores.masked_fill(mask <= torch.finfo(scores.dtype).min / 2, float("-inf"))
    else:
        shown = scores
    session._emit(layer, "attn.scores", shown)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = session._emit(layer, "attn.pattern", pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def register_attention() -> None:
    """Make ``attn_implementation="lmscope"`` known to transformers (idempotent)."""
    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPL, lmscope_attention)
    # SDPA's own masks (boolean, or None for a purely causal batch) keep the uncaptured path as fast as
    # plain SDPA; the eager path turns them into the additive mask HF's eager attention uses
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


class HookSession:
    """Record ``names`` and apply ``interventions`` while the ``with`` block runs forwards."""

    def __init__(
        self,
        lm,
        names: list[str],
        interventions: dict[str, Intervention] | None = None,
        keep_grad: bool = False,
    ):
        self.lm = lm
        self.names = set(names)
        self.interventions = dict(interventions or {})
        self.keep_grad = keep_grad
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._token = None
        active = self.names | set(self.interventions)
        self._attn_layers = {split(n)[0] for n in active if split(n)[1] in ("attn.scores", "attn.pattern")}

    # -- called from hooks -------------------------------------------------------------------
    def wants_attention(self, layer: int) -> bool:
        return layer in self._attn_layers

    def _emit(self, layer: int | None, what: str, tensor: torch.Tensor) -> torch.Tensor:
        name = what if layer is None else f"blocks.{layer}.{what}"
        fn = self.interventions.get(name)
        if fn is not None:
            new = fn(tensor, name)
            if new is not None:
                tensor = new
        if name in self.names:
            self.tensors[name] = tensor if self.keep_grad else tensor.detach()
        return tensor

    def _wants(self, layer: int | None, what: str) -> bool:
        name = what if layer is None else f"blocks.{layer}.{what}"
        return name in self.names or name in self.interventions

    # -- hook registration -------------------------------------------------------------------
    def _output_hook(self, module: nn.Module, layer: int | None, what: str) -> None:
        def hook(mod, args, output):
            new = self._emit(layer, what, _first(output))
            return _replace_first(output, new)

        self._handles.append(module.register_forward_hook(hook))

    def _input_hook(self, module: nn.Module, layer: int | None, what: str, heads: int | None = None) -> None:
        def hook(mod, args, kwargs):
            if args:
                x = args[0]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x = kwargs[key]
            shaped = x.unflatten(-1, (heads, -1)) if heads else x
            new = self._emit(layer, what, shaped)
            if new is shaped:
                return None
            new = new.flatten(-2) if heads else new
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> HookSession:
        lm = self.lm
        fam = lm.family
        if self._wants(None, "embed"):
            self._output_hook(lm.module(fam.embed), None, "embed")
        for i, block in enumerate(lm.blocks):
            if self._wants(i, "resid_pre"):
                self._input_hook(block, i, "resid_pre")
            if self._wants(i, "attn.head_out"):
                self._input_hook(block.get_submodule(fam.o), i, "attn.head_out", heads=lm.n_heads_at(i))
            if self._wants(i, "attn.out"):
                self._output_hook(block.get_submodule(fam.o), i, "attn.out")
            if self._wants(i, "mlp.hidden"):
                self._input_hook(block.get_submodule(fam.mlp_out), i, "mlp.hidden")
            if self._wants(i, "mlp.out"):
                self._output_hook(block.get_submodule(fam.mlp_out), i, "mlp.out")
            if self._wants(i, "resid_post"):
                self._output_hook(block, i, "resid_post")
        if self._wants(None, "logits") and fam.unembed:
            self._output_hook(lm.module(fam.unembed), None, "logits")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None


@contextmanager
def hooks(lm, names=(), interventions=None, keep_grad=False):
    """``with hooks(lm, names, interventions) as s: lm.model(...)``; ``s.tensors`` holds the capture."""
    session = HookSession(lm, list(names), interventions, keep_grad)
    with session:
        yield session
