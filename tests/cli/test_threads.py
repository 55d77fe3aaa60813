"""The default thread count: the CPUs this process may use minus the processes running now."""

from __future__ import annotations

import os

from lmscope.cli import speed


def test_others_running_reads_the_runnable_count_without_this_process(tmp_path):
    f = tmp_path / "loadavg"
    f.write_text(
        "1.95 1.20 0.80 3/412 12345\n"
    )  # 1-minute average 1.95, but 3 runnable now (this one included)
    assert speed.others_running(samples=3, path=str(f)) == 2.0
    f.write_text("1.95 1.20 0.80 1/412 12345\n")  # only this process runs: the lagging average is ignored
    assert speed.others_running(samples=3, path=str(f)) == 0.0


def test_falls_back_to_the_load_average_without_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert speed.others_running(path=str(tmp_path / "missing")) == 1.5


def test_choose_threads_subtracts_what_runs_and_keeps_at_least_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for running, want in ((0.0, 4), (1.0, 3), (3.0, 1), (9.0, 1)):
        monkeypatch.setattr(speed, "others_running", lambda running=running: running)
        assert speed.choose_threads() == want
    assert speed.choose_threads(2) == 2  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert speed.choose_threads() == 3
