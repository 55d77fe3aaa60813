/* lmscope serve page: talks to the JSON API, draws results with the shared lmscope.js widgets.
 * Every job is POST /api/jobs -> id, then GET /api/jobs/{id}?wait=… until done; DELETE cancels. */
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var info = null, tab = "inspect", current = null;

  // ---------- messages ----------
  function showMsg(text, kind) {
    var m = $("msg");
    m.textContent = text; m.className = "app-msg " + (kind || "error"); m.hidden = !text;
  }
  function clearMsg() { showMsg("", ""); }

  // ---------- HTTP ----------
  function api(method, url, body) {
    var opts = { method: method, headers: {} };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch(url, opts).then(function (r) {
      return r.text().then(function (t) {
        var data = null;
        try { data = t ? JSON.parse(t) : null; } catch (e) { data = null; }
        if (!r.ok) {
          var err = new Error((data && data.error) || ("the server answered " + r.status + " " + r.statusText));
          err.status = r.status; throw err;
        }
        return data;
      });
    }, function () { throw new Error("cannot reach the lmscope server: is it still running?"); });
  }

  // an uploaded file (Audit tab): the raw body, so the server streams it to disk under its size limit
  function uploadFile(file) {
    var limit = info.limits.max_upload_bytes;
    if (file.size > limit) {
      var shown = limit >= 1048576 ? (+(limit / 1048576).toPrecision(3)) + " MB" : limit + " bytes";
      return Promise.reject(new Error("the file is over this server's upload limit of " + shown +
        "; upload a smaller file (or start lmscope serve with a larger --max-upload-mb)"));
    }
    return fetch("/api/uploads?name=" + encodeURIComponent(file.name), {
      method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file
    }).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (data) {
        if (!r.ok) throw new Error((data && data.error) || ("the server answered " + r.status + " " + r.statusText));
        return data;
      });
    }, function () { throw new Error("cannot reach the lmscope server: is it still running?"); });
  }

  // ---------- jobs ----------
  function setJob(job) {
    var box = $("job");
    if (!job) { box.hidden = true; return; }
    box.hidden = false;
    $("job-bar").style.width = Math.round(100 * (job.progress || 0)) + "%";
    $("job-msg").textContent = job.kind + ": " + job.message + (job.status === "running" ? " (" + Math.round(100 * job.progress) + "%)" : "");
    $("cancel").disabled = !(job.status === "queued" || job.status === "running");
  }
  function runJob(body) {
    clearMsg();
    if (current) { api("DELETE", "/api/jobs/" + current.id).catch(function () {}); }
    var mine = { id: null, cancelled: false };
    current = mine;
    setJob({ kind: body.kind, message: "sending", progress: 0, status: "queued" });
    return api("POST", "/api/jobs", body).then(function (job) {
      mine.id = job.id;
      if (job.notes && job.notes.length) showMsg(job.notes.join(" "), "note");  // e.g. a target without its leading space
      return poll(mine, job);
    }).then(function (job) {
      if (current === mine) current = null;
      return job;
    }, function (err) {
      if (current === mine) { current = null; setJob(null); }
      throw err;
    });
  }
  function poll(mine, job) {
    setJob(job);
    if (job.status === "done") { $("job").hidden = true; return job; }
    if (job.status === "error") { setJob(null); throw new Error(job.error || "the job failed"); }
    if (job.status === "cancelled") { setJob(null); var e = new Error("cancelled"); e.cancelled = true; throw e; }
    return api("GET", "/api/jobs/" + job.id + "?wait=0.4").then(function (j) { return poll(mine, j); });
  }
  function fail(err) {
    if (err && err.cancelled) showMsg("Cancelled.", "note");
    else showMsg(err && err.message ? err.message : String(err), "error");
  }

  // ---------- drawing ----------
  function renderReport(report, host) {
    host.innerHTML = "";
    (report.sections || []).forEach(function (s) {
      host.appendChild(el("h2", "app-h2", s.title));
      if (s.note) host.appendChild(el("div", "ls-note", s.note));
      s.widgets.forEach(function (w) {
        var div = el("div", "ls-widget");
        host.appendChild(div);
        try { lmscope.render(w, div); } catch (e) { div.appendChild(el("div", "ls-error", "could not draw this view: " + e.message)); }
      });
    });
  }
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
  function downloads(panel, job) {
    var box = panel.querySelector(".app-downloads");
    box.innerHTML = "";
    Object.keys(job.downloads || {}).forEach(function (name) {
      var a = el("a", "app-dl", "⤓ " + name);
      a.href = job.downloads[name]; a.setAttribute("download", "");
      box.appendChild(a);
    });
  }
  function panel(name) { return $("panel-" + name); }

  // ---------- inputs ----------
  function model() { return $("model").value; }
  function modelInfo(id) { return info.models.filter(function (m) { return m.id === id; })[0]; }
  function text() { return $("text").value; }
  function opt(id) { var v = $(id).value; return v === "" ? null : v; }

  // ---------- tabs ----------
  var RUN = {
    inspect: function () {
      var p = panel("inspect");
      return runJob({ kind: "inspect", model: model(), text: text() }).then(function (job) {
        renderReport(job.result.report, p.querySelector(".app-out")); downloads(p, job);
      });
    },
    explain: function () {
      var p = panel("explain"), m = modelInfo(model());
      var methods = Array.prototype.map.call(document.querySelectorAll("#methods input:checked"), function (c) { return c.value; });
      var body = { kind: "explain", model: model(), text: text(), target: opt("target"), contrast: opt("contrast"),
        methods: methods.length ? methods : null, generate: +$("generate").value || 0, sanity: $("sanity").checked };
      if (m && !m.causal) body.pair = opt("pair");
      return runJob(body).then(function (job) { showSteps(job.result); downloads(p, job); });
    },
    heads: function () {
      var p = panel("heads");
      return runJob({ kind: "heads", model: model(), text: text(), scored_on: $("heads-on").value, approx: $("heads-approx").checked ? "atp" : null }).then(function (job) {
        renderReport(job.result.report, p.querySelector(".app-out")); downloads(p, job); clickableHeads(p);
      });
    },
    dla: function () {
      var p = panel("dla");
      return runJob({ kind: "dla", model: model(), text: text(), target: opt("target"), contrast: opt("contrast") }).then(function (job) {
        renderReport(job.result.report, p.querySelector(".app-out")); downloads(p, job);
      });
    },
    audit: function () {
      var p = panel("audit"), file = $("au-file").files[0], swaps = $("au-swaps").files[0], m = modelInfo(model());
      if (!file) return Promise.reject(new Error("choose a dataset file (.jsonl, .csv, .tsv or .parquet) to audit"));
      var builtin = Array.prototype.map.call(document.querySelectorAll("#au-builtin input:checked"), function (c) { return c.value; });
      var body = { kind: "audit", model: model(), text_field: opt("au-text"), label_field: opt("au-label"),
        group_field: opt("au-group"), id_field: opt("au-id"), positive: opt("au-positive"), builtin: builtin,
        explain: $("au-explain").checked, sanity: $("au-sanity").checked, max_cases: $("au-max").value ? +$("au-max").value : null };
      if (m && m.causal) {
        body.prompt = $("au-prompt").value;
        body.choices = $("au-choices").value.split("|").filter(function (c) { return c.trim(); });
      }
      clearMsg();
      p.querySelector(".app-out").innerHTML = ""; p.querySelector(".app-downloads").innerHTML = "";
      setJob({ kind: "audit", message: "uploading " + file.name, progress: 0, status: "queued" });
      return uploadFile(file).then(function (u) {
        body.data = u.id;
        return swaps ? uploadFile(swaps).then(function (s) { body.swaps = s.id; }) : null;
      }).then(function () { return runJob(body); }, function (err) { setJob(null); throw err; }).then(function (job) {
        var out = p.querySelector(".app-out");
        renderReport(job.result.report, out); downloads(p, job);
        out.insertBefore(el("div", "app-dim", job.result.report.subtitle || ""), out.firstChild);  // cases, decider, time
      });
    },
    features: function () {
      var p = panel("features");
      $("fe-dashboard").innerHTML = "";
      return runJob({ kind: "features", model: model(), dictionary: $("fe-dict").value, text: text() }).then(function (job) {
        showFeatures(job.result, p.querySelector(".app-out")); downloads(p, job);
      });
    },
    compare: function () {
      var p = panel("compare");
      return runJob({ kind: "compare", original: $("cmp-a").value, compressed: $("cmp-b").value, text: text() }).then(function (job) {
        renderReport(job.result.report, p.querySelector(".app-out")); downloads(p, job);
      });
    }
  };
  function run() { return RUN[tab]().catch(fail); }  // the server checks input first, then availability
  function unavailable(name) {
    var f = info && info.features[name];
    return f && !f.available ? f.reason : null;
  }
  function switchTab(name) {
    tab = name;
    document.querySelectorAll(".app-tab").forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-tab") === name); });
    document.querySelectorAll(".app-panel").forEach(function (p) { p.hidden = p.id !== "panel-" + name; });
    $("text").hidden = name === "audit";  // the audit reads its texts from the uploaded file
    clearMsg();
  }

  // ---------- heads: click a row to see that head's pattern ----------
  function showPattern(layer, head) {
    $("hp-layer").value = layer; $("hp-head").value = head;
    return runJob({ kind: "pattern", model: model(), text: text(), layer: +layer, head: +head }).then(function (job) {
      renderReport(job.result.report, $("head-pattern"));
    }).catch(fail);
  }
  function clickableHeads(p) {
    p.querySelectorAll(".app-out table.ls-table").forEach(function (t) {
      var cols = Array.prototype.map.call(t.querySelectorAll("thead th"), function (th) { return th.textContent.trim().toLowerCase(); });
      var li = cols.indexOf("layer"), hi = cols.indexOf("head");
      if (li < 0 || hi < 0) return;
      t.classList.add("app-clickable");
      t.querySelector("tbody").addEventListener("click", function (ev) {
        var tr = ev.target.closest("tr"); if (!tr) return;
        var cells = tr.querySelectorAll("td");
        showPattern(parseInt(cells[li].textContent, 10), parseInt(cells[hi].textContent, 10));
      });
    });
  }
  function fillHeadPickers() {
    var m = modelInfo(model()); if (!m) return;
    [["hp-layer", m.n_layers], ["hp-head", m.n_heads]].forEach(function (x) {
      var s = $(x[0]); s.innerHTML = "";
      for (var i = 0; i < x[1]; i++) { var o = el("option", null, String(i)); o.value = i; s.appendChild(o); }
    });
  }

  // ---------- features: the dictionary's features on each token; a feature's dashboard ----------
  function featureLabel(f) {
    var s = "#" + f.unit;
    if (f.explanation) s += " — " + f.explanation + " (detection " + fmt(f.scores.detection) + ", random " + fmt(f.random_baseline && f.random_baseline.detection) + ")";
    return s;
  }
  function fmt(v) { return v === null || v === undefined ? "–" : (+v).toFixed(2); }
  function featureLink(unit, label) {
    var a = el("span", "fe-feat", label);
    a.setAttribute("data-unit", unit);
    a.addEventListener("click", function () { showFeature(unit); });
    return a;
  }
  function showFeatures(r, out) {
    out.innerHTML = "";
    out.appendChild(el("div", "app-dim", r.dictionary + " at " + r.site + " · " + r.features.length + " features active on the text (first position left out) · mean " + r.l0 + " active per token" + (r.has_explanations ? "" : " · no explanations.json: features are shown without explanations")));
    var row = el("div", "fe-tokens"), detail = el("div", "fe-detail");
    var peak = 0;
    r.per_token.forEach(function (t) { if (t.length) peak = Math.max(peak, t[0][1]); });
    r.tokens.forEach(function (tok, i) {
      var chip = el("span", "fe-tok", tok), top = r.per_token[i];
      var a = top.length && peak > 0 ? top[0][1] / peak : 0;
      chip.style.background = "rgba(234,88,12," + (0.6 * a).toFixed(3) + ")";
      chip.title = top.length + " of the top features active";
      chip.addEventListener("click", function () {
        row.querySelectorAll(".fe-tok").forEach(function (c) { c.classList.remove("active"); });
        chip.classList.add("active");
        detail.innerHTML = "";
        detail.appendChild(el("h2", "app-h2", "Token " + i + ": " + JSON.stringify(tok)));
        if (!top.length) detail.appendChild(el("div", "app-dim", i === 0 ? "not encoded: dictionaries are trained without the first position (the attention sink)" : "no feature active"));
        top.forEach(function (ua) {
          var d = el("div"), info = r.explanations[String(ua[0])] || { unit: ua[0] };
          d.appendChild(el("span", "app-dim", ua[1].toFixed(3) + "  "));
          d.appendChild(featureLink(ua[0], featureLabel(info)));
          detail.appendChild(d);
        });
      });
      row.appendChild(chip);
    });
    out.appendChild(row); out.appendChild(detail);
    out.appendChild(el("h2", "app-h2", "Features active on the text"));
    var table = el("table", "ls-table fe-table"), head = el("tr");
    ["feature", "max activation", "tokens", "explanation", "detection", "random"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    var thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    var body = el("tbody");
    r.features.forEach(function (f) {
      var tr = el("tr"), cell = el("td");
      cell.appendChild(featureLink(f.unit, "#" + f.unit));
      tr.appendChild(cell);
      tr.appendChild(el("td", null, f.max.toFixed(3)));
      tr.appendChild(el("td", null, String(f.n_tokens)));
      tr.appendChild(el("td", null, f.explanation || "—"));
      tr.appendChild(el("td", null, f.scores ? fmt(f.scores.detection) : "—"));
      tr.appendChild(el("td", null, f.random_baseline ? fmt(f.random_baseline.detection) : "—"));
      body.appendChild(tr);
    });
    table.appendChild(body); out.appendChild(table);
  }
  function showFeature(unit) {
    var box = $("fe-dashboard"), p = panel("features");
    return runJob({ kind: "feature", model: model(), dictionary: $("fe-dict").value, unit: +unit }).then(function (job) {
      box.innerHTML = "";
      if (job.result.dashboard) {
        box.appendChild(el("h2", "app-h2", "Feature " + unit));
        // the offline dashboard of views/features.py, isolated: scripts run, but it cannot reach this page
        var frame = el("iframe");
        frame.setAttribute("sandbox", "allow-scripts");
        frame.setAttribute("title", "feature " + unit + " dashboard");
        frame.srcdoc = job.result.dashboard;
        box.appendChild(frame);
      } else {
        var inner = el("div"); box.appendChild(inner); renderReport(job.result.report, inner);
      }
      var links = el("div", "app-downloads"); box.appendChild(links);
      Object.keys(job.downloads || {}).forEach(function (name) {
        var a = el("a", "app-dl", "⤓ " + name); a.href = job.downloads[name]; a.setAttribute("download", ""); links.appendChild(a);
      });
    }).catch(fail);
  }

  // ---------- explain: one step per generated token, picked from a row of buttons ----------
  function showSteps(result) {
    var box = $("steps"), out = panel("explain").querySelector(".app-out");
    box.innerHTML = ""; box.hidden = result.steps.length < 2;
    function pick(k) {
      box.querySelectorAll(".app-step").forEach(function (b, i) { b.classList.toggle("active", i === k); });
      renderReport({ sections: result.steps[k].sections }, out);
      var head = el("div", "app-dim", result.steps[k].description || "");
      out.insertBefore(head, out.firstChild);
    }
    result.steps.forEach(function (st, k) {
      var b = el("button", "app-step", "step " + (k + 1) + ": " + JSON.stringify(st.target));
      b.addEventListener("click", function () { pick(k); });
      box.appendChild(b);
    });
    if (result.steps.length > 1) box.insertBefore(el("span", "app-dim", "generation step "), box.firstChild);
    pick(0);
  }

  // ---------- start ----------
  function onModel() {
    var m = modelInfo(model()); if (!m) return;
    $("model-info").textContent = m.family + " · " + m.n_layers + " layers · " + m.n_heads + " heads" +
      (m.n_kv_heads !== m.n_heads ? " (" + m.n_kv_heads + " KV)" : "") + " · " + (m.n_params / 1e6).toFixed(1) + "M params";
    $("pair-label").hidden = m.causal;
    $("au-lm").hidden = !m.causal;  // a causal LM decides through a prompt and choices; a classifier by its labels
    $("generate").disabled = !m.causal;
    fillHeadPickers();
  }
  function start(data) {
    info = data;
    ["model", "cmp-a", "cmp-b"].forEach(function (id) {
      data.models.forEach(function (m) { var o = el("option", null, m.id); o.value = m.id; $(id).appendChild(o); });
    });
    // compare: default to the first pair that can be compared (two causal models of one vocabulary and
    // width: a model and its compressed copy), never e.g. smollm2 vs minilm
    var pair = null;
    data.models.forEach(function (a) { data.models.forEach(function (b) {
      if (!pair && a.id !== b.id && a.causal && b.causal && a.vocab_size === b.vocab_size && a.d_model === b.d_model) pair = [a.id, b.id];
    }); });
    if (pair) { $("cmp-a").value = pair[0]; $("cmp-b").value = pair[1]; }
    else data.features.compare = { available: false, reason: "compare needs two models, one the compressed copy of the other: start the server with both, e.g. lmscope serve --model smollm2 --model small/" + (data.models.length > 1 ? " (the models loaded now differ in kind, vocabulary or width)" : "") };
    $("limits").textContent = "limits: " + data.limits.max_chars + " characters, " + data.limits.max_tokens + " tokens";
    ["explain", "heads", "compare"].forEach(function (name) {
      var why = unavailable(name), box = panel(name).querySelector(".app-unavailable");
      box.hidden = !why; box.textContent = why ? "Not available: " + why : "";
    });
    (data.swap_lists || []).forEach(function (name) {
      var c = el("input"); c.type = "checkbox"; c.value = name; c.checked = true;
      var l = el("label", "app-method"); l.appendChild(c); l.appendChild(document.createTextNode(" builtin:" + name));
      $("au-builtin").appendChild(l);
    });
    var up = data.limits.max_upload_bytes;
    $("au-limits").textContent = "Limits: " + (up >= 1048576 ? (+(up / 1048576).toPrecision(3)) + " MB" : up + " bytes") +
      " per file, " + data.limits.max_audit_cases + " cases per audit.";
    (data.dictionaries || []).forEach(function (d) {
      var o = el("option", null, d.id); o.value = d.id; $("fe-dict").appendChild(o);
    });
    function dictInfo() {
      var d = data.dictionaries.filter(function (x) { return x.id === $("fe-dict").value; })[0];
      $("fe-info").textContent = d ? d.kind + " · " + d.site + " · " + d.d_sae + " features" + (d.k ? " · k " + d.k : "") + " · " + d.explained + " explained" : "";
    }
    $("fe-dict").addEventListener("change", dictInfo); dictInfo();
    var noDict = (data.dictionaries || []).length ? null : "this server has no dictionary: start it with lmscope serve --sae DIR (a lmscope features train --out folder, or a SAELens folder) [--explanations FEATS_DIR]";
    panel("features").querySelector(".app-unavailable").hidden = !noDict;
    panel("features").querySelector(".app-unavailable").textContent = noDict ? "Not available: " + noDict : "";
    var checked = data.features.explain.default_methods || [];
    (data.features.explain.methods || []).forEach(function (name) {
      var c = el("input"); c.type = "checkbox"; c.value = name; c.checked = checked.indexOf(name) >= 0;
      var l = el("label", "app-method"); l.appendChild(c); l.appendChild(document.createTextNode(" " + name));
      $("methods").appendChild(l);
    });
    onModel();
    document.querySelectorAll(".app-tab").forEach(function (b) { b.addEventListener("click", function () { switchTab(b.getAttribute("data-tab")); }); });
    $("model").addEventListener("change", onModel);
    $("run").addEventListener("click", run);
    $("text").addEventListener("keydown", function (ev) { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); run(); } });
    $("cancel").addEventListener("click", function () { if (current && current.id) api("DELETE", "/api/jobs/" + current.id).catch(fail); });
    $("hp-show").addEventListener("click", function () { showPattern($("hp-layer").value, $("hp-head").value); });
    document.body.setAttribute("data-ready", "1");
  }
  window.addEventListener("error", function (ev) { showMsg("page error: " + ev.message, "error"); });
  api("GET", "/api/info").then(start).catch(fail);
})();
