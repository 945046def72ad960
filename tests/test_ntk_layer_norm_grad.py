"""The empirical NTK differentiated w.r.t. its inputs through LayerNorm (``nn.LayerNorm``, a
``nn.TransformerEncoderLayer``): equal to central differences and to ``torch.autograd`` with ``create_graph``.
torch.func alone gets this mixed derivative wrong through ``native_layer_norm`` (symgen.ntk.layer_norm)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symgen.functional import math_attention
from symgen.ntk import empirical_ntk
from symgen.ntk.layer_norm import composite_layer_norm, layer_norm


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(self.embed(x.view(x.shape[0], 3, 2))).mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))


def _autograd_ntk(model, x):
    """sum_o J_o(x_i) . J_o(x_j), rows by torch.autograd with create_graph (the reference)."""
    params = list(model.parameters())
    rows = []
    for xi in x:
        out = model(xi[None]).squeeze(0)
        per_o = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, create_graph=True)]) for o in out]
        rows.append(torch.stack(per_o))
    J = torch.stack(rows)  # (N, O, P)
    return torch.einsum("iop,jop->ij", J, J)


@pytest.mark.parametrize("make", [_mlp, TinyEncoder], ids=["layernorm-mlp", "transformer-layer"])
def test_input_gradient_of_the_ntk_through_layer_norm(make):
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    w = torch.randn(3, 3, dtype=torch.float64)

    def objective(xx):
        return (empirical_ntk(model, xx, differentiable=True) * w).sum()

    xg = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(objective(xg), xg)
    xr = x.clone().requires_grad_(True)
    with math_attention():  # the fused attention kernels have no double backward
        (ref,) = torch.autograd.grad((_autograd_ntk(model, xr) * w).sum(), xr)
    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros(x.numel(), dtype=x.dtype)
            e[i] = eps
            e = e.view_as(x)
            fd.view(-1)[i] = (objective(x + e) - objective(x - e)) / (2 * eps)
    assert torch.allclose(ref, fd, atol=1e-6, rtol=1e-6)
    assert torch.allclose(got, ref, atol=1e-8, rtol=1e-7), (got - ref).abs().max()
    # the kernel itself is the non-differentiable one
    torch.testing.assert_close(empirical_ntk(model, xg, differentiable=True).detach(), empirical_ntk(model, x))


def test_composite_layer_norm_equals_layer_norm_and_restores_it():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5)
    real = F.layer_norm
    torch.testing.assert_close(layer_norm(x, (3, 5), w, b.double(), 1e-5), F.layer_norm(x, (3, 5), w, b.double()))
    torch.testing.assert_close(layer_norm(x, (5,)), F.layer_norm(x, (5,)))
    with composite_layer_norm():
        ln = nn.LayerNorm(5).double()
        out = ln(x)
        assert "NativeLayerNorm" not in out.grad_fn.name()  # the composite ran, not the fused kernel
        torch.testing.assert_close(out, real(x, (5,), ln.weight, ln.bias, ln.eps))
    assert F.layer_norm is real


def test_composite_layer_norm_holds_for_the_calling_thread_only():
    import threading

    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other_thread():
        inside.wait(5)
        # another thread's LayerNorm while the mode is active in the main thread: the real kernel
        x = torch.randn(3, 4, requires_grad=True)
        seen["fn"] = F.layer_norm(x, (4,)).grad_fn.name()
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with composite_layer_norm():
        x = torch.randn(3, 4, requires_grad=True)
        seen["main"] = F.layer_norm(x, (4,)).grad_fn.name()
        inside.set()
        done.wait(5)
    t.join(5)
    assert "NativeLayerNorm" in seen["fn"]
    assert "NativeLayerNorm" not in seen["main"]
