"""Kernel regression, GD dynamics and eigen helpers against numpy solves and brute-force GD loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.ntk import eigen_projections, gd_dynamics, kernel_eigh, kernel_regression, residual_decay

F64 = torch.float64


def _features(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=F64)


def test_kernel_regression_matches_numpy_solve():
    phi = _features(12, 30)
    phi_t = _features(5, 30, seed=1)
    k, kt = phi @ phi.T, phi_t @ phi.T
    y = _features(12, 3, seed=2)
    for ridge in (0.0, 0.7):
        pred = kernel_regression(k, y, kt, ridge)
        ref = kt.numpy() @ np.linalg.solve(k.numpy() + ridge * np.eye(12), y.numpy())
        np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-9, atol=1e-10)
    pred1 = kernel_regression(k, y[:, 0], kt, 0.1)
    assert pred1.shape == (5,)
    torch.testing.assert_close(pred1, kernel_regression(k, y, kt, 0.1)[:, 0])
    # ridge 0 interpolates the training targets
    torch.testing.assert_close(kernel_regression(k, y, k, 0.0), y, rtol=1e-8, atol=1e-8)


def test_kernel_regression_gradients():
    phi = _features(6, 10).requires_grad_(True)
    phi_t = _features(3, 10, seed=1).requires_grad_(True)
    y = _features(6, 2, seed=2).requires_grad_(True)

    def f(a, b, c):
        return kernel_regression(a @ a.T, c, b @ a.T, 0.3)

    assert torch.autograd.gradcheck(f, (phi, phi_t, y))


def test_kernel_regression_jitter_warns_and_errors():
    phi = _features(8, 3)  # rank 3 kernel on 8 points: singular
    k = phi @ phi.T
    k = k.float()
    with pytest.warns(RuntimeWarning, match="jitter"):
        pred = kernel_regression(k, torch.randn(8), k[:2], 0.0)
    assert torch.isfinite(pred).all()
    bad = -torch.eye(4, dtype=F64)  # negative definite: no jitter can fix it
    with pytest.raises(DivergenceError, match="positive definite"):
        kernel_regression(bad, torch.randn(4, dtype=F64), bad, 0.0)
    nan = torch.eye(3, dtype=F64)
    nan[0, 1] = float("nan")
    with pytest.raises(DivergenceError, match="NaN"):
        kernel_regression(nan, torch.randn(3, dtype=F64), nan, 0.1)


def test_kernel_regression_shape_errors():
    k = torch.eye(4)
    with pytest.raises(ShapeError):
        kernel_regression(torch.randn(4, 3), torch.randn(4), k, 0.0)
    with pytest.raises(ShapeError):
        kernel_regression(k, torch.randn(5), k, 0.0)
    with pytest.raises(ShapeError):
        kernel_regression(k, torch.randn(4), torch.randn(2, 3), 0.0)
    with pytest.raises(ConfigError):
        kernel_regression(k, torch.randn(4), k, -1.0)


def _brute_force_gd(phi, phi_t, y, w0, lr, steps, n_norm):
    """Discrete GD on the linear model f = phi w with loss 1/(2n) ||phi w - y||^2, recorded at each step."""
    w = w0.clone()
    train, test = [], []
    for _ in range(steps + 1):
        train.append(phi @ w)
        test.append(phi_t @ w)
        w = w - lr * phi.T @ (phi @ w - y) / n_norm
    return torch.stack(train), torch.stack(test)


def test_gd_dynamics_discrete_matches_brute_force_gd_on_linear_model():
    phi = _features(10, 25)
    phi_t = _features(4, 25, seed=1)
    y = _features(10, 2, seed=2)
    w0 = _features(25, 2, seed=3) * 0.3
    k, kt = phi @ phi.T, phi_t @ phi.T
    lr = 0.5 * 10 / torch.linalg.eigvalsh(k).max().item()
    train, test = _brute_force_gd(phi, phi_t, y, w0, lr, 40, 10)
    times = [0, 1, 7, 40]
    pred_test = gd_dynamics(k, kt, y, times, lr, phi @ w0, phi_t @ w0, discrete=True)
    pred_train = gd_dynamics(k, None, y, times, lr, phi @ w0, discrete=True)
    torch.testing.assert_close(pred_test, test[times], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(pred_train, train[times], rtol=1e-8, atol=1e-9)


def test_gd_dynamics_continuous_matches_expm_and_limit():
    phi = _features(8, 20)
    phi_t = _features(3, 20, seed=1)
    k, kt = phi @ phi.T, phi_t @ phi.T
    y = _features(8, 1, seed=2)[:, 0]
    lr, t = 0.01, 37.0
    pred = gd_dynamics(k, kt, y, t, lr)
    kn, ktn, yn = k.numpy(), kt.numpy(), y.numpy()
    ref = ktn @ np.linalg.solve(kn, (np.eye(8) - scipy.linalg.expm(-lr * t * kn / 8)) @ yn)
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-8, atol=1e-10)
    # t -> infinity: kernel regression (interpolation)
    far = gd_dynamics(k, kt, y, 1e9, lr)
    torch.testing.assert_close(far, kernel_regression(k, y, kt, 0.0), rtol=1e-6, atol=1e-8)
    # normalization = N*O/2 is torch's MSELoss (mean over all entries)
    pred_mse = gd_dynamics(k, kt, y, t, lr, normalization=4.0)
    ref_mse = ktn @ np.linalg.solve(kn, (np.eye(8) - scipy.linalg.expm(-lr * t * kn / 4)) @ yn)
    np.testing.assert_allclose(pred_mse.numpy(), ref_mse, rtol=1e-8, atol=1e-10)


def test_gd_dynamics_singular_kernel_stays_finite():
    phi = _features(6, 2)  # rank 2
    k = phi @ phi.T
    y = _features(6, 1, seed=1)[:, 0]
    pred = gd_dynamics(k, k[:2], y, [0.0, 5.0], 0.1)
    assert torch.isfinite(pred).all()
    train, test = _brute_force_gd(phi, phi[:2], y, torch.zeros(2, dtype=F64), 1e-3, 5000, 6)
    # 5000 steps of lr 1e-3 ~ time 5 of lr 1: compare continuous prediction with fine discrete GD
    cont = gd_dynamics(k, k[:2], y, 5.0, 1.0)
    torch.testing.assert_close(cont, test[-1], rtol=1e-3, atol=1e-4)
    with pytest.raises(ShapeError):
        gd_dynamics(k, k[:2], y, 1.0, 0.1, f0=torch.zeros(6, dtype=F64))


def test_eigen_helpers():
    phi = _features(7, 12)
    k = phi @ phi.T
    evals, evecs = kernel_eigh(k)
    assert (evals[:-1] >= evals[1:]).all()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, k)
    v = _features(7, 2, seed=1)
    torch.testing.assert_close(evecs @ eigen_projections(v, evecs), v)
    decay = residual_decay(evals, [0.0, 2.0], 0.1, 7.0)
    torch.testing.assert_close(decay[1], torch.exp(-0.1 * 2.0 * evals.clamp(min=0) / 7.0))
    assert torch.all(decay[0] == 1)
    # residual of gradient flow along eigvec k decays by exactly decay[k]
    y = _features(7, 1, seed=2)[:, 0]
    f = gd_dynamics(k, None, y, 2.0, 0.1)
    torch.testing.assert_close(eigen_projections(f - y, evecs), -decay[1] * eigen_projections(y, evecs))
