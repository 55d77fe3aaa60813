"""The public API the README shows: reachable from ``import lmscope`` alone, imported lazily; a Run's repr
is a summary."""

from __future__ import annotations

import subprocess
import sys


def test_readme_entry_points_are_lazy_attributes():
    code = (
        "import sys, lmscope\n"
        "assert 'lmscope.compress' not in sys.modules and 'lmscope.explain' not in sys.modules\n"
        "assert callable(lmscope.compress.compress) and callable(lmscope.compress.Quantize)\n"
        "assert callable(lmscope.explain.explain)\n"
        "assert 'compress' in dir(lmscope)\n"
        "try:\n    lmscope.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "has no attribute 'nothing'" in out.stdout


def test_run_repr_is_a_summary(make_tiny):
    lm = make_tiny("llama")
    run = lm.run("The capital of France is", capture=["blocks.*.attn.pattern", "blocks.*.resid_post"])
    text = repr(run)
    assert len(text) < 600, text
    n = len(run.tokens(0))
    assert f"blocks.*.attn.pattern ×{lm.n_layers}: [1×{lm.n_heads}×{n}×{n}] float32" in text
    assert f"blocks.*.resid_post ×{lm.n_layers}: [1×{n}×{lm.d_model}]" in text
    assert "tensor(" not in text
