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
fully-connected kernel are built from one pass over the pairs, in tiles of about ``block_entries``
pair-pixel entries held pixel-major ((d, rows, cols) planes: a window is a run of planes, so the window sums
are in-place adds of slices of the circularly padded squared differences, and the mean over windows is a sum
over the leading dimension); the square roots and exponentials use numpy's vectorised float64 ufuncs (about
twice torch's speed on CPU; numpy's sqrt is correctly rounded). For ``x2 is None`` only the tiles on and above
the diagonal, mirrored at the end. The tiles are shared out to the caller's torch thread count (numpy's
ufuncs release the GIL; the same bits on any count). The results agree with the plain formula to a few ulp (tests: pair-by-pair
brute force).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from symgen.errors import ConfigError, ShapeError

__all__ = ["patch_laplace_kernels", "uniform_cube"]

_BLOCK_ENTRIES = 1 << 18  # (pair, pixel) entries per tile: its planes stay in the L2/L3 caches


def uniform_cube(n: int, d: int, generator: torch.Generator) -> Tensor:
    """``n`` points drawn uniformly in the hypercube [0, 1]^d (float64, CPU generator)."""
    return torch.rand(n, d, generator=generator, dtype=torch.float64)


def _scaled_exp(a: np.ndarray, s: int) -> None:
    """``a <- exp(-a / s)`` in place (numpy's vectorised exp: about twice torch's on CPU float64)."""
    if s & (s - 1) == 0:  # a power of two: the product with -1/s is the same float as the quotient
        np.multiply(a, -1.0 / s, out=a)
    else:
        np.divide(a, -float(s), out=a)
    np.exp(a, out=a)


def _tile(
    at: np.ndarray, bt: np.ndarray, filters: Sequence[int], fc: bool, out: dict[str, np.ndarray], bufs: list[np.ndarray]
) -> None:
    """The kernels between the columns of ``at`` (d, A) and ``bt`` (d, B) (pixel-major inputs), into ``out``
    (name -> (A, B) views of the results). ``bufs``: flat float64 scratch for the squared differences (with
    ``max(filters) - 1`` wrapped planes), the window sums and the exponentials.

    Pixel-major planes (d, A, B): a window's pixels p, p + 1, ... are the planes p, p + 1, ... of the squared
    differences padded circularly, so the window sums are slices added in place (no rolled copies), in the
    order of the definition: ``((sq_p + sq_{p+1}) + sq_{p+2}) + ...``. numpy throughout: its ufuncs release the
    GIL, so tiles run on threads (:func:`patch_laplace_kernels`), and its sqrt is correctly rounded.
    """
    d, r, c = at.shape[0], at.shape[1], bt.shape[1]
    m, smax = r * c, max(filters, default=0)
    wrap = max(smax - 1, 0)
    sqp = bufs[0][: (d + wrap) * m].reshape(d + wrap, r, c)
    sq = sqp[:d]
    np.subtract(at[:, :, None], bt[:, None, :], out=sq)
    np.multiply(sq, sq, out=sq)  # (d, A, B): squared pixel differences
    if wrap:
        sqp[d:] = sqp[:wrap]
    if fc:
        k = out["fc"]
        np.sum(sq, axis=0, out=k)
        np.sqrt(k, out=k)
        np.negative(k, out=k)
        np.exp(k, out=k)
    acc = sq
    for s in range(1, smax + 1):
        if s == 2:
            acc = bufs[1][: d * m].reshape(d, r, c)
            np.add(sq, sqp[1 : d + 1], out=acc)
        elif s > 2:  # windows of s pixels starting at each p: add the pixel p + s - 1
            np.add(acc, sqp[s - 1 : s - 1 + d], out=acc)
        if s in filters:
            e = bufs[2][: d * m].reshape(d, r, c)
            np.sqrt(acc, out=e)
            _scaled_exp(e, s)
            k = out[f"local_s{s}"]
            np.sum(e, axis=0, out=k)
            np.divide(k, d, out=k)  # the mean over the d windows


def _mirror(k: Tensor, rows: int = 64) -> None:
    """Copy the upper triangle of the square ``k`` onto its lower one, in strips of ``rows`` rows."""
    n = k.shape[0]
    for i in range(0, n, rows):
        r = min(rows, n - i)
        k[i + r :, i : i + r] = k[i : i + r, i + r :].T
        lo = torch.tril_indices(r, r, -1)
        blk = k[i : i + r, i : i + r]
        blk[lo[0], lo[1]] = blk.T[lo[0], lo[1]]


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
        block_entries: about how many (pair, pixel) entries one tile holds (scratch memory: about three times
            that many float64; the default keeps the tiles in cache).

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
    a = x1.to("cpu", torch.float64)  # the results are CPU tensors (numpy ufuncs work in place on them)
    b = a if x2 is None else x2.to("cpu", torch.float64)
    n1, n2 = a.shape[0], b.shape[0]
    names = (["fc"] if fc else []) + [f"local_s{s}" for s in sorted(set(filters))]
    out = {name: torch.empty(n1, n2, dtype=torch.float64) for name in names}
    fs = sorted(set(filters))
    at, bt = a.T.contiguous().numpy(), b.T.contiguous().numpy()  # (d, N): one plane per pixel
    per_pair = max(1, block_entries // max(1, d))  # pairs per tile
    wrap = max(max(fs, default=0) - 1, 0)
    cols = max(1, min(n2, per_pair))
    tiles = []
    i = 0
    while i < n1:
        j0 = i if sym else 0  # symmetric: columns from the block's first row on, the rest mirrored
        r = min(n1 - i, max(1, per_pair // max(1, n2 - j0)))  # whole rows when they fit, else column pieces
        tiles += [(i, r, j, min(cols, n2 - j)) for j in range(j0, n2, cols)]
        i += r
    outs = {name: k.numpy() for name, k in out.items()}

    def work(mine: Sequence[tuple[int, int, int, int]]) -> None:
        bufs = [np.empty(planes * per_pair) for planes in (d + wrap, d, d)]
        for i, r, j, c in mine:
            views = {name: k[i : i + r, j : j + c] for name, k in outs.items()}
            _tile(at[:, i : i + r], bt[:, j : j + c], fs, fc, views, bufs)

    workers = min(len(tiles), torch.get_num_threads())  # the caller's thread budget (num_threads), as torch's ops
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, [tiles[w::workers] for w in range(workers)]))
    else:
        work(tiles)
    if sym:
        for k in out.values():
            _mirror(k)
    return out
