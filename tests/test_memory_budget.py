"""Memory is sized before it is spent: with a tiny limit, a request that cannot fit raises a MemoryBudgetError at
once (naming the size needed and the limit, before any large allocation: tracemalloc sees no big block), and a
request that fits runs and equals the unlimited result."""

import time
import tracemalloc

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen import memory
from symgen.curvature import HessianOperator, MatrixOperator
from symgen.errors import ConfigError, MemoryBudgetError
from symgen.ntk import empirical_ntk, empirical_ntk_fn

D = torch.float64


def _mlp(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(D)


def _raises_early(fn, limit, *words):
    """fn() raises MemoryBudgetError quickly, naming ``words``, with no allocation near the limit."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with memory.memory_limit(limit), pytest.raises(MemoryBudgetError) as info:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5
    assert peak < limit, peak  # torch allocations of numpy-free tensors are not traced: the error says the rest
    msg = str(info.value)
    assert "needs" in msg and memory.format_bytes(limit) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_available_bytes_rules(monkeypatch):
    assert memory.available_bytes() > 0
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    got = memory.available_bytes()
    assert got == memory.FALLBACK_BYTES or got > 0  # psutil if installed, else the constant
    monkeypatch.setenv(memory.ENV_VAR, "3M")
    assert memory.limit_bytes() == 3 << 20
    with memory.memory_limit(1234):
        assert memory.limit_bytes() == 1234
    assert memory.limit_bytes() == 3 << 20
    monkeypatch.setenv(memory.ENV_VAR, "lots")
    with pytest.raises(ConfigError, match=memory.ENV_VAR):
        memory.limit_bytes()


def test_default_limit_follows_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10_000)
    x = torch.randn(100, 3, dtype=D)
    with pytest.raises(MemoryBudgetError, match="stream"):
        empirical_ntk(_mlp(), x)  # (100, 100) float64 = 80 kB > 10 kB available


def test_ntk_output_too_big_raises_before_allocating():
    model = _mlp()
    x = torch.randn(50_000, 3, dtype=D)  # a 20 GB kernel
    msg = _raises_early(lambda: empirical_ntk(model, x), 1 << 20, "(50000, 50000)", "output='trace'")
    assert "20000000000" in msg
    _raises_early(lambda: empirical_ntk(model, x[:300], output="full"), 1 << 20, "output='trace'", "(300, 300, 2, 2)")


def test_ntk_stream_too_big_raises_before_allocating():
    model = _mlp()
    loader = [torch.randn(500, 3, dtype=D) for _ in range(6)]
    _raises_early(lambda: empirical_ntk_fn(model).stream(loader), 1 << 20, "stream")


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_ntk_that_fits_equals_the_unlimited_kernel(method, output):
    model = _mlp(16)
    x1, x2 = torch.randn(40, 3, dtype=D), torch.randn(30, 3, dtype=D)
    ref = empirical_ntk(model, x1, x2, method=method, output=output)
    ref_sym = empirical_ntk(model, x1, method=method, output=output)
    with memory.memory_limit(1 << 20):  # room for the kernels, and blocks of a few samples
        got = empirical_ntk(model, x1, x2, method=method, output=output, memory_budget=20_000)
        got_sym = empirical_ntk(model, x1, method=method, output=output, memory_budget=20_000)
        streamed = empirical_ntk_fn(model, method=method, output=output).stream([x1[:25], x1[25:]])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_sym, ref_sym)
    torch.testing.assert_close(streamed, ref_sym)


def test_block_budget_bounds_the_block_pairs():
    """Blocks are sized by the kernel-sized temporaries of a block pair, not only by per-sample signals."""
    model = _mlp(16)
    x = torch.randn(60, 3, dtype=D)
    fn = empirical_ntk_fn(model, method="structured", memory_budget=50_000)
    seen = []
    orig = fn._compute

    def spy(p, b, a, c):
        seen.append((a.shape[0], a.shape[0] if c is None else c.shape[0]))
        return orig(p, b, a, c)

    fn._compute = spy
    torch.testing.assert_close(fn(x), empirical_ntk(model, x, method="structured"))
    assert len(seen) > 1 and all(6 * 8 * n1 * n2 <= 50_000 for n1, n2 in seen), seen


def test_operator_requests_are_sized_first():
    model = _mlp(8)
    x, y = torch.randn(20, 3, dtype=D), torch.randint(0, 2, (20,))
    H = HessianOperator(model, TF.cross_entropy, (x, y))
    n = H.dim  # 50 parameters
    limit = 36 * n * 8  # room for three dozen vectors
    _raises_early(lambda: H.matmat(torch.zeros(n, 10 * n, dtype=D)), limit, "matmat of 500 columns")
    _raises_early(lambda: H.eigenvalues(1, max_steps=n), limit, "Lanczos basis")
    _raises_early(lambda: H.density(n, 2), limit, "Lanczos basis")
    _raises_early(lambda: H.trace(200), limit, "probes")
    _raises_early(lambda: H.trace(200, method="hutch++"), limit, "Hutch++")
    _raises_early(lambda: H.trace(2 * n, method="deflated", deflation_steps=n), limit, "Lanczos basis")
    _raises_early(lambda: H.dense(), limit, "dense()")
    # requests that fit run and equal the unlimited numbers
    V = torch.randn(n, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    ref = (H.matmat(V), H.eigenvalues(2, max_steps=20, generator=1), H.trace(8, generator=2).value)
    with memory.memory_limit(limit):
        got = (H.matmat(V), H.eigenvalues(2, max_steps=20, generator=1), H.trace(8, generator=2).value)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert got[2] == ref[2]


def test_matrix_operator_dense_and_lanczos():
    A = torch.diag(torch.cat([torch.arange(1.0, 200.0), torch.tensor([400.0])]).to(D))
    op = MatrixOperator(A)
    _raises_early(lambda: op.eigenvalues(1, max_steps=200), 200 * 8 * 50, "Lanczos basis")
    with memory.memory_limit(200 * 8 * 60):
        assert abs(float(op.eigenvalues(1, max_steps=40, tol=1e-10)[0]) - 400.0) < 1e-6
