"""Error-feedback quantization against an independent computation: the textbook sequential form, which updates the
inverse Hessian explicitly after every column (Optimal Brain Quantization), must give the same matrix as the
blocked Cholesky form; and the error it leaves must be below round-to-nearest's on correlated inputs."""
import pytest
import torch

from svdllm.quantization.gptq import Grid, damped, fake_quantize, gptq, gptq_low_rank, grid_params, output_error, rtn


def _problem(m=12, n=48, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, 5] = 0  # a dead input
    return torch.randn(m, n, generator=g, dtype=torch.float64), x.T @ x


def obq_reference(w, h, grid: Grid, damp: float, order=None):
    """Column by column in `order`, with the explicit inverse: q_i = quant(w_i); W[:, j not yet done] −=
    (w_i − q_i)/Hinv_ii · Hinv_i,j; then Hinv ← Hinv − Hinv[:, i]·Hinv[i, :]/Hinv_ii (the inverse of H without
    input i). Each group's grid from W before the loop."""
    w = w.clone()
    h, dead = damped(h, damp)
    w[:, dead] = 0
    hinv = torch.linalg.inv(h)
    n = w.shape[1]
    g = n if grid.group_size is None else grid.group_size
    grids = [grid_params(w[:, s : s + g], grid) for s in range(0, n, g)]
    q = torch.empty_like(w)
    todo = list(range(n) if order is None else order.tolist())
    while todo:
        i = todo.pop(0)
        scale, zero = grids[i // g]
        q[:, i : i + 1] = fake_quantize(w[:, i : i + 1], scale, zero, grid)
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, todo] -= err[:, None] * hinv[i, todo][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q


@pytest.mark.parametrize("grid", [Grid(4, 16), Grid(3, 8, clip=True), Grid(8, None), Grid(4, None, clip=True)])
@pytest.mark.parametrize("block", [8, 16, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_cholesky_form_equals_the_sequential_inverse_updates(grid, block, act_order):
    w, h = _problem()
    order = torch.argsort(damped(h, 0.01)[0].diagonal(), descending=True, stable=True) if act_order else None
    torch.testing.assert_close(gptq(w, h, grid, damp=0.01, block=block, act_order=act_order),
                               obq_reference(w, h, grid, 0.01, order), rtol=1e-9, atol=1e-9)


def test_act_order_takes_the_loud_inputs_first():
    """A few inputs carrying most of the energy (the outlier channels of real activations): quantized first, while
    every other column can still absorb their error, they cost less."""
    ratios = []
    for seed in range(10):
        w, h = _problem(m=16, n=64, seed=seed)
        loud = torch.ones(64, dtype=torch.float64)
        loud[torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:4]] = 20.0
        h = loud[:, None] * h * loud[None, :]
        grid = Grid(3, 16)
        ratios.append(output_error(w, gptq(w, h, grid), h) / output_error(w, gptq(w, h, grid, act_order=False), h))
    assert max(ratios) < 1 and sum(ratios) / len(ratios) < 0.8


def test_clipping_search_never_loses_to_min_max():
    torch.manual_seed(0)
    w = torch.randn(64, 32, dtype=torch.float64)
    w[:, 3] *= 8  # an outlier column stretches min-max's range
    for bits in (3, 4):
        errs = []
        for clip in (False, True):
            grid = Grid(bits, 32, clip=clip)
            scale, zero = grid_params(w, grid)
            errs.append(((fake_quantize(w, scale, zero, grid) - w) ** 2).sum(dim=1))
        assert (errs[1] <= errs[0]).all() and errs[1].sum() < 0.95 * errs[0].sum()


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_error_feedback_beats_round_to_nearest(bits):
    w, h = _problem(m=32, n=64)
    grid = Grid(bits, 16)
    q = gptq(w, h, grid)
    assert output_error(w, q, h) < 0.8 * output_error(w, rtn(w, grid), h)
    # every value on its group's grid: at most 2^bits distinct values per row and group
    for s in range(0, 64, 16):
        assert max(len(torch.unique(row)) for row in q[:, s : s + 16]) <= 2**bits


def test_uncorrelated_inputs_leave_nothing_to_feed_back():
    """H = I (no damping): the error of one column cannot be reduced through the others, so GPTQ is RTN."""
    w, _ = _problem()
    grid = Grid(4, 16)
    torch.testing.assert_close(gptq(w, torch.eye(48, dtype=torch.float64), grid, damp=0.0), rtn(w, grid))


def test_low_rank_pair_feeds_the_error_of_w_v_into_w_u():
    w, h = _problem(m=40, n=48)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    w_u, w_v = u[:, :10] * s[:10], vt[:10]
    grid = Grid(3, 8)
    q_u, q_v = gptq_low_rank(w_u, w_v, h, grid, rebase=False)
    both = output_error(w_u @ w_v, q_u @ q_v, h)
    assert both < output_error(w_u @ w_v, rtn(w_u, grid) @ rtn(w_v, grid), h)
    # W_u quantized as it is, on its own input's Hessian, without taking up W_v's error: worse
    alone = gptq(w_u, q_v @ h @ q_v.T, grid)
    assert both < 0.9 * output_error(w_u @ w_v, alone @ q_v, h)
    # the refit alone (W_u unquantized) is the least-squares optimum over W_u given Q_v
    fine = gptq_low_rank(w_u, w_v, h, Grid(3, 8), rebase=False)[1]
    refit = torch.linalg.lstsq((fine @ h @ fine.T), (w_u @ w_v @ h @ fine.T).T).solution.T
    for other in (w_u, refit + 0.01 * torch.randn_like(refit)):
        assert output_error(w_u @ w_v, refit @ fine, h) <= output_error(w_u @ w_v, other @ fine, h)


def _whitened_pair(seed, rank=24):
    """A pair as truncation-aware SVD leaves it: W·S = UΣVᵀ with S the Cholesky factor of G, W_u = U_r·Σ_r,
    W_v = V_rᵀ·S⁻¹, so W_v·X's rows are orthogonal (W_u's Hessian W_v·G·W_vᵀ = I)."""
    w, h = _problem(m=64, n=48, tokens=400, seed=seed)
    h = h + 1e-3 * torch.eye(48, dtype=torch.float64)
    s = torch.linalg.cholesky(h)
    u, sv, vt = torch.linalg.svd(w @ s, full_matrices=False)
    return u[:, :rank] * sv[:rank], vt[:rank] @ torch.linalg.inv(s), h


def test_gauge_keeps_the_product_and_gives_gptq_room_on_whitened_factors():
    from svdllm.quantization.gptq import gauge

    ratios = []  # error with the gauge / without, GPTQ at int4 in groups of 16 (0.69–0.81 on these seeds)
    for seed in range(6):
        w_u, w_v, h = _whitened_pair(seed)
        assert torch.allclose(w_v @ h @ w_v.T, torch.eye(24, dtype=torch.float64), atol=1e-8)  # W_u's H diagonal
        a_u, a_v = gauge(w_u, w_v)
        torch.testing.assert_close(a_u @ a_v, w_u @ w_v, rtol=0, atol=1e-10)
        w, grid = w_u @ w_v, Grid(4, 16)
        plain = output_error(w, torch.matmul(*gptq_low_rank(w_u, w_v, h, grid, rebase=False)), h)
        rebased = output_error(w, torch.matmul(*gptq_low_rank(w_u, w_v, h, grid)), h)
        ratios.append(rebased / plain)
    assert max(ratios) < 0.9, ratios


def test_codes_scales_and_zeros_rebuild_the_matrix():
    from svdllm.quantization.gptq import gptq_codes

    w, h = _problem()
    for grid in (Grid(4, 16), Grid(8, None)):
        q = gptq_codes(w, h, grid)
        assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= grid.levels
        assert q.scale.shape == (12, 48 // (grid.group_size or 48))
        step = grid.group_size or 48
        rebuilt = q.scale.repeat_interleave(step, dim=1) * (q.codes.double() - q.zero.repeat_interleave(step, dim=1))
        torch.testing.assert_close(rebuilt, q.dequantized, rtol=0, atol=1e-12)
