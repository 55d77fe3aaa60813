"""Features fixtures: a small text corpus (the tiny Llama and its directory come from tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """One text file of the built-in prose (a few thousand tokens)."""
    from lmscope.data import builtin_text

    root = tmp_path_factory.mktemp("features-corpus")
    (root / "doc.txt").write_text(builtin_text()[:12000])
    return root / "doc.txt"
