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

from ..errors import LmscopeError
from .names import ATTENTION_INTERNALS, all_names, expand, split

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
    if session is not None and session.lm.family.shared:  # one module at every depth: counted per call
        layer = session._layer_now
    softcap = kwargs.get("softcap")
    wanted = session is not None and layer is not None and session.wants_attention(layer)
    if (
        not wanted and softcap is None
    ):  # SDPA cannot soft-cap scores: those families always take the eager math
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if wanted:
        query = session._emit(layer, "attn.q", query)
        key = session._emit(layer, "attn.k", key)
        value = session._emit(layer, "attn.v", value)
    # Exact eager attention (the computation HF's `eager` runs), so captured patterns are the real ones.
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: each KV head serves n_rep query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep, additive = _masks(session, module, attention_mask, query, key, scores.dtype)
    if wanted and session.wants(
        layer, "attn.scores"
    ):  # masked entries shown as -inf, as TransformerLens does
        shown = scores if keep is None else scores.masked_fill(~keep, float("-inf"))
        session._emit(layer, "attn.scores", shown)
    if additive is not None:
        scores = scores + additive
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if wanted:
        pattern = session._emit(layer, "attn.pattern", pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _masks(session, module, attention_mask, query, key, dtype):
    """(boolean keep-mask, additive float mask) for the eager path, built once per forward and shape.

    SDPA's mask builder passes a boolean mask, or None for a purely causal batch (is_causal fast path).
    The additive form (0 / dtype-min) is what HF's eager attention adds to the scores.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", False) and q_len > 1
    if attention_mask is None and not causal:
        return None, None
    cache = session._mask_cache if session is not None else {}
    key_ = (None if attention_mask is None else attention_mask.data_ptr(), q_len, k_len, dtype, causal)
    hit = cache.get(key_)
    if hit is not None:
        return hit
    if attention_mask is None:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        keep = attention_mask[:, :, :, :k_len]
    else:  # an additive mask given by the caller
        additive = attention_mask[:, :, :, :k_len].to(dtype)
        keep = additive > torch.finfo(dtype).min / 2
        cache[key_] = (keep, additive)
        return keep, additive
    additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, torch.finfo(dtype).min
    )
    cache[key_] = (keep, additive)
    return keep, additive


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


def _resolve(lm, patterns, what: str) -> list[str]:
    """Concrete hook names for ``patterns`` (globs as for capture); a pattern matching nothing is an error.

    Exact names are checked against the name table directly (sessions are opened per head in ablation loops).
    """
    patterns = list(patterns)
    moe = lm.family.moe
    universe = set(all_names(lm.n_layers, has_logits=lm.is_causal, moe=moe))
    if all(p in universe for p in patterns):
        return patterns
    try:
        return expand(patterns, lm.n_layers, has_logits=lm.is_causal, moe=moe)
    except LmscopeError as e:
        if what == "capture":
            raise
        raise LmscopeError(e.problem.replace("capture name", f"{what} name", 1), e.fix) from None


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
        self.names = set(_resolve(lm, names, "capture")) if names else set()
        self.interventions = {
            name: fn
            for pat, fn in (interventions or {}).items()
            for name in _resolve(lm, [pat], "intervention")
        }
        self.keep_grad = keep_grad
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._mask_cache: dict = {}
        self._token = None
        active = self.names | set(self.interventions)
        self._attn_layers = {split(n)[0] for n in active if split(n)[1] in ATTENTION_INTERNALS}
        self._check_supported(active)

    def _check_supported(self, active: set[str]) -> None:
        """Refuse, in one line, what this family cannot give exactly."""
        fam = self.lm.family
        for name in sorted(active):
            layer, what = split(name)
            if fam.native_attention:
                unsupported = set(ATTENTION_INTERNALS) - {"attn.pattern"}
                if what in unsupported or (what == "attn.pattern" and name in self.interventions):
                    raise LmscopeError(
                        f"'{name}' is not available for {fam.name}: it computes attention in its own code, "
                        "so lmscope reads only the patterns it returns (output_attentions) and cannot intervene on them",
                        "capture blocks.*.attn.pattern, head_out, resid_* or mlp.* instead",
                    )
            if what == "resid_mid" and fam.mid is None:
                raise LmscopeError(
                    f"'{name}' does not exist in {fam.name}: attention and MLP read the same residual in parallel",
                    "capture resid_pre / attn.out / mlp.out / resid_post instead",
                )
            if what in ("mlp.router", "mlp.experts") and not fam.moe:
                raise LmscopeError(
                    f"'{name}' exists only in mixture-of-experts models",
                    "capture mlp.hidden / mlp.out instead",
                )
            if what == "mlp.hidden" and fam.moe:
                raise LmscopeError(
                    f"'{name}' has no single MLP in {fam.name} (a mixture of experts)",
                    "capture mlp.router, mlp.experts or mlp.out instead",
                )

    # -- called from hooks -------------------------------------------------------------------
    def wants_attention(self, layer: int) -> bool:
        return layer in self._attn_layers

    def wants(self, layer: int | None, what: str) -> bool:
        return self._wants(layer, what)

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
    def _unflatten(self, x: torch.Tensor):
        """Some families flatten [batch, pos] into one dimension inside a block (OPT's MLP): emit [b, pos, ...]."""
        shape = self._token_shape
        if shape and x.dim() >= 1 and x.shape[0] == shape[0] * shape[1] and (x.dim() == 2 or shape[0] > 1):
            if x.dim() == 2:
                return x.unflatten(0, shape), True
        return x, False

    def _emit_shaped(self, layer, what, x):
        shaped, flat = self._unflatten(x)
        new = self._emit(layer, what, shaped)
        if new is shaped:
            return x
        return new.flatten(0, 1) if flat else new

    def _here(self, layer: int | None) -> bool:
        """Whether a hook registered for ``layer`` acts on this call (a shared block runs at every depth)."""
        return layer is None or not self._shared or self._layer_now == layer

    def _output_hook(self, module: nn.Module, layer: int | None, what: str) -> None:
        def hook(mod, args, output):
            if not self._here(layer):
                return None
            new = self._emit_shaped(layer, what, _first(output))
            return _replace_first(output, new)

        self._handles.append(module.register_forward_hook(hook))

    def _input_hook(self, module: nn.Module, layer: int | None, what: str, heads: int | None = None) -> None:
        def hook(mod, args, kwargs):
            if not self._here(layer):
                return None
            if args:
                x = args[0]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x = kwargs[key]
            base, flat = self._unflatten(x)
            shaped = base.unflatten(-1, (heads, -1)) if heads else base
            new = self._emit(layer, what, shaped)
            if new is shaped:
                return None
            new = new.flatten(-2) if heads else new
            new = new.flatten(0, 1) if flat else new
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _router_hook(self, module: nn.Module, layer: int) -> None:
        """MoE router: emits (logits, top-k weights, top-k experts); capture probabilities and choices."""

        def hook(mod, args, output):
            if not self._here(layer):
                return
            logits, _, chosen = output
            shape = self._token_shape
            if self._wants(layer, "mlp.router"):
                probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
                self._emit(layer, "mlp.router", probs.reshape(*shape, -1) if shape else probs)
            if self._wants(layer, "mlp.experts"):
                self._emit(layer, "mlp.experts", chosen.reshape(*shape, -1) if shape else chosen)

        self._handles.append(module.register_forward_hook(hook))

    def _logits_hook(self) -> None:
        """The model's final logits (after any logit scaling or soft-capping the family applies)."""

        def hook(mod, args, output):
            new = self._emit(None, "logits", output.logits)
            if new is not output.logits:
                output.logits = new
            return output

        self._handles.append(self.lm.model.register_forward_hook(hook))

    def _native_patterns(self) -> None:
        """Families with their own attention code: ask for output_attentions and emit what they return."""
        layers = sorted(self._attn_layers)

        def pre(mod, args, kwargs):
            return args, {**kwargs, "output_attentions": True}

        def post(mod, args, kwargs, output):
            attentions = getattr(output, "attentions", None)
            if attentions is None:
                raise LmscopeError(
                    f"{self.lm.family.name} returned no attention patterns",
                    "capture other names for this model",
                )
            for i in layers:
                self._emit(i, "attn.pattern", attentions[i])

        self._handles.append(self.lm.model.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(self.lm.model.register_forward_hook(post, with_kwargs=True))

    def __enter__(self) -> HookSession:
        lm = self.lm
        fam = lm.family
        self._token_shape = None
        self._shared = fam.shared
        self._layer_now, self._calls = None, 0

        def start(mod, args, kwargs):  # masks are cached by tensor identity, unique only within one forward
            self._mask_cache.clear()
            self._calls = 0
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            self._token_shape = tuple(ids.shape[:2]) if ids is not None else None

        self._handles.append(lm.model.register_forward_pre_hook(start, with_kwargs=True))
        if fam.shared:  # registered before any other hook on the block: every call is the next depth

            def count(mod, args):
                self._layer_now = self._calls
                self._calls += 1

            self._handles.append(lm.blocks[0].register_forward_pre_hook(count))
        if fam.native_attention and self._attn_layers:
            self._native_patterns()
        if self._wants(None, "embed"):
            self._output_hook(lm.module(fam.embed), None, "embed")
        for i, block in enumerate(lm.blocks):
            if self._wants(i, "resid_pre"):
                self._input_hook(block, i, "resid_pre")
            if self._wants(i, "attn.head_out"):
                self._input_hook(block.get_submodule(fam.o), i, "attn.head_out", heads=lm.n_heads_at(i))
            if self._wants(i, "attn.out"):
                self._output_hook(block.get_submodule(fam.o), i, "attn.out")
            if self._wants(i, "resid_mid"):
                self._input_hook(block.get_submodule(fam.mid), i, "resid_mid")
            if fam.moe and (self._wants(i, "mlp.router") or self._wants(i, "mlp.experts")):
                self._router_hook(block.get_submodule(fam.router), i)
            if self._wants(i, "mlp.hidden"):
                self._input_hook(block.get_submodule(fam.mlp_out), i, "mlp.hidden")
            if self._wants(i, "mlp.out"):
                out_module = fam.mlp if fam.moe else fam.mlp_out
                self._output_hook(block.get_submodule(out_module), i, "mlp.out")
            if self._wants(i, "resid_post"):
                self._output_hook(block, i, "resid_post")
        if self._wants(None, "logits") and lm.task == "lm":
            self._logits_hook()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        self._mask_cache.clear()
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
