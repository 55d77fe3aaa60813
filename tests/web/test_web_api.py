"""The serve API through FastAPI's TestClient: jobs, downloads, limits, bad input, static files."""

from __future__ import annotations

import json
import threading
from importlib import resources

import pytest


def test_info_lists_exactly_the_registered_models(client):
    info = client.get("/api/info").json()
    assert [m["id"] for m in info["models"]] == ["tiny-llama", "tiny-bert", "tiny-changed"]
    llama = info["models"][0]
    assert (llama["n_layers"], llama["n_heads"], llama["n_kv_heads"], llama["causal"]) == (3, 4, 2, True)
    assert info["models"][1]["causal"] is False
    assert set(info["features"]) == {"explain", "heads", "compare"}
    for f in info["features"].values():
        assert f["available"] == (f["reason"] is None)


def test_inspect_job_gives_report_sections_and_the_cli_downloads(client, tiny_models, wait_job):
    text = "The capital of France is"
    r = client.post("/api/jobs", json={"kind": "inspect", "model": "tiny-llama", "text": text})
    assert r.status_code == 202
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done", job
    sections = {s["title"]: s for s in job["result"]["report"]["sections"]}
    assert {"Input", "Attention", "Activations"} <= set(sections)
    n_tokens = len(tiny_models["tiny-llama"].encode(text)["input_ids"][0])
    attn = sections["Attention"]["widgets"][0]
    assert (attn["type"], attn["n_layers"], attn["n_heads"], attn["n"]) == ("attention", 3, 4, n_tokens)
    assert job["result"]["tokens"] == sections["Input"]["widgets"][0]["tokens"]

    html = client.get(job["downloads"]["report.html"])
    assert html.status_code == 200 and "attachment" in html.headers["content-disposition"]
    assert html.text.startswith("<!DOCTYPE html>") and "lmscope.renderAll" in html.text
    data = client.get(job["downloads"]["result.json"])
    summary = json.loads(data.text)
    assert summary["n_tokens"] == n_tokens and len(summary["layers"]) == 3
    assert summary["tokens"][0] == job["result"]["tokens"]


def test_encoder_inspect_and_pattern_for_one_head(client, wait_job):
    job = wait_job(
        client,
        client.post("/api/jobs", json={"kind": "inspect", "model": "tiny-bert", "text": "a cat sat"}).json()[
            "id"
        ],
    )
    assert job["status"] == "done", job
    r = client.post(
        "/api/jobs",
        json={"kind": "pattern", "model": "tiny-llama", "text": "one two three", "layer": 2, "head": 3},
    )
    job = wait_job(client, r.json()["id"])
    widget = job["result"]["report"]["sections"][0]["widgets"][0]
    assert (widget["type"], widget["layer"], widget["head"]) == ("attention", 2, 3)


def test_explain_job_is_what_explain_computes(client, tiny_models, wait_job):
    from lmscope.explain.api import explain

    text = "The cat sat on the"
    body = {"kind": "explain", "model": "tiny-llama", "text": text, "methods": ["saliency"]}
    job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["status"] == "done", job
    (step,) = job["result"]["steps"]
    expected = explain(tiny_models["tiny-llama"], text, methods=["saliency"], sanity=False).first
    assert step["target"] == expected.target["token"] and step["ranking"] == ["saliency"]
    tokens = [w for sec in step["sections"] for w in sec["widgets"] if w["type"] == "tokens"]
    assert tokens[0]["label"].startswith("saliency") and tokens[0]["tokens"] == expected.tokens
    assert tokens[0]["scores"] == pytest.approx(expected.methods["saliency"].scores, abs=1e-5)
    data = client.get(job["downloads"]["result.json"]).json()
    assert data["ranking"] == ["saliency"] and data["methods"]["saliency"]["faithfulness"]["rank"] == 1
    assert "<!DOCTYPE html>" in client.get(job["downloads"]["report.html"]).text


def test_explain_generation_steps_and_encoder_pair(client, wait_job):
    body = {
        "kind": "explain",
        "model": "tiny-llama",
        "text": "One two",
        "methods": ["saliency"],
        "generate": 2,
    }
    job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["status"] == "done", job
    steps = job["result"]["steps"]
    assert len(steps) == 2
    first_tokens = [w for w in steps[0]["sections"][1]["widgets"] if w["type"] == "tokens"][0]["tokens"]
    second_tokens = [w for w in steps[1]["sections"][1]["widgets"] if w["type"] == "tokens"][0]["tokens"]
    assert second_tokens == first_tokens + [steps[0]["target"]]  # step 2 explains the token after step 1's
    assert not any(sec["title"].startswith("Step") for st in steps for sec in st["sections"])
    body = {
        "kind": "explain",
        "model": "tiny-bert",
        "text": "a cat",
        "pair": "a dog",
        "methods": ["saliency"],
    }
    job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["status"] == "done", job
    assert "cosine" in job["result"]["steps"][0]["description"]


BAD = [
    ({"kind": "inspect", "model": "tiny-llama", "text": ""}, 422, "the text is empty"),
    ({"kind": "inspect", "model": "tiny-llama", "text": "   \n"}, 422, "the text is empty"),
    ({"kind": "inspect", "model": "tiny-llama"}, 422, "the text is empty"),
    (
        {"kind": "inspect", "model": "tiny-llama", "text": "x" * 201},
        422,
        "201 characters, over the limit of 200",
    ),
    (
        {"kind": "inspect", "model": "tiny-llama", "text": "word " * 30},
        422,
        "over this server's limit of 20 tokens",
    ),
    ({"kind": "inspect", "model": "/etc/passwd", "text": "hi"}, 422, "unknown model '/etc/passwd'"),
    (
        {"kind": "inspect", "model": "smollm2", "text": "hi"},
        422,
        "this server has: tiny-llama, tiny-bert, tiny-changed",
    ),
    ({"kind": "inspect", "model": ["tiny-llama"], "text": "hi"}, 422, "'model' must be a string"),
    ({"kind": "rm -rf", "model": "tiny-llama", "text": "hi"}, 422, "unknown job kind"),
    (
        {"kind": "pattern", "model": "tiny-llama", "text": "hi", "layer": 3},
        422,
        "'layer' is 3, it must be between 0 and 2",
    ),
    (
        {"kind": "explain", "model": "tiny-bert", "text": "hi", "pair": "x", "generate": 2},
        422,
        "does not generate",
    ),
    ({"kind": "explain", "model": "tiny-llama", "text": "hi", "generate": 99}, 422, "'generate' is 99"),
    (
        {"kind": "explain", "model": "tiny-llama", "text": "hi", "generate": 2, "target": "x"},
        422,
        "leave target",
    ),
    (
        {"kind": "explain", "model": "tiny-llama", "text": "hi", "methods": ["magic"]},
        422,
        "unknown attribution",
    ),
    ({"kind": "explain", "model": "tiny-llama", "text": "hi", "methods": "saliency"}, 422, "must be a list"),
    ({"kind": "explain", "model": "tiny-bert", "text": "hi"}, 422, "give a second text"),
    (
        {"kind": "explain", "model": "tiny-llama", "text": "hi", "target": " Paris is"},
        422,
        "it must be exactly one token",
    ),
    (
        {"kind": "explain", "model": "tiny-llama", "text": "hi", "contrast": " Paris is"},
        422,
        "contrast ' Paris is' is 2 tokens",
    ),
    (
        {"kind": "explain", "model": "tiny-bert", "text": "hi", "target": "x"},
        422,
        "needs a causal language model",
    ),
    (
        {"kind": "compare", "original": "tiny-llama", "compressed": "tiny-llama", "text": "hi"},
        422,
        "two different models",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_a_clear_json_error(client, limits, body, status, message):
    limits.max_chars, limits.max_tokens = 200, 20
    r = client.post("/api/jobs", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert client.get("/api/info").status_code == 200  # nothing broke


def test_body_size_limit_and_malformed_json(client, limits):
    limits.max_body_bytes = 1000
    r = client.post("/api/jobs", json={"kind": "inspect", "model": "tiny-llama", "text": "a" * 2000})
    assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(5):
            yield b"a" * 400

    r = client.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "the request body is not valid JSON"
    r = client.post("/api/jobs", json=["inspect"])
    assert r.status_code == 422 and "JSON object" in r.json()["error"]


def test_heads_job_is_what_lmscope_heads_computes(client, tiny_models, wait_job):
    from lmscope.explain.heads import analyze_heads

    text = "the cat sat on the mat and the cat sat on the mat again"
    r = client.post(
        "/api/jobs", json={"kind": "heads", "model": "tiny-llama", "text": text, "scored_on": "text"}
    )
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done", job
    titles = [s["title"] for s in job["result"]["report"]["sections"]]
    assert titles[:2] == ["Head importance", "What each head does"]
    data = client.get(job["downloads"]["result.json"]).json()
    expected = analyze_heads(tiny_models["tiny-llama"], text).to_json()
    assert len(data["heads"]) == 12
    for got, want in zip(data["heads"], expected["heads"]):
        assert (got["layer"], got["head"]) == (want["layer"], want["head"])
        assert got["ablation_mean"] == pytest.approx(want["ablation_mean"], abs=1e-5)
        assert got["previous_token"] == pytest.approx(want["previous_token"], abs=1e-5)
    r = client.post(
        "/api/jobs", json={"kind": "heads", "model": "tiny-llama", "text": "", "scored_on": "text"}
    )
    assert r.status_code == 422 and "the text is empty" in r.json()["error"]
    r = client.post("/api/jobs", json={"kind": "heads", "model": "tiny-llama", "scored_on": "/etc/passwd"})
    assert r.status_code == 422 and "'scored_on' must be" in r.json()["error"]


def test_compare_finds_the_changed_head(client, wait_job):
    text = "one two three four five six"
    r = client.post(
        "/api/jobs",
        json={"kind": "compare", "original": "tiny-llama", "compressed": "tiny-changed", "text": text},
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done", job
    data = client.get(job["downloads"]["result.json"]).json()
    js = {(h["layer"], h["head"]): h["js"] for h in data["heads"]}
    assert max(js[0, h] for h in range(4)) < 1e-6  # layer 0 is untouched
    assert js[1, 2] > 1e-3 and js[1, 2] == max(js[1, h] for h in range(4))
    titles = [s["title"] for s in job["result"]["report"]["sections"]]
    assert any(t.startswith("Structure") for t in titles) and "Attributions" in titles
    r = client.post(
        "/api/jobs",
        json={"kind": "compare", "original": "tiny-llama", "compressed": "tiny-bert", "text": text},
    )
    # refused before queueing, in the page's words (no CLI flags)
    assert r.status_code == 422 and "causal" in r.json()["error"] and "--" not in r.json()["error"]


def test_info_lists_every_tab_and_the_registered_methods(client):
    from lmscope.explain.attribution.base import method_names

    info = client.get("/api/info").json()["features"]
    assert all(f["available"] for f in info.values())
    assert info["explain"]["methods"] == method_names()
    assert info["explain"]["default_methods"] == ["saliency", "input_x_gradient", "occlusion"]


def test_unknown_job_and_not_done_downloads(client):
    assert client.get("/api/jobs/nope").status_code == 404
    assert "no job 'nope'" in client.get("/api/jobs/nope").json()["error"]
    assert client.delete("/api/jobs/nope").status_code == 404
    assert client.get("/api/nothing").json() == {"error": "not found"}


STATIC_ATTACKS = [
    "/static/../server.py",
    "/static/..%2fserver.py",
    "/static/%2e%2e/server.py",
    "/static/%2e%2e%2f%2e%2e%2fviews%2fhtml.py",
    "/static/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/static/app.js",
    "/static/web/static/app.js",
    "/static/__init__.py",
    "/static/.",
    "/static/",
]


@pytest.mark.parametrize("path", STATIC_ATTACKS)
def test_static_refuses_path_traversal(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "import" not in r.text and "root:" not in r.text


def test_static_serves_the_page_and_the_shared_renderer(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/lmscope.js">' in page.text
    js = client.get("/static/lmscope.js")
    shared = resources.files("lmscope.views").joinpath("assets", "lmscope.js").read_text(encoding="utf-8")
    assert js.text == shared and js.headers["content-type"].startswith("text/javascript")
    assert not resources.files("lmscope.web").joinpath("static", "lmscope.js").is_file()  # served, not copied
    for name in ("app.js", "app.css", "lmscope.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for url in ("http://", "https://", "//cdn"):  # the page works offline
        assert url not in page.text and url not in client.get("/static/app.js").text


def test_a_busy_model_queues_jobs_and_the_server_stays_responsive(client, wait_job):
    app = client.app.state.lmscope
    release, started = threading.Event(), threading.Event()
    blocker = app.jobs.submit("test", "tiny-llama", lambda ctx: (started.set(), release.wait(60)))
    try:
        assert started.wait(30)
        queued = client.post(
            "/api/jobs", json={"kind": "inspect", "model": "tiny-llama", "text": "queued"}
        ).json()
        other = client.post(
            "/api/jobs", json={"kind": "inspect", "model": "tiny-bert", "text": "not blocked"}
        ).json()
        assert wait_job(client, other["id"])["status"] == "done"  # another model is not held up
        assert client.get("/api/info").status_code == 200
        job = client.get(f"/api/jobs/{queued['id']}").json()
        assert job["status"] == "queued"
        assert job["message"] in ("queued", "waiting: the model is busy with another job")
    finally:
        release.set()
    assert blocker.wait(30)
    assert wait_job(client, queued["id"])["status"] == "done"


def test_cancel_a_queued_job_over_http(client, wait_job):
    app = client.app.state.lmscope
    release, started = threading.Event(), threading.Event()
    blocker = app.jobs.submit("test", "tiny-llama", lambda ctx: (started.set(), release.wait(60)))
    try:
        assert started.wait(30)
        job = client.post(
            "/api/jobs", json={"kind": "inspect", "model": "tiny-llama", "text": "never run"}
        ).json()
        assert client.delete(f"/api/jobs/{job['id']}").status_code == 200
        assert wait_job(client, job["id"])["status"] == "cancelled"
    finally:
        release.set()
    assert blocker.wait(30)
    r = client.get(f"/api/jobs/{job['id']}/report.html")
    assert r.status_code == 409 and "is cancelled, not done" in r.json()["error"]


def test_serving_never_unpickles(tiny_models, monkeypatch, wait_job):
    import pickle

    import torch
    from fastapi.testclient import TestClient

    from lmscope.web.server import create_app

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was loaded")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    with TestClient(create_app(tiny_models)) as client:
        for body in (
            {"kind": "inspect", "model": "tiny-llama", "text": "no pickles here"},
            {"kind": "explain", "model": "tiny-llama", "text": "no pickles", "methods": ["saliency"]},
        ):
            job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
            assert job["status"] == "done", job


def test_cross_site_requests_are_refused(client, tiny_models):
    from fastapi.testclient import TestClient

    from lmscope.web.server import create_app

    # a form or fetch from another site can only send "simple" content types without a CORS preflight
    r = client.post(
        "/api/jobs",
        content=b'{"kind": "inspect", "model": "tiny-llama", "text": "hi"}',
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
    with TestClient(create_app(tiny_models, allowed_hosts=["127.0.0.1", "localhost"])) as local:
        assert local.get("/api/info", headers={"host": "127.0.0.1:8765"}).status_code == 200
        assert (
            local.get("/api/info", headers={"host": "evil.example:8765"}).status_code == 400
        )  # DNS rebinding
