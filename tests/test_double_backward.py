"""The fast double-backward kernels (symgen.curvature.double_backward) against PyTorch's own autograd and dense Hessians."""

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen.curvature import GGNOperator, HessianOperator
from symgen.curvature.checks import FallbackWarning
from symgen.curvature.double_backward import fast_double_backward

CONFIGS = [  # stride, padding, dilation, groups, bias
    (1, 1, 1, 1, False),
    (2, 1, 1, 1, True),
    (2, 0, 2, 2, False),
    ((1, 2), (2, 0), 1, 3, True),
]


@pytest.mark.parametrize("stride,padding,dilation,groups,bias", CONFIGS)
def test_conv2d_first_and_second_derivatives_match_autograd(stride, padding, dilation, groups, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None

    def f(x, w, *b):
        with fast_double_backward():
            return TF.conv2d(x, w, b[0] if b else None, stride, padding, dilation, groups)

    inputs = (x, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)

    # and the same values and Hessian-vector products as PyTorch's kernel
    def native(x, w, *b):
        return TF.conv2d(x, w, b[0] if b else None, stride, padding, dilation, groups)

    out_a, out_b = f(*inputs), native(*inputs)
    torch.testing.assert_close(out_a, out_b)
    u = torch.randn(out_a.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((out_a * u).sum(), inputs, create_graph=True)
    gb = torch.autograd.grad((out_b * u).sum(), inputs, create_graph=True)
    v = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
    ha = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ga, v, strict=True)), inputs, allow_unused=True)
    hb = torch.autograd.grad(sum((a * c).sum() for a, c in zip(gb, v, strict=True)), inputs, allow_unused=True)
    for t, a, c in zip(inputs, ha, hb, strict=True):  # None: a zero block (the bias enters linearly)
        torch.testing.assert_close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if c is None else c)


def test_eval_batch_norm_matches_and_train_mode_is_left_alone():
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    x = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for train in (False, True):
        bn.train(train)
        with fast_double_backward():
            a = bn(x)
        b = bn(x)
        torch.testing.assert_close(a, b)
    bn.eval()

    def f(x, w, b):
        with fast_double_backward():
            return TF.batch_norm(x, bn.running_mean, bn.running_var, w, b, False, 0.1, bn.eps)

    assert torch.autograd.gradgradcheck(f, (x, bn.weight, bn.bias))


class _ResBlock(nn.Module):
    def __init__(self, c: int, flatten: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c * 4 * 4, 3)
        self.flatten = flatten

    def forward(self, x):
        h = TF.relu(self.bn1(self.conv1(x)))
        h = TF.relu(self.bn2(self.conv2(h)) + TF.avg_pool2d(h, 2))
        # .view on a channels-last map fails: the operator must fall back to PyTorch's kernels
        return self.fc(h.view(h.shape[0], -1) if self.flatten == "view" else h.flatten(1))


def _model(flatten: str) -> nn.Module:
    torch.manual_seed(0)
    m = _ResBlock(4, flatten)
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
    return m.eval()


@pytest.mark.parametrize("flatten", ["flatten", "view"])
@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_float32_operator_on_cpu_matches_a_float64_dense_matrix(operator, flatten):
    """The fast path is taken for float32 on CPU: its products against PyTorch's autograd in float64."""
    model = _model(flatten)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    op = operator(model, TF.cross_entropy, (x, y))
    assert op.fast_double_backward and "fast_double_backward" not in op.fallback_reasons
    V = torch.randn(op.dim, 3, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = op.matmat(V).double()
        op.matmat(V)  # a second product does not warn again
    # the fallback was taken exactly when the model flattens with .view, and it says so, once
    assert op.fast_double_backward == (flatten == "flatten")
    fallbacks = [w for w in caught if issubclass(w.category, FallbackWarning)]
    if flatten == "view":
        assert len(fallbacks) == 1 and ".view" in str(fallbacks[0].message)
        assert ".view" in op.fallback_reasons["fast_double_backward"]
    else:
        assert fallbacks == []

    ref = _model(flatten).double()
    ref_op = operator(ref, TF.cross_entropy, (x.double(), y))
    assert not ref_op.fast_double_backward  # float64: PyTorch's kernels
    assert "float32" in ref_op.fallback_reasons["fast_double_backward"]
    dense = ref_op.dense()
    want = dense @ V.double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
