"""The local kernel of a one-hidden-layer ReLU conv net on a ring of pixels, evaluated fast in float64 tiles.

``local_relu_ntk(x1, x2, s, w, b)`` equals ``analytic_conv_ntk(x.unsqueeze(1), ..., depth=1, filter_size=s,
activation="relu", readout="flatten", padding="circular", weight_std=w, bias_std=b)[1]`` (tested to
1e-12): ``K(x, y) = b^2 + (w^2 / d) sum_p C(x_p, y_p)`` over the d circular patches ``x_p`` of s pixels
(left offset ``(s - 1) // 2``, as torch's 'same'), with the one-hidden-layer ReLU NTK on a patch

    C(u, v) = |u~| |v~| F(theta),  F(theta) = (sin theta + 2 cos theta (pi - theta)) / (2 pi),

where ``u~ = (w u / sqrt(s), b)`` and theta is the angle between ``u~`` and ``v~`` (NNGP ``k1`` plus
``c12 * E[relu' relu']``, Cho & Saul 2009). The same formula as the recursion there, reorganized for speed:
one batched product of normalized augmented patches per tile gives ``rho = cos theta``, then ``arccos`` and
``sqrt(1 - rho^2)``. Rounding rho costs theta an absolute ~1e-16 / sqrt(h) with ``h = sin^2(theta / 2)``, so
where h < 1e-8 (nearly parallel patches, x = x' included; the kernel entry then keeps ~1e-13) h is recomputed
from the patch difference, ``h = (|u~ - v~|^2 - (|u~| - |v~|)^2) / (4 |u~| |v~|)`` with
``u~ - v~ = w (u - v) / sqrt(s)``: the cusp at theta = 0 keeps full precision (theta = 0 exactly at x = x'),
``theta = 2 arcsin sqrt(h)``, ``sin theta = 2 sqrt(h (1 - h))``. The elementwise map runs in numpy (its float64
arcsin and sqrt are vectorized, 2-3x faster than torch's on CPU), in tiles of about 2^17 entries x positions
so the passes stay in cache, and for ``x2 is None`` only the upper tiles (mirrored). Sources: Favero,
Cagnetta & Wyart arXiv 2106.08619 (local kernel), Arora et al. arXiv 1904.11955 (CNTK recursion).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from symgen.errors import ConfigError, ShapeError

__all__ = ["local_relu_ntk"]

_TILE_ENTRIES = 1 << 17
_CLOSE = 1e-8  # h = sin^2(theta / 2) below which h is recomputed from the patch difference


class _Patches:
    """Scaled patches ``w u / sqrt(s)`` (d, N, s), normalized augmented patches (d, N, s + 1), norms (d, N)."""

    def __init__(self, x: Tensor, s: int, w: float, b: float) -> None:
        d = x.shape[1]
        idx = (torch.arange(d)[:, None] - (s - 1) // 2 + torch.arange(s)[None]) % d
        p = x.to(torch.float64)[:, idx] * (w / math.sqrt(s))  # (N, d, s)
        aug = torch.cat([p, torch.full((*p.shape[:2], 1), float(b), dtype=torch.float64)], -1)
        r = aug.norm(dim=-1).clamp(min=torch.finfo(torch.float64).tiny)
        self.raw = p.transpose(0, 1).contiguous().numpy()
        self.unit = (aug / r[..., None]).transpose(0, 1).contiguous().numpy()
        self.norm = r.T.contiguous().numpy()

    def rows(self, sl: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three arrays restricted to the points ``sl``."""
        return self.raw[:, sl], self.unit[:, sl], self.norm[:, sl]


def _tile(one: tuple[np.ndarray, ...], two: tuple[np.ndarray, ...]) -> np.ndarray:
    """``2 pi sum_p r1[p, a] r2[p, c] F(theta_p(a, c))``, shape (A, C)."""
    raw1, u1, r1 = one
    raw2, u2, r2 = two
    rho = np.matmul(u1, u2.transpose(0, 2, 1))  # cos theta, (d, A, C)
    np.clip(rho, -1.0, 1.0, out=rho)
    close = np.nonzero(rho > 1.0 - 2.0 * _CLOSE) if rho.max() > 1.0 - 2.0 * _CLOSE else None
    sin = np.multiply(rho, rho)
    np.subtract(1.0, sin, out=sin)
    np.sqrt(sin, out=sin)
    g = np.arccos(rho)
    g *= -2.0
    g += 2.0 * math.pi
    g *= rho
    g += sin  # sin theta + 2 cos theta (pi - theta)
    if close is not None:  # h = sin^2(theta / 2) from the patch difference: full precision as theta -> 0
        p, a, c = close
        diff = raw1[p, a] - raw2[p, c]
        dr = r1[p, a] - r2[p, c]
        h = np.clip(((diff * diff).sum(-1) - dr * dr) / (4.0 * r1[p, a] * r2[p, c]), 0.0, 1.0)
        theta = 2.0 * np.arcsin(np.sqrt(h))
        g[close] = 2.0 * np.sqrt(h * (1.0 - h)) + 2.0 * (1.0 - 2.0 * h) * (math.pi - theta)
    g *= r2[:, None, :]
    out: np.ndarray = np.einsum("pa,pac->ac", r1, g)
    return out


def local_relu_ntk(
    x1: Tensor, x2: Tensor | None, filter_size: int, weight_std: float = 1.0, bias_std: float = 0.0
) -> Tensor:
    """Local kernel (N1, N2), float64, of inputs ``(N, d)`` or ``(N, 1, d)`` on a ring: see the module docstring.

    Args:
        x1: first inputs, (N1, d) or (N1, 1, d).
        x2: second inputs likewise, or None (= x1; only the upper tiles are computed).
        filter_size: the patch size s, 1 <= s <= d.
        weight_std: the weights' standard deviation w (NTK parameterization).
        bias_std: the biases' standard deviation b.

    Returns:
        the NTK of ``[Conv(s), ReLU]`` + dense read-out of the flattened map, (N1, N2) float64 on x1's device.
    """
    a = x1.reshape(x1.shape[0], -1) if x1.dim() == 3 and x1.shape[1] == 1 else x1
    bb = a if x2 is None else (x2.reshape(x2.shape[0], -1) if x2.dim() == 3 and x2.shape[1] == 1 else x2)
    if a.dim() != 2 or bb.dim() != 2 or a.shape[1] != bb.shape[1]:
        raise ShapeError(
            f"inputs must be (N, d) or (N, 1, d) with equal d, got {tuple(x1.shape)} and {tuple(bb.shape)}."
        )
    d = a.shape[1]
    if not 1 <= filter_size <= d:
        raise ConfigError(f"filter_size must be in [1, d = {d}], got {filter_size}.")
    if weight_std < 0 or bias_std < 0:
        raise ConfigError(f"weight_std and bias_std must be >= 0, got {weight_std}, {bias_std}.")
    device = a.device
    one = _Patches(a.detach().cpu(), filter_size, weight_std, bias_std)
    two = one if x2 is None else _Patches(bb.detach().cpu(), filter_size, weight_std, bias_std)
    n1, n2 = one.norm.shape[1], two.norm.shape[1]
    side = max(8, int(math.sqrt(_TILE_ENTRIES / d)))
    out = np.empty((n1, n2), dtype=np.float64)
    for i in range(0, n1, side):
        i2 = min(i + side, n1)
        for j in range(i if x2 is None else 0, n2, side):
            j2 = min(j + side, n2)
            t = _tile(one.rows(slice(i, i2)), two.rows(slice(j, j2)))
            if x2 is None and j == i:  # exactly symmetric (the products round differently on either side)
                t = (t + t.T) / 2.0
            out[i:i2, j:j2] = t
            if x2 is None and j != i:
                out[j:j2, i:i2] = t.T
    w2, b2 = float(weight_std) ** 2, float(bias_std) ** 2
    out *= w2 / (d * 2.0 * math.pi)
    out += b2
    return torch.from_numpy(out).to(device)
