"""lmscope: open any Hugging Face language model offline, see what it computes, explain it, compress it."""

from __future__ import annotations

import logging as _logging

# optional extras (torchao) log load failures of GPU-only kernels at import time; they are irrelevant on CPU
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from .errors import LmscopeError  # noqa: E402
from .lm import LM, Run  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LM", "Run", "LmscopeError", "load", "__version__"]


def load(spec: str = "smollm2", progress: bool = True, dtype=None, device=None) -> LM:
    """Open a model: a built-in name (``smollm2``, ``minilm``), a HF directory, a ``.gguf`` file or a hub id.

    ``dtype``: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``; ``device``: ``"cpu"`` (default),
    ``"cuda"``, ``"cuda:1"`` or ``"mps"``. Causal LMs, sequence / token classifiers (with their heads and
    ``id2label``) and encoders open; see ``LM.task``.
    """
    from .compress.storage import load_compressed
    from .models.loading import load_model

    model, tokenizer, source, directory = load_model(
        spec,
        progress=progress,
        dtype=dtype,
        device=device,
        compressed_loader=lambda d: load_compressed(d, dtype=dtype, device=device),
    )
    return LM(model, tokenizer, name=source.label, path=str(directory) if directory else source.location)
