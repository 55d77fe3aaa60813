"""Fixtures for the web tests: the app on tiny models (TestClient) and a live uvicorn on a free port."""

from __future__ import annotations

import copy
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from lmscope.cli.main import main


def _wait_job(client, job_id: str, limit: int = 600) -> dict:
    """Poll a job until it finishes (long-poll; bounded by a number of polls, not by a clock)."""
    for _ in range(limit):
        job = client.get(f"/api/jobs/{job_id}", params={"wait": 1}).json()
        if job["status"] in ("done", "error", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} never finished: {job}")


@pytest.fixture()
def wait_job():
    """``wait_job(client, job_id)`` -> the finished job's JSON (works with TestClient and httpx.Client)."""
    return _wait_job


def _root_conftest(config):
    """tests/conftest.py as loaded by pytest (it builds the tiny models; reused, not copied)."""
    root = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "").resolve() == root:
            return plugin
    raise RuntimeError("tests/conftest.py is not loaded")


@pytest.fixture(scope="module")
def tiny_models(request, causal_tokenizer, encoder_tokenizer):
    """Tiny random llama (causal, GQA) and bert (encoder), and the llama with one head's queries changed
    (stands in for a compressed copy); shared by a module's tests: do not mutate."""
    from lmscope import LM

    tiny = _root_conftest(request.config)._tiny
    llama = LM(tiny("llama"), causal_tokenizer, name="tiny-llama")
    changed = copy.deepcopy(llama.model)  # "compressed": layer 1, head 2 attends differently
    q = changed.get_submodule(llama.family.blocks)[1].self_attn.q_proj.weight
    with torch.no_grad():
        q[2 * llama.head_dim : 3 * llama.head_dim].mul_(-3.0)
    return {
        "tiny-llama": llama,
        "tiny-bert": LM(tiny("bert"), encoder_tokenizer, name="tiny-bert"),
        "tiny-changed": LM(changed, causal_tokenizer, name="tiny-changed"),
    }


@pytest.fixture(scope="module")
def client(tiny_models):
    """A TestClient on an app serving the tiny models (one per module; tests change limits with monkeypatch)."""
    from fastapi.testclient import TestClient

    from lmscope.web.server import create_app

    with TestClient(create_app(tiny_models)) as client:
        yield client


@pytest.fixture()
def limits(client, monkeypatch):
    """The module client's limits, restored after the test: ``limits.max_chars = 10``."""
    from lmscope.web.server import Limits

    current = Limits(**vars(client.app.state.lmscope.limits))
    monkeypatch.setattr(client.app.state.lmscope, "limits", current)
    return current


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves this very socket
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture()
def live_server():
    """``live_server(models, limits=None, dictionaries=None)`` -> a LiveServer on 127.0.0.1 (stopped after
    the test)."""
    from lmscope.web.server import create_app

    servers = []

    def start(models, limits=None, dictionaries=None):
        s = LiveServer(create_app(models, limits, dictionaries=dictionaries))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


FEATURES_SITE = "blocks.1.resid_post"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, encoder_tokenizer, causal_tokenizer, build_tiny):
    """A tiny 2-class BERT classifier (deny / approve) and a tiny llama, saved as model folders."""
    from lmscope.testing import tiny_model

    clf = tmp_path_factory.mktemp("clf")
    model = tiny_model(
        "bert",
        head="seq",
        num_labels=2,
        id2label={0: "deny", 1: "approve"},
        label2id={"deny": 0, "approve": 1},
    )
    model.save_pretrained(clf)
    encoder_tokenizer.save_pretrained(clf)
    causal = tmp_path_factory.mktemp("causal")
    build_tiny("llama").save_pretrained(causal)
    causal_tokenizer.save_pretrained(causal)
    return {"clf": str(clf), "causal": str(causal)}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, build_tiny, causal_tokenizer):
    """(model dir, dictionary dir, explanations dir): the CLI's own train and explain on a tiny llama."""
    from lmscope.data import builtin_text

    root = tmp_path_factory.mktemp("feat")
    model_dir = root / "tiny"
    build_tiny("llama").save_pretrained(model_dir)
    causal_tokenizer.save_pretrained(model_dir)
    (root / "doc.txt").write_text(builtin_text()[:12000])
    train = ["features", "train", "--model", str(model_dir), "--site", FEATURES_SITE, "--corpus", str(root / "doc.txt"),
             "--tokens", "2000", "--latents", "64", "--k", "4", "--batch-size", "128", "--seq-len", "32",
             "--eval-tokens", "512", "--out", str(root / "sae")]  # fmt: skip
    assert main(train) == 0
    explain = ["features", "explain", "--model", str(model_dir), "--sae", str(root / "sae"), "--units",
               ",".join(map(str, range(0, 64, 2))), "--corpus", str(root / "doc.txt"), "--seq-len", "64",
               "--out", str(root / "feats")]  # fmt: skip
    assert main(explain) == 0
    return model_dir, root / "sae", root / "feats"
