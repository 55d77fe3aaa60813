"""``lmscope heads``: writes heads.json + report.html; bad input is one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main


def _err_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("lmscope")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.real
def test_heads_writes_json_and_report(tmp_path, smollm2_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. " * 6, encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["heads", "--text-file", str(text), "--max-tokens", "24", "--layers", "29", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "heads.json").read_text())
    assert data["tokens_used"] == 24 and data["layers_scored"] == [29]
    assert len(data["heads"]) == 30 * 9
    row = data["heads"][29 * 9 + 3]
    assert (row["layer"], row["head"], row["kv_head"]) == (29, 3, 1)
    assert row["shares_kv_with"] == [4, 5]
    assert isinstance(row["ablation_zero"], float) and isinstance(row["grad_importance"], float)
    assert data["heads"][0]["ablation_zero"] is None  # layer 0 not scored
    assert data["kv_groups"][0] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    inductions = [r for r in data["heads"] if r["summary"].startswith("induction head")]
    assert inductions and all(r["induction"] >= 0.3 for r in inductions)
    html = (out / "report.html").read_text()
    assert "Head importance" in html and "induction head" in html and "https://" not in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.real
@pytest.mark.parametrize(
    "args, content, message",
    [
        (["--layers", "30"], None, "layer 30 is out of range: smollm2 has 30 layers"),
        (["--methods", "zero,shap"], None, "unknown --methods"),
        (["--max-tokens", "1"], None, "at least 2"),
        ([], b"  \n\n ", "is empty"),
        ([], b"caf\xe9 au lait", "not UTF-8"),
    ],
)
def test_heads_bad_input(tmp_path, smollm2_dir, capsys, args, content, message):
    if content is not None:
        (tmp_path / "t.txt").write_bytes(content)
        args = [*args, "--text-file", str(tmp_path / "t.txt")]
    out = tmp_path / "out"
    assert (
        main(
            [
                "heads",
                *args,
                "--max-tokens" if "--max-tokens" not in args else "--seed",
                "8",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert message in _err_line(capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
