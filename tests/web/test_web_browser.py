"""The serve page in a real browser: Playwright driving Debian's headless Chromium against a live server.

Set LMSCOPE_SCREENSHOT=docs/serve.png to also refresh the README screenshot.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.real,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run does it)"
    ),
]
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, live_server, smollm2):
    from lmscope.web.server import Limits

    server = live_server({"smollm2": smollm2}, Limits(max_chars=600, max_tokens=64))
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield page
    context.close()
    assert errors == [], errors  # no uncaught script error on the page


def _message(page) -> str:
    page.wait_for_selector("#msg:not([hidden])", timeout=60_000)
    return page.inner_text("#msg")


def _hover_last_cell(page, canvas):
    """Hover the bottom-right cell of the heatmap (query = last token, key = last token)."""
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] - 13, box["y"] + box["height"] - 13)
    page.wait_for_function("c => c.hasAttribute('data-hover')", arg=canvas)  # set by this canvas's mousemove
    page.wait_for_selector(".ls-tip .ls-val", state="visible")
    return canvas.get_attribute("data-hover"), page.inner_text(".ls-tip .ls-val")


def _expected(smollm2, layer: int, head: int) -> float:
    run = smollm2.run(TEXT, capture=[f"blocks.{layer}.attn.pattern"])
    return float(run.tensors[f"blocks.{layer}.attn.pattern"][0, head, -1, -1])


def test_inspect_hover_switch_head_explain_and_screenshot(page, smollm2, tmp_path):
    # bad input first: clear messages, the page keeps working
    page.fill("#text", "   ")
    page.click("#run")
    assert "the text is empty" in _message(page)
    page.fill("#text", "word " * 130)
    page.click("#run")
    assert "650 characters, over the limit of 600" in _message(page)
    page.fill("#text", "word " * 80)
    page.click("#run")
    assert "over this server's limit of 64 tokens" in _message(page)

    # inspect: the attention heatmap, hover a cell and read the weight
    page.fill("#text", TEXT)
    page.click("#run")
    canvas = page.wait_for_selector("#panel-inspect .ls-attn canvas.ls-canvas", timeout=120_000)
    assert page.is_hidden("#msg")
    assert page.inner_text("#panel-inspect .ls-attn .ls-title") == "layer 0, head 0"
    hover, shown = _hover_last_cell(page, canvas)
    assert hover == shown
    assert float(shown) == pytest.approx(_expected(smollm2, 0, 0), abs=0.006)
    sections = page.locator("#panel-inspect .app-h2").all_inner_texts()
    assert sections[:2] == ["Input", "Attention"] and "Activations" in sections

    # switch layer and head: the heatmap is redrawn with that head's weights
    page.select_option("#panel-inspect .ls-attn select.ls-layer", "5")
    page.select_option("#panel-inspect .ls-attn select.ls-head", "3")
    assert page.inner_text("#panel-inspect .ls-attn .ls-title") == "layer 5, head 3"
    canvas = page.wait_for_selector("#panel-inspect .ls-attn canvas.ls-canvas")
    page.mouse.move(0, 0)
    hover, shown = _hover_last_cell(page, canvas)
    assert float(shown) == pytest.approx(_expected(smollm2, 5, 3), abs=0.006)
    links = page.locator("#panel-inspect .app-dl").all_inner_texts()
    assert links == ["⤓ report.html", "⤓ result.json"]
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=False)
    if os.environ.get("LMSCOPE_SCREENSHOT"):
        shutil.copy(tmp_path / "serve.png", os.environ["LMSCOPE_SCREENSHOT"])
    assert (tmp_path / "serve.png").stat().st_size > 10_000

    # explain: a multi-token target is refused with a clear message
    page.click(".app-tab[data-tab='explain']")
    page.fill("#target", " Paris is")
    page.click("#run")
    assert "it must be exactly one token" in _message(page)
    page.fill("#target", " Paris")
    assert not page.locator("#panel-explain .app-unavailable").is_visible()
    for name in ("input_x_gradient", "occlusion"):  # keep the fast default saliency only
        page.uncheck(f"#methods input[value='{name}']")
    assert page.is_checked("#methods input[value='saliency']")
    page.click("#run")
    page.wait_for_selector("#panel-explain .ls-tok[data-score]", timeout=240_000)
    assert page.is_hidden("#msg") and page.is_hidden("#steps")
    assert "logit of ' Paris'" in page.inner_text("#panel-explain .app-out")
    row = page.locator("#panel-explain .ls-tokens").first
    assert row.locator(".ls-tok-label").inner_text().startswith("saliency")
    scores = [float(s) for s in row.locator(".ls-tok").evaluate_all("els => els.map(e => e.dataset.score)")]
    assert len(scores) == 5 and max(scores) > 0
    rank = page.locator("#panel-explain table.ls-table tbody tr").first.locator("td").all_inner_texts()
    assert rank[:2] == ["1", "saliency"]  # the faithfulness ranking

    # generation steps: explain 2 generated tokens, then pick step 2
    page.fill("#target", "")
    page.fill("#generate", "2")
    page.click("#run")
    page.wait_for_selector("#steps:not([hidden]) .app-step", timeout=240_000)
    steps = page.locator("#steps .app-step")
    assert steps.count() == 2 and steps.nth(0).inner_text() == 'step 1: " Paris"'
    steps.nth(1).click()
    row = page.locator("#panel-explain .ls-tokens").first
    assert row.locator(".ls-tok").count() == 6  # the prompt plus the first generated token
    assert row.locator(".ls-tok").last.inner_text() == "·Paris"
    page.screenshot(path=str(tmp_path / "serve-explain.png"), full_page=False)


def test_progress_cancel_and_a_head_pattern(page, monkeypatch):
    import lmscope.explain.heads as heads

    real = heads.analyze_heads

    def stalls_after_layer_1(lm, text=None, progress=None, **kw):
        """The real head scoring, held after its first layer until the page cancels it (its progress
        callback raises once the job is cancelled), so the test never races a fast machine."""

        def held(done, total):
            for _ in range(1 if done != 1 else 600):
                progress(done, total)
                time.sleep(0.05)

        return real(lm, text, progress=held, **kw)

    monkeypatch.setattr(heads, "analyze_heads", stalls_after_layer_1)
    page.fill("#text", TEXT)
    page.click(".app-tab[data-tab='heads']")
    page.select_option("#heads-on", "text")
    # scoring heads is long work: the page shows progress and the job can be cancelled
    page.click("#run")
    page.wait_for_function(
        "() => /layer [1-9]\\d* of 30/.test(document.getElementById('job-msg').textContent)", timeout=180_000
    )
    assert page.is_visible("#job .app-bar") and page.get_attribute("#job-bar", "style") != "width: 0%;"
    assert page.evaluate("fetch('/api/info').then(r => r.status)") == 200  # the server answers meanwhile
    page.click("#cancel")
    assert _message(page) == "Cancelled."
    assert page.is_hidden("#job") and page.locator("#panel-heads .app-out > *").count() == 0

    # a head's pattern on the current text, picked by layer and head
    page.select_option("#hp-layer", "2")
    page.select_option("#hp-head", "7")
    page.click("#hp-show")
    page.wait_for_selector("#head-pattern .ls-attn canvas.ls-canvas", timeout=60_000)
    assert page.inner_text("#head-pattern .ls-attn .ls-title") == "layer 2, head 7"
    assert page.is_hidden("#msg")

    # compare needs two models; this server has one: the tab says so, and running it explains why
    page.click(".app-tab[data-tab='compare']")
    assert "compare needs two models" in page.inner_text("#panel-compare .app-unavailable")
    page.click("#run")
    assert "pick two different models" in _message(page)
