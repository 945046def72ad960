"""Dual activations of the infinite-width kernels, computed stably near correlation +-1.

For (u, v) ~ N(0, [[v1, c], [c, v2]]) with n = sqrt(v1 v2) and s = sqrt(v1 v2 - c^2) (passed in, never
formed as ``n^2 - c^2`` from rounded values), the ReLU duals of Cho & Saul ("Kernel methods for deep
learning", NeurIPS 2009) are ``E[relu(u) relu(v)] = n J1(theta) / (2 pi)`` and ``E[relu'(u) relu'(v)] =
(pi - theta) / (2 pi)``, with ``theta = atan2(s, c)``, ``pi - theta = atan2(s, -c)`` and
``n J1 = s + (pi - theta) c``. The angle from ``atan2`` of the un-normalized pair keeps full relative
precision where ``arccos(rho)`` loses half the digits (theta ~ sqrt(2 (1 - rho))): x = x' gives theta = 0
exactly. The callers propagate s (or the distance E(u - v)^2) through the layers with the gap
``n - n J1 / pi >= 0``, a sum of non-negative terms, so no layer takes the square root of a cancellation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "safe_sqrt",
    "sin_minus_x_cos",
    "relu_dual",
    "relu_gap",
    "series_fix",
    "erf_dual",
    "erf_variance",
    "atan2",
    "sqrt_",
]

_NUMPY_DTYPES = (torch.float32, torch.float64)
NUMPY_MIN = 1 << 14  # entries from which numpy's ufunc beats torch's despite the conversions (~5 us a call)


def _numpy_ok(*ts: Tensor) -> bool:
    """Large CPU float32/float64 tensors of one shape and dtype, no autograd: numpy's ufuncs run on them."""
    t0 = ts[0]
    return (
        t0.numel() >= NUMPY_MIN
        and t0.device.type == "cpu"
        and t0.dtype in _NUMPY_DTYPES
        and not any(t.requires_grad for t in ts)
        and all(t.dtype == t0.dtype and t.shape == t0.shape and t.device == t0.device for t in ts)
    )


def atan2(y: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``atan2(y, x)`` elementwise, forward only: numpy's ``arctan2`` on large CPU tensors (1.6x torch's speed in
    float64, 2.4x in float32 at 64K entries on this project's machines; both within ~1 ulp), else ``torch.atan2``.

    Args:
        y: numerators.
        x: denominators, y's shape and dtype.
        out: where to write, y's shape and dtype, or None.

    Returns:
        the angles (``out`` when given).
    """
    if not _numpy_ok(y, x) or (out is not None and not _numpy_ok(y, out)):
        return torch.atan2(y, x, out=out)
    out = torch.empty_like(y) if out is None else out
    np.arctan2(y.numpy(), x.numpy(), out=out.numpy())
    return out


def sqrt_(t: Tensor) -> Tensor:
    """``t.sqrt_()``, forward only: numpy's ``sqrt`` in place on large CPU tensors (1.5x torch's speed in
    float64; correctly rounded, torch's within an ulp).

    Args:
        t: a tensor, modified in place.

    Returns:
        t.
    """
    if not _numpy_ok(t):
        return t.sqrt_()
    a = t.numpy()
    np.sqrt(a, out=a)
    return t


# sin x - x cos x = sum_k>=1 (-1)^(k+1) 2k x^(2k+1) / (2k+1)!: coefficients of x^3, x^5, ..., x^15.
_SERIES = (1 / 3, -1 / 30, 1 / 840, -1 / 45360, 1 / 3991680, -1 / 518918400, 1 / 93405312000)
_SERIES_EDGE = 0.25  # below: the series (next term < 1e-21 relative); above: sin x - x cos x has no cancellation


def safe_sqrt(t: Tensor) -> Tensor:
    """sqrt of ``t`` clamped at the smallest normal number: 0 gives ~1e-19 (float32), and a zero gradient.

    Args:
        t: a tensor, >= 0 up to rounding.

    Returns:
        sqrt(max(t, tiny)), finite gradient everywhere.
    """
    return torch.sqrt(t.clamp(min=torch.finfo(t.dtype).tiny))


def sin_minus_x_cos(x: Tensor) -> Tensor:
    """``sin x - x cos x`` for x in [0, pi], to full relative precision also as x -> 0 (~x^3 / 3).

    Args:
        x: angles in [0, pi].

    Returns:
        sin x - x cos x, elementwise.
    """
    x2 = x * x
    poly = torch.full_like(x, _SERIES[-1])
    for coef in reversed(_SERIES[:-1]):
        poly = poly.mul_(x2).add_(coef)
    direct = torch.sin(x) - x * torch.cos(x)
    return torch.where(x < _SERIES_EDGE, poly * x2 * x, direct)


def relu_dual(c: Tensor, s: Tensor, n: Tensor, signed: bool, gap: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(n J1, pi - theta, gap)`` of the ReLU arc-cosine kernels at covariance c, sine part s, norm n.

    ``E[relu(u) relu(v)] = n J1 / (2 pi)``, ``E[relu'(u) relu'(v)] = (pi - theta) / (2 pi)``;
    ``gap = n - n J1 / pi = (n - c) - (s - theta c) / pi >= 0`` with ``n - c = s^2 / (n + c)`` for c > 0 (no
    cancellation as theta -> 0), for the next layer's s or distance. ``signed``: c may be negative (the first
    layer): near c = -n, ``n J1 = n (sin phi - phi cos phi)`` (phi = pi - theta) by its series.

    Args:
        c: covariances E[uv].
        s: sqrt(v1 v2 - c^2), computed stably by the caller.
        n: sqrt(v1 v2).
        signed: whether c can be negative.
        gap: whether to return the gap (else None).

    Returns:
        n J1, pi - theta and the gap (or None).
    """
    phi = torch.atan2(s, -c)
    if signed:
        nj1 = torch.where(c < 0, n * sin_minus_x_cos(phi), torch.addcmul(s, phi, c))
    else:
        nj1 = torch.addcmul(s, phi, c)
    if not gap:
        return nj1, phi, None
    tiny = torch.finfo(c.dtype).tiny
    theta = torch.atan2(s, c)
    pos = c.clamp(min=0.0)
    n_minus_c = torch.where(c > 0, s * s / (n + pos).clamp(min=tiny), n - c)
    out = n_minus_c - (s - theta * c) / math.pi
    return nj1, phi, out.clamp_(min=0.0)


def relu_gap(
    c: Tensor,
    s: Tensor,
    n: Tensor,
    out: Tensor | None = None,
    scratch: Tensor | None = None,
    n_free: bool = False,
    n_positive: bool = False,
) -> Tensor:
    """The gap ``n - n J1 / pi = (n - c) - (s - theta c) / pi >= 0`` of :func:`relu_dual`, forward only.

    ``theta = atan2(s, c)``; ``n - c = s^2 / (n + c)`` where c > 0 (no cancellation as theta -> 0), else
    ``n - c`` (also right for n = c = 0, where the clamped s^2 / (n + |c|) would give 1). ``n_positive``
    (n > 0 everywhere, e.g. b^2 > 0): ``n - c = s^2 / (n + |c|) + 2 max(-c, 0)`` instead, the same for c > 0
    and a sum of two non-negative terms for c <= 0, with no comparison and selection pass.

    Args:
        c: covariances.
        s: sqrt(v1 v2 - c^2).
        n: sqrt(v1 v2), broadcastable against c.
        out: where to write the gap (c's shape), or None for a new tensor.
        scratch: a tensor of c's shape to work in, or None.
        n_free: n has c's shape and may be overwritten.
        n_positive: n > 0 everywhere.

    Returns:
        the gap (``out`` when given).
    """
    theta = atan2(s, c, out=scratch)
    sin_part = torch.addcmul(s, theta, c, value=-1.0, out=theta)  # s - theta c
    if n_positive:
        absc = torch.abs(c, out=out)
        ratio = n.add_(absc) if n_free else torch.add(n, absc)
        ratio = torch.div(s, ratio, out=ratio).mul_(s)  # s^2 / (n + |c|)
        neg = torch.clamp(c, max=0.0, out=out)
        gap = torch.add(ratio, neg, alpha=-2.0, out=neg)
    else:
        n_minus_c = torch.sub(n, c, out=out)
        ratio = n.add_(c) if n_free else torch.add(n, c)
        ratio = torch.div(s, ratio, out=ratio).mul_(s)  # s^2 / (n + c)
        gap = torch.where(c > 0, ratio, n_minus_c, out=n_minus_c)
    return gap.sub_(sin_part, alpha=1.0 / math.pi).clamp_(min=0.0)


def series_fix(nj1: Tensor, phi: Tensor, n: Tensor) -> None:
    """In place: ``n J1 = n (sin phi - phi cos phi)`` by the series where ``phi = pi - theta < 0.25``.

    Elsewhere ``n J1 = s + phi c`` (``c < 0`` there) keeps its digits; near c = -n it cancels. One
    reduction finds whether any entry needs the fix (usually none outside antiparallel inputs).

    Args:
        nj1: n J1 from ``s + phi c``, overwritten where phi < 0.25.
        phi: pi - theta.
        n: sqrt(v1 v2), broadcastable against phi.
    """
    if float(phi.min()) >= _SERIES_EDGE:
        return
    idx = (phi < _SERIES_EDGE).nonzero(as_tuple=True)
    nj1[idx] = n.expand_as(phi)[idx] * sin_minus_x_cos(phi[idx])


def erf_dual(v1: Tensor, v2: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(E[erf(u) erf(v)], E[erf'(u) erf'(v)])``: (2/pi) arcsin(2c / sqrt((1+2v1)(1+2v2))), (4/pi) / sqrt(...).

    The root ``sqrt((1 + 2 v1)(1 + 2 v2) - 4 c^2)`` is >= 1: no singularity, and the arcsine as an atan2.

    Args:
        v1: variances of u.
        v2: variances of v.
        c: covariances.

    Returns:
        the two expectations, elementwise.
    """
    prod = (1.0 + 2.0 * v1) * (1.0 + 2.0 * v2)
    root = torch.sqrt((prod - 4.0 * c * c).clamp(min=1.0))
    return (2.0 / math.pi) * torch.atan2(2.0 * c, root), (4.0 / math.pi) / root


def erf_variance(v: Tensor) -> Tensor:
    """E[erf(u)^2] for u ~ N(0, v): (2/pi) arcsin(2v / (1 + 2v)).

    Args:
        v: variances.

    Returns:
        E[erf(u)^2], elementwise.
    """
    return (2.0 / math.pi) * torch.atan2(2.0 * v, torch.sqrt(1.0 + 4.0 * v))
