"""The ReLU conv NNGP/NTK of :func:`symgen.ntk.analytic_conv_ntk`, organized for speed on tiles of pairs.

Same recursion and the same stable angles as the generic path (Novak et al. arXiv 1810.05148, Arora et al.
arXiv 1904.11955; read-outs of Favero, Cagnetta & Wyart arXiv 2106.08619), evaluated per tile of A x B pairs
with the positions as leading axes, ``(*M, A, B)``: M is the map of positions p (flatten read-out: only
p = q is needed) or of position pairs (p, q) (global average pooling). For x2 = None only the upper tiles
are computed and mirrored. The first layer is one matrix product of raw patches, ``c = a2 x_p . y_p + b^2``
(a2 = W^2 / (C k)), float64 whatever the output dtype; ``s^2 = v1 v2 - c^2`` from it is exact to ~1e-15
v1 v2, and where the angle is within 1e-3 of 0 or pi (nearly parallel or antiparallel patches) s^2 is
recomputed by Lagrange's identity on the raw patches, ``sum_{i<j} (u_i e_j - u_j e_i)^2`` with
``e = v -+ u``: squares of exact differences, so full relative precision at both ends (x = x' gives exactly
0, set without a search). ``n J1 = s + (pi - theta) c`` takes the series of :func:`duals.sin_minus_x_cos`
only where pi - theta < 0.25 (a sparse fix). Later layers carry the distance ``E(relu(u) - relu(v))^2`` as
the generic path does, and ``4 s^2 = (dist - (r1 - r2)^2) ((r1 + r2)^2 - dist)`` from it (r = sqrt v; a
zero map gives s = 0). Flatten: ``[n J1 | Theta | dist]`` go through one filter sum per layer, a small
matrix product per spatial axis, every tile-sized step in place or into a per-thread
:class:`conv_ops.Workspace` kept between calls (fresh tile-sized tensors page-fault). GAP: slices where p
and q shift together. With ``torch.get_num_threads() > 1`` (CPU) the ops run single-threaded (intra-op
threads set to 1 for the call, restored after; per-op barriers on a loaded machine cost 10-100x) and the
tiles, from two on, on a kept pool of that many Python threads (reset in a forked child, which inherits
the pool but not its threads; the intra-op setting is process-wide, so other threads' torch ops run on one
thread during the call). In-place ops: not differentiable
(``analytic_conv_ntk`` sends inputs that require grad to the generic path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from symgen.ntk import duals
from symgen.ntk.conv_ops import Workspace, box_matrix, box_sum, filter_mean, pad_axis, pool, single_threaded, workspace

__all__ = ["relu_conv_kernels"]

_TILE_ENTRIES = 1 << 16  # map entries x pairs per tile: one temporary is 512 KiB in float64
_CLOSE_ANGLE = 1e-3  # angle to +-1 below which the first layer's v1 v2 - c^2 is recomputed as a sum of squares
_TWO_PI = 2.0 * math.pi


def _patches(x: Tensor, fs: tuple[int, ...], pads: list[tuple[int, int]], mode: str) -> Tensor:
    """Patches of x, (L, N, C k) float64, L the first layer's output positions in C order."""
    dims = len(fs)
    for i, (left, right) in enumerate(pads):
        x = pad_axis(x, 2 + i, left, right, mode)
    for i, k in enumerate(fs):
        x = x.unfold(2 + i, k, 1)  # (N, C, *out, *fs)
    perm = [2 + i for i in range(dims)] + [0, 1] + [2 + dims + i for i in range(dims)]
    return x.permute(perm).reshape(math.prod(x.shape[2 : 2 + dims]), x.shape[0], -1).contiguous()


class _Config:
    """Everything a tile needs: patches, per-image variances and their roots per layer, filter and padding."""

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
        self.scale2, self.symmetric = w2 / (a.shape[1] * math.prod(fs)), b is None
        self.ra = _patches(a, fs, pads, mode)  # raw patches: their sums and differences are exact
        self.rb = self.ra if b is None else _patches(b, fs, pads, mode)
        self.ua_neg = self.ra * -self.scale2  # -a2 x: one product per tile gives -c - b^2
        self.shape = [s + lo + hi - k + 1 for s, (lo, hi), k in zip(a.shape[2:], pads, fs, strict=True)]
        self.va = self._variances(a, self.ra)  # (L_l, N) float64 per layer
        self.vb = self.va if b is None else self._variances(b, self.rb)
        self.sa = [duals.safe_sqrt(v.to(dtype)) for v in self.va]  # sqrt v in dtype
        self.sb = self.sa if b is None else [duals.safe_sqrt(v.to(dtype)) for v in self.vb]

    def box_matrices(self, sizes: list[int], dtype: torch.dtype) -> list[Tensor]:
        """The layer's filter sum per spatial axis on a map of ``sizes`` (cached across calls)."""
        return [
            box_matrix(n, k, lo, hi, self.mode, dtype, self.ra.device)
            for n, k, (lo, hi) in zip(sizes, self.fs, self.pads, strict=True)
        ]

    def _variances(self, x: Tensor, u: Tensor) -> list[Tensor]:
        """Pre-activation variances of each layer, (L_l, N) float64: layer 1 from the raw patches u."""
        out = [torch.bmm(u.reshape(-1, 1, u.shape[-1]), u.reshape(-1, u.shape[-1], 1)).reshape(u.shape[:2])]
        out[0].mul_(self.scale2).add_(self.b2)
        v = out[0].T.reshape(x.shape[0], *self.shape)
        groups = [(1 + i,) for i in range(self.dims)]
        for _ in range(1, self.depth):
            v = self.w2 * filter_mean(v / 2.0, groups, self.fs, self.pads, self.mode) + self.b2
            out.append(v.flatten(1).T.contiguous())
        return out


class _Rect:
    """The pairs rows x cols: tile tensors (L, A, B) (flatten) or (L, L, A, B) (GAP)."""

    def __init__(self, cfg: _Config, rows: slice, cols: slice) -> None:
        self.cfg, self.rows, self.cols = cfg, rows, cols
        self.same = cfg.symmetric and rows == cols  # its diagonal is x = x'

    def pair(self, a: Tensor, b: Tensor, work: Workspace, tag: str) -> tuple[Tensor, Tensor]:
        """Per-image values (L, N) of the two sides, broadcastable against the tile (views)."""
        v1, v2 = a[:, self.rows], b[:, self.cols]
        if self.cfg.gap:
            return v1[:, None, :, None], v2[None, :, None, :]
        return v1[:, :, None], v2[:, None, :]

    def gram(self, work: Workspace) -> Tensor:
        """``-a2 x_p . y_q`` of the patches (a2 = W^2 / (C k)), float64, in ``work``."""
        ua, ub = self.cfg.ua_neg[:, self.rows], self.cfg.rb[:, self.cols]
        lp, na, nb = ua.shape[0], ua.shape[1], ub.shape[1]
        if self.cfg.gap:
            g = (ua.reshape(lp * na, -1) @ ub.reshape(lp * nb, -1).T).reshape(lp, na, lp, nb).transpose(1, 2)
            return work.get("c64", g.shape, torch.float64).copy_(g)
        return torch.bmm(ua, ub.transpose(1, 2), out=work.get("c64", (lp, na, nb), torch.float64))

    def fill_diag(self, t: Tensor, value: float) -> None:
        """Set the x = x' entries (same image, same position) of a tile tensor."""
        (t.diagonal(0, 0, 1).diagonal(0, 0, 1) if self.cfg.gap else t.diagonal(0, -2, -1)).fill_(value)

    def patches(self, idx: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """The raw patches (m, C k) of both sides at the tile entries ``idx``."""
        p, q = (idx[0], idx[1]) if self.cfg.gap else (idx[0], idx[0])
        return self.cfg.ra[:, self.rows][p, idx[-2]], self.cfg.rb[:, self.cols][q, idx[-1]]

    def store(self, nngp: Tensor, ntk: Tensor, tk: Tensor, tt: Tensor) -> None:
        """Write the tile's (A, B) kernels (and their mirror for x2 = None)."""
        rows, cols = self.rows, self.cols
        if self.same:  # exactly symmetric (the two sides round differently)
            tk, tt = (tk + tk.T) / 2.0, (tt + tt.T) / 2.0
        nngp[rows, cols], ntk[rows, cols] = tk, tt
        if self.cfg.symmetric and rows != cols:
            nngp[cols, rows], ntk[cols, rows] = tk.T, tt.T


def _gram_det(u: Tensor, v: Tensor, positive: Tensor, a2: float, b2: float, work: Workspace) -> Tensor:
    """``v1 v2 - c^2 = a2^2 sum_{i<j} (u_i e_j - u_j e_i)^2 + a2 b2 |u - v|^2`` for ``v1 = a2 |u|^2 + b2``,
    ``c = a2 u.v + b2`` (rows (m, K) of raw patches u, v).

    Lagrange's identity with ``e = v -+ u`` (``-`` where u.v > 0, else ``+``): every term is exact as v -> +-u.
    The terms are the antisymmetric part of the outer products ``u_i e_j`` (each pair twice), in row chunks.
    """
    e = torch.where(positive[:, None], v - u, v + u)
    m, k = u.shape
    out = torch.empty(m, dtype=u.dtype, device=u.device)
    step = max(1, _TILE_ENTRIES // (k * k))
    for i in range(0, m, step):
        ui, ei = u[i : i + step], e[i : i + step]
        outer = torch.mul(ui[:, :, None], ei[:, None, :], out=work.get("gram", (ui.shape[0], k, k), u.dtype))
        cross = torch.sub(outer, outer.transpose(1, 2), out=work.get("cross", outer.shape, u.dtype))
        torch.sum(cross.mul_(cross), (1, 2), out=out[i : i + step])
    return out.mul_(0.5 * a2 * a2).add_(((u - v) ** 2).sum(-1), alpha=a2 * b2)


_Fix = tuple[tuple[Tensor, ...], Tensor]


def _first_layer(cfg: _Config, tile: _Rect, work: Workspace) -> tuple[Tensor, Tensor, Tensor, _Fix | None]:
    """First conv layer and ReLU on a tile: ``(-c, s, pi - theta, series fix or None)``, ``work``'s tensors.

    ``-c`` and ``s^2 = v1 v2 - c^2`` in float64 from one product of patches, then cast; where sin theta < 1e-3
    s is recomputed by :func:`_gram_det`. The fix: ``(idx, n J1)`` where pi - theta < 0.25, whose n J1 is
    ``n sin_minus_x_cos(pi - theta)`` instead of ``s + (pi - theta) c``.
    """
    f64, dt = torch.float64, cfg.dtype
    negc = tile.gram(work)
    if cfg.b2 != 0.0:
        negc.sub_(cfg.b2)
    v1, v2 = tile.pair(cfg.va[0], cfg.vb[0], work, "v")
    det = torch.mul(v1, v2, out=work.get("s64", negc.shape, f64)).addcmul_(negc, negc, value=-1.0)
    negc_t = negc if dt == f64 else work.get("c", negc.shape, dt).copy_(negc)
    s = duals.sqrt_((det if dt == f64 else work.get("s", negc.shape, dt).copy_(det)).clamp_(min=torch.finfo(dt).tiny))
    if tile.same:  # x = x' at one position: v1 v2 - c^2 = 0 exactly
        tile.fill_diag(s, 0.0)
    phi = duals.atan2(s, negc_t, out=work.get("phi", negc.shape, dt))
    if tile.same:  # pi there, set after the search below (for the other nearly parallel pairs)
        tile.fill_diag(phi, 0.5 * math.pi)
    lo, hi = torch.aminmax(phi)
    if float(hi) > math.pi - _CLOSE_ANGLE or float(lo) < _CLOSE_ANGLE:  # v1 v2 - c^2 as a sum of squares
        dev = torch.sub(phi, 0.5 * math.pi, out=work.get("t1", phi.shape, dt)).abs_()  # |pi/2 - angle|
        idx = (dev > 0.5 * math.pi - _CLOSE_ANGLE).nonzero(as_tuple=True)
        u, v = tile.patches(idx)
        exact = _gram_det(u, v, negc[idx] < 0, cfg.scale2, cfg.b2, work)
        s[idx] = duals.safe_sqrt(exact.to(dt))
        phi[idx] = torch.atan2(s[idx], negc_t[idx])
    if tile.same:
        tile.fill_diag(phi, math.pi)
    fix = None
    if float(lo) < duals._SERIES_EDGE:  # nearly antiparallel: n J1 = n (sin phi - phi cos phi) by its series
        idx = (phi < duals._SERIES_EDGE).nonzero(as_tuple=True)
        n = (v1.expand_as(negc)[idx] * v2.expand_as(negc)[idx]).sqrt().to(dt)
        fix = (idx, n * duals.sin_minus_x_cos(phi[idx]))
    return negc_t, s, phi, fix


def _pad_dist(dist: Tensor, cfg: _Config, layer: int, tile: _Rect, sizes: list[int]) -> Tensor:
    """Zero-pad the all-pairs distances (*S, *S, A, B): a padded p against a real q is E v_q^2 = m2(q)."""
    dims = cfg.dims
    m1 = (cfg.va[layer - 1][:, tile.rows] / 2.0).to(dist.dtype).reshape(*sizes, -1)
    m2 = (cfg.vb[layer - 1][:, tile.cols] / 2.0).to(dist.dtype).reshape(*sizes, -1)
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


def _flat_box(
    cfg: _Config, work: Workspace, cur: int, sizes: list[int], tail: tuple[int, ...], dtype: torch.dtype
) -> tuple[Tensor, int]:
    """The filter sum on the flatten stack ``work.get(f"stack{cur}")`` (prod(sizes), *tail): one batched matrix
    product per spatial axis, ping-ponging between the two stack buffers; returns (result, its buffer)."""
    rest = math.prod(tail)
    shape = list(sizes)
    t = work.get(f"stack{cur}", (*shape, rest), dtype)
    for i, m in enumerate(cfg.box_matrices(sizes, dtype)):
        lead, after = math.prod(shape[:i]), math.prod(shape[i + 1 :]) * rest
        shape[i] = m.shape[0]
        cur = 1 - cur
        out = work.get(f"stack{cur}", (lead, m.shape[0], after), dtype)
        torch.bmm(m.expand(lead, *m.shape), t.reshape(lead, m.shape[1], after), out=out)
        t = out
    return t.reshape(-1, *tail), cur


def _sine_from_distance(r1: Tensor, r2: Tensor, dist: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """``s = sqrt(v1 v2 - c^2)`` from the distance ``dist = E(u - v)^2 = v1 + v2 - 2 c`` (c >= 0 after a ReLU):
    ``4 s^2 = (dist - (r1 - r2)^2) ((r1 + r2)^2 - dist)``, r = sqrt v; both factors are 2 (n -+ c), so a zero
    map (v1 = 0, dist = v2) gives s = 0 exactly, not the square root of a rounding error."""
    lo = torch.sub(r1, r2, out=out)
    torch.sub(dist, lo.mul_(lo), out=lo)  # 2 (n - c)
    hi = torch.add(r1, r2, out=scratch)
    hi.mul_(hi).sub_(dist)  # 2 (n + c)
    return duals.sqrt_(lo.mul_(hi).clamp_(min=torch.finfo(out.dtype).tiny)).mul_(0.5)


def _flat_tile(cfg: _Config, tile: _Rect, work: Workspace) -> tuple[Tensor, Tensor]:
    """(NNGP, NTK) of a tile's pairs, flatten read-out, each (A, B) in cfg.dtype.

    Per layer the stack ``[n J1 | 2 pi Theta~ | E(relu(u) - relu(v))^2]`` (L, 3, ...) goes through one filter
    sum; every tile-sized step writes into ``work``'s buffers (in place or ``out=``).
    """
    dt, w2, b2 = cfg.dtype, cfg.w2, cfg.b2
    c, s, phi, fix = _first_layer(cfg, tile, work)
    c.neg_()  # the covariance c
    cur, sizes, scale = 0, list(cfg.shape), 1.0 / _TWO_PI
    stack = work.get("stack0", (c.shape[0], 3, *c.shape[1:]), dt)
    torch.mul(phi, c, out=stack[:, 1])  # 2 pi Theta~ = (pi - theta) c: 1 / (2 pi) applied with the next filter
    for layer in range(1, cfg.depth):
        r1, r2 = tile.pair(cfg.sa[layer - 1], cfg.sb[layer - 1], work, "r")
        t1, t2 = work.get("t1", c.shape, dt), work.get("t2", c.shape, dt)
        n = torch.mul(r1, r2, out=t2)
        dist = duals.relu_gap(c, s, n, out=stack[:, 2], scratch=t1, n_free=True, n_positive=b2 >= torch.finfo(dt).tiny)
        dr = torch.sub(r1, r2, out=t2)
        dist.addcmul_(dr, dr, value=0.5)  # E(relu(u) - relu(v))^2 = (sqrt v1 - sqrt v2)^2 / 2 + gap
        nj1 = torch.addcmul(s, phi, c, out=stack[:, 0])  # n J1 = s + (pi - theta) c (c is done after this)
        if fix is not None:
            nj1[fix[0]], fix = fix[1], None
        inv = w2 / math.prod(cfg.fs)
        stack, cur = _flat_box(cfg, work, cur, sizes, stack.shape[1:], dt)
        sizes = [s_ + lo + hi - f + 1 for s_, (lo, hi), f in zip(sizes, cfg.pads, cfg.fs, strict=True)]
        c, ntk, dist = stack[:, 0], stack[:, 1], stack[:, 2]
        c.mul_(inv * scale).add_(b2)
        ntk.mul_(inv * scale).add_(c)
        dist.mul_(inv)
        r1, r2 = tile.pair(cfg.sa[layer], cfg.sb[layer], work, "r")
        s, dv = work.get("s", c.shape, dt), work.get("t1", c.shape, dt)
        _sine_from_distance(r1, r2, dist, s, dv)
        phi = duals.atan2(s, torch.neg(c, out=dv), out=work.get("phi", c.shape, dt))
        ntk.mul_(phi)
    nj1 = torch.addcmul(s, phi, c, out=stack[:, 0])
    if fix is not None:
        nj1[fix[0]] = fix[1]
    count = nj1.shape[0]
    k_out = nj1.sum(0).mul_(w2 * scale / count).add_(b2)
    return k_out, k_out + stack[:, 1].sum(0).mul_(w2 * scale / count)


def _gap_tile(cfg: _Config, tile: _Rect, work: Workspace) -> tuple[Tensor, Tensor]:
    """(NNGP, NTK) of the pairs rows x cols, global average pooling read-out, each (A, B) in cfg.dtype."""
    w2, b2, dims = cfg.w2, cfg.b2, cfg.dims
    negc, s, phi, fix = _first_layer(cfg, tile, work)
    pc = phi * negc  # -(pi - theta) c
    nj1 = s - pc if cfg.depth > 1 else s.sub_(pc)  # n J1 = s + (pi - theta) c
    if fix is not None:
        nj1[fix[0]] = fix[1]
    ntk = pc.neg_()  # 2 pi Theta~ = (pi - theta) c: the scale 1 / (2 pi) is applied with the next filter
    scale = 1.0 / _TWO_PI
    sizes, k = list(cfg.shape), negc
    for layer in range(1, cfg.depth):
        r1, r2 = tile.pair(cfg.sa[layer - 1], cfg.sb[layer - 1], work, "r")
        c = k.neg_() if layer == 1 else k  # the covariance c (-c from the first layer)
        dist = duals.relu_gap(c, s, r1 * r2)  # E(relu(u) - relu(v))^2 = (sqrt v1 - sqrt v2)^2 / 2 + gap
        dr = r1 - r2
        dist.addcmul_(dr, dr, value=0.5)
        inv = w2 / math.prod(cfg.fs)
        new_sizes = [s_ + lo + hi - f + 1 for s_, (lo, hi), f in zip(sizes, cfg.pads, cfg.fs, strict=True)]
        lead_shape, lead = sizes + sizes, (math.prod(new_sizes),) * 2
        dist, nj1, ntk = (t.reshape(*lead_shape, *t.shape[-2:]) for t in (dist, nj1, ntk))
        dist_pads = cfg.pads
        if cfg.mode == "zeros" and any(lo or hi for lo, hi in cfg.pads):
            dist, dist_pads = _pad_dist(dist, cfg, layer, tile, sizes), [(0, 0)] * dims
        k = box_sum(nj1, cfg.fs, cfg.pads, cfg.mode, True).mul_(inv * scale).add_(b2)
        ntk = box_sum(ntk, cfg.fs, cfg.pads, cfg.mode, True).mul_(inv * scale).add_(k)
        dist = box_sum(dist, cfg.fs, dist_pads, cfg.mode, True).mul_(inv)
        k, ntk, dist = (t.reshape(*lead, *t.shape[-2:]) for t in (k, ntk, dist))
        sizes = new_sizes
        r1, r2 = tile.pair(cfg.sa[layer], cfg.sb[layer], work, "r")
        s = _sine_from_distance(r1, r2, dist, torch.empty_like(dist), torch.empty_like(dist))
        phi = duals.atan2(s, -k)
        nj1 = torch.addcmul(s, phi, k)
        ntk = ntk.mul_(phi)
    count = nj1.shape[0] * nj1.shape[1]
    k_out = nj1.sum((0, 1)).mul_(w2 * scale / count).add_(b2)
    return k_out, k_out + ntk.sum((0, 1)).mul_(w2 * scale / count)


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
    budget = max(1, _TILE_ENTRIES // math.prod(a.shape[2:]) ** (2 if gap else 1))  # pairs per tile
    cpu = a.device.type == "cpu"
    threads = torch.get_num_threads() if cpu else 1
    nngp = torch.empty(n1, n2, dtype=dtype, device=a.device)
    ntk = torch.empty_like(nngp)
    side = max(1, math.isqrt(budget))
    tiles = [
        _Rect(cfg, slice(i, min(i + side, n1)), slice(j, min(j + side, n2)))
        for i in range(0, n1, side)
        for j in range(i if b is None else 0, n2, side)
    ]

    def run(tile: _Rect) -> None:
        work = workspace(a.device)
        tk, tt = _gap_tile(cfg, tile, work) if gap else _flat_tile(cfg, tile, work)
        tile.store(nngp, ntk, tk, tt)

    with single_threaded(threads > 1):  # one thread per op; the tiles on a pool
        if threads == 1 or len(tiles) == 1:
            for tile in tiles:
                run(tile)
        else:
            for f in [pool(threads).submit(run, tile) for tile in tiles]:
                f.result()
    return nngp, ntk
