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


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_class(config):
    """The Auto class for this config: the head its ``architectures`` name (classifier, token classifier,
    causal LM), else a causal LM for decoders and the bare model for encoders."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from .families import ENCODER_TYPES, check_supported

    check_supported(config)
    for arch in config.architectures or []:
        if arch.endswith("ForSequenceClassification"):
            return AutoModelForSequenceClassification
        if arch.endswith("ForTokenClassification"):
            return AutoModelForTokenClassification
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    decoder = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in ENCODER_TYPES
    )
    return AutoModelForCausalLM if decoder else AutoModel


def concrete_class(auto_cls, config):
    """The transformers class an Auto class builds for ``config`` (None when it has no such head)."""
    try:
        return auto_cls._model_mapping[type(config)]
    except KeyError:
        return None


def _read_config(d: Path):
    from transformers import AutoConfig

    raw = {}
    try:
        raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if isinstance(raw, dict) and raw.get("auto_map"):
        raise LmscopeError(
            f"'{d}' needs custom code from the model's authors (config.json has auto_map), which lmscope never runs",
            "use a model whose architecture ships with transformers (no trust_remote_code)",
        )
    try:
        return AutoConfig.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    except ValueError as e:
        mt = raw.get("model_type") if isinstance(raw, dict) else None
        if mt and "does not recognize" in str(e) or "trust_remote_code" in str(e):
            raise LmscopeError(
                f"model type '{mt}' is not known to the installed transformers (it may need remote code, "
                "which lmscope never runs)",
                "upgrade transformers, or use a model whose architecture ships with it",
            ) from None
        raise LmscopeError(
            f"cannot read config.json in '{d}': {_short(e)}", "fix or replace config.json"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise LmscopeError(
            f"cannot read config.json in '{d}': {_short(e)}", "fix or replace config.json"
        ) from None


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "mps")


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmscopeError(f"unknown dtype '{dtype}'", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    name = str(device)
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise LmscopeError(f"unknown device '{name}'", f"use one of: {', '.join(DEVICES)} (e.g. cuda:0)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LmscopeError("--device cuda: no CUDA GPU is visible to PyTorch", "use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LmscopeError("--device mps: Apple's Metal backend is not available here", "use --device cpu")
    return torch.device(name)


def load_directory(directory: str | os.PathLike, dtype=None, device=None):
    from transformers import AutoTokenizer

    d = Path(directory)
    _check_weights(d)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    config = _read_config(d)
    cls = model_class(config)
    impl = attn_implementation_for(concrete_class(cls, config))
    quiet_transformers()
    try:
        model = cls.from_pretrained(
            d,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
            attn_implementation=impl,
        )
    except LmscopeError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise LmscopeError(f"cannot load weights from '{d}': {_short(e)}", _load_fix(e)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise LmscopeError(
            f"cannot load the tokenizer in '{d}': {_short(e)}", "add tokenizer files to the directory"
        ) from None
    if device.type != "cpu":
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_fix(e: BaseException) -> str:
    """Name the likely fix for a load failure by what failed, not by guessing corruption."""
    text = f"{type(e).__name__}: {e}".lower()
    if any(w in text for w in ("safetensor", "header", "deserializ", "truncat", "incomplete", "invalid")):
        return "the safetensors file is corrupt or truncated; re-download or re-convert it"
    if "size mismatch" in text or "mismatched_sizes" in text or "shape" in text:
        return "the weights do not match config.json; use the config the weights were saved with"
    return "check that config.json and the weights belong together and that transformers supports this model"


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


def load_hub(repo_id: str, dtype=None, device=None):
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
    return load_directory(local, dtype, device)


def load_model(
    spec: str | os.PathLike, progress: bool = True, dtype=None, device=None, compressed_loader=None
):
    """Return (model, tokenizer, source, directory).

    ``compressed_loader(directory, dtype, device)`` opens a folder written by ``lmscope compress`` (it carries
    ``lmscope_recipe.json``); the layer above passes it in, so loading never imports compression.
    """
    source: Source = resolve(spec)
    if source.kind == "gguf":
        directory = convert_gguf(source.location, progress=progress)
    elif source.kind == "hub":
        model, tok = load_hub(source.location, dtype, device)
        return model, tok, source, None
    else:
        directory = Path(source.location)
        if (directory / COMPRESSED_MARKER).exists():
            if compressed_loader is None:
                raise LmscopeError(
                    f"'{directory}' holds a model compressed by lmscope", "open it with lmscope.load(path)"
                )
            model, tok = compressed_loader(directory)
            return model, tok, source, directory
    model, tok = load_directory(directory, dtype, device)
    return model, tok, source, directory


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def attn_implementation_for(model_cls) -> str:
    """lmscope's registered attention function where the class calls transformers' attention interface;
    ``eager`` where the family computes attention in its own code (its patterns then come from
    ``output_attentions``, which lmscope does not control)."""
    from ..capture.session import ATTN_IMPL, register_attention

    if getattr(model_cls, "_supports_attention_backend", False):
        register_attention()
        return ATTN_IMPL
    return "eager"
