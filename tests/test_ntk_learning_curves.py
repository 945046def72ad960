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
