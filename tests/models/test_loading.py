"""Loading: built-ins, the GGUF conversion cache (keyed, atomic), and refusals of unsafe or broken files."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import lmscope
from lmscope.errors import LmscopeError
from lmscope.models import cache
from lmscope.models.loading import convert_gguf, load_directory
from lmscope.models.sources import builtin_path, resolve


def test_resolve_kinds(tmp_path):
    assert resolve("smollm2").kind == "gguf"
    assert resolve("minilm").kind == "dir"
    assert resolve("someorg/some-model").kind == "hub"
    with pytest.raises(LmscopeError, match="unknown model"):
        resolve("no-such-model")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LmscopeError, match="not a .gguf"):
        resolve(tmp_path / "x.txt")
    with pytest.raises(LmscopeError, match="no config.json"):
        resolve(tmp_path)


def test_cache_key_changes_with_content(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 1000)
    k1 = cache.file_key(f)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1, 1))
    assert cache.file_key(f) != k1


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "entry"

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # a conversion killed half-way

    with pytest.raises(KeyboardInterrupt):
        cache.atomic_dir(final, write)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(LmscopeError, match="not a readable GGUF"):
        lmscope.load(str(bad))
    truncated = tmp_path / "trunc.gguf"
    with open(builtin_path("smollm2"), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(LmscopeError, match="GGUF"):
        lmscope.load(str(truncated))
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_pickle_only_directory_is_refused(tmp_path):
    shutil.copy(builtin_path("minilm") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LmscopeError, match="pickle"):
        lmscope.load(str(tmp_path))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    src = builtin_path("minilm")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LmscopeError, match="corrupt or truncated"):
        lmscope.load(str(dst))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmscopeError, match="could not fetch"):
        lmscope.load("someorg/some-model-that-is-not-cached")


@pytest.mark.real
def test_cached_smollm2_loads_and_predicts(smollm2_dir):
    assert cache.is_complete(smollm2_dir)
    assert convert_gguf(builtin_path("smollm2")) == smollm2_dir  # second call hits the cache
    model, tok = load_directory(smollm2_dir)
    assert model.config._attn_implementation == "lmscope"
    lm = lmscope.LM(model, tok, "smollm2")
    assert (lm.n_layers, lm.n_heads, lm.n_kv_heads) == (30, 9, 3)
    assert [lm.kv_group(h) for h in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    out = lm.run("The capital of France is", capture=[])
    assert lm.tokenizer.decode(out.output[0, -1].argmax()).strip() == "Paris"


@pytest.mark.real
def test_minilm_is_an_encoder(minilm):
    assert not minilm.is_causal and minilm.n_layers == 6 and minilm.n_heads == 12
    run = minilm.run(["a cat sat", "dogs bark loudly at night"])
    assert run.tensors["blocks.5.attn.pattern"].shape[:2] == (2, 12)
    # the padded item's real queries put no weight on padding keys
    p = run.tensors["blocks.0.attn.pattern"][0]
    n = int(run.attention_mask[0].sum())
    assert torch.allclose(p[:, :n, n:], torch.zeros_like(p[:, :n, n:]))
    with pytest.raises(LmscopeError, match="longer than this model's context of 512"):
        minilm.run("word " * 600)
    assert minilm.run("word " * 600, truncate=True).input_ids.shape[1] == 512
