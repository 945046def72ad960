"""The CurvatureOperator base: column convention, MatrixOperator, to_scipy, estimators that take an operator."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.autograd.functional import hessian

from symgen.curvature import (
    GGNOperator,
    HessianOperator,
    MatrixOperator,
    deflated_trace,
    hutchinson_trace,
    lanczos_eigenpairs,
    slq_density,
)
from symgen.errors import ConfigError, ShapeError

D = torch.float64


def _sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=D)
    return B + B.T


def test_matrix_operator_products_estimates_against_torch_linalg():
    A = _sym(25)
    op = MatrixOperator(A)
    assert op.shape == (25, 25) and op.dim == 25 and op.dtype == D and op.device.type == "cpu"
    g = torch.Generator().manual_seed(1)
    V = torch.randn(25, 4, generator=g, dtype=D)
    assert torch.allclose(op.matmat(V), A @ V, atol=1e-12)  # columns in, columns out
    assert torch.allclose(op @ V, A @ V, atol=1e-12)
    assert torch.allclose(op @ V[:, 0], A @ V[:, 0], atol=1e-12)
    assert op.matmat(V[:, :0]).shape == (25, 0)
    assert op.num_matvecs == 4 + 4 + 1
    assert torch.equal(op.dense(), 0.5 * (A + A.T))
    ev, U = torch.linalg.eigh(A)
    pairs = op.eigenpairs(3, tol=1e-10, generator=g)
    assert torch.allclose(pairs.values, ev.flip(0)[:3], atol=1e-9)
    assert pairs.vectors.shape == (25, 3)
    assert torch.allclose(A @ pairs.vectors, pairs.vectors * pairs.values, atol=1e-8)
    assert torch.allclose(op.eigenvalues(2, "smallest", tol=1e-10, generator=g), ev[:2], atol=1e-9)
    exact = float(A.trace())
    var = 2 * float((A**2).sum() - (A.diag() ** 2).sum())  # Rademacher Hutchinson variance
    for method in ("hutchinson", "hutch++", "deflated"):
        est = op.trace(200, g, method=method)
        assert abs(est.value - exact) < 4.5 * max(est.stderr, 1e-9), method
    assert abs(op.trace(200, g).stderr - math.sqrt(var / 200)) < 0.3 * math.sqrt(var / 200)
    full = op.trace(10, g, method="deflated", deflation_steps=25)
    assert full.stderr == 0 and abs(full.value - exact) < 1e-9
    dens = op.density(25, 1, generator=g)
    assert torch.allclose(dens.nodes[0], ev, atol=1e-8)


def test_generator_seed_or_none_means_seed_zero_and_global_rng_untouched():
    op = MatrixOperator(_sym(12))
    state = torch.random.get_rng_state()
    a = hutchinson_trace(op, 5)
    b = hutchinson_trace(op, 5, generator=0)
    c = hutchinson_trace(op, 5, generator=torch.Generator().manual_seed(0))
    assert a.samples == b.samples == c.samples
    assert hutchinson_trace(op, 5, generator=1).samples != a.samples
    assert torch.equal(lanczos_eigenpairs(op, 1).vectors, lanczos_eigenpairs(op, 1, generator=0).vectors)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_to_scipy_eigsh_matches_dense_autograd_hessian():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    x, y = torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]

    def loss_of(v):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = v[i : i + s.numel()].view(s)
            i += s.numel()
        return TF.cross_entropy(torch.func.functional_call(m, params, (x,)), y)

    ref = torch.linalg.eigvalsh(hessian(loss_of, torch.cat([p.detach().reshape(-1) for p in m.parameters()])))
    H = HessianOperator(m, TF.cross_entropy, (x, y))
    L = H.to_scipy()
    assert L.shape == (H.dim, H.dim) and L.dtype == np.float64
    vals = np.sort(eigsh(L, k=3, which="LA", tol=1e-12, v0=np.ones(H.dim))[0])[::-1]
    assert np.allclose(vals, ref.flip(0)[:3].numpy(), atol=1e-9)
    v = np.linspace(-1, 1, H.dim)
    assert np.allclose(L @ v, (H.dense() @ torch.from_numpy(v)).numpy(), atol=1e-12)
    assert np.allclose(L.matmat(np.eye(H.dim)[:, :2]), H.dense()[:, :2].numpy(), atol=1e-12)
    # any operator converts: the GGN's top eigenvalues through ARPACK and through its dense matrix
    G = GGNOperator(m, TF.cross_entropy, (x, y))
    top = np.sort(eigsh(G.to_scipy(), k=2, which="LA", tol=1e-12, v0=np.ones(H.dim))[0])[::-1]
    assert np.allclose(top, torch.linalg.eigvalsh(G.dense()).flip(0)[:2].numpy(), atol=1e-9)


def test_bad_input_gives_clear_errors():
    A = _sym(6)
    op = MatrixOperator(A)
    with pytest.raises(ShapeError, match="flat vector"):
        op.matvec(torch.zeros(7, dtype=D))
    with pytest.raises(ShapeError, match="columns"):
        op.matmat(torch.zeros(2, 6, dtype=D))  # rows instead of columns
    with pytest.raises(ShapeError, match="columns"):
        op.matmat(torch.zeros(6, 2, 1, dtype=D))
    with pytest.raises(ShapeError, match="columns"):
        op @ torch.zeros(3, 6, dtype=D)
    with pytest.raises(ShapeError, match="square"):
        MatrixOperator(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="square floating-point"):
        MatrixOperator(torch.eye(3, dtype=torch.int64))
    with pytest.raises(ShapeError, match="symmetric"):
        MatrixOperator(torch.triu(torch.ones(4, 4)))
    with pytest.raises(ShapeError, match="NaN"):
        MatrixOperator(torch.full((3, 3), float("nan")))
    with pytest.raises(ConfigError, match="CurvatureOperator"):
        hutchinson_trace(A, 10)  # a bare matrix: wrap it in MatrixOperator
    with pytest.raises(ConfigError, match="CurvatureOperator"):
        slq_density(lambda v: A @ v, 5)
    with pytest.raises(ShapeError, match="start vector"):
        lanczos_eigenpairs(op, 1, start=torch.ones(5, dtype=D))
    with pytest.raises(ConfigError, match="rtol"):
        deflated_trace(op, 5, rtol=-1.0)
    with pytest.raises(ConfigError, match="k ="):
        op.eigenvalues(7)


def test_one_lanczos_process_serves_eigenpairs_deflated_trace_and_first_slq_run():
    """Sharing a process: the same numbers as running each estimate on that process alone, fewer products."""
    from symgen.curvature.lanczos import LanczosProcess, lanczos

    g = torch.Generator().manual_seed(3)
    # a network-like spectrum: a few outliers over a bulk
    Qm, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=D))
    lam = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=D), torch.randn(57, generator=g, dtype=D)])
    A = (Qm * lam) @ Qm.T
    op = MatrixOperator(0.5 * (A + A.T))
    start = torch.randn(60, generator=g, dtype=D)
    proc = LanczosProcess(op, start)
    pairs = lanczos_eigenpairs(op, 3, tol=1e-8, max_steps=25, process=proc)
    alone = lanczos_eigenpairs(op, 3, tol=1e-8, max_steps=25, start=start)
    assert torch.allclose(pairs.values, alone.values, rtol=1e-12) and pairs.num_matvecs == alone.num_matvecs
    assert torch.allclose(pairs.values, lam[:3], rtol=1e-6)
    # continuing a finished process costs nothing more
    again = lanczos_eigenpairs(op, 3, tol=1e-8, max_steps=25, process=proc)
    assert again.num_matvecs == 0 and torch.allclose(again.values, pairs.values)

    # the trace: deflated by the process's basis, only fresh probes counted; exact when the basis spans all
    steps = proc.steps
    before = op.num_matvecs
    est = deflated_trace(op, 20, deflation=proc, generator=5)
    assert est.num_matvecs == 20 == op.num_matvecs - before and proc.steps == steps
    assert est.exact_part == pytest.approx(float(proc.alphas.sum()))
    Q = proc.Q
    P = torch.eye(60, dtype=D) - Q @ Q.T
    assert est.exact_part == pytest.approx(float(torch.trace(Q.T @ A @ Q)), rel=1e-10)
    # unbiased: the stochastic part estimates tr(P A P), over many seeds
    vals = torch.tensor([deflated_trace(op, 20, deflation=proc, generator=s).value for s in range(400)], dtype=D)
    want = float(torch.trace(A))
    assert abs(float(vals.mean()) - want) < 4 * float(vals.std()) / 20 + 1e-9
    assert float(torch.trace(P @ A @ P)) == pytest.approx(want - est.exact_part, rel=1e-8)

    # the first SLQ run is the process's first num_steps steps: the same nodes as a run of its own,
    # also after the basis is released (the run needs only T)
    proc.release_basis()
    with pytest.raises(ConfigError, match="released its basis"):
        proc.extend(1)
    with pytest.raises(ConfigError, match="released its basis"):
        deflated_trace(op, 20, deflation=proc, generator=5)
    dens = slq_density(op, 10, 2, first=proc, generator=7)
    a, b, _ = lanczos(op, start, 10)
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    assert torch.allclose(dens.nodes[0], torch.linalg.eigvalsh(T), rtol=1e-8, atol=1e-8)
    assert dens.num_matvecs == 10  # only the second run's products
    with pytest.raises(ConfigError, match="LanczosProcess on the same operator"):
        deflated_trace(MatrixOperator(_sym(60)), 10, deflation=proc)
