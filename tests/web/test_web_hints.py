"""serve details from issue 9: no favicon 404, a target without its leading space gets a hint showing
the tokenization, an incompatible compare pair is refused in the page's words, models describe their
vocabulary so the page can pick a comparable pair."""

from __future__ import annotations


def test_favicon_is_not_a_404(client):
    assert client.get("/favicon.ico").status_code == 204


def test_target_without_leading_space_gets_a_hint(client, tiny_models):
    tok = tiny_models["tiny-llama"].tokenizer
    assert len(tok("Paris", add_special_tokens=False)["input_ids"]) == 1
    spaced = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(spaced) == 1
    body = {
        "kind": "explain",
        "model": "tiny-llama",
        "text": "The capital of France is",
        "methods": ["saliency"],
    }
    r = client.post("/api/jobs", json={**body, "target": "Paris"})
    assert r.status_code == 202, r.text
    notes = r.json()["notes"]
    assert len(notes) == 1 and "' Paris'" in notes[0] and f"token {spaced[0]}" in notes[0]
    client.delete(f"/api/jobs/{r.json()['id']}")
    r = client.post("/api/jobs", json={**body, "target": " Paris"})
    assert r.status_code == 202 and r.json()["notes"] == []
    client.delete(f"/api/jobs/{r.json()['id']}")


def test_incompatible_compare_is_refused_before_queueing(client):
    r = client.post(
        "/api/jobs",
        json={"kind": "compare", "original": "tiny-llama", "compressed": "tiny-bert", "text": "hi"},
    )
    assert r.status_code == 422
    msg = r.json()["error"]
    assert "tiny-llama" in msg and "tiny-bert" in msg and "--model" not in msg


def test_models_describe_vocabulary(client, tiny_models):
    info = {m["id"]: m for m in client.get("/api/info").json()["models"]}
    assert info["tiny-llama"]["vocab_size"] == tiny_models["tiny-llama"].vocab_size
    assert info["tiny-llama"]["vocab_size"] != info["tiny-bert"]["vocab_size"]
