"""Tests for symgen.ntk.kip: the KIP loss against a direct solve, its gradient, descent, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symgen.errors import CheckpointError, ConfigError, DivergenceError, MissingDataError, ShapeError
from symgen.labels import centred_one_hot
from symgen.ntk import analytic_ntk, empirical_ntk, empirical_ntk_fn
from symgen.ntk.kip import kip, kip_loss, load_support, save_support

D64 = torch.float64


def rbf(a: torch.Tensor, b: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """Gaussian kernel written here, independent of symgen.ntk."""
    d2 = (a.flatten(1)[:, None, :] - b.flatten(1)[None, :, :]).pow(2).sum(-1)
    return torch.exp(-gamma * d2)


def ntk_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return analytic_ntk(a, b, depth=2, weight_std=math.sqrt(2.0), bias_std=0.1)[1]


def blobs(n_per_class: int = 30, classes: int = 3, dim: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g, dtype=D64)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g, dtype=D64)
    return x, y


def test_kip_loss_matches_direct_solve_and_finite_differences():
    x, y = blobs()
    xs, ys = x[::16].clone(), centred_one_hot(y[::16], 3, D64)
    xt, yt = x[1::4], centred_one_hot(y[1::4], 3, D64)
    ridge = 1e-3
    loss, pred = kip_loss(rbf, xs, ys, xt, yt, ridge)
    kss = rbf(xs, xs)
    n = kss.shape[0]
    ref_pred = rbf(xt, xs) @ torch.linalg.solve(kss + ridge * kss.trace() / n * torch.eye(n, dtype=D64), ys)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * (ref_pred - yt).pow(2).mean(), rtol=1e-10, atol=1e-14)

    # The gradient through kernel, trace-relative ridge and Cholesky solve matches finite differences
    # (erf NTK: smooth, whereas finite differences of the ReLU NTK's sqrt(1 - rho) term at x = x' amplify
    # rounding noise).
    def erf_ntk(a, b):
        return analytic_ntk(a, b, depth=2, activation="erf", weight_std=1.5, bias_std=0.1)[1]

    assert torch.autograd.gradcheck(
        lambda a, b: kip_loss(erf_ntk, a, b, xt, yt, ridge)[0],
        (xs.clone().requires_grad_(True), ys.clone().requires_grad_(True)),
    )


def test_kip_initialisation_is_class_balanced_real_data():
    x, y = blobs()
    xs, ys, hist = kip(x, y, rbf, support_per_class=4, steps=0, generator=3)
    assert xs.shape == (12, 5) and ys.shape == (12, 3) and hist["loss"] == []
    # every support row is a real example of the class its label says
    for row, label in zip(xs, ys, strict=True):
        match = (x == row).all(1).nonzero().flatten()
        assert len(match) == 1 and y[match[0]].item() == label.argmax().item()
    assert torch.bincount(ys.argmax(1), minlength=3).tolist() == [4, 4, 4]
    torch.testing.assert_close(ys.sum(1), torch.zeros(12, dtype=D64))
    torch.testing.assert_close(ys.max(1).values, torch.full((12,), 1 - 1 / 3, dtype=D64))
    xs2, _, _ = kip(x, y, rbf, support_per_class=4, steps=0, generator=3)
    torch.testing.assert_close(xs, xs2)


@pytest.mark.parametrize("kernel", [rbf, ntk_kernel])
@pytest.mark.parametrize("learn_labels", [False, True])
def test_kip_decreases_loss_on_the_whole_target_set(kernel, learn_labels):
    x, y = blobs(n_per_class=20)
    x0, y0, _ = kip(x, y, kernel, 1, steps=0, generator=1)
    # target_per_class = class size: every step sees the whole data, so the loss is deterministic.
    xs, ys, hist = kip(
        x, y, kernel, 1, steps=60, lr=0.05, learn_labels=learn_labels, ridge=1e-4, generator=1, target_per_class=20
    )
    yt = centred_one_hot(y, 3, D64)
    before = kip_loss(kernel, x0, y0, x, yt, 1e-4)[0].item()
    after = kip_loss(kernel, xs, ys, x, yt, 1e-4)[0].item()
    assert after < 0.7 * before
    assert hist["loss"][0] == pytest.approx(before, rel=1e-10)
    assert len(hist["loss"]) == 60 and all(0 <= a <= 1 for a in hist["batch_accuracy"])
    if learn_labels:
        assert not torch.allclose(ys, y0)
    else:
        torch.testing.assert_close(ys, y0)


def test_empirical_ntk_kernel_plugs_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D64)
    kernel = empirical_ntk_fn(model, differentiable=True)
    x, y = blobs(n_per_class=6)
    # Same kernel as the no-grad structured method (a different implementation).
    torch.testing.assert_close(
        kernel(x[:7], x[3:12]),
        empirical_ntk(model, x[:7], x[3:12], output="trace", method="structured"),
        rtol=1e-9,
        atol=1e-9,
    )
    # Its input gradient matches finite differences (what KIP needs and the no-grad kernel does not give).
    assert torch.autograd.gradcheck(
        lambda a: kernel(a, x[5:9]).sum() + kernel(a, a).sum(), (x[:3].clone().requires_grad_(True),)
    )
    x0, y0, _ = kip(x, y, kernel, 1, steps=0, generator=0)
    xs, ys, hist = kip(x, y, kernel, 1, steps=8, lr=0.05, ridge=1e-3, generator=0, target_per_class=6)
    assert not torch.allclose(xs, x0)
    yt = centred_one_hot(y, 3, D64)
    assert kip_loss(kernel, xs, ys, x, yt, 1e-3)[0] < kip_loss(kernel, x0, y0, x, yt, 1e-3)[0]


def test_save_and_load_roundtrip(tmp_path):
    x, y = blobs()
    xs, ys, _ = kip(x, y, rbf, 2, steps=2, generator=0, target_per_class=5)
    path = save_support(tmp_path / "sub" / "support.pt", xs, ys, dataset="blobs", steps=2)
    x2, y2, meta = load_support(path)
    torch.testing.assert_close(x2, xs)
    torch.testing.assert_close(y2, ys)
    assert meta == {"dataset": "blobs", "steps": 2}
    with pytest.raises(MissingDataError):
        load_support(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        load_support(tmp_path / "junk.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_support(tmp_path / "other.pt")


def test_bad_input_errors():
    x, y = blobs(n_per_class=3)
    with pytest.raises(ConfigError, match="class"):
        kip(x, y, rbf, support_per_class=4, steps=1)
    with pytest.raises(ConfigError, match="target_per_class"):
        kip(x, y, rbf, support_per_class=1, steps=1, target_per_class=5)
    with pytest.raises(ShapeError):
        kip(x, y.double(), rbf, 1, steps=1)
    with pytest.raises(ShapeError):
        kip(x, y[:-1], rbf, 1, steps=1)
    with pytest.raises(ConfigError):
        kip(x, y, rbf, 0, steps=1)
    with pytest.raises(ConfigError):
        kip(x, y, rbf, 1, steps=1, ridge=-1.0)

    def nan_kernel(a, b):
        return rbf(a, b) * float("nan")

    with pytest.raises(DivergenceError):
        kip(x, y, nan_kernel, 1, steps=1, target_per_class=2)

    def negative(a, b):  # not positive semi-definite: tr(K_ss) < 0
        return -rbf(a, b)

    with pytest.raises(DivergenceError):
        kip(x, y, negative, 1, steps=1, target_per_class=2)


def test_generator_seed_or_torch_generator_give_the_same_draws():
    x, y = blobs()
    a = kip(x, y, rbf, 2, steps=3, lr=0.05, generator=4, target_per_class=5)
    b = kip(x, y, rbf, 2, steps=3, lr=0.05, generator=torch.Generator().manual_seed(4), target_per_class=5)
    torch.testing.assert_close(a[0], b[0])
    assert a[2]["loss"] == b[2]["loss"]
    # None means seed 0
    torch.testing.assert_close(kip(x, y, rbf, 2, steps=0)[0], kip(x, y, rbf, 2, steps=0, generator=0)[0])


def test_save_support_is_atomic(tmp_path, monkeypatch):
    x, y = blobs()
    path = save_support(tmp_path / "support.pt", x[:3], centred_one_hot(y[:3], 3, D64), steps=1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_support(path, x[3:9], centred_one_hot(y[3:9], 3, D64), steps=2)
    # The old file is intact and no temporary file is left beside it.
    x2, _, meta = load_support(path)
    torch.testing.assert_close(x2, x[:3])
    assert meta == {"steps": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["support.pt"]
