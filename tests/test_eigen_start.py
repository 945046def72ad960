"""The Lanczos start of ``eigenpairs(start="auto")``: the loss gradient (plus a Gaussian vector) for the largest
eigenpairs of a model operator. Checked against torch.autograd's gradient and a dense eigendecomposition."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen.curvature import GGNOperator, HessianOperator, MatrixOperator
from symgen.errors import ConfigError


def _model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 25, 3)
    ).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(23, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    return model, x, y, [(x[:10], y[:10]), (x[10:], y[10:])]


def _autograd_gradient(model, x, y):
    loss = TF.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("batched", [False, True])
def test_gradient_equals_autograd_on_the_whole_data(cls, batched):
    model, x, y, batches = _model_and_batches()
    op = cls(model, TF.cross_entropy, batches if batched else (x, y))
    ref = _autograd_gradient(model, x, y)
    torch.testing.assert_close(op.gradient(), ref, rtol=1e-10, atol=1e-12)
    # the kept graph's gradient (one batch, cache_graph): the same, and the products still right after it
    if not batched:
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        dense = cls(model, TF.cross_entropy, (x, y), cache_graph=False).matvec(v)
        torch.testing.assert_close(op.matvec(v), dense, rtol=1e-10, atol=1e-12)


def test_sum_reduction_gradient():
    model, x, y, batches = _model_and_batches(1)
    op = HessianOperator(model, TF.cross_entropy, batches, reduction="sum")
    ref = sum(_autograd_gradient(model, xb, yb) for xb, yb in batches)
    torch.testing.assert_close(op.gradient(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_start_finds_the_top_eigenvalues_within_their_bounds(seed):
    model, x, y, _ = _model_and_batches(seed)
    op = HessianOperator(model, TF.cross_entropy, (x, y))
    evals = torch.linalg.eigvalsh(op.dense())
    for k in (1, 3):
        pairs = op.eigenpairs(k, tol=1e-6, generator=seed)
        want = evals.flip(0)[:k]
        assert pairs.converged
        assert ((pairs.values - want).abs() <= pairs.error_bounds + 1e-12).all(), (pairs.values, want)


def test_auto_start_is_the_normalized_gradient_plus_a_gaussian_vector():
    model, x, y, _ = _model_and_batches()
    op = HessianOperator(model, TF.cross_entropy, (x, y))
    g = op.gradient()
    u = torch.randn(1, op.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)[0]
    explicit = op.eigenpairs(1, tol=1e-8, start=u / u.norm() + g / g.norm(), generator=4)
    auto = op.eigenpairs(1, tol=1e-8, generator=4)
    assert auto.num_matvecs == explicit.num_matvecs
    torch.testing.assert_close(auto.values, explicit.values, rtol=1e-12, atol=0)
    # the smallest eigenpairs start from the Gaussian vector alone, as start="random"
    lo_auto = op.eigenpairs(1, "smallest", tol=1e-8, generator=4)
    lo_rand = op.eigenpairs(1, "smallest", tol=1e-8, generator=4, start="random")
    assert lo_auto.num_matvecs == lo_rand.num_matvecs
    torch.testing.assert_close(lo_auto.values, lo_rand.values, rtol=1e-12, atol=0)


def test_a_zero_gradient_falls_back_to_the_gaussian_start():
    # a least-squares loss at its minimum: the gradient is exactly zero
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = model(x).detach()
    op = HessianOperator(model, TF.mse_loss, (x, y))
    assert float(op.gradient().abs().max()) == 0.0
    auto = op.eigenpairs(1, tol=1e-10, generator=2)
    rand = op.eigenpairs(1, tol=1e-10, generator=2, start="random")
    torch.testing.assert_close(auto.values, rand.values, rtol=1e-12, atol=0)
    torch.testing.assert_close(auto.values, torch.linalg.eigvalsh(2 * x.T @ x / 8).max()[None], rtol=1e-10, atol=0)


def test_start_argument_is_checked_and_plain_operators_start_at_random():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    op = MatrixOperator(A)
    assert op.start_direction() is None
    auto = op.eigenpairs(1, tol=1e-8, generator=0)
    rand = op.eigenpairs(1, tol=1e-8, generator=0, start="random")
    torch.testing.assert_close(auto.values, rand.values, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="start must be"):
        op.eigenpairs(1, start="gradient")
