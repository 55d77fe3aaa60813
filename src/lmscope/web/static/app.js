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
