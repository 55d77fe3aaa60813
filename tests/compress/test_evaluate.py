"""evaluate: perplexity against HF's own loss, agreement/KL against a copy, bytes on disk, the evaluate and
compare verbs (files written atomically, bad input exits 2 with one line)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lmscope import LM
from lmscope.cli.main import main
from lmscope.compress.calibration import encoded_windows
from lmscope.compress.evaluate import evaluate, model_bytes, state_bytes
from lmscope.compress.prune import remove_heads

TEXT = " ".join(
    f"Paragraph {i}: the interpreter reads the source, tokenizes it and compiles each statement."
    for i in range(12)
)


@pytest.fixture()
def tiny_dir(make_tiny, tmp_path):
    lm = make_tiny("llama")
    d = tmp_path / "tiny"
    lm.model.save_pretrained(d, safe_serialization=True)
    lm.tokenizer.save_pretrained(d)
    return d


def test_perplexity_matches_hf_loss_and_copy_agrees(make_tiny):
    lm = make_tiny("llama")
    copy_lm = LM(copy.deepcopy(lm.model), lm.tokenizer, name="copy")
    pruned = LM(copy.deepcopy(lm.model), lm.tokenizer, name="pruned")
    remove_heads(pruned, {0: [0, 1], 1: [0, 2]})
    ev = evaluate([lm, copy_lm, pruned], text=TEXT, windows=2, window_tokens=64, decode_tokens=3, repeats=1)
    ref, same, small = ev.models
    wins = encoded_windows(lm, TEXT, 2, 64)
    losses, counts = [], []
    with torch.no_grad():
        for w in wins:
            n = w["input_ids"].shape[1] - 1
            losses.append(float(lm.model(**w, labels=w["input_ids"]).loss) * n)
            counts.append(n)
    assert ref.perplexity == pytest.approx(math.exp(sum(losses) / sum(counts)), rel=1e-5)
    assert same.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    assert same.top1_agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    assert small.kl > 0 and small.params < ref.params and small.bytes < ref.bytes
    assert ref.bytes_source == "state dict" and ref.bytes == state_bytes(lm.model)
    assert all(m.prefill_tokens_per_s and m.decode_tokens_per_s for m in ev.models)
    text = ev.to_text()
    assert "pruned" in text and "perplexity on" in text and "peak mem:" in text
    assert json.loads(ev.to_json())["models"][2]["name"] == "pruned"


def test_bytes_on_disk_come_from_the_safetensors(tiny_dir):
    import lmscope

    lm = lmscope.load(str(tiny_dir), progress=False)
    b, src = model_bytes(lm)
    assert src == "disk" and b == sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))


def test_evaluate_and_compare_verbs(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "eval"
    rc = main(
        [
            "evaluate",
            "--model",
            str(tiny_dir),
            "--model",
            str(tiny_dir),
            "--text-file",
            str(corpus),
            "--windows",
            "1",
            "--window-tokens",
            "32",
            "--no-latency",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"evaluate.json", "report.html", "evaluate.png"}
    # --no-latency: no speed/memory columns and no empty speed charts
    printed = capsys.readouterr().out
    assert "tok/s" not in printed and "peak mem" not in printed and "not measured (--no-latency)" in printed
    html = (out / "report.html").read_text()
    assert "tok/s" not in html and "prefill" not in html
    data = json.loads((out / "evaluate.json").read_text())
    assert data["models"][1]["top1_agreement"] == 1.0
    cmp = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--model",
            str(tiny_dir),
            "--against",
            str(tiny_dir),
            "--text",
            "The cat sat on the",
            "--methods",
            "saliency",
            "--out",
            str(cmp),
        ]
    )
    assert rc == 0
    data = json.loads((cmp / "compare.json").read_text())
    assert data["top1_agreement"] == 1.0 and data["attribution"]["saliency"]["spearman"] == pytest.approx(1.0)
    assert (cmp / "report.html").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--windows", "0"], "--windows 0"),
        (["evaluate", "--text-file", "/nonexistent/corpus.txt", "--no-latency"], "does not exist"),
        (
            ["compare", "--against", "x", "--text", "hi", "--methods", "nope", "--out", "OUT"],
            "unknown attribution",
        ),
        (["compare", "--against", "x", "--text", "  ", "--out", "OUT"], "text is empty"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmscope: error:") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_no_latency_figure_has_only_quality_panels(make_tiny):
    lm = make_tiny("llama")
    ev = evaluate([lm], text=TEXT, windows=1, window_tokens=32, latency=False)
    fig = ev.figure()
    assert [ax.get_title() for ax in fig.axes] == ["perplexity (x reference)", "bytes (x reference)"]
    assert ev.models[0].peak_memory_bytes is None and ev.models[0].prefill_tokens_per_s is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc counters")
def test_peak_memory_covers_the_logits(make_tiny):
    """Reference: the logits tensor of one prefill (tokens x vocab float32) must fit in the measured peak;
    the old sampler reported tens of KB for a forward whose logits alone are MBs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmscope import LM

    small = make_tiny("llama")
    vocab = max(40_000, len(small.tokenizer))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    lm = LM(LlamaForCausalLM(cfg).eval(), small.tokenizer, name="big-vocab")
    ev = evaluate(
        [lm], text=TEXT * 4, windows=1, window_tokens=64, prefill_tokens=64, decode_tokens=0, repeats=1
    )
    logits_bytes = 64 * vocab * 4
    peak = ev.models[0].peak_memory_bytes
    assert logits_bytes <= peak < 6 * logits_bytes + 64 * 2**20, (peak, logits_bytes)
