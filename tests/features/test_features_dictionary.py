"""Dictionaries: a planted dictionary is recovered; training repeats under a seed; FVU and CE loss recovered equal
brute-force computations on a tiny model; the SAELens format round-trips (and SAELens itself reads it)."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope.features import (
    Dictionary,
    DictionaryConfig,
    TrainSettings,
    evaluate,
    load,
    train,
    train_dictionary,
)
from lmscope.scan import Corpus


def _planted(n=30000, d=32, m=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :k]
    codes = torch.zeros(n, m).scatter(1, idx, torch.rand(n, k, generator=g) * 2 + 0.5)
    return atoms, codes @ atoms + 0.3  # an offset the decoder bias must absorb


def test_topk_recovers_a_planted_dictionary():
    atoms, x = _planted()
    cfg = DictionaryConfig(kind="topk", d_in=32, d_sae=128, site="blocks.0.resid_post", k=3)
    settings = TrainSettings(latents=128, k=3, batch_size=256, epochs=3, lr=2e-3, dead_tokens=5000)
    sae, log = train_dictionary([(x, x)], cfg, settings)
    cosine = (atoms @ sae.W_dec.detach().T).max(dim=1).values  # best learned atom for each planted one
    assert cosine.min() >= 0.95, cosine.sort().values[:5]
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # decoder rows kept at unit norm
    assert log["log"][-1]["fvu"] < 0.1


def test_training_repeats_under_a_seed():
    _, x = _planted(n=4096)
    cfg = DictionaryConfig(kind="topk", d_in=32, d_sae=64, site="blocks.0.resid_post", k=4)

    def run(seed):
        settings = TrainSettings(latents=64, k=4, batch_size=256, seed=seed, dead_tokens=512)
        return train_dictionary([(x, x)], cfg, settings)[0].W_dec.detach()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_relu_l1_trades_reconstruction_for_sparsity():
    _, x = _planted(n=8192)
    l0, fvu = [], []
    for lam in (0.02, 0.5):
        cfg = DictionaryConfig(kind="relu", d_in=32, d_sae=64, site="blocks.0.resid_post")
        settings = TrainSettings(
            kind="relu", latents=64, batch_size=256, epochs=3, lr=2e-3, l1_coefficient=lam
        )
        sae = train_dictionary([(x, x)], cfg, settings)[0]
        f = sae.encode(x)
        l0.append(float((f > 0).sum(1).float().mean()))
        fvu.append(float((sae.decode(f).detach() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
    assert l0[1] < l0[0] and fvu[0] < fvu[1] and fvu[0] < 0.5


def _brute_force(tiny_llama, sae, corpus_path, layer, seq_len):
    """FVU and CE recovered by hand: HF forwards with plain PyTorch hooks on the decoder layer."""
    tok = tiny_llama.tokenizer
    ids = tok(open(corpus_path).read(), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    held = [w for i, w in enumerate(windows) if i % 10 == 9]
    model = tiny_llama.model
    block = model.model.layers[layer]
    err = 0.0
    ys = []
    losses = {"clean": 0.0, "zero": 0.0, "sae": 0.0}
    count = 0
    for w in held:
        x_ids = torch.tensor([w])
        for mode in ("clean", "zero", "sae"):

            def hook(mod, args, out, mode=mode):
                h = out[0] if isinstance(out, tuple) else out
                if mode == "clean":
                    ys.append(h[0, 1:].double().clone())
                    return None
                h = h.clone()
                h[:, 1:] = 0 if mode == "zero" else sae(h[:, 1:])
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = block.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    logits = model(input_ids=x_ids, use_cache=False).logits[0].double()
            finally:
                handle.remove()
            logp = logits[:-1].log_softmax(-1)
            losses[mode] -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            if mode == "clean":
                count += len(w) - 1
    y = torch.cat(ys)
    with torch.no_grad():
        err = float((sae(y.float()).double() - y).pow(2).sum())
    fvu = err / float((y - y.mean(0)).pow(2).sum())
    l_clean, l_zero, l_sae = (losses[k] / count for k in ("clean", "zero", "sae"))
    return fvu, (l_zero - l_sae) / (l_zero - l_clean), l_clean


def test_fvu_and_ce_recovered_match_brute_force(tiny_llama, text_corpus):
    site = "blocks.1.resid_post"
    sae, log = train(
        tiny_llama,
        Corpus(text_corpus),
        site,
        TrainSettings(latents=128, k=8, batch_size=128, epochs=2, dead_tokens=1000),
        tokens=3000,
        seq_len=16,
    )
    assert log["harvest"]["tokens"] > 0 and log["steps"] > 0
    m = evaluate(tiny_llama, sae, Corpus(text_corpus), tokens=10**6, seq_len=16)
    fvu, recovered, clean = _brute_force(tiny_llama, sae, text_corpus, 1, 16)
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["ce_recovered"] == pytest.approx(recovered, rel=1e-3)
    assert m["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert 0 < m["l0"] <= 8 and 0 <= m["dead_fraction"] <= 1
    assert not math.isnan(m["ce_recovered"])


def test_transcoder_writes_the_mlp_output(tiny_llama, text_corpus):
    sae, _ = train(
        tiny_llama,
        Corpus(text_corpus),
        "blocks.0.mlp.out",
        TrainSettings(kind="transcoder", latents=64, batch_size=64, epochs=6, lr=3e-3, l1_coefficient=0.05),
        tokens=3000,
        seq_len=16,
    )
    assert (
        sae.cfg.site == "blocks.0.resid_mid" and sae.cfg.out_site == "blocks.0.mlp.out" and sae.cfg.k is None
    )
    m = evaluate(tiny_llama, sae, Corpus(text_corpus), tokens=10**6, seq_len=16)
    assert m["fvu"] < 1.0 and "ce_recovered" in m


# -- SAELens format ----------------------------------------------------------------------------------
def _random(kind, d_in=16, d_sae=40, k=5):
    cfg = DictionaryConfig(
        kind=kind, d_in=d_in, d_sae=d_sae, site="blocks.2.resid_post", k=k if kind == "topk" else None
    )
    sae = Dictionary(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_saelens_format_round_trip(tmp_path, kind):
    import json

    from safetensors.torch import load_file

    sae = _random(kind)
    sae.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    state = load_file(str(tmp_path / "d" / "sae_weights.safetensors"))
    assert set(state) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert state["W_enc"].shape == (16, 40) and state["W_dec"].shape == (40, 16)
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard"}[kind]
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["d_sae"] == 40
    back = load(tmp_path / "d")
    assert back.cfg.site == "blocks.2.resid_post" and back.cfg.k == sae.cfg.k
    x = torch.randn(50, 16)
    assert torch.equal(back(x), sae(x))


def _saelens():
    return pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens)")


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_saelens_reads_ours_and_we_read_saelens(tmp_path, kind):
    sae_lens = _saelens()
    from sae_lens import SAE

    ours = _random(kind)
    ours.save(tmp_path / "ours")
    theirs = SAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-6)
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    # a dictionary SAELens built and saved itself
    if kind == "topk":
        cfg = sae_lens.TopKSAEConfig(d_in=16, d_sae=40, k=5)
        made = sae_lens.TopKSAE(cfg)
    else:
        cfg = sae_lens.StandardSAEConfig(d_in=16, d_sae=40)
        made = sae_lens.StandardSAE(cfg)
    cfg.metadata.hook_name = "blocks.3.hook_resid_pre"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in made.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    made.save_model(str(tmp_path / "theirs"))
    loaded = load(tmp_path / "theirs")
    assert loaded.cfg.site == "blocks.3.resid_pre"
    with torch.no_grad():
        assert torch.allclose(loaded(x), made(x), atol=1e-5)


def test_corrupt_or_missing_dictionary_is_one_line(tmp_path):
    from lmscope.errors import LmscopeError

    with pytest.raises(LmscopeError, match="not a dictionary folder"):
        load(tmp_path)
    _random("topk").save(tmp_path / "d")
    (tmp_path / "d" / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LmscopeError, match="corrupt"):
        load(tmp_path / "d")


def test_sparse_topk_codes_densify_to_the_dense_encoding():
    from lmscope.features.pipeline import _densify, _topk_codes

    sae = _random("topk", d_in=16, d_sae=50, k=5)
    raw = torch.randn(3, 7, 16)
    chunk = [3, 49, 0, 17, 20]
    dense = _densify(_topk_codes(sae, raw, rows=5), chunk, raw.shape[:2], 50)
    assert torch.allclose(dense, sae.encode(raw)[..., chunk].detach(), atol=1e-6)


def test_saelens_reads_our_transcoder(tmp_path):
    _saelens()
    from sae_lens import SAE

    tc = Dictionary(
        DictionaryConfig(
            kind="transcoder",
            d_in=16,
            d_sae=40,
            d_out=12,
            site="blocks.1.resid_mid",
            out_site="blocks.1.mlp.out",
        )
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tc.save(tmp_path / "tc")
    theirs = SAE.load_from_disk(str(tmp_path / "tc"))
    x = torch.randn(20, 16)
    with torch.no_grad():
        assert torch.allclose(theirs.decode(theirs.encode(x)), tc(x), atol=1e-5)
    back = load(tmp_path / "tc")
    assert back.cfg.out_site == "blocks.1.mlp.out" and back.cfg.d_out == 12 and torch.equal(back(x), tc(x))
