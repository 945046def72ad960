"""Analytic NNGP / NTK: hand-computed closed forms, Monte-Carlo wide random nets, finite gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from symgen.errors import ConfigError, ShapeError
from symgen.ntk import NTKLinear, analytic_ntk, ntk_mlp

F64 = torch.float64


def test_identity_depth1_hand_computed():
    # x.x'/d = (3 - 2)/2 = 0.5;  W = 2, b = 0.5:  K1 = 4*0.5 + .25 = 2.25, K2 = 4*2.25 + .25 = 9.25,
    # Theta2 = K2 + W^2 Theta1 = 9.25 + 4 * 2.25 = 18.25.
    x1 = torch.tensor([[1.0, 2.0]], dtype=F64)
    x2 = torch.tensor([[3.0, -1.0]], dtype=F64)
    nngp, ntk = analytic_ntk(x1, x2, 1, "identity", 2.0, 0.5)
    assert nngp.item() == pytest.approx(9.25, rel=1e-14)
    assert ntk.item() == pytest.approx(18.25, rel=1e-14)
    # depth 0 (one Dense): K = Theta = 2.25
    nngp0, ntk0 = analytic_ntk(x1, x2, 0, "identity", 2.0, 0.5)
    assert nngp0.item() == pytest.approx(2.25) and ntk0.item() == pytest.approx(2.25)


def test_identity_depth_general_closed_form():
    # Deep linear net, b = 0: K_l = W^(2l) c,  Theta_L = (L) W^(2L) c  for L Dense layers.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    c = x @ x.T / 6
    w = 1.3
    for depth in range(4):
        layers = depth + 1
        nngp, ntk = analytic_ntk(x, None, depth, "identity", w, 0.0)
        torch.testing.assert_close(nngp, w ** (2 * layers) * c)
        torch.testing.assert_close(ntk, layers * w ** (2 * layers) * c)


def test_relu_depth1_hand_computed():
    # x = e1, x' = e2 in d = 2, W = 1, b = 0: c11 = c22 = 1/2, c12 = 0.
    # ReLU: E[relu u relu v] at rho = 0 is sqrt(c11 c22)/(2 pi) = 1/(4 pi); diagonal c/2 = 1/4.
    # Theta1 = K1, so Theta2(x, x') = K2 + W^2 Theta1 * 1/4 = 1/(4 pi); Theta2(x, x) = 1/4 + (1/2)(1/2).
    x = torch.eye(2, dtype=F64)
    nngp, ntk = analytic_ntk(x, x, 1, "relu", 1.0, 0.0)
    torch.testing.assert_close(nngp, torch.tensor([[0.25, 1 / (4 * math.pi)], [1 / (4 * math.pi), 0.25]], dtype=F64))
    torch.testing.assert_close(ntk, torch.tensor([[0.5, 1 / (4 * math.pi)], [1 / (4 * math.pi), 0.5]], dtype=F64))


def _np_relu_recursion(x1, x2, depth, w, b):
    """Independent numpy transcription of the arc-cosine recursion (plain arccos, no safety)."""
    d = x1.shape[1]
    k12 = w**2 * x1 @ x2.T / d + b**2
    k11 = w**2 * (x1**2).sum(1) / d + b**2
    k22 = w**2 * (x2**2).sum(1) / d + b**2
    t = k12.copy()
    for _ in range(depth):
        norm = np.sqrt(np.outer(k11, k22))
        th = np.arccos(np.clip(k12 / norm, -1, 1))
        k12 = norm * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
        t = t * (np.pi - th) / (2 * np.pi)
        k11, k22 = k11 / 2, k22 / 2
        k12, k11, k22 = w**2 * k12 + b**2, w**2 * k11 + b**2, w**2 * k22 + b**2
        t = k12 + w**2 * t
    return k12, t


@pytest.mark.parametrize("depth", [1, 3])
def test_relu_matches_numpy_recursion_incl_near_parallel(depth):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=g, dtype=F64)
    # rows with correlations 1 - 1e-9 .. 1 - 1e-3 (both sides of the expansion edge) and -1 + 1e-8
    base = x[0]
    perp = x[1] - (x[1] @ base) / (base @ base) * base
    perp = perp / perp.norm() * base.norm()
    near = [math.cos(a) * base + math.sin(a) * perp for a in (1e-5, 3e-4, 1e-3, 4e-2)]
    anti = math.cos(math.pi - 1e-4) * base + math.sin(math.pi - 1e-4) * perp
    xs = torch.cat([x, torch.stack(near + [anti])])
    nngp, ntk = analytic_ntk(xs, xs, depth, "relu", 1.5, 0.2)
    k_ref, t_ref = _np_relu_recursion(xs.numpy(), xs.numpy(), depth, 1.5, 0.2)
    np.testing.assert_allclose(nngp.numpy(), k_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ntk.numpy(), t_ref, rtol=1e-7, atol=1e-10)


def test_erf_monte_carlo_gaussian_expectation():
    # One erf layer: E[erf(u) erf(v)] and E[erf'(u) erf'(v)] for (u, v) ~ N(0, C) by sampling.
    g = torch.Generator().manual_seed(2)
    x = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]], dtype=F64)
    w, b = 1.2, 0.3
    cov = w**2 * x @ x.T / 3 + b**2
    z = torch.randn(2_000_000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    e_act = (torch.erf(z[:, 0]) * torch.erf(z[:, 1])).mean()
    dz = 2 / math.sqrt(math.pi) * torch.exp(-(z**2))
    e_der = (dz[:, 0] * dz[:, 1]).mean()
    nngp, ntk = analytic_ntk(x, None, 1, "erf", w, b)
    assert nngp[0, 1].item() == pytest.approx(w**2 * e_act.item() + b**2, abs=3e-3)
    assert ntk[0, 1].item() == pytest.approx(
        w**2 * e_act.item() + b**2 + w**2 * cov[0, 1].item() * e_der.item(), abs=3e-3
    )


def _empirical_kernels(net, x):
    """NNGP estimate (last layer's features averaged over units) and NTK = J J^T by dense jacrev."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p):
        return functional_call(net, p, (x,))[:, 0]

    jac = jacrev(f)(params)
    ntk = sum(j.reshape(x.shape[0], -1) @ j.reshape(x.shape[0], -1).T for j in jac.values())
    last = net[-1]
    feats = net[:-1](x)
    nngp = last.weight_std**2 * feats @ feats.T / feats.shape[1] + last.bias_std**2
    return nngp, ntk


@pytest.mark.parametrize(
    "activation,depth,width,tol", [("relu", 1, 16384, 0.03), ("relu", 2, 2048, 0.12), ("erf", 2, 2048, 0.12)]
)
def test_monte_carlo_wide_random_net(activation, depth, width, tol):
    # Empirical kernels of one random net fluctuate as O(1/sqrt(width)) around the analytic limit.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 10, generator=g, dtype=F64)
    x[5] = x[4]  # a repeated input (x = x')
    w, b = 1.4, 0.3
    nngp_ref, ntk_ref = analytic_ntk(x, x, depth, activation, w, b)
    errs = []
    for n in (64, width):
        net = ntk_mlp(10, n, depth, 1, activation, w, b, generator=n, dtype=F64)
        nngp, ntk = _empirical_kernels(net, x)
        errs.append(((ntk - ntk_ref).norm() / ntk_ref.norm()).item())
    assert ((nngp - nngp_ref).norm() / nngp_ref.norm()).item() < tol
    assert errs[1] < tol
    assert errs[1] < errs[0]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
def test_input_gradients_finite_everywhere(activation, dtype):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4, 5, generator=g, dtype=dtype)
    base[1] = 0.0  # zero input (norm 0; with b = 0 the correlation is undefined)
    base[2] = -base[3]  # rho = -1
    for bias in (0.0, 0.1):
        x1 = base.clone().requires_grad_(True)
        x2 = base.clone().requires_grad_(True)  # x1 = x2 as separate tensors
        nngp, ntk = analytic_ntk(x1, x2, 2, activation, 1.3, bias)
        gx1, gx2 = torch.autograd.grad((nngp + ntk).sum(), (x1, x2))
        assert torch.isfinite(nngp).all() and torch.isfinite(ntk).all()
        assert torch.isfinite(gx1).all() and torch.isfinite(gx2).all()
        x = base.clone().requires_grad_(True)  # the very same tensor on both sides
        nngp, ntk = analytic_ntk(x, x, 2, activation, 1.3, bias)
        (gx,) = torch.autograd.grad(ntk.diagonal().sum() + nngp.sum(), (x,))
        assert torch.isfinite(gx).all()


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_input_gradients_match_finite_differences(activation):
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    x2 = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: analytic_ntk(a, c, 2, activation, 1.2, 0.1), (x1, x2))


def test_float64_option_and_symmetry():
    x1 = torch.randn(3, 4)
    x2 = torch.randn(5, 4)
    nngp, ntk = analytic_ntk(x1, x2, 2, "relu", 1.4, 0.1, dtype=F64)
    assert nngp.dtype == F64 and ntk.dtype == F64 and nngp.shape == (3, 5)
    nngp_t, ntk_t = analytic_ntk(x2, x1, 2, "relu", 1.4, 0.1, dtype=F64)
    torch.testing.assert_close(nngp, nngp_t.T)
    torch.testing.assert_close(ntk, ntk_t.T)
    k32, t32 = analytic_ntk(x1, x2, 2, "relu", 1.4, 0.1)
    assert k32.dtype == torch.float32
    torch.testing.assert_close(t32.double(), ntk, rtol=1e-5, atol=1e-6)
    # image-shaped inputs are flattened
    k_img, _ = analytic_ntk(x1.reshape(3, 1, 2, 2), x2.reshape(5, 1, 2, 2), 2, "relu", 1.4, 0.1, dtype=F64)
    torch.testing.assert_close(k_img, nngp)


def test_bad_input_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="activation"):
        analytic_ntk(x, x, 1, "tanh")
    with pytest.raises(ConfigError, match="depth"):
        analytic_ntk(x, x, -1)
    with pytest.raises(ShapeError, match="features"):
        analytic_ntk(x, torch.randn(2, 5), 1)
    with pytest.raises(ConfigError):
        ntk_mlp(4, 8, 1, activation="gelu")


def test_ntk_linear_parameterization():
    layer = NTKLinear(4, 3, weight_std=2.0, bias_std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4)
    expected = x @ (layer.weight * 2.0 / 2.0).T + 0.5 * layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert NTKLinear(4, 3, bias_std=0.0).bias is None


def test_ntk_mlp_and_layer_draw_from_the_given_seed():
    # W, b ~ N(0, 1) drawn in layer order from one generator; a seed means torch.Generator().manual_seed(seed).
    g = torch.Generator().manual_seed(3)
    w1, b1 = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    w2, b2 = torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    for generator in (3, torch.Generator().manual_seed(3)):
        net = ntk_mlp(4, 6, 1, 2, bias_std=0.1, generator=generator)
        for got, want in zip([net[1].weight, net[1].bias, net[3].weight, net[3].bias], [w1, b1, w2, b2], strict=True):
            torch.testing.assert_close(got.detach(), want)
    torch.testing.assert_close(ntk_mlp(4, 6, 1)[1].weight, ntk_mlp(4, 6, 1, generator=0)[1].weight)  # None = seed 0
    layer = NTKLinear(4, 3, generator=9)
    torch.testing.assert_close(layer.weight.detach(), torch.randn(3, 4, generator=torch.Generator().manual_seed(9)))
