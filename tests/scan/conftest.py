"""Scan fixtures: a tiny random Llama saved as a model directory (so CLI subprocesses and Ray workers open it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, build_tiny, causal_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(path)
    causal_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    """The tiny Llama opened from its directory, as users open models (session-scoped: do not mutate)."""
    import lmscope

    return lmscope.load(str(tiny_dir), progress=False)


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
