"""``lmscope scan`` on the command line: SIGKILL then --resume gives identical files; bad input exits 2 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmscope.cli.main import main

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _args(model, out, *extra):
    return [
        "scan",
        "--model",
        str(model),
        "--corpus",
        "builtin",
        "--max-tokens",
        "5000",
        "--seq-len",
        "32",
        "--shard-tokens",
        "192",
        "--batch-tokens",
        "64",
        "--top-k",
        "4",
        "--sites",
        "blocks.*.mlp.hidden,blocks.2.resid_post",
        "--heads",
        "--dump",
        "blocks.1.resid_post",
        "--out",
        str(out),
        *extra,
    ]


def _start(args):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmscope.cli.main", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shards_done(out: Path) -> int:
    return len(list((out / "windows").glob("shard-*"))) if (out / "windows").exists() else 0


@pytest.fixture(scope="module")
def reference_scan(tiny_dir, tmp_path_factory):
    """One uninterrupted scan in a subprocess (as users run it) with ``_args``: the reference that the killed and
    resumed scan must reproduce byte for byte and the Ray scan must match (each test used to run its own copy).
    Read-only for the tests."""
    ref = tmp_path_factory.mktemp("scan") / "ref"
    p = _start(_args(tiny_dir, ref))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return ref


def test_sigkill_then_resume_gives_identical_outputs(tiny_dir, reference_scan, tmp_path):
    out = tmp_path / "out"
    reference = _files(reference_scan)
    assert {"scan.json", "stats.safetensors", "topk.safetensors", "heads.json", "report.html"} <= set(
        reference
    )
    n_shards = len([k for k in reference if k.startswith("windows/shard-")])
    assert n_shards >= 20

    # kill at two points of the run (after the first shard, then well into it), resuming in between
    kills = 0
    for target, extra in ((1, ()), (n_shards // 2, ("--resume",))):
        p = _start(_args(tiny_dir, out, *extra))
        deadline = time.time() + 300
        while _shards_done(out) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert not (out / "scan.json").exists()
        for f in (out / "windows").glob("shard-*"):  # whatever is there is whole
            load_file(f)
    assert kills == 2
    p = _start(_args(tiny_dir, out, "--resume"))
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert _files(out) == reference
    assert not [q for q in tmp_path.rglob(".*")]  # no temporary files left anywhere
    assert not [q for q in reference_scan.parent.rglob(".*")]


def _err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("lmscope: error")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _run_bad(capsys, args, out):
    rc = main(args)
    assert rc == 2
    line = _err_line(capsys)
    return line


def test_bad_inputs_exit_2_one_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "b.txt").write_bytes(b"\x00\xff\xfe binary")
    (tmp_path / "nofield.jsonl").write_text('{"body": "hello"}\n')
    (tmp_path / "notjson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    cases = [
        (["--corpus", str(tmp_path / "missing")], "does not exist"),
        (["--corpus", str(tmp_path / "empty")], "no text to scan"),
        (["--corpus", str(tmp_path / "binary")], "1 non-UTF-8/binary"),
        (["--corpus", str(tmp_path / "nofield.jsonl"), "--field", "text"], "line 1 has no field 'text'"),
        (["--corpus", str(tmp_path / "nofield.jsonl")], "no --field"),
        (["--corpus", str(tmp_path / "notjson.jsonl"), "--field", "text"], "line 2 is not JSON"),
        (["--corpus", "builtin", "--sites", "blocks.9.mlp.hidden"], "matches nothing"),
        (["--corpus", "builtin", "--sites", "blocks.0.attn.pattern"], "has no units"),
        (["--corpus", "builtin", "--dump", "bogus"], "matches nothing"),
        (["--corpus", "builtin", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["--corpus", "builtin", "--seq-len", "100000"], "longer than this model's context"),
    ]
    for extra, message in cases:
        line = _run_bad(capsys, ["scan", "--model", str(tiny_dir), "--out", str(out), *extra], out)
        assert message in line, (extra, line)
        assert " — " in line  # problem — fix
        assert not out.exists(), extra  # nothing written


def test_resume_refuses_other_settings_and_existing_out_needs_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["scan", "--model", str(tiny_dir), "--corpus", "builtin", "--max-tokens", "300", "--out", str(out)]
    assert main([*base, "--seq-len", "32", "--no-report"]) == 0
    capsys.readouterr()
    before = _files(out)
    line = _run_bad(capsys, [*base, "--seq-len", "32"], out)
    assert "already holds a scan" in line and "--resume" in line
    line = _run_bad(capsys, [*base, "--seq-len", "16", "--resume"], out)
    assert "cannot resume" in line and "settings" in line
    other = tmp_path / "other.txt"
    other.write_text("another corpus entirely")
    args = [
        "scan",
        "--model",
        str(tiny_dir),
        "--corpus",
        str(other),
        "--max-tokens",
        "300",
        "--out",
        str(out),
    ]
    line = _run_bad(capsys, [*args, "--seq-len", "32", "--resume"], out)
    assert "cannot resume" in line and "corpus" in line
    assert _files(out) == before
    # --resume of a finished scan with the same settings is a no-op that succeeds
    assert main([*base, "--seq-len", "32", "--no-report", "--resume"]) == 0
    assert _files(out) == before


@pytest.mark.ray
def test_ray_equals_in_process(tiny_dir, reference_scan, tmp_path):
    pytest.importorskip("ray")
    t0 = time.time()
    p = _start([*_args(tiny_dir, tmp_path / "ray"), "--ray", "auto", "--workers", "2"])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    print(f"ray scan of 5000 tokens incl. runtime start: {time.time() - t0:.1f}s")
    local, ray = reference_scan, tmp_path / "ray"
    for name in ("topk.safetensors", "windows/index.safetensors"):
        a, b = load_file(local / name), load_file(ray / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)
    a, b = load_file(local / "stats.safetensors"), load_file(ray / "stats.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-9 * (1 + a[k].abs().max()), k
