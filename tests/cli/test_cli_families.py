"""The CLI on models people bring: a classifier shows its class distribution, a mixture of experts its router,
and explain names the class it explains."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lmscope.cli.main import main
from lmscope.testing import tiny_model


@pytest.fixture()
def _cli(capsys):
    """The CLI in-process (the subprocess path is covered by tests/cli/test_cli_core.py)."""

    def run(*args):
        code = main([*args, "--quiet"] if args[0] == "explain" else list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, encoder_tokenizer):
    d = tmp_path_factory.mktemp("clf")
    tiny_model("distilbert", head="seq").save_pretrained(d)
    encoder_tokenizer.save_pretrained(d)
    return d


def test_inspect_classifier_shows_class_distribution(clf_dir, tmp_path, _cli):
    r = _cli(
        "inspect", "--model", str(clf_dir), "--text", "the loan was approved", "--out", str(tmp_path / "o")
    )
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    classes = run["classes"]
    assert sorted(c["label"] for c in classes) == ["negative", "neutral", "positive"]
    assert abs(sum(c["prob"] for c in classes) - 1) < 1e-3
    assert run["predicted_label"] == classes[0]["label"]
    assert "predicted class distribution" in (tmp_path / "o" / "report.html").read_text()


def test_explain_classifier_cli(clf_dir, tmp_path, _cli):
    r = _cli(
        "explain",
        "--model",
        str(clf_dir),
        "--text",
        "the loan was approved",
        "--target-label",
        "positive",
        "--methods",
        "saliency,occlusion",
        "--no-sanity",
        "--out",
        str(tmp_path / "e"),
    )
    assert r.returncode == 0, r.stderr
    att = json.loads((tmp_path / "e" / "attributions.json").read_text())
    step = att["steps"][0] if "steps" in att else att
    assert step["target"]["label"] == "positive"
    r = _cli(
        "explain",
        "--model",
        str(clf_dir),
        "--text",
        "x y",
        "--target-label",
        "maybe",
        "--out",
        str(tmp_path / "f"),
    )
    assert r.returncode == 2 and "not a class" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "f").exists()


def test_inspect_mixture_of_experts_records_router(tmp_path, causal_tokenizer, _cli):
    d = tmp_path / "moe"
    tiny_model("qwen2_moe").save_pretrained(d)
    causal_tokenizer.save_pretrained(d)
    r = _cli("inspect", "--model", str(d), "--text", "The capital of France is", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["shapes"]["blocks.0.mlp.router"][-1] == 4
