"""How many bytes a model's tensors take: the one counter used by compress, evaluate and the structure table.

A tensor reached twice (tied embedding and LM head, the same buffer registered in two modules) counts once;
two different views of one storage count as the bytes each view holds, as safetensors stores them.
"""

from __future__ import annotations

import torch
from torch import nn


def tensor_key(t: torch.Tensor) -> tuple:
    """Identifies the stored tensor: same data pointer, dtype, shape and strides = the same bytes."""
    try:
        return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage (torchao)
        return (id(t),)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as stored, shared tensors counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def human_bytes(n: int | float | None) -> str:
    """``512 B``, ``3.2 KB``, ``513.2 MB``, ``1.4 GB`` (binary units); ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
