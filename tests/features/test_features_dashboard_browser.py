"""The feature dashboard in a real browser (headless Chromium): no script errors, the index sorted by score,
search filters it, a click shows the feature with its scores beside the random explanation's, shaded tokens."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)"),
]


def _result():
    from test_features_explain import WordTokenizer, _stream

    from lmscope.features.explain import explain_units, summary

    ids, acts = _stream([(3, 7), (11, 5), (20, 21)])
    units = explain_units(ids, acts, WordTokenizer(), [0, 1, 2], site="blocks.1.resid_post")
    for u in units:
        u["histogram"] = {"edges": [0.0, 0.5, 1.0], "counts": [3, 9], "zero_fraction": 0.9}
        u["top_contexts"] = [{"tokens": [" a", " <b>", "\n"], "acts": [0.0, 1.0, 0.5]}]
        u["logits"] = {"promoted": [[" yes", 2.0]], "suppressed": [[" no", -1.5]]}
    units[1]["scores"]["detection"] = 0.61  # one worse explanation: the index must put it last
    units.sort(key=lambda u: -u["scores"]["detection"])
    return {"site": "blocks.1.resid_post", "kind": "latents", "tokens": 1000, "units_asked": 3,
            "summary": summary(units), "units": units}  # fmt: skip


def test_dashboard_index_search_and_detail(tmp_path):
    from playwright.sync_api import sync_playwright

    from lmscope.views.features import features_html

    path = tmp_path / "features.html"
    path.write_text(features_html(_result()), encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        rows = page.eval_on_selector_all("tr.row", "rs => rs.map(r => r.cells[1].textContent)")
        assert rows == sorted(rows, reverse=True) and len(rows) == 3
        assert "w11" in page.eval_on_selector_all("tr.row", "rs => rs[2].textContent")
        page.fill("#q", "w20")
        assert page.eval_on_selector_all("tr.row", "rs => rs.length") == 1
        page.click("tr.row")
        detail = page.inner_text("#detail")
        assert "fires on ' w20' right after ' w21'" in detail and "random explanation" in detail
        shaded = page.eval_on_selector_all(".ctx span", "ss => ss.map(s => s.style.background)")
        assert len(shaded) == 3 and shaded[0] != shaded[1]  # zero vs peak activation
        assert "<b>" in page.inner_text(".ctx")  # token text escaped, not parsed as markup
        browser.close()
    assert errors == []
