"""``lmscope dla``: writes dla.json + report.html; bad input is one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.real
def test_dla_writes_json_and_report(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "out"
    rc = main(["dla", "--text", IOI, "--target", " Mary", "--contrast", " John", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "dla.json").read_text())
    assert data["target"]["kind"] == "contrast" and data["target"]["token"] == " Mary"
    total = sum(p["value"] for p in data["parts"])
    assert abs(total + data["residual_error"] - data["logit"]) < 1e-9
    assert abs(data["residual_error"]) < 1e-4
    assert len([p for p in data["parts"] if p["head"] is not None]) == 30 * 9
    assert len(data["per_position"]) == 6 and len(data["per_position"][0]["sources"]) == len(data["tokens"])
    html = (out / "report.html").read_text()
    assert "Top contributors" in html and "https://" not in html


@pytest.mark.real
@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", " Maryland is"], "exactly one token"),
        (["--target", " Mary", "--contrast", " Mary"], "the same token"),
        (["--top-heads", "-1"], "--top-heads"),
    ],
)
def test_dla_bad_input(tmp_path, smollm2_dir, capsys, args, message):
    out = tmp_path / "out"
    assert main(["dla", "--text", IOI, *args, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("lmscope")]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
