"""Corpus readers for ``scan``: text files and folders, JSONL, Parquet, ``save_to_disk`` folders, the built-in text.

A corpus is a list of sources read in the order given (folders: files in sorted order). Every document
gets a global index in that order. Content that is not UTF-8 text (a decoding error, or a NUL byte, which
marks binary files) is **skipped and counted** (``Corpus.skipped``), never guessed at; a corpus where
nothing readable is left is refused. A JSONL line without ``--field`` (or not JSON) is refused with its
line number, since it means the field name is wrong rather than one bad record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmscopeError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".html", ".htm", ".csv", ".tsv", ".py", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
BUILTIN = "builtin"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(data: bytes) -> str | None:
    """UTF-8 text, or None for binary (NUL byte) or undecodable content."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def builtin_documents() -> list[str]:
    """Python's ``pydoc_data.topics`` (shipped with CPython) as documents: one per topic, prose only."""
    from ..data import builtin_text

    # builtin_text joins paragraphs of all topics; split back into groups of ~paragraphs for documents
    paragraphs = [p for p in re.split(r"\n\n", builtin_text()) if p.strip()]
    docs, cur, size = [], [], 0
    for p in paragraphs:  # ~2000-character documents at paragraph boundaries: a stable, offline corpus
        cur.append(p)
        size += len(p)
        if size >= 2000:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


@dataclass
class Source:
    """One input: a file of some kind (or the built-in text)."""

    kind: str  # text | jsonl | parquet | arrow | builtin
    path: str
    size: int = 0
    sha256: str = ""
    files: list[str] = field(default_factory=list)  # arrow: the data files of a save_to_disk folder

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "path": self.path, "size": self.size, "sha256": self.sha256}


class Corpus:
    """Documents from ``paths`` (files, folders, ``builtin``); ``field`` names the text column/key."""

    def __init__(self, paths, field: str | None = None):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        paths = [str(p) for p in paths]
        if not paths:
            raise LmscopeError("no corpus given", "pass --corpus FILE_OR_FOLDER (or --corpus builtin)")
        self.field = field
        self.sources: list[Source] = []
        for p in paths:
            self.sources += self._resolve(p)
        if not self.sources:
            raise LmscopeError(
                f"the corpus {' '.join(paths)} holds no readable files",
                "pass text files, .jsonl, .parquet or a save_to_disk folder (or --corpus builtin)",
            )
        needs_field = [s for s in self.sources if s.kind in ("jsonl", "parquet", "arrow")]
        if needs_field and not field:
            raise LmscopeError(
                f"'{needs_field[0].path}' holds records, and no --field names their text",
                "pass --field text (the key or column that holds the text)",
            )
        self.skipped: dict[str, int] = {"not_utf8_or_binary": 0, "empty": 0}

    # -- resolving paths --------------------------------------------------------------------------
    def _resolve(self, p: str) -> list[Source]:
        if p == BUILTIN:
            import sys

            from ..data import builtin_text

            digest = hashlib.sha256(builtin_text().encode("utf-8")).hexdigest()
            return [Source("builtin", BUILTIN, len(builtin_text()), digest, [sys.version.split()[0]])]
        path = Path(p).expanduser()
        if not path.exists():
            raise LmscopeError(f"corpus path '{p}' does not exist", "check the path given to --corpus")
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                return [self._arrow_source(path)]
            out = []
            for f in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
                out += self._file_source(f, from_folder=True)
            return out
        return self._file_source(path, from_folder=False)

    def _file_source(self, f: Path, from_folder: bool) -> list[Source]:
        suffix = f.suffix.lower()
        kind = (
            "jsonl"
            if suffix in JSONL_SUFFIXES
            else "parquet"
            if suffix in PARQUET_SUFFIXES
            else "text"
            if suffix in TEXT_SUFFIXES or not from_folder
            else None
        )
        if kind is None:  # a folder's other files (images, archives): not text, not ours to read
            return []
        return [Source(kind, str(f), f.stat().st_size, _sha256(f))]

    def _arrow_source(self, folder: Path) -> Source:
        files: list[Path] = []
        if (folder / "dataset_dict.json").is_file():  # DatasetDict: splits in the order saved
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            for split in splits:
                state = json.loads((folder / split / "state.json").read_text())
                files += [folder / split / d["filename"] for d in state["_data_files"]]
        else:
            state = json.loads((folder / "state.json").read_text())
            files = [folder / d["filename"] for d in state["_data_files"]]
        h = hashlib.sha256()
        size = 0
        for f in files:
            h.update(_sha256(f).encode())
            size += f.stat().st_size
        return Source("arrow", str(folder), size, h.hexdigest(), [str(f) for f in files])

    def fingerprint(self) -> dict:
        return {"field": self.field, "sources": [s.fingerprint() for s in self.sources]}

    # -- reading ----------------------------------------------------------------------------------
    def documents(self) -> Iterator[str]:
        """Every document's text, in corpus order (skipped content counted in ``self.skipped``)."""
        self.skipped = {"not_utf8_or_binary": 0, "empty": 0}
        for src in self.sources:
            for text in self._read(src):
                if text is None:
                    self.skipped["not_utf8_or_binary"] += 1
                elif not text.strip():
                    self.skipped["empty"] += 1
                else:
                    yield text

    def _read(self, src: Source) -> Iterator[str | None]:
        if src.kind == "builtin":
            yield from builtin_documents()
        elif src.kind == "text":
            yield _decode(Path(src.path).read_bytes())
        elif src.kind == "jsonl":
            yield from self._jsonl(src.path)
        elif src.kind == "parquet":
            yield from self._parquet(src.path)
        else:
            yield from self._arrow(src)

    def _value(self, record, where: str) -> str:
        if not isinstance(record, dict) or self.field not in record:
            keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
            raise LmscopeError(
                f"{where} has no field '{self.field}' (it has: {keys})", "pass --field with the text key"
            )
        value = record[self.field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise LmscopeError(
                f"{where}: field '{self.field}' is {type(value).__name__}, not text",
                "pass --field naming a text field",
            )
        return value

    def _jsonl(self, path: str) -> Iterator[str | None]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _decode(raw)
                if line is None:
                    yield None
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmscopeError(
                        f"{path} line {number} is not JSON ({e.msg})", "pass one JSON object per line"
                    ) from None
                yield self._value(record, f"{path} line {number}")

    def _parquet(self, path: str) -> Iterator[str | None]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LmscopeError(
                f"reading '{path}' needs pyarrow, which is not installed", "pip install pyarrow"
            ) from None
        pf = pq.ParquetFile(path)
        if self.field not in pf.schema_arrow.names:
            raise LmscopeError(
                f"{path} has no column '{self.field}' (it has: {', '.join(pf.schema_arrow.names[:8])})",
                "pass --field with the text column",
            )
        for batch in pf.iter_batches(columns=[self.field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield self._value({self.field: value}, path)

    def _arrow(self, src: Source) -> Iterator[str | None]:
        """A ``datasets`` ``save_to_disk`` folder: Arrow stream files, read with pyarrow (as datasets does)."""
        try:
            import pyarrow as pa
        except ImportError:
            raise LmscopeError(
                f"reading the datasets folder '{src.path}' needs pyarrow", "pip install pyarrow"
            ) from None
        for f in src.files:
            with pa.memory_map(f) as source:
                reader = pa.ipc.open_stream(source)
                if self.field not in reader.schema.names:
                    raise LmscopeError(
                        f"{src.path} has no column '{self.field}' (it has: {', '.join(reader.schema.names[:8])})",
                        "pass --field with the text column",
                    )
                for batch in reader:
                    for value in batch.column(self.field).to_pylist():
                        yield self._value({self.field: value}, src.path)
