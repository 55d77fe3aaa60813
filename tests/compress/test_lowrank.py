"""Low-rank SVD factorization: exact at full rank, the energy rule, activation-aware scaling, capture still works."""

from __future__ import annotations

import pytest
import torch

from lmscope import LmscopeError
from lmscope.compress.lowrank import LowRankLinear, choose_rank, factorize, lowrank, rebuild_lowrank

TEXT = "Lists are mutable sequences, typically used to store collections of homogeneous items."


def test_factorize_matches_truncated_svd():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    new, r, energy = factorize(lin, rank=8)
    assert isinstance(new, LowRankLinear) and r == 8 and new.rank == 8
    u, s, vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # Eckart–Young: the best rank-8 approximation
    got = (new.up.weight @ new.down.weight).double()
    torch.testing.assert_close(got, best, atol=1e-5, rtol=0)
    assert energy == pytest.approx(float(s[:8].pow(2).sum() / s.pow(2).sum()), rel=1e-6)
    x = torch.randn(5, 64)
    torch.testing.assert_close(new(x), x @ got.float().T + lin.bias, atol=1e-5, rtol=0)


def test_energy_rule_picks_smallest_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert choose_rank(s, None, 9 / 14.25) == 1
    assert choose_rank(s, None, 0.91) == 2  # 13 / 14.25 = 0.912
    assert choose_rank(s, None, 0.92) == 3
    assert choose_rank(s, None, 1.0) == 4


def test_activation_aware_is_better_on_skewed_inputs():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 32, bias=False)
    scale = torch.ones(32)
    scale[:4] = 30.0  # a few outlier channels, as in real LMs
    x = torch.randn(256, 32) * scale
    plain, _, _ = factorize(lin, rank=6)
    aware, _, _ = factorize(lin, rank=6, scale=x.pow(2).sum(0).sqrt())
    ref = lin(x)
    assert (aware(x) - ref).norm() < 0.8 * (plain(x) - ref).norm()


def test_lowrank_on_a_model_and_rebuild(make_tiny):
    lm = make_tiny("llama")
    info = lowrank(lm, rank=8, targets=["mlp.*"], calib=TEXT, activation_aware=True)
    assert info["factorized"] == 9 and info["weights_after"] < info["weights_before"]
    mod = lm.model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(mod, LowRankLinear) and lm.d_mlp_at(0) == 128
    run = lm.run(TEXT, capture=["*"])
    assert run["blocks.0.mlp.hidden"].shape[-1] == 128
    fresh = make_tiny("llama").model
    rebuild_lowrank(fresh, info)
    fresh.load_state_dict(lm.model.state_dict())
    lm2 = type(lm)(fresh, lm.tokenizer)
    torch.testing.assert_close(lm2.run(TEXT, capture=[]).output, run.output, atol=1e-6, rtol=0)


def test_full_rank_is_skipped_and_bad_targets_error(make_tiny):
    lm = make_tiny("llama")
    info = lowrank(lm, energy=1.0, targets=["q_proj"])
    assert info["factorized"] == 0 and all(v["skipped"] for v in info["layers"].values())
    with pytest.raises(LmscopeError, match="no linear layer matches"):
        lowrank(lm, rank=4, targets=["nothing_*"])
