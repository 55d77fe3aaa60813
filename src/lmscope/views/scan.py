"""The ``scan`` report: a neuron browser (top contexts, histogram, summary per unit) and the head atlas.

Offline like every report: the page is the shared ``Report`` (bundled script and style inlined) plus a small
inlined neuron-browser script. The browser holds, per site, the units with the largest maximum activation;
each context shows the window up to a few tokens after the top token, every token shaded by that unit's
activation there (recomputed with one forward per distinct window, within a budget), the top token outlined.
Any other unit: ``lmscope.scan.load(out).top_contexts(site, unit)``.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import torch

from .html import Report, _plain

AFTER = 4  # tokens shown after the top token


class ScanReport(Report):
    """A ``Report`` with the neuron browser appended; its HTML is the same for the same scan."""

    def __init__(self, title: str, subtitle: str, browser: dict):
        super().__init__(title, subtitle)
        self.browser = browser

    def render(self, embedded: bool = False) -> str:
        text = super().render(embedded=embedded)
        text = re.sub(r"lmscope-[0-9a-f]{8}", "lmscope-scan", text)  # a stable id: same scan, same bytes
        data = json.dumps(self.browser, separators=(",", ":")).replace("</", "<\\/")
        script = f"<script>{_BROWSER_JS}</script><script>lmscopeNeurons({data});</script>"
        if embedded:
            return text + script
        return text.replace("</body></html>", script + "</body></html>")


def _activations(lm, windows: list[list[int]], names: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """{(window number in ``windows``, site): [len, units]} with one forward per window."""
    from ..capture.session import hooks

    out = {}
    for i, ids in enumerate(windows):
        x = torch.tensor([ids])
        with torch.no_grad(), hooks(lm, names) as session:
            lm.model.base_model(input_ids=x, attention_mask=torch.ones_like(x))
        for n in names:
            out[(i, n)] = session.tensors[n][0].reshape(len(ids), -1).float()
    return out


def scan_report(
    result, lm=None, units_per_site: int = 8, contexts: int = 5, max_windows: int = 256
) -> ScanReport:
    info = result.info
    tok = result.tokenizer
    settings = info["settings"]
    browser = {"sites": [], "note": ""}
    wanted: dict[int, int] = {}  # global window -> position in the forward list
    # shading reruns windows: at most 5% of what the scan ran (and max_windows), so the report stays cheap
    max_windows = min(max_windows, max(4, info["windows"] // 20))
    plan = []
    for site in result.sites:
        st = result.stats(site)
        order = torch.argsort(st["max"].double(), descending=True, stable=True)[:units_per_site]
        for unit in order.tolist():
            ctx = result.top_contexts(site, unit, contexts)
            for c in ctx:
                if c["window"] not in wanted and len(wanted) < max_windows:
                    wanted[c["window"]] = len(wanted)
            plan.append((site, unit, ctx))
    shaded = {}
    if lm is not None and wanted:
        windows = [result.window_ids(w) for w in wanted]
        shaded = _activations(lm, windows, list(result.sites))
    edges = result.stats(result.sites[0])["hist_edges"].tolist() if result.sites else []
    by_site: dict[str, list] = {}
    for site, unit, ctx in plan:
        st = result.stats(site)
        items = []
        for c in ctx:
            ids = c["window_ids"]
            end = min(len(ids), c["position"] + 1 + AFTER)
            values = None
            if c["window"] in wanted and (wanted[c["window"]], site) in shaded:
                values = shaded[(wanted[c["window"]], site)][:end, unit].tolist()
            items.append(
                {
                    "act": c["activation"],
                    "doc": c["doc"],
                    "pos": c["position"],
                    "tokens": [tok.decode([t]) for t in ids[:end]]
                    if tok is not None
                    else [str(t) for t in ids[:end]],
                    "values": _plain(values) if values is not None else None,
                }
            )
        hist = st["hist"][unit].tolist()
        by_site.setdefault(site, []).append(
            {
                "unit": unit,
                "mean": float(st["mean"][unit]),
                "std": math.sqrt(max(0.0, float(st["var"][unit]))),
                "min": float(st["min"][unit]),
                "max": float(st["max"][unit]),
                "frac": float(st["frac_active"][unit]),
                "hist": hist,
                "contexts": items,
            }
        )
    browser["sites"] = [{"name": s, "units": u} for s, u in by_site.items()]
    browser["edges"] = _plain(edges)
    if len(wanted) >= max_windows:
        browser["note"] = f"activation shading recomputed for the first {max_windows} windows only"

    rep = ScanReport(
        f"lmscope scan: {info['model']['name']}",
        f"{info['tokens']:,} tokens in {info['windows']:,} windows of ≤{settings['seq_len']} from "
        f"{info['documents']:,} documents · {len(result.sites)} sites · top {settings['top_k']} per unit",
        _plain(browser),
    )
    sec = rep.section("Scan", note="what was scanned (scan.json has everything)")
    skipped = info["corpus"].get("skipped", {})
    rows = [
        ["model", f"{info['model']['name']} ({info['model']['family']}, {info['model']['layers']} layers)"],
        [
            "corpus",
            ", ".join(s["path"] for s in info["corpus"]["sources"][:5])
            + (" …" if len(info["corpus"]["sources"]) > 5 else ""),
        ],
        [
            "skipped (non-UTF-8 / binary, empty)",
            f"{skipped.get('not_utf8_or_binary', 0)}, {skipped.get('empty', 0)}",
        ],
        ["tokens / windows / documents", f"{info['tokens']:,} / {info['windows']:,} / {info['documents']:,}"],
        ["sites", ", ".join(result.sites)],
        ["shards", info["shards_done"]],
    ]
    sec.table(["", ""], rows)
    if result.sites:
        rep.section(
            "Neuron browser",
            note=f"per site, the {units_per_site} units with the largest maximum activation; each context is shaded "
            "by the unit's activation (blue +, red −), the top token outlined",
        ).raw_html('<div id="ls-neurons"></div>')
        # a per-site overview: how active the units are
        ov = rep.section(
            "Units at a glance", note="per site: mean of |mean|, max activation, fraction active"
        )
        names, means, maxes, fracs = [], [], [], []
        for site in result.sites:
            st = result.stats(site)
            names.append(site)
            means.append(float(st["mean"].abs().mean()))
            maxes.append(float(st["max"].max()))
            fracs.append(float(st["frac_active"].mean()))
        ov.table(
            ["site", "mean |mean|", "largest max", "mean fraction > 0"], list(zip(names, means, maxes, fracs))
        )
    heads = result.heads()
    if heads:
        _head_atlas(rep, heads)
    return rep


def _head_atlas(rep: Report, heads: dict) -> None:
    n_layers, n_heads = heads["n_layers"], heads["n_heads"]
    metrics = [
        ("previous_token", False),
        ("first_token", False),
        ("self", False),
        ("induction", False),
        ("mean_distance", False),
        ("entropy", False),
    ]
    options = []
    for m, diverging in metrics:
        z = np.full((n_layers, n_heads), np.nan)
        for row in heads["heads"]:
            if row.get(m) is not None:
                z[row["layer"], row["head"]] = row[m]
        options.append(
            (
                m,
                {
                    "type": "heatmap",
                    "z": _plain(z),
                    "x_labels": [f"h{h}" for h in range(n_heads)],
                    "y_labels": [f"L{i}" for i in range(n_layers)],
                    "title": heads["metrics"].get(m, m),
                    "x_title": "head",
                    "y_title": "layer",
                    "diverging": diverging,
                },
            )
        )
    sec = rep.section(
        "Head atlas",
        note=f"every head over the corpus ({heads.get('corpus_query_positions', 0):,} query positions per head); "
        "induction on random repeated tokens",
    )
    sec.choice(options, label="metric")
    rows = [[r["layer"], r["head"], r["summary"]] for r in heads["heads"] if r.get("summary")]
    if rows:
        sec.table(["layer", "head", "what it does over the corpus"], rows)


_BROWSER_JS = r"""
function lmscopeNeurons(data) {
  var host = document.getElementById("ls-neurons");
  if (!host) return;
  function mk(tag, attrs, kids) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) { if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]); }
    (kids || []).forEach(function (c) { if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function f(v) { return v === null || v === undefined ? "–" : Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3); }
  function shade(v, a) {
    if (v === null || v === undefined) return "#eee";
    var t = Math.max(-1, Math.min(1, v / a));
    return t >= 0 ? "rgba(33,102,172," + (0.08 + 0.8 * t).toFixed(3) + ")" : "rgba(214,96,77," + (0.08 - 0.8 * t).toFixed(3) + ")";
  }
  function show(t) { return t.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5"); }
  var siteSel = mk("select", {"class": "ls-select"}), unitSel = mk("select", {"class": "ls-select"}), body = mk("div");
  data.sites.forEach(function (s, i) { siteSel.appendChild(mk("option", {value: i, text: s.name})); });
  function units() {
    unitSel.innerHTML = "";
    data.sites[+siteSel.value].units.forEach(function (u, i) { unitSel.appendChild(mk("option", {value: i, text: "unit " + u.unit + " (max " + f(u.max) + ")"})); });
    draw();
  }
  function hist(u) {
    var lo = u.hist.findIndex(function (c) { return c > 0; }), hi = u.hist.length - 1;
    while (hi > 0 && u.hist[hi] === 0) hi--;
    if (lo < 0) return mk("div");
    var peak = Math.max.apply(null, u.hist), W = 420, H = 90, n = hi - lo + 1, bw = W / n;
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
    for (var b = lo; b <= hi; b++) {
      var h = u.hist[b] ? Math.max(1, H * Math.log1p(u.hist[b]) / Math.log1p(peak)) : 0, r = document.createElementNS(ns, "rect");
      r.setAttribute("x", (b - lo) * bw); r.setAttribute("y", H - h); r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", h);
      r.setAttribute("fill", data.edges[b + 1] <= 0 ? "#d6604d" : "#2166ac");
      var tt = document.createElementNS(ns, "title"); tt.textContent = f(data.edges[b]) + " … " + f(data.edges[b + 1]) + ": " + u.hist[b]; r.appendChild(tt);
      svg.appendChild(r);
    }
    [[0, data.edges[lo]], [W - 60, data.edges[hi + 1]]].forEach(function (p) {
      var t = document.createElementNS(ns, "text"); t.setAttribute("x", p[0]); t.setAttribute("y", H + 13); t.setAttribute("class", "ls-axis"); t.textContent = f(p[1]); svg.appendChild(t);
    });
    return mk("div", {}, [mk("div", {"class": "ls-title", text: "histogram (log counts; fixed bins)"}), svg]);
  }
  function draw() {
    body.innerHTML = "";
    var u = data.sites[+siteSel.value].units[+unitSel.value];
    body.appendChild(mk("p", {"class": "ls-text", text: "mean " + f(u.mean) + " · std " + f(u.std) + " · min " + f(u.min) + " · max " + f(u.max) + " · active (> 0) " + (100 * u.frac).toFixed(1) + "%"}));
    body.appendChild(hist(u));
    u.contexts.forEach(function (c, j) {
      var a = Math.abs(c.act) || 1;
      var box = mk("div", {"class": "ls-tokens"}, [mk("span", {"class": "ls-tok-label", text: "#" + (j + 1) + " " + f(c.act) + " (doc " + c.doc + ")"})]);
      c.tokens.forEach(function (t, i) {
        var v = c.values ? c.values[i] : (i === c.pos ? c.act : null);
        var s = mk("span", {"class": "ls-tok", title: show(t) + ": " + f(v), text: show(t)});
        s.style.background = shade(v, a);
        if (i === c.pos) s.style.outline = "2px solid #222";
        box.appendChild(s);
      });
      body.appendChild(box);
    });
    if (data.note) body.appendChild(mk("p", {"class": "ls-note", text: data.note}));
  }
  siteSel.addEventListener("change", units); unitSel.addEventListener("change", draw);
  host.appendChild(mk("div", {"class": "ls-ctl"}, ["site ", siteSel, " ", unitSel]));
  host.appendChild(body);
  units();
}
"""
