"""Save -> load gives the same logits; checksums catch corruption; plain transformers loads what it can."""

from __future__ import annotations

import json

import pytest
import torch

import lmscope
from lmscope.compress.apply import compress
from lmscope.compress.recipe import PruneLayers, Quantize, Recipe
from lmscope.compress.storage import MANIFEST_FILE, RECIPE_FILE, WEIGHTS_FILE
from lmscope.errors import LmscopeError

TEXT = "Every object has an identity, a type and a value; the identity never changes once created."
CALIB = " ".join(["A class definition defines a class object; its suite runs in a new frame."] * 40)


def _logits(lm, text=TEXT):
    with torch.no_grad():
        return lm.forward(lm.encode(text)).logits


@pytest.mark.parametrize(
    "step",
    [
        Quantize("int8"),
        Quantize("int4", group_size=32),
        Quantize("int4m", group_size=32, embedding="int4m-g32"),
        Quantize("w8a8-smooth"),
    ],
    ids=lambda s: s.scheme,
)
def test_save_load_gives_equal_logits_tiny(make_tiny, tmp_path, step):
    result = compress(make_tiny("llama"), step, CALIB)
    out = result.save(tmp_path / "small")
    names = {p.name for p in out.iterdir()}
    assert {WEIGHTS_FILE, "config.json", RECIPE_FILE, MANIFEST_FILE, "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    loaded = lmscope.load(str(out), progress=False)
    assert torch.equal(_logits(loaded), _logits(result.lm))
    # the layer one lmscope view needs still works on the reloaded model
    run = loaded.run(TEXT, capture=["blocks.1.attn.pattern"])
    assert run["blocks.1.attn.pattern"].shape[1] == loaded.n_heads
    record = json.loads((out / RECIPE_FILE).read_text())
    assert record["loads_in_transformers"] is False
    assert Recipe.from_dict(record["recipe"]) == Recipe((step,))


def test_int4_is_packed_two_per_byte_on_disk(make_tiny, tmp_path):
    from safetensors import safe_open

    out = compress(make_tiny("llama"), Quantize("int4", group_size=32), CALIB).save(tmp_path / "q4")
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.up_proj.qweight")
        keys = list(f.keys())
    assert q.dtype == torch.uint8 and q.shape == (128, 32)  # [out, in / 2]
    assert "lm_head.weight" not in keys and "model.embed_tokens.qweight" in keys  # tied: stored once


def test_corrupted_or_missing_file_is_a_clear_error(make_tiny, tmp_path):
    out = compress(make_tiny("llama"), Quantize("int8"), CALIB).save(tmp_path / "m")
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(LmscopeError, match="model.safetensors' in .* is corrupted"):
        lmscope.load(str(out), progress=False)
    (out / "config.json").unlink()
    with pytest.raises(LmscopeError, match="missing"):
        lmscope.load(str(out), progress=False)


def test_whole_layer_pruning_also_loads_in_plain_transformers(make_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    result = compress(make_tiny("llama"), PruneLayers((1,)), CALIB)
    out = result.save(tmp_path / "pruned")
    assert json.loads((out / RECIPE_FILE).read_text())["loads_in_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = result.lm.encode(TEXT)
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, _logits(result.lm), atol=1e-5)
    assert torch.equal(_logits(lmscope.load(str(out), progress=False)), _logits(result.lm))


@pytest.mark.real
def test_save_load_smollm2_int8(smollm2, tmp_path):
    result = compress(smollm2, Quantize("int8"))
    out = result.save(tmp_path / "small")
    loaded = lmscope.load(str(out), progress=False)
    text = "The capital of France is Paris, and the capital of Italy is"
    assert torch.equal(_logits(loaded, text), _logits(result.lm, text))
    size = (out / WEIGHTS_FILE).stat().st_size
    assert size < 0.3 * 4 * smollm2.n_params()  # int8 linears + int8 tied embedding
