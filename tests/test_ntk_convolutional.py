"""Analytic conv NTK/NNGP against closed forms on patches (the MLP kernel of each patch pair) and against the
empirical NTK of wide conv nets (Monte Carlo at large width)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from symgen.errors import ConfigError, ShapeError
from symgen.ntk import analytic_conv_ntk, analytic_ntk, empirical_ntk, ntk_cnn

D = torch.float64


def _patches_1d(x: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """(N, C, L) -> (N, P, C k): patch vectors built by explicit indexing (independent of the kernel code)."""
    n, c, length = x.shape
    if padding == "circular":
        idx = [[(i - (k - 1) // 2 + j) % length for j in range(k)] for i in range(length)]
        return torch.stack([x[:, :, row].reshape(n, -1) for row in idx], 1)
    if padding == "valid":
        return torch.stack([x[:, :, i : i + k].reshape(n, -1) for i in range(length - k + 1)], 1)
    xp = F.pad(x, ((k - 1) // 2, k - 1 - (k - 1) // 2))
    return torch.stack([xp[:, :, i : i + k].reshape(n, -1) for i in range(length)], 1)


def _patch_reference(pa, pb, readout, act, w, b):
    """Depth-1 conv kernel = mean over (equal | all) patch pairs of the depth-1 MLP kernel on patch vectors."""
    nngp = torch.zeros(pa.shape[0], pb.shape[0], dtype=D)
    ntk = torch.zeros_like(nngp)
    count = 0
    for i in range(pa.shape[1]):
        for j in range(pb.shape[1]):
            if readout == "flatten" and i != j:
                continue
            k, t = analytic_ntk(pa[:, i], pb[:, j], 1, act, w, b, dtype=D)
            nngp, ntk, count = nngp + k, ntk + t, count + 1
    return nngp / count, ntk / count


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("act", ["relu", "erf"])
@pytest.mark.parametrize("padding", ["circular", "same", "valid"])
def test_depth1_equals_mlp_kernel_averaged_over_patches(readout, act, padding):
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(4, 2, 7, generator=g, dtype=D), torch.randn(3, 2, 7, generator=g, dtype=D)
    nngp, ntk = analytic_conv_ntk(xa, xb, 1, 3, act, readout, padding, 1.3, 0.0, dtype=D)
    rk, rt = _patch_reference(_patches_1d(xa, 3, padding), _patches_1d(xb, 3, padding), readout, act, 1.3, 0.0)
    torch.testing.assert_close(nngp, rk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ntk, rt, rtol=1e-12, atol=1e-12)


def test_depth1_with_bias_and_2d_same_padding_matches_unfold_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, 4, generator=g, dtype=D)
    w, b = 1.2, 0.3
    for readout in ("flatten", "gap"):
        nngp, ntk = analytic_conv_ntk(x, None, 1, (3, 2), "relu", readout, "same", w, b, dtype=D)
        xp = F.pad(x, (0, 1, 1, 1))  # same padding: left (k-1)//2, right the rest, per axis (W then H)
        pa = F.unfold(xp, (3, 2)).transpose(1, 2)  # (N, P, C k)
        # the MLP kernel's read-out adds b^2 per pair, so the pair average adds it exactly once, as the conv read-out
        ref_k = torch.zeros(3, 3, dtype=D)
        ref_t = torch.zeros_like(ref_k)
        n = 0
        for i in range(pa.shape[1]):
            for j in range(pa.shape[1]):
                if readout == "flatten" and i != j:
                    continue
                k, t = analytic_ntk(pa[:, i], pa[:, j], 1, "relu", w, b, dtype=D)
                ref_k, ref_t, n = ref_k + k, ref_t + t, n + 1
        torch.testing.assert_close(nngp, ref_k / n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ntk, ref_t / n, rtol=1e-12, atol=1e-12)


def test_depth0_is_the_linear_kernel_of_the_readout():
    x = torch.randn(4, 3, 6, dtype=D)
    nngp, ntk = analytic_conv_ntk(x, None, 0, 3, "relu", "flatten", weight_std=2.0, bias_std=0.5, dtype=D)
    flat = x.reshape(4, -1)
    torch.testing.assert_close(nngp, 4.0 * flat @ flat.T / 18 + 0.25)
    torch.testing.assert_close(ntk, nngp)
    _, ntk_gap = analytic_conv_ntk(x, None, 0, 3, "relu", "gap", dtype=D)
    m = x.mean(2)
    torch.testing.assert_close(ntk_gap, m @ m.T / 3)


def test_row_blocks_equal_one_block(monkeypatch):
    import symgen.ntk.convolutional as conv

    x = torch.randn(9, 1, 6, dtype=D)
    whole = analytic_conv_ntk(x, None, 2, 3, "relu", "gap", "circular", 1.4, 0.1, dtype=D)
    monkeypatch.setattr(conv, "_BLOCK_ENTRIES", 100)
    blocked = analytic_conv_ntk(x, None, 2, 3, "relu", "gap", "circular", 1.4, 0.1, dtype=D)
    torch.testing.assert_close(whole[1], blocked[1])
    torch.testing.assert_close(whole[0], blocked[0])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_empirical_ntk_of_wide_conv_net_converges(readout):
    """Monte Carlo: the empirical NTK at init of a deep (depth 2) conv net approaches the analytic one, ~ width^-1/2."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 6, generator=g, dtype=D)
    _, ntk = analytic_conv_ntk(x, None, 2, 3, "relu", readout, "same", 1.4, 0.1, dtype=D)
    errs = {}
    for width in (64, 1024):
        e = [
            _rel(
                empirical_ntk(
                    ntk_cnn((2, 6), width, 2, 3, 1, "relu", readout, "same", 1.4, 0.1, generator=s, dtype=D),
                    x,
                    method="jacobian",
                ),
                ntk,
            )
            for s in range(2)
        ]
        errs[width] = sum(e) / len(e)
    assert errs[1024] < 0.08
    assert errs[1024] < 0.5 * errs[64]  # theory: factor 4 for 16x the width


def test_empirical_ntk_2d_and_erf_valid_padding():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 5, 5, generator=g, dtype=D)
    net = ntk_cnn((1, 5, 5), 1024, 1, 3, 1, "erf", "flatten", "valid", 1.0, 0.2, generator=0, dtype=D)
    _, ntk = analytic_conv_ntk(x, None, 1, 3, "erf", "flatten", "valid", 1.0, 0.2, dtype=D)
    assert _rel(empirical_ntk(net, x, method="jacobian"), ntk) < 0.08


def test_nngp_is_the_covariance_of_random_nets():
    """Depth 1: E over init of f(x) f(y) equals the NNGP at any width (average of 400 nets of width 32)."""
    x = torch.randn(3, 1, 6, generator=torch.Generator().manual_seed(5), dtype=D)
    nngp, _ = analytic_conv_ntk(x, None, 1, 2, "relu", "gap", "circular", 1.0, 0.5, dtype=D)
    g = torch.Generator().manual_seed(6)
    outs = torch.stack(
        [
            ntk_cnn((1, 6), 32, 1, 2, 1, "relu", "gap", "circular", 1.0, 0.5, generator=g, dtype=D)(x)[:, 0].detach()
            for _ in range(400)
        ]
    )
    emp = outs.T @ outs / outs.shape[0]
    assert _rel(emp, nngp) < 0.12


def test_gradients_with_respect_to_inputs_are_finite():
    x = torch.randn(3, 1, 5, dtype=D, requires_grad=True)
    _, ntk = analytic_conv_ntk(x, None, 2, 3, "relu", "gap", dtype=D)
    ntk.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_input_raises_clear_errors():
    x = torch.randn(3, 1, 5)
    with pytest.raises(ShapeError, match="unsqueeze"):
        analytic_conv_ntk(torch.randn(3, 5))
    with pytest.raises(ShapeError, match="same channels"):
        analytic_conv_ntk(x, torch.randn(2, 2, 5))
    with pytest.raises(ConfigError, match="readout"):
        analytic_conv_ntk(x, readout="max")
    with pytest.raises(ConfigError, match="padding"):
        analytic_conv_ntk(x, padding="reflect")
    with pytest.raises(ConfigError, match="filter_size"):
        analytic_conv_ntk(x, filter_size=(3, 3))
    with pytest.raises(ShapeError, match="larger than"):
        analytic_conv_ntk(x, filter_size=7, padding="valid")
    with pytest.raises(ConfigError, match="leaves no positions"):
        ntk_cnn((1, 5), 8, 3, 3, padding="valid")
    with pytest.raises(ConfigError, match="input_shape"):
        ntk_cnn((5,), 8)
