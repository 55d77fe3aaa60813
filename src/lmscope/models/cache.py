"""The conversion cache: GGUF files de-quantized once into safetensors directories.

Default location ``~/.cache/lmscope`` (override with ``LMSCOPE_CACHE``). Entries are keyed by the
file's size, mtime and sampled content, so a changed file is converted again. Writes are atomic:
a conversion goes to a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..fsutil import atomic_directory

MARKER = "lmscope-cache.json"
_SAMPLE = 1 << 20


def cache_root() -> Path:
    return Path(os.environ.get("LMSCOPE_CACHE") or Path.home() / ".cache" / "lmscope")


def file_key(path: str | os.PathLike) -> str:
    """Identity of a file's content: size, mtime and its first, middle and last MiB."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        for offset in (0, max(0, st.st_size // 2 - _SAMPLE // 2), max(0, st.st_size - _SAMPLE)):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def entry_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return cache_root() / "gguf" / f"{p.stem}-{file_key(p)}"


def is_complete(entry: Path) -> bool:
    return (entry / MARKER).exists()


def atomic_dir(final: Path, write) -> Path:
    """Call ``write(tmp_dir)``, then rename tmp_dir to ``final``. Nothing half-written is ever at ``final``."""
    with atomic_directory(final, keep_existing=True) as tmp:
        write(tmp)
    return final


def write_marker(directory: Path, **meta) -> None:
    (directory / MARKER).write_text(json.dumps(meta, indent=2))


def entries() -> list[dict]:
    """Complete cache entries with their sizes (for ``lmscope models``)."""
    root = cache_root() / "gguf"
    out = []
    if root.exists():
        for d in sorted(root.iterdir()):
            if d.is_dir() and is_complete(d):
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                meta = json.loads((d / MARKER).read_text())
                out.append({"path": str(d), "bytes": size, **meta})
    return out
