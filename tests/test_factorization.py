"""The mathematics of the factorization, checked against independent computations (numpy, direct products)."""
import numpy as np
import pytest
import torch

from svdllm.allocation import MatrixInfo, allocate_uniform, param_counts, uniform_rank
from svdllm.factorization import METHODS, LowRankLinear
from svdllm.factorization.whitening import cholesky_whitening


def _problem(m=48, n=32, tokens=500, seed=0, dead_channels=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    # correlated, anisotropic activations, as in real layers
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.5
    if dead_channels:
        x[:, :dead_channels] = 0
    return w, x


@pytest.mark.parametrize("rank", [1, 5, 16, 31])
def test_svd_llm_loss_is_theoretical_minimum(rank):
    w, x = _problem()
    dec = METHODS["svd-llm"].decompose(w, x.T @ x)
    w_u, w_v = dec.factors(rank, torch.float64)
    loss = torch.linalg.norm((w - w_u @ w_v) @ x.T).item()  # ‖(W − W_u W_v) X‖_F with X as columns
    # independent: numpy Cholesky of XᵀX and numpy singular values of W·S
    s_np = np.linalg.cholesky((x.T @ x).numpy())
    sv = np.linalg.svd(w.numpy() @ s_np, compute_uv=False)
    expected = float(np.sqrt(np.sum(sv[rank:] ** 2)))
    assert loss == pytest.approx(expected, rel=1e-4)
    assert dec.truncation_loss(rank) == pytest.approx(expected, rel=1e-6)


def test_svd_llm_beats_every_other_rank_r_factorization_on_its_objective():
    w, x = _problem(seed=3)
    r = 8
    wu, wv = METHODS["svd-llm"].decompose(w, x.T @ x).factors(r, torch.float64)
    best = torch.linalg.norm((w - wu @ wv) @ x.T)
    pu, pv = METHODS["svd"].decompose(w).factors(r, torch.float64)
    assert best < torch.linalg.norm((w - pu @ pv) @ x.T)


@pytest.mark.parametrize("name", ["svd", "svd-llm"])
def test_full_rank_factorization_reproduces_the_matrix(name):
    w, x = _problem(m=40, n=24)
    dec = METHODS[name].decompose(w, x.T @ x)
    w_u, w_v = dec.factors(dec.max_rank, torch.float64)
    torch.testing.assert_close(w_u @ w_v, w, rtol=1e-9, atol=1e-9)


def test_plain_svd_loss_is_weight_error():
    w, _ = _problem()
    dec = METHODS["svd"].decompose(w)
    w_u, w_v = dec.factors(10, torch.float64)
    assert torch.linalg.norm(w - w_u @ w_v).item() == pytest.approx(dec.truncation_loss(10), rel=1e-9)


def test_cholesky_fallback_on_rank_deficient_gram():
    w, x = _problem(dead_channels=3, tokens=20)  # 20 tokens < 32 channels, and 3 dead channels
    gram = x.T @ x
    assert torch.linalg.cholesky_ex(gram).info > 0
    s, jitter = cholesky_whitening(gram)
    assert jitter > 0
    torch.testing.assert_close(s @ s.T, gram + jitter * torch.eye(32, dtype=torch.float64), rtol=1e-8, atol=1e-8)
    dec = METHODS["svd-llm"].decompose(w, gram)
    w_u, w_v = dec.factors(8, torch.float64)
    assert torch.isfinite(w_u).all() and torch.isfinite(w_v).all()
    # the output error is still the minimum for the jittered objective, and tiny jitter keeps it near-optimal
    err = torch.linalg.norm((w - w_u @ w_v) @ x.T).item()
    assert err <= dec.truncation_loss(8) * (1 + 1e-3)


def test_non_finite_gram_is_refused():
    w, x = _problem()
    gram = x.T @ x
    gram[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cholesky_whitening(gram)


def test_lowrank_linear_matches_factors_with_bias():
    g = torch.Generator().manual_seed(1)
    w_u, w_v, b = torch.randn(12, 4, generator=g), torch.randn(4, 9, generator=g), torch.randn(12, generator=g)
    layer = LowRankLinear.from_factors(w_u, w_v, b)
    x = torch.randn(5, 9, generator=g)
    torch.testing.assert_close(layer(x), x @ (w_u @ w_v).T + b)
    assert layer.num_params() == 4 * (12 + 9) + 12


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_uniform_rank_and_parameter_count(ratio):
    mats = [MatrixInfo("q", 576, 576), MatrixInfo("k", 192, 576), MatrixInfo("gate", 1536, 576),
            MatrixInfo("down", 576, 1536)]
    ranks = allocate_uniform(mats, ratio)
    for m in mats:
        r = ranks[m.name]
        assert r == int((1 - ratio) * m.out_features * m.in_features // (m.out_features + m.in_features))
        # the largest rank that removes at least the fraction `ratio`
        assert r * (m.out_features + m.in_features) <= (1 - ratio) * m.dense_params
        assert (r + 1) * (m.out_features + m.in_features) > (1 - ratio) * m.dense_params
    counts = param_counts(mats, ranks)
    assert counts["achieved_ratio"] >= ratio
    assert counts["achieved_ratio"] - ratio < 0.01
