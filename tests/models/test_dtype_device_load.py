"""dtype and device, loading families from disk as a user would, and the load errors that name real causes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import lmscope
from lmscope import LM
from lmscope.capture.session import hooks
from lmscope.errors import LmscopeError
from lmscope.testing import tiny_model


def _save(model, tok, d):
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("mt", ["llama", "gpt2", "bert", "gemma2"])
def test_bf16_patterns_equal_hf_eager_in_bf16(mt):
    model = tiny_model(mt).to(torch.bfloat16)
    lm = LM(model, None, name=mt)
    assert lm.dtype == torch.bfloat16
    ids = torch.randint(5, 900, (2, 9), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = [f"blocks.{i}.attn.pattern" for i in range(lm.n_layers)]
    with torch.no_grad(), hooks(lm, names) as s:
        lm.forward(inputs)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    kw = {"use_cache": False} if lm.causal_attention else {}
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True, **kw).attentions
    for i, n in enumerate(names):
        assert s.tensors[n].dtype == torch.bfloat16
        torch.testing.assert_close(s.tensors[n], ref[i], atol=1e-2, rtol=1.6e-2)  # bf16: 8 mantissa bits


def test_load_with_dtype_and_bad_dtype_or_device(tmp_path, causal_tokenizer):
    d = _save(tiny_model("qwen2"), causal_tokenizer, tmp_path / "m")
    lm = lmscope.load(str(d), progress=False, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    run = lm.run("The capital of France is", capture=["blocks.0.attn.pattern"])
    assert run.tensors["blocks.0.attn.pattern"].dtype == torch.bfloat16
    with pytest.raises(LmscopeError, match="unknown dtype"):
        lmscope.load(str(d), progress=False, dtype="int3")
    with pytest.raises(LmscopeError, match="unknown device"):
        lmscope.load(str(d), progress=False, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LmscopeError, match="no CUDA GPU"):
            lmscope.load(str(d), progress=False, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_patterns_equal_cpu(tmp_path, causal_tokenizer):
    d = _save(tiny_model("llama"), causal_tokenizer, tmp_path / "m")
    cpu = lmscope.load(str(d), progress=False)
    gpu = lmscope.load(str(d), progress=False, device="cuda")
    a = cpu.run("The capital of France is", capture=["blocks.*.attn.pattern"])
    b = gpu.run("The capital of France is", capture=["blocks.*.attn.pattern"])
    for n, t in a.tensors.items():
        torch.testing.assert_close(b.tensors[n].cpu(), t, atol=1e-4, rtol=1e-4)


def test_cli_device_error_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmscope.cli.main",
            "inspect",
            "--model",
            "minilm",
            "--device",
            "cuda",
            "--text",
            "hi",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "CUDA" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mt", ["falcon", "bloom", "gemma2", "phi3", "mixtral"])
def test_families_load_from_disk(mt, tmp_path, causal_tokenizer):
    d = _save(tiny_model(mt), causal_tokenizer, tmp_path / mt)
    lm = lmscope.load(str(d), progress=False)
    assert lm.family.name == mt and lm.task == "lm"
    run = lm.run("When Mary and John went to the store", capture=["blocks.*.attn.pattern", "logits"])
    p = run.tensors["blocks.1.attn.pattern"][0]
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)


def test_classifier_loads_with_its_head(tmp_path, encoder_tokenizer):
    d = _save(tiny_model("bert", head="seq"), encoder_tokenizer, tmp_path / "clf")
    lm = lmscope.load(str(d), progress=False)
    assert lm.task == "classifier" and lm.labels == ["negative", "neutral", "positive"]
    run = lm.run("the loan was approved", capture=["blocks.0.attn.pattern"])
    assert run.output.shape == (1, 3)


def test_roberta_positions_stop_at_the_last_usable_one(encoder_tokenizer):
    lm = LM(tiny_model("roberta", max_position_embeddings=40, pad_token_id=1), encoder_tokenizer, name="rob")
    assert lm.max_positions == 40 - 1 - 1
    fits = " ".join(["word"] * (lm.max_positions - 2))  # [CLS] + words + [SEP] = max_positions
    with torch.no_grad():
        lm.run(fits, capture=["blocks.0.attn.pattern"])
    with pytest.raises(LmscopeError, match="longer than this model's context"):
        lm.run(fits + " word", capture=["blocks.0.attn.pattern"])
    run = lm.run(fits + " word word", capture=["blocks.0.attn.pattern"], truncate=True)
    assert run.input_ids.shape[1] == lm.max_positions


def test_load_errors_name_the_real_cause(tmp_path, causal_tokenizer):
    d = _save(tiny_model("llama"), causal_tokenizer, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 128  # weights no longer match the config
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmscopeError) as e:
        lmscope.load(str(d), progress=False)
    assert "corrupt" not in str(e.value)
    cfg["hidden_size"] = 64
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmscopeError, match="custom code"):
        lmscope.load(str(d), progress=False)


def test_encoder_decoder_directory_refused(tmp_path, causal_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100)
    )
    d = _save(model, causal_tokenizer, tmp_path / "t5")
    with pytest.raises(LmscopeError, match="encoder-decoder"):
        lmscope.load(str(d), progress=False)
