"""GGNOperator against a dense J^T H_loss J built from explicit Jacobians (torch.autograd.functional)."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from symgen.curvature import GGNOperator, HessianOperator
from symgen.errors import ConfigError

D = torch.float64


def _mse(out, t):
    return 0.5 * ((out - t) ** 2).sum(1).mean()


def _mlp(bn: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    m = nn.Sequential(*layers).to(D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
        if bn:  # non-trivial running statistics
            m.train()
            m(torch.randn(32, 5, generator=g, dtype=D) * 2 + 0.5)
    return m


def _data(n: int, classes: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=D)
    y = torch.randint(0, 3, (n,), generator=g) if classes else torch.randn(n, 3, generator=g, dtype=D)
    return x, y


def _dense_ggn(
    m: nn.Module, loss_fn, batches, bn_mode: str = "eval", reduction: str = "mean", names: list[str] | None = None
) -> torch.Tensor:
    """sum_b w_b J_b^T H_b J_b with J_b = jacobian of the batch outputs and H_b = hessian of the loss in them."""
    named = dict(m.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    total = sum(x.shape[0] for x, _ in batches)
    G = torch.zeros(flat.numel(), flat.numel(), dtype=D)
    for x, y in batches:

        def outputs(v, x=x):
            params, i = {}, 0
            for n, s in zip(names, shapes, strict=True):
                params[n] = v[i : i + s.numel()].view(s)
                i += s.numel()
            was = m.training
            m.train(bn_mode == "train")
            bufs = {k: b.clone() for k, b in m.named_buffers()}
            out = functional_call(m, (params, bufs), (x,))
            m.train(was)
            return out.reshape(-1)

        out = outputs(flat)
        J = jacobian(outputs, flat)  # (N C, n)
        H = hessian(lambda o, y=y, shape=(x.shape[0], -1): loss_fn(o.view(shape), y), out.detach())
        w = x.shape[0] / total if reduction == "mean" else 1.0
        G += w * J.T @ H @ J
    return G


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_ggn_matches_dense_jacobian_product(loss, bn_mode):
    m = _mlp(bn=True)
    loss_fn = _mse if loss == "mse" else TF.cross_entropy
    x, y = _data(20, classes=loss == "cross_entropy")
    before = {k: b.clone() for k, b in m.named_buffers()}
    ref = _dense_ggn(m, loss_fn, [(x, y)], bn_mode)
    for batching in ("loop", "vmap"):
        G = GGNOperator(m, loss_fn, (x, y), bn_mode=bn_mode, batching=batching)
        assert torch.allclose(G.dense(), ref, atol=1e-12), batching
    assert all(torch.equal(before[k], b) for k, b in m.named_buffers())  # running statistics untouched
    assert m.training  # module mode restored


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_loader_of_uneven_batches_and_parameter_subset(reduction):
    m = _mlp()
    x, y = _data(23, classes=True)
    loader = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    ref = _dense_ggn(m, TF.cross_entropy, loader, reduction=reduction)
    for batching in ("loop", "vmap"):
        G = GGNOperator(m, TF.cross_entropy, loader, reduction=reduction, batching=batching, chunk_size=7)
        assert torch.allclose(G.dense(), ref, atol=1e-12), batching
    names = ["2.weight", "2.bias"]
    sub = _dense_ggn(m, TF.cross_entropy, loader, reduction=reduction, names=names)
    G = GGNOperator(m, TF.cross_entropy, loader, reduction=reduction, param_names=names)
    assert torch.allclose(G.dense(), sub, atol=1e-12)
    n0 = sum(p.numel() for p in list(m.parameters())[:2])
    assert torch.allclose(sub, ref[n0:, n0:], atol=1e-12)  # a sub-block of the full GGN


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_ggn_quadratic_forms_are_forward_products_equal_to_the_dense_forms(loss, bn_mode):
    """z^T G z = (J z)^T H (J z) without the vector-Jacobian product, over uneven batches, equal to the dense
    GGN's forms; traces and the product path agree."""
    m = _mlp(bn=True)
    loss_fn = _mse if loss == "mse" else TF.cross_entropy
    x, y = _data(23, classes=loss == "cross_entropy")
    loader = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    ref = _dense_ggn(m, loss_fn, loader, bn_mode)
    V = torch.randn(ref.shape[0], 5, generator=torch.Generator().manual_seed(3), dtype=D)
    want = ((ref @ V) * V).sum(0)
    for batching in ("loop", "vmap"):
        G = GGNOperator(m, loss_fn, loader, bn_mode=bn_mode, batching=batching)
        got = G.quadratic_forms(V)
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-12), (batching, got, want)
        assert torch.allclose(got, ((G.matmat(V)) * V).sum(0), atol=1e-12)
    est = GGNOperator(m, loss_fn, loader, bn_mode=bn_mode).trace(num_matvecs=400, generator=0)
    assert abs(est.value - float(ref.trace())) <= 4 * est.stderr + 1e-9


def test_ggn_equals_hessian_for_mse_on_a_linear_model():
    """The model is linear in W, so the second-derivative term vanishes: G = H (dense autograd Hessian)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 3).to(D)
    x, t = torch.randn(40, 6, generator=g, dtype=D), torch.randn(40, 3, generator=g, dtype=D)
    W, b = lin.weight.detach(), lin.bias.detach()

    def loss_of(v):
        return _mse(x @ v[:18].view(3, 6).T + v[18:], t)

    H_ref = hessian(loss_of, torch.cat([W.reshape(-1), b]))
    G = GGNOperator(lin, _mse, (x, t))
    assert torch.allclose(G.dense(), H_ref, atol=1e-12)
    assert torch.allclose(HessianOperator(lin, _mse, (x, t)).dense(), G.dense(), atol=1e-12)


def test_ggn_is_positive_semidefinite_for_convex_losses():
    m = _mlp()
    x, y = _data(30, classes=True)
    G = GGNOperator(m, TF.cross_entropy, (x, y))
    H = HessianOperator(m, TF.cross_entropy, (x, y))
    ev_g = torch.linalg.eigvalsh(G.dense())
    top = float(ev_g[-1])
    assert float(ev_g[0]) >= -1e-12 * top
    low = G.eigenvalues(1, "smallest", generator=0, tol=1e-6, max_steps=G.dim)
    assert float(low[0]) >= -1e-8 * top
    # the top eigenvalue by Lanczos (what symgen.audit reports) matches the dense spectrum
    assert abs(float(G.eigenvalues(1, generator=0)[0]) - top) <= 1e-4 * top
    # this Hessian has negative curvature that the GGN drops
    assert float(torch.linalg.eigvalsh(H.dense())[0]) < -1e-6


def test_ggn_bad_input():
    m = _mlp()
    x, y = _data(8, classes=True)
    with pytest.raises(ConfigError, match="bn_mode"):
        GGNOperator(m, TF.cross_entropy, (x, y), bn_mode="batch")
    with pytest.raises(ConfigError, match="not trainable parameters"):
        GGNOperator(m, TF.cross_entropy, (x, y), param_names=["nope"])

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).to(D)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(ConfigError, match="one tensor"):
        GGNOperator(Pair(), TF.cross_entropy, (x, y)).matvec(torch.zeros(18, dtype=D))
