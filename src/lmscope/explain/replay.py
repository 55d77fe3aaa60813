"""Replay: run a model from layer L on, with the blocks before L returning what they computed before.

Activation patching, head ablation and attribution patching all change something at layer L and run
the rest of the model many times; nothing before L can change, so ``record_block_outputs`` runs the
model once and ``replay_blocks`` makes blocks ``0..L-1`` return their recorded outputs (rows of the
recording, one per row of the new batch) without computing. ``base_forward`` is the final hidden
state (after the final norm), ``unembed`` the LM head, ``check_layers`` validates a layer list.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ..capture.session import hooks
from ..errors import LmscopeError


def record_block_outputs(lm, inputs: dict[str, torch.Tensor], names=(), interventions=None):
    """One no-grad forward of the base model; returns (last hidden state, raw block outputs, captured)."""
    outputs: list = [None] * lm.n_layers
    handles = []
    for i, block in enumerate(lm.blocks):

        def keep(mod, args, out, i=i):
            outputs[i] = out

        handles.append(block.register_forward_hook(keep))
    try:
        with torch.no_grad(), hooks(lm, names, interventions) as session:
            hidden = base_forward(lm, inputs)
    finally:
        for h in handles:
            h.remove()
    return hidden, outputs, session.tensors


def _take_rows(output, rows: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return output[rows]
    if isinstance(output, tuple):
        return tuple(_take_rows(o, rows) if isinstance(o, torch.Tensor) else o for o in output)
    return output


@contextmanager
def replay_blocks(lm, upto: int, outputs: list, rows: torch.Tensor):
    """Blocks ``0..upto-1`` return their recorded ``outputs`` (rows ``rows`` of the recording) uncomputed.

    Correct only when the forward that follows feeds the same tokens as the recording and changes
    nothing before block ``upto``.
    """
    patched = []
    if lm.family.shared:  # one module runs at every depth (ALBERT): recompute instead of replaying
        upto = 0
    # only block upto-1's output is read downstream; earlier blocks just need to return quickly
    taken = _take_rows(outputs[upto - 1], rows) if upto > 0 else None
    try:
        for i in range(upto):
            block = lm.blocks[i]

            def replay(*args, _out=taken, **kwargs):
                return _out

            block.forward = replay
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


def base_forward(lm, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden state (after the final norm, before the unembedding): [batch, pos, d_model]."""
    kwargs = {"use_cache": False} if lm.is_causal else {}
    return lm.model.base_model(**inputs, **kwargs).last_hidden_state


def unembed(lm, hidden: torch.Tensor) -> torch.Tensor:
    if not lm.family.unembed:
        raise LmscopeError(f"{lm.name} has no language-model head", "use a causal model such as smollm2")
    return lm.module(lm.family.unembed)(hidden)


def check_layers(lm, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(lm.n_layers))
    bad = [i for i in layers if not 0 <= int(i) < lm.n_layers]
    if bad:
        raise LmscopeError(
            f"layer {bad[0]} is out of range: {lm.name} has {lm.n_layers} layers",
            f"use layers 0..{lm.n_layers - 1}",
        )
    return sorted({int(i) for i in layers})
