"""The ReLU conv NNGP/NTK of :func:`symgen.ntk.analytic_conv_ntk`, organized for speed on tiles of pairs.

Same recursion and the same stable angles as the generic path (Novak et al. arXiv 1810.05148, Arora et al.
arXiv 1904.11955; read-outs of Favero, Cagnetta & Wyart arXiv 2106.08619), evaluated per tile of A x B pairs
with the positions as leading axes, ``(*M, A, B)``: M is the map of positions p (flatten read-out: only
p = q is needed) or of position pairs (p, q) (global average pooling). The first layer is one matrix product
of patches, ``c = U_a . U_b + b^2`` with ``U = w x_patch / sqrt(C k)``, float64 whatever the output dtype;
``s^2 = v1 v2 - c^2`` from it is exact to ~1e-15 v1 v2, and where the angle is within 1e-3 of 0 or pi
(nearly parallel or antiparallel patches) s^2 is recomputed by Lagrange's identity on the raw patches,
``sum_{i<j} (u_i e_j - u_j e_i)^2`` with ``e = v -+ u``: squares of exact differences, so full relative
precision at both ends (x = x' gives exactly 0, set without a search). ``n J1 = s + (pi - theta) c`` takes
the series of :func:`duals.sin_minus_x_cos` only where pi - theta < 0.25 (a sparse fix). Later layers carry
the distance ``E(relu(u) - relu(v))^2`` as the generic path does; filter sums are one small matrix product
per spatial axis (flatten) or slices where p and q shift together (GAP). For x2 = None only the upper tiles
are computed and mirrored. With ``torch.get_num_threads() > 1`` the ops run single-threaded (torch's intra-op
threads are set to 1 for the call and restored; per-op barriers on a loaded machine cost 10-100x) and, from
4 tiles per thread on, the tiles on that many Python threads. In-place ops: not differentiable (``analytic_conv_ntk`` sends inputs that require
grad to the generic path).
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from symgen.ntk import duals
from symgen.ntk.conv_ops import filter_mean, pad_axis

__all__ = ["relu_conv_kernels"]

_TILE_ENTRIES = 1 << 16  # map entries x pairs per tile: the live tensors stay in cache
_CLOSE_ANGLE = 1e-3  # angle to +-1 below which the first layer's v1 v2 - c^2 is recomputed as a sum of squares
_TWO_PI = 2.0 * math.pi


def _patches(x: Tensor, fs: tuple[int, ...], pads: list[tuple[int, int]], mode: str, scale: float) -> Tensor:
    """``scale * x`` patches, (L, N, C k) float64, L the first layer's output positions in C order."""
    dims = len(fs)
    for i, (left, right) in enumerate(pads):
        x = pad_axis(x, 2 + i, left, right, mode)
    for i, k in enumerate(fs):
        x = x.unfold(2 + i, k, 1)  # (N, C, *out, *fs)
    perm = [2 + i for i in range(dims)] + [0, 1] + [2 + dims + i for i in range(dims)]
    return (x.permute(perm).reshape(math.prod(x.shape[2 : 2 + dims]), x.shape[0], -1) * scale).contiguous()


def _box_matrix(n: int, k: int, left: int, right: int, mode: str) -> Tensor:
    """The filter sum ``t(p) -> sum_k t(p + k)`` along one axis of n positions as a (n_out, n) matrix."""
    m = n + left + right - k + 1
    one = torch.zeros(m, n, dtype=torch.float64)
    for o, off in itertools.product(range(m), range(k)):
        j = o - left + off
        if mode == "circular":
            one[o, j % n] += 1.0
        elif 0 <= j < n:
            one[o, j] += 1.0
    return one


class _Config:
    """Everything a tile needs: patches, per-image variances per layer, filter and padding."""

    def __init__(
        self,
        a: Tensor,
        b: Tensor | None,
        depth: int,
        fs: tuple[int, ...],
        pads: list[tuple[int, int]],
        mode: str,
        w2: float,
        b2: float,
        gap: bool,
        dtype: torch.dtype,
    ) -> None:
        self.depth, self.fs, self.pads, self.mode, self.w2, self.b2 = depth, fs, pads, mode, w2, b2
        self.gap, self.dtype, self.dims = gap, dtype, len(fs)
        scale = math.sqrt(w2 / (a.shape[1] * math.prod(fs)))
        self.scale2, self.symmetric = scale * scale, b is None
        self.ra = _patches(a, fs, pads, mode, 1.0)  # raw patches: their sums and differences are exact
        self.rb = self.ra if b is None else _patches(b, fs, pads, mode, 1.0)
        self.ua, self.ub_neg = self.ra * scale, self.rb * -scale
        self.shape = [s + lo + hi - k + 1 for s, (lo, hi), k in zip(a.shape[2:], pads, fs, strict=True)]
        self._boxes: dict[tuple[tuple[int, ...], torch.dtype], list[Tensor]] = {}
        self.va = self._variances(a, self.ua)
        self.vb = self.va if b is None else self._variances(b, self.rb * scale)

    def box_matrices(self, sizes: list[int], dtype: torch.dtype) -> list[Tensor]:
        """The layer's filter sum per spatial axis on a map of ``sizes``, cached."""
        key = (tuple(sizes), dtype)
        if key not in self._boxes:
            self._boxes[key] = [
                _box_matrix(n, k, lo, hi, self.mode).to(dtype=dtype, device=self.ra.device)
                for n, k, (lo, hi) in zip(sizes, self.fs, self.pads, strict=True)
            ]
        return self._boxes[key]

    def _variances(self, x: Tensor, u: Tensor) -> list[Tensor]:
        """Pre-activation variances of each layer, (L_l, N) float64: layer 1 from the patches themselves."""
        out = [(u * u).sum(-1) + self.b2]
        v = out[0].T.reshape(x.shape[0], *self.shape)
        groups = [(1 + i,) for i in range(self.dims)]
        for _ in range(1, self.depth):
            v = self.w2 * filter_mean(v / 2.0, groups, self.fs, self.pads, self.mode) + self.b2
            out.append(v.flatten(1).T.contiguous())
        return out


def _pair_vars(cfg: _Config, layer: int, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s variances broadcastable against a tile (L, [L,] A, B), float64."""
    v1, v2 = cfg.va[layer][:, rows], cfg.vb[layer][:, cols]
    if cfg.gap:
        return v1[:, None, :, None], v2[None, :, None, :]
    return v1[:, :, None], v2[:, None, :]


def _gram_det(u: Tensor, v: Tensor, positive: Tensor, a2: float, b2: float) -> Tensor:
    """``v1 v2 - c^2 = a2^2 sum_{i<j} (u_i e_j - u_j e_i)^2 + a2 b2 |u - v|^2`` for ``v1 = a2 |u|^2 + b2``,
    ``c = a2 u.v + b2`` (rows (m, K) of raw patches u, v).

    Lagrange's identity with ``e = v -+ u`` (``-`` where u.v > 0, else ``+``): every term is exact as v -> +-u.
    """
    e = torch.where(positive[:, None], v - u, v + u)
    i, j = torch.triu_indices(u.shape[1], u.shape[1], 1, device=u.device)
    cross = u[:, i] * e[:, j] - u[:, j] * e[:, i]
    return a2 * a2 * (cross * cross).sum(-1) + a2 * b2 * ((u - v) ** 2).sum(-1)


_Fix = tuple[tuple[Tensor, ...], Tensor]


def _first_layer(cfg: _Config, rows: slice, cols: slice) -> tuple[Tensor, Tensor, Tensor, _Fix | None]:
    """First conv layer and ReLU on a tile (L, [L,] A, B): ``(-c, s, pi - theta, series fix or None)``.

    ``-c`` and ``s^2 = v1 v2 - c^2`` in float64 from one product of patches, then cast; where sin theta < 1e-3
    s is recomputed by :func:`_gram_det`. The fix: ``(idx, n J1)`` where pi - theta < 0.25, whose n J1 is
    ``n sin_minus_x_cos(pi - theta)`` instead of ``s + (pi - theta) c``.
    """
    ua, ub = cfg.ua[:, rows], cfg.ub_neg[:, cols]
    if cfg.gap:
        lp, na, nb = ua.shape[0], ua.shape[1], ub.shape[1]
        g = (ua.reshape(lp * na, -1) @ ub.reshape(lp * nb, -1).T).reshape(lp, na, lp, nb).transpose(1, 2)
        negc = g.contiguous()
    else:
        negc = torch.bmm(ua, ub.transpose(1, 2))
    if cfg.b2 != 0.0:
        negc.sub_(cfg.b2)
    v1, v2 = _pair_vars(cfg, 0, rows, cols)
    det = torch.addcmul(v1 * v2, negc, negc, value=-1.0)
    dt = cfg.dtype
    negc_t = negc.to(dt)
    s = det.to(dt).clamp_(min=torch.finfo(dt).tiny).sqrt_()
    same = cfg.symmetric and rows == cols  # x = x' at one position: v1 v2 - c^2 = 0 exactly

    def diag(t: Tensor) -> Tensor:
        return t.diagonal(0, 0, 1).diagonal(0, 0, 1) if cfg.gap else t.diagonal(0, -2, -1)

    if same:
        diag(s).fill_(0.0)
    phi = torch.atan2(s, negc_t)
    if same:  # pi there; the search below is for the other nearly parallel pairs
        diag(phi).fill_(0.5 * math.pi)
    lo, hi = torch.aminmax(phi)
    if same:
        diag(phi).fill_(math.pi)
    if float(hi) > math.pi - _CLOSE_ANGLE or float(lo) < _CLOSE_ANGLE:  # v1 v2 - c^2 as a sum of squares
        idx = ((phi > math.pi - _CLOSE_ANGLE) | (phi < _CLOSE_ANGLE)).nonzero(as_tuple=True)
        p, q = (idx[0], idx[1]) if cfg.gap else (idx[0], idx[0])
        ra, rb = cfg.ra[:, rows], cfg.rb[:, cols]
        exact = _gram_det(ra[p, idx[-2]], rb[q, idx[-1]], negc[idx] < 0, cfg.scale2, cfg.b2)
        s[idx] = duals.safe_sqrt(exact.to(dt))
        phi[idx] = torch.atan2(s[idx], negc_t[idx])
    fix = None
    if float(lo) < duals._SERIES_EDGE:  # nearly antiparallel: n J1 = n (sin phi - phi cos phi) by its series
        idx = (phi < duals._SERIES_EDGE).nonzero(as_tuple=True)
        n = (v1 * v2).expand_as(negc)[idx].sqrt().to(dt)
        fix = (idx, n * duals.sin_minus_x_cos(phi[idx]))
    return negc_t, s, phi, fix


def _box(t: Tensor, cfg: _Config, pads: list[tuple[int, int]]) -> Tensor:
    """``sum_k t[..., p + k, (q + k), ...]`` over the filter window, one spatial dimension at a time.

    Positions are the leading axes of the tile; along dimension i the axes ``(i,)`` (flatten) or
    ``(i, dims + i)`` (all pairs) shift together. Circular wrap-around and zero padding are slices.
    """
    dims = cfg.dims
    for i, (k, (left, right)) in enumerate(zip(cfg.fs, pads, strict=True)):
        axes = (i, dims + i) if cfg.gap else (i,)
        n = t.shape[i]
        m = n + left + right - k + 1
        out_shape = list(t.shape)
        for ax in axes:
            out_shape[ax] = m
        out = t.new_zeros(out_shape)
        for off in range(k):
            d = off - left
            if cfg.mode == "circular":
                segs = [(0, n - d, d), (n - d, d, 0)] if d >= 0 else [(0, -d, n + d), (-d, n + d, 0)]
            else:
                start, stop = max(0, -d), min(m, n - d)
                segs = [(start, stop - start, start + d)] if stop > start else []
            for combo in itertools.product(segs, repeat=len(axes)):
                dst, src = out, t
                for ax, (o, length, j) in zip(axes, combo, strict=True):
                    if length <= 0:
                        break
                    dst, src = dst.narrow(ax, o, length), src.narrow(ax, j, length)
                else:
                    dst.add_(src)
        t = out
    return t


def _pad_dist(dist: Tensor, cfg: _Config, layer: int, rows: slice, cols: slice, sizes: list[int]) -> Tensor:
    """Zero-pad the all-pairs distances (*S, *S, A, B): a padded p against a real q is E v_q^2 = m2(q)."""
    dims = cfg.dims
    m1 = (cfg.va[layer - 1][:, rows] / 2.0).to(dist.dtype).reshape(*sizes, -1)
    m2 = (cfg.vb[layer - 1][:, cols] / 2.0).to(dist.dtype).reshape(*sizes, -1)
    inner = dist.new_ones(sizes)
    for i, (left, right) in enumerate(cfg.pads):
        dist = pad_axis(pad_axis(dist, i, left, right, "zeros"), dims + i, left, right, "zeros")
        m1, m2 = pad_axis(m1, i, left, right, "zeros"), pad_axis(m2, i, left, right, "zeros")
        inner = pad_axis(inner, i, left, right, "zeros")
    pad_mask = 1.0 - inner
    ones = [1] * dims
    p_pad = pad_mask.reshape(*pad_mask.shape, *ones, 1, 1)
    q_pad = pad_mask.reshape(*ones, *pad_mask.shape, 1, 1)
    m1_p = m1.reshape(*m1.shape[:-1], *ones, m1.shape[-1], 1)
    m2_q = m2.reshape(*ones, *m2.shape[:-1], 1, m2.shape[-1])
    return dist + p_pad * m2_q + q_pad * m1_p


def _gap(c: Tensor, s: Tensor, n: Tensor) -> Tensor:
    """The gap ``n - n J1 / pi = (n - c) - (s - theta c) / pi`` of :func:`duals.relu_dual`, without a select:
    ``n - c = s^2 / (n + |c|) + 2 max(-c, 0)`` (s^2 = n^2 - c^2), a sum of non-negative terms."""
    theta = torch.atan2(s, c)
    out = (s * s).div_(c.abs().add_(n)).add_(c.clamp(max=0.0), alpha=-2.0)  # n - c, no cancellation
    out.add_(torch.addcmul(s, theta, c, value=-1.0), alpha=-1.0 / math.pi)
    return out.clamp_(min=0.0)


def _flat_box(t: Tensor, cfg: _Config, sizes: list[int]) -> Tensor:
    """The filter sum on a flatten tile (prod(sizes), A, B), one matrix product per spatial axis."""
    ab = t.shape[-2:]
    mats = cfg.box_matrices(sizes, t.dtype)
    t = t.reshape(*sizes, -1)
    for i, m in enumerate(mats):
        lead = math.prod(t.shape[:i])
        t = torch.matmul(m, t.reshape(lead, t.shape[i], -1)).reshape(*t.shape[:i], m.shape[0], *t.shape[i + 1 :])
    return t.reshape(-1, *ab)


def _tile(cfg: _Config, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
    """(NNGP, NTK) of the pairs rows x cols, each (A, B) in cfg.dtype."""
    dt, w2, b2, dims = cfg.dtype, cfg.w2, cfg.b2, cfg.dims
    negc, s, phi, fix = _first_layer(cfg, rows, cols)
    pc = phi * negc  # -(pi - theta) c
    nj1 = s - pc if cfg.depth > 1 else s.sub_(pc)  # n J1 = s + (pi - theta) c
    if fix is not None:
        nj1[fix[0]] = fix[1]
    ntk = pc.neg_()  # 2 pi Theta~ = (pi - theta) c: the scale 1 / (2 pi) is applied with the next filter
    scale = 1.0 / _TWO_PI
    sizes, k = list(cfg.shape), negc
    for layer in range(1, cfg.depth):
        v1, v2 = _pair_vars(cfg, layer - 1, rows, cols)
        r1, r2 = duals.safe_sqrt(v1.to(dt)), duals.safe_sqrt(v2.to(dt))
        c = k.neg_() if layer == 1 else k  # the covariance c (-c from the first layer)
        dist = _gap(c, s, r1 * r2)  # E(relu(u) - relu(v))^2 = (sqrt v1 - sqrt v2)^2 / 2 + gap
        dr = r1 - r2
        dist.addcmul_(dr, dr, value=0.5)
        inv = w2 / math.prod(cfg.fs)
        new_sizes = [s_ + lo + hi - f + 1 for s_, (lo, hi), f in zip(sizes, cfg.pads, cfg.fs, strict=True)]
        if cfg.gap:
            lead_shape, lead = sizes + sizes, (math.prod(new_sizes),) * 2
            dist, nj1, ntk = (t.reshape(*lead_shape, *t.shape[-2:]) for t in (dist, nj1, ntk))
            dist_pads = cfg.pads
            if cfg.mode == "zeros" and any(lo or hi for lo, hi in cfg.pads):
                dist, dist_pads = _pad_dist(dist, cfg, layer, rows, cols, sizes), [(0, 0)] * dims
            k = _box(nj1, cfg, cfg.pads).mul_(inv * scale).add_(b2)
            ntk = _box(ntk, cfg, cfg.pads).mul_(inv * scale).add_(k)
            dist = _box(dist, cfg, dist_pads).mul_(inv)
            k, ntk, dist = (t.reshape(*lead, *t.shape[-2:]) for t in (k, ntk, dist))
        else:
            k = _flat_box(nj1, cfg, sizes).mul_(inv * scale).add_(b2)
            ntk = _flat_box(ntk, cfg, sizes).mul_(inv * scale).add_(k)
            dist = _flat_box(dist, cfg, sizes).mul_(inv)
        sizes = new_sizes
        v1, v2 = (v.to(dt) for v in _pair_vars(cfg, layer, rows, cols))
        det = torch.sub(2.0 * (v1 + v2), dist).mul_(dist)  # 4 (v1 v2 - c^2), from the distance
        dv = v1 - v2
        s = det.addcmul_(dv, dv, value=-1.0).clamp_(min=torch.finfo(dt).tiny).sqrt_().mul_(0.5)
        phi = torch.atan2(s, -k)
        nj1 = torch.addcmul(s, phi, k)
        ntk = ntk.mul_(phi)
    lead_dims = tuple(range(nj1.dim() - 2))
    count = math.prod(nj1.shape[:-2])
    k_out = nj1.sum(lead_dims).mul_(w2 * scale / count).add_(b2)
    return k_out, k_out + ntk.sum(lead_dims).mul_(w2 * scale / count)


def relu_conv_kernels(
    a: Tensor,
    b: Tensor | None,
    depth: int,
    fs: tuple[int, ...],
    pads: list[tuple[int, int]],
    mode: str,
    w2: float,
    b2: float,
    gap: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """``(nngp, ntk)``, each (N1, N2) in ``dtype``, of ``[Conv, ReLU] * depth`` + read-out + Dense (NTK param.).

    The values of :func:`symgen.ntk.analytic_conv_ntk` with ``activation="relu"`` (same recursion, see the
    module docstring; arXiv 1904.11955, 2106.08619), computed tile by tile.

    Args:
        a: first inputs (N1, C, *S), float64.
        b: second inputs likewise, or None (= a; upper tiles only, mirrored).
        depth: conv layers, >= 1.
        fs: filter size per spatial axis.
        pads: (left, right) zero or circular padding per spatial axis.
        mode: "circular" or "zeros".
        w2: weight variance.
        b2: bias variance.
        gap: global average pooling read-out (all position pairs) instead of flatten (equal positions).
        dtype: output dtype; the first layer's covariances and sines are float64 whatever it is.

    Returns:
        the NNGP and the NTK, (N1, N2).
    """
    cfg = _Config(a, b, depth, fs, pads, mode, w2, b2, gap, dtype)
    n1, n2 = cfg.ra.shape[1], cfg.rb.shape[1]
    positions = math.prod(a.shape[2:])
    per_pair = positions**2 if gap else positions
    side = max(1, math.isqrt(max(1, _TILE_ENTRIES // per_pair)))
    sym = b is None
    nngp = torch.empty(n1, n2, dtype=dtype, device=a.device)
    ntk = torch.empty_like(nngp)
    tiles = [
        (slice(i, min(i + side, n1)), slice(j, min(j + side, n2)))
        for i in range(0, n1, side)
        for j in range(i if sym else 0, n2, side)
    ]

    def run(rows: slice, cols: slice) -> None:
        tk, tt = _tile(cfg, rows, cols)
        if sym and rows == cols:  # exactly symmetric (the two sides round differently)
            tk, tt = (tk + tk.T) / 2.0, (tt + tt.T) / 2.0
        nngp[rows, cols], ntk[rows, cols] = tk, tt
        if sym and rows != cols:
            nngp[cols, rows], ntk[cols, rows] = tk.T, tt.T

    threads = torch.get_num_threads()
    if threads == 1 or a.device.type != "cpu":
        for rows, cols in tiles:
            run(rows, cols)
        return nngp, ntk
    # each op single-threaded (many small ops: an intra-op barrier per op costs 10-100x on a loaded machine),
    # the tiles on a pool when there are enough of them
    torch.set_num_threads(1)
    try:
        if len(tiles) < 4 * threads:
            for rows, cols in tiles:
                run(rows, cols)
        else:
            with ThreadPoolExecutor(threads) as pool:
                for f in [pool.submit(run, rows, cols) for rows, cols in tiles]:
                    f.result()
    finally:
        torch.set_num_threads(threads)
    return nngp, ntk
