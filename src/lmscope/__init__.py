"""lmscope: open any Hugging Face language model offline, see what it computes, explain it, compress it."""

from __future__ import annotations

import logging as _logging

# optional extras (torchao) log load failures of GPU-only kernels at import time; they are irrelevant on CPU
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from typing import TYPE_CHECKING  # noqa: E402

from .errors import LmscopeError  # noqa: E402

if TYPE_CHECKING:
    from .lm import LM, Run

__version__ = "0.1.0"
__all__ = ["LM", "Run", "LmscopeError", "load", "__version__"]

#: subpackages reachable as attributes (``lmscope.compress.compress(...)``) but imported on first use,
#: so ``import lmscope`` stays fast
_LAZY = ("capture", "compress", "data", "explain", "models", "views")


def __getattr__(name: str):
    if name in ("LM", "Run"):  # torch comes with them: imported on first use, so `import lmscope` (and the
        from . import lm  # CLI's start, where Ctrl-C must give one line) stays light

        return getattr(lm, name)
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lmscope' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["LM", "Run"])


def load(spec: str = "smollm2", progress: bool = True, dtype=None, device=None) -> LM:  # noqa: F821
    """Open a model: a built-in name (``smollm2``, ``minilm``), a HF directory, a ``.gguf`` file or a hub id.

    ``dtype``: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``; ``device``: ``"cpu"`` (default),
    ``"cuda"``, ``"cuda:1"`` or ``"mps"``. Causal LMs, sequence / token classifiers (with their heads and
    ``id2label``) and encoders open; see ``LM.task``.
    """
    from .compress.storage import load_compressed
    from .lm import LM
    from .models.loading import load_model

    model, tokenizer, source, directory = load_model(
        spec,
        progress=progress,
        dtype=dtype,
        device=device,
        compressed_loader=lambda d: load_compressed(d, dtype=dtype, device=device),
    )
    return LM(model, tokenizer, name=source.label, path=str(directory) if directory else source.location)
