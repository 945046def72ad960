"""float32 analytic kernels against their float64 values, on, near and far from the diagonal.

The errors are measured relative to each entry (on and near the diagonal) and relative to the entry's natural
scale sqrt(K(x, x) K(x', x')) far from it, where an entry that is a cancelling sum of O(1) terms cannot be
resolved better than float32 resolves the terms. Before the stable angles the float32 ReLU NTK was ~7000 ulps
off on the diagonal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symgen.ntk import analytic_conv_ntk, analytic_ntk

ULP = 2.0**-24  # half the float32 machine epsilon


def _points(shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, *shape, generator=g)
    ys = {
        "diag": x.clone(),
        "near 1e-3": x + 1e-3 * torch.randn(x.shape, generator=g),
        "near 1e-6": x + 1e-6 * torch.randn(x.shape, generator=g),
        "antiparallel": -x + 1e-3 * torch.randn(x.shape, generator=g),
        "far": torch.randn(4, *shape, generator=g),
    }
    return x, ys


def _errors(fn, x: torch.Tensor, y: torch.Tensor, paired: bool) -> list[float]:
    out32 = fn(x, y)
    out64 = fn(x.double(), y.double())
    d1 = fn(x.double(), None)
    d2 = fn(y.double(), None)
    errs = []
    for k32, k64, k11, k22 in zip(out32, out64, d1, d2, strict=True):
        assert k32.dtype == torch.float32 and k64.dtype == torch.float64
        err = (k32.double() - k64).abs()
        if paired:  # x'_i pairs with x_i: entrywise relative on the diagonal
            errs.append((err.diagonal() / k64.diagonal().abs()).max().item())
        else:
            scale = (k11.diagonal()[:, None] * k22.diagonal()[None, :]).sqrt()
            errs.append((err / scale).max().item())
    return errs


@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
def test_mlp_float32_within_a_few_ulps_of_float64(activation):
    x, ys = _points((16,))
    for depth in (1, 2, 3, 4):
        for bias in (0.0, 0.3):
            for name, y in ys.items():

                def fn(a, b, depth=depth, bias=bias):
                    return analytic_ntk(a, b, depth, activation, 1.3, bias)

                errs = _errors(fn, x, y, paired=name != "far")
                assert max(errs) < 16 * ULP, (depth, bias, name, errs)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_conv_float32_within_a_few_ulps_of_float64(readout, activation):
    x, ys = _points((1, 6, 6))
    for depth in (1, 2, 3):
        for bias, padding in ((0.0, "circular"), (0.3, "same")):
            for name, y in ys.items():

                def fn(a, b, depth=depth, bias=bias, padding=padding):
                    return analytic_conv_ntk(a, b, depth, 3, activation, readout, padding, 1.3, bias)

                errs = _errors(fn, x, y, paired=name != "far")
                assert max(errs) < 16 * ULP, (depth, bias, name, errs)


def test_diagonal_angle_is_exactly_zero():
    # x = x' (also as separate tensors): theta = 0, so the ReLU NTK of one hidden layer is exactly
    # K + W^2 c / 2 (no sqrt(eps) residue from arccos near 1).
    x = torch.randn(4, 7, dtype=torch.float64)
    for x2 in (None, x.clone()):
        nngp, ntk = analytic_ntk(x, x2, 1, "relu", 1.0, 0.0)
        c = (x * x).sum(1) / 7
        torch.testing.assert_close(nngp.diagonal(), c / 2, rtol=1e-15, atol=0)
        torch.testing.assert_close(ntk.diagonal(), c, rtol=1e-15, atol=0)


def _naive_relu(x1: np.ndarray, x2: np.ndarray, depth: int, w: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Cho & Saul / Jacot et al. arc-cosine recursion, plain arccos, float64 (valid on separated points)."""
    d = x1.shape[1]
    k12 = w**2 * x1 @ x2.T / d + b**2
    k11 = w**2 * (x1**2).sum(1) / d + b**2
    k22 = w**2 * (x2**2).sum(1) / d + b**2
    t = k12.copy()
    for _ in range(depth):
        norm = np.sqrt(np.outer(k11, k22))
        th = np.arccos(k12 / norm)
        k12 = w**2 * norm * (np.sin(th) + (math.pi - th) * np.cos(th)) / (2 * math.pi) + b**2
        t = k12 + w**2 * t * (math.pi - th) / (2 * math.pi)
        k11, k22 = w**2 * k11 / 2 + b**2, w**2 * k22 / 2 + b**2
    return k12, t


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_float64_equals_the_naive_recursion_on_separated_points(depth):
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x2 = torch.randn(5, 9, generator=g, dtype=torch.float64)
    nngp, ntk = analytic_ntk(x1, x2, depth, "relu", 1.4, 0.2)
    k_ref, t_ref = _naive_relu(x1.numpy(), x2.numpy(), depth, 1.4, 0.2)
    np.testing.assert_allclose(nngp.numpy(), k_ref, rtol=1e-12)
    np.testing.assert_allclose(ntk.numpy(), t_ref, rtol=1e-12)
    # the conv kernel with a 1-pixel filter on 1-pixel images is the MLP kernel on the channels
    cn, ct = analytic_conv_ntk(x1[:, :, None], x2[:, :, None], depth, 1, "relu", "flatten", "valid", 1.4, 0.2)
    np.testing.assert_allclose(cn.numpy(), k_ref, rtol=1e-12)
    np.testing.assert_allclose(ct.numpy(), t_ref, rtol=1e-12)
