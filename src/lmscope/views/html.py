"""Self-contained HTML reports: sections of widgets (plain JSON) rendered by the bundled lmscope.js.

Everything is inlined (script, style, data, images): the file opens from file:// with no network.
The same widget specs feed the ``lmscope serve`` page.
"""

from __future__ import annotations

import base64
import html as _html
import io
import json
import math
import uuid
from dataclasses import dataclass, field
from importlib import resources

import numpy as np


def asset(name: str) -> str:
    return resources.files("lmscope.views").joinpath("assets", name).read_text(encoding="utf-8")


def _plain(x):
    """Tensors / arrays / numpy scalars -> JSON-able lists and floats (NaN/inf -> None)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        # 6 significant digits, not 6 decimals: rollout products and tiny divergences (1e-9) must survive
        return None if math.isnan(x) or math.isinf(x) else float(f"{x:.6g}")
    if isinstance(x, np.integer):
        return int(x)
    return x


@dataclass
class Section:
    title: str
    note: str = ""
    anchor: str = ""
    widgets: list[dict] = field(default_factory=list)

    def add(self, spec: dict) -> Section:
        self.widgets.append(spec)
        return self

    def tokens(self, tokens, scores, label: str = "", excluded=None) -> Section:
        return self.add(
            {
                "type": "tokens",
                "tokens": list(tokens),
                "scores": _plain(scores),
                "label": label,
                "excluded": _plain(excluded) if excluded is not None else None,
            }
        )

    def heatmap(
        self,
        z,
        x_labels=None,
        y_labels=None,
        title="",
        x_title="",
        y_title="",
        diverging=False,
        cell_text=None,
        hover=None,
        value_range=None,
        log=False,
        cell=None,
        controls=(),
        exclude_first=False,
    ) -> Section:
        """A canvas heatmap. The color scale spans the data unless ``value_range`` is given; ``controls``
        adds toggles on the page: "log" (log color scale), "first" (leave the first column, e.g. an
        attention sink, out of the scale); ``log`` / ``exclude_first`` set their initial state."""
        spec = {
            "type": "heatmap",
            "z": _plain(z),
            "x_labels": _plain(x_labels) or [],
            "y_labels": _plain(y_labels) or [],
            "title": title,
            "x_title": x_title,
            "y_title": y_title,
            "diverging": diverging,
        }
        if cell_text is not None:
            spec["cell_text"] = cell_text
        if hover is not None:
            spec["hover"] = hover
        if value_range is not None:
            spec["range"] = list(value_range)
        if log:
            spec["log"] = True
        if cell:
            spec["cell"] = cell
        if controls:
            spec["controls"] = list(controls)
        if exclude_first:
            spec["exclude_first"] = True
        return self.add(spec)

    def table(self, columns, rows, highlight=None, title="") -> Section:
        return self.add(
            {
                "type": "table",
                "columns": list(columns),
                "rows": _plain(rows),
                "highlight": list(highlight or []),
                "title": title,
            }
        )

    def lines(self, series, title="", x_title="", y_title="") -> Section:
        return self.add(
            {
                "type": "lines",
                "series": [{**s, "x": _plain(s["x"]), "y": _plain(s["y"])} for s in series],
                "title": title,
                "x_title": x_title,
                "y_title": y_title,
            }
        )

    def bars(self, labels, values, title="", baseline=None) -> Section:
        """Horizontal bars, full labels; ``baseline``: where bars start (default 0), for values that
        differ little relative to their size (SQNR in dB)."""
        spec = {"type": "bars", "labels": [str(x) for x in labels], "values": _plain(values), "title": title}
        if baseline is not None:
            spec["baseline"] = float(baseline)
        return self.add(spec)

    def choice(self, options: list[tuple[str, dict]], label: str = "show") -> Section:
        """A dropdown that switches between widgets: ``options`` = [(label, widget_spec), ...]."""
        return self.add(
            {"type": "choice", "label": label, "options": [{"label": k, "widget": w} for k, w in options]}
        )

    def text(self, text: str) -> Section:
        return self.add({"type": "text", "text": text})

    def raw_html(self, markup: str) -> Section:
        return self.add({"type": "html", "html": markup})

    def image(self, figure, alt: str = "") -> Section:
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        return self.add({"type": "image", "png": base64.b64encode(buf.getvalue()).decode(), "alt": alt})


class Report:
    """An HTML report: ``rep.section(title).heatmap(...)``, then ``rep.write(path)`` or ``rep.render()``."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str, note: str = "") -> Section:
        sec = Section(title, note, anchor=f"s{len(self.sections)}")
        self.sections.append(sec)
        return sec

    def data(self) -> dict:
        """The report as JSON (title, sections, widgets) — what the web UI fetches."""
        return {
            "title": self.title,
            "subtitle": self.subtitle,
            "sections": [{"title": s.title, "note": s.note, "widgets": s.widgets} for s in self.sections],
        }

    def render(self, embedded: bool = False) -> str:
        root = f"lmscope-{uuid.uuid4().hex[:8]}"
        widgets, body = [], []
        nav = " ".join(f'<a href="#{s.anchor}">{_html.escape(s.title)}</a>' for s in self.sections)
        for s in self.sections:
            body.append(f'<h2 id="{s.anchor}">{_html.escape(s.title)}</h2>')
            if s.note:
                body.append(f'<div class="ls-note">{_html.escape(s.note)}</div>')
            for w in s.widgets:
                body.append(f'<div class="ls-widget" data-id="{len(widgets)}"></div>')
                widgets.append(w)
        data = json.dumps({"widgets": widgets}, separators=(",", ":")).replace("</", "<\\/")
        inner = (
            f'<div class="ls-report" id="{root}"><h1>{_html.escape(self.title)}</h1>'
            f'<div class="ls-sub">{_html.escape(self.subtitle)}</div>'
            + (f'<div class="ls-nav">{nav}</div>' if len(self.sections) > 1 else "")
            + "\n".join(body)
            + f"</div><style>{asset('lmscope.css')}</style><script>{asset('lmscope.js')}</script>"
            + f'<script>lmscope.renderAll(document.getElementById("{root}"), {data});</script>'
        )
        if embedded:
            return inner
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_html.escape(self.title)}</title></head><body>{inner}</body></html>"
        )

    def write(self, path) -> str:
        text = self.render()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return str(path)

    def _repr_html_(self) -> str:
        return self.render(embedded=True)


class Reportable:
    """A result with a self-contained HTML report. Subclasses define ``build_report()`` (a ``Report``);
    ``report(path)`` writes it when given a path and returns the HTML, and notebooks show it inline."""

    def build_report(self) -> Report:
        raise NotImplementedError

    def report(self, path=None) -> str:
        """The self-contained HTML report (written to ``path`` when given)."""
        text = self.build_report().render()
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def _repr_html_(self) -> str:
        return self.build_report().render(embedded=True)
