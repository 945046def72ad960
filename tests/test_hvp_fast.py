"""The fast Hessian-vector product path (symgen.curvature.double_backward): centred eval-mode BatchNorm, ReLU without
a zero tensor for its mask, against autograd, PyTorch's kernels and a float64 dense Hessian."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen.curvature import GGNOperator, HessianOperator
from symgen.curvature.double_backward import fast_double_backward
from symgen.models import resnet20


def _bn(c: int, g: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    return bn


class _Net(nn.Module):
    """conv-BN-ReLU, conv(bias)-BN + a zero-padded strided shortcut (ResNet option A), an in-place change of a
    convolution's output before its BatchNorm, grouped convolution, max pooling, an in-place ReLU, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = _bn(4, g)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
        self.bn2 = _bn(6, g)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=True)
        self.bn3 = _bn(6, g)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = TF.relu(self.bn1(self.conv1(x)))
        short = TF.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))
        h = TF.relu(self.bn2(self.conv2(h)) + short)
        z = self.conv3(h)
        z += h
        h = self.relu(self.bn3(z))
        return self.fc(TF.max_pool2d(h, 2).flatten(1))


def _data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (5,), generator=g)


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_float32_fast_products_match_the_float64_dense_matrix(operator):
    model = _Net().eval()
    x, y = _data()
    op = operator(model, TF.cross_entropy, (x, y))
    assert op.fast_double_backward
    V = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(2))
    got = op.matmat(V).double()
    assert op.fast_double_backward  # no fallback was needed
    ref = operator(_Net().double().eval(), TF.cross_entropy, (x.double(), y))
    assert not ref.fast_double_backward
    want = ref.dense() @ V.double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_resnet20_products_are_accurate_to_float32_round_off():
    """A ResNet-20 with running statistics from one pass: the uncentred x s + (beta - mean s) formed d/dgamma from
    two large sums that cancel (2.7e-4 relative error against float64); centred, about 3e-7."""
    torch.manual_seed(0)
    model = resnet20()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    ref = HessianOperator(copy.deepcopy(model).double(), TF.cross_entropy, (x.double(), y)).matvec(v.double())
    op = HessianOperator(model, TF.cross_entropy, (x, y))
    assert op.fast_double_backward
    assert float((op.matvec(v).double() - ref).norm() / ref.norm()) < 1e-5


def test_conv_batch_norm_and_relu_second_derivatives_match_autograd():
    g = torch.Generator().manual_seed(3)
    bn = _bn(4, g).double().eval()
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = bn.weight.detach().clone().requires_grad_(True)
    beta = bn.bias.detach().clone().requires_grad_(True)

    def f(x, w, c, gamma, beta):
        with fast_double_backward():
            h = TF.conv2d(x, w, c, padding=1)
            return TF.relu(TF.batch_norm(h, bn.running_mean, bn.running_var, gamma, beta, False, 0.1, bn.eps))

    inputs = (x, w, c, gamma, beta)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_train_mode_batch_norm_and_in_place_relu_are_left_to_pytorch():
    model = _Net().train()
    x, y = _data()
    with fast_double_backward():
        a = model(x)
    b = model(x)
    torch.testing.assert_close(a, b)
    h = torch.randn(3, 4)
    with fast_double_backward():
        out = TF.relu(h, inplace=True)
    assert out is h and bool((h >= 0).all())


def test_batchnorm_channel_sums_are_accumulated_in_float64():
    """d/dgamma and d/dbeta of the fast eval-mode BatchNorm are per-channel sums over the batch and positions:
    accumulated in float64 (as PyTorch's CPU kernel does), a backward signal of large cancelling terms keeps
    its small net sum, to float32 precision of the result against a float64 reference."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(64, 3, 64, 64)
    sign = torch.ones(64, 3, 64, 64)
    sign[1::2] = -1.0  # the +-1e4 parts cancel exactly, per channel
    g = 1e4 * sign * torch.randn(1, 3, 64, 64).abs() + torch.randn(64, 3, 64, 64)
    ref64 = copy.deepcopy(bn).double()
    out = ref64(x.double())
    want = torch.autograd.grad(out, [ref64.weight, ref64.bias], g.double())
    with fast_double_backward():
        got = torch.autograd.grad(bn(x), [bn.weight, bn.bias], g)
    for a, b in zip(got, want, strict=True):
        assert ((a.double() - b).abs() / b.abs()).max() < 1e-5, (a, b)
