"""CLI: inspect / models / demo outputs, and every bad-input path: one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

from lmscope.cli.main import main


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.real
def test_inspect_writes_report_pngs_json_tensors(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "out"
    rc = main(["inspect", "--model", "smollm2", "--text", "The capital of France is", "--out", str(out)])
    assert rc == 0
    files = {p.name for p in out.iterdir()}
    assert {
        "report.html",
        "run.json",
        "tensors.safetensors",
        "attention_model_view.png",
        "logit_lens.png",
        "residual_norms.png",
    } <= files
    summary = json.loads((out / "run.json").read_text())
    assert summary["tokens"][0] == ["The", " capital", " of", " France", " is"]
    assert summary["prediction"][0]["token"].strip() == "Paris"
    tensors = load_file(out / "tensors.safetensors")
    assert tensors["blocks.3.attn.pattern"].shape == (1, 9, 5, 5)
    assert tensors["blocks.29.resid_post"].shape == (1, 5, 576)
    html = (out / "report.html").read_text()
    # self-contained: no external script, stylesheet, image or font (the SVG namespace URI is not a fetch)
    assert not re.search(
        r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|<link\b|@import""", html
    )
    assert '"type":"attention"' in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.real
def test_inspect_long_text_stays_readable(tmp_path, smollm2_dir):
    from lmscope.data import builtin_text

    text_file = tmp_path / "long.txt"
    # 556 tokens: past the 512 the views must stay readable at, and past 96 (pooling). Not more: the report's
    # logit lens is a vocabulary-wide matmul per layer and position, and the captured patterns grow as n²
    text_file.write_text(builtin_text()[:2600])
    out = tmp_path / "out"
    assert main(["inspect", "--text-file", str(text_file), "--out", str(out), "--truncate"]) == 0
    summary = json.loads((out / "run.json").read_text())
    assert summary["n_tokens"] > 512
    html = (out / "report.html").read_text()
    assert "pooled into 96 bins" in html


@pytest.mark.real
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--text", "   "], "the text is empty"),
        (["--layer", "30"], "--layer 30 is out of range"),
        (["--head", "9"], "--head 9 is out of range"),
        (["--head", "x"], "--head must be a number"),
        (["--capture", "blocks.*.nonsense"], "matches nothing"),
        (["--max-capture-gb", "0.000001"], "--max-capture-gb"),
    ],
)
def test_inspect_bad_input(tmp_path, smollm2_dir, capsys, args, message):
    out = tmp_path / "out"
    base = ["inspect", "--text", "hello world", "--out", str(out)]
    rc = main(base + args)
    assert rc == 2
    line = _err_line(capsys)
    assert line.startswith("lmscope: error:") and message in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_text_file_errors(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café crème".encode("latin-1"))
    assert main(["inspect", "--text-file", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not UTF-8" in _err_line(capsys)
    assert main(["inspect", "--text-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _err_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert main(["inspect", "--text", "hi", "--out", str(ro / "x")]) == 2
    assert "not writable" in _err_line(capsys)


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["inspect", "--text", "hi", "--out", str(f)]) == 2
    assert "not a directory" in _err_line(capsys)
    assert f.read_text() == "keep me"


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "minilm" in out and "cache" in out


def test_every_verb_has_help_with_example(capsys):
    from lmscope.cli.main import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"inspect", "models", "demo"} <= set(verbs)
    for name, sub in verbs.items():
        text = sub.format_help()
        assert "example:" in text and f"lmscope {name}" in text, name
