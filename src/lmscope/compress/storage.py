"""Save a compressed model to a directory and load it back exactly.

A directory holds ``model.safetensors`` (int4 codes packed two per byte, int8 as int8; tied tensors once),
``config.json``, the tokenizer, ``lmscope_recipe.json`` (the recipe and each step's info, enough to
rebuild the module structure) and ``lmscope_manifest.json`` (sha256 of every other file). Writing is
atomic (a temporary sibling directory, then a rename). Loading verifies the checksums, builds the model
from its config with lmscope's attention, lets every step ``rebuild`` its modules, then loads the state
dict (safetensors only, never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import LmscopeError
from ..fsutil import atomic_directory
from .recipe import Recipe, handler_for

RECIPE_FILE = "lmscope_recipe.json"
MANIFEST_FILE = "lmscope_manifest.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedup_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors (tied embeddings) stored once; ``aliases`` maps dropped -> kept."""
    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t.detach().contiguous().clone() if not t.is_contiguous() else t.detach()
    return tensors, aliases


def plain_transformers_loadable(model: torch.nn.Module, tensors: dict, aliases: dict) -> bool:
    """True when the saved tensors are exactly what transformers builds from the saved config (names and
    shapes), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads the directory without lmscope."""
    try:
        from ..models.loading import model_class

        with torch.device("meta"):
            fresh = model_class(model.config).from_config(model.config)
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    except Exception:
        return False
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    return all(expected.get(k) == shape for k, shape in got.items()) and set(expected) <= set(got) | set(
        aliases
    )


def write_compressed(
    directory: str | os.PathLike, lm, recipe: Recipe, infos: list[dict], extra: dict | None = None
):
    """Write the files into an existing (empty) directory. Not atomic: use :func:`save`."""
    from safetensors.torch import save_file

    d = Path(directory)
    tensors, aliases = _dedup_state(lm.model)
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "pt", "producer": "lmscope"})
    os.chmod(d / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; the other files get the usual mode
    config = lm.model.config
    config.save_pretrained(d)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if (
        cfg.pop("_attn_implementation_autoset", None) is not None
        or cfg.get("attn_implementation") == "lmscope"
    ):
        cfg.pop("attn_implementation", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(lm.model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(d)
        except Exception:
            pass
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(d)
    from .. import __version__

    record = {
        "format": FORMAT_VERSION,
        "lmscope_version": __version__,
        "base_model": getattr(lm, "name", None),
        "recipe": recipe.to_dict(),
        "steps": [{"step": s.to_dict(), "info": i} for s, i in zip(recipe.steps, infos)],
        "aliases": aliases,
        "loads_in_transformers": plain_transformers_loadable(lm.model, tensors, aliases),
        **(extra or {}),
    }
    (d / RECIPE_FILE).write_text(json.dumps(record, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {"format": FORMAT_VERSION, "sha256": {f: sha256_file(d / f) for f in files}}
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return d


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save(result, directory: str | os.PathLike) -> Path:
    """Write ``result`` (a CompressResult) to ``directory`` atomically; existing files are replaced."""
    final = Path(directory).expanduser()
    if final.exists() and not final.is_dir():
        raise LmscopeError(f"'{directory}' exists and is not a directory", "choose another output directory")
    with atomic_directory(final) as tmp:
        write_compressed(tmp, result.lm, result.recipe, result.infos)
    return final


def verify(directory: str | os.PathLike) -> dict:
    """Check every file against the manifest; return the manifest. Raises LmscopeError on any mismatch."""
    d = Path(directory)
    mpath = d / MANIFEST_FILE
    if not mpath.is_file():
        raise LmscopeError(
            f"'{d}' has {RECIPE_FILE} but no {MANIFEST_FILE}",
            "the save was interrupted; compress and save again",
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        sums = manifest["sha256"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise LmscopeError(f"'{mpath}' is corrupted", "compress and save the model again") from None
    for name, digest in sums.items():
        p = d / name
        if not p.is_file():
            raise LmscopeError(f"'{name}' is missing from '{d}'", "copy the whole directory, or save again")
        if sha256_file(p) != digest:
            raise LmscopeError(
                f"'{name}' in '{d}' is corrupted (sha256 differs from {MANIFEST_FILE})",
                "re-copy the directory or compress and save again",
            )
    return manifest


def _fresh_model(d: Path):
    from transformers import AutoConfig

    from ..models.loading import attn_implementation_for, concrete_class, model_class, quiet_transformers

    quiet_transformers()
    config = AutoConfig.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    cls = model_class(config)
    impl = attn_implementation_for(concrete_class(cls, config))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = cls.from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model


def load_compressed(directory: str | os.PathLike, dtype=None, device=None):
    """(model, tokenizer) from a directory written by :func:`save`; logits equal the in-memory model's."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    d = Path(directory)
    verify(d)
    try:
        record = json.loads((d / RECIPE_FILE).read_text(encoding="utf-8"))
        recipe = Recipe.from_dict(record["recipe"])
        infos = [s["info"] for s in record["steps"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LmscopeError(
            f"'{d / RECIPE_FILE}' is not a valid lmscope recipe record", "save the model again"
        ) from None
    if record.get("format", 1) > FORMAT_VERSION:
        raise LmscopeError(
            f"'{d}' was written by a newer lmscope (format {record['format']})", "upgrade lmscope to load it"
        )
    model = _fresh_model(d)
    for step, info in zip(recipe.steps, infos):
        handler_for(step).rebuild(model, step, info)
    state = load_file(str(d / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = record.get("aliases", {})
    really_missing = [k for k in missing if k not in aliases]
    if really_missing or unexpected:
        raise LmscopeError(
            f"'{d}' does not match its recipe: {len(really_missing)} missing and {len(unexpected)} unexpected "
            f"tensors (e.g. {(really_missing or unexpected)[0]})",
            "the directory was edited or written by an incompatible lmscope; compress and save again",
        )
    for dropped, kept in aliases.items():  # re-tie tensors saved once (tied embeddings, if not already)
        _set_tensor(model, dropped, _get_tensor(model, kept))
    from ..models.loading import resolve_device, resolve_dtype

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if dtype != torch.float32 or device.type != "cpu":
        model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False, local_files_only=True)
    return model, tokenizer


def _get_tensor(model, name):
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr)


def _set_tensor(model, name, tensor):
    mod, _, attr = name.rpartition(".")
    owner = model.get_submodule(mod) if mod else model
    current = getattr(owner, attr)
    if current is tensor:
        return
    if isinstance(current, torch.nn.Parameter):
        setattr(owner, attr, tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor))
    else:
        current.data = tensor.data
