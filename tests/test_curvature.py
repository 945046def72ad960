"""symgen.curvature and noise_stability against dense autograd Hessians and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from symgen.curvature import (
    CurvatureOperator,
    HessianOperator,
    MatrixOperator,
    deflated_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_eigenpairs,
    slq_density,
)
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.metrics import noise_stability

D = torch.float64


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4)).to(D)
    with torch.no_grad():  # non-trivial running statistics
        m.train()
        m(torch.randn(32, 1, 8, dtype=D) * 2 + 0.5)
    return m


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, generator=g, dtype=D), torch.randint(0, 4, (n,), generator=g)


def _dense_reference(m: nn.Module, batches, bn_mode: str, reduction: str = "mean") -> torch.Tensor:
    """The Hessian by torch.autograd.functional.hessian of an explicitly written loss."""
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    total = sum(x.shape[0] for x, _ in batches)

    def f(v):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        was = m.training
        m.train(bn_mode == "train")
        out = 0
        for x, y in batches:
            bufs = {k: b.clone() for k, b in m.named_buffers()}
            w = x.shape[0] / total if reduction == "mean" else 1.0
            out = out + w * TF.cross_entropy(functional_call(m, (params, bufs), (x,)), y)
        m.train(was)
        return out

    return hessian(f, flat)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_dense_matches_autograd_hessian(bn_mode):
    m = _bn_cnn()
    x, y = _data()
    before = {k: b.clone() for k, b in m.named_buffers()}
    ref = _dense_reference(m, [(x, y)], bn_mode)
    for hvp_mode in ("reverse", "forward"):
        for batching in ("loop", "vmap"):
            H = HessianOperator(m, TF.cross_entropy, (x, y), bn_mode=bn_mode, hvp_mode=hvp_mode, batching=batching)
            assert torch.allclose(H.dense(), ref, atol=1e-12), (hvp_mode, batching)
    # running statistics untouched, module mode restored
    assert all(torch.equal(before[k], b) for k, b in m.named_buffers())
    assert m.training


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loader_of_uneven_batches(reduction):
    m = _bn_cnn().eval()
    x, y = _data(23)
    loader = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    ref = _dense_reference(m, loader, "eval", reduction)
    H = HessianOperator(m, TF.cross_entropy, loader, reduction=reduction)
    assert torch.allclose(H.dense(), ref, atol=1e-12)
    assert H.num_data == 23
    # vmap over the products with one graph per batch built outside vmap (this used to raise)
    for hvp_mode in ("reverse", "forward"):
        Hv = HessianOperator(m, TF.cross_entropy, loader, reduction=reduction, batching="vmap", hvp_mode=hvp_mode)
        assert torch.allclose(Hv.dense(), ref, atol=1e-12), hvp_mode
    if reduction == "mean":  # the mean over batches equals the Hessian of the whole set
        assert torch.allclose(ref, _dense_reference(m, [(x, y)], "eval"), atol=1e-12)


def test_parameter_subset():
    m = _bn_cnn().eval()
    x, y = _data()
    full = _dense_reference(m, [(x, y)], "eval")
    H = HessianOperator(m, TF.cross_entropy, (x, y), param_names=["4.weight", "4.bias"])
    n_before = sum(p.numel() for p in list(m.parameters())[:-2])
    assert torch.allclose(H.dense(), full[n_before:, n_before:], atol=1e-12)


def test_eigenvalues_match_dense_to_1e4():
    m = _bn_cnn()
    x, y = _data()
    H = HessianOperator(m, TF.cross_entropy, (x, y))
    ev = torch.linalg.eigvalsh(H.dense())
    g = torch.Generator().manual_seed(0)
    top = H.eigenvalues(3, "largest", generator=g)
    bottom = H.eigenvalues(2, "smallest", generator=g)
    assert torch.allclose(top, ev.flip(0)[:3], rtol=1e-4, atol=0)
    assert torch.allclose(bottom, ev[:2], rtol=1e-4, atol=0)
    for criterion in ("gap", "change"):  # the cheaper stopping tests still land on the eigenvalue
        val = H.eigenpairs(1, generator=g, tol=1e-8, criterion=criterion).values[0]
        assert abs(float(val) - float(ev[-1])) < 1e-6 * float(ev[-1])
    with pytest.raises(ConfigError, match="criterion"):
        H.eigenpairs(1, criterion="magic")
    pairs = H.eigenpairs(2, generator=g, tol=1e-8)
    assert pairs.vectors.shape == (H.dim, 2)  # eigenvectors are columns
    v = pairs.vectors[:, 0]
    assert pairs.converged
    assert torch.allclose(H.matvec(v), pairs.values[0] * v, atol=1e-6)


def test_trace_estimators_unbiased_with_honest_stderr():
    m = _bn_cnn()
    x, y = _data()
    H = HessianOperator(m, TF.cross_entropy, (x, y))
    A = H.dense()
    exact = float(A.trace())
    # Rademacher Hutchinson: Var(z^T A z) = 2 sum_{i != j} A_ij^2
    var = 2 * float((A**2).sum() - (A.diag() ** 2).sum())
    g = torch.Generator().manual_seed(0)
    est = H.trace(400, g, method="hutchinson")
    assert abs(est.value - exact) < 4 * math.sqrt(var / 400)
    assert 0.8 < est.stderr / math.sqrt(var / 400) < 1.2
    value, stderr = est  # unpacks as (value, stderr)
    assert value == est.value and stderr == est.stderr
    for method in ("hutch++", "deflated"):
        e = H.trace(90, g, method=method)
        assert e.num_matvecs <= 90
        assert abs(e.value - exact) < 4.5 * e.stderr, method
        assert e.stderr < est.stderr  # variance reduction at fewer products
    full = H.trace(10, g, method="deflated", deflation_steps=H.dim)  # the whole space: exact
    assert full.stderr == 0 and abs(full.value - exact) < 1e-8


def test_closed_form_quadratic_float32():
    """L(W) = ||X W^T - Y||^2 / (2N) for a bias-free linear layer: H = I_out (x) (X^T X / N)."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 300, 40, 5
    X = torch.randn(n, d_in, generator=g) * torch.linspace(0.2, 3.0, d_in)
    Y = torch.randn(n, d_out, generator=g)
    lin = nn.Linear(d_in, d_out, bias=False)
    H = HessianOperator(lin, lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean(), (X, Y))
    C = X.double().T @ X.double() / n
    eig_c = torch.linalg.eigvalsh(C)
    exact_trace = d_out * float(C.trace())
    # each eigenvalue of C has multiplicity d_out in H; single-vector Lanczos finds each distinct one once
    top = H.eigenvalues(2, generator=g)
    assert torch.allclose(top.double(), eig_c.flip(0)[:2], rtol=1e-4)
    assert abs(float(H.eigenvalues(1, "smallest", generator=g)[0]) - float(eig_c[0])) < 1e-4 * float(eig_c[-1])
    e = H.trace(60, g, method="deflated")
    assert abs(e.value - exact_trace) < 4.5 * e.stderr + 1e-4 * exact_trace


def test_lanczos_on_explicit_matrix():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(30, 30, generator=g, dtype=D)
    A = B + B.T
    a, b, Q = lanczos(MatrixOperator(A), torch.randn(30, generator=g, dtype=D), 30, generator=g)
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    assert Q.shape == (30, 30)  # the basis as columns
    assert torch.allclose(Q.T @ Q, torch.eye(30, dtype=D), atol=1e-10)
    assert torch.allclose(Q.T @ A @ Q, T, atol=1e-9)
    # an operator of rank 2 breaks down after 2 steps; Lanczos continues in the complement
    u = torch.randn(2, 30, generator=g, dtype=D)
    R = u.T @ u
    ep = lanczos_eigenpairs(MatrixOperator(R), 4, generator=g)
    assert torch.allclose(ep.values, torch.linalg.eigvalsh(R).flip(0)[:4], atol=1e-9)


def test_slq_density_and_matrix_free_estimators_on_explicit_matrix():
    g = torch.Generator().manual_seed(4)
    evals = torch.linspace(-1, 5, 40, dtype=D)
    Qm, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=D))
    A = Qm @ torch.diag(evals) @ Qm.T
    op = MatrixOperator(A)
    dens = slq_density(op, num_steps=40, num_runs=200, generator=g)
    assert torch.allclose(dens.nodes[0], evals, atol=1e-8)  # a full Lanczos run recovers the spectrum
    assert torch.allclose(dens.weights.sum(1), torch.ones(200, dtype=D))
    # SLQ trace = mean of n v^T A v over normalized Rademacher v: Hutchinson's variance
    var = 2 * float((A**2).sum() - (A.diag() ** 2).sum())
    assert abs(dens.trace() - float(evals.sum())) < 4 * math.sqrt(var / 200)
    grid = torch.linspace(-3, 7, 4001, dtype=D)
    assert abs(float(torch.trapezoid(dens.evaluate(grid, 0.1), grid)) - 1) < 1e-3
    for est in (
        hutchinson_trace(op, 500, generator=g),
        hutchpp_trace(op, 30, generator=g),
        deflated_trace(op, 30, generator=g),
    ):
        assert abs(est.value - float(evals.sum())) < 4.5 * est.stderr + 1e-9, est.method


def test_adaptive_deflated_trace_reaches_rtol_and_counts_every_product():
    g = torch.Generator().manual_seed(5)
    n = 300
    evals = torch.cat([torch.tensor([400.0, 250, 120, 90, 60, 30], dtype=D), torch.rand(n - 6, generator=g, dtype=D)])
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = Qm @ torch.diag(evals) @ Qm.T

    class Counting(CurvatureOperator):  # counts products itself, independently of the base class
        calls = 0

        def _matvec(self, v):
            self.calls += 1
            return A @ v

        def _matmat(self, V):
            self.calls += V.shape[1]
            return A @ V

    op = Counting(n, D, "cpu")
    est = deflated_trace(op, 10, rtol=0.001, max_matvecs=3000, generator=g)
    assert est.num_matvecs == op.calls == op.num_matvecs
    assert est.stderr <= 0.001 * abs(est.value)
    assert abs(est.value - float(evals.sum())) < 4.5 * est.stderr
    # plain Hutchinson would need (std / (rtol tr))^2 probes
    var = 2 * float((A**2).sum() - (A.diag() ** 2).sum())
    assert est.num_matvecs < 0.2 * var / (0.001 * float(evals.sum())) ** 2


def test_bad_input():
    m = _bn_cnn()
    x, y = _data()
    with pytest.raises(ConfigError, match="bn_mode"):
        HessianOperator(m, TF.cross_entropy, (x, y), bn_mode="batch")
    with pytest.raises(ConfigError, match="not trainable parameters"):
        HessianOperator(m, TF.cross_entropy, (x, y), param_names=["nope"])
    with pytest.raises(ShapeError, match="same leading size"):
        HessianOperator(m, TF.cross_entropy, (x, y[:3]))
    with pytest.raises(ShapeError, match="batch"):
        HessianOperator(m, TF.cross_entropy, 5)
    H = HessianOperator(m, TF.cross_entropy, (x, y))
    with pytest.raises(ConfigError, match="num_matvecs"):
        H.trace(0)
    with pytest.raises(ConfigError, match="k must be"):
        H.eigenvalues(0)
    with pytest.raises(ConfigError, match="which"):
        H.eigenvalues(1, "middle")
    with pytest.raises(ConfigError, match="method"):
        H.trace(5, method="exact")
    with pytest.raises(ShapeError, match="flat vector"):
        H.matvec(torch.zeros(3, dtype=D))
    with pytest.raises(ConfigError, match="max_dim"):
        H.dense(max_dim=10)

    class NaNOperator(CurvatureOperator):
        def _matvec(self, v):
            return v * float("nan")

    with pytest.raises(DivergenceError, match="non-finite"):
        lanczos_eigenpairs(NaNOperator(5, D, "cpu"), 1)
    with pytest.raises(ConfigError, match="sigma"):
        noise_stability(m, TF.cross_entropy, (x, y), -0.1)
    with pytest.raises(ConfigError, match="num_samples"):
        noise_stability(m, TF.cross_entropy, (x, y), 0.1, num_samples=1)
    with pytest.raises(ConfigError, match="not trainable parameters"):
        noise_stability(m, TF.cross_entropy, (x, y), 0.1, param_names=["nope"])


def test_noise_stability_closed_form_quadratic():
    """For a quadratic loss, E L(W + U) - L(W) = sigma^2/2 tr(H) exactly."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=D)
    Y = torch.randn(200, 3, generator=g, dtype=D)
    lin = nn.Linear(12, 3).to(D)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean()  # noqa: E731
    tr = float(HessianOperator(lin, loss, (X, Y)).dense().trace())
    for antithetic in (True, False):
        ns = noise_stability(lin, loss, (X, Y), 0.2, 400, antithetic=antithetic, generator=g)
        assert abs(ns.value - 0.02 * tr) < 4.5 * ns.stderr
    # relative sigma: per tensor std = sigma ||W_l|| / sqrt(n_l), so E = sum_l std_l^2/2 tr(H_ll)
    Hd = HessianOperator(lin, loss, (X, Y)).dense()
    w, b = lin.weight.detach(), lin.bias.detach()
    sw2, sb2 = (0.1 * w.norm()) ** 2 / w.numel(), (0.1 * b.norm()) ** 2 / b.numel()
    expected = float(sw2 / 2 * Hd.diag()[: w.numel()].sum() + sb2 / 2 * Hd.diag()[w.numel() :].sum())
    ns = noise_stability(lin, loss, (X, Y), 0.1, 400, relative=True, generator=g)
    assert abs(ns.value - expected) < 4.5 * ns.stderr


def test_noise_stability_train_mode_leaves_buffers():
    m = _bn_cnn()
    x, y = _data()
    before = {k: b.clone() for k, b in m.named_buffers()}
    ns = noise_stability(
        m, TF.cross_entropy, (x, y), 0.05, 8, bn_mode="train", generator=torch.Generator().manual_seed(0)
    )
    assert math.isfinite(ns.value) and ns.stderr > 0
    assert all(torch.equal(before[k], b) for k, b in m.named_buffers())
    # brute force: the same draws, one model evaluation at a time
    g = torch.Generator().manual_seed(0)
    ns_eval = noise_stability(m, TF.cross_entropy, (x, y), 0.05, 8, antithetic=False, generator=g)
    g = torch.Generator().manual_seed(0)
    params = {k: p.detach() for k, p in m.named_parameters()}
    noise = {k: torch.randn((8,) + p.shape, generator=g, dtype=D) * 0.05 for k, p in params.items()}
    m.eval()
    with torch.no_grad():
        clean = TF.cross_entropy(m(x), y)
        losses = [
            TF.cross_entropy(functional_call(m, {k: params[k] + noise[k][i] for k in params}, (x,)), y)
            for i in range(8)
        ]
    m.train()
    assert abs(ns_eval.value - float(torch.stack(losses).mean() - clean)) < 1e-12


def test_vmap_batching_with_channels_last_looking_input():
    """x with a size-1 channel axis and strides (64, 1, 8, 1) is also channels-last contiguous."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4)
    ).eval()
    x = torch.rand(12, 8, 8, 1).permute(0, 3, 1, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (12,))
    V = torch.randn(3, sum(p.numel() for p in m.parameters())).T  # three columns
    loop = HessianOperator(m, TF.cross_entropy, (x, y)).matmat(V)
    batched = HessianOperator(m, TF.cross_entropy, (x, y), batching="vmap", chunk_size=2).matmat(V)
    assert loop.shape == batched.shape == V.shape
    assert torch.allclose(loop, batched, atol=1e-5)


def test_noise_stability_seed_param_names_and_global_rng():
    m = _bn_cnn().eval()
    x, y = _data()
    state = torch.random.get_rng_state()
    a = noise_stability(m, TF.cross_entropy, (x, y), 0.05, 4)
    assert a == noise_stability(m, TF.cross_entropy, (x, y), 0.05, 4, generator=0)  # None means seed 0
    assert a.num_samples == 4
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never used
    # only the named tensors are perturbed: brute force over the same draws
    ns = noise_stability(m, TF.cross_entropy, (x, y), 0.3, 6, antithetic=False, param_names=["4.bias"], generator=2)
    noise = torch.randn((6, 4), generator=torch.Generator().manual_seed(2), dtype=D) * 0.3
    with torch.no_grad():
        clean = TF.cross_entropy(m(x), y)
        losses = [TF.cross_entropy(functional_call(m, {"4.bias": m[4].bias + noise[i]}, (x,)), y) for i in range(6)]
    assert abs(ns.value - float(torch.stack(losses).mean() - clean)) < 1e-12
