"""scan: statistics and top-k equal a brute force over the same windows; sharding, contexts, heads, dumps."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmscope.scan import Corpus, load, scan

SEQ = 24


def _documents(root) -> list[str]:
    """The small corpus's documents, read independently of lmscope's readers: sorted files, then JSONL lines."""
    docs = [p.read_text() for p in sorted((root / "docs").iterdir())]
    docs += [json.loads(line)["text"] for line in (root / "data.jsonl").read_text().splitlines()]
    return docs


def _windows(lm, docs, seq_len, max_tokens=None):
    """Brute-force windows: each document alone, [CLS]/[SEP] around bodies for BERT, chunks never crossing."""
    tok = lm.tokenizer
    prefix, suffix = ([tok.cls_token_id], [tok.sep_token_id]) if not lm.is_causal else ([], [])
    body = seq_len - len(prefix) - len(suffix)
    out, total = [], 0
    for d, text in enumerate(docs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), body):
            w = prefix + ids[s : s + body] + suffix
            if max_tokens is not None and total + len(w) > max_tokens:
                return out
            out.append((d, w))
            total += len(w)
    return out


def _site_module(lm, site):
    layer = int(site.split(".")[1])
    return lm.blocks[layer].get_submodule(lm.family.mlp_out)


def _brute_activations(lm, windows, site) -> list[np.ndarray]:
    """Per window [len, units]: the MLP hidden units from a plain pre-hook on the down projection."""
    seen = {}
    handle = _site_module(lm, site).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    out = []
    try:
        for _, w in windows:
            ids = torch.tensor([w])
            with torch.no_grad():
                lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
            out.append(seen["x"][0].double().numpy())
    finally:
        handle.remove()
    return out


def _check_against_brute_force(result, lm, windows, acts, site, k, bins=64):
    x = np.concatenate(acts)  # [tokens, units]
    st = result.stats(site)
    assert int(st["count"]) == len(x)
    np.testing.assert_allclose(st["mean"].numpy(), x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(st["var"].numpy(), x.var(0), rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(st["min"].numpy(), x.min(0).astype(np.float32))
    np.testing.assert_array_equal(st["max"].numpy(), x.max(0).astype(np.float32))
    np.testing.assert_allclose(st["frac_active"].numpy(), (x > 0).mean(0))
    top = math.log1p(1e4)
    grid = np.linspace(-top, top, bins + 1)
    np.testing.assert_allclose(st["hist_edges"].numpy(), np.sign(grid) * np.expm1(np.abs(grid)), rtol=1e-12)
    for u in range(0, x.shape[1], 7):  # bins uniform in sign(x) * log1p(|x|), end bins open
        v = x[:, u].astype(np.float32)
        b = np.clip(np.floor((np.copysign(np.log1p(np.abs(v)), v) + top) * bins / (2 * top)), 0, bins - 1)
        counts = np.bincount(b.astype(np.int64), minlength=bins)
        # float32 log1p may differ by an ulp between numpy and torch: at most one value in a neighbour bin
        assert np.abs(st["hist"][u].numpy() - counts).sum() <= 2
    win = np.concatenate([np.full(len(a), i) for i, a in enumerate(acts)])
    pos = np.concatenate([np.arange(len(a)) for a in acts])
    for u in range(x.shape[1]):
        values = x[:, u].astype(np.float32)
        order = np.lexsort((pos, win, -values))[:k]  # best first; ties: earlier window, then position
        got = result.top_contexts(site, u, k)
        assert [(c["window"], c["position"]) for c in got] == list(zip(win[order], pos[order]))
        assert [c["activation"] for c in got] == values[order].tolist()
        assert [c["doc"] for c in got] == [windows[w][0] for w in win[order]]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_stats_and_topk_equal_brute_force(family, make_tiny, small_corpus, tmp_path):
    lm = make_tiny(family)
    k, site = 6, "blocks.1.mlp.hidden"
    # one window per forward, as the brute force runs them: bitwise the same kernels
    result = scan(
        lm,
        [small_corpus / "docs", small_corpus / "data.jsonl"],
        tmp_path / "out",
        field="text",
        sites=[site],
        seq_len=SEQ,
        top_k=k,
        batch_tokens=SEQ,
        shard_tokens=100,
        report=False,
    )
    windows = _windows(lm, _documents(small_corpus), SEQ)
    assert result.info["windows"] == len(windows)
    assert result.info["tokens"] == sum(len(w) for _, w in windows)
    assert result.info["shards_done"] > 3
    for i, (_, w) in enumerate(windows):  # the stored windows are the brute-force windows
        assert result.window_ids(i) == w
    acts = _brute_activations(lm, windows, site)
    _check_against_brute_force(result, lm, windows, acts, site, k)


def test_one_shard_equals_many(tiny_llama, small_corpus, tmp_path):
    common = dict(
        field="text",
        sites=["blocks.0.mlp.hidden", "blocks.2.resid_post"],
        seq_len=32,
        top_k=8,
        batch_tokens=64,
    )
    corpus = [small_corpus / "docs", small_corpus / "data.jsonl"]
    one = scan(tiny_llama, corpus, tmp_path / "one", shard_tokens=10**6, report=False, **common)
    many = scan(tiny_llama, corpus, tmp_path / "many", shard_tokens=64, report=False, **common)
    assert one.info["shards_done"] == 1 and many.info["shards_done"] > 10
    t1, t2 = (
        load_file(tmp_path / "one" / "topk.safetensors"),
        load_file(tmp_path / "many" / "topk.safetensors"),
    )
    assert t1.keys() == t2.keys()
    for key in t1:  # top-k: identical, ties and all
        torch.testing.assert_close(t1[key], t2[key], rtol=0, atol=0, equal_nan=True)
    s1, s2 = (
        load_file(tmp_path / "one" / "stats.safetensors"),
        load_file(tmp_path / "many" / "stats.safetensors"),
    )
    for key in s1:
        if key.endswith((".mean", ".var", ".frac_active")):
            torch.testing.assert_close(s1[key], s2[key], rtol=1e-9, atol=1e-12)
        else:  # counts, min, max, histogram: exact
            torch.testing.assert_close(s1[key], s2[key], rtol=0, atol=0)


def test_top_contexts_reproduce_activation(tiny_llama, tmp_path):
    site = "blocks.1.mlp.hidden"
    result = scan(tiny_llama, "builtin", tmp_path / "out", sites=[site], seq_len=48, max_tokens=1500, top_k=3)
    ctx = result.top_contexts(site, 5, 3)
    assert len(ctx) == 3
    assert ctx[0]["activation"] >= ctx[1]["activation"] >= ctx[2]["activation"]
    for c in ctx:
        assert set(c) >= {"activation", "doc", "position", "token", "text", "input_ids"}
        assert c["input_ids"][-1] == c["token_id"] and len(c["input_ids"]) == c["position"] + 1
        assert tiny_llama.tokenizer.decode(c["input_ids"]) == c["text"]
        ids = torch.tensor([c["input_ids"]])
        seen = {}
        h = _site_module(tiny_llama, site).register_forward_pre_hook(
            lambda m, a, seen=seen: seen.update(x=a[0])
        )
        try:
            with torch.no_grad():
                tiny_llama.model(input_ids=ids)
        finally:
            h.remove()
        assert abs(float(seen["x"][0, -1, 5]) - c["activation"]) <= 1e-5 * max(1.0, abs(c["activation"]))
    # load() from disk gives the same contexts (the tokenizer comes from the model directory)
    again = load(tmp_path / "out")
    assert again.top_contexts(site, 5, 3) == ctx
    assert (tmp_path / "out" / "report.html").exists()


def test_max_tokens_and_windows_never_cross_documents(tiny_llama, small_corpus, tmp_path):
    result = scan(
        tiny_llama,
        [small_corpus / "docs"],
        tmp_path / "out",
        seq_len=16,
        max_tokens=300,
        report=False,
        top_k=2,
    )
    assert result.info["tokens"] == 300
    windows = _windows(tiny_llama, _documents(small_corpus)[:4], 16)
    seen = 0
    for i in range(result.info["windows"]):
        ids = result.window_ids(i)
        if seen + len(windows[i][1]) <= 300:
            assert ids == windows[i][1]
        else:  # the last window is cut to --max-tokens
            assert ids == windows[i][1][: 300 - seen]
        seen += len(ids)


def test_heads_equal_characterize_heads_on_same_windows(tiny_llama):
    """The per-head sums a shard keeps, divided by its query positions, equal explain.heads on those windows."""
    from lmscope.explain.heads import characterize_heads
    from lmscope.scan.shard import Settings, run_shard

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (5, 20), generator=gen)
    settings = Settings(("blocks.0.mlp.hidden",), 20, None, 2, 8, 10**6, 40, True, (), 1.0)
    part = run_shard(tiny_llama, [[(i, tuple(row.tolist())) for i, row in enumerate(ids)]], settings)
    ref = characterize_heads(tiny_llama, input_ids=ids)
    q = part["heads.queries"].double()[:, None]
    assert int(part["heads.queries"][0]) == 5 * 19
    for m in ("previous_token", "first_token", "self"):
        np.testing.assert_allclose((part[f"heads.sum.{m}"] / q).numpy(), ref.scores[m], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose((part[f"heads.hits.{m}"] / q).numpy(), ref.argmax_fraction[m], atol=1e-9)
    # mean distance and entropy computed directly from the captured pattern (itself tested against HF eager)
    from lmscope.capture.session import hooks

    with torch.no_grad(), hooks(tiny_llama, ["blocks.1.attn.pattern"]) as session:
        tiny_llama.model.base_model(input_ids=ids)
    pat = session.tensors["blocks.1.attn.pattern"][:, :, 1:].double()  # [b, h, q, k], queries 1..
    qpos = torch.arange(1, 20)[:, None]
    dist = (pat * (qpos - torch.arange(20)).abs()).sum(-1).mean(dim=(0, 2))
    ent = -(pat * pat.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(part["heads.sum.mean_distance"][1] / q[1], dist, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part["heads.sum.entropy"][1] / q[1], ent, rtol=1e-4, atol=1e-5)


def test_heads_json_has_the_heads_schema(tiny_llama, tmp_path):
    from lmscope.explain.heads import characterize_heads

    scan(tiny_llama, "builtin", tmp_path / "out", seq_len=32, max_tokens=600, heads=True, report=True)
    data = json.loads((tmp_path / "out" / "heads.json").read_text())
    reference = characterize_heads(tiny_llama, max_tokens=32, window=32).to_json()
    assert set(reference) <= set(data)
    assert set(reference["heads"][0]) <= set(data["heads"][0])
    assert {"mean_distance", "entropy"} <= set(data["heads"][0])
    for row, ref in zip(data["heads"], reference["heads"]):
        assert row["induction"] == ref["induction"]  # corpus-independent: random repeated tokens
        assert 0.0 <= row["previous_token"] <= 1.0 and row["entropy"] >= 0.0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Head atlas" in html


def test_dump_matches_activations_and_stops_at_the_limit(tiny_llama, tmp_path):
    site = "blocks.1.resid_post"
    result = scan(
        tiny_llama,
        "builtin",
        tmp_path / "out",
        sites=["blocks.0.mlp.hidden"],
        dump=[site],
        seq_len=32,
        max_tokens=400,
        shard_tokens=100,
        batch_tokens=32,
        report=False,
    )
    shards = sorted((tmp_path / "out" / "dump").iterdir())
    assert len(shards) == result.info["shards_done"]
    d = load_file(shards[1])
    assert d[site].dtype == torch.float16 and d[site].shape == (len(d["input_ids"]), tiny_llama.d_model)
    w, p = int(d["window"][3]), int(d["position"][3])
    ids = result.window_ids(w)
    assert int(d["input_ids"][3]) == ids[p]
    hs = tiny_llama.model.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(d[site][3].float(), hs[2][0, p].half().float(), rtol=2e-3, atol=2e-3)
    # a limit of two shards' worth keeps two shards and says where it stopped
    per_shard = d[site].numel() * 2
    small = scan(
        tiny_llama,
        "builtin",
        tmp_path / "small",
        sites=["blocks.0.mlp.hidden"],
        dump=[site],
        seq_len=32,
        max_tokens=400,
        shard_tokens=100,
        batch_tokens=32,
        dump_max_gb=2.5 * per_shard / 1e9,
        report=False,
    )
    assert small.info["dump"]["shards"] == 2
    assert small.info["dump"]["stopped_at_shard"] == 2
    assert len(list((tmp_path / "small" / "dump").iterdir())) == 2


def test_disk_full_while_dumping_keeps_finished_shards(tiny_llama, tmp_path, monkeypatch):
    from lmscope import LmscopeError
    from lmscope.scan import engine

    real = engine._save

    def save(path, tensors, meta=None):
        if path.parent.name == "dump" and path.name == "shard-00002.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, meta)

    monkeypatch.setattr(engine, "_save", save)
    with pytest.raises(LmscopeError, match="disk full while writing dump shard 2"):
        scan(
            tiny_llama,
            "builtin",
            tmp_path / "out",
            dump=["blocks.1.resid_post"],
            seq_len=32,
            max_tokens=400,
            shard_tokens=100,
            batch_tokens=32,
            report=False,
        )
    kept = sorted(p.name for p in (tmp_path / "out" / "dump").iterdir())
    assert kept == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    # after freeing space, --resume finishes
    monkeypatch.setattr(engine, "_save", real)
    done = scan(
        tiny_llama,
        "builtin",
        tmp_path / "out",
        dump=["blocks.1.resid_post"],
        seq_len=32,
        max_tokens=400,
        shard_tokens=100,
        batch_tokens=32,
        report=False,
        resume=True,
    )
    assert done.info["dump"]["shards"] == done.info["shards_done"]


def test_corpus_formats_and_non_utf8(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02 binary")
    (tmp_path / "e.txt").write_text("   \n")
    assert list(Corpus(tmp_path / "a.txt").documents()) == ["first document"]
    c = Corpus([tmp_path / "a.txt", tmp_path / "bad.txt", tmp_path / "bin.txt", tmp_path / "e.txt"])
    assert list(c.documents()) == ["first document"]
    assert c.skipped == {"not_utf8_or_binary": 2, "empty": 1}
    pq.write_table(pa.table({"text": ["p one", "p two"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert list(Corpus(tmp_path / "t.parquet", field="text").documents()) == ["p one", "p two"]
    # a datasets save_to_disk folder: Arrow stream files listed in state.json
    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.table({"text": ["d one", "d two", "d three"]})
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (folder / "dataset_info.json").write_text("{}")
    assert list(Corpus(folder, field="text").documents()) == ["d one", "d two", "d three"]
    fp = Corpus(folder, field="text").fingerprint()
    assert fp["sources"][0]["kind"] == "arrow" and len(fp["sources"][0]["sha256"]) == 64


def test_datasets_save_to_disk_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(Corpus(tmp_path / "ds", field="text").documents()) == ["a b", "c d"]


def test_resume_after_a_kill_before_the_first_checkpoint(tiny_llama, tmp_path):
    """A run killed after writing its first windows file but before any checkpoint: --resume starts over."""
    from lmscope import LmscopeError

    kwargs = dict(sites=["blocks.0.mlp.hidden"], seq_len=32, max_tokens=300, report=False)
    fresh = scan(tiny_llama, "builtin", tmp_path / "fresh", **kwargs)
    out = tmp_path / "out"
    (out / "windows").mkdir(parents=True)
    (out / "windows" / "shard-00000.safetensors").write_bytes(b"left by a killed run")
    with pytest.raises(LmscopeError, match="already holds a scan"):
        scan(tiny_llama, "builtin", out, **kwargs)
    resumed = scan(tiny_llama, "builtin", out, resume=True, **kwargs)
    assert resumed.info == fresh.info
    for name in ("stats.safetensors", "topk.safetensors", "windows/shard-00000.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a scan")
    with pytest.raises(LmscopeError, match="is not empty"):
        scan(tiny_llama, "builtin", other, resume=True, **kwargs)


def test_topk_ties_go_to_the_earliest_token_in_any_batching():
    """Heavy ties (repeated values, zeros, -0.0): top-k equals a lexsort oracle, for any batch split."""
    from lmscope.scan.stats import TopK, decode

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (300, 16), generator=gen).float() / 2  # few distinct values: ties everywhere
    x[50:60, 3] = -0.0
    slots = torch.arange(300) * 7  # any increasing token slots
    k = 10
    for split in (300, 64, 13, 1):
        top = TopK(16, k)
        for a in range(0, 300, split):
            top.update_values(x[a : a + split], slots[a : a + split])
        act, slot = decode(top.keys)
        for u in range(16):
            v = x[:, u].numpy() + 0.0
            order = np.lexsort((slots.numpy(), -v))[:k]
            assert slot[:, u].tolist() == slots[order].tolist(), (split, u)
            assert act[:, u].tolist() == v[order].tolist()
