"""``lmscope patch``: writes patching.json + report.html; bad input is one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _args(**over):
    base = {"--clean": CLEAN, "--corrupt": CORRUPT, "--target": " Mary", "--contrast": " John"}
    base.update(over)
    return [x for k, v in base.items() if v is not None for x in (k, v)]


@pytest.mark.real
def test_patch_writes_json_and_report(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "out"
    assert main(["patch", *_args(), "--layers", "0,29", "--out", str(out)]) == 0
    data = json.loads((out / "patching.json").read_text())
    assert data["tokens"][9] == " John" and data["corrupt_tokens"][9] == " Mary"
    assert data["metric_clean"] > 0 > data["metric_corrupt"]
    assert data["resid"][0][9] == pytest.approx(1.0, abs=1e-3)
    assert len(data["heads"]) == 30 and len(data["heads"][29]) == 9 and len(data["mlp"]) == 30
    html = (out / "report.html").read_text()
    assert "Residual stream" in html and "Attention heads" in html and "https://" not in html
    assert "clean 6.1" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.parametrize(
    "over, message",
    [
        ({"--corrupt": CORRUPT + " her"}, "the clean prompt is 14 tokens and the corrupted one 15"),
        ({"--target": " Maryanne"}, "--target ' Maryanne' is 2 tokens (' Mary' + 'anne')"),
        ({"--contrast": " Johnathan"}, "--contrast ' Johnathan' is"),
        ({"--corrupt": CLEAN}, "nothing to restore"),
        ({"--clean": "  "}, "--clean is empty"),
        ({"--layers": "31"}, "layer 31 is out of range: smollm2 has 30 layers"),
        ({"--layers": "a,b"}, "--layers must be comma-separated integers"),
    ],
)
def test_patch_bad_input(tmp_path, smollm2_dir, capsys, over, message):
    layers = over.pop("--layers", "29")
    out = tmp_path / "out"
    assert main(["patch", *_args(**over), "--layers", layers, "--out", str(out)]) == 2
    assert message in _err_line(capsys)
    assert not out.exists()
