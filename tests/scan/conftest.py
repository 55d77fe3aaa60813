"""Scan fixtures: a small corpus (the tiny Llama directory, for CLI subprocesses and Ray workers, is tests/conftest.py's)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A folder of text files and a JSONL file whose documents have varied lengths."""
    from lmscope.data import builtin_text

    text = builtin_text()
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    for i, (a, b) in enumerate([(0, 900), (900, 1000), (5000, 6500), (9000, 9030)]):
        (root / "docs" / f"d{i}.txt").write_text(text[a:b])
    lines = [
        f'{{"text": {__import__("json").dumps(text[20000 + 300 * i : 20000 + 300 * i + 50 * (i + 1)])}}}'
        for i in range(6)
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root
