"""The fast double backward's memory layouts, max pooling, chunked channel sums and pruned passes
(symgen.curvature.double_backward): exact against PyTorch's own autograd in float64, and within float32
round-off of float64 references on smooth models (no ReLU or max-pool kinks to flip)."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from symgen.curvature import GGNOperator, HessianOperator
from symgen.curvature.double_backward import _channel_sum, fast_double_backward
from symgen.models import bn_cnn

D = torch.float64
CL = torch.channels_last
POOLS = [(2, None, 0, 1, False), (3, 2, 1, 1, True), ((2, 3), (1, 2), (1, 0), (2, 1), False)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil", POOLS)
def test_max_pool2d_first_and_second_derivatives_match_autograd(layout, kernel, stride, padding, dilation, ceil):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=D).contiguous(memory_format=layout).requires_grad_(True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=D, requires_grad=True)

    def f(x, w, fast=True):
        with fast_double_backward() if fast else nullcontext():
            h = TF.conv2d(x, w, padding=1)
            return TF.max_pool2d(h * h, kernel, stride, padding, dilation, ceil)  # h * h: a nonzero Hessian

    assert torch.autograd.gradcheck(f, (x, w)) and torch.autograd.gradgradcheck(f, (x, w))
    a, b = f(x, w), f(x, w, fast=False)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # the convolutions' own round-off
    u = torch.randn(a.shape, generator=g, dtype=D)
    ga = torch.autograd.grad((a * u).sum(), (x, w), create_graph=True)
    gb = torch.autograd.grad((b * u).sum(), (x, w), create_graph=True)
    v = [torch.randn(t.shape, generator=g, dtype=D) for t in (x, w)]
    ha = torch.autograd.grad(sum((s * t).sum() for s, t in zip(ga, v, strict=True)), (x, w))
    hb = torch.autograd.grad(sum((s * t).sum() for s, t in zip(gb, v, strict=True)), (x, w))
    for s, t in zip(ga + ha, gb + hb, strict=True):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


def _cnn(dtype: torch.dtype = D, width: int = 4) -> nn.Module:
    """bn_cnn (1 input channel, conv-BN-ReLU, max-pools, flatten, linear) with non-trivial running statistics."""
    torch.manual_seed(0)
    m = bn_cnn((1, 8, 8), 10, width)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.train()(torch.randn(64, 1, 8, 8, generator=g) * 2 + 0.5)
    return m.to(dtype).eval()


def _digits(dtype: torch.dtype = D, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def test_activations_stay_channels_last_from_a_one_channel_input():
    """A 1-channel input is contiguous in both layouts; oneDNN would read its strides as NCHW and every activation
    after it would follow."""
    model, (x, _) = _cnn(), _digits()
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in model]
    with fast_double_backward():
        model(x)
    for h in hooks:
        h.remove()
    maps = [o for o in seen if o.ndim == 4]
    assert len(maps) == 11 and all(o.is_contiguous(memory_format=CL) and not o.is_contiguous() for o in maps)


class _Layouts(TorchDispatchMode):
    """Records the elementwise kernels whose two full-size operands come in different layouts (strided kernels)."""

    OPS = {torch.ops.aten.threshold_backward.default, torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor}

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS and all(isinstance(a, torch.Tensor) for a in args[:2]):
            a, b = args[:2]
            dense = 0 not in a.stride() + b.stride()  # a broadcast (stride 0) is not a layout
            if dense and a.ndim == 4 and a.shape == b.shape and a.shape[1] > 1 and a.stride() != b.stride():
                self.mixed.append(f"{func} {a.stride()} {b.stride()}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_products_run_their_elementwise_kernels_in_one_layout(operator):
    model, (x, y) = _cnn(torch.float32), _digits(torch.float32)
    op = operator(model, TF.cross_entropy, (x, y))
    assert op.fast_double_backward
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5))
    with _Layouts() as rec:
        op.matvec(v)  # builds the graph (forward, backward) and takes one product
        op.matvec(v)  # on the kept graph
    assert rec.mixed == []


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_float64_fast_products_equal_pytorch_autograd(operator):
    """The whole fast path (1-channel input restrided, channels-last convolutions, centred BatchNorm with chunked
    channel sums, ReLU, max pooling as scatter/gather, pruned J v) in float64 against PyTorch's own kernels."""
    model, (x, y) = _cnn(), _digits()
    fast, plain = (operator(model, TF.cross_entropy, (x, y)) for _ in range(2))
    assert not fast.fast_double_backward  # not taken by default in float64: entered by hand here
    fast.fast_double_backward = True
    V = torch.randn(fast.dim, 3, generator=torch.Generator().manual_seed(6), dtype=D)
    got, want = fast.matmat(V), plain.matmat(V)
    assert fast.fast_double_backward
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12 * float(want.abs().max()))


class _Smooth(nn.Module):
    """conv(1 -> c)-BN-SiLU, conv-BN-SiLU, average pooling, linear: no kinks, so float32 is within round-off."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.b1 = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = TF.silu(self.b1(self.c1(x)))
        h = TF.avg_pool2d(TF.silu(self.b2(self.c2(h))), 2)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_float32_fast_products_on_a_smooth_model_are_within_round_off_of_float64(operator):
    model = _Smooth()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.train()(torch.randn(64, 1, 8, 8, generator=g) * 2 + 0.5)
    model.eval()
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    op = operator(model, TF.cross_entropy, (x, y))
    assert op.fast_double_backward
    V = torch.randn(op.dim, 3, generator=g)
    got = op.matmat(V).double()
    ref = operator(_Smooth().double(), TF.cross_entropy, (x.double(), y))
    ref.model.load_state_dict({k: t.double() for k, t in model.state_dict().items()})
    want = ref.matmat(V.double())
    assert float((got - want).abs().max() / want.abs().max()) < 2e-6


@pytest.mark.parametrize("threads", [1, 2])  # chunks on one thread, one sum on several
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_chunked_channel_sums_are_float64_sums(layout, threads):
    g = torch.Generator().manual_seed(8)
    a = torch.randn(40, 7, 30, 30, generator=g).contiguous(memory_format=layout)  # 4 chunks of 10 samples
    b = torch.randn(40, 7, 30, 30, generator=g).contiguous(memory_format=layout)
    flat = torch.randn(1000, 5, generator=g, dtype=torch.float32)  # BatchNorm1d's (N, C)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = (_channel_sum(a, b), _channel_sum(a), _channel_sum(flat))
    finally:
        torch.set_num_threads(before)
    want = (
        (a * b).double().sum((0, 2, 3)),  # the products rounded to float32, as the chunks form them
        a.double().sum((0, 2, 3)),
        flat.double().sum(0),
    )
    for s, t in zip(got, want, strict=True):
        torch.testing.assert_close(s, t, rtol=1e-13, atol=1e-13)


def test_batchnorm_channel_sums_of_a_channels_last_map_keep_cancelling_terms():
    """tests/test_hvp_fast.py's cancellation check, on the channels-last maps the fast convolutions produce."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(64, 3, 64, 64).contiguous(memory_format=CL)
    sign = torch.ones(64, 3, 64, 64)
    sign[1::2] = -1.0
    g = (1e4 * sign * torch.randn(1, 3, 64, 64).abs() + torch.randn(64, 3, 64, 64)).contiguous(memory_format=CL)
    ref = nn.BatchNorm2d(3).double().eval()
    ref.load_state_dict({k: t.double() for k, t in bn.state_dict().items()})
    want = torch.autograd.grad(ref(x.double()), [ref.weight, ref.bias], g.double())
    with fast_double_backward():
        got = torch.autograd.grad(bn(x), [bn.weight, bn.bias], g)
    for a, b in zip(got, want, strict=True):
        assert ((a.double() - b).abs() / b.abs()).max() < 1e-5, (a, b)


class _Convs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.calls["forward"] += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.calls["backward"] += 1
        return func(*args, **(kwargs or {}))


def test_ggn_graph_build_and_forward_product_skip_unused_convolutions():
    """J^T u at the dummy u = 0 has zero values (its graph is what counts): no convolution is run for it; J v =
    d(J^T u)/du v needs no weight or activation gradient: only the tangent's forward convolutions (1 for the
    first layer, whose input is data, 2 for each of the other two)."""
    model, x = _cnn(torch.float32), _digits(torch.float32)[0]
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    with fast_double_backward():
        out = torch.func.functional_call(model, params, (x,))
        u = torch.zeros_like(out, requires_grad=True)
        with _Convs() as build:
            jtu = torch.autograd.grad(out, list(params.values()), grad_outputs=u, create_graph=True)
    assert build.calls == {"forward": 0, "backward": 0}
    assert all(bool((t == 0).all()) for t in jtu)
    v = [torch.randn_like(p) for p in params.values()]
    with _Convs() as forward:
        jv = torch.autograd.grad(jtu, u, grad_outputs=v, retain_graph=True)[0]
    assert forward.calls == {"forward": 5, "backward": 0}
    out2 = torch.func.functional_call(model, params, (x,))  # PyTorch's kernels
    u2 = torch.zeros_like(out2, requires_grad=True)
    jtu2 = torch.autograd.grad(out2, list(params.values()), grad_outputs=u2, create_graph=True)
    want = torch.autograd.grad(jtu2, u2, grad_outputs=v)[0]
    torch.testing.assert_close(jv, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
