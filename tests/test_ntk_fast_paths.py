"""The forward-only fast paths of the analytic kernels against their references (issue 26, section 2).

``analytic_ntk(..., fast=True)`` (ReLU, no gradient) against the differentiable recursion (``fast=False``);
``analytic_conv_ntk`` on zero maps without bias (a zero patch has v = 0: its gap and sine must be 0, not a
clamped or rounded value) against the generic path; the conv workspace and thread pool, reused across calls
of other shapes, dtypes and thread counts; the cheaper finiteness check of the inputs.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import symgen.ntk.analytic as analytic
from symgen.errors import DivergenceError
from symgen.ntk import analytic_conv_ntk, analytic_ntk

D = torch.float64


def _mlp_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 1, 4, 4, generator=g, dtype=D)
    x[0] = 0.0  # zero input: v = b^2 (0 without bias)
    x[1] = -x[2]  # antiparallel
    x[3] = 2.5 * x[4]  # parallel, other norm
    x[5] = -x[6] * (1 + 1e-9)  # nearly antiparallel
    x[7] = x[8] + 1e-7 * torch.randn(x[8].shape, generator=g, dtype=D)  # nearly parallel
    y = torch.cat([x[:6], torch.randn(5, 1, 4, 4, generator=g, dtype=D)])
    return x, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("w,b", [(1.0, 0.0), (1.5, 0.1)])
def test_mlp_fast_equals_differentiable_path_float64(depth, w, b):
    x, y = _mlp_inputs()
    for x2 in (None, x, y):
        fast = analytic_ntk(x, x2, depth, "relu", w, b)
        ref = analytic_ntk(x, x2, depth, "relu", w, b, fast=False)
        for f, r in zip(fast, ref, strict=True):
            assert f.dtype == D and f.shape == r.shape
            assert _rel(f, r) < 1e-13, (depth, w, b, x2 is None)
        if x2 is None:
            assert torch.equal(fast[1], fast[1].T) or _rel(fast[1], fast[1].T) < 1e-15


@pytest.mark.parametrize("w,b", [(1.0, 0.0), (1.5, 0.1)])
def test_mlp_fast_path_without_close_pairs_skips_the_searches_and_equals_reference(monkeypatch, w, b):
    # pairs all farther than 0.26 rad from (anti)parallel: one reduction decides, no det search, no series
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(10, 1, 8, 8, generator=g, dtype=D), torch.randn(7, 1, 8, 8, generator=g, dtype=D)
    for x2 in (None, y):
        refs = [analytic_ntk(x, x2, depth, "relu", w, b, fast=False) for depth in (0, 1, 2, 3)]

        def boom(*args, **kwargs):
            raise AssertionError("searched")

        with monkeypatch.context() as m:
            m.setattr(analytic, "_exact_det", boom)
            m.setattr(analytic.duals, "series_fix", boom)
            m.setattr(analytic, "check_finite_input", boom)
            for depth, ref in zip((0, 1, 2, 3), refs, strict=True):
                for dt in (D, torch.float32):
                    fast = analytic_ntk(x.to(dt), None if x2 is None else x2.to(dt), depth, "relu", w, b)
                    for f, r in zip(fast, ref, strict=True):
                        assert f.dtype == dt
                        assert _rel(f, r) < (1e-13 if dt == D else 1e-6), (depth, dt, x2 is None)


def test_one_non_finite_row_raises_in_the_fast_path():
    # N = 1: the only pair is the diagonal, whose x = x' shortcut must not hide a NaN or inf
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1, 1, 3, 3, dtype=D)
        x[0, 0, 1, 2] = bad
        for x2 in (None, torch.randn(2, 1, 3, 3, dtype=D)):
            with pytest.raises(DivergenceError, match="x1 at batch index 0"):
                analytic_ntk(x, x2, 2, "relu", 1.5, 0.1)
            with pytest.raises(DivergenceError, match="x1 at batch index 0"):
                analytic_ntk(x.float(), x2, 1, "relu", 1.0, 0.0)


def test_mlp_fast_float32_close_to_float64_and_blocks_equal_whole(monkeypatch):
    x, y = _mlp_inputs()
    for depth, x2 in itertools.product((1, 2), (None, y)):
        f32 = analytic_ntk(x.float(), None if x2 is None else x2.float(), depth, "relu", 1.5, 0.1)
        f64 = analytic_ntk(x, x2, depth, "relu", 1.5, 0.1)
        assert f32[0].dtype == torch.float32
        assert max(_rel(a, b) for a, b in zip(f32, f64, strict=True)) < 1e-6
    whole = [analytic_ntk(x, x2, 2, "relu", 1.5, 0.1) for x2 in (None, y)]
    monkeypatch.setattr(analytic, "_BLOCK_ENTRIES", 40)  # blocks of 3-4 rows, diagonal offsets
    for (nngp, ntk), x2 in zip(whole, (None, y), strict=True):
        bn, bt = analytic_ntk(x, x2, 2, "relu", 1.5, 0.1)
        assert _rel(bn, nngp) < 1e-15 and _rel(bt, ntk) < 1e-15


def test_inputs_that_require_grad_keep_the_differentiable_path():
    x, _ = _mlp_inputs()
    x = x.clone().requires_grad_(True)
    _, ntk = analytic_ntk(x, None, 2, "relu", 1.5, 0.1)
    ntk.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("padding", ["circular", "same"])
def test_conv_zero_maps_without_bias_equal_generic(readout, padding):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 1, 6, 6, generator=g, dtype=D)
    x[0] = 0.0  # a zero image
    x[1, :, :3] = 0.0  # zero patches in the upper half
    for depth, x2 in itertools.product((2, 3), (None, x[:3].clone())):
        fast = analytic_conv_ntk(x, x2, depth, 3, "relu", readout, padding, 1.2, 0.0)
        ref = analytic_conv_ntk(x, x2, depth, 3, "relu", readout, padding, 1.2, 0.0, fast=False)
        for f, r in zip(fast, ref, strict=True):
            assert _rel(f, r) < 1e-13, (depth, x2 is None)


def test_conv_workspace_and_pool_reused_across_calls():
    g = torch.Generator().manual_seed(13)
    big = torch.randn(40, 1, 6, 6, generator=g, dtype=D)
    small = torch.randn(3, 2, 5, 5, generator=g, dtype=D)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = analytic_conv_ntk(big, None, 2, 3, "relu", "flatten", "circular", 1.3, 0.2)
        analytic_conv_ntk(small.float(), None, 3, 3, "relu", "gap", "same", 1.0, 0.0)
        analytic_conv_ntk(small, big[:2, :1].expand(2, 2, 6, 6)[:, :, :5, :5], 1, 3, "relu", "flatten", "valid")
        again = analytic_conv_ntk(big, None, 2, 3, "relu", "flatten", "circular", 1.3, 0.2)
        torch.set_num_threads(2)  # 3 tiles of up to 20 x 20 pairs: the pool
        pooled = analytic_conv_ntk(big, None, 2, 3, "relu", "flatten", "circular", 1.3, 0.2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, pooled, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_finite_check_is_one_sum_and_still_names_the_row():
    x = torch.full((4, 1, 3, 3), 1e308, dtype=D)  # finite, but the sum overflows: the per-row search, no error
    analytic_ntk(x / 1e300, None, 1)
    analytic_conv_ntk(x / 1e300, None, 1)
    analytic.check_finite_input(x, "x1", "analytic_ntk")
    x[2, 0, 1, 1] = float("nan")
    for fn in (analytic_ntk, analytic_conv_ntk):
        with pytest.raises(DivergenceError, match="batch index 2"):
            fn(x, None, 1)
    y = torch.randn(3, 1, 3, 3, dtype=D)
    y[1, 0, 0, 0] = float("-inf")
    with pytest.raises(DivergenceError, match="x2 at batch index 1"):
        analytic_ntk(torch.randn(2, 1, 3, 3, dtype=D), y, 1)


def _child_pool(queue) -> None:
    from symgen.ntk import conv_ops

    queue.put(conv_ops.pool(2).submit(sum, [1, 2, 3]).result(timeout=30))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_fresh_tile_pool():
    # the child inherits the parent's executor but not its threads: without the at-fork reset, its
    # idle-thread count says a worker is free and a submit waits forever (plain Python threads here, so
    # no OpenMP runtime is involved, which has fork troubles of its own)
    import multiprocessing as mp

    from symgen.ntk import conv_ops

    for _ in range(4):
        assert conv_ops.pool(2).submit(sum, [1, 1]).result(timeout=30) == 2
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_pool, args=(queue,))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "the forked child waited on the parent's thread pool"
    assert queue.get(timeout=5) == 6


def test_relu_gap_without_selection_equals_the_selecting_formula_and_a_long_double_reference():
    import math

    import numpy as np

    from symgen.ntk import duals

    g = torch.Generator().manual_seed(21)
    v1, v2 = torch.rand(400, generator=g, dtype=D) + 0.1, torch.rand(400, generator=g, dtype=D) + 0.1
    n = (v1 * v2).sqrt()
    angle = torch.cat(
        [torch.rand(394, generator=g, dtype=D) * math.pi, torch.tensor([0.0, 1e-9, 1e-4, 2.0, 3.1, math.pi], dtype=D)]
    )
    c, s = n * torch.cos(angle), n * torch.sin(angle)  # c > 0, c = 0, c < 0 and both ends
    ref = duals.relu_gap(c, s, n)
    out, scratch, n_copy = torch.empty_like(c), torch.empty_like(c), n.clone()
    got = duals.relu_gap(c, s, n_copy, out=out, scratch=scratch, n_free=True, n_positive=True)
    assert got.data_ptr() == out.data_ptr()
    assert float(((got - ref).abs() / n).max()) < 1e-15  # a few ulps of n
    cl, sl, nl = (t.numpy().astype(np.longdouble) for t in (c, s, n))
    pi = np.arccos(np.longdouble(-1.0))
    exact = nl - (sl + (pi - np.arctan2(sl, cl)) * cl) / pi  # n - n J1 / pi
    assert float(np.max(np.abs(got.numpy() - exact) / nl)) < 1e-15
    assert torch.equal(duals.relu_gap(c, s, n, n_positive=True), got)


def test_numpy_atan2_and_sqrt_on_large_tensors_equal_torch():
    from symgen.ntk import duals

    g = torch.Generator().manual_seed(22)
    for dt, ulps in ((D, 2.0), (torch.float32, 2.0)):
        y = torch.randn(duals.NUMPY_MIN + 7, generator=g, dtype=D).to(dt)
        x = torch.randn(y.shape, generator=g, dtype=D).to(dt)
        x[:4], y[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0]), torch.tensor([0.0, 0.0, 0.0, 1e-30])
        ref, got = torch.atan2(y, x), duals.atan2(y, x, out=torch.empty_like(y))
        assert float((got - ref).abs().max()) <= ulps * torch.finfo(dt).eps * math.pi
        v = y.abs()
        root = duals.sqrt_(v.clone())  # numpy's is correctly rounded, torch's within an ulp
        assert float(((root - v.sqrt()).abs() / v.sqrt().clamp_min(1e-30)).max()) <= torch.finfo(dt).eps
        assert torch.equal(duals.atan2(y[:8], x[:8]), torch.atan2(y[:8], x[:8]))  # small: torch itself


def test_mlp_fast_path_with_numpy_sized_tiles_equals_reference(monkeypatch):
    # 130 x 130 > NUMPY_MIN entries; tiles of 40 x 40 (x2 = None mirrored) and row blocks (x2 given)
    g = torch.Generator().manual_seed(23)
    x, y = torch.randn(130, 9, generator=g, dtype=D), torch.randn(131, 9, generator=g, dtype=D)
    x[5] = x[6] * 1.5  # a parallel pair: the close path in one tile
    for x2 in (None, y):
        ref = analytic_ntk(x, x2, 2, "relu", 1.5, 0.1, fast=False)
        whole = analytic_ntk(x, x2, 2, "relu", 1.5, 0.1)
        with monkeypatch.context() as m:
            m.setattr(analytic, "_BLOCK_ENTRIES", 1600)
            tiled = analytic_ntk(x, x2, 2, "relu", 1.5, 0.1)
        f32 = analytic_ntk(x.float(), None if x2 is None else x2.float(), 2, "relu", 1.5, 0.1)
        for f, t, r, s in zip(whole, tiled, ref, f32, strict=True):
            assert _rel(f, r) < 1e-13 and _rel(t, r) < 1e-13 and _rel(s, r) < 1e-6
