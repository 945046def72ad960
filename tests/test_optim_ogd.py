"""OGD against the explicit projector I - G^T (G G^T)^+ G, and the exact no-forgetting property of a model
linear in its parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symgen.errors import ConfigError, ShapeError
from symgen.optim import OGD, LossClosure


def _grads(model, x):
    rows = []
    for xi in x:
        out = model(xi[None])[0]
        for o in range(out.shape[0]):
            gs = torch.autograd.grad(out[o], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def test_step_equals_sgd_with_explicitly_projected_gradient():
    model = _net()
    xa = torch.randn(4, 3, dtype=torch.float64)
    opt = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.store_task(model, xa) == 8
    g = _grads(model, xa).detach()
    proj = torch.eye(g.shape[1], dtype=torch.float64) - g.T @ torch.linalg.pinv(g @ g.T) @ g
    torch.testing.assert_close(opt.basis() @ opt.basis().T, torch.eye(8, dtype=torch.float64))
    xb, yb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    closure = LossClosure(model, nn.functional.mse_loss, xb, yb)
    closure()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step(LossClosure(model, nn.functional.mse_loss, xb, yb))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, before - 0.1 * proj @ grad)


def test_linear_model_does_not_forget_stored_outputs():
    torch.manual_seed(1)
    model = nn.Linear(6, 3).double()
    xa = torch.randn(2, 6, dtype=torch.float64)
    opt = OGD(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9)
    opt.store_task(model, xa)
    fa = model(xa).detach()
    xb, yb = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    for _ in range(30):
        opt.step(LossClosure(model, nn.functional.mse_loss, xb, yb))
    torch.testing.assert_close(model(xa).detach(), fa)  # exactly: the outputs' gradients do not depend on W
    plain = nn.Linear(6, 3).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items()})
    assert nn.functional.mse_loss(model(xb), yb) < nn.functional.mse_loss(torch.zeros_like(yb), yb)


def test_outputs_variants_and_state_dict_roundtrip():
    model = _net()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    opt = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.store_task(model, x, outputs="average") == 3
    assert opt.store_task(model, x, y, outputs="ground_truth") == 3
    assert opt.num_directions == 6
    assert opt.store_task(model, x, outputs="average") == 0  # already in the span
    other = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    other.load_state_dict(opt.state_dict())
    torch.testing.assert_close(other.basis(), opt.basis())


def test_ogd_bad_input():
    model = _net()
    with pytest.raises(ConfigError, match="class"):
        OGD(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    opt = OGD(model.parameters(), lr=0.1, max_directions=2)
    with pytest.raises(ConfigError, match="max_directions"):
        opt.store_task(model, torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="flat"):
        opt.add_directions(torch.zeros(1, 5))
    with pytest.raises(ConfigError, match="outputs"):
        opt.store_task(model, torch.randn(1, 3, dtype=torch.float64), outputs="max")
    with pytest.raises(ShapeError, match="labels"):
        opt.store_task(model, torch.randn(1, 3, dtype=torch.float64), outputs="ground_truth")
    with pytest.raises(ConfigError, match="not the model"):
        OGD(nn.Linear(2, 2).parameters(), lr=0.1).store_task(model, torch.randn(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("outputs", ["all", "average", "ground_truth"])
def test_implicit_form_equals_explicit_projector(outputs):
    model = _net()
    xa, ya = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    implicit = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    k = implicit.store_task(model, xa, ya, outputs=outputs, form="implicit", batch_size=3)
    assert k == {"all": 8, "average": 4, "ground_truth": 4}[outputs] == implicit.num_directions
    g = _grads(model, xa).detach()  # independent: output gradients by a loop of autograd.grad
    if outputs == "average":
        g = g.reshape(4, 2, -1).mean(1)
    elif outputs == "ground_truth":
        g = g.reshape(4, 2, -1)[torch.arange(4), ya]
    proj = torch.eye(g.shape[1], dtype=torch.float64) - g.T @ torch.linalg.pinv(g @ g.T) @ g
    torch.testing.assert_close(implicit.basis() @ implicit.basis().T, torch.eye(k, dtype=torch.float64))
    xb, yb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    for _ in range(3):  # the projector is the one at the stored weights, also after the weights moved
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        model.zero_grad()
        LossClosure(model, nn.functional.mse_loss, xb, yb)()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        implicit.step(LossClosure(model, nn.functional.mse_loss, xb, yb))
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(after, before - 0.1 * proj @ grad)


def test_implicit_form_rank_and_one_task_only():
    model = _net()
    xa = torch.randn(2, 3, dtype=torch.float64)
    opt = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.store_task(model, torch.cat([xa, xa]), form="implicit") == 4  # duplicated inputs: rank 4, not 8
    with pytest.raises(ConfigError, match="one task"):
        opt.store_task(model, xa)
    with pytest.raises(ConfigError, match="one task"):
        opt.add_directions(torch.zeros(1, opt.basis().shape[1], dtype=torch.float64))
    explicit = OGD(model.parameters(), torch.optim.SGD, lr=0.1)
    explicit.store_task(model, xa)
    with pytest.raises(ConfigError, match="no stored directions"):
        explicit.store_task(model, xa, form="implicit")
    with pytest.raises(ConfigError, match="form"):
        explicit.store_task(model, xa, form="lazy")
    with pytest.raises(ConfigError, match="max_directions"):
        OGD(model.parameters(), lr=0.1, max_directions=2).store_task(model, xa, form="implicit")
