"""CLI: ``heads --approx atp``, ``patch --approx atp`` and ``dla`` on a tiny model; approximate numbers
are labelled; bad combinations are one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def test_heads_approx(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. " * 4, encoding="utf-8")
    out = tmp_path / "out"
    args = [
        "heads",
        "--model",
        str(tiny_dir),
        "--text-file",
        str(text),
        "--max-tokens",
        "24",
        "--window",
        "24",
    ]
    assert main([*args, "--approx", "atp", "--compare-exact", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "heads.json").read_text())
    assert "APPROXIMATE" in data["metrics"]["atp_mean"]
    assert set(data["atp_vs_exact"]) == {"atp_zero", "atp_mean"}
    assert data["heads"][0]["ablation_mean"] is not None and data["heads"][0]["atp_mean"] is not None
    assert "APPROXIMATE" in (out / "report.html").read_text()


def test_patch_approx_and_dla(tiny_dir, tmp_path):
    out = tmp_path / "p"
    args = ["patch", "--model", str(tiny_dir), "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary"]
    assert main([*args, "--contrast", " John", "--approx", "atp", "--out", str(out)]) == 0
    data = json.loads((out / "patching.json").read_text())
    corr = data["approx"]["correlation_with_exact"]
    assert data["approx"]["approximate"] is True and set(corr) == {"resid", "resid_linear", "heads", "mlp"}
    assert "approximate, attribution patching" in (out / "report.html").read_text()
    out = tmp_path / "d"
    assert (
        main(["dla", "--model", str(tiny_dir), "--text", CLEAN, "--target", " Mary", "--out", str(out)]) == 0
    )
    data = json.loads((out / "dla.json").read_text())
    assert abs(sum(p["value"] for p in data["parts"]) + data["residual_error"] - data["logit"]) < 1e-9


def test_graddrop_from_the_cli(tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. " * 4, encoding="utf-8")
    out = tmp_path / "h"
    args = [
        "heads",
        "--model",
        str(tiny_dir),
        "--text-file",
        str(text),
        "--max-tokens",
        "24",
        "--window",
        "24",
    ]
    assert (
        main([*args, "--approx", "atp-graddrop", "--compare-exact", "--threads", "1", "--out", str(out)]) == 0
    )
    data = json.loads((out / "heads.json").read_text())
    assert (
        "APPROXIMATE" in data["metrics"]["atp_zero_graddrop"] and data["heads"][0]["atp_zero_graddrop"] >= 0
    )
    assert {"atp_zero_graddrop_vs_abs", "atp_zero_abs_vs_abs"} <= set(data["atp_vs_exact"])
    out = tmp_path / "p"
    args = ["patch", "--model", str(tiny_dir), "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary"]
    assert main([*args, "--approx", "atp-graddrop", "--no-exact", "--out", str(out)]) == 0
    gd = json.loads((out / "patching.json").read_text())["approx"]["graddrop"]
    assert "APPROXIMATE" in gd["label"] and len(gd["heads"]) == len(gd["raw"]["mlp"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", " Mary", "--no-exact"], "--no-exact"),
        (["heads", "--compare-exact"], "--compare-exact"),
        (["heads", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_bad_combinations(tiny_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert main([args[0], "--model", str(tiny_dir), *args[1:], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
