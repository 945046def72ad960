"""learning_curve against a brute-force loop of ridge regressions, and the exponent fit against known power laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symgen.errors import ConfigError, ShapeError
from symgen.ntk import fit_power_law, learning_curve


def test_fit_power_law_recovers_exponent_and_interval():
    sizes = [10, 20, 40, 80, 160]
    rng = np.random.default_rng(0)
    draws = [[3.0 * p**-0.7 * math.exp(rng.normal(0, 0.05)) for p in sizes] for _ in range(8)]
    beta, se, (lo, hi), betas, amp = fit_power_law(sizes, draws)
    # independent reference: numpy polyfit per draw, Student-t interval from scipy
    from scipy import stats

    ref = [-np.polyfit(np.log(sizes), np.log(d), 1)[0] for d in draws]
    assert beta == pytest.approx(np.mean(ref), abs=1e-12)
    assert betas == pytest.approx(ref, abs=1e-12)
    half = stats.t.ppf(0.975, 7) * np.std(ref, ddof=1) / math.sqrt(8)
    assert (lo, hi) == pytest.approx((np.mean(ref) - half, np.mean(ref) + half), abs=1e-12)
    assert lo < 0.7 < hi and se > 0
    assert math.exp(amp) == pytest.approx(3.0, rel=0.1)
    exact = fit_power_law(sizes, [[2.0 * p**-0.5 for p in sizes]])
    assert exact[0] == pytest.approx(0.5) and math.isnan(exact[1])


def _laplace(a, b):
    return torch.exp(-torch.cdist(a, b))


def test_learning_curve_matches_brute_force_regressions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=g, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0])
    curve = learning_curve(_laplace, (x, y), [8, 16, 32, 64], num_test=50, num_draws=3, generator=7)
    # brute force: replay the same splits and solve each regression with numpy
    g2 = torch.Generator().manual_seed(7)
    for d in range(3):
        idx = torch.randperm(200, generator=g2)[:114]
        xs, ys = x[idx].numpy(), y[idx].numpy()
        xt, yt, xp, yp = xs[:50], ys[:50], xs[50:], ys[50:]
        for j, p in enumerate([8, 16, 32, 64]):
            k = np.exp(-np.abs(xp[:p] - xp[:p].T))
            kt = np.exp(-np.abs(xt - xp[:p].T))
            pred = kt @ np.linalg.solve(k, yp[:p])
            assert curve.errors[d][j] == pytest.approx(np.mean((pred - yt) ** 2), rel=1e-6)
    assert curve.beta > 0.5  # a smooth target under a Laplace kernel in 1D: error falls fast
    assert curve.to_dict()["mean_errors"] == pytest.approx(np.mean(curve.errors, 0).tolist())


def test_learning_curve_with_sampler_draws_fresh_data():
    calls = []

    def sample(n, g):
        calls.append(n)
        x = torch.rand(n, 2, generator=g, dtype=torch.float64)
        return x, x.sum(1, keepdim=True)  # (N, 1) targets too

    curve = learning_curve(_laplace, sample, [4, 8, 16], num_test=10, num_draws=2, ridge=1e-8)
    assert calls == [26, 26] and len(curve.errors) == 2 and len(curve.betas) == 2


def test_learning_curve_bad_input():
    x, y = torch.rand(20, 1), torch.rand(20)
    with pytest.raises(ConfigError, match="at least two"):
        learning_curve(_laplace, (x, y), [5], num_test=5)
    with pytest.raises(ConfigError, match="pool holds"):
        learning_curve(_laplace, (x, y), [5, 18], num_test=5)
    with pytest.raises(ShapeError, match="same number"):
        learning_curve(_laplace, (x, y[:10]), [2, 4], num_test=2)
    with pytest.raises(ConfigError, match="pool"):
        learning_curve(_laplace, x, [2, 4], num_test=2)
    with pytest.raises(ConfigError, match="> 0"):
        fit_power_law([1, 2], [[1.0, 0.0]])


def test_nested_test_errors_match_direct_solves():
    from symgen.ntk.learning_curves import nested_test_errors

    g = torch.Generator().manual_seed(1)
    x = torch.rand(90, 2, generator=g, dtype=torch.float64)
    y = torch.sin(4 * x).sum(1)
    k = _laplace(x, x)
    xtr, ytr, yte = slice(0, 70), y[:70], y[70:]
    sizes = [5, 17, 40, 70]
    for ridge in (0.0, 1e-3):
        errs, jitter = nested_test_errors(k[xtr, xtr], ytr, k[70:, xtr], yte, sizes, ridge=ridge)
        assert jitter == 0.0
        for p, e in zip(sizes, errs, strict=True):  # reference: a dense solve per size
            alpha = torch.linalg.solve(k[:p, :p] + ridge * torch.eye(p, dtype=torch.float64), ytr[:p])
            ref = float(((k[70:, :p] @ alpha - yte) ** 2).mean())
            assert e == pytest.approx(ref, rel=1e-8)
    # a factor of a larger matrix (training points first) gives the same errors
    chol = torch.linalg.cholesky(k)
    errs_f, _ = nested_test_errors(k, ytr, k[70:, :70], yte, sizes, factor=chol)
    assert errs_f == pytest.approx(nested_test_errors(k[xtr, xtr], ytr, k[70:, xtr], yte, sizes)[0], rel=1e-10)
    with pytest.raises(ConfigError, match="sizes must lie"):
        nested_test_errors(k[xtr, xtr], ytr, k[70:, xtr], yte, [5, 71])


def test_blocked_kernel_and_jittered_cholesky():
    from symgen.ntk.learning_curves import blocked_kernel, cholesky_jittered

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(23, 3, generator=g, dtype=torch.float64), torch.randn(11, 3, generator=g, dtype=torch.float64)
    calls = []

    def kern(u, v):
        calls.append((u.shape[0], v.shape[0]))
        return _laplace(u, v)

    sym = blocked_kernel(kern, a, block=5)
    assert torch.equal(sym, sym.T) and torch.allclose(sym, _laplace(a, a), atol=1e-15)
    assert len(calls) == 15  # 5 row blocks: only the 5 * 6 / 2 blocks on and above the diagonal
    assert torch.allclose(blocked_kernel(kern, a, b, block=4), _laplace(a, b), atol=1e-15)
    factor, jitter = cholesky_jittered(sym)
    assert jitter == 0.0 and torch.allclose(factor @ factor.T, sym, atol=1e-12)
    low_rank = a @ a.T  # rank 3: needs jitter
    factor, jitter = cholesky_jittered(low_rank)
    assert jitter > 0 and torch.allclose(factor @ factor.T, low_rank, atol=1e-6)


def test_learning_curve_known_exponent_ornstein_uhlenbeck():
    """Teacher and student the Laplace kernel exp(-|x - y|) on [0, 1] (an Ornstein-Uhlenbeck process): the
    ridgeless error falls as P^-1 (beta = min(alpha_T, 2 alpha_S) / d = 1, arXiv 1905.10843)."""

    def sample(n, g):
        x = torch.rand(n, 1, generator=g, dtype=torch.float64)
        chol = torch.linalg.cholesky(_laplace(x, x) + 1e-12 * torch.eye(n, dtype=torch.float64))
        return x, chol @ torch.randn(n, generator=g, dtype=torch.float64)

    curve = learning_curve(
        _laplace, sample, [16, 32, 64, 128, 256, 512], num_test=400, num_draws=6, generator=3, fit_min=64, block=100
    )
    assert curve.to_dict()["fit_sizes"] == [64, 128, 256, 512]
    assert curve.beta == pytest.approx(1.0, abs=0.12)
    lo, hi = curve.beta_ci
    assert lo < 1.0 < hi or abs(curve.beta - 1.0) < 0.05
    with pytest.raises(ConfigError, match="fit_min"):
        learning_curve(_laplace, sample, [16, 32], num_test=4, fit_min=32)


def _local_ntk_longdouble(x: np.ndarray, y: np.ndarray, s: int, w: float, b: float) -> np.ndarray:
    """b^2 + (w^2 / d) sum_p |u~| |v~| F(theta) in np.longdouble, theta from arccos of the longdouble cosine."""
    d = x.shape[1]
    idx = (np.arange(d)[:, None] - (s - 1) // 2 + np.arange(s)[None]) % d
    ld = np.longdouble
    out = np.zeros((x.shape[0], y.shape[0]), dtype=ld)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            for p in range(d):
                u = np.append(x[i, idx[p]].astype(ld) * ld(w) / np.sqrt(ld(s)), ld(b))
                v = np.append(y[j, idx[p]].astype(ld) * ld(w) / np.sqrt(ld(s)), ld(b))
                nu, nv = np.sqrt((u * u).sum()), np.sqrt((v * v).sum())
                theta = np.arccos(np.clip((u * v).sum() / (nu * nv), ld(-1), ld(1)))
                out[i, j] += nu * nv * (np.sin(theta) + 2 * np.cos(theta) * (np.pi - theta)) / (2 * np.pi)
    return (ld(b) ** 2 + ld(w) ** 2 / d * out).astype(np.float64)


@pytest.mark.parametrize(("d", "s", "bias"), [(8, 2, 0.5), (6, 4, 0.5), (5, 5, 0.0), (7, 1, 1.3)])
def test_local_relu_ntk_matches_analytic_conv_ntk(d, s, bias):
    from symgen.ntk import analytic_conv_ntk
    from symgen.ntk.local_kernel import local_relu_ntk

    g = torch.Generator().manual_seed(d + s)
    x = torch.randn(40, 1, d, generator=g, dtype=torch.float64)
    y = torch.randn(9, 1, d, generator=g, dtype=torch.float64)
    ref = analytic_conv_ntk(x, y, 1, s, "relu", "flatten", "circular", 1.3, bias, dtype=torch.float64)[1]
    got = local_relu_ntk(x, y, s, 1.3, bias)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9)
    # nearly parallel patches (the cusp): against the formula in extended precision (numpy longdouble)
    near = x + 1e-7 * torch.randn(40, 1, d, generator=g, dtype=torch.float64)
    got = local_relu_ntk(x[:5], near[:5], s, 1.3, bias).numpy()
    assert np.allclose(got, _local_ntk_longdouble(x[:5, 0].numpy(), near[:5, 0].numpy(), s, 1.3, bias), rtol=1e-12)
    sym = local_relu_ntk(x, None, s, 1.3, bias)
    off = ~torch.eye(40, dtype=torch.bool)
    ref = analytic_conv_ntk(x, None, 1, s, "relu", "flatten", "circular", 1.3, bias, dtype=torch.float64)[1]
    assert torch.equal(sym, sym.T) and torch.allclose(sym[off], ref[off], rtol=1e-9, atol=1e-9)
    # the diagonal in closed form: C(u, u) = |u~|^2, so K(x, x) = b^2 + (w^2 / d) sum_p (w^2 |x_p|^2 / s + b^2)
    idx = (torch.arange(d)[:, None] - (s - 1) // 2 + torch.arange(s)[None]) % d
    patch_sq = (x[:, 0][:, idx] ** 2).sum(-1)  # (N, d)
    diag = bias**2 + (1.3**2 / d) * (1.3**2 * patch_sq / s + bias**2).sum(1)
    assert torch.allclose(sym.diagonal(), diag, rtol=1e-13, atol=0)
    assert torch.allclose(local_relu_ntk(x[:, 0], None, s, 1.3, bias), local_relu_ntk(x, None, s, 1.3, bias))
    with pytest.raises(ConfigError, match="filter_size"):
        local_relu_ntk(x, None, d + 1)
    with pytest.raises(ShapeError, match="equal d"):
        local_relu_ntk(x, torch.randn(3, d + 1), s)


@pytest.mark.parametrize("layout", ["factor", "row_major"])
def test_nested_test_errors_same_bits_as_plain_solves(layout):
    """The reused, strip-transposed copies of the factor's leading blocks give the plain solves' bits."""
    from symgen.ntk.learning_curves import cholesky_jittered, nested_test_errors

    g = torch.Generator().manual_seed(1)
    x = torch.rand(700, 3, generator=g, dtype=torch.float64)
    k = torch.exp(-torch.cdist(x, x))
    y = torch.randn(700, generator=g, dtype=torch.float64)
    sizes = [40, 256, 300, 513, 600]
    for n in (700, 600):  # leading blocks of a larger factor, and the whole factor at the largest size
        factor, _ = cholesky_jittered(k[:n, :n])
        if layout == "row_major":
            factor = factor.contiguous()
        got, _ = nested_test_errors(k, y[:600], k[600:, :600], y[600:], sizes, factor=factor)
        z = torch.linalg.solve_triangular(factor[:600, :600], y[:600, None], upper=False)
        want = []
        for p in sizes:
            alpha = torch.linalg.solve_triangular(factor[:p, :p].T, z[:p], upper=True)
            diff = k[600:, :p] @ alpha - y[600:, None]
            want.append(float((diff * diff).sum(1).mean()))
        assert got == want


def test_nested_test_errors_factor_only():
    """With ``factor`` given, ``k_train`` is not read (None is taken) and the errors are those computed from the
    kernel itself; with neither, a clear error."""
    import torch

    from symgen.ntk.learning_curves import cholesky_jittered, nested_test_errors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    k = torch.exp(-torch.cdist(x, x))
    y = torch.randn(30, generator=g, dtype=torch.float64)
    want, _ = nested_test_errors(k[:20, :20], y[:20], k[20:, :20], y[20:], [5, 10, 20])
    factor, _ = cholesky_jittered(k[:20, :20])
    got, _ = nested_test_errors(None, y[:20], k[20:, :20], y[20:], [5, 10, 20], factor=factor)
    assert got == want
    with pytest.raises(ConfigError, match="k_train or its factor"):
        nested_test_errors(None, y[:20], k[20:, :20], y[20:], [5])
