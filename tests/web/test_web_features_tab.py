"""The serve Features tab through the API: a dictionary trained by ``lmscope features train`` and explained by
``lmscope features explain``, served with ``--sae``; the features on each token equal a brute-force encoding of
HF's own hidden states; a feature's dashboard; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.cli.main import main

TEXT = "The cat sat on the mat because it was warm."
SITE = "blocks.1.resid_post"  # the site the trained fixture (conftest) uses


@pytest.fixture(scope="module")
def served(trained):
    from fastapi.testclient import TestClient

    import lmscope
    from lmscope.web.features import load_dictionary
    from lmscope.web.server import create_app

    model_dir, sae_dir, feats = trained
    lm = lmscope.load(str(model_dir), progress=False)
    dictionaries = {
        "sae": load_dictionary(sae_dir, feats, "sae"),
        "bare": load_dictionary(sae_dir, None, "bare"),
    }
    with TestClient(create_app({"tiny": lm}, dictionaries=dictionaries)) as client:
        yield client, lm, dictionaries, json.loads((feats / "explanations.json").read_text())


def _run(client, wait_job, **body):
    r = client.post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done", job
    return job


def test_features_on_each_token_equal_a_brute_force_encoding_of_hf_hidden_states(served, wait_job):
    client, lm, dictionaries, explanations = served
    info = client.get("/api/info").json()
    assert [d["id"] for d in info["dictionaries"]] == ["sae", "bare"]
    assert info["dictionaries"][0]["explained"] == len(explanations["units"]) > 0
    assert info["dictionaries"][1]["explained"] == 0

    job = _run(client, wait_job, kind="features", model="tiny", dictionary="sae", text=TEXT, top=4)
    view = job["result"]
    # the oracle: HF's own hidden states (block 1's output is hidden_states[2]) through the SAELens encoder
    # formula written out: topk(relu((x - b_dec) @ W_enc + b_enc), k)
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        x = lm.model(ids, output_hidden_states=True).hidden_states[2][0].float()
        sae = dictionaries["sae"].sae
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(4, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert len(view["tokens"]) == ids.shape[1] == len(view["per_token"])
    assert view["per_token"][0] == []  # the first position (the attention sink) is never encoded
    for t, row in enumerate(view["per_token"][1:], start=1):
        want = [
            (int(u), float(dense[t, u])) for u in dense[t].argsort(descending=True)[:4] if dense[t, u] > 0
        ]
        assert [u for u, _ in row] == [u for u, _ in want]
        assert [a for _, a in row] == pytest.approx([a for _, a in want], abs=2e-3)
    # the summary: every feature active after the first position, strongest first
    body = dense[1:]
    active = [int(u) for u in body.max(0).values.argsort(descending=True) if body[:, u].max() > 0]
    assert [f["unit"] for f in view["features"]] == active[:64]
    # explanations: exactly the scored ones of explanations.json, never one for a feature it lacks
    by_unit = {u["unit"]: u for u in explanations["units"]}
    for f in view["features"]:
        if f["unit"] in by_unit:
            assert f["explanation"] == by_unit[f["unit"]]["explanation"]
            assert f["scores"] == by_unit[f["unit"]]["scores"]
        else:
            assert "explanation" not in f
    bare = _run(client, wait_job, kind="features", model="tiny", dictionary="bare", text=TEXT, top=4)[
        "result"
    ]
    assert bare["per_token"] == view["per_token"] and bare["has_explanations"] is False
    assert all("explanation" not in f for f in bare["features"])


def test_a_feature_dashboard_explained_and_not(served, wait_job):
    client, lm, dictionaries, explanations = served
    item = explanations["units"][0]
    job = _run(client, wait_job, kind="feature", model="tiny", dictionary="sae", unit=item["unit"])
    html = job["result"]["dashboard"]
    assert html.startswith("<!doctype html>") and json.dumps(item["explanation"])[1:-1] in html
    name = f"feature-{item['unit']}.html"
    assert list(job["downloads"]) == [name]
    assert client.get(job["downloads"][name]).text == html

    unexplained = next(u for u in range(64) if u not in {x["unit"] for x in explanations["units"]})
    job = _run(client, wait_job, kind="feature", model="tiny", dictionary="sae", unit=unexplained)
    data = json.loads(client.get(job["downloads"]["result.json"]).text)
    w = torch.nn.functional.normalize(dictionaries["sae"].sae.W_dec.detach().float(), dim=1)
    cos = (w @ w[unexplained]).tolist()
    cos[unexplained] = -2
    assert [n for n, _ in data["nearest"]] == sorted(range(64), key=lambda j: -cos[j])[:5]
    sections = job["result"]["report"]["sections"]
    assert sections[0]["title"] == f"Feature {unexplained}" and "no scored explanation" in sections[0]["note"]
    assert len(data["logits"]["promoted"]) == 6


def test_bad_requests(served, tiny_models):
    client = served[0]
    r = client.post(
        "/api/jobs", json={"kind": "features", "model": "tiny", "dictionary": "nope", "text": TEXT}
    )
    assert (
        r.status_code == 422 and r.json()["error"] == "unknown dictionary 'nope'; this server has: sae, bare"
    )
    r = client.post("/api/jobs", json={"kind": "feature", "model": "tiny", "dictionary": "sae", "unit": 64})
    assert r.status_code == 422 and r.json()["error"] == "'unit' is 64, it must be between 0 and 63"
    r = client.post("/api/jobs", json={"kind": "features", "model": "tiny", "dictionary": "sae", "text": " "})
    assert r.status_code == 422 and "the text is empty" in r.json()["error"]

    from fastapi.testclient import TestClient

    from lmscope.web.server import create_app

    with TestClient(create_app({"tiny-bert": tiny_models["tiny-bert"]})) as other:
        r = other.post("/api/jobs", json={"kind": "features", "model": "tiny-bert", "text": TEXT})
        assert r.status_code == 422 and r.json()["error"].startswith("this server has no dictionary")
    from lmscope.features import Dictionary, DictionaryConfig
    from lmscope.web.features import DictionaryEntry

    wide = Dictionary(DictionaryConfig("topk", d_in=served[1].d_model + 1, d_sae=8, site=SITE, k=2))
    dictionaries = {"wide": DictionaryEntry("wide", wide, "wide/")}
    with TestClient(create_app({"tiny": served[1]}, dictionaries=dictionaries)) as other:
        r = other.post("/api/jobs", json={"kind": "features", "model": "tiny", "text": TEXT})
        assert r.status_code == 422
        assert r.json()["error"].startswith(
            f"dictionary wide does not fit tiny: the dictionary reads {served[1].d_model + 1}-wide"
        )


def test_explanations_of_another_dictionary_are_refused(trained, tmp_path):
    from lmscope.errors import LmscopeError
    from lmscope.web.features import load_dictionary

    _, sae_dir, feats = trained
    data = json.loads((feats / "explanations.json").read_text())
    data["site"] = "blocks.0.resid_post"
    (tmp_path / "explanations.json").write_text(json.dumps(data))
    with pytest.raises(
        LmscopeError, match="explains latents at blocks.0.resid_post, not this dictionary's 64"
    ):
        load_dictionary(sae_dir, tmp_path)
    (tmp_path / "explanations.json").write_text("{")
    with pytest.raises(LmscopeError, match="is not an explanations.json"):
        load_dictionary(sae_dir, tmp_path)


def test_serve_cli_registers_dictionaries_and_limits(trained, tiny_models, monkeypatch, capsys, tmp_path):
    import uvicorn

    import lmscope.cli.serve as serve

    calls = {}
    monkeypatch.setattr(serve, "load_model", lambda spec: tiny_models["tiny-llama"])
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: calls.update(app=app, host=host))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    _, sae_dir, feats = trained
    args = ["serve", "--model", "tiny", "--sae", str(sae_dir), "--explanations", str(feats), "--port", port]
    assert main([*args, "--max-upload-mb", "0.5", "--max-audit-cases", "7"]) == 0
    app = calls["app"].state.lmscope
    assert calls["host"] == "127.0.0.1"
    assert list(app.dictionaries) == ["sae"] and app.dictionaries["sae"].describe()["explained"] > 0
    assert (app.limits.max_upload_bytes, app.limits.max_audit_cases) == (2**19, 7)
    assert app.uploads.max_bytes == 2**19
    capsys.readouterr()
    assert main(["serve", "--model", "tiny", "--sae", str(tmp_path), "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a dictionary folder" in err[0]
