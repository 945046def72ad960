"""NTK overlap against principal angles of explicit Jacobians (scipy), and the linearized prediction after
training on a new task against actual training of a model that is linear in its parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from torch import nn

from symgen.errors import ConfigError, ShapeError
from symgen.ntk import ntk_mlp, ntk_overlap, overlap_from_kernels, predict_after_training, task_kernels


def _jacobian(model, x):
    """(N O, P) Jacobian rows (sample, output) by an explicit loop of autograd calls."""
    rows = []
    for xi in x:
        out = model(xi[None])[0]
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_overlap_cosines_equal_principal_angles_of_jacobian_row_spaces():
    model = ntk_mlp(5, 16, 1, out_features=2, bias_std=0.1, generator=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    ov = ntk_overlap(model, (xa, None), xb)
    ja, jb = _jacobian(model, xa).detach().numpy(), _jacobian(model, xb).detach().numpy()
    ref = np.sort(np.cos(subspace_angles(ja.T, jb.T)))[::-1]
    assert ov.rank_a == 12 and ov.rank_b == 8
    np.testing.assert_allclose(ov.cosines.numpy(), ref, atol=1e-8)
    assert ov.mean_squared_cosine == pytest.approx(float(np.sum(ref**2) / 8))


def test_identical_and_orthogonal_tasks():
    k = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    same = overlap_from_kernels(k, k, k)
    assert same.cosines.tolist() == pytest.approx([1.0, 1.0]) and same.mean_squared_cosine == pytest.approx(1.0)
    ortho = overlap_from_kernels(k, torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    assert ortho.mean_squared_cosine == 0.0
    assert overlap_from_kernels(k, k, k, num_components=1).rank_a == 1


def test_prediction_equals_training_a_model_linear_in_its_parameters():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    yb = torch.randn(7, 3, generator=g, dtype=torch.float64)
    k_aa, k_ab, k_bb = task_kernels(model, xa, xb, method="jacobian")
    with torch.no_grad():
        fa, fb = model(xa), model(xb)
    steps, lr = [5, 40], 0.3
    pred = predict_after_training(k_bb, k_ab, fb, fa, yb, steps, lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    measured = {}
    for s in range(1, 41):
        opt.zero_grad()
        (0.5 * ((model(xb) - yb) ** 2).sum() / 7).backward()
        opt.step()
        if s in steps:
            measured[s] = model(xa).detach()
    torch.testing.assert_close(pred[0], measured[5], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred[1], measured[40], rtol=1e-9, atol=1e-9)
    conv = predict_after_training(k_bb, k_ab, fb, fa, yb, None, ridge=1e-6)  # rank 15 < 21 rows: regularize
    late = predict_after_training(k_bb, k_ab, fb, fa, yb, 1e6, lr)
    torch.testing.assert_close(conv, late, rtol=1e-4, atol=1e-4)


def test_overlap_bad_input():
    k = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ShapeError, match="k_ab"):
        overlap_from_kernels(k, torch.zeros(3, 2), k)
    with pytest.raises(ConfigError, match="num_components"):
        overlap_from_kernels(k, k, k, num_components=0)
    with pytest.raises(ShapeError, match="inputs x"):
        ntk_overlap(nn.Linear(2, 1), [], torch.zeros(2, 2))
    with pytest.raises(ShapeError, match="output='full'"):
        predict_after_training(k, k, torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), 1.0, 0.1)
    with pytest.raises(ConfigError, match="lr"):
        predict_after_training(k, k, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), 1.0)
