"""Second-order Taylor-mode quadratic forms (symgen.curvature.taylor) against dense float64 Hessians."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from symgen import functional as F
from symgen.curvature import HessianOperator, MatrixOperator
from symgen.curvature.checks import FallbackWarning
from symgen.curvature.taylor import TaylorProgram, TaylorUnsupported, trace_loss
from symgen.errors import ShapeError
from symgen.models import ResNet, small_cnn, vit


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def _dense_hessian(model, loss_fn, x, y, names=None):
    """d^2 loss / dW^2 by torch.autograd.functional.hessian on the flat parameter vector (float64)."""
    params = F.params_of(model)
    if names is not None:
        params = {k: params[k] for k in names}
    flat = F.flatten(params)

    def f(w):
        return loss_fn(F.call(model, F.unflatten(w, params), F.buffers_of(model), x), y)

    return torch.autograd.functional.hessian(f, flat)


class _Residual(nn.Module):
    """conv-BN-ReLU, a zero-padded strided shortcut (slice + pad), a sum, global mean pool, linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = TF.relu(self.bn(self.c1(x)))
        s = TF.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1))
        h = TF.relu(self.c2(h) + s)
        return self.fc(h.mean(dim=(2, 3)))


def _models():
    g = torch.Generator().manual_seed(0)
    cnn = small_cnn((1, 6, 6), 3, (2, 3), pool_after=(0,)).double().eval()
    res = _Residual().double().eval()
    for m in (cnn, res):
        _randomize_bn(m, g)
    return g, [
        (cnn, torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)),
        (res, torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_mean", "mse_sum"])
@pytest.mark.parametrize("which", [0, 1])
def test_taylor_forms_equal_dense_hessian_forms(loss, which):
    g, models = _models()
    model, x = models[which]
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        loss_fn = TF.cross_entropy
    else:
        y = torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64)
        loss_fn = (
            (lambda o, t: TF.mse_loss(o, t))
            if loss == "mse_mean"
            else (lambda o, t: TF.mse_loss(o, t, reduction="sum"))
        )
    H = _dense_hessian(model, loss_fn, x, y)
    params = F.params_of(model)
    keys = list(params)

    def f(*args):
        return loss_fn(F.call(model, dict(zip(keys, args[:-2], strict=True)), F.buffers_of(model), args[-2]), args[-1])

    program = TaylorProgram(trace_loss(f, list(params.values()), x, y), list(params.values()), x, y)
    torch.testing.assert_close(program.loss, f(*params.values(), x, y))
    V = torch.randn(4, H.shape[0], generator=g, dtype=torch.float64)
    got = torch.stack([program.form(list(F.unflatten(v, params).values())) for v in V])
    want = torch.einsum("ki,ij,kj->k", V, H, V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_operator_forms_stream_and_match_products():
    """Over a DataLoader (batches 5, 5, 3): Taylor forms = dense forms of the dataset-mean loss =
    forms from products; and the trace on the same seed is the same with and without Taylor mode."""
    g, models = _models()
    model, _ = models[1]
    x = torch.randn(13, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    H = HessianOperator(model, TF.cross_entropy, loader)
    assert H.taylor
    V = torch.randn(H.dim, 3, generator=g, dtype=torch.float64)
    want = torch.einsum("ik,ij,jk->k", V, _dense_hessian(model, TF.cross_entropy, x, y), V)
    torch.testing.assert_close(H.quadratic_forms(V), want, rtol=1e-10, atol=1e-12)
    assert H.taylor and H.num_matvecs == 3 and H.num_data == 13
    H2 = HessianOperator(model, TF.cross_entropy, loader, taylor=False)
    torch.testing.assert_close(H2.quadratic_forms(V), want, rtol=1e-10, atol=1e-12)
    for method in ("hutchinson", "deflated"):
        a, b = H.trace(12, 4, method=method), H2.trace(12, 4, method=method)
        assert a.value == pytest.approx(b.value, rel=1e-9) and a.num_matvecs == b.num_matvecs


def test_param_subset_float32_and_channels_last_conv():
    g, models = _models()
    model, x = models[0]
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    names = ["0.weight", "1.weight"]  # the first conv's weight and the BatchNorm's gamma
    H = HessianOperator(model, TF.cross_entropy, (x, y), param_names=names)
    dense = _dense_hessian(model, TF.cross_entropy, x, y, names)
    V = torch.randn(H.dim, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(H.quadratic_forms(V), torch.einsum("ik,ij,jk->k", V, dense, V), rtol=1e-10, atol=1e-12)
    # float32 on CPU (the coefficients run channels-last): the float64 forms to float32 round-off
    m32 = ResNet((1, 1), (3, 4), 3, in_channels=1, shortcut="A").eval()
    _randomize_bn(m32, g)
    x32 = torch.randn(6, 1, 8, 8, generator=g)
    y32 = torch.randint(0, 3, (6,), generator=g)
    H32 = HessianOperator(m32, TF.cross_entropy, (x32, y32))
    V32 = torch.randn(H32.dim, 2, generator=g)
    got = H32.quadratic_forms(V32)
    assert H32.taylor
    m64 = m32.double()
    want = torch.einsum(
        "ik,ij,jk->k", V32.double(), _dense_hessian(m64, TF.cross_entropy, x32.double(), y32), V32.double()
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _operator_forms_against_dense(model, x, y, loss_fn, g):
    H = HessianOperator(model, loss_fn, (x, y))
    V = torch.randn(H.dim, 3, generator=g, dtype=torch.float64)
    got = H.quadratic_forms(V)
    assert H.taylor
    want = torch.einsum("ik,ij,jk->k", V, _dense_hessian(model, loss_fn, x, y), V)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_transformer_forms_equal_dense_hessian_forms():
    """LayerNorm, GELU, softmax attention (bmm of two W-dependent values), unbind, class token and
    position embeddings: a one-block ViT with random LayerNorm affine parameters."""
    g = torch.Generator().manual_seed(4)
    model = vit(image_size=4, patch_size=2, num_classes=3, dim=4, depth=1, heads=2, mlp_dim=6, in_channels=1).double()
    for p in model.parameters():
        p.data.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    _operator_forms_against_dense(model, x, torch.randint(0, 3, (3,), generator=g), TF.cross_entropy, g)


def test_smooth_activation_forms_equal_dense_hessian_forms():
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    _operator_forms_against_dense(model, x, torch.randn(6, 2, generator=g, dtype=torch.float64), TF.mse_loss, g)


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h * torch.relu(h.detach()) + h  # autograd treats the detached factor as a constant


def test_detached_values_are_constants():
    g = torch.Generator().manual_seed(6)
    model = _Detached().double()
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    _operator_forms_against_dense(model, x, torch.randn(5, 2, generator=g, dtype=torch.float64), TF.mse_loss, g)


@pytest.mark.parametrize("case", ["silu", "bn_train"])
def test_unsupported_operations_fall_back_to_products(case):
    g = torch.Generator().manual_seed(1)
    if case == "silu":
        model = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), nn.Linear(5, 3)).double()
        bn_mode = "eval"
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
        bn_mode = "train"
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    H = HessianOperator(model, TF.cross_entropy, (x, y), bn_mode=bn_mode)
    V = torch.randn(H.dim, 3, generator=g, dtype=torch.float64)
    with pytest.warns(FallbackWarning, match="Taylor mode") as caught:
        got = H.quadratic_forms(V)
        H.quadratic_forms(V)  # warned once, not per call
    assert len([w for w in caught if issubclass(w.category, FallbackWarning)]) == 1
    assert not H.taylor
    reason = "silu" if case == "silu" else "bn_mode='train'"
    assert reason in H.fallback_reasons["taylor"] and reason in str(caught[0].message)
    torch.testing.assert_close(got, (V * H.matmat(V)).sum(0), rtol=1e-10, atol=1e-12)
    if case == "silu":
        params = F.params_of(model)
        keys = list(params)

        def f(*args):
            return TF.cross_entropy(F.call(model, dict(zip(keys, args[:-2], strict=True)), None, args[-2]), args[-1])

        with pytest.raises(TaylorUnsupported, match="silu"):
            TaylorProgram(trace_loss(f, list(params.values()), x, y), list(params.values()), x, y)


def test_quadratic_forms_on_a_matrix_and_bad_input():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    op = MatrixOperator(A + A.T)
    V = torch.randn(6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.quadratic_forms(V), torch.diag(V.T @ (A + A.T) @ V))
    assert op.num_matvecs == 4 and op.quadratic_forms(V[:, :0]).shape == (0,)
    with pytest.raises(ShapeError, match="quadratic_forms expects columns"):
        op.quadratic_forms(V[:5])


def test_forms_of_a_loss_linear_in_the_parameters_are_zero():
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.float64)
    H = HessianOperator(model, lambda o, t: (o[:, 0] - t).mean(), (x, y))
    V = torch.randn(3, 2, generator=g, dtype=torch.float64)
    assert H.quadratic_forms(V).abs().max() < 1e-15 and H.taylor
    assert math.isclose(H.trace(4).value, 0.0, abs_tol=1e-15)
