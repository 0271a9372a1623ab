"""The mathematics of the factorization, checked against independent computations (numpy, direct products)."""
import numpy as np
import pytest
import torch

from svdllm.allocation import MatrixInfo, allocate_uniform, param_counts
from svdllm.calibration import LinearStats
from svdllm.factorization import ASVD, METHODS, LowRankLinear
from svdllm.factorization.whitening import cholesky_whitening


def _stats(x, w=None):
    # Fisher rows for fwsvd and an output-gradient Gram for kfac-svd: any positive (definite) ones serve the
    # identities tested here
    rows = None if w is None else torch.linspace(0.5, 2.0, w.shape[0], dtype=torch.float64)
    out_gram = None
    if w is not None:
        g = torch.randn(3 * w.shape[0], w.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out_gram = g.T @ g
    return LinearStats(x.T @ x, x.abs().sum(0), x.shape[0], fisher_rows=rows, output_gram=out_gram)


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
    dec = METHODS["svd-llm"].decompose(w, _stats(x))
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
    wu, wv = METHODS["svd-llm"].decompose(w, _stats(x)).factors(r, torch.float64)
    best = torch.linalg.norm((w - wu @ wv) @ x.T)
    pu, pv = METHODS["svd"].decompose(w).factors(r, torch.float64)
    assert best < torch.linalg.norm((w - pu @ pv) @ x.T)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_full_rank_factorization_reproduces_the_matrix(name):
    w, x = _problem(m=40, n=24)
    dec = METHODS[name].decompose(w, _stats(x, w))
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
    dec = METHODS["svd-llm"].decompose(w, _stats(x))
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


@pytest.mark.parametrize("rank", [3, 12, 30])
def test_svd_llm_v2_reaches_the_same_minimum_as_svd_llm(rank):
    w, x = _problem(seed=5)
    a = METHODS["svd-llm"].decompose(w, _stats(x))
    b = METHODS["svd-llm-v2"].decompose(w, _stats(x))
    torch.testing.assert_close(a.s, b.s, rtol=1e-8, atol=1e-8)
    for dec in (a, b):
        w_u, w_v = dec.factors(rank, torch.float64)
        assert torch.linalg.norm((w - w_u @ w_v) @ x.T).item() == pytest.approx(a.truncation_loss(rank), rel=1e-6)


def test_svd_llm_v2_succeeds_where_cholesky_fails():
    w, x = _problem(tokens=20, dead_channels=4)  # 20 tokens: XᵀX has rank ≤ 20 < 32
    assert torch.linalg.cholesky_ex(x.T @ x).info > 0
    dec = METHODS["svd-llm-v2"].decompose(w, _stats(x))
    assert dec.info["null_directions"] >= 32 - 20
    # the loss identity holds exactly for the true (singular) Gram: independent numpy reference via the
    # whitened matrix W·U_x·Σ_x from an SVD of X itself
    _, sx, vxt = np.linalg.svd(x.numpy(), full_matrices=False)
    keep = sx > 1e-10 * sx[0]
    ref = np.linalg.svd(w.numpy() @ vxt[keep].T * sx[keep], compute_uv=False)
    for rank in (2, 8, 15):
        w_u, w_v = dec.factors(rank, torch.float64)
        loss = torch.linalg.norm((w - w_u @ w_v) @ x.T).item()
        assert loss == pytest.approx(float(np.sqrt(np.sum(ref[rank:] ** 2))), rel=1e-6)


def test_asvd_alpha_zero_is_plain_svd_and_its_loss_is_its_own_theory():
    w, x = _problem(seed=7)
    plain = METHODS["svd"].decompose(w)
    zero = ASVD(alpha=0.0).decompose(w, _stats(x))
    for rank in (4, 20):
        a_u, a_v = zero.factors(rank, torch.float64)
        p_u, p_v = plain.factors(rank, torch.float64)
        torch.testing.assert_close(a_u @ a_v, p_u @ p_v)
    dec = METHODS["asvd"].decompose(w, _stats(x))
    scale = (x.abs().mean(0)) ** 0.5
    w_u, w_v = dec.factors(10, torch.float64)
    # ASVD truncates optimally in the scaled space: ‖(W − W′)·S‖_F = √(Σ discarded σ²) of W·S
    sv = np.linalg.svd((w * scale).numpy(), compute_uv=False)
    assert torch.linalg.norm((w - w_u @ w_v) * scale).item() == pytest.approx(float(np.sqrt((sv[10:] ** 2).sum())),
                                                                             rel=1e-6)


def test_dipsvd_protects_top_channels_and_minimises_the_boosted_loss():
    w, x = _problem(seed=9)
    method = METHODS["dipsvd"]
    gram = x.T @ x
    d = method.protection(gram)
    top = gram.norm(dim=1).topk(max(1, round(0.05 * 32))).indices
    assert set(torch.nonzero(d > 1).flatten().tolist()) == set(top.tolist())
    dec = method.decompose(w, _stats(x))
    w_u, w_v = dec.factors(10, torch.float64)
    x_boosted = x * d  # X̃ = D·X, channels scaled
    assert torch.linalg.norm((w - w_u @ w_v) @ x_boosted.T).item() == pytest.approx(dec.truncation_loss(10), rel=1e-6)


def test_fwsvd_minimises_the_fisher_weighted_error():
    w, _ = _problem(seed=11)
    rows = torch.rand(w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    dec = METHODS["fwsvd"].decompose(w, LinearStats(fisher_rows=rows))
    w_u, w_v = dec.factors(9, torch.float64)
    d = rows.sqrt()[:, None]
    sv = np.linalg.svd((d * w).numpy(), compute_uv=False)
    assert torch.linalg.norm(d * (w - w_u @ w_v)).item() == pytest.approx(float(np.sqrt((sv[9:] ** 2).sum())), rel=1e-6)
    flat = METHODS["fwsvd"].decompose(w, LinearStats(fisher_rows=torch.full_like(rows, 3.0)))
    p_u, p_v = METHODS["svd"].decompose(w).factors(9, torch.float64)
    f_u, f_v = flat.factors(9, torch.float64)
    torch.testing.assert_close(f_u @ f_v, p_u @ p_v)


@pytest.mark.parametrize("rank", [1, 7, 20])
def test_kfac_svd_loss_is_the_two_sided_theoretical_minimum(rank):
    from svdllm.factorization import KFACSVD

    w, x = _problem(m=36, n=28, seed=5)
    stats = _stats(x, w)
    dec = KFACSVD(shrink_outputs=0.0).decompose(w, stats)
    w_u, w_v = dec.factors(rank, torch.float64)
    # independent: numpy Cholesky factors of both Grams and numpy singular values of L_gᵀ·W·L_x
    l_x = np.linalg.cholesky(stats.gram.numpy())
    l_g = np.linalg.cholesky(stats.output_gram.numpy())
    sv = np.linalg.svd(l_g.T @ w.numpy() @ l_x, compute_uv=False)
    expected = float(np.sqrt(np.sum(sv[rank:] ** 2)))
    loss = np.linalg.norm(l_g.T @ (w - w_u @ w_v).numpy() @ l_x)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert dec.truncation_loss(rank) == pytest.approx(expected, rel=1e-6)
    # the same number as the KFAC loss tr(G·ΔW·XᵀX·ΔWᵀ)
    dw = w - w_u @ w_v
    assert float(torch.trace(stats.output_gram @ dw @ stats.gram @ dw.T)) == pytest.approx(expected**2, rel=1e-6)


def test_kfac_svd_with_identity_output_gram_is_svd_llm():
    from svdllm.factorization import KFACSVD

    w, x = _problem(seed=9)
    stats = _stats(x)
    stats.output_gram = torch.eye(w.shape[0], dtype=torch.float64)
    for r in (3, 12):
        a_u, a_v = KFACSVD(shrink_outputs=0.0).decompose(w, stats).factors(r, torch.float64)
        b_u, b_v = METHODS["svd-llm"].decompose(w, stats).factors(r, torch.float64)
        torch.testing.assert_close(a_u @ a_v, b_u @ b_v, rtol=1e-9, atol=1e-9)
    # full shrinkage toward a scaled identity is the same as an identity (the scale does not move the optimum)
    stats.output_gram = torch.diag(torch.linspace(1, 5, w.shape[0], dtype=torch.float64))
    a_u, a_v = KFACSVD(shrink_outputs=1.0).decompose(w, stats).factors(5, torch.float64)
    b_u, b_v = METHODS["svd-llm"].decompose(w, stats).factors(5, torch.float64)
    torch.testing.assert_close(a_u @ a_v, b_u @ b_v, rtol=1e-9, atol=1e-9)


def test_method_options_are_checked():
    from svdllm.errors import SvdllmError
    from svdllm.factorization import get_method

    assert get_method("kfac-svd", shrink_outputs=0.3).shrink_outputs == 0.3
    with pytest.raises(SvdllmError, match="no option"):
        get_method("svd-llm", alpha=1.0)
    with pytest.raises(SvdllmError, match="Bad option"):
        get_method("kfac-svd", shrink_outputs=2.0)
