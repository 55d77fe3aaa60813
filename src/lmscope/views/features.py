"""The offline feature dashboard: a searchable index of every explained feature sorted by score, and per feature
its explanation with scores beside a random explanation's, activation histogram, top contexts with tokens
shaded, the tokens it promotes and suppresses, and its nearest features. One self-contained HTML file.
"""

from __future__ import annotations

import html
import json

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:14px 22px;background:#1f2937;color:#fff}header h1{margin:0;font-size:19px}
header p{margin:4px 0 0;color:#cbd5e1}
main{display:flex;gap:0;height:calc(100vh - 70px)}
#index{width:420px;overflow:auto;border-right:1px solid #ddd;background:#fff}
#index input{width:calc(100% - 24px);margin:10px;padding:7px;font-size:14px}
#index table{border-collapse:collapse;width:100%}#index td,#index th{padding:4px 8px;text-align:left;font-size:13px}
#index tr.row{cursor:pointer}#index tr.row:hover,#index tr.sel{background:#e0ecff}
#detail{flex:1;overflow:auto;padding:14px 22px}
.scores td,.scores th{padding:3px 10px;text-align:right}.scores th:first-child,.scores td:first-child{text-align:left}
.ctx{font-family:ui-monospace,monospace;font-size:12.5px;margin:4px 0;padding:6px;background:#fff;border:1px solid #eee;
white-space:pre-wrap;word-break:break-word}.ctx span{border-radius:2px}
.cols{display:flex;gap:30px;flex-wrap:wrap}.muted{color:#666}.tok{font-family:ui-monospace,monospace}
"""

_SCRIPT = """
const D = JSON.parse(document.getElementById('data').textContent);
const fmt = v => v === null || v === undefined ? '–' : v.toFixed(2);
const esc = s => s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const vis = s => esc(s).replace(/\\n/g, '↵');
function index(){
  const q = document.getElementById('q').value.toLowerCase();
  const rows = D.units.map((u, i) => [u, i]).filter(([u]) =>
    !q || u.explanation.toLowerCase().includes(q) || String(u.unit) === q);
  document.getElementById('rows').innerHTML = rows.map(([u, i]) =>
    `<tr class="row" data-i="${i}"><td>${u.unit}</td><td>${fmt(u.scores.detection)}</td>`+
    `<td>${esc(u.explanation)}</td></tr>`).join('');
  document.querySelectorAll('tr.row').forEach(r => r.onclick = () => show(+r.dataset.i));
}
function hist(h){
  if(!h.counts.length) return '<p class="muted">never active</p>';
  const m = Math.max(...h.counts), w = 300 / h.counts.length;
  const bars = h.counts.map((c, i) =>
    `<rect x="${i*w}" y="${80-80*c/m}" width="${w-1}" height="${80*c/m}" fill="#3b82f6"></rect>`).join('');
  return `<svg width="300" height="96">${bars}<text x="0" y="94" font-size="10">${h.edges[0].toFixed(2)}</text>`+
    `<text x="300" y="94" font-size="10" text-anchor="end">${h.edges[h.edges.length-1].toFixed(2)}</text></svg>`+
    `<div class="muted">zero on ${(100*h.zero_fraction).toFixed(1)}% of tokens</div>`;
}
function ctx(c, peak){
  return '<div class="ctx">' + c.tokens.map((t, i) => {
    const a = Math.max(0, c.acts[i]) / (peak || 1);
    return `<span title="${c.acts[i].toFixed(3)}" style="background:rgba(234,88,12,${a.toFixed(3)})">${vis(t)}</span>`;
  }).join('') + '</div>';
}
function toks(list){ return (list||[]).map(([t, v]) => `<div><span class="tok">${vis(JSON.stringify(t))}</span>`+
  ` <span class="muted">${v.toFixed(2)}</span></div>`).join(''); }
function show(i){
  const u = D.units[i];
  document.querySelectorAll('tr.row').forEach(r => r.classList.toggle('sel', +r.dataset.i === i));
  const keys = ['detection', 'auroc', 'fuzzing', 'simulation'];
  const near = (u.nearest || []).map(([j, c]) => `${j} (cos ${c.toFixed(2)})`).join(', ');
  document.getElementById('detail').innerHTML =
    `<h2>${esc(D.site)} · ${D.kind === 'latents' ? 'latent' : 'neuron'} ${u.unit}</h2>`+
    `<p style="font-size:16px">${esc(u.explanation)}</p>`+
    `<p class="muted">explainer: ${u.explainer} · random explanation: ${esc(u.random_explanation)}</p>`+
    `<table class="scores"><tr><th>held-out score</th>${keys.map(k => `<th>${k}</th>`).join('')}</tr>`+
    `<tr><td>this explanation</td>${keys.map(k => `<td>${fmt(u.scores[k])}</td>`).join('')}</tr>`+
    `<tr><td class="muted">random explanation</td>${keys.map(k => `<td class="muted">${fmt(u.random_baseline[k])}</td>`).join('')}</tr></table>`+
    `<div class="cols"><div><h3>activations</h3>${hist(u.histogram)}</div>`+
    `<div><h3>promotes</h3>${toks(u.logits && u.logits.promoted)}</div>`+
    `<div><h3>suppresses</h3>${toks(u.logits && u.logits.suppressed)}</div></div>`+
    (near ? `<p><b>nearest features:</b> ${near}</p>` : '')+
    `<h3>top contexts</h3>` + u.top_contexts.map(c => ctx(c, u.max_activation)).join('');
}
document.getElementById('q').oninput = index;
index(); if (D.units.length) show(0);
"""


def features_html(result: dict, title: str = "lmscope features") -> str:
    """The dashboard for ``pipeline.explain_model``'s result (only scored explanations are in it)."""
    s = result["summary"]
    med, rnd = s["median"], s["random_median"]

    def fmt(v):
        return "–" if v is None or v != v else f"{v:.2f}"

    subtitle = (
        f"{result['site']} · {s['units']} of {result['units_asked']} {result['kind']} explained on "
        f"{result['tokens']:,} tokens · median detection {fmt(med['detection'])} (random "
        f"{fmt(rnd['detection'])}), simulation {fmt(med['simulation'])} · every explanation is scored on "
        "held-out contexts"
    )
    data = json.dumps(result, ensure_ascii=False).replace("</", "<\\/")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(subtitle)}</p></header><main><div id='index'>"
        "<input id='q' placeholder='search explanations, or a unit number'>"
        "<table><thead><tr><th>unit</th><th>detection</th><th>explanation</th></tr></thead>"
        "<tbody id='rows'></tbody></table></div><div id='detail'></div></main>"
        f"<script type='application/json' id='data'>{data}</script><script>{_SCRIPT}</script></body></html>"
    )
