"""Empirical NTK: every method and output against an explicit per-sample autograd Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symgen import functional as Fn
from symgen.errors import ConfigError, ShapeError
from symgen.ntk import NTKLinear, choose_ntk_method, empirical_ntk, empirical_ntk_fn, ntk_mlp, ntk_vector_product
from symgen.ntk import cost as ntk_cost
from symgen.rng import isolated_seed

F64 = torch.float64
METHODS = ("jacobian", "ntvp", "structured", "auto")


def dense_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Theta[i, j, a, b] from Jacobian rows built one (sample, output) at a time with autograd.grad."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())

    def rows(x):
        out = []
        for i in range(x.shape[0]):
            y = model(x[i : i + 1]).reshape(-1)
            out.append(
                torch.stack(
                    [
                        torch.cat(
                            [
                                g.reshape(-1)
                                for g in torch.autograd.grad(
                                    y[a],
                                    [params[k] for k in names],
                                    retain_graph=True,
                                    allow_unused=True,
                                    materialize_grads=True,
                                )
                            ]
                        )
                        for a in range(y.numel())
                    ]
                )
            )
        return torch.stack(out)  # (N, O, P)

    j1, j2 = rows(x1), rows(x2)
    for m, was in flags:
        m.training = was
    return torch.einsum("iap,jbp->ijab", j1, j2).detach()


class SeqModel(nn.Module):
    """Linear over a sequence axis (positions), LayerNorm (not a structured layer: fallback)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(1)


class Tied(nn.Module):
    """The same Linear applied twice (weight sharing across calls)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Folded(nn.Module):
    """Folds the sequence axis into the batch before a Linear: not per-sample at that layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        n, t, d = x.shape
        return torch.tanh(self.lin(x.reshape(n * t, d))).reshape(n, t * 2)


class TiedModules(nn.Module):
    """Two Linear modules sharing one weight tensor (the structured path must not double count)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _bn_conv():
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, bias=False),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 2, 6, 6, dtype=F64))  # non-trivial running statistics
    return m


def _models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double(), (5,)),
        "ntk_mlp_scalar": (ntk_mlp(5, 6, 2, 1, "erf", 1.5, 0.2, generator=0, dtype=F64), (5,)),
        "conv_bn": (_bn_conv(), (2, 6, 6)),
        "conv1d": (
            nn.Sequential(
                nn.Conv1d(2, 3, 3, padding=1, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)
            ).double(),
            (2, 8),
        ),
        "grouped_same_conv": (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding="same", groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 2)
            ).double(),
            (2, 4, 4),
        ),
        "sequence_layernorm": (SeqModel().double(), (5, 3)),
        "tied_calls": (Tied().double(), (4,)),
        "tied_modules": (TiedModules().double(), (3,)),
        "folded_batch": (Folded().double(), (2, 3)),
        "matrix_output": (
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Unflatten(1, (2, 2))).double(),
            (3,),
        ),
    }


MODELS = _models()


@pytest.mark.parametrize("name", list(MODELS))
def test_all_methods_match_dense_jacobian(name):
    model, shape = MODELS[name]
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(4, *shape, generator=g, dtype=F64)
    x2 = torch.randn(3, *shape, generator=g, dtype=F64)
    flags = [m.training for m in model.modules()]
    ref12, ref11 = dense_ntk(model, x1, x2), dense_ntk(model, x1, x1)
    for method in METHODS:
        for x2_, ref in ((x2, ref12), (None, ref11)):
            full = empirical_ntk(model, x1, x2_, output="full", method=method)
            trace = empirical_ntk(model, x1, x2_, output="trace", method=method)
            mean = empirical_ntk(model, x1, x2_, output="mean", method=method)
            torch.testing.assert_close(full, ref, rtol=1e-10, atol=1e-12, msg=f"{name} {method} full")
            torch.testing.assert_close(
                trace, ref.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10, atol=1e-12, msg=f"{name} {method} trace"
            )
            torch.testing.assert_close(
                mean, ref.diagonal(dim1=2, dim2=3).mean(-1), rtol=1e-10, atol=1e-12, msg=f"{name} {method} mean"
            )
    assert [m.training for m in model.modules()] == flags  # train/eval flags restored


@pytest.mark.parametrize("budget", [4 * 8 * 40, 4 * 8 * 400, 4 * 8 * 5000])
def test_chunked_paths_match(budget):
    model, shape = MODELS["conv_bn"]
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(5, *shape, generator=g, dtype=F64)
    x2 = torch.randn(4, *shape, generator=g, dtype=F64)
    for x2_ in (x2, None):
        ref = dense_ntk(model, x1, x1 if x2_ is None else x2_)
        for method in ("jacobian", "ntvp", "structured"):
            for output in ("trace", "mean", "full"):
                k = empirical_ntk(model, x1, x2_, output=output, method=method, memory_budget=budget, chunk_size=2)
                diag = ref.diagonal(dim1=2, dim2=3)
                r = ref if output == "full" else diag.sum(-1) if output == "trace" else diag.mean(-1)
                torch.testing.assert_close(k, r, rtol=1e-10, atol=1e-12, msg=f"{method} {output} {budget}")


def test_structured_gram_and_jacobian_paths_for_positions():
    # A conv with many positions (S^2 > C K: explicit layer Jacobians) and one with few (position Gram).
    torch.manual_seed(4)
    many = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 49, 2)).double()
    few = nn.Sequential(nn.Conv2d(3, 8, 3, stride=3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4, 2)).double()
    for model, shape in ((many, (1, 8, 8)), (few, (3, 6, 6))):
        x = torch.randn(3, *shape, dtype=F64)
        ref = dense_ntk(model, x, x)
        torch.testing.assert_close(empirical_ntk(model, x, method="structured"), ref.diagonal(dim1=2, dim2=3).sum(-1))


def test_frozen_parameters_and_custom_params():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 3, dtype=F64)
    ref = dense_ntk(model, x, x)  # only trainable parameters
    for method in METHODS:
        torch.testing.assert_close(empirical_ntk(model, x, output="full", method=method), ref)
    # evaluating at other parameter values equals loading them into the model
    other = {k: v + 0.3 for k, v in Fn.params_of(model).items()}
    k_other = empirical_ntk(model, x, params=other, method="structured")
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in other:
                v.copy_(other[k])
    torch.testing.assert_close(k_other, dense_ntk(model, x, x).diagonal(dim1=2, dim2=3).sum(-1))


def test_ntk_linear_scales_and_float32():
    torch.manual_seed(6)
    model = nn.Sequential(NTKLinear(4, 8, 1.7, 0.4), nn.ReLU(), NTKLinear(8, 3, 1.7, 0.4))
    x = torch.randn(5, 4)
    ref = dense_ntk(model.double(), x.double(), x.double())
    model.float()
    for method in ("jacobian", "structured"):
        k = empirical_ntk(model, x, output="full", method=method)
        assert k.dtype == torch.float32
        torch.testing.assert_close(k.double(), ref, rtol=1e-5, atol=1e-5)


def test_ntk_vector_product_matches_dense():
    model, shape = MODELS["conv_bn"]
    x1 = torch.randn(3, *shape, dtype=F64)
    x2 = torch.randn(4, *shape, dtype=F64)
    v = torch.randn(4, 3, dtype=F64)
    ref = torch.einsum("ijab,jb->ia", dense_ntk(model, x1, x2), v)
    torch.testing.assert_close(ntk_vector_product(model, x1, x2, v), ref)


def test_auto_prefers_structured_for_mlp():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(32, 16)
    assert choose_ntk_method(model, x) == "structured"


def test_errors():
    model, _ = MODELS["mlp"]
    x = torch.randn(3, 5, dtype=F64)
    with pytest.raises(ConfigError, match="output"):
        empirical_ntk(model, x, output="average")
    with pytest.raises(ConfigError, match="method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ConfigError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ShapeError, match="per-sample shape"):
        empirical_ntk(model, x, torch.randn(2, 4, dtype=F64))
    with pytest.raises(ShapeError):
        empirical_ntk(model, torch.randn(0, 5, dtype=F64))
    frozen = nn.Linear(5, 2).double().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        empirical_ntk(frozen, x)

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, x):
            return self.lin(x).sum()  # not a batch of outputs

    with pytest.raises(ShapeError, match="batch"):
        empirical_ntk(Pooled().double(), x)


def test_structured_backward_without_batching_rule(monkeypatch):
    # Force the per-output backward loop used when an op has no batching rule for is_grads_batched.
    real = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    model, shape = MODELS["conv1d"]
    x = torch.randn(3, *shape, dtype=F64)
    torch.testing.assert_close(empirical_ntk(model, x, output="full", method="structured"), dense_ntk(model, x, x))


def test_factory_caches_the_auto_choice_per_shape(monkeypatch):
    model, shape = MODELS["conv_bn"]
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(4, *shape, generator=g, dtype=F64)
    x2 = torch.randn(3, *shape, generator=g, dtype=F64)
    calls = []
    real = ntk_cost.method_costs

    def counting(*args, **kwargs):
        calls.append(args[3].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ntk_cost, "method_costs", counting)
    for output in ("trace", "full"):
        kernel = empirical_ntk_fn(model, output=output)
        ref = dense_ntk(model, x1, x2)
        ref = ref if output == "full" else ref.diagonal(dim1=2, dim2=3).sum(-1)
        for _ in range(3):  # the cost model runs once per (x1, x2) shape, not once per call
            torch.testing.assert_close(kernel(x1, x2), ref, rtol=1e-10, atol=1e-12)
        assert len(calls) == 1
        kernel(x1)  # another key (x2 = None): one more estimate, then cached
        kernel(x1, x1)
        kernel(x2)  # another x1 shape
        assert len(calls) == 3
        assert kernel.method_for(x1, x2) == choose_ntk_method(model, x1, x2, output=output)
        assert kernel.method_for(x2) == choose_ntk_method(model, x2, output=output)
        assert len(calls) == 5  # the two choose_ntk_method calls, not the cached kernel
        calls.clear()
    # An explicit method never runs the cost model (ntvp does: it sizes its blocks by it, once).
    empirical_ntk_fn(model, method="structured")(x1, x2)
    assert calls == []


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp"])
@pytest.mark.parametrize("output", ["trace", "mean", "full"])
def test_differentiable_kernel_gradient_matches_finite_differences(method, output):
    g = torch.Generator().manual_seed(8)
    with isolated_seed(8):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():  # BatchNorm with non-trivial running statistics: the kernel runs in eval mode
        model(torch.randn(16, 3, generator=g, dtype=F64))
    x1 = torch.randn(3, 3, generator=g, dtype=F64)
    x2 = torch.randn(2, 3, generator=g, dtype=F64)
    flags = [m.training for m in model.modules()]
    kernel = empirical_ntk_fn(model, output=output, method=method, differentiable=True)
    # Its value equals the dense kernel and the no-grad kernel.
    ref = dense_ntk(model, x1, x2)
    diag = ref.diagonal(dim1=2, dim2=3)
    ref = ref if output == "full" else diag.sum(-1) if output == "trace" else diag.mean(-1)
    torch.testing.assert_close(kernel(x1, x2).detach(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        kernel(x1, x2).detach(), empirical_ntk(model, x1, x2, output=output, method=method), rtol=1e-10, atol=1e-12
    )
    # Gradient w.r.t. the inputs of sum K(x1, x2) (and of the symmetric K(x1, x1)) against finite differences.
    assert torch.autograd.gradcheck(
        lambda a: kernel(a, x2).sum() + kernel(a).pow(2).sum(), (x1.clone().requires_grad_(True),)
    )
    assert torch.autograd.gradcheck(lambda b: kernel(x1, b).sum(), (x2.clone().requires_grad_(True),))
    assert [m.training for m in model.modules()] == flags


def test_non_differentiable_kernel_is_outside_the_graph():
    model, _ = MODELS["mlp"]
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    for method in METHODS:
        assert not empirical_ntk(model, x, method=method).requires_grad
    assert empirical_ntk(model, x, method="jacobian", differentiable=True).requires_grad


def test_factory_errors():
    model, _ = MODELS["mlp"]
    with pytest.raises(ConfigError, match="differentiable"):
        empirical_ntk_fn(model, method="structured", differentiable=True)
    with pytest.raises(ConfigError, match="memory_budget"):
        empirical_ntk_fn(model, memory_budget=0)
    with pytest.raises(ConfigError, match="nn.Module"):
        empirical_ntk_fn(lambda x: x)


def test_trace_sums_and_mean_averages_over_outputs_from_an_explicit_jacobian():
    """ "trace" = sum_a J_a(x_i) . J_a(x_j), "mean" = that / O (neural-tangents' trace_axes convention), from a
    Jacobian built column by column with finite-free autograd on a linear model, where J is the weight itself."""
    g = torch.Generator().manual_seed(11)
    model = nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g, dtype=F64))
    x1 = torch.randn(5, 4, generator=g, dtype=F64)
    x2 = torch.randn(2, 4, generator=g, dtype=F64)
    # f_a(x) = W_a . x: d f_a / d W = e_a x^T, so Theta[i, j, a, b] = delta_ab (x1_i . x2_j)
    gram = x1 @ x2.T
    o = 3
    for method in ("jacobian", "ntvp", "structured"):
        trace = empirical_ntk(model, x1, x2, output="trace", method=method)
        mean = empirical_ntk(model, x1, x2, output="mean", method=method)
        full = empirical_ntk(model, x1, x2, output="full", method=method)
        torch.testing.assert_close(trace, o * gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mean, gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(full, gram[:, :, None, None] * torch.eye(o, dtype=F64), rtol=1e-12, atol=1e-12)
    # streamed over loaders, blocks mirrored: the same mean
    loader = [x1[:2], x1[2:]]
    torch.testing.assert_close(empirical_ntk_fn(model, output="mean").stream(loader), x1 @ x1.T, rtol=1e-12, atol=1e-12)
