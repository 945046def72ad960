"""Infinite-width NNGP and NTK of fully-connected nets in NTK parameterization, and the finite nets they describe.

The kernels equal neural-tangents' ``stax`` kernels of
``stax.serial(*[Dense(W_std, b_std), act()] * depth, Dense(W_std, b_std))`` with the input
covariance ``x . x' / d``. Gradients with respect to the inputs are finite everywhere, including
``x = x'`` where the arc-cosine kernel's derivative is infinite (KIP and attacks differentiate
through these kernels). Sources: Jacot et al. arXiv 1806.07572; Lee et al. arXiv 1902.06720;
Novak et al. (neural-tangents) arXiv 1912.02803; Kempe et al. arXiv 2307.02693.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.ntk import duals
from symgen.ntk.conv_ops import single_threaded
from symgen.numerics import first_bad_row
from symgen.rng import Seed, init_generator

__all__ = ["ACTIVATIONS", "analytic_ntk", "NTKLinear", "Erf", "ntk_mlp"]

ACTIVATIONS = ("relu", "erf", "identity")
_BLOCK_ENTRIES = 1 << 16  # rows x columns per block: ~10 block-sized temporaries fit a 1 MiB L2
_SMALL = 1 << 16  # N1 N2 up to which the kernels run on one thread


def _as_matrix(x: Tensor, name: str, check: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of shape (N, ...), got {type(x).__name__}.")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(f"{name} must have shape (N, ...) with N >= 1, got {tuple(x.shape)}.")
    if check:
        check_finite_input(x, name, "analytic_ntk")
    return x.reshape(x.shape[0], -1)


def check_finite_input(x: Tensor, name: str, where: str) -> None:
    """Raise a DivergenceError naming ``name`` and the batch index of its first sample with NaN or inf."""
    i = first_bad_row(x)
    if i is not None:
        raise DivergenceError(f"{where}: the input {name} at batch index {i} holds non-finite values (NaN or inf).")


_EDGE = math.sin(0.26) ** 2  # sin^2 of an angle above duals' series edge (0.25) and the near-parallel 1e-3
_NEAR_PARALLEL = 1e-6  # sin^2 of the input angle below which c11 c22 - c12^2 is recomputed from differences


def _stable_det(a: Tensor, b: Tensor, det: Tensor, c11: Tensor, c22: Tensor, alpha: float, beta: float) -> Tensor:
    """``c11 c22 - c12^2`` of the inputs' covariances, exact also for (anti)parallel or equal inputs.

    ``det`` (rows of ``a`` against ``b``) was formed by cancellation; where it is below 1e-6 c11 c22 (angles
    under ~1e-3 from 0 or pi, usually only x = x') it is recomputed by :func:`_exact_det`.
    """
    i, j = torch.nonzero(det <= _NEAR_PARALLEL * (c11[:, None] * c22[None, :]), as_tuple=True)
    if i.numel() == 0:
        return det
    return det.index_put((i, j), _exact_det(a[i], b[j], alpha, beta))


def _exact_det(xi: Tensor, xj: Tensor, alpha: float, beta: float) -> Tensor:
    """``alpha^2 |x|^2 |x' - t x|^2 + alpha beta |x - x'|^2`` (t = x.x' / |x|^2, alpha = W^2 / d, beta = b^2)
    per row pair: ``c11 c22 - c12^2`` from differences, 0 for x = x'."""
    sq = (xi * xi).sum(-1)
    t = (xi * xj).sum(-1) / sq.clamp(min=torch.finfo(sq.dtype).tiny)
    resid = xj - t[:, None] * xi
    return alpha * alpha * sq * (resid * resid).sum(-1) + alpha * beta * ((xi - xj) ** 2).sum(-1)


def _relu_fast(
    a: Tensor,
    b: Tensor,
    v1: Tensor | None,
    v2: Tensor,
    diag: int | None,
    depth: int,
    w2: float,
    b2: float,
    dtype: torch.dtype,
    inputs: tuple[tuple[Tensor, str], ...] = (),
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """ReLU ``(nngp, ntk)`` of rows ``a`` (float64) against ``b``, forward only: the values of the generic
    recursion (:func:`_relu_layer`, arXiv 1806.07572) with in-place steps and fewer passes. ``diag``: offset of
    the x = x' diagonal in the block (None: none), where ``c11 c22 - c12^2 = 0`` is set. One reduction of
    ``sin^2 = det / (v1 v2)`` says whether any other pair is within 0.26 rad of (anti)parallel: only then is the
    series of ``n J1`` applied (:func:`duals.series_fix`), the dets with ``sin^2 <= 1e-6`` recomputed
    (:func:`_exact_det`) and the first gap taken from :func:`duals.relu_gap`; else that gap is
    ``n - n J1 / pi`` (>= 0.032 n there: at most 5 bits cancel). Only a non-finite reduction checks ``inputs``
    (tensor, name) for NaN / inf. Intermediate kernels are kept negated (``atan2(s, -c)`` with no negation
    pass). ``v1``, ``v2``: the input variances ``W^2 |x|^2 / d + b^2`` (``v1`` None: x2 = None and all rows,
    read off the diagonal of ``c``). ``out``: where to write (nngp, ntk).
    """
    alpha = w2 / a.shape[1]
    negc = torch.mm(a, b.t())
    negc.mul_(-alpha)  # -c = -(W^2 a.b / d + b^2), bit for bit the negated c of the generic path
    if b2 != 0.0:
        negc.sub_(b2)
    same = v1 is None  # one set of variances
    v1 = negc.diagonal().neg() if v1 is None else v1
    outer = torch.outer(v1, v1 if same else v2)
    det = torch.addcmul(outer, negc, negc, value=-1.0)
    sin2 = torch.div(det, outer)  # sin^2 of the angles (<= 1); NaN for v = 0 or a non-finite input
    tiny = torch.finfo(dtype).tiny
    if diag is not None:
        det.diagonal(diag).fill_(tiny)  # x = x': s = sqrt(tiny), as the clamp of the generic path
        sin2.diagonal(diag).copy_(v1 / v1)  # 1, or NaN as above (also at N = 1)
    low = float(sin2.amin())
    close = not low > _EDGE  # some pair within 0.26 rad of (anti)parallel, or NaN
    if close:
        if not math.isfinite(low):
            for x, name in inputs:
                check_finite_input(x, name, "analytic_ntk")
        if not low > _NEAR_PARALLEL:  # nearly (anti)parallel pairs: det recomputed from the inputs
            i, j = (sin2 <= _NEAR_PARALLEL).nonzero(as_tuple=True)
            det.index_put_((i, j), _exact_det(a[i], b[j], alpha, b2))
    s = det if dtype == torch.float64 else det.to(dtype)
    if close or _EDGE * b2 * b2 < 2.0 * tiny:  # else det > sin^2(0.26) v1 v2 >= sin^2(0.26) b^4: no clamp
        s.clamp_(min=tiny)
    big = s.numel() >= duals.NUMPY_MIN  # numpy's atan2 and sqrt: faster from there, slower below
    atan2, sqrt_ = (duals.atan2, duals.sqrt_) if big else (torch.atan2, Tensor.sqrt_)
    sqrt_(s)
    negc = negc.to(dtype)
    ntk, sign = negc, -1.0  # ntk holds sign * Theta
    scale = w2 * 0.5 / math.pi
    for layer in range(depth):
        last = layer == depth - 1
        phi = atan2(s, negc)
        nj1 = torch.addcmul(s, phi, negc, value=-1.0)  # s + phi c
        if not last or (layer == 0 and close):
            # v >= b^2: the clamp of safe_sqrt is a no-op for b^2 >= tiny
            v1 = v1.to(dtype)  # float64 until needed
            v2 = v1 if same else v2.to(dtype)
            r1 = v1.sqrt() if b2 >= tiny else v1.clamp(min=tiny).sqrt_()
            r2 = r1 if same else v2.sqrt() if b2 >= tiny else v2.clamp(min=tiny).sqrt_()
            n = torch.outer(r1, r2)
            if layer == 0 and close:
                duals.series_fix(nj1, phi, n)
        if last:
            c = nj1.mul_(scale) if out is None else torch.mul(nj1, scale, out=out[0])
            c.add_(b2)
            return c, torch.addcmul(c, ntk, phi, value=sign * scale, out=None if out is None else out[1])
        # s^2 = w2^2 / 4 gap (n + n J1 / pi) + w2 b2 ((r1 - r2)^2 / 2 + gap), as _relu_layer
        if layer == 0 and not close:  # theta in [0.26, pi - 0.26]: n J1 / pi <= 0.968 n, <= 5 bits cancel
            gap = torch.add(n, nj1, alpha=-1.0 / math.pi)
            if diag is not None:
                gap.diagonal(diag).fill_(0.0)  # x = x': theta = 0
        else:
            gap = _gap(negc, s, n, b2 >= tiny)
        u = torch.add(n, nj1, alpha=1.0 / math.pi)
        if b2 != 0.0:
            diff = r1.unsqueeze(1) - r2
            s = torch.addcmul(torch.addcmul(gap, diff, diff, value=0.5), gap, u, value=w2 / (4.0 * b2))
            s.mul_(w2 * b2)
        else:
            s = u.mul_(gap).mul_(w2 * w2 / 4.0)
        sqrt_(s.clamp_(min=tiny))
        negc = nj1.mul_(-scale).sub_(b2)
        ntk = torch.addcmul(negc, ntk, phi, value=-sign * scale)  # -Theta = -c - scale Theta phi
        sign = -1.0
        v1 = v1 * (w2 / 2.0) + b2
        v2 = v1 if same else v2 * (w2 / 2.0) + b2
    if out is None:  # depth 0
        return negc.neg(), ntk.neg()
    return torch.neg(negc, out=out[0]), torch.neg(ntk, out=out[1])


def _gap(negc: Tensor, s: Tensor, n: Tensor, positive_n: bool) -> Tensor:
    """The gap ``n - n J1 / pi`` of :func:`duals.relu_gap` from ``-c`` (``positive_n``: b^2 >= tiny, so n > 0)."""
    return duals.relu_gap(negc.neg(), s, n, n_positive=positive_n)


def _relu_layer(
    c11: Tensor, c12: Tensor, c22: Tensor, s: Tensor, ntk: Tensor, w2: float, b2: float, first: bool, last: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ReLU then Dense on (c11, c12, c22, s = sqrt(c11 c22 - c12^2), ntk), via :func:`duals.relu_dual`.

    ``K <- w2 E[relu(u) relu(v)] + b2``, ``Theta <- K + w2 Theta E[relu'(u) relu'(v)]``, and the next layer's
    ``s^2 = (w2^2 / 4) gap (n + n J1 / pi) + w2 b2 ((sqrt c11 - sqrt c22)^2 / 2 + gap)`` (gap = n - n J1 / pi):
    a sum of non-negative terms, so correlations near 1 keep their digits (x = x' stays at s = 0).
    """
    r1, r2 = duals.safe_sqrt(c11)[:, None], duals.safe_sqrt(c22)[None, :]
    n = r1 * r2
    nj1, phi, gap = duals.relu_dual(c12, s, n, signed=first, gap=not last)
    scale = w2 * 0.5 / math.pi
    nngp = (nj1 * scale).add_(b2)
    ntk = torch.addcmul(nngp, ntk, phi, value=scale)
    if gap is not None:
        diff = r1 - r2
        det = (w2 * w2 / 4.0) * gap * (n + nj1 / math.pi) + (w2 * b2) * (0.5 * diff * diff + gap)
        s = duals.safe_sqrt(det)
    return w2 * c11 / 2.0 + b2, nngp, w2 * c22 / 2.0 + b2, s, ntk


def _erf(c11: Tensor, c12: Tensor, c22: Tensor, ntk: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    nngp, dot = duals.erf_dual(c11[:, None], c22[None, :], c12)
    return duals.erf_variance(c11), nngp, duals.erf_variance(c22), ntk * dot


def analytic_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    depth: int = 1,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    dtype: torch.dtype | None = None,
    fast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Infinite-width ``(nngp, ntk)``, each (N1, N2), of ``[Dense, act] * depth + Dense`` (NTK param.).

    Recursion: ``K <- W^2 K + b^2, Theta <- K + W^2 Theta`` per Dense (``K0 = x.x'/d``, ``Theta0 = 0``);
    ``K <- E[act(u) act(v)], Theta <- Theta * E[act'(u) act'(v)]`` per activation (arXiv 1806.07572).

    ``x1``: (N1, ...), ``x2``: (N2, ...) or None (= x1); inputs are flattened to d features.
    ``activation``: "relu" (arc-cosine kernels), "erf" or "identity". ``dtype``: compute and return
    in this dtype (e.g. ``torch.float64``); default the inputs' floating dtype. ``fast``: ReLU kernels of
    inputs that need no gradient go through :func:`_relu_fast` (the same values, in-place steps); False keeps
    the differentiable path (the tests' reference). ``x2`` given as the very tensor ``x1`` is taken as None.
    """
    if x2 is x1:
        x2 = None
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConfigError(f"depth (number of hidden layers) must be an int >= 0, got {depth!r}.")
    if weight_std < 0 or bias_std < 0:
        raise ConfigError(f"weight_std and bias_std must be >= 0, got {weight_std}, {bias_std}.")
    grads = torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in (x1, x2))
    lazy = fast and activation == "relu" and not grads  # _relu_fast checks the inputs only if its sums are not finite
    a = _as_matrix(x1, "x1", not lazy)
    b = a if x2 is None else _as_matrix(x2, "x2", not lazy)
    inputs = ((x1, "x1"),) if x2 is None else ((x1, "x1"), (x2, "x2"))
    if a.shape[1] != b.shape[1]:
        raise ShapeError(
            f"x1 and x2 must have the same number of features; got {a.shape[1]} and "
            f"{b.shape[1]} (shapes {tuple(x1.shape)} and {tuple((b if x2 is None else x2).shape)})."
        )
    if dtype is None:
        dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    # The input covariances in float64 whatever ``dtype``: the first angle is then exact to float64, which
    # float32 cannot give where x.x' rounds (near x = x' the arc-cosine turns an ulp into sqrt(ulp)).
    a64 = a.to(torch.float64)
    b64 = a64 if b is a else b.to(torch.float64)
    d = a.shape[1]
    w2, b2 = float(weight_std) ** 2, float(bias_std) ** 2
    step = max(1, _BLOCK_ENTRIES // max(1, b.shape[0]))
    # small: one thread (an intra-op barrier per op costs more than the op, 10-100x under load)
    small = a.device.type == "cpu" and a.shape[0] * b.shape[0] <= _SMALL and torch.get_num_threads() > 1
    if lazy and x2 is None and step >= a.shape[0]:  # variances: the Gram diagonal
        with single_threaded(small):
            return _relu_fast(a64, a64, None, a64, 0, depth, w2, b2, dtype, inputs)
    c11_all = w2 * (a64 * a64).sum(-1) / d + b2
    c22_0 = c11_all if x2 is None else w2 * (b64 * b64).sum(-1) / d + b2

    def block(rows: slice, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if lazy:
            diag = None if x2 is not None else rows.start or 0
            return _relu_fast(a64[rows], b64, c11_all[rows], c22_0, diag, depth, w2, b2, dtype, inputs, out)
        c11, c22 = c11_all[rows], c22_0
        c12 = (w2 / d) * (a64[rows] @ b64.T) + b2
        if activation != "relu":
            c12, c11, c22 = c12.to(dtype), c11.to(dtype), c22.to(dtype)
            ntk = c12
            for _ in range(depth):
                if activation == "erf":
                    c11, c12, c22, ntk = _erf(c11, c12, c22, ntk)
                c11, c12, c22 = w2 * c11 + b2, w2 * c12 + b2, w2 * c22 + b2
                ntk = torch.add(c12, ntk, alpha=w2)
            return c12, ntk
        det = _stable_det(a64[rows], b64, c11[:, None] * c22[None, :] - c12 * c12, c11, c22, w2 / d, b2)
        s = duals.safe_sqrt(det.to(dtype))
        c12, c11, c22 = c12.to(dtype), c11.to(dtype), c22.to(dtype)
        ntk = c12
        for layer in range(depth):
            c11, c12, c22, s, ntk = _relu_layer(c11, c12, c22, s, ntk, w2, b2, layer == 0, layer == depth - 1)
        return c12, ntk

    # Row blocks of ~64K entries: the ~20 elementwise passes per layer then run in L2 instead of streaming
    # (and page-faulting) full N1 x N2 temporaries; 3-6x faster at 1000 x 1000 than whole, 1.2-3x than 256K.
    if step >= a.shape[0]:
        with single_threaded(small):
            return block(slice(None))
    if grads:
        parts = [block(slice(i, i + step)) for i in range(0, a.shape[0], step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    nngp = torch.empty(a.shape[0], b.shape[0], dtype=dtype, device=a.device)
    ntk = torch.empty_like(nngp)
    if lazy and x2 is None:  # square tiles on and above the diagonal, mirrored: half the work
        side, n = max(1, math.isqrt(_BLOCK_ENTRIES)), a.shape[0]
        for i in range(0, n, side):
            rows = slice(i, i + side)
            for j in range(i, n, side):
                cols = slice(j, j + side)
                diag, out = (0, (nngp[rows, cols], ntk[rows, cols])) if i == j else (None, None)
                v1, v2 = c11_all[rows], c11_all[cols]
                tk, tt = _relu_fast(a64[rows], a64[cols], v1, v2, diag, depth, w2, b2, dtype, inputs, out)
                if j != i:  # contiguous tiles: torch's blocked transpose copy, 3-4x faster than a strided one
                    nngp[rows, cols], ntk[rows, cols] = tk, tt
                    nngp[cols, rows], ntk[cols, rows] = tk.T.contiguous(), tt.T.contiguous()
        return nngp, ntk
    for i in range(0, a.shape[0], step):  # no autograd: write blocks in place, no concatenation
        rows = slice(i, i + step)
        if lazy:  # the last pass writes into the outputs
            block(rows, (nngp[rows], ntk[rows]))
        else:
            nngp[rows], ntk[rows] = block(rows)
    return nngp, ntk


class NTKLinear(nn.Module):
    """Dense layer in NTK parameterization: ``y = (weight_std / sqrt(fan_in)) W x + bias_std b``, W, b ~ N(0, 1).

    Its infinite-width kernels are neural-tangents' ``stax.Dense(W_std, b_std)`` (arXiv 1806.07572).
    ``bias_std == 0`` means no bias parameter (as ``Dense(b_std=None)``). Initial W, b from
    ``generator`` (a seed or a ``torch.Generator``; None: the global generator, as torch.nn).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        *,
        generator: Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"NTKLinear needs in_features, out_features >= 1, got {in_features}, {out_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if self.bias_std != 0.0:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator)

    @property
    def weight_scale(self) -> float:
        """weight_std / sqrt(in_features): the NTK parameterization's weight factor."""
        return self.weight_std / math.sqrt(self.in_features)

    @property
    def bias_scale(self) -> float:
        """bias_std: the NTK parameterization's bias factor."""
        return self.bias_std

    def reset_parameters(self, generator: Seed = None) -> None:
        """W, b ~ N(0, 1), drawn on the generator's device.

        Args:
            generator: a seed, a ``torch.Generator``, or None (the global one).
        """
        g = init_generator(generator)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g, dtype=self.weight.dtype, device=g.device))
            if self.bias is not None:
                self.bias.copy_(torch.randn(self.bias.shape, generator=g, dtype=self.bias.dtype, device=g.device))

    def forward(self, x: Tensor) -> Tensor:
        # Scale the (batch x out) product, not the (out x in) weight: cheaper for wide layers.
        """y = (weight_std / sqrt(in)) W x + bias_std b (Jacot et al. arXiv 1806.07572).

        Args:
            x: inputs (..., in_features).

        Returns:
            outputs (..., out_features).
        """
        y = F.linear(x, self.weight) * self.weight_scale
        return y if self.bias is None else y + self.bias * self.bias_scale

    def extra_repr(self) -> str:
        """The layer's sizes and scales, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std}, bias_std={self.bias_std}"
        )


class Erf(nn.Module):
    """Elementwise ``erf`` activation (neural-tangents' ``stax.Erf()``)."""

    def forward(self, x: Tensor) -> Tensor:
        """erf(x) elementwise.

        Args:
            x: any tensor.

        Returns:
            erf(x).
        """
        return torch.erf(x)


def ntk_mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int = 1,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    *,
    generator: Seed = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """The finite net ``Flatten, [NTKLinear, act] * depth, NTKLinear`` whose width -> inf kernels are :func:`analytic_ntk`.

    Randomness: ``generator``, a seed or a ``torch.Generator`` (None: the global one, as torch.nn), shared by the layers.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if depth < 0 or width < 1:
        raise ConfigError(f"ntk_mlp needs depth >= 0 and width >= 1, got depth={depth}, width={width}.")
    generator = init_generator(generator)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers.append(NTKLinear(fan_in, width, weight_std, bias_std, generator=generator, dtype=dtype))
        layers.append({"relu": nn.ReLU, "erf": Erf, "identity": nn.Identity}[activation]())
        fan_in = width
    layers.append(NTKLinear(fan_in, out_features, weight_std, bias_std, generator=generator, dtype=dtype))
    return nn.Sequential(*layers).to(device=device)
