"""Features fixtures: a tiny random Llama saved as a model directory, and a small text corpus."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, build_tiny, causal_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama-features")
    build_tiny("llama").save_pretrained(path)
    causal_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    import lmscope

    return lmscope.load(str(tiny_dir), progress=False)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """One text file of the built-in prose (a few thousand tokens)."""
    from lmscope.data import builtin_text

    root = tmp_path_factory.mktemp("features-corpus")
    (root / "doc.txt").write_text(builtin_text()[:12000])
    return root / "doc.txt"
