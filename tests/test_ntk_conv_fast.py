"""The fast ReLU conv kernels (``ntk.conv_fast``) against the generic path of ``analytic_conv_ntk`` (fast=False)
and against a 40-digit reference where the generic path loses digits (nearly antiparallel patches)."""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch

import symgen.ntk.conv_fast as conv_fast
from symgen.errors import ShapeError
from symgen.ntk import analytic_conv_ntk

D = torch.float64
ULP = 2.0**-24


def _inputs(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, *shape, generator=g, dtype=D)
    return x, {
        "same": None,
        "other": torch.randn(4, *shape, generator=g, dtype=D),
        "near": x + 1e-6 * torch.randn(x.shape, generator=g, dtype=D),
    }


def _both(x, y, depth, fs, readout, padding, w, b, dtype):
    args = (x.to(dtype), None if y is None else y.to(dtype), depth, fs, "relu", readout, padding, w, b)
    return analytic_conv_ntk(*args), analytic_conv_ntk(*args[:2], *args[2:], fast=False)


CASES = [((2, 6, 5), (3, 2)), ((1, 7), 3), ((1, 5, 5), 3)]


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("padding", ["circular", "same", "valid"])
@pytest.mark.parametrize("shape,fs", CASES)
def test_fast_equals_generic_float64(readout, padding, shape, fs):
    x, ys = _inputs(shape, 3)
    for depth, (w, b), (name, y) in itertools.product((1, 2, 3), ((1.0, 0.0), (1.3, 0.4)), ys.items()):
        try:
            fast, ref = _both(x, y, depth, fs, readout, padding, w, b, D)
        except ShapeError:  # 'valid' leaves no positions
            continue
        for f, r in zip(fast, ref, strict=True):
            assert f.dtype == D and f.shape == r.shape
            torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12, msg=f"{depth} {w} {b} {name}")


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("padding", ["circular", "same"])
def test_fast_float32_within_a_few_ulps_of_float64(readout, padding):
    x, ys = _inputs((1, 6, 6), 4)
    ys["antiparallel"] = -x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    for depth, b, (name, y) in itertools.product((1, 2, 3), (0.0, 0.3), ys.items()):
        out32 = analytic_conv_ntk(
            x.float(), None if y is None else y.float(), depth, 3, "relu", readout, padding, 1.3, b
        )
        ref = analytic_conv_ntk(x, y, depth, 3, "relu", readout, padding, 1.3, b, fast=False)
        d1 = analytic_conv_ntk(x, None, depth, 3, "relu", readout, padding, 1.3, b, fast=False)
        d2 = d1 if y is None else analytic_conv_ntk(y, None, depth, 3, "relu", readout, padding, 1.3, b, fast=False)
        for k32, k64, k11, k22 in zip(out32, ref, d1, d2, strict=True):
            assert k32.dtype == torch.float32
            scale = (k11.diagonal()[:, None] * k22.diagonal()[None, :]).sqrt()
            err = ((k32.double() - k64).abs() / scale).max().item()
            assert err < 16 * ULP, (depth, b, name, err)


def test_tiles_and_mirroring_equal_one_tile(monkeypatch):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(11, 1, 5, 4, generator=g, dtype=D), torch.randn(7, 1, 5, 4, generator=g, dtype=D)
    for readout, depth, x2 in itertools.product(("flatten", "gap"), (1, 2), (None, y)):
        whole = analytic_conv_ntk(x, x2, depth, 3, "relu", readout, "same", 1.2, 0.2)
        monkeypatch.setattr(conv_fast, "_TILE_ENTRIES", 20 * 20 * (20 if readout == "gap" else 1))
        tiled = analytic_conv_ntk(x, x2, depth, 3, "relu", readout, "same", 1.2, 0.2)
        monkeypatch.undo()
        for a, b in zip(whole, tiled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
            if x2 is None:
                assert torch.equal(a, a.T)


def test_tiles_on_threads_equal_serial_tiles(monkeypatch):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(13, 1, 4, 4, generator=g, dtype=D)
    monkeypatch.setattr(conv_fast, "_TILE_ENTRIES", 16 * 16)
    threads = torch.get_num_threads()
    for readout in ("flatten", "gap"):
        try:
            torch.set_num_threads(1)
            serial = analytic_conv_ntk(x, None, 2, 3, "relu", readout, "circular", 1.1, 0.1)
            torch.set_num_threads(2)  # 10 (flatten) or 91 (gap) tiles: the pool
            pooled = analytic_conv_ntk(x, None, 2, 3, "relu", readout, "circular", 1.1, 0.1)
            assert torch.get_num_threads() == 2  # restored after the pool
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(serial, pooled, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_diagonal_is_exact():
    # x = x': theta = 0 at every position, so the depth-1 NNGP is w^2 mean_p v_p / 2 + b^2 to the last digit
    x = torch.randn(6, 1, 7, dtype=D)
    for x2 in (None, x.clone()):
        nngp, ntk = analytic_conv_ntk(x, x2, 1, 3, "relu", "flatten", "circular", 1.0, 0.0)
        v = (torch.nn.functional.pad(x, (1, 1), mode="circular") ** 2).unfold(2, 3, 1).mean(-1)[:, 0]
        torch.testing.assert_close(nngp.diagonal(), v.mean(1) / 2, rtol=1e-15, atol=0)
        torch.testing.assert_close(ntk.diagonal(), v.mean(1), rtol=1e-15, atol=0)


def _mp_depth1_flatten(a: torch.Tensor, b: torch.Tensor, k: int, w: float) -> tuple[float, float]:
    """40-digit depth-1 ReLU conv kernel, flatten read-out, circular 1D, one channel, no bias."""
    mpmath.mp.dps = 40
    d = a.shape[-1]
    nngp = ntk = mpmath.mpf(0)
    for p in range(d):
        u = [mpmath.mpf(float(a[(p - (k - 1) // 2 + j) % d])) for j in range(k)]
        v = [mpmath.mpf(float(b[(p - (k - 1) // 2 + j) % d])) for j in range(k)]
        c = w * w * sum(x * y for x, y in zip(u, v, strict=True)) / k
        n = w * w * mpmath.sqrt(sum(x * x for x in u) * sum(y * y for y in v)) / k
        th = mpmath.acos(c / n)
        kk = n * (mpmath.sin(th) + (mpmath.pi - th) * mpmath.cos(th)) / (2 * mpmath.pi)
        nngp += kk
        ntk += c * (mpmath.pi - th) / (2 * mpmath.pi)
    return float(w * w * nngp / d), float(w * w * nngp / d + w * w * ntk / d)


def test_nearly_antiparallel_and_parallel_patches_to_full_precision():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 7, generator=g, dtype=D)
    for sign, eps in itertools.product((1.0, -1.0), (1e-4, 1e-7)):
        y = sign * x + eps * torch.randn(x.shape, generator=g, dtype=D)
        nngp, ntk = analytic_conv_ntk(x, y, 1, 3, "relu", "flatten", "circular", 1.2, 0.0)
        for i in range(3):
            ref_k, ref_t = _mp_depth1_flatten(x[i, 0], y[i, 0], 3, 1.2)
            assert math.isclose(nngp[i, i].item(), ref_k, rel_tol=1e-11), (sign, eps, i)
            assert math.isclose(ntk[i, i].item(), ref_t, rel_tol=1e-11), (sign, eps, i)


def test_inputs_that_require_grad_take_the_differentiable_path():
    x = torch.randn(3, 1, 6, dtype=D, requires_grad=True)
    _, ntk = analytic_conv_ntk(x, None, 2, 3, "relu", "flatten")
    (g,) = torch.autograd.grad(ntk.sum(), x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(ntk.detach(), analytic_conv_ntk(x.detach(), None, 2, 3, "relu", "flatten")[1])


def test_x2_given_as_x1_is_computed_once_per_pair_with_the_same_values():
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for readout in ("flatten", "gap"):
        same = analytic_conv_ntk(x, x, 2, 3, "relu", readout, "circular", 1.5, 0.1, dtype=torch.float64)
        none = analytic_conv_ntk(x, None, 2, 3, "relu", readout, "circular", 1.5, 0.1, dtype=torch.float64)
        other = analytic_conv_ntk(x, x.clone(), 2, 3, "relu", readout, "circular", 1.5, 0.1, dtype=torch.float64)
        for s, n, o in zip(same, none, other, strict=True):
            assert torch.equal(s, n) and torch.equal(s, s.T)
            torch.testing.assert_close(s, o, rtol=1e-13, atol=1e-13)
