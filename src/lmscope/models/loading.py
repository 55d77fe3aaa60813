"""Load a model + tokenizer from a built-in name, a directory, a .gguf file or a hub id.

Weights come from safetensors or GGUF only (never a pickle), and never with ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import LmscopeError
from . import cache
from .sources import Source, resolve

COMPRESSED_MARKER = "lmscope_recipe.json"


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM

    from .families import family_for

    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return AutoModelForCausalLM
    return AutoModelForCausalLM if family_for(config.model_type).causal else AutoModel


def _check_weights(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise LmscopeError(
            f"'{directory}' holds only pickle weights (*.bin/*.pt), which lmscope never loads",
            "convert them to safetensors in a trusted environment (model.save_pretrained(..., safe_serialization=True))",
        )
    raise LmscopeError(
        f"'{directory}' has no *.safetensors weights", "pass a directory with model.safetensors"
    )


def load_directory(directory: str | os.PathLike, dtype=torch.float32):
    from transformers import AutoConfig, AutoTokenizer

    from ..capture.session import ATTN_IMPL, register_attention

    d = Path(directory)
    _check_weights(d)
    register_attention()
    try:
        config = AutoConfig.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise LmscopeError(
            f"cannot read config.json in '{d}': {_short(e)}", "fix or replace config.json"
        ) from None
    cls = _model_class(config)
    _quiet_transformers()
    try:
        model = cls.from_pretrained(
            d,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            attn_implementation=ATTN_IMPL,
        )
    except LmscopeError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise LmscopeError(
            f"cannot load weights from '{d}': {_short(e)}",
            "the safetensors file is corrupt or truncated; re-download or re-convert it",
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise LmscopeError(
            f"cannot load the tokenizer in '{d}': {_short(e)}", "add tokenizer files to the directory"
        ) from None
    model.eval()
    return model, tokenizer


def convert_gguf(path: str | os.PathLike, progress: bool = True) -> Path:
    """De-quantize a GGUF file to an fp32 safetensors cache entry (once); return the entry directory."""
    entry = cache.entry_dir(path)
    if cache.is_complete(entry):
        return entry
    _validate_gguf(path)
    if progress:
        print(
            f"lmscope: converting {Path(path).name} to a safetensors cache (one time, ~30 s) ...",
            file=sys.stderr,
        )

    def write(tmp: Path) -> None:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        if progress:
            transformers.utils.logging.enable_progress_bar()
        p = Path(path)
        start = time.perf_counter()
        try:
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        except Exception as e:
            raise LmscopeError(
                f"cannot convert GGUF '{path}': {_short(e)}",
                "the file is corrupt, truncated or of an unsupported architecture; re-download it",
            ) from None
        # The de-quantized model is plain fp32: drop the GGUF quantizer so save_pretrained works.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                setattr(model, attr, None)
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cache.write_marker(
            tmp, source=str(Path(path).resolve()), seconds=round(time.perf_counter() - start, 1)
        )

    return cache.atomic_dir(entry, write)


def _validate_gguf(path) -> None:
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:
        raise LmscopeError(
            f"'{path}' is not a readable GGUF file: {_short(e)}",
            "the file is corrupt or truncated; re-download it",
        ) from None


def load_hub(repo_id: str, dtype=torch.float32):
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as e:
        raise LmscopeError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}; offline?)",
            "download the model where there is network and pass its directory, or use a built-in: smollm2, minilm",
        ) from None
    return load_directory(local, dtype)


def load_model(spec: str | os.PathLike, progress: bool = True):
    """Return (model, tokenizer, source, directory)."""
    source: Source = resolve(spec)
    if source.kind == "gguf":
        directory = convert_gguf(source.location, progress=progress)
    elif source.kind == "hub":
        model, tok = load_hub(source.location)
        return model, tok, source, None
    else:
        directory = Path(source.location)
        if (directory / COMPRESSED_MARKER).exists():
            from ..compress.storage import load_compressed

            model, tok = load_compressed(directory)
            return model, tok, source, directory
    model, tok = load_directory(directory)
    return model, tok, source, directory


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
