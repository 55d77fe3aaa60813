"""The CLI starts transformers without torchao / scipy (lmscope.models.lean), and the model still works;
a library user who imports lmscope gets transformers unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys
import torch
from lmscope.models.lean import lean_transformers
lean_transformers()  # what the CLI does first
import lmscope.lm
from lmscope.testing import tiny_model
model = tiny_model("llama")
out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
assert torch.isfinite(out).all()
print("torchao" in sys.modules, "scipy" in sys.modules)
"""


def _run(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "src")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_transformers_starts_without_torchao_and_scipy_unless_asked():
    assert _run({"LMSCOPE_FULL_TRANSFORMERS": "0"}) == "False False"
    assert _run({"LMSCOPE_FULL_TRANSFORMERS": "1"}) == "True True"  # the hidden packages are installed here


def test_importing_lmscope_leaves_transformers_alone():
    script = SCRIPT.replace("lean_transformers()  # what the CLI does first", "")
    env = {**os.environ, "LMSCOPE_FULL_TRANSFORMERS": "0"}
    env["PYTHONPATH"] = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "True True"
