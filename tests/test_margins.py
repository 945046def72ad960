"""Max-margin tools against independent solvers: SLSQP on the primal, brute force over angles in 2D,
LP feasibility (linprog) for separability, and the KKT conditions checked here directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from symgen.augment import OrbitAugment
from symgen.errors import ConfigError, NotSeparableError, ShapeError
from symgen.groups import CyclicShift, ImageRotation90
from symgen.margins import (
    end_to_end_predictor,
    hard_margin_svm,
    invariant_max_margin,
    max_margin_direction,
    normalized_margin,
)

DT = torch.float64


def separable(n: int, d: int, seed: int, gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(n, d, generator=g, dtype=DT)
    s = x @ w / w.norm()
    x, s = x[s.abs() > gap], s[s.abs() > gap]
    return x, torch.sign(s)


def slsqp_primal(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    z = (y[:, None] * x).numpy()
    res = minimize(
        lambda b: 0.5 * b @ b,
        np.zeros(z.shape[1]),
        jac=lambda b: b,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda b: z @ b - 1.0, "jac": lambda b: z}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return res.x


@pytest.mark.parametrize("n,d,seed", [(15, 3, 0), (60, 8, 1), (40, 60, 2), (300, 20, 3)])
def test_svm_matches_slsqp_and_satisfies_kkt(n, d, seed):
    x, y = separable(n, d, seed)
    sol = hard_margin_svm(x, y)
    ref = slsqp_primal(x, y)
    beta = sol.beta.numpy()
    assert np.linalg.norm(beta - ref) <= 1e-5 * np.linalg.norm(ref)
    # KKT checked here independently of the solver's own residual
    z = (y[:, None] * x).numpy()
    m = z @ beta
    alpha = sol.dual.numpy()
    assert m.min() >= 1 - 1e-9  # primal feasible
    assert alpha.min() >= 0  # dual feasible
    assert np.allclose(z.T @ alpha, beta, atol=1e-9)  # stationarity
    assert np.abs(alpha * (m - 1)).max() <= 1e-9 * max(1.0, alpha.max())  # complementary slackness
    assert math.isclose(sol.margin, 1 / np.linalg.norm(beta), rel_tol=1e-12)
    assert math.isclose(normalized_margin(sol.beta, x, y), sol.margin, rel_tol=1e-9)


def test_svm_direction_brute_force_2d():
    for seed in range(4):
        x, y = separable(25, 2, 10 + seed, gap=0.05)
        z = (y[:, None] * x).numpy()
        # brute force: max over unit directions of the worst-case margin, grid then golden refinement
        ang = np.linspace(0, 2 * np.pi, 200_001)
        u = np.stack([np.cos(ang), np.sin(ang)])
        worst = (z @ u).min(0)
        a0 = ang[worst.argmax()]
        lo, hi = a0 - 1e-4, a0 + 1e-4
        f = lambda a, z=z: (z @ np.array([np.cos(a), np.sin(a)])).min()  # noqa: E731
        for _ in range(200):
            m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
            lo, hi = (m1, hi) if f(m1) < f(m2) else (lo, m2)
        best = 0.5 * (lo + hi)
        direction = max_margin_direction(x, y).numpy()
        assert np.allclose(direction, [np.cos(best), np.sin(best)], atol=1e-6)
        assert math.isclose(hard_margin_svm(x, y).margin, f(best), rel_tol=1e-6)


def test_not_separable_agrees_with_lp_feasibility():
    seen = {True: 0, False: 0}
    for seed in range(16):
        g = torch.Generator().manual_seed(seed)
        n, d = 8, 4  # Cover: separable through the origin with probability 1/2
        x = torch.randn(n, d, generator=g, dtype=DT)
        y = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(DT)
        z = (y[:, None] * x).numpy()
        # LP: is there beta with z_i . beta >= 1 for all i?  (independent separability test)
        lp = linprog(np.zeros(d), A_ub=-z, b_ub=-np.ones(n), bounds=[(None, None)] * d, method="highs")
        feasible = lp.status == 0
        seen[feasible] += 1
        if feasible:
            assert hard_margin_svm(x, y).margin > 0
        else:
            with pytest.raises(NotSeparableError, match="not linearly separable"):
                hard_margin_svm(x, y)
    assert seen[True] and seen[False]  # both branches exercised


def test_invariant_max_margin_augment_equals_reynolds():
    act = CyclicShift(6)
    g = torch.Generator().manual_seed(3)
    w = act.orbit(torch.randn(2, 6, generator=g, dtype=DT)).mean(0)
    x = torch.randn(30, 2, 6, generator=g, dtype=DT)
    y = torch.sign((x * w).sum((1, 2)))
    a = invariant_max_margin(x, y, act, method="augment")
    r = invariant_max_margin(x, y, act, method="reynolds")
    assert a.shape == (2, 6)
    assert torch.allclose(a, r, atol=1e-8)
    assert torch.allclose(act.orbit(a).mean(0), a, atol=1e-10)  # invariant
    xa, ya = OrbitAugment(act)(x, y)
    assert xa.shape == (6 * 30, 2, 6)
    # it has the best margin on the augmented data: better than the raw SVM and the teacher
    raw = max_margin_direction(x, y)
    assert normalized_margin(a, xa, ya) >= normalized_margin(raw, xa, ya)
    assert normalized_margin(a, xa, ya) >= normalized_margin(w, xa, ya) - 1e-12


def test_invariant_max_margin_images_and_not_separable():
    act = ImageRotation90()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 3, 3, generator=g, dtype=DT)
    # a point and its rotation with opposite labels: no invariant classifier separates them
    x2 = torch.cat([x, act.apply(1, x[:1])])
    y2 = torch.cat([torch.ones(8, dtype=DT), -torch.ones(1, dtype=DT)])
    with pytest.raises(NotSeparableError):
        invariant_max_margin(x2, y2, act)


def test_normalized_margin_against_loop():
    x, y = separable(20, 5, 7)
    beta = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=DT)
    loop = min(float(y[i] * (beta @ x[i])) for i in range(len(x))) / float(beta.norm())
    assert math.isclose(normalized_margin(beta, x, y), loop, rel_tol=1e-12)


def test_end_to_end_predictor_linear_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False), nn.Linear(4, 1, bias=False)
    ).double()
    beta = end_to_end_predictor(net, (2, 3))
    w = net[3].weight @ net[2].weight @ net[1].weight
    assert torch.allclose(beta.reshape(-1), w.reshape(-1), atol=1e-12)
    with pytest.raises(ConfigError, match="not a linear"):
        end_to_end_predictor(nn.Sequential(nn.Flatten(), nn.Linear(6, 1)).double(), (2, 3))
    with pytest.raises(ConfigError, match="not a linear"):
        end_to_end_predictor(
            nn.Sequential(nn.Flatten(), nn.Linear(6, 3, bias=False), nn.Tanh(), nn.Linear(3, 1, bias=False)).double(),
            (2, 3),
        )


def test_bad_inputs():
    x, y = separable(10, 3, 0)
    with pytest.raises(ConfigError, match="-1 or \\+1"):
        hard_margin_svm(x, (y > 0).to(DT))
    with pytest.raises(ShapeError):
        hard_margin_svm(x, y[:5])
    with pytest.raises(ShapeError):
        normalized_margin(torch.ones(4, dtype=DT), x, y)
    with pytest.raises(NotSeparableError):
        hard_margin_svm(torch.zeros(3, 2, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ConfigError):
        invariant_max_margin(x.reshape(10, 3), y, CyclicShift(3), method="nope")
