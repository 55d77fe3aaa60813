"""Progress bars: on stderr with an ETA when asked and stderr is a terminal; silent otherwise."""

from __future__ import annotations

import io
import re
import sys

from lmscope import progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_with_eta_only_when_enabled_and_a_terminal(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress.track(range(3), "quiet")) == [0, 1, 2]  # off by default (the Python API)
    assert tty.getvalue() == ""
    with progress.enabled(True):
        assert list(progress.track(range(3), "working", unit="layer")) == [0, 1, 2]
    shown = tty.getvalue()
    assert re.search(r"working: .*\d/3 \[\d\d:\d\d<", shown), shown  # elapsed<remaining: the ETA
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress.enabled(True):
        list(progress.track(range(3), "piped"))
        with progress.bar(3, "piped") as b:
            b.update(3)
    assert pipe.getvalue() == ""


def test_compress_and_evaluate_show_bars(make_tiny, monkeypatch):
    from lmscope.compress import Quantize, compress
    from lmscope.compress.evaluate import evaluate

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    lm = make_tiny("llama")
    with progress.enabled(True):
        res = compress(lm, Quantize("int8"))
        evaluate(
            [lm, res.lm],
            text="Some evaluation text about Python. " * 20,
            windows=1,
            window_tokens=32,
            decode_tokens=2,
            repeats=1,
        )
    shown = tty.getvalue()
    assert "quantize int8" in shown and "evaluate" in shown
    with progress.enabled(False):
        before = len(tty.getvalue())
        compress(lm, Quantize("int8"))
        assert len(tty.getvalue()) == before


def test_callback_bar_used_by_the_explain_verbs(monkeypatch):
    from lmscope.cli.speed import progress_bar

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress_bar("patching", "layer", total=10)
    bar.update_to(5, 10, "layer 5")
    bar.close()
    assert re.search(r"patching: .*5/10 \[\d\d:\d\d<.*layer 5", tty.getvalue()), tty.getvalue()
    before = tty.getvalue()
    quiet = progress_bar("patching", "layer", quiet=True, total=10)
    quiet.update_to(5, 10, "layer 5")
    quiet.close()
    assert tty.getvalue() == before
