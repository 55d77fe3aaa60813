"""Dictionary features on one text: ``inspect --sae`` (active features per token), ``explain --sae`` (features ×
gradient, error term as its own row), ``compare --sae`` (features a compressed model lost or distorted).

Oracles: HF's own ``hidden_states`` for the site, hand-computed encodings, central finite differences of the
target under perturbations applied by a plain PyTorch forward hook (no lmscope hook code), numpy's corrcoef.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lmscope import LM, LmscopeError
from lmscope.cli.main import main
from lmscope.features import Dictionary, DictionaryConfig
from lmscope.features.analysis import (
    active_features,
    attribute_features,
    compare_features,
    decompose,
    load_explanations,
)

TEXT = "When Mary and John went to the store, John gave a drink to"
SITE_LAYER = 1


def _dictionary(
    d_in=64, d_sae=48, k=4, site=f"blocks.{SITE_LAYER}.resid_post", seed=0, kind="topk"
) -> Dictionary:
    g = torch.Generator().manual_seed(seed)
    sae = Dictionary(
        DictionaryConfig(kind=kind, d_in=d_in, d_sae=d_sae, site=site, k=k if kind == "topk" else None)
    )
    sae.init_weights(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=g))
    return sae.eval()


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-views")
    _dictionary().save(root / "sae")
    return root / "sae"


def _hf_site(lm, ids):
    """The site straight from HF: hidden_states[L + 1] is the output of block L (not the last block)."""
    with torch.no_grad():
        out = lm.model(input_ids=ids[None], output_hidden_states=True)
    return out.hidden_states[SITE_LAYER + 1][0].float()


# -- inspect --sae ----------------------------------------------------------------------------------------
def test_active_features_match_a_hand_encoding(tiny_llama):
    sae = _dictionary()
    act = active_features(tiny_llama, sae, TEXT, top=3)
    ids = tiny_llama.encode(TEXT)["input_ids"][0]
    x = _hf_site(tiny_llama, ids)
    pre = (x[1:] - sae.b_dec) @ sae.W_enc + sae.b_enc  # SAELens's encode, written out
    assert act.per_token[0] == [] and act.l0[0] is None  # the sink is not encoded
    for p in range(1, len(ids)):
        vals, idx = pre[p - 1].detach().topk(sae.cfg.k)
        want = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0][:3]
        got = [(f["feature"], f["activation"]) for f in act.per_token[p]]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-4, abs=1e-5)
        assert act.l0[p] == int((pre[p - 1].topk(sae.cfg.k).values > 0).sum())
        err = (x[p] - sae.decode(sae.encode(x[p : p + 1]))[0]).detach()
        assert act.relative_error[p] == pytest.approx(
            float(err.norm() / (x[p] - sae.b_dec.detach()).norm()), rel=1e-3
        )
    peaks = [f["peak"] for f in act.features]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > 0


def test_decomposition_is_exact(tiny_llama):
    """site = Σ f_i W_dec[i] + b_dec + error at every encoded position, against HF's own hidden states."""
    sae = _dictionary()
    ids = tiny_llama.encode(TEXT)["input_ids"][0]
    x = _hf_site(tiny_llama, ids)[1:]
    parts = decompose(sae, x, x)
    rebuilt = parts["codes"] @ sae.W_dec + sae.b_dec + parts["error"]
    assert torch.allclose(rebuilt, x, atol=1e-5)
    assert (
        parts["error"].norm() > 0.1 * x.norm()
    )  # a random dictionary leaves much unexplained: a real error row
    assert int((parts["codes"] > 0).sum(-1).max()) <= sae.cfg.k


# -- explain --sae ----------------------------------------------------------------------------------------
def _target_under(lm, ids, delta: torch.Tensor, a: int, b: int) -> float:
    """logit(a) − logit(b) at the last position with ``delta [n, d]`` added to block SITE_LAYER's output, by a
    plain forward hook on the HF decoder layer."""

    def add(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    handle = lm.model.model.layers[SITE_LAYER].register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids[None]).logits[0, -1].double()
    finally:
        handle.remove()
    return float(logits[a] - logits[b])


@pytest.fixture(scope="module")
def tiny64(build_tiny, causal_tokenizer):
    """The tiny Llama in float64 (attention still takes its softmax in float32), for central differences."""
    return LM(build_tiny("llama").double(), causal_tokenizer, name="tiny-llama-f64")


def test_feature_attributions_equal_finite_differences(tiny64):
    lm = tiny64
    sae = _dictionary()
    res = attribute_features(lm, sae, TEXT, target=" Mary", contrast=" John", top=6)
    ids = lm.encode(TEXT)["input_ids"][0]
    a, b = res.target["token_id"], res.target["contrast_id"]
    x = _hf_site(lm, ids)
    assert res.target["value"] == pytest.approx(_target_under(lm, ids, torch.zeros_like(x), a, b), abs=1e-6)
    codes = sae.encode(x[1:])
    eps = 1e-2  # central differences: O(eps²) error; smaller steps meet the float32 softmax inside attention

    def derivative(direction: torch.Tensor) -> float:  # d/dε target(site + ε·direction) at ε = 0
        up = _target_under(lm, ids, eps * direction.double(), a, b)
        down = _target_under(lm, ids, -eps * direction.double(), a, b)
        return (up - down) / (2 * eps)

    assert len(res.features) == 6
    for f in res.features[:4]:
        i = f["feature"]
        direction = torch.zeros_like(x)
        direction[1:] = codes[:, i : i + 1] * sae.W_dec[i]  # the feature's whole decoder contribution
        assert f["attribution"] == pytest.approx(derivative(direction), rel=2e-3, abs=1e-5)
    err = torch.zeros_like(x)
    err[1:] = decompose(sae, x[1:], x[1:])["error"]
    assert res.error == pytest.approx(derivative(err), rel=2e-3, abs=1e-5)
    assert res.total == pytest.approx(derivative(x), rel=2e-3, abs=1e-5)  # Σ_p site·grad = d/dε f((1+ε)·site)
    sink = torch.zeros_like(x)
    sink[0] = x[0]
    assert res.sink == pytest.approx(derivative(sink), rel=2e-3, abs=1e-5)
    # features + error + bias + position 0 account for the whole first-order total
    assert res.rows_sum == pytest.approx(res.total, rel=1e-4, abs=1e-5)
    mags = [abs(f["attribution"]) for f in res.features]
    assert mags == sorted(mags, reverse=True)


def test_transcoder_attribution_reads_one_site_and_writes_another(tiny64):
    lm = tiny64
    sae = Dictionary(
        DictionaryConfig(
            kind="transcoder", d_in=64, d_sae=32, site="blocks.1.resid_mid", out_site="blocks.1.mlp.out"
        )
    )
    sae.init_weights(torch.Generator().manual_seed(1))
    res = attribute_features(lm, sae, TEXT, target=" Mary", top=5)
    assert res.site == "blocks.1.mlp.out"
    assert res.rows_sum == pytest.approx(res.total, rel=1e-4, abs=1e-5)
    assert res.n_active > 0 and res.features[0]["attribution"] != 0


# -- compare --sae ----------------------------------------------------------------------------------------
def test_compare_with_itself_keeps_every_feature(tiny_llama):
    sae = _dictionary()
    c = compare_features(tiny_llama, tiny_llama, sae, [TEXT, "The capital of France is Paris."])
    assert c.summary["lost"] == c.summary["distorted"] == c.summary["new"] == 0
    assert all(f["correlation"] == pytest.approx(1.0, abs=1e-6) for f in c.features)
    assert c.summary["fvu_original"] == pytest.approx(c.summary["fvu_compressed"], abs=1e-9)


def test_compare_a_pruned_model_against_numpy(make_tiny):
    from lmscope.compress.prune import remove_layers

    a = make_tiny("llama")
    b = LM(copy.deepcopy(a.model), a.tokenizer, name="pruned")
    remove_layers(b, [0])  # block 0 gone: block 1 (now b's block 0) reads another residual
    sae = _dictionary()
    texts = [TEXT, "The capital of France is Paris, and the capital of Italy is Rome."]
    c = compare_features(a, b, sae, texts, worst=100)
    fa, fb = [], []
    for t in texts:
        ids = a.encode(t)["input_ids"][0]
        fa.append(sae.encode(_hf_site(a, ids)[1:]))
        with torch.no_grad():
            hb = b.model(input_ids=ids[None], output_hidden_states=True).hidden_states
        # the original block 1 is b's block 0: hidden_states[1]
        fb.append(sae.encode(hb[SITE_LAYER][0].float()[1:]))
    fa, fb = torch.cat(fa).detach().double().numpy(), torch.cat(fb).detach().double().numpy()
    assert c.n_tokens == fa.shape[0]
    assert c.summary["active"] == int((fa > 0).any(0).sum())
    checked = 0
    for f in c.features:
        i = f["feature"]
        if f["status"] == "new":
            assert not (fa[:, i] > 0).any() and (fb[:, i] > 0).any()
        elif f["status"] == "lost":
            assert (fa[:, i] > 0).any() and not (fb[:, i] > 0).any() and f["correlation"] == 0
        else:
            want = np.corrcoef(fa[:, i], fb[:, i])[0, 1]
            assert f["correlation"] == pytest.approx(want, abs=1e-4)
            assert (f["status"] == "distorted") == (want < 0.8)
            checked += 1
    assert checked > 0
    listed = [f for f in c.features if f["status"] != "new"]
    supported = [f["tokens_original"] >= 3 for f in listed]
    assert supported == sorted(supported, reverse=True)  # well-supported features first, then one-token flips
    for group in (True, False):
        corr = [f["correlation"] for f, s in zip(listed, supported) if s == group]
        assert corr == sorted(corr)  # worst first
    changed = sum(fa[:, f["feature"]].sum() for f in listed if f["status"] in ("lost", "distorted"))
    if len(listed) == c.summary["active"]:
        assert c.summary["changed_mass_fraction"] == pytest.approx(changed / fa.sum(), rel=1e-4)
    assert c.summary["median_correlation"] < 0.99  # removing a block changes the features
    remove_layers(b, [0])  # now original block 1 itself is gone
    with pytest.raises(LmscopeError, match="removed block 1"):
        compare_features(a, b, sae, texts)


# -- explanations ----------------------------------------------------------------------------------------
def _write_explanations(folder, site, units):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "explanations.json").write_text(json.dumps({"units": [{"site": site, **u} for u in units]}))


def test_explanations_found_beside_the_dictionary_and_unscored_ones_hidden(tmp_path, tiny_llama):
    from lmscope.features import load

    _dictionary().save(tmp_path / "sae")
    site = "blocks.1.resid_post"
    units = [
        {"unit": u, "explanation": f"fires on thing {u}", "scores": {"detection": 0.8}}
        for u in range(0, 48, 2)
    ]
    units.append({"unit": 1, "explanation": "unscored", "scores": {"detection": None}})
    _write_explanations(tmp_path, site, units)  # beside sae/
    sae = load(tmp_path / "sae")
    found = load_explanations(sae)
    assert set(found) == set(range(0, 48, 2)) and found[4]["explanation"] == "fires on thing 4"
    act = active_features(tiny_llama, sae, TEXT, explanations=found)
    for feats in act.per_token:
        for f in feats:
            assert ("explanation" in f) == (f["feature"] % 2 == 0)
            assert f.get("explanation") != "unscored"
    attr = attribute_features(tiny_llama, sae, TEXT, explanations=found)
    assert attr.features and all(("explanation" in f) == (f["feature"] % 2 == 0) for f in attr.features)


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_inspect_explain_compare_with_sae(tiny_dir, sae_dir, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "--model", str(tiny_dir), "--sae", str(sae_dir), "--text", TEXT, "--no-png",
                 "--sae-top", "2", "--out", str(out)]) == 0  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert run["features"]["site"] == "blocks.1.resid_post"
    assert len(run["features"]["per_token"]) == run["n_tokens"]
    assert all(len(p) <= 2 for p in run["features"]["per_token"])
    assert "Dictionary features at blocks.1.resid_post" in (out / "report.html").read_text()

    out = tmp_path / "explain"
    assert main(["explain", "--model", str(tiny_dir), "--sae", str(sae_dir), "--text", TEXT, "--target", " Mary",
                 "--out", str(out)]) == 0  # fmt: skip
    data = json.loads((out / "features.json").read_text())
    assert data["rows_sum"] == pytest.approx(data["total"], rel=1e-4, abs=1e-4)
    assert data["target"]["token"] == " Mary" and data["features"]
    assert "error (unexplained by the dictionary)" in (out / "report.html").read_text()
    assert "error" in capsys.readouterr().err

    compressed = tmp_path / "int8"
    assert main(["compress", "--model", str(tiny_dir), "--quantize", "int8", "--out", str(compressed)]) == 0
    out = tmp_path / "compare"
    assert main(["compare", "--model", str(tiny_dir), "--against", str(compressed), "--sae", str(sae_dir),
                 "--text", TEXT, "--methods", "none", "--out", str(out)]) == 0  # fmt: skip
    data = json.loads((out / "compare.json").read_text())
    feats = data["features"]
    assert feats["summary"]["active"] > 0 and feats["worst"]
    assert 0.5 < feats["summary"]["median_correlation"] <= 1.0  # int8 keeps most features
    assert "features at blocks.1.resid_post" in capsys.readouterr().out


def _fails(capsys, argv, needle, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("verb", ["inspect", "explain", "compare"])
def test_cli_bad_dictionary_is_one_line_exit_2(verb, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = [verb, "--model", str(tiny_dir), "--text", TEXT, "--out", str(out)]
    if verb == "compare":
        base += ["--against", str(tiny_dir), "--methods", "none"]
    _dictionary(d_in=32).save(tmp_path / "wide")
    _fails(capsys, [*base, "--sae", str(tmp_path / "wide")], "32-wide", out)
    _dictionary(site="blocks.7.resid_post").save(tmp_path / "other")
    _fails(capsys, [*base, "--sae", str(tmp_path / "other")], "not a site", out)
    _fails(capsys, [*base, "--sae", str(tmp_path / "nowhere")], "not a dictionary folder", out)
    _fails(capsys, [*base, "--sae-top", "3"], "need --sae", out)
    _dictionary().save(tmp_path / "ok")
    _write_explanations(tmp_path / "feats", "blocks.2.mlp.hidden", [{"unit": 0, "explanation": "x", "scores": {"detection": 0.9}}])  # fmt: skip
    _fails(capsys, [*base, "--sae", str(tmp_path / "ok"), "--explanations", str(tmp_path / "feats")], "not the dictionary's site", out)  # fmt: skip
    _fails(capsys, [*base, "--sae", str(tmp_path / "ok"), "--sae-top", "0"], "--sae-top", out)
    if verb == "explain":
        _fails(capsys, [*base, "--sae", str(tmp_path / "ok"), "--methods", "saliency"], "--methods", out)
