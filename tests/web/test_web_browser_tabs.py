"""The Audit and Features tabs in a real browser (Playwright driving Debian's headless Chromium) against a live
server on tiny models: upload a dataset, see the audit view and its downloads; bad input as one message; the
features on each token, a feature's dashboard."""

from __future__ import annotations

import json
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run does it)"
    ),
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
ROWS = [
    {"id": "a1", "text": "He has a high income and he asks for a loan", "label": "approve", "group": "m"},
    {"id": "a2", "text": "She has a low income; her loan is large", "label": "deny", "group": "f"},
    {"id": "a3", "text": "Mary's income is high and she owns a house", "label": "approve", "group": "f"},
    {"id": "a4", "text": "John has debts and no savings", "label": "deny", "group": "m"},
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def open_page(browser, live_server):
    contexts = []

    def start(models, limits=None, dictionaries=None):
        server = live_server(models, limits, dictionaries)
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        return page

    yield start
    for c in contexts:
        c.close()


def _shot(page, name: str) -> None:
    """With LMSCOPE_SCREENSHOTS=DIR, a full-page screenshot of the tab (for reviewing the layout)."""
    folder = os.environ.get("LMSCOPE_SCREENSHOTS")
    if folder:
        page.screenshot(path=os.path.join(folder, name), full_page=True)


def _message(page) -> str:
    page.wait_for_selector("#msg:not([hidden])", timeout=60_000)
    return page.inner_text("#msg")


def test_audit_tab_uploads_runs_and_downloads(open_page, model_dirs, tmp_path):
    import lmscope
    from lmscope.web.server import Limits

    models = {k: lmscope.load(v, progress=False) for k, v in model_dirs.items()}
    page = open_page(models, Limits(max_upload_bytes=2048))
    page.select_option("#model", "clf")
    page.click(".app-tab[data-tab='audit']")
    assert page.is_hidden("#text") and page.is_hidden("#au-lm")  # a classifier: no prompt or choices
    assert "2048 bytes per file" in page.inner_text("#au-limits")
    assert page.locator("#au-builtin input:checked").count() == 2  # builtin gender and names

    page.click("#run")
    assert "choose a dataset file" in _message(page)
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 8))
    assert data.stat().st_size > 2048
    page.set_input_files("#au-file", str(data))
    page.click("#run")
    assert "over this server's upload limit of 2048 bytes" in _message(page)

    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    page.set_input_files("#au-file", str(data))
    page.fill("#au-text", "body")
    page.click("#run")
    assert _message(page).startswith(
        "cases.jsonl line 1 has no field 'body' (it has: id, text, label, group)"
    )

    page.fill("#au-text", "text")
    page.fill("#au-label", "label")
    page.fill("#au-group", "group")
    page.click("#run")
    page.wait_for_selector("#panel-audit .app-dl", timeout=240_000)
    assert page.is_hidden("#msg")
    assert page.inner_text("#panel-audit .app-out > .app-dim").startswith(
        "4 cases from cases.jsonl · classifier"
    )
    titles = page.locator("#panel-audit .app-h2").all_inner_texts()
    assert titles[:2] == ["Findings", "Dataset summary"] and "Confusion matrix" in titles
    links = page.locator("#panel-audit .app-dl").all_inner_texts()
    assert links == ["⤓ report.html", "⤓ audit.json", "⤓ cases.csv"]
    href = page.get_attribute("#panel-audit .app-dl >> nth=1", "href")
    audit = json.loads(page.evaluate("url => fetch(url).then(r => r.text())", href))
    assert audit["data"]["n_cases"] == 4 and audit["data"]["path"] == "cases.jsonl"
    shown = page.locator("#panel-audit .app-out table.ls-table").first.inner_text()
    for finding in audit["findings"]:  # every finding of audit.json is in the page's findings table
        assert finding["text"] in shown
    _shot(page, "serve-audit.png")
    with page.expect_download() as dl:
        page.click("#panel-audit .app-dl >> nth=2")
    path = dl.value.path()
    assert dl.value.suggested_filename == "cases.csv"
    assert open(path).read().startswith("case_id,variant,changes,text,label,group,prediction")

    # a causal LM decides through a prompt and choices; the page sends them, bad ones come back as one line
    page.select_option("#model", "causal")
    assert page.is_visible("#au-lm")
    page.fill("#au-prompt", "Decision:")
    page.click("#run")
    assert "must hold {text} exactly once" in _message(page)
    page.fill("#au-prompt", "Application: {text}\nDecision:")
    page.uncheck("#au-explain")
    page.click("#run")
    page.wait_for_selector("#panel-audit .app-dl", timeout=240_000)
    assert (
        page.is_hidden("#msg") and "Dataset summary" in page.locator("#panel-audit .app-h2").all_inner_texts()
    )
    href = page.get_attribute("#panel-audit .app-dl >> nth=1", "href")
    audit = json.loads(page.evaluate("url => fetch(url).then(r => r.text())", href))
    assert audit["decider"] == {
        "kind": "choices",
        "classes": [" approve", " deny"],
        "positive": " approve",
        "prompt": "Application: {text}\nDecision:",
    }
    assert page.errors == []


def test_features_tab_tokens_features_and_a_dashboard(open_page, trained):
    import lmscope
    from lmscope.web.features import load_dictionary

    model_dir, sae_dir, feats = trained
    lm = lmscope.load(str(model_dir), progress=False)
    explained = {u["unit"]: u for u in json.loads((feats / "explanations.json").read_text())["units"]}
    page = open_page({"tiny": lm}, dictionaries={"sae": load_dictionary(sae_dir, feats, "sae")})
    page.click(".app-tab[data-tab='features']")
    assert page.is_hidden("#panel-features .app-unavailable")
    assert "64 features" in page.inner_text("#fe-info") and f"{len(explained)} explained" in page.inner_text(
        "#fe-info"
    )
    text = "The cat sat on the mat because it was warm."
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_selector("#panel-features .fe-tok", timeout=120_000)
    n_tokens = len(lm.tokenizer(text)["input_ids"])
    assert page.locator("#panel-features .fe-tok").count() == n_tokens
    page.locator("#panel-features .fe-tok").nth(3).click()
    assert page.inner_text("#panel-features .fe-detail h2").startswith("Token 3:")
    rows = page.locator("#panel-features table.fe-table tbody tr")
    assert rows.count() > 0
    units = [int(t.strip("#")) for t in rows.locator("td:first-child").all_inner_texts()]
    with_expl = [u for u in units if u in explained]
    for k, u in enumerate(units):  # each row shows the explanation of explanations.json, or none
        cell = rows.nth(k).locator("td").nth(3).inner_text()
        assert cell == (explained[u]["explanation"] if u in explained else "—")
    if with_expl:  # the dashboard of views/features.py for an explained feature, in an isolated frame
        page.click(f"#panel-features table.fe-table .fe-feat[data-unit='{with_expl[0]}']")
        frame = page.frame_locator("#fe-dashboard iframe")
        assert f"latent {with_expl[0]}" in frame.locator("#detail h2").inner_text(timeout=60_000)
        assert explained[with_expl[0]]["explanation"] in frame.locator("#detail").inner_text()
        assert page.get_attribute("#fe-dashboard iframe", "sandbox") == "allow-scripts"
    bare = [u for u in units if u not in explained]
    if bare:  # a feature explanations.json lacks: what its decoder direction does, and no explanation
        page.click(f"#panel-features table.fe-table .fe-feat[data-unit='{bare[0]}']")
        page.wait_for_selector("#fe-dashboard .ls-note", timeout=60_000)
        _shot(page, "serve-features.png")
        assert page.inner_text("#fe-dashboard h2") == f"Feature {bare[0]}"
        assert "no scored explanation" in page.inner_text("#fe-dashboard")
    assert with_expl and bare or len(units) == 1  # both kinds drawn (32 of the 64 features are explained)
    assert page.errors == []
