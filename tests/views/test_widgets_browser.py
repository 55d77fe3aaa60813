"""Report widgets drawn by a real browser (headless Debian Chromium): legends in their line colours,
heatmap colours scaled to the data with a colour bar, the first-token / log toggles, token strips that
line up whatever their label, numbers that never wrap, bars that start at their baseline."""

from __future__ import annotations

import os
import shutil

import pytest

from lmscope.views.html import Report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    rep = Report("widgets")
    sec = rep.section("s")
    sec.lines(
        [
            {"name": "kernel_shap", "x": [0, 1, 2], "y": [1.0, 0.5, 0.1]},
            {"name": "occlusion", "x": [0, 1, 2], "y": [1.0, 0.8, 0.6]},
        ],
        y_title="target",
        x_title="k",
    )
    # the compare case: JS values far below 1 (max 0.018) must reach the darkest colour
    z = [[0.0, 0.001, 0.018], [0.002, 0.009, 0.0005]]
    sec.heatmap(z, x_labels=["h0", "h1", "h2"], y_labels=["L0", "L1"], controls=["log"])
    # the rollout case: an attention sink in column 0 dwarfs the rest
    sink = [[0.97, 0.02, 0.01], [0.95, 0.03, 0.02], [0.9, 0.06, 0.04]]
    sec.heatmap(
        sink,
        x_labels=["a", "b", "c"],
        y_labels=["a", "b", "c"],
        controls=["first", "log"],
        exclude_first=True,
    )
    # the search's architecture map: one level everywhere, named in each cell
    sec.heatmap(
        [[4.375], [4.375]], x_labels=["block"], y_labels=["0", "1"], cell_text=[["gptq-g64"], ["gptq-g64"]]
    )
    sec.tokens(["The", " capital"], [0.1, 0.5], label="kernel_shap · surrogate R² 0.627 on 256 samples")
    sec.tokens(["The", " capital"], [0.3, 0.2], label="occlusion")
    sec.table(["layer", "value", "summary"], [[1, 1.45e-4, "previous-token head (0.91), sink"]])
    sec.bars(["model.layers.12.self_attn.v_proj", "model.layers.28.mlp.up_proj"], [33.7, 39.8], baseline=32)
    path = tmp_path_factory.mktemp("w") / "r.html"
    rep.write(path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1200, "height": 1400})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(path.as_uri())
        pg.wait_for_selector(".ls-colorbar")
        yield pg
        assert errors == []
        browser.close()


def test_legend_names_have_their_line_colour(page):
    got = page.evaluate(
        """() => Array.from(document.querySelectorAll('.ls-legend-name')).map(t => getComputedStyle(t).fill)"""
    )
    strokes = page.evaluate(
        """() => Array.from(document.querySelectorAll('svg path')).map(p => getComputedStyle(p).stroke)"""
    )
    assert len(got) == 2 and got[0] != got[1]
    assert got == strokes[:2]  # rgb(...) of each series' line
    # the rotated y title clears every tick label
    boxes = page.evaluate(
        """() => { const svg = document.querySelector('.ls-svg');
          const r = e => e.getBoundingClientRect();
          const title = r(svg.querySelector('.ls-ytitle'));
          const ticks = Array.from(svg.querySelectorAll('text[text-anchor=end]')).map(r);
          return {title_right: title.right, tick_left: Math.min(...ticks.map(b => b.left))}; }"""
    )
    assert boxes["title_right"] <= boxes["tick_left"]


def _pixel(page, index, row, col):
    """RGB of heatmap ``index``'s cell (row, col), read back from the canvas."""
    return page.evaluate(
        """([i, r, c]) => { const cv = document.querySelectorAll('canvas.ls-canvas')[i];
          const ctx = cv.getContext('2d'); const W = cv.width;
          // cells start after the labels: find them from the data-less white margin
          const left = +cv.dataset.left, top = +cv.dataset.top, cw = +cv.dataset.cell, ch = +cv.dataset.cellH;
          const d = ctx.getImageData(left + c * cw + 2, top + r * ch + 2, 1, 1).data; return [d[0], d[1], d[2]]; }""",
        [index, row, col],
    )


def test_heatmap_colours_span_the_data(page):
    ranges = page.evaluate(
        "() => Array.from(document.querySelectorAll('.ls-colorbar')).map(c => c.dataset.range)"
    )
    assert ranges[0] == "0 0.018"
    darkest, lightest = _pixel(page, 0, 0, 2), _pixel(page, 0, 0, 0)
    assert sum(darkest) < 200 and sum(lightest) > 700  # the 0.018 cell is dark blue, not near-white
    # first token left out of the scale: 0.06 is the top, the sink cells saturate
    assert ranges[1] == "0.010 0.060"
    assert _pixel(page, 1, 2, 1) == _pixel(page, 1, 0, 0)  # 0.06 as dark as the saturated 0.97
    page.click(".ls-opt-first")
    page.click(".ls-opt-log")
    ranges = page.evaluate(
        "() => Array.from(document.querySelectorAll('.ls-colorbar')).map(c => c.dataset.range)"
    )
    assert ranges[1] == "0.010 0.970"


def test_cells_fit_their_text_and_one_value_gets_one_label(page):
    cell = page.evaluate("() => +document.querySelectorAll('canvas.ls-canvas')[2].dataset.cell")
    assert cell >= 6.5 * len("gptq-g64")  # the whole name fits, not "gptq"
    labels = page.evaluate(
        "() => [...document.querySelectorAll('canvas.ls-colorbar')].map(b => b.dataset.labels)"
    )
    assert labels == ["3", "3", "1"]  # not "4.375 4.375 4.375" on a flat map


def test_token_strips_line_up(page):
    xs = page.evaluate(
        """() => Array.from(document.querySelectorAll('.ls-tokens')).map(b => b.querySelector('.ls-tok').getBoundingClientRect().left)"""
    )
    assert len(xs) == 2 and xs[0] == xs[1]


def test_numbers_do_not_wrap_and_text_is_left_aligned(page):
    cells = page.evaluate(
        """() => Array.from(document.querySelectorAll('.ls-table td')).map(td =>
             [td.textContent, getComputedStyle(td).textAlign, getComputedStyle(td).whiteSpace, td.getClientRects().length])"""
    )
    num = next(c for c in cells if c[0] == "1.45e-4")
    text = next(c for c in cells if c[0].startswith("previous-token"))
    assert num[2] == "nowrap" and num[1] == "right"
    assert text[1] == "left"


def test_bars_start_at_baseline_and_show_full_labels(page):
    widths = page.evaluate(
        "() => Array.from(document.querySelectorAll('svg rect')).map(r => +r.getAttribute('width'))"
    )
    labels = page.evaluate(
        "() => Array.from(document.querySelectorAll('svg text[text-anchor=end]')).map(t => t.textContent)"
    )
    assert "model.layers.12.self_attn.v_proj" in labels
    assert widths[-1] / widths[-2] == pytest.approx((39.8 - 32) / (33.7 - 32), rel=0.01)
