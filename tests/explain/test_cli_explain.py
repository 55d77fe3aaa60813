"""``lmscope explain``: happy paths write both files atomically; each bad input is one stderr line, exit 2."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main

TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, causal_tokenizer, build_tiny):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny("gpt2").save_pretrained(path)
    causal_tokenizer.save_pretrained(path)
    return str(path)


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lmscope: error:") and needle in err, err


def test_methods_list_prints_every_method(capsys):
    from lmscope.explain.attribution.base import method_names

    assert main(["explain", "--methods", "list"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert name in out


def test_explain_writes_report_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        ["explain", "--model", tiny_dir, "--text", TEXT, "--target", " Mary", "--contrast", " John",
         "--methods", "occlusion,integrated_gradients,attention_rollout", "--steps", "16", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "attributions.json").read_text())
    assert data["target"]["kind"] == "contrast" and data["target"]["contrast"] == " John"
    assert set(data["methods"]) == {"occlusion", "integrated_gradients", "attention_rollout"}
    assert data["methods"]["integrated_gradients"]["steps"] == 16
    assert all(len(m["scores"]) == len(data["tokens"]) for m in data["methods"].values())
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.iterdir()) == ["attributions.json", "report.html"]
    assert "completeness error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--target", " Maryanne"], "first token ' Mary'"),
        (["--target", " Mary", "--methods", "nope"], "unknown attribution method 'nope'"),
        (["--baseline", "banana"], "unknown baseline"),
        (["--baseline", "mask"], "no mask token"),
        (["--steps", "0"], "--steps must be positive"),
        (["--max-steps", "1"], "--max-steps"),
        (["--generate", "-1"], "--generate"),
        (["--generate", "2", "--target", " Mary"], "--generate"),
        (["--contrast", " John"], "--contrast needs --target"),
        (["--target", " Mary", "--contrast", " Mary"], "same token"),
        (["--pair", "another text"], "--pair is for encoders"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    rc = main(
        ["explain", "--model", tiny_dir, "--text", TEXT, "--methods", "occlusion", "--out", str(out)] + args
    )
    assert rc == 2
    _one_line_error(capsys, needle)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_empty_text_and_missing_out(tiny_dir, tmp_path, capsys):
    assert main(["explain", "--model", tiny_dir, "--text", "  ", "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "text is empty")
    assert main(["explain", "--model", tiny_dir, "--text", TEXT]) == 2
    _one_line_error(capsys, "--out is required")


def test_unwritable_out(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["explain", "--model", tiny_dir, "--text", TEXT, "--out", str(blocker)]) == 2
    _one_line_error(capsys, "not a directory")


@pytest.mark.real
def test_encoder_needs_pair_and_explains_cosine(tmp_path, capsys):
    assert main(["explain", "--model", "minilm", "--text", TEXT, "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--pair")
    out = tmp_path / "ok"
    rc = main(
        ["explain", "--model", "minilm", "--text", "a cat sat on the mat", "--pair", "a dog lay on the rug",
         "--methods", "occlusion,saliency", "--no-sanity", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "attributions.json").read_text())
    assert data["target"]["kind"] == "cosine" and -1 <= data["target"]["value"] <= 1
