"""The web UI's logit-attribution tab: the same numbers ``lmscope dla`` computes."""

from __future__ import annotations

import pytest


def test_dla_job_is_what_lmscope_dla_computes(client, tiny_models, wait_job):
    from lmscope.explain.dla import dla

    text = "When Mary and John went to the store, John gave a drink to"
    body = {"kind": "dla", "model": "tiny-llama", "text": text, "target": " Mary", "contrast": " John"}
    job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["status"] == "done", job
    titles = [s["title"] for s in job["result"]["report"]["sections"]]
    assert titles[:2] == ["Heads", "Top contributors"]
    data = client.get(job["downloads"]["result.json"]).json()
    want = dla(tiny_models["tiny-llama"], text, target=" Mary", contrast=" John").to_json()
    assert data["logit"] == pytest.approx(want["logit"], abs=1e-6)
    assert [p["value"] for p in data["parts"]] == pytest.approx([p["value"] for p in want["parts"]], abs=1e-6)
    r = client.post("/api/jobs", json={**body, "model": "tiny-bert"})
    assert r.status_code == 422 and "encoder" in r.json()["error"]
    r = client.post("/api/jobs", json={**body, "target": " Maryland is"})
    assert r.status_code == 422 and "exactly one token" in r.json()["error"]


def test_heads_job_can_estimate_by_attribution_patching(client, wait_job):
    text = "the cat sat on the mat and the cat sat on the mat again"
    body = {"kind": "heads", "model": "tiny-llama", "text": text, "scored_on": "text", "approx": "atp"}
    job = wait_job(client, client.post("/api/jobs", json=body).json()["id"])
    assert job["status"] == "done", job
    data = client.get(job["downloads"]["result.json"]).json()
    assert "APPROXIMATE" in data["metrics"]["atp_mean"] and data["heads"][0]["ablation_mean"] is None
    r = client.post("/api/jobs", json={**body, "approx": "taylor"})
    assert r.status_code == 422 and "'approx' must be" in r.json()["error"]
