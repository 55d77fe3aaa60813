"""`make test` on a fresh machine: its `chromium` step installs the browser with apt-get when it can, or
stops with the one command to run (checked with fake tools on a PATH that has no chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="no make")


def _bin(tmp_path, **scripts) -> str:
    """A PATH with only sh and id, plus the given fake tools (name -> shell body)."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("sh", "id"):
        os.symlink(shutil.which(tool), d / tool)
    for name, body in scripts.items():
        f = d / name
        f.write_text(f"#!/bin/sh\n{body}\n")
        f.chmod(0o755)
    return str(d)


def _make(path: str):
    return subprocess.run(
        [MAKE, "-s", "-C", str(ROOT), "chromium"], env={"PATH": path}, capture_output=True, text=True
    )


def test_without_chromium_or_apt_it_stops_with_the_command(tmp_path):
    r = _make(_bin(tmp_path))
    assert r.returncode != 0
    assert "run: sudo apt-get install -y chromium" in r.stderr


def test_with_apt_get_as_root_it_installs(tmp_path):
    log = tmp_path / "apt.log"
    fake_id = 'if [ "$1" = "-u" ]; then echo 0; fi'
    path = _bin(tmp_path, **{"apt-get": f'echo "$@" >> {log}'})
    os.remove(Path(path) / "id")
    (Path(path) / "id").write_text(f"#!/bin/sh\n{fake_id}\n")
    (Path(path) / "id").chmod(0o755)
    r = _make(path)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("update") and calls[1].startswith("install -y -q chromium")


def test_with_chromium_it_does_nothing(tmp_path):
    r = _make(_bin(tmp_path, chromium="exit 0", **{"apt-get": "exit 9"}))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
