"""``lmscope serve`` on the command line: model ids, host warning, port and model errors."""

from __future__ import annotations

import socket

import pytest

from lmscope.cli.main import main
from lmscope.cli.serve import model_ids


def test_model_ids_are_short_and_unique():
    assert model_ids(["smollm2", "minilm", "runs/small/", "other/small", "q.gguf"]) == [
        "smollm2",
        "minilm",
        "small",
        "small-2",
        "q",
    ]


@pytest.fixture()
def fake_serve(monkeypatch, tiny_models):
    """Replace model loading and uvicorn: what would be served, and where."""
    import uvicorn

    import lmscope.cli.serve as serve

    calls = {}
    monkeypatch.setattr(
        serve, "load_model", lambda spec: tiny_models["tiny-llama" if "llama" in spec else "tiny-bert"]
    )
    monkeypatch.setattr(
        uvicorn, "run", lambda app, host, port, **kw: calls.update(app=app, host=host, port=port)
    )
    return calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_binds_localhost_by_default_and_registers_each_model(fake_serve, capsys):
    port = _free_port()
    assert main(["serve", "--model", "x/llama", "--model", "y/bert/", "--port", str(port)]) == 0
    assert (fake_serve["host"], fake_serve["port"]) == ("127.0.0.1", port)
    assert list(fake_serve["app"].state.lmscope.models) == ["llama", "bert"]
    assert fake_serve["app"].state.lmscope.allowed_hosts == ["127.0.0.1", "localhost"]
    err = capsys.readouterr().err
    assert "warning" not in err and f"open http://127.0.0.1:{port}" in err


def test_serve_warns_when_exposed(fake_serve, capsys):
    assert main(["serve", "--model", "llama", "--host", "0.0.0.0", "--port", str(_free_port())]) == 0
    err = capsys.readouterr().err
    assert "lmscope: warning: listening on 0.0.0.0" in err and "no login" in err


def test_serve_port_in_use_is_one_line_error(fake_serve, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--model", "llama", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmscope: error: cannot listen on 127.0.0.1:{port}")
    assert "app" not in fake_serve


def test_serve_bad_port_and_missing_model(capsys, tmp_path):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port 70000 is not a port number" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nothing-here"), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmscope: error:")
