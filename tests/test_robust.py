"""Tests for symgen.robust: attacks against closed forms, eps-ball / clamp invariants, eigen-features."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from symgen.errors import ConfigError, DivergenceError, ShapeError, SymgenError
from symgen.robust import (
    accuracy,
    adversarial_training,
    attack_loss,
    eigen_features,
    fgsm,
    kernel_predictor,
    ntk_feature_robustness,
    pgd,
)

D64 = torch.float64


def rbf(a: torch.Tensor, b: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """A differentiable Gaussian kernel written here, independent of symgen.ntk."""
    a2, b2 = a.flatten(1), b.flatten(1)
    d2 = (a2[:, None, :] - b2[None, :, :]).pow(2).sum(-1)
    return torch.exp(-gamma * d2)


def mlp(dim: int = 6, classes: int = 3, dtype=D64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_pgd_stays_in_ball_and_range(norm, random_start, clamp):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 2, 3, generator=g, dtype=D64)
    y = torch.randint(0, 3, (40,), generator=g)
    model = mlp()
    eps = 0.3 if norm == "linf" else 0.8
    for x_adv in (
        pgd(model, x, y, eps, step_size=0.5, steps=7, norm=norm, clamp=clamp, random_start=random_start, batch_size=16),
        fgsm(model, x, y, eps, norm=norm, clamp=clamp),
    ):
        d = (x_adv - x).flatten(1)
        size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
        assert (size <= eps * (1 + 1e-9)).all()
        if clamp is not None:
            assert x_adv.min() >= clamp[0] and x_adv.max() <= clamp[1]
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


def linear_binary(w: torch.Tensor, b: float):
    return lambda x: x.flatten(1) @ w + b


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_closed_form_worst_case_of_linear_model(norm):
    # For f(x) = w.x + b and the margin loss -y f, max over the eps-ball is -y f(x) + eps ||w||_*,
    # with the dual norm ||.||_* = l1 for linf and l2 for l2.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=g, dtype=D64)
    x = torch.randn(30, 5, generator=g, dtype=D64)
    y = torch.randint(0, 2, (30,), generator=g)
    f = linear_binary(w, 0.2)
    eps = 0.25
    clean = attack_loss(f(x), y, "margin")
    dual = w.abs().sum() if norm == "linf" else w.norm()
    for x_adv in (pgd(f, x, y, eps, steps=5, norm=norm, random_start=False), fgsm(f, x, y, eps, norm=norm)):
        adv = attack_loss(f(x_adv), y, "margin")
        torch.testing.assert_close(adv, clean + eps * dual, rtol=1e-10, atol=1e-10)
    # From a random start, steps of length eps halve the l2 angle to the optimum each time
    # (linf iterates hit it exactly).
    adv = attack_loss(f(pgd(f, x, y, eps, step_size=eps, steps=10, norm=norm, generator=1)), y, "margin")
    assert (adv <= clean + eps * dual + 1e-10).all()
    assert (adv >= clean + eps * dual * 0.999).all()


def test_pgd_increases_loss_of_a_network():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(50, 6, generator=g, dtype=D64)
    model = mlp()
    y = model(x).argmax(1)  # all correct at clean inputs
    clean = attack_loss(model(x), y, "ce")
    adv = attack_loss(model(pgd(model, x, y, 0.3, steps=10, norm="linf")), y, "ce")
    assert (adv > clean).all()
    assert accuracy(model(x), y) == 1.0
    # A pure eps = 0 attack is the identity.
    torch.testing.assert_close(pgd(model, x, y, 0.0, steps=3), x)


def test_attack_does_not_touch_parameter_grads_and_is_seeded():
    model = mlp()
    x = torch.rand(8, 6, dtype=D64)
    y = torch.zeros(8, dtype=torch.long)
    a = pgd(model, x, y, 0.1, steps=2, generator=5)
    b = pgd(model, x, y, 0.1, steps=2, generator=5)
    torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())
    # A seed and a torch.Generator seeded alike give the same random start; None means seed 0.
    torch.testing.assert_close(pgd(model, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(5)), a)
    torch.testing.assert_close(pgd(model, x, y, 0.1, steps=2), pgd(model, x, y, 0.1, steps=2, generator=0))
    # One step of size 0 leaves the random start: uniform in the linf ball, drawn as 2 U - 1 times eps.
    start = pgd(model, x, y, 0.1, step_size=0.0, steps=1, generator=7)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=D64)
    torch.testing.assert_close(start, x + (2 * u - 1) * 0.1)


def test_kernel_predictor_matches_solve_and_pgd_through_kernel():
    g = torch.Generator().manual_seed(2)
    x_tr = torch.rand(40, 4, generator=g, dtype=D64)
    y_tr = (x_tr[:, 0] > 0.5).long()
    x_te = torch.rand(25, 4, generator=g, dtype=D64)
    y_te = (x_te[:, 0] > 0.5).long()
    ridge = 1e-3
    pred = kernel_predictor(rbf, x_tr, y_tr, ridge)
    targets = torch.where(y_tr > 0, 1.0, -1.0).to(D64)
    ref = rbf(x_te, x_tr) @ torch.linalg.solve(rbf(x_tr, x_tr) + ridge * torch.eye(40, dtype=D64), targets)
    torch.testing.assert_close(pred(x_te), ref, rtol=1e-8, atol=1e-8)
    clean = attack_loss(pred(x_te), y_te, "margin")
    x_adv = pgd(pred, x_te, y_te, 0.1, steps=10, norm="linf", clamp=(0.0, 1.0))
    assert (attack_loss(pred(x_adv), y_te, "margin") >= clean - 1e-12).all()
    assert attack_loss(pred(x_adv), y_te, "margin").mean() > clean.mean()


@pytest.mark.parametrize("multiclass", [False, True])
def test_eigen_features_sum_to_kernel_predictor(multiclass):
    g = torch.Generator().manual_seed(4)
    x_tr = torch.randn(30, 3, generator=g, dtype=D64)
    x_te = torch.randn(12, 3, generator=g, dtype=D64)
    y = torch.randn(30, 4, generator=g, dtype=D64) if multiclass else torch.randn(30, generator=g, dtype=D64)
    k, kt = rbf(x_tr, x_tr), rbf(x_te, x_tr)
    ridge = 1e-2
    evals, feats, _, _ = eigen_features(k, kt, y, ridge)
    ref = kt @ torch.linalg.solve(k + ridge * torch.eye(30, dtype=D64), y)
    torch.testing.assert_close(feats.sum(1), ref, rtol=0, atol=1e-6)
    assert (evals[:-1] >= evals[1:]).all()
    # A truncated set is the leading part of the full one.
    evals5, feats5, _, _ = eigen_features(k, kt, y, ridge, num_features=5)
    torch.testing.assert_close(feats5, feats[:, :5])


def test_feature_robustness_scores():
    g = torch.Generator().manual_seed(5)
    x_tr = torch.rand(40, 4, generator=g, dtype=D64)
    y_tr = (x_tr[:, 0] + x_tr[:, 1] > 1).long()
    x_te = torch.rand(30, 4, generator=g, dtype=D64)
    y_te = (x_te[:, 0] + x_te[:, 1] > 1).long()
    none = functools.partial(pgd, eps=0.0, steps=1)
    res0 = ntk_feature_robustness(rbf, x_tr, y_tr, x_te, y_te, none, ridge=1e-3, num_features=6)
    assert res0.usefulness == res0.robustness  # eps = 0: robustness is usefulness
    assert len(res0.eigenvalues) == 6 and res0.predictor_accuracy > 0.8
    atk = functools.partial(pgd, eps=0.2, steps=10, clamp=(0.0, 1.0))
    res = ntk_feature_robustness(rbf, x_tr, y_tr, x_te, y_te, atk, ridge=1e-3, num_features=6)
    assert res.usefulness == res0.usefulness
    assert res.predictor_robust_accuracy < res.predictor_accuracy
    assert all(-1 <= c <= 1 for c in res.correlation + res.robust_correlation)
    assert sum(res.robust_correlation) < sum(res.correlation)


def test_adversarial_training_gives_robust_linear_separator():
    # One robust feature (margin 0.3 > eps) and 20 predictive but non-robust ones (size 0.1 < eps):
    # standard training leans on the non-robust ones and falls to 0 robust accuracy; PGD training
    # at eps = 0.2 must use the robust one (Ilyas et al. 2019's construction, arXiv 1905.02175).
    g = torch.Generator().manual_seed(6)
    n = 200
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2.0 * y - 1)[:, None]
    x = torch.cat(
        [s * (0.3 + 0.5 * torch.rand(n, 1, generator=g)), 0.1 * s + 0.05 * torch.randn(n, 20, generator=g)], 1
    )
    robust = {}
    for eps in (0.0, 0.2):
        torch.manual_seed(0)
        model = nn.Linear(21, 2)
        hist = adversarial_training(
            model,
            (x, y),
            functools.partial(pgd, eps=eps, steps=5),
            torch.optim.Adam(model.parameters(), lr=0.05),
            epochs=30,
            batch_size=50,
            generator=0,
        )
        assert len(hist["loss"]) == 30 and all(torch.isfinite(torch.tensor(hist["loss"])))
        assert accuracy(model(x), y) == 1.0
        robust[eps] = accuracy(model(pgd(model, x, y, 0.2, steps=20)), y)
    assert robust[0.0] < 0.5 and robust[0.2] >= 0.95


def test_bad_input_errors():
    model = mlp()
    x = torch.rand(5, 6, dtype=D64)
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ConfigError, match="eps"):
        pgd(model, x, y, -0.1)
    with pytest.raises(ConfigError, match="eps"):
        fgsm(model, x, y, -1.0)
    with pytest.raises(ConfigError, match="norm"):
        pgd(model, x, y, 0.1, norm="l1")
    with pytest.raises(ConfigError, match="clamp"):
        pgd(model, x + 2.0, y, 0.1, clamp=(0.0, 1.0))
    with pytest.raises(ShapeError):
        pgd(model, x, y[:3], 0.1)
    with pytest.raises(ConfigError, match="steps"):
        pgd(model, x, y, 0.1, steps=0)

    def nan_model(z):
        return model(z) * float("nan")

    with pytest.raises(DivergenceError):
        pgd(nan_model, x, y, 0.1)

    def nan_kernel(a, b):
        return rbf(a, b) * float("nan")

    with pytest.raises(SymgenError):
        kernel_predictor(nan_kernel, x, y, 1e-3)
    with pytest.raises(DivergenceError):
        eigen_features(rbf(x, x) * float("nan"), rbf(x, x), y.double(), 1e-3)
    with pytest.raises(ShapeError):
        eigen_features(rbf(x, x), rbf(x, x[:3]), y.double())
    with pytest.raises(ConfigError, match="clean_weight"):
        adversarial_training(
            model,
            (x, y),
            functools.partial(pgd, eps=0.1),
            torch.optim.Adam(model.parameters(), lr=1e-3),
            clean_weight=2.0,
        )
