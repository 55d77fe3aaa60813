"""The serve Audit tab through the API: an uploaded dataset audited as a job gives what ``lmscope audit`` gives on
the same file; uploads are size-limited, written only inside their temporary folder, and that folder is gone
when the job ends; bad input is one line naming the uploaded file."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os

import pytest

from lmscope.cli.main import main

ROWS = [
    {"id": "a1", "text": "He has a high income and he asks for a loan", "label": "approve", "group": "m"},
    {"id": "a2", "text": "She has a low income; her loan is large", "label": "deny", "group": "f"},
    {"id": "a3", "text": "Mary's income is high and she owns a house", "label": "approve", "group": "f"},
    {"id": "a4", "text": "John has debts and no savings", "label": "deny", "group": "m"},
]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
OPTIONS = {"label_field": "label", "group_field": "group", "builtin": ["gender", "names"], "sanity": False}


@pytest.fixture(scope="module")
def uploads_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def app_client(model_dirs, uploads_dir):
    """The app serving the saved tiny classifier and tiny causal LM, uploads under ``uploads_dir``."""
    from fastapi.testclient import TestClient

    import lmscope
    from lmscope.web.server import Limits, create_app

    models = {k: lmscope.load(v, progress=False) for k, v in model_dirs.items()}
    limits = Limits(max_upload_bytes=4096, max_audit_cases=50)
    with TestClient(create_app(models, limits, upload_dir=str(uploads_dir))) as client:
        yield client


def upload(client, name: str, body: bytes):
    return client.post(
        "/api/uploads",
        params={"name": name},
        content=body,
        headers={"Content-Type": "application/octet-stream"},
    )


def start_audit(client, body: bytes = JSONL, name: str = "cases.jsonl", swaps=None, **options):
    r = upload(client, name, body)
    assert r.status_code == 201, r.text
    req = {"kind": "audit", "model": options.pop("model", "clf"), "data": r.json()["id"], **options}
    if swaps is not None:
        s = upload(client, "swaps.json", swaps)
        assert s.status_code == 201, s.text
        req["swaps"] = s.json()["id"]
    return client.post("/api/jobs", json=req)


def test_an_audit_job_gives_what_the_cli_writes_on_the_same_file(
    app_client, model_dirs, uploads_dir, tmp_path, wait_job, capsys
):
    r = start_audit(app_client, **OPTIONS)
    assert r.status_code == 202, r.text
    job = wait_job(app_client, r.json()["id"])
    assert job["status"] == "done", job
    assert list(job["downloads"]) == ["report.html", "audit.json", "cases.csv"]
    assert list(uploads_dir.iterdir()) == []  # the upload's temporary folder is gone

    data = tmp_path / "cases.jsonl"
    data.write_bytes(JSONL)
    out = tmp_path / "out"
    args = ["audit", "--model", model_dirs["clf"], "--data", str(data), "--label-field", "label"]
    args += ["--group-field", "group", "--counterfactuals", "builtin:gender,names", "--no-sanity"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    cli = json.loads((out / "audit.json").read_text())
    web = json.loads(app_client.get(job["downloads"]["audit.json"]).text)
    assert web["data"]["path"] == "cases.jsonl" and cli["data"]["path"] == str(data)
    assert web["data"]["fingerprint"]["sources"][0]["path"] == "cases.jsonl"
    for d in (cli, web):
        d.pop("seconds")
        d["data"].pop("path")
        d["data"]["fingerprint"]["sources"][0].pop("path")
    assert web == cli  # every case, probability, attribution, metric and finding
    assert web["invariance"][0]["n_cases"] > 0 and web["cases"][0]["explanation"]["units"]
    csv_web = app_client.get(job["downloads"]["cases.csv"])
    assert csv_web.headers["content-disposition"] == 'attachment; filename="cases.csv"'
    assert csv_web.content == (out / "cases.csv").read_bytes()
    assert len(list(csv.reader(io.StringIO(csv_web.text)))) == 1 + 4 + sum(
        len(c["counterfactuals"]) for c in web["cases"]
    )

    # the page's view has the report's sections; report.html is the audit report (offline)
    html = app_client.get(job["downloads"]["report.html"]).text
    titles = [s["title"] for s in job["result"]["report"]["sections"]]
    assert titles[:2] == ["Findings", "Dataset summary"] and "Confusion matrix" in titles
    for title in titles:
        assert title in html
    assert "4 cases from cases.jsonl" in html and str(uploads_dir) not in html


def test_a_causal_lm_with_prompt_and_choices(app_client, wait_job):
    r = start_audit(
        app_client,
        model="causal",
        label_field="label",
        prompt="Application: {text}\nDecision:",
        choices=[" approve", " deny"],
        builtin=["gender"],
        explain=False,
    )
    assert r.status_code == 202, r.text
    job = wait_job(app_client, r.json()["id"])
    assert job["status"] == "done", job
    audit = json.loads(app_client.get(job["downloads"]["audit.json"]).text)
    assert audit["decider"]["classes"] == [" approve", " deny"] and audit["data"]["n_cases"] == 4
    assert all(abs(sum(c["probabilities"].values()) - 1) < 1e-4 for c in audit["cases"])


def test_csv_and_parquet_uploads(app_client, wait_job):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(ROWS[0]))
    w.writeheader()
    w.writerows(ROWS)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    results = []
    for name, body in (("c.csv", text.getvalue().encode()), ("c.parquet", buf.getvalue())):
        r = start_audit(app_client, body=body, name=name, label_field="label", explain=False)
        assert r.status_code == 202, r.text
        job = wait_job(app_client, r.json()["id"])
        assert job["status"] == "done", job
        results.append(json.loads(app_client.get(job["downloads"]["audit.json"]).text)["cases"])
    assert [c["probabilities"] for c in results[0]] == [c["probabilities"] for c in results[1]]


def test_uploads_over_the_limit_are_refused_and_leave_nothing(app_client, uploads_dir):
    big = JSONL * 40  # > 4096 bytes
    r = upload(app_client, "cases.jsonl", big)  # Content-Length says so: refused before reading
    assert r.status_code == 413
    assert r.json()["error"] == (
        "the file is over this server's upload limit of 4096 bytes; upload a smaller file "
        "(or start lmscope serve with a larger --max-upload-mb)"
    )

    def chunks():  # no Content-Length: the limit holds while the body streams
        for _ in range(40):
            yield JSONL

    r = app_client.post(
        "/api/uploads",
        params={"name": "cases.jsonl"},
        content=chunks(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 413 and "upload limit of 4096 bytes" in r.json()["error"]
    assert list(uploads_dir.iterdir()) == []
    r = app_client.post("/api/uploads", params={"name": "c.jsonl"}, content=JSONL)  # not octet-stream
    assert r.status_code == 415
    assert upload(app_client, "cases.txt", JSONL).json()["error"].startswith("cannot tell the format")
    assert upload(app_client, "cases.jsonl", b"").json()["error"].startswith("'cases.jsonl' is empty")
    assert list(uploads_dir.iterdir()) == []


SWAPS_BAD = b"{oops"


@pytest.mark.parametrize(
    "rows,options,message",
    [
        (
            ROWS,
            {"text_field": "body"},
            "^cases.jsonl line 1 has no field 'body' \\(it has: id, text, label, group\\)",
        ),
        (ROWS, {"label_field": "outcome"}, "cases.jsonl line 1 has no field 'outcome'"),
        ([{"text": "fine", "label": "maybe"}], {"label_field": "label"}, "line 1: label 'maybe' is not one"),
        (None, {}, "cases.jsonl holds no cases|'cases.jsonl' holds no cases"),
        (ROWS, {"model": "causal", "prompt": "Decision:", "choices": [" a", " b"]}, r"\{text\} exactly once"),
        (
            ROWS,
            {"model": "causal", "prompt": "{text}", "choices": [" a", " a"]},
            "choices ' a' and ' a' are the same",
        ),
        (ROWS, {"model": "causal"}, "not a sequence classifier"),
        (ROWS, {"prompt": "{text}", "choices": [" a", " b"]}, "need a causal language model"),
        (ROWS, {"builtin": ["race"]}, "no built-in swap list 'race'"),
        (ROWS, {"swaps": SWAPS_BAD}, "^swap file 'swaps.json' is not valid JSON"),
        (ROWS, {"methods": ["nope"]}, "unknown attribution method 'nope'"),
        (ROWS, {"positive": "maybe"}, "'positive': label 'maybe' is not one of the classifier's classes"),
        (ROWS, {"max_cases": 51}, "'max_cases' is 51, it must be between 1 and 50"),
        (ROWS * 13, {}, "cases.jsonl holds 52 cases, over this server's limit of 50 per audit"),
    ],
)
def test_bad_input_is_one_line_naming_the_uploaded_file(app_client, uploads_dir, rows, options, message):
    import re

    body = b"\n\n" if rows is None else "".join(json.dumps(r) + "\n" for r in rows).encode()
    if len(body) > 4096:
        body = body[: body.rindex(b"\n", 0, 4096) + 1]
        if rows and len(rows) > 4:  # keep the test about the case limit: short records
            body = "".join(json.dumps({"text": "x"}) + "\n" for _ in rows).encode()
    options = dict(options)
    r = start_audit(app_client, body=body, **options)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "\n" not in error and "Traceback" not in error and str(uploads_dir) not in error
    assert "--" not in error, error  # the tab's own words, not the CLI's flags
    assert re.search(message, error), error
    assert list(uploads_dir.iterdir()) == []  # a refused request removes its uploads at once


def test_an_upload_is_used_once_and_a_missing_one_is_named(app_client, uploads_dir):
    r = upload(app_client, "cases.jsonl", JSONL)
    req = {"kind": "audit", "model": "clf", "data": r.json()["id"], "text_field": "nope"}
    assert app_client.post("/api/jobs", json=req).status_code == 422
    again = app_client.post("/api/jobs", json={**req, "text_field": "text"})
    assert again.status_code == 422 and "the dataset upload is gone" in again.json()["error"]
    r = app_client.post("/api/jobs", json={"kind": "audit", "model": "clf"})
    assert r.status_code == 422 and r.json()["error"].startswith("no dataset")
    r = start_audit(app_client, model="nope")  # any refusal removes the uploads it names
    assert r.status_code == 422 and r.json()["error"].startswith("unknown model 'nope'")
    assert list(uploads_dir.iterdir()) == []


def test_nothing_is_written_outside_the_upload_folder(
    app_client, uploads_dir, wait_job, monkeypatch, tmp_path
):
    """Every file the upload and the job open for writing lies inside the upload's temporary folder."""
    real_open = builtins.open
    written = []

    def spy(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int):
            written.append(os.path.realpath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "open", spy)
    r = start_audit(app_client, **OPTIONS)
    job = wait_job(app_client, r.json()["id"])
    monkeypatch.setattr(builtins, "open", real_open)
    assert job["status"] == "done", job
    root = os.path.realpath(uploads_dir)
    assert written, "the spy saw no write"
    folders = {os.path.relpath(p, root).split(os.sep)[0] for p in written}
    assert all(p.startswith(root + os.sep) for p in written), written
    assert len(folders) == 1 and next(iter(folders)).startswith("lmscope-upload-")
    names = {os.path.basename(p) for p in written}
    assert {"cases.jsonl", "audit.json", "cases.csv", "report.html"} <= names
    assert list(uploads_dir.iterdir()) == [] and list(tmp_path.iterdir()) == []


def test_a_job_cancelled_while_queued_removes_its_upload(app_client, uploads_dir, wait_job):
    import threading

    app = app_client.app.state.lmscope
    gate = threading.Event()
    blocker = app.jobs.submit("hold", "clf", lambda ctx: gate.wait(30))  # the model is busy
    try:
        r = start_audit(app_client, **OPTIONS)
        assert r.status_code == 202
        assert len(list(uploads_dir.iterdir())) == 1  # queued: its upload waits for it
        app_client.delete(f"/api/jobs/{r.json()['id']}")
    finally:
        gate.set()
    assert wait_job(app_client, r.json()["id"])["status"] == "cancelled"
    blocker.wait(30)
    assert list(uploads_dir.iterdir()) == []


def test_unclaimed_uploads_expire_and_are_capped(app_client, uploads_dir, monkeypatch):
    uploads = app_client.app.state.lmscope.uploads
    first = upload(app_client, "a.jsonl", JSONL).json()
    monkeypatch.setattr(uploads, "ttl", 0.0)  # the next upload sweeps every unclaimed one
    second = upload(app_client, "b.jsonl", JSONL).json()
    assert [p.name for p in uploads_dir.iterdir()] == [uploads._items[second["id"]].folder.name]
    monkeypatch.setattr(uploads, "ttl", 900.0)
    monkeypatch.setattr(uploads, "max_pending", 2)  # at most 2 waiting: the oldest goes
    third = upload(app_client, "c.jsonl", JSONL).json()
    fourth = upload(app_client, "d.jsonl", JSONL).json()
    assert set(uploads._items) == {third["id"], fourth["id"]} and len(list(uploads_dir.iterdir())) == 2
    r = app_client.post("/api/jobs", json={"kind": "audit", "model": "clf", "data": first["id"]})
    assert r.status_code == 422 and "the dataset upload is gone" in r.json()["error"]
    uploads.remove_all()
    assert list(uploads_dir.iterdir()) == []


def test_cancelling_a_running_audit_stops_it_and_removes_its_upload(app_client, uploads_dir, wait_job):
    body = "".join(json.dumps(dict(r, id=f"{r['id']}-{k}")) + "\n" for k in range(8) for r in ROWS).encode()
    assert len(body) < 4096  # 32 cases: two batches of 16
    r = start_audit(app_client, body=body, **OPTIONS)
    job_id = r.json()["id"]
    for _ in range(600):  # until the first batch is reported (explaining 16 cases takes a while)
        job = app_client.get(f"/api/jobs/{job_id}", params={"wait": 0.2}).json()
        if "cases/s" in job["message"] or job["status"] != "running" and job["status"] != "queued":
            break
    assert job["status"] == "running" and job["message"].startswith("16/32 cases"), job
    app_client.delete(f"/api/jobs/{job_id}")
    assert wait_job(app_client, job_id)["status"] == "cancelled"
    assert list(uploads_dir.iterdir()) == []
    assert app_client.get(f"/api/jobs/{job_id}/files/audit.json").status_code == 409
