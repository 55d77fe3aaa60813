/* lmscope widgets: render JSON widget specs into the page. No dependencies, no network.
 * Each <div class="ls-widget" data-id="N"> is drawn from LMSCOPE_DATA.widgets[N].
 * Used by the static report.html and by the `lmscope serve` page alike. */
(function (global) {
  "use strict";

  // ---------- helpers ----------
  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "html") e.innerHTML = attrs[k];
      else if (k === "style") e.style.cssText = attrs[k];
      else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return v.toFixed(a >= 100 ? 1 : 3);
  }
  function showTok(t) { return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "·"); }
  // sequential (white -> blue) and diverging (red <- white -> blue) color maps
  function seqColor(t) {
    t = Math.max(0, Math.min(1, t));
    var r = Math.round(247 - t * (247 - 8)), g = Math.round(251 - t * (251 - 48)), b = Math.round(255 - t * (255 - 107));
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function divColor(t) { // t in [-1, 1]
    t = Math.max(-1, Math.min(1, t));
    if (t >= 0) return "rgb(" + Math.round(255 - t * 222) + "," + Math.round(255 - t * 153) + "," + Math.round(255 - t * 43) + ")";
    t = -t;
    return "rgb(" + Math.round(255 - t * 41) + "," + Math.round(255 - t * 195) + "," + Math.round(255 - t * 210) + ")";
  }
  var tip = null;
  function tooltip(ev, html) {
    if (!tip) { tip = el("div", { "class": "ls-tip" }); document.body.appendChild(tip); }
    if (html === null) { tip.style.display = "none"; return; }
    tip.innerHTML = html; tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = ev.clientX - tip.offsetWidth - 10;
    if (y + tip.offsetHeight > window.innerHeight) y = ev.clientY - tip.offsetHeight - 10;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]; }); }
  function range(lo, hi) { var m = Infinity, M = -Infinity; lo.forEach(function (row) { row.forEach(function (v) { if (v !== null && !isNaN(v)) { if (v < m) m = v; if (v > M) M = v; } }); }); return [m, M]; }
  // packed attention: base64 uint8 of sqrt(p)*255, shape [layers, heads, n, n]
  function unpack(b64) {
    var s = atob(b64), a = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }

  // ---------- heatmap (canvas) ----------
  // The color scale spans the data (or spec.range), with a color bar that states it. spec.controls lists
  // optional toggles: "log" (log color scale), "first" (leave the first column, e.g. an attention sink,
  // out of the scale; its cells saturate).
  function heatmap(spec, host) {
    var z = spec.z, rows = z.length, cols = rows ? z[0].length : 0;
    var xl = spec.x_labels || [], yl = spec.y_labels || [];
    var opts = { log: !!spec.log, first: !!spec.exclude_first };
    var wrap = el("div", { "class": "ls-heatmap" });
    if (spec.title) wrap.appendChild(el("div", { "class": "ls-title", text: spec.title }));
    var controls = spec.controls || [];
    if (controls.length) {
      var ctl = el("div", { "class": "ls-ctl" });
      controls.forEach(function (c) {
        var label = c === "log" ? "log color scale" : "exclude first token from the color scale";
        var box = el("input", { type: "checkbox", "class": "ls-opt-" + c });
        box.checked = !!opts[c];
        box.addEventListener("change", function () { opts[c] = box.checked; paint(); });
        ctl.appendChild(el("label", { style: "margin-right:14px" }, [box, " " + label]));
      });
      wrap.appendChild(ctl);
    }
    var body = el("div");
    wrap.appendChild(body);
    host.appendChild(wrap);
    var canvas = null;
    function paint() {
      body.innerHTML = "";
      var scaled = opts.first && cols > 1 ? z.map(function (row) { return row.slice(1); }) : z;
      var mm = spec.range || range(scaled);
      var lo = mm[0], hi = mm[1];
      if (!isFinite(lo)) { lo = 0; hi = 1; }
      if (spec.diverging) { var a = Math.max(Math.abs(lo), Math.abs(hi)) || 1; lo = -a; hi = a; }
      var useLog = opts.log && !spec.diverging && hi > 0;
      if (useLog && lo <= 0) { // smallest positive value
        var pos = Infinity;
        scaled.forEach(function (row) { row.forEach(function (v) { if (v !== null && v > 0 && v < pos) pos = v; }); });
        lo = isFinite(pos) ? pos : hi / 1e3;
      }
      var flat = hi === lo;  // one value everywhere: one label on the color bar
      if (flat) { hi = lo + (Math.abs(lo) || 1) * 1e-6; }
      function norm(v) {
        if (useLog) return v <= 0 ? 0 : (Math.log(v) - Math.log(lo)) / ((Math.log(hi) - Math.log(lo)) || 1);
        return (v - lo) / ((hi - lo) || 1);
      }
      function color(v) { return spec.diverging ? divColor(v / hi) : seqColor(norm(v)); }
      var maxLabels = 64;
      // long axes shrink to at least 1 px per cell so the map fits the page; hover still resolves each cell
      var cell = Math.max(1, Math.min(spec.cell || 28, Math.floor((spec.cell ? 1000 : 900) / Math.max(cols, 1))));
      if (spec.cell_text && !spec.cell) {  // cells wide enough for their text ("gptq-g64"), while the map fits
        var longest = 0;
        spec.cell_text.forEach(function (row) { row.forEach(function (t) { longest = Math.max(longest, showTok(String(t)).length); }); });
        var want = Math.min(72, Math.ceil(6.5 * longest + 4));
        if (want > cell && want * cols <= 1000) cell = want;
      }
      var cellH = Math.max(2, Math.min(spec.cell || 22, Math.floor(640 / Math.max(rows, 1))));
      var showX = xl.length && cols <= maxLabels, showY = yl.length && rows <= maxLabels;
      var left = showY ? Math.min(160, 8 + 7 * Math.max.apply(null, yl.map(function (s) { return showTok(s).length; }).concat([1]))) : 40;
      var top = showX ? Math.min(120, 8 + 6 * Math.max.apply(null, xl.map(function (s) { return showTok(s).length; }).concat([1]))) : 20;
      var W = left + cols * cell + 10, H = top + rows * cellH + 10;
      // geometry on the element, for tests and tools that read cells back
      canvas = el("canvas", { width: W, height: H, "class": "ls-canvas", "data-left": left, "data-top": top, "data-cell": cell, "data-cell-h": cellH });
      var ctx = canvas.getContext("2d");
      ctx.font = "11px ui-monospace, monospace"; ctx.fillStyle = "#222";
      for (var r = 0; r < rows; r++) for (var c = 0; c < cols; c++) {
        var v = z[r][c];
        ctx.fillStyle = v === null || isNaN(v) ? "#eee" : color(v);
        ctx.fillRect(left + c * cell, top + r * cellH, cell - (cell > 6 ? 1 : 0), cellH - (cellH > 6 ? 1 : 0));
        if (spec.cell_text && cell >= 24 && spec.cell_text[r][c] !== "") {
          var t = String(spec.cell_text[r][c]);
          var tt = showTok(t).slice(0, Math.floor(cell / 6.5));
          ctx.fillStyle = v !== null && (spec.diverging ? Math.abs(v / hi) : norm(v)) > 0.6 ? "#fff" : "#111";
          ctx.fillText(tt, left + c * cell + 2, top + r * cellH + cellH / 2 + 4);
        }
      }
      ctx.fillStyle = "#222";
      if (showY) for (r = 0; r < rows; r++) { ctx.textAlign = "right"; ctx.fillText(showTok(yl[r]).slice(0, 22), left - 4, top + r * cellH + cellH / 2 + 4); }
      else if (yl.length) { var stepY = Math.ceil(rows / 16); ctx.textAlign = "right"; for (r = 0; r < rows; r += stepY) ctx.fillText(String(r), left - 4, top + r * cellH + cellH / 2 + 4); }
      if (showX) for (c = 0; c < cols; c++) { ctx.save(); ctx.translate(left + c * cell + cell / 2 + 4, top - 4); ctx.rotate(-Math.PI / 2.6); ctx.textAlign = "left"; ctx.fillText(showTok(xl[c]).slice(0, 16), 0, 0); ctx.restore(); }
      else if (xl.length) { var stepX = Math.ceil(cols / 16); ctx.textAlign = "center"; for (c = 0; c < cols; c += stepX) ctx.fillText(String(c), left + c * cell + cell / 2, top - 6); }
      // color bar (its own canvas beside the map): top = hi, bottom = lo, values at both ends and the middle
      var barW = 14, bh = Math.max(60, Math.min(rows * cellH, 240)), steps = 60;
      var bar = el("canvas", { width: barW + 76, height: top + bh + 8, "class": "ls-colorbar" });
      var bctx = bar.getContext("2d");
      bctx.font = "11px ui-monospace, monospace";
      for (var k = 0; k < steps; k++) {
        var f = 1 - k / (steps - 1), val;
        if (spec.diverging) val = -hi + 2 * hi * f;
        else if (useLog) val = Math.exp(Math.log(lo) + f * (Math.log(hi) - Math.log(lo)));
        else val = lo + f * (hi - lo);
        bctx.fillStyle = color(val);
        bctx.fillRect(0, top + k * bh / steps, barW, bh / steps + 1);
      }
      bctx.strokeStyle = "#999"; bctx.strokeRect(0.5, top + 0.5, barW - 1, bh - 1);
      bctx.fillStyle = "#222"; bctx.textAlign = "left";
      var mid = spec.diverging ? 0 : useLog ? Math.sqrt(lo * hi) : (lo + hi) / 2;
      bctx.fillText(fmt(hi), barW + 4, top + 9);
      if (!flat) {
        bctx.fillText(fmt(mid), barW + 4, top + bh / 2 + 4);
        bctx.fillText(fmt(spec.diverging ? -hi : lo), barW + 4, top + bh);
      }
      bar.setAttribute("data-range", fmt(spec.diverging ? -hi : lo) + " " + fmt(hi));
      bar.setAttribute("data-labels", flat ? "1" : "3");
      canvas.addEventListener("mousemove", function (ev) {
        var b = canvas.getBoundingClientRect();
        var c2 = Math.floor((ev.clientX - b.left - left) / cell), r2 = Math.floor((ev.clientY - b.top - top) / cellH);
        if (c2 < 0 || r2 < 0 || c2 >= cols || r2 >= rows) { tooltip(ev, null); return; }
        var h = "<b>" + esc(spec.y_title || "row") + "</b> " + esc(showTok(yl[r2] !== undefined ? yl[r2] : r2)) +
          "<br><b>" + esc(spec.x_title || "col") + "</b> " + esc(showTok(xl[c2] !== undefined ? xl[c2] : c2)) +
          "<br><b>value</b> <span class='ls-val'>" + fmt(z[r2][c2]) + "</span>";
        if (spec.hover) h += "<br>" + esc(spec.hover[r2][c2]).replace(/\n/g, "<br>");
        canvas.setAttribute("data-hover", fmt(z[r2][c2]));
        tooltip(ev, h);
      });
      canvas.addEventListener("mouseleave", function (ev) { tooltip(ev, null); });
      body.appendChild(el("div", { "class": "ls-heatmap-row" }, [canvas, bar]));
      body.appendChild(el("div", { "class": "ls-legend", text: (spec.diverging ? "blue > 0 > red; " : "") + (useLog ? "log color scale; " : "") +
        (opts.first && cols > 1 ? "scale without the first column (its cells saturate); " : "") + "color range " + fmt(spec.diverging ? -hi : lo) + " … " + fmt(hi) }));
    }
    paint();
    return canvas;
  }

  // ---------- colored tokens ----------
  function tokens(spec, host) {
    var s = spec.scores, a = 0;
    s.forEach(function (v) { if (v !== null && Math.abs(v) > a) a = Math.abs(v); });
    a = a || 1;
    // the label sits on its own line: strips of different methods/models start at the same x and line up
    var box = el("div", { "class": "ls-tokens" }, [spec.label ? el("div", { "class": "ls-tok-label", text: spec.label }) : null]);
    spec.tokens.forEach(function (t, i) {
      var v = s[i];
      var span = el("span", { "class": "ls-tok" + (spec.excluded && spec.excluded[i] ? " ls-excl" : ""), "data-score": fmt(v), text: showTok(t) });
      span.style.background = v === null ? "#eee" : divColor(v / a);
      span.addEventListener("mousemove", function (ev) { tooltip(ev, "<b>" + esc(showTok(t)) + "</b><br>score <span class='ls-val'>" + fmt(v) + "</span>"); });
      span.addEventListener("mouseleave", function (ev) { tooltip(ev, null); });
      box.appendChild(span);
    });
    host.appendChild(box);
  }

  // ---------- table (click a header to sort) ----------
  function table(spec, host) {
    var t = el("table", { "class": "ls-table" });
    var hl = {}; (spec.highlight || []).forEach(function (i) { hl[i] = 1; });
    var rows = spec.rows.map(function (r, i) { return { r: r, i: i }; });
    var thead = el("thead"), tr = el("tr"), tbody = el("tbody"), dir = 1, last = -1;
    function draw() {
      tbody.innerHTML = "";
      rows.forEach(function (o) {
        var row = el("tr", hl[o.i] ? { "class": "ls-hl" } : null);
        // numbers right-aligned and never wrapped; text left-aligned (wraps at spaces only)
        o.r.forEach(function (v) { row.appendChild(el("td", { "class": typeof v === "number" || v === null ? "ls-num" : "ls-txt", text: typeof v === "number" ? fmt(v) : (v === null ? "–" : String(v)) })); });
        tbody.appendChild(row);
      });
    }
    spec.columns.forEach(function (c, j) {
      var first = spec.rows.length ? spec.rows[0][j] : null;
      tr.appendChild(el("th", { text: c, title: "sort", style: j && typeof first !== "number" ? "text-align:left" : "", onclick: function () {
        dir = last === j ? -dir : 1; last = j;
        rows.sort(function (a, b) { var x = a.r[j], y = b.r[j]; return (x > y ? 1 : x < y ? -1 : 0) * dir; }); draw();
      } }));
    });
    thead.appendChild(tr); t.appendChild(thead); t.appendChild(tbody); draw();
    host.appendChild(el("div", { "class": "ls-table-wrap" }, [spec.title ? el("div", { "class": "ls-title", text: spec.title }) : null, t]));
  }

  // ---------- lines / bars (SVG) ----------
  var NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) { var e = document.createElementNS(NS, tag); for (var k in attrs) e.setAttribute(k, attrs[k]); return e; }
  var PALETTE = ["#2166ac", "#d6604d", "#1b7837", "#762a83", "#e08214", "#35978f", "#8c510a", "#c51b7d"];
  function lines(spec, host) {
    var xs = [], ys = [];
    spec.series.forEach(function (s) { xs = xs.concat(s.x); ys = ys.concat(s.y.filter(function (v) { return v !== null; })); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys.concat([spec.y_min !== undefined ? spec.y_min : Infinity])), y1 = Math.max.apply(null, ys);
    if (y1 === y0) { y1 += 1; y0 -= 1; } if (x1 === x0) x1 += 1;
    var yTicks = [y0, (y0 + y1) / 2, y1];
    // room for the longest tick label plus the rotated y title; legend as wide as its longest name
    var tickW = 7 * Math.max.apply(null, yTicks.map(function (v) { return fmt(v).length; }));
    var nameW = 7 * Math.max.apply(null, spec.series.map(function (s) { return String(s.name).length; }).concat([4]));
    var L = 26 + tickW, R = 36 + nameW, T = 16, B = 36, W = 520 + L + R, H = Math.max(260, T + B + 18 * spec.series.length);
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function py(y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); }
    var g = svg("svg", { width: W, height: H, "class": "ls-svg" });
    g.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
    g.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
    yTicks.forEach(function (v) { var t = svg("text", { x: L - 8, y: py(v) + 4, "text-anchor": "end", "class": "ls-axis" }); t.textContent = fmt(v); g.appendChild(t); });
    [x0, Math.round((x0 + x1) / 2), x1].forEach(function (v) { var t = svg("text", { x: px(v), y: H - B + 14, "text-anchor": "middle", "class": "ls-axis" }); t.textContent = fmt(v); g.appendChild(t); });
    var xt = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "class": "ls-axis" }); xt.textContent = spec.x_title || ""; g.appendChild(xt);
    var yc = T + (H - T - B) / 2;
    var yt = svg("text", { x: 12, y: yc, "text-anchor": "middle", "class": "ls-axis ls-ytitle", transform: "rotate(-90 12 " + yc + ")" }); yt.textContent = spec.y_title || ""; g.appendChild(yt);
    spec.series.forEach(function (s, k) {
      var col = PALETTE[k % PALETTE.length], d = "";
      s.x.forEach(function (x, i) { if (s.y[i] !== null) d += (d ? "L" : "M") + px(x).toFixed(1) + "," + py(s.y[i]).toFixed(1); });
      g.appendChild(svg("path", { d: d, fill: "none", stroke: col, "stroke-width": 2 }));
      s.x.forEach(function (x, i) {
        if (s.y[i] === null) return;
        var c = svg("circle", { cx: px(x), cy: py(s.y[i]), r: 3.5, fill: col });
        c.addEventListener("mousemove", function (ev) { tooltip(ev, "<b>" + esc(s.name) + "</b><br>" + esc(spec.x_title || "x") + " " + fmt(x) + "<br>" + esc(spec.y_title || "y") + " <span class='ls-val'>" + fmt(s.y[i]) + "</span>" + (s.labels ? "<br>" + esc(s.labels[i]) : "")); });
        c.addEventListener("mouseleave", function (ev) { tooltip(ev, null); });
        g.appendChild(c);
      });
      // legend: a swatch of the line and the name in the same color (inline style: the .ls-axis rule would override a fill attribute)
      var ly = T + 10 + k * 18;
      g.appendChild(svg("line", { x1: W - R + 8, y1: ly, x2: W - R + 26, y2: ly, stroke: col, "stroke-width": 3 }));
      var lt = svg("text", { x: W - R + 30, y: ly + 4, "class": "ls-axis ls-legend-name", style: "fill:" + col + ";font-weight:600" }); lt.textContent = s.name; g.appendChild(lt);
    });
    host.appendChild(el("div", null, [spec.title ? el("div", { "class": "ls-title", text: spec.title }) : null, g]));
  }
  function bars(spec, host) {
    // labels in full (the left margin fits the longest, up to 420 px); bars start at spec.baseline (default 0)
    var n = spec.values.length, rowH = 18;
    var L = Math.min(420, 12 + 7 * Math.max.apply(null, spec.labels.map(function (s) { return String(s).length; }).concat([4])));
    var W = L + 520, H = n * rowH + 10 + (spec.baseline !== undefined ? 16 : 0);
    var base = spec.baseline !== undefined ? spec.baseline : 0;
    var M = Math.max.apply(null, spec.values.map(function (v) { return Math.abs(v - base); }).concat([1e-12]));
    var g = svg("svg", { width: W, height: H, "class": "ls-svg" });
    spec.values.forEach(function (v, i) {
      var w = Math.abs(v - base) / M * (W - L - 70);
      var r = svg("rect", { x: L, y: i * rowH + 4, width: Math.max(1, w), height: rowH - 4, fill: v >= base ? "#2166ac" : "#d6604d" });
      r.addEventListener("mousemove", function (ev) { tooltip(ev, esc(spec.labels[i]) + ": <span class='ls-val'>" + fmt(v) + "</span>"); });
      r.addEventListener("mouseleave", function (ev) { tooltip(ev, null); });
      g.appendChild(r);
      var t = svg("text", { x: L - 6, y: i * rowH + 16, "text-anchor": "end", "class": "ls-axis" }); t.textContent = String(spec.labels[i]); g.appendChild(t);
      var tv = svg("text", { x: L + w + 4, y: i * rowH + 16, "class": "ls-axis" }); tv.textContent = fmt(v); g.appendChild(tv);
    });
    if (spec.baseline !== undefined) { // the axis: where the bars start and the largest value
      var y = n * rowH + 8;
      g.appendChild(svg("line", { x1: L, y1: y, x2: W - 70, y2: y, stroke: "#999" }));
      var a = svg("text", { x: L, y: y + 12, "text-anchor": "middle", "class": "ls-axis" }); a.textContent = fmt(base); g.appendChild(a);
      var b = svg("text", { x: W - 70, y: y + 12, "text-anchor": "middle", "class": "ls-axis" }); b.textContent = fmt(base + M); g.appendChild(b);
    }
    host.appendChild(el("div", null, [spec.title ? el("div", { "class": "ls-title", text: spec.title }) : null, g]));
  }

  // ---------- choice: one of several widgets, picked from a dropdown ----------
  function choice(spec, host) {
    var sel = el("select", { "class": "ls-select" });
    spec.options.forEach(function (o, i) { sel.appendChild(el("option", { value: i, text: o.label })); });
    var body = el("div");
    function draw() { body.innerHTML = ""; render(spec.options[+sel.value].widget, body); }
    sel.addEventListener("change", draw);
    host.appendChild(el("div", null, [el("label", { "class": "ls-ctl" }, [(spec.label || "show") + " ", sel]), body]));
    draw();
  }

  // ---------- attention explorer: heatmap / head view / model view, layer & head controls ----------
  function attention(spec, host) {
    var L = spec.n_layers, Hh = spec.n_heads, n = spec.n, data = unpack(spec.packed);
    var labels = spec.labels;
    function val(l, h, q, k) { var x = data[((l * Hh + h) * n + q) * n + k] / 255; return x * x; }
    function matrix(l, h) {
      var z = [];
      for (var q = 0; q < n; q++) {
        var row = [];
        for (var k = 0; k < n; k++) {
          if (h === "mean") { var s = 0; for (var hh = 0; hh < Hh; hh++) s += val(l, hh, q, k); row.push(s / Hh); }
          else row.push(val(l, h, q, k));
        }
        z.push(row);
      }
      return z;
    }
    var layerSel = el("select", { "class": "ls-select ls-layer" }), headSel = el("select", { "class": "ls-select ls-head" }), modeSel = el("select", { "class": "ls-select ls-mode" });
    for (var l = 0; l < L; l++) layerSel.appendChild(el("option", { value: l, text: "layer " + l }));
    headSel.appendChild(el("option", { value: "mean", text: "mean of heads" }));
    for (var h = 0; h < Hh; h++) headSel.appendChild(el("option", { value: h, text: "head " + h + (spec.kv_groups ? " (kv " + spec.kv_groups[h] + ")" : "") }));
    [["heatmap", "heatmap"], ["head", "head view"], ["model", "model view"]].forEach(function (m) { modeSel.appendChild(el("option", { value: m[0], text: m[1] })); });
    headSel.value = spec.head !== undefined ? spec.head : 0; layerSel.value = spec.layer || 0;
    var body = el("div", { "class": "ls-attn-body" });
    var note = spec.note ? el("div", { "class": "ls-note", text: spec.note }) : null;
    function draw() {
      body.innerHTML = "";
      var l = +layerSel.value, h = headSel.value === "mean" ? "mean" : +headSel.value, mode = modeSel.value;
      if (mode === "heatmap") heatmap({ z: matrix(l, h), x_labels: labels, y_labels: labels, x_title: "key", y_title: "query", controls: ["first", "log"], title: "layer " + l + ", " + (h === "mean" ? "mean of heads" : "head " + h) }, body);
      else if (mode === "head") headView(matrix(l, h), body);
      else modelView(body);
    }
    function headView(z, into) {
      var win = Math.min(n, 48), start = 0;
      var ctl = el("div", { "class": "ls-ctl" });
      var pic = el("div");
      if (n > win) {
        var slider = el("input", { type: "range", min: 0, max: n - win, value: n - win, "class": "ls-window" });
        start = n - win;
        slider.addEventListener("input", function () { start = +slider.value; paint(); });
        ctl.appendChild(el("span", { text: "window of " + win + " tokens: " })); ctl.appendChild(slider);
      }
      into.appendChild(ctl); into.appendChild(pic);
      function paint() {
        pic.innerHTML = "";
        var rowH = 16, W = 520, H = win * rowH + 20, xL = 170, xR = 350;
        var g = svg("svg", { width: W, height: H, "class": "ls-svg ls-headview" });
        var linesArr = [];
        for (var q = start; q < start + win; q++) for (var k = start; k < start + win; k++) {
          var w = z[q][k]; if (w < 0.01) continue;
          var ln = svg("line", { x1: xL + 4, y1: 14 + (q - start) * rowH, x2: xR - 4, y2: 14 + (k - start) * rowH, stroke: "#2166ac", "stroke-opacity": Math.min(1, w), "stroke-width": 1 + 2 * w, "data-q": q });
          linesArr.push(ln); g.appendChild(ln);
        }
        for (var i = start; i < start + win; i++) (function (i) {
          var a = svg("text", { x: xL, y: 18 + (i - start) * rowH, "text-anchor": "end", "class": "ls-tokq" }); a.textContent = showTok(labels[i]).slice(0, 20);
          var b = svg("text", { x: xR, y: 18 + (i - start) * rowH, "class": "ls-tokk" }); b.textContent = showTok(labels[i]).slice(0, 20);
          a.addEventListener("mouseenter", function (ev) {
            linesArr.forEach(function (ln) { ln.style.display = +ln.getAttribute("data-q") === i ? "" : "none"; });
            var top = z[i].map(function (v, k) { return [v, k]; }).sort(function (x, y) { return y[0] - x[0]; }).slice(0, 5);
            tooltip(ev, "<b>" + esc(showTok(labels[i])) + "</b> attends to:<br>" + top.map(function (t) { return esc(showTok(labels[t[1]])) + " <span class='ls-val'>" + fmt(t[0]) + "</span>"; }).join("<br>"));
          });
          a.addEventListener("mouseleave", function (ev) { linesArr.forEach(function (ln) { ln.style.display = ""; }); tooltip(ev, null); });
          g.appendChild(a); g.appendChild(b);
        })(i);
        pic.appendChild(g);
      }
      paint();
    }
    function modelView(into) {
      var size = Math.max(24, Math.min(64, Math.floor(900 / Hh) - 6));
      var grid = el("div", { "class": "ls-grid", style: "grid-template-columns: 60px repeat(" + Hh + ", " + (size + 4) + "px)" });
      grid.appendChild(el("div"));
      for (var h = 0; h < Hh; h++) grid.appendChild(el("div", { "class": "ls-axis", text: "h" + h }));
      for (var l = 0; l < L; l++) {
        grid.appendChild(el("div", { "class": "ls-axis", text: "layer " + l }));
        for (h = 0; h < Hh; h++) (function (l, h) {
          var c = el("canvas", { width: size, height: size, "class": "ls-thumb", title: "layer " + l + " head " + h });
          var ctx = c.getContext("2d"), img = ctx.createImageData(size, size);
          for (var y = 0; y < size; y++) for (var x = 0; x < size; x++) {
            var q = Math.floor(y * n / size), k = Math.floor(x * n / size), v = Math.sqrt(val(l, h, q, k)), o = (y * size + x) * 4;
            img.data[o] = 247 - v * 239; img.data[o + 1] = 251 - v * 203; img.data[o + 2] = 255 - v * 148; img.data[o + 3] = 255;
          }
          ctx.putImageData(img, 0, 0);
          c.addEventListener("click", function () { layerSel.value = l; headSel.value = h; modeSel.value = "heatmap"; draw(); });
          grid.appendChild(c);
        })(l, h);
      }
      into.appendChild(el("div", { "class": "ls-note", text: "click a head to open it" }));
      into.appendChild(grid);
    }
    [layerSel, headSel, modeSel].forEach(function (s) { s.addEventListener("change", draw); });
    host.appendChild(el("div", { "class": "ls-attn" }, [note, el("div", { "class": "ls-ctl" }, ["view ", modeSel, " ", layerSel, " ", headSel]), body]));
    draw();
  }

  var RENDER = { heatmap: heatmap, tokens: tokens, table: table, lines: lines, bars: bars, choice: choice, attention: attention,
    text: function (s, h) { h.appendChild(el("p", { "class": "ls-text", text: s.text })); },
    html: function (s, h) { h.appendChild(el("div", { html: s.html })); },
    image: function (s, h) { h.appendChild(el("img", { src: "data:image/png;base64," + s.png, "class": "ls-img", alt: s.alt || "" })); } };
  function render(spec, host) {
    var f = RENDER[spec.type];
    if (!f) { host.appendChild(el("div", { "class": "ls-error", text: "unknown widget " + spec.type })); return; }
    f(spec, host);
  }
  function renderAll(root, data) {
    (root || document).querySelectorAll(".ls-widget").forEach(function (host) {
      if (host.getAttribute("data-done")) return;
      host.setAttribute("data-done", "1");
      render(data.widgets[+host.getAttribute("data-id")], host);
    });
  }
  global.lmscope = { render: render, renderAll: renderAll, fmt: fmt };
})(window);
