"""``lmscope compress``: bad recipes exit 2 with one stderr line before any work; a good run writes the model,
report.html and compress.json, and the directory loads back."""

from __future__ import annotations

import json

import pytest

import lmscope
from lmscope.cli.main import main


@pytest.fixture()
def tiny_dir(make_tiny, tmp_path):
    lm = make_tiny("llama")
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d, safe_serialization=True)
    lm.tokenizer.save_pretrained(d)
    return d


def _one_line_error(capsys, rc, needle):
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmscope: error:") and needle in err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--prune-unstructured", "1.5"], "sparsity must be between 0 and 1"),
        (["--quantize", "int3"], "unknown quantization scheme 'int3'"),
        (["--quantize", "int8", "--group-size", "64"], "--group-size applies to int4/gptq4"),
        (["--quantize", "int4", "--group-size", "128"], "does not divide the width 64"),
        ([], "the recipe has no steps"),
        (
            ["--quantize", "int8", "--modules", "model.layers.*.mlpp.*"],
            "module filter 'model.layers.*.mlpp.*'",
        ),
    ],
)
def test_bad_recipe_exits_2_and_writes_nothing(tiny_dir, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(tiny_dir), *flags, "--out", str(out)])
    _one_line_error(capsys, rc, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_recipe_file(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"kind": "prune_unstructured", "sparsity": 1.5}]}))
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(tiny_dir), "--recipe", str(recipe), "--out", str(out)])
    _one_line_error(capsys, rc, "sparsity must be between 0 and 1")
    assert not out.exists()


def test_compress_int8_writes_model_report_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "small"
    rc = main(["compress", "--model", str(tiny_dir), "--quantize", "int8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "worst 5 layers" in printed and "bytes:" in printed
    for name in (
        "model.safetensors",
        "config.json",
        "lmscope_recipe.json",
        "lmscope_manifest.json",
        "report.html",
        "compress.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "compress.json").read_text())
    assert summary["bytes_after"] < summary["bytes_before"]
    assert summary["steps"][0]["info"]["layers"][0]["weight_sqnr_db"] > 30
    html = (out / "report.html").read_text()
    assert "Per-layer quantization error" in html and "Structure" in html
    assert lmscope.load(str(out), progress=False).n_layers == 3


def test_stacked_recipe_file_prunes_then_quantizes(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps(
            {
                "steps": [
                    {"kind": "quantize", "scheme": "int4", "group_size": 32},
                    {"kind": "prune_layers", "layers": [2]},
                ]
            }
        )
    )
    rc = main(["compress", "--model", str(tiny_dir), "--recipe", str(recipe)])
    _one_line_error(capsys, rc, "out of order")
    rc = main(
        [
            "compress",
            "--model",
            str(tiny_dir),
            "--prune-layers",
            "2",
            "--quantize",
            "int4",
            "--group-size",
            "32",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 0
    lm = lmscope.load(str(tmp_path / "s"), progress=False)
    assert lm.n_layers == 2


def test_modules_flag_limits_every_step(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "compress",
            "--model",
            str(tiny_dir),
            "--quantize",
            "int8",
            "--modules",
            "*.layers.0.*",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "compress.json").read_text())
    modules = data["steps"][0]["info"]["modules"]
    assert modules and all(".layers.0." in m for m in modules)
    assert data["recipe"]["steps"][0]["modules"] == ["*.layers.0.*"]
