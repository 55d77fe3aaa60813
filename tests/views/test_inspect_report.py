"""inspect report details from issue 9: tokens shown with the · marker, run.json and the report list the
same predictions, --layer/--head open the HTML explorer there, cached GGUF models keep their name."""

from __future__ import annotations

import json
import re

from lmscope.cli.inspect import inspect
from lmscope.views.report import N_PREDICTIONS


def _widgets(html: str) -> list[dict]:
    data = re.search(r"lmscope\.renderAll\([^,]+, (\{.*?\})\);</script>", html, re.S).group(1)
    return json.loads(data.replace("<\\/", "</"))["widgets"]


def test_predictions_markers_and_opened_head(make_tiny, tmp_path):
    lm = make_tiny("llama")
    out = tmp_path / "out"
    summary = inspect(lm, "The capital of France is", str(out), layer=1, head="2", png=False)
    widgets = _widgets((out / "report.html").read_text())
    table = next(w for w in widgets if w["type"] == "table" and w["columns"][0] == "next token")
    run_json = json.loads((out / "run.json").read_text())
    assert len(table["rows"]) == len(run_json["prediction"]) == N_PREDICTIONS == len(summary["prediction"])
    for row, pred in zip(table["rows"], run_json["prediction"]):
        assert " " not in row[0] and "\n" not in row[0]
        assert row[0] == pred["token"].replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    attention = next(w for w in widgets if w["type"] == "attention")
    assert (attention["layer"], attention["head"]) == (1, 2)


def test_default_opens_first_head(make_tiny, tmp_path):
    lm = make_tiny("llama")
    inspect(lm, "The capital of France is", str(tmp_path / "o"), png=False)
    attention = next(
        w for w in _widgets((tmp_path / "o" / "report.html").read_text()) if w["type"] == "attention"
    )
    assert (attention["layer"], attention["head"]) == (0, 0)


def test_cached_gguf_dir_is_named_after_its_file(tmp_path):
    from lmscope.models.cache import MARKER
    from lmscope.models.sources import resolve

    entry = tmp_path / "SmolLM2-135M-Instruct.Q4_1-10fea8d68586d496"
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    (entry / MARKER).write_text(json.dumps({"source": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert resolve(str(entry)).label == "SmolLM2-135M-Instruct.Q4_1.gguf"
    plain = tmp_path / "small"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert resolve(str(plain) + "/").label == "small"
