"""Jobs: progress, cooperative cancel, per-model queueing; and 8 concurrent clients on a live server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmscope.errors import LmscopeError
from lmscope.web.jobs import CANCELLED, DONE, ERROR, JobManager


@pytest.fixture()
def manager():
    m = JobManager(workers=4)
    yield m
    m.shutdown()


def test_progress_then_result(manager):
    seen = []

    def work(ctx):
        for i in range(3):
            ctx.progress(i / 3, f"step {i}")
            seen.append((ctx.job.progress, ctx.job.message, ctx.job.status))
        return 42

    job = manager.submit("t", "m", work)
    assert job.wait(30)
    assert (job.status, job.result, job.progress, job.error) == (DONE, 42, 1.0, None)
    assert seen == [(0.0, "step 0", "running"), (1 / 3, "step 1", "running"), (2 / 3, "step 2", "running")]


def test_cancel_stops_a_running_job_at_its_next_step(manager):
    steps, inside = [], threading.Event()
    go = threading.Event()

    def work(ctx):
        for i in range(1000):
            ctx.progress(i / 1000, f"step {i}")
            steps.append(i)
            inside.set()
            go.wait(30)  # the test cancels while the job is between steps
        return "finished"

    job = manager.submit("t", "m", work)
    assert inside.wait(30)
    manager.cancel(job.id)
    go.set()
    assert job.wait(30)
    assert job.status == CANCELLED and job.result is None
    assert steps == [0]  # cooperative: the step in flight finished, the next one never started


def test_errors_become_messages_and_the_lock_is_released(manager):
    def bad_input(ctx):
        raise LmscopeError("the text is 9000 tokens", "shorten it")

    def bug(ctx):
        raise ZeroDivisionError("oops")

    a = manager.submit("t", "m", bad_input)
    b = manager.submit("t", "m", bug)
    c = manager.submit("t", "m", lambda ctx: "after")
    assert c.wait(30) and a.wait(30) and b.wait(30)
    assert (a.status, a.error) == (ERROR, "the text is 9000 tokens — shorten it")
    assert b.status == ERROR and b.error == "internal error: ZeroDivisionError: oops"
    assert (c.status, c.result) == (DONE, "after")


def test_same_model_jobs_never_overlap_and_two_model_jobs_hold_both(manager):
    active, worst, guard = {"a": 0, "b": 0}, {"a": 0, "b": 0}, threading.Lock()

    def work_on(names):
        def work(ctx):
            with guard:
                for n in names:
                    active[n] += 1
                    worst[n] = max(worst[n], active[n])
            for i in range(20):
                ctx.progress(i / 20, "busy")
            with guard:
                for n in names:
                    active[n] -= 1
            return names

        return work

    jobs = [
        manager.submit("t", names, work_on(names)) for names in (["a"], ["b"], ["a", "b"], ["b", "a"]) * 4
    ]
    assert all(j.wait(60) for j in jobs)
    assert all(j.status == DONE for j in jobs)
    assert worst == {"a": 1, "b": 1}
    assert jobs[2].model == "a+b"


def test_finished_jobs_are_forgotten_beyond_keep():
    m = JobManager(workers=1, keep=3)
    try:
        jobs = [m.submit("t", "m", lambda ctx: 1) for _ in range(6)]
        for j in jobs:
            assert j.wait(30)
        m.submit("t", "m", lambda ctx: 1).wait(30)
        assert m.get(jobs[0].id) is None and m.get(jobs[-1].id) is not None
    finally:
        m.shutdown()


def test_eight_concurrent_clients_on_a_live_server(live_server, tiny_models, wait_job):
    import httpx

    server = live_server(tiny_models)
    texts = [f"client {i} asks about the weather" for i in range(8)]

    def one(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            model = "tiny-llama" if i % 2 == 0 else "tiny-bert"
            r = c.post("/api/jobs", json={"kind": "inspect", "model": model, "text": texts[i]})
            assert r.status_code == 202, r.text
            info = c.get("/api/info")
            assert info.status_code == 200
            return wait_job(c, r.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(one, range(8)))
    assert [j["status"] for j in jobs] == ["done"] * 8, [j.get("error") for j in jobs]
    for i, job in enumerate(jobs):  # each client got the answer to its own text
        lm = tiny_models[job["model"]]
        assert job["result"]["tokens"] == lm.token_strings(lm.encode(texts[i])["input_ids"][0])
