"""Cases for ``audit``: records (text, optional label and group, an id) streamed from JSONL, CSV or Parquet.

JSONL reading (line numbers, non-UTF-8 lines) is ``scan``'s ``Corpus`` reader; this adds the other fields,
CSV, and multi-column Parquet. Nothing is loaded whole: records are yielded one at a time.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmscopeError
from ..scan.corpus import Corpus

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass
class Case:
    id: str
    text: str
    label: str | None = None
    group: str | None = None
    where: str = ""  # "cases.jsonl line 4", for error messages


class Cases(Corpus):
    """The cases in ``path`` (one file). ``text_field`` is required; ``label_field`` and ``group_field``
    are optional; ``id_field`` (default: none) names a case id, else the 1-based record number is used."""

    def __init__(self, path, text_field: str = "text", label_field=None, group_field=None, id_field=None):
        path = str(path)
        p = Path(path).expanduser()
        if not p.is_file():
            raise LmscopeError(f"data file '{path}' does not exist", "check the path given to --data")
        self.kind = SUFFIXES.get(p.suffix.lower())
        if self.kind is None:
            raise LmscopeError(
                f"cannot tell the format of '{path}' from its suffix",
                "name it .jsonl, .csv, .tsv or .parquet",
            )
        if not text_field:
            raise LmscopeError(
                "no --text-field given", "pass --text-field NAME (the key or column of the text)"
            )
        super().__init__([path], field=text_field)
        self.fields = {"text": text_field, "label": label_field, "group": group_field, "id": id_field}
        self.path = path

    def _value(self, record, where: str):  # the Corpus hook: a record's fields instead of one string
        if not isinstance(record, dict):
            raise LmscopeError(
                f"{where} is {type(record).__name__}, not an object", "one JSON object per line"
            )
        values = {}
        for role, name in self.fields.items():
            if name is None:
                continue
            if name not in record:
                keys = ", ".join(list(record)[:8])
                raise LmscopeError(
                    f"{where} has no field '{name}' (it has: {keys})",
                    f"pass --{role}-field with the right name",
                )
            value = record[name]
            if role == "text":
                if not isinstance(value, str):
                    raise LmscopeError(
                        f"{where}: field '{name}' is {type(value).__name__ if value is not None else 'empty'}, "
                        "not text",
                        "pass --text-field naming a text field",
                    )
                if not value.strip():
                    raise LmscopeError(f"{where}: the text is empty", "remove the record or fill in its text")
            elif value is None or (isinstance(value, str) and not value.strip()):
                raise LmscopeError(
                    f"{where}: field '{name}' is empty", f"fill in every {role}, or drop --{role}-field"
                )
            elif isinstance(value, float) and value.is_integer():
                value = int(value)
            values[role] = value if role == "text" else str(value)
        if self.fields["id"] is None and isinstance(record.get("id"), (str, int)):
            values["id"] = str(
                record["id"]
            )  # a record's own "id" names the case unless --id-field says otherwise
        return Case(
            id=values.get("id", ""),
            text=values["text"],
            label=values.get("label"),
            group=values.get("group"),
            where=where,
        )

    def cases(self) -> Iterator[Case]:
        """Every case, in file order; ids default to the record number. An empty file is refused."""
        n = 0
        reader = {"jsonl": self._jsonl, "csv": self._csv, "tsv": self._csv, "parquet": self._parquet_cases}
        for case in reader[self.kind](self.path):
            if case is None:
                raise LmscopeError(
                    f"{self.path}: a record is not UTF-8 text", "save the file as UTF-8 (e.g. iconv -t utf-8)"
                )
            n += 1
            case.id = case.id or str(n)
            yield case
        if n == 0:
            raise LmscopeError(
                f"data file '{self.path}' holds no cases", "pass a file with one case per record"
            )

    def count(self) -> int | None:
        """How many records the file holds (for the ETA), read cheaply without parsing texts."""
        if self.kind == "parquet":
            try:
                import pyarrow.parquet as pq

                return pq.ParquetFile(self.path).metadata.num_rows
            except Exception:
                return None
        if self.kind == "jsonl":
            with open(self.path, "rb") as f:
                return sum(1 for line in f if line.strip())
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                rows = csv.reader(f, delimiter="\t" if self.kind == "tsv" else ",")
                return max(0, sum(1 for row in rows if any(c.strip() for c in row)) - 1)
        except (UnicodeDecodeError, csv.Error):
            return None

    def _csv(self, path: str) -> Iterator[Case]:
        delimiter = "\t" if self.kind == "tsv" else ","
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.reader(f, delimiter=delimiter)
                header = next(reader, None)
                if header is None:
                    return
                for row in reader:
                    number = reader.line_num
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) != len(header):
                        raise LmscopeError(
                            f"{path} line {number} has {len(row)} fields, the header has {len(header)}",
                            "quote fields that hold the delimiter",
                        )
                    yield self._value(dict(zip(header, row)), f"{path} line {number}")
        except UnicodeDecodeError as e:
            raise LmscopeError(
                f"'{path}' is not UTF-8 text (bad byte at offset {e.start})", "save it as UTF-8"
            ) from None
        except csv.Error as e:
            raise LmscopeError(f"{path} is not valid CSV ({e})", "check its quoting") from None

    def _parquet_cases(self, path: str) -> Iterator[Case]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LmscopeError(
                f"reading '{path}' needs pyarrow, which is not installed", "pip install pyarrow"
            ) from None
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid (and others) for files that are not Parquet
            raise LmscopeError(
                f"'{path}' is not a Parquet file ({e})", "pass a valid .parquet file"
            ) from None
        columns = [c for c in self.fields.values() if c is not None]
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise LmscopeError(
                f"{path} has no column '{missing[0]}' (it has: {', '.join(pf.schema_arrow.names[:8])})",
                "pass the field flags with the right column names",
            )
        row = 0
        for batch in pf.iter_batches(columns=list(dict.fromkeys(columns)), batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield self._value(record, f"{path} row {row}")
