"""Non-finite values fail loudly: every estimator and kernel raises a DivergenceError that names where NaN or inf
appeared (an input and its batch index, a weight, a BatchNorm buffer, the loss or the output), never a NaN result."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen.curvature import GGNOperator, HessianOperator
from symgen.errors import DivergenceError
from symgen.metrics import noise_stability
from symgen.ntk import empirical_ntk, empirical_ntk_fn

D = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D).eval()


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _cases():
    """(name, model, loss_fn, x, y, words the message must contain)."""
    x, y = _data()
    bad_x = x.clone()
    bad_x[5, 2] = float("nan")
    m_w = _model()
    with torch.no_grad():
        m_w[3].weight[1, 2] = float("inf")
    m_b = _model()
    with torch.no_grad():
        m_b[1].running_var[3] = float("nan")

    def huge_loss(out, t):  # overflows float64: (1e200)^2
        return ((out * 1e200) ** 2).mean()

    return [
        ("input", _model(), TF.cross_entropy, bad_x, y, ["input", "(sample 5)"]),
        ("weight", m_w, TF.cross_entropy, x, y, ["weight", "3.weight"]),
        ("buffer", m_b, TF.cross_entropy, x, y, ["buffer", "1.running_var"]),
        ("loss", _model(), huge_loss, x, y, ["loss"]),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("estimate", ["trace", "trace_products", "eigenvalues", "density", "matmat"])
def test_hessian_estimators_name_the_place(case, estimate):
    _, model, loss_fn, x, y, words = case
    H = HessianOperator(model, loss_fn, (x, y), taylor=estimate != "trace_products")
    run = {
        "trace": lambda: H.trace(4),
        "trace_products": lambda: H.trace(4),
        "eigenvalues": lambda: H.eigenvalues(1),
        "density": lambda: H.density(5),
        "matmat": lambda: H.matmat(torch.ones(H.dim, 2, dtype=D)),
    }[estimate]
    with pytest.raises(DivergenceError) as info:
        run()
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ggn_names_the_place(case):
    _, model, loss_fn, x, y, words = case
    G = GGNOperator(model, loss_fn, (x, y))
    for run in (lambda: G.matmat(torch.ones(G.dim, 2, dtype=D)), lambda: G.trace(3), lambda: G.eigenvalues(1)):
        with pytest.raises(DivergenceError) as info:
            run()
        for w in words:
            assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_noise_stability_names_the_place(case):
    _, model, loss_fn, x, y, words = case
    with pytest.raises(DivergenceError) as info:
        noise_stability(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])], 0.01, 4)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_streamed_input_names_the_batch():
    x, y = _data()
    x[6, 0] = float("inf")  # batch 1 (samples 4..7), index 2 in it
    H = HessianOperator(_model(), TF.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    with pytest.raises(DivergenceError, match=r"batch index 2 of batch 1 \(sample 6\)"):
        H.trace(3)


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_empirical_ntk_names_the_place(method, output):
    x, _ = _data()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DivergenceError, match="x1 at batch index 3"):
        empirical_ntk(_model(), bad, method=method, output=output)
    with pytest.raises(DivergenceError, match="x2 at batch index 3"):
        empirical_ntk(_model(), x, bad, method=method, output=output)
    for case in CASES[1:3]:  # the weight, the BatchNorm buffer
        with pytest.raises(DivergenceError) as info:
            empirical_ntk(case[1], x, method=method, output=output)
        for w in case[5]:
            assert w in str(info.value)
    # an output that overflows with finite inputs and weights: the kernel block is named
    big = _model()
    with torch.no_grad():
        big[3].weight.mul_(1e300)
    with pytest.raises(DivergenceError, match="kernel block"):
        empirical_ntk(big, x, method=method, output=output)


def test_empirical_ntk_blocks_and_stream_name_the_place():
    x, _ = _data(12)
    bad = x.clone()
    bad[9, 0] = float("nan")
    kernel = empirical_ntk_fn(_model(), memory_budget=3000, method="jacobian")
    with pytest.raises(DivergenceError, match="x1 at batch index 9"):
        kernel(bad)
    with pytest.raises(DivergenceError, match="batch index 1"):  # batch 2 of the stream: rows 8..11
        empirical_ntk_fn(_model()).stream([bad[:4], bad[4:8], bad[8:]])


def test_analytic_kernels_reject_non_finite_inputs():
    from symgen.ntk import analytic_conv_ntk, analytic_ntk

    x, _ = _data()
    x[2, 0] = float("nan")
    with pytest.raises(DivergenceError, match="x1 at batch index 2"):
        analytic_ntk(x, depth=2)
    with pytest.raises(DivergenceError, match="x2 at batch index 2"):
        analytic_ntk(x[[0, 1, 3]], x, depth=2)
    img = torch.randn(3, 1, 6, 6, dtype=D)
    img[1, 0, 2, 2] = float("inf")
    with pytest.raises(DivergenceError, match="batch index 1"):
        analytic_conv_ntk(img, img, depth=1)


def test_finite_values_are_unchanged():
    """The checks only look: valid inputs give the numbers they gave before (against a dense Hessian)."""
    model = _model()
    x, y = _data()
    H = HessianOperator(model, TF.cross_entropy, (x, y))
    params = dict(model.named_parameters())
    names = list(params)

    def loss(*flat):
        p = dict(zip(names, flat, strict=True))
        return TF.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params.values()))
    sizes = [p.numel() for p in params.values()]
    dense = torch.cat(
        [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1) for i in range(len(names))]
    )
    V = torch.randn(H.dim, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(H.matmat(V), dense @ V)
