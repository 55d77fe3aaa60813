"""``lmscope features train / explain`` end to end on a tiny model, and bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from lmscope.cli.main import main


def _train_args(model, corpus, out, *extra):
    return [
        "features", "train", "--model", str(model), "--site", "blocks.1.resid_post", "--corpus", str(corpus),
        "--tokens", "2000", "--latents", "64", "--k", "4", "--batch-size", "128", "--seq-len", "32",
        "--eval-tokens", "512", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, text_corpus):
    out = tmp_path_factory.mktemp("cli") / "sae"
    assert main(_train_args(tiny_dir, text_corpus, out)) == 0
    return out


def test_train_writes_a_saelens_folder_and_metrics(trained):
    from lmscope.features import load

    assert {p.name for p in trained.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "metrics.json"}
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in (
        "l0",
        "fvu",
        "ce_recovered",
        "dead_fraction",
        "dense_fraction",
        "ce_clean",
        "ce_zero_ablation",
    ):
        assert key in metrics
    assert 0 < metrics["l0"] <= 4 and metrics["training"]["tokens"] > 0
    sae = load(trained)
    assert sae.cfg.site == "blocks.1.resid_post" and sae.cfg.k == 4 and sae.d_sae == 64


def test_explain_scores_every_shown_explanation(trained, tiny_dir, text_corpus, tmp_path):
    out = tmp_path / "feats"
    args = [
        "features",
        "explain",
        "--model",
        str(tiny_dir),
        "--sae",
        str(trained),
        "--corpus",
        str(text_corpus),
    ]
    assert main([*args, "--seq-len", "64", "--out", str(out)]) == 0
    data = json.loads((out / "explanations.json").read_text())
    assert data["units"], "no unit was explained"
    for u in data["units"]:
        assert set(u) >= {"site", "unit", "explanation", "scores", "random_baseline", "explainer"}
        assert u["scores"]["detection"] is not None and u["random_baseline"]["detection"] is not None
        assert u["explanation"].startswith("fires on")
    detections = [u["scores"]["detection"] for u in data["units"]]
    assert detections == sorted(detections, reverse=True)  # the index is sorted by score
    page = (out / "features.html").read_text()
    assert "<input id='q'" in page and data["units"][0]["explanation"].replace("'", "")[:10] in page.replace(
        "'", ""
    )
    assert "http://" not in page and "https://" not in page  # offline


def test_explain_neurons(tiny_dir, text_corpus, tmp_path):
    out = tmp_path / "n"
    code = main([
        "features", "explain", "--model", str(tiny_dir), "--neurons", "blocks.1.mlp.hidden", "--units", "0,1,2,3",
        "--corpus", str(text_corpus), "--seq-len", "64", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    data = json.loads((out / "explanations.json").read_text())
    assert data["kind"] == "neurons" and {u["unit"] for u in data["units"]} <= {0, 1, 2, 3}
    assert all("promoted" in u["logits"] for u in data["units"])


def _fails(capsys, argv, needle, out=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and needle in err, err
    if out is not None:
        assert not out.exists()


def test_bad_input_is_one_line_exit_2(capsys, tmp_path, tiny_dir, text_corpus, trained):
    from lmscope.features import Dictionary, DictionaryConfig

    out = tmp_path / "o"
    _fails(capsys, [*_train_args(tiny_dir, text_corpus, out)[:5], "blocks.9.resid_post", *_train_args(tiny_dir, text_corpus, out)[6:]], "not a site", out)  # fmt: skip
    _fails(capsys, _train_args(tiny_dir, text_corpus, out, "--batch-size", "100000"), "too few tokens", out)
    _fails(capsys, _train_args(tiny_dir, text_corpus, out, "--kind", "relu"), "--k applies to topk", out)
    wide = Dictionary(DictionaryConfig(kind="topk", d_in=32, d_sae=8, site="blocks.1.resid_post", k=2))
    wide.save(tmp_path / "wide")
    explain = [
        "features",
        "explain",
        "--model",
        str(tiny_dir),
        "--corpus",
        str(text_corpus),
        "--out",
        str(out),
    ]
    _fails(capsys, [*explain, "--sae", str(tmp_path / "wide")], "32-wide", out)
    other = Dictionary(DictionaryConfig(kind="topk", d_in=64, d_sae=8, site="blocks.7.resid_post", k=2))
    other.save(tmp_path / "other")
    _fails(capsys, [*explain, "--sae", str(tmp_path / "other")], "not a site", out)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text((trained / "cfg.json").read_text())
    (tmp_path / "broken" / "sae_weights.safetensors").write_bytes(b"\x07not safetensors")
    _fails(capsys, [*explain, "--sae", str(tmp_path / "broken")], "corrupt", out)
    _fails(
        capsys,
        [*explain, "--sae", str(trained), "--explainer", "local:/nowhere"],
        "does not exist",
        out,
    )
    _fails(
        capsys,
        [*explain, "--sae", str(trained), "--explainer", "http:http://127.0.0.1:9/v1"],
        "unreachable",
        out,
    )
    _fails(capsys, [*explain, "--neurons", "blocks.1.attn.pattern"], "not one per-token site", out)


def test_train_and_explain_from_scan_dumps(tiny_llama, text_corpus, tmp_path):
    """Activations read back from ``lmscope scan --dump`` shards train a dictionary and feed explanations."""
    from lmscope.features import TrainSettings, train
    from lmscope.features.pipeline import explain_model
    from lmscope.scan import Corpus, scan

    site = "blocks.1.resid_post"
    scan(
        tiny_llama,
        Corpus(text_corpus),
        tmp_path / "scan",
        sites=[site],
        seq_len=32,
        dump=[site],
        report=False,
    )
    sae, log = train(
        tiny_llama, None, site, TrainSettings(latents=32, k=4, batch_size=64), tokens=1500,
        scan_dir=tmp_path / "scan",
    )  # fmt: skip
    assert log["harvest"]["tokens"] == 1500 and log["steps"] > 0
    result = explain_model(tiny_llama, sae=sae, scan_dir=tmp_path / "scan", units=list(range(8)))
    assert result["kind"] == "latents" and result["tokens"] > 0
    assert all(u["scores"]["detection"] is not None for u in result["units"])
