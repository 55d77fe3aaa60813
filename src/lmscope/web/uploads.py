"""Uploaded files for ``lmscope serve`` (the Audit tab's dataset and swap file): each one streamed into its own
fresh temporary folder, size-limited while it streams, and removed when the job that used it ends.

An upload is a raw request body (``Content-Type: application/octet-stream``, a type a cross-site form cannot
send without a CORS preflight, which this server never grants). Its file name only picks the suffix and the
name shown in messages; the file is written as a sanitized name inside the folder, never anywhere else.
Uploads no job claimed are removed after ``ttl`` seconds; every folder left is removed at shutdown.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

#: what may be uploaded: datasets (JSONL, CSV, TSV, Parquet) and JSON swap files
SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".json")


class UploadError(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass
class Upload:
    id: str
    name: str  # the sanitized file name, as shown in messages
    folder: Path
    bytes: int = 0
    created: float = field(default_factory=time.time)
    claimed: bool = False

    @property
    def path(self) -> Path:
        return self.folder / self.name

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "bytes": self.bytes}

    def local(self, message: str) -> str:
        """``message`` with this upload's temporary folder left out (messages name the file, not the folder)."""
        return message.replace(f"{self.folder}/", "").replace(str(self.folder), "the upload")


def safe_name(name: str | None) -> str:
    """A file name to write: the base name with anything but letters, digits, ``._-`` replaced; the suffix
    must be one ``SUFFIXES`` lists."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    suffix = ("." + base.rsplit(".", 1)[-1].lower()) if "." in base else ""
    if suffix not in SUFFIXES:
        raise UploadError(
            f"cannot tell the format of '{name or ''}' from its name; upload a .jsonl, .csv, .tsv or .parquet "
            "dataset, or a .json swap file"
        )
    return base


class Uploads:
    """The uploads of one server: ``receive`` streams one in, ``claim`` hands it to a job, ``remove`` deletes
    its folder. ``base`` is where the temporary folders go (default: the system's temporary directory)."""

    def __init__(self, max_bytes: int, base: str | None = None, ttl: float = 900.0, max_pending: int = 16):
        self.max_bytes, self.base, self.ttl, self.max_pending = max_bytes, base, ttl, max_pending
        self._items: dict[str, Upload] = {}
        self._lock = threading.Lock()

    async def receive(self, request, name: str | None) -> Upload:
        """Stream ``request``'s body into a new temporary folder; over ``max_bytes`` the folder is removed
        and a 413 is raised."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/octet-stream":
            raise UploadError(
                "send the file as the request body (Content-Type: application/octet-stream)", 415
            )
        filename = safe_name(name)
        limit = self.max_bytes
        declared = request.headers.get("content-length")
        too_big = (
            f"the file is over this server's upload limit of {_size(limit)}; upload a smaller file "
            "(or start lmscope serve with a larger --max-upload-mb)"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise UploadError(too_big, 413)
        self._sweep()
        upload = Upload(
            uuid.uuid4().hex[:16], filename, Path(tempfile.mkdtemp(prefix="lmscope-upload-", dir=self.base))
        )
        try:
            with open(upload.path, "wb") as f:
                async for chunk in request.stream():
                    upload.bytes += len(chunk)
                    if upload.bytes > limit:
                        raise UploadError(too_big, 413)
                    f.write(chunk)
            if upload.bytes == 0:
                raise UploadError(f"'{filename}' is empty; upload a file with one case per record")
        except BaseException:
            shutil.rmtree(upload.folder, ignore_errors=True)
            raise
        with self._lock:
            self._items[upload.id] = upload
        return upload

    def claim(self, upload_id, what: str) -> Upload:
        """The pending upload ``upload_id``, now owned by the caller (who must ``remove`` it)."""
        with self._lock:
            upload = self._items.get(upload_id) if isinstance(upload_id, str) else None
            if upload is None or upload.claimed:
                raise UploadError(
                    f"the {what} upload is gone (each upload is used by one run); upload it again"
                )
            upload.claimed = True
            return upload

    def remove(self, upload: Upload | None) -> None:
        if upload is None:
            return
        with self._lock:
            self._items.pop(upload.id, None)
        shutil.rmtree(upload.folder, ignore_errors=True)

    def remove_all(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for upload in items:
            shutil.rmtree(upload.folder, ignore_errors=True)

    def _sweep(self) -> None:
        """Remove uploads no job claimed within ``ttl``, and the oldest beyond ``max_pending``."""
        now = time.time()
        with self._lock:
            pending = sorted((u for u in self._items.values() if not u.claimed), key=lambda u: u.created)
            stale = [u for u in pending if now - u.created > self.ttl]
            stale += [u for u in pending if u not in stale][
                : max(0, len(pending) - len(stale) - self.max_pending + 1)
            ]
            for u in stale:
                del self._items[u.id]
        for u in stale:
            shutil.rmtree(u.folder, ignore_errors=True)


def _size(n: int) -> str:
    return f"{n / 2**20:.3g} MB" if n >= 2**20 else f"{n} bytes"
