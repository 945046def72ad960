"""Laplacian patch kernels of ``inductive-bias`` (arXiv 2106.08619's numerical set-up), exact in float64.

Inputs are rings of d pixels (periodic boundaries). For a filter size s the *local* Laplacian kernel averages
a Laplacian constituent over the d circular windows ``x_p = (x_p, ..., x_{p+s-1})`` of s adjacent pixels,

    K_s(x, y) = (1 / d) sum_p exp(-|x_p - y_p| / s),

(width equal to the filter size, as in the authors' code, github.com/fran-cagnetta/local_kernels, linked from
the paper's OpenReview page), and the *fully-connected* one is ``exp(-|x - y|)`` on all d pixels. The Laplacian
constituent has a cusp at x = y: smoothness exponent alpha = 1, so a local student learns a local teacher
with t <= s at beta = 1/s and the fully-connected student at beta = 1/d.

Distances come from the pixel differences themselves (``(x_i - y_i)^2`` summed over each window), not from
``|x|^2 + |y|^2 - 2 x.y``: no cancellation for close points, where the cusp is. Every filter size and the
fully-connected kernel are built from one pass over the pairs, in row blocks of about ``block_entries``
pair-pixel entries; for ``x2 is None`` only the blocks on and above the diagonal (mirrored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from symgen.errors import ConfigError, ShapeError

__all__ = ["patch_laplace_kernels", "uniform_cube"]

_BLOCK_ENTRIES = 1 << 21


def uniform_cube(n: int, d: int, generator: torch.Generator) -> Tensor:
    """``n`` points drawn uniformly in the hypercube [0, 1]^d (float64, CPU generator)."""
    return torch.rand(n, d, generator=generator, dtype=torch.float64)


def _block(a: Tensor, b: Tensor, filters: Sequence[int], fc: bool) -> dict[str, Tensor]:
    """The kernels between the rows ``a`` (A, d) and ``b`` (B, d), each (A, B)."""
    diff = a[:, None, :] - b[None, :, :]
    sq = diff.mul_(diff)  # (A, B, d): squared pixel differences
    out: dict[str, Tensor] = {}
    if fc:
        out["fc"] = sq.sum(-1).sqrt_().neg_().exp_()
    acc = sq.clone()
    for k in range(1, max(filters, default=0) + 1):
        if k > 1:  # windows of k pixels starting at each p (circular): add the pixel p + k - 1
            acc += torch.roll(sq, -(k - 1), dims=-1)
        if k in filters:
            out[f"local_s{k}"] = acc.sqrt().div_(-float(k)).exp_().mean(-1)
    return out


def patch_laplace_kernels(
    x1: Tensor,
    x2: Tensor | None = None,
    filters: Sequence[int] = (),
    *,
    fc: bool = True,
    block_entries: int = _BLOCK_ENTRIES,
) -> dict[str, Tensor]:
    """The local Laplacian kernels of the given filter sizes and (``fc``) the fully-connected one.

    Args:
        x1: (N1, d) inputs, one ring of d pixels per row.
        x2: (N2, d) inputs, or None for ``x1`` against itself (symmetric; upper blocks only, mirrored).
        filters: filter sizes s (1 <= s <= d); each gives ``local_s{s}``, the average over the d circular
            windows of s pixels of ``exp(-|x_p - y_p| / s)``.
        fc: also return ``fc``, ``exp(-|x - y|)`` on all d pixels.
        block_entries: about how many (pair, pixel) entries one row block holds (memory: a few times that
            many float64).

    Returns:
        name -> (N1, N2) float64 kernel matrix.
    """
    if x1.dim() != 2 or (x2 is not None and (x2.dim() != 2 or x2.shape[1] != x1.shape[1])):
        raise ShapeError(
            f"inputs must be (N, d) with the same d, got {tuple(x1.shape)} and {None if x2 is None else tuple(x2.shape)}"
        )
    d = x1.shape[1]
    if any(s < 1 or s > d for s in filters):
        raise ConfigError(f"filter sizes {list(filters)} must lie in [1, {d}]")
    if block_entries < 1:
        raise ConfigError(f"block_entries must be >= 1, got {block_entries}")
    sym = x2 is None
    a = x1.to(torch.float64)
    b = a if x2 is None else x2.to(torch.float64)
    n1, n2 = a.shape[0], b.shape[0]
    names = (["fc"] if fc else []) + [f"local_s{s}" for s in sorted(set(filters))]
    out = {name: torch.empty(n1, n2, dtype=torch.float64) for name in names}
    rows = max(1, block_entries // max(1, n2 * d))
    for i in range(0, n1, rows):
        j0 = i if sym else 0  # symmetric: columns from the block's first row on, the rest mirrored
        piece = _block(a[i : i + rows], b[j0:], sorted(set(filters)), fc)
        for name, k in piece.items():
            out[name][i : i + rows, j0:] = k
            if sym:
                out[name][j0:, i : i + rows] = k.T
    return out
