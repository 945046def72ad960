"""Learning curves of kernel ridge(less) regression: test error against training-set size P, and the exponent
beta of ``error ~ P^-beta`` with its confidence interval.

Each draw is an independent replicate (a fresh random split of the data, or fresh data and teacher from a
sampler), so the per-draw exponents are independent and their spread gives the interval. Within a draw the
training sets are nested (the first P points) and the test set is fixed, so one float64 Cholesky factor of
the largest training kernel serves every P: the factor of a leading block ``K[:P, :P]`` is the leading block
of the factor (``nested_test_errors``). Kernels are evaluated in row/column blocks (``blocked_kernel``; only
the upper blocks of a symmetric one). The exponent can be fitted on the sizes ``>= fit_min`` only (the
asymptotic range) while the whole curve is kept. Sources: Spigler,
Geiger & Wyart arXiv 1905.10843; Favero, Cagnetta & Wyart arXiv 2106.08619; Kempe et al. arXiv 2307.02693.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.ntk.regression import Kernel
from symgen.rng import Seed, as_generator
from symgen.stats import mean_stderr
from symgen.streaming import is_tensor_pair

__all__ = [
    "LearningCurve",
    "learning_curve",
    "fit_power_law",
    "blocked_kernel",
    "cholesky_jittered",
    "nested_test_errors",
    "curve_from_errors",
]

Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class LearningCurve:
    """Test errors ``errors[draw, i]`` at ``sizes[i]`` and the fitted power law ``error ~ A P^-beta``.

    ``beta`` is the least-squares slope of ``-log error`` against ``log P`` on the mean over draws of
    ``log error``, which equals the mean of the per-draw slopes ``betas``; ``beta_ci`` is its
    Student-t interval at ``confidence`` from their spread (nan with one draw). The fit uses the sizes
    ``>= fit_min`` (all of them by default).
    """

    sizes: list[int]
    errors: list[list[float]]
    beta: float
    beta_stderr: float
    beta_ci: tuple[float, float]
    betas: list[float]
    log_amplitude: float
    confidence: float
    fit_min: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_errors(self) -> list[float]:
        """The mean test error over draws at each size."""
        return [sum(col) / len(col) for col in zip(*self.errors, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """The curve as JSON-able types.

        Returns:
            dict of sizes, errors, mean errors, beta with its stderr and interval, per-draw betas, amplitude, extra.
        """
        return {
            "sizes": self.sizes,
            "errors": self.errors,
            "mean_errors": self.mean_errors,
            "beta": self.beta,
            "beta_stderr": self.beta_stderr,
            "beta_ci": list(self.beta_ci),
            "betas": self.betas,
            "log_amplitude": self.log_amplitude,
            "confidence": self.confidence,
            "fit_sizes": [p for p in self.sizes if p >= self.fit_min],
            **self.extra,
        }


def fit_power_law(
    sizes: Sequence[int], errors: Sequence[Sequence[float]], confidence: float = 0.95
) -> tuple[float, float, tuple[float, float], list[float], float]:
    """``(beta, stderr, ci, per_draw_betas, log_amplitude)`` of ``error ~ A P^-beta``, one fit per draw (row).

    Least squares of ``log error`` on ``log P`` per draw; beta = mean of the draws' slopes (negated), its
    standard error ``std / sqrt(D)`` and a Student-t interval with D - 1 degrees of freedom.
    """
    from scipy import stats as sstats

    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")
    logp = torch.log(torch.as_tensor(sizes, dtype=torch.float64))
    err = torch.as_tensor(errors, dtype=torch.float64)
    if err.dim() != 2 or err.shape[1] != logp.numel() or logp.numel() < 2:
        raise ShapeError(
            f"errors must be (draws, {logp.numel()}) for {logp.numel()} >= 2 sizes, got {tuple(err.shape)}."
        )
    if not bool((err > 0).all()):
        raise ConfigError(
            "every error must be > 0 to fit a power law in log-log; got a zero or negative error "
            "(the task is learned exactly: use a harder task or fewer samples)."
        )
    x = logp - logp.mean()
    loge = torch.log(err)
    slopes = (loge - loge.mean(1, keepdim=True)) @ x / (x @ x)
    betas = (-slopes).tolist()
    d = len(betas)
    beta = float(sum(betas) / d)
    amp = float(loge.mean() + beta * logp.mean())
    if d < 2:
        return beta, math.nan, (math.nan, math.nan), betas, amp
    _, se = mean_stderr(betas)
    half = float(sstats.t.ppf(0.5 + confidence / 2, d - 1)) * se
    return beta, se, (beta - half, beta + half), betas, amp


def curve_from_errors(
    sizes: Sequence[int],
    errors: Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    fit_min: int = 0,
    extra: dict[str, Any] | None = None,
) -> LearningCurve:
    """A :class:`LearningCurve` from test errors ``errors[draw][i]`` at ``sizes[i]``, fitted on sizes ``>= fit_min``."""
    sizes = [int(p) for p in sizes]
    fit = [i for i, p in enumerate(sizes) if p >= fit_min]
    if len(fit) < 2:
        raise ConfigError(f"fit_min = {fit_min} leaves fewer than two of the sizes {sizes} to fit.")
    rows = [[float(e) for e in r] for r in errors]
    beta, se, ci, betas, amp = fit_power_law([sizes[i] for i in fit], [[r[i] for i in fit] for r in rows], confidence)
    return LearningCurve(
        sizes=sizes,
        errors=rows,
        beta=beta,
        beta_stderr=se,
        beta_ci=ci,
        betas=betas,
        log_amplitude=amp,
        confidence=confidence,
        fit_min=fit_min,
        extra=dict(extra or {}),
    )


def blocked_kernel(
    kernel: Kernel, x1: Tensor, x2: Tensor | None = None, *, block: int = 2048, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``kernel(x1, x2)`` assembled from pieces of at most ``block`` x ``block`` entries, in ``dtype``.

    ``x2=None``: the symmetric ``kernel(x1, x1)``, only the blocks on and above the diagonal evaluated
    (the others mirrored). Memory beyond the result: one block.
    """
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}.")
    sym = x2 is None
    other = x1 if x2 is None else x2
    n1, n2 = x1.shape[0], other.shape[0]
    out = torch.empty(n1, n2, dtype=dtype, device=x1.device)
    for i in range(0, n1, block):
        for j in range(i if sym else 0, n2, block):
            piece = kernel(x1[i : i + block], other[j : j + block])
            rows, cols = min(block, n1 - i), min(block, n2 - j)
            if tuple(piece.shape) != (rows, cols):
                raise ShapeError(f"the kernel returned {tuple(piece.shape)} for a ({rows}, {cols}) block.")
            out[i : i + rows, j : j + cols] = piece
            if sym and j != i:
                out[j : j + cols, i : i + rows] = piece.T
    return out


def cholesky_jittered(k: Tensor, *, max_tries: int = 6) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``k`` and the jitter added to its diagonal (0.0 when none was needed).

    If ``k`` is not numerically positive definite, ``eps * mean diag * 10 * 100^i`` is added (on a copy)
    for i = 0, 1, ...; after ``max_tries`` it raises :class:`DivergenceError`.
    """
    factor, info = torch.linalg.cholesky_ex(k)
    if not bool(info.any()):
        return factor, 0.0
    scale = float(k.diagonal().abs().mean()) or 1.0
    jitter = scale * torch.finfo(k.dtype).eps * 10.0
    for _ in range(max_tries):
        a = k.clone()
        a.diagonal().add_(jitter)
        factor, info = torch.linalg.cholesky_ex(a)
        del a
        if not bool(info.any()):
            return factor, jitter
        jitter *= 100.0
    raise DivergenceError(
        f"kernel matrix ({k.shape[0]} x {k.shape[0]}) is not positive definite even with jitter "
        f"{jitter / 100.0:.3g} ({jitter / 100.0 / scale:.1e} of its mean diagonal)."
    )


def _f_ready(a: Tensor) -> bool:
    """Whether ``torch.linalg.solve_triangular`` takes the matrix ``a`` as it is (else it clones it F-contiguous)."""
    return a.is_contiguous() or a.mT.is_contiguous()


def _fortran_copy(a: Tensor, buf: Tensor, strip: int = 256) -> Tensor:
    """The F-contiguous copy of the square ``a`` that ``solve_triangular`` would make, in the front of ``buf``.

    Same values and layout, so the same LAPACK call and the same bits; but where ``a``'s rows are contiguous
    (the transpose of a column-major factor's leading block) the transposition goes through strips of
    ``strip`` columns made contiguous first, so torch's blocked transpose copy applies (an element-by-element
    strided copy is several times slower at P in the thousands), and ``buf`` is reused across sizes.
    """
    p = a.shape[0]
    rows = buf[: p * p].view(p, p)  # row-major storage of the result's transpose
    if a.stride(-1) != 1 or p < strip:
        rows.mT.copy_(a)
        return rows.mT
    tmp = torch.empty(p, strip, dtype=a.dtype, device=a.device)
    for j in range(0, p, strip):
        w = min(strip, p - j)
        piece = tmp if w == strip else torch.empty(p, w, dtype=a.dtype, device=a.device)
        piece.copy_(a[:, j : j + w])
        rows[j : j + w].copy_(piece.mT)
    return rows.mT


def nested_test_errors(
    k_train: Tensor | None,
    y_train: Tensor,
    k_test_train: Tensor,
    y_test: Tensor,
    sizes: Sequence[int],
    *,
    ridge: float = 0.0,
    factor: Tensor | None = None,
) -> tuple[list[float], float]:
    """Test MSE of kernel ridge(less) regression on the first P training points, for each P in ``sizes``.

    One Cholesky factor ``L`` of ``K[:P_max, :P_max] + ridge I`` serves every P: ``L[:P, :P]`` is the factor
    of the leading block and ``z = L^-1 y`` restricted to its first P entries solves the leading system,
    so each P costs one triangular solve ``L[:P, :P]^T alpha = z[:P]`` and the prediction
    ``K_test[:, :P] alpha``. ``factor``: a lower factor whose leading ``P_max`` block is that of
    ``K + ridge I`` (e.g. of a larger matrix whose first rows are the training points); None: computed here
    from ``k_train``, which is not read when ``factor`` is given (None then).
    Error: ``mean_i ||f(x_i) - y_i||^2`` over the test points.

    Returns:
        the errors (one per size, in ``sizes``' order) and the jitter the factorization needed (0.0 if none).
    """
    pmax = max(sizes)
    avail = k_test_train.shape[1]
    if factor is None:
        if k_train is None:
            raise ConfigError("nested_test_errors needs k_train or its factor; got neither.")
        avail = min(k_train.shape[0], avail)
    if min(sizes) < 1 or pmax > avail:
        raise ConfigError(f"sizes must lie in [1, {avail}], got {list(sizes)}.")
    jitter = 0.0
    if factor is None:
        assert k_train is not None  # checked above (mypy)
        a = k_train[:pmax, :pmax]
        if ridge:
            a = a.clone()
            a.diagonal().add_(ridge)
        factor, jitter = cholesky_jittered(a)
        del a
    dtype = factor.dtype
    y = y_train[:pmax].reshape(pmax, -1).to(dtype)
    yt = y_test.reshape(y_test.shape[0], -1).to(dtype)
    z = torch.linalg.solve_triangular(factor[:pmax, :pmax], y, upper=False)
    errors = []
    buf: Tensor | None = None
    for p in sizes:
        a = factor[:p, :p].T
        if not _f_ready(a):  # the F-contiguous copy solve_triangular would clone, made faster and reused
            if buf is None:
                need = max(q for q in sizes if not _f_ready(factor[:q, :q].T))
                buf = torch.empty(need * need, dtype=dtype, device=factor.device)
            a = _fortran_copy(a, buf)
        alpha = torch.linalg.solve_triangular(a, z[:p], upper=True)
        diff = k_test_train[:, :p].to(dtype) @ alpha - yt
        errors.append(float((diff * diff).sum(1).mean()))
    return errors, jitter


def learning_curve(
    kernel: Kernel,
    data: tuple[Tensor, Tensor] | Sampler,
    sizes: Sequence[int],
    *,
    num_test: int,
    num_draws: int = 5,
    ridge: float = 0.0,
    confidence: float = 0.95,
    generator: Seed = None,
    dtype: torch.dtype = torch.float64,
    fit_min: int = 0,
    block: int = 2048,
) -> LearningCurve:
    """Test mean squared error of kernel ridge(less) regression for each training-set size P in ``sizes``.

    ``kernel(x1, x2) -> (N1, N2)``, e.g. ``lambda a, b: analytic_conv_ntk(a, b, ...)[1]``. ``data``: a pool
    ``(x, y)`` (each draw shuffles it: ``num_test`` test points, the training sets are the first P of the
    rest, nested within the draw) or a sampler ``sample(num_data, generator) -> (x, y)`` called once per
    draw with ``num_data = max(sizes) + num_test`` (fresh data and teacher per draw, as in teacher-student
    studies). Per draw the kernel is evaluated once, in ``block`` x ``block`` pieces, and factorized once
    (``nested_test_errors``). Error: ``mean_i ||f(x_i) - y_i||^2`` over the test points. ``generator``:
    seed or ``torch.Generator`` (None = seed 0) for the splits and the sampler. ``fit_min``: the exponent
    is fitted on the sizes ``>= fit_min`` (at least two).
    """
    sizes = sorted({int(p) for p in sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"sizes must hold at least two training-set sizes >= 1, got {list(sizes)}.")
    if num_test < 1 or num_draws < 1:
        raise ConfigError(f"num_test and num_draws must be >= 1, got {num_test} and {num_draws}.")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}.")
    if sum(p >= fit_min for p in sizes) < 2:
        raise ConfigError(f"fit_min = {fit_min} leaves fewer than two of the sizes {sizes} to fit.")
    need = sizes[-1] + num_test
    g = as_generator(generator)
    if not callable(data):
        if not is_tensor_pair(data):
            raise ConfigError(
                "data must be a pool (x, y) of tensors or a sampler sample(num_data, generator) -> (x, y)."
            )
        if data[0].shape[0] != data[1].shape[0]:
            raise ShapeError(
                f"x and y must hold the same number of points, got {data[0].shape[0]} and {data[1].shape[0]}."
            )
        if data[0].shape[0] < need:
            raise ConfigError(
                f"the pool holds {data[0].shape[0]} points but max(sizes) + num_test = {need}; "
                "lower the sizes or num_test, or pass a larger pool."
            )
    errors: list[list[float]] = []
    jitters: list[float] = []
    for _ in range(num_draws):
        if callable(data):
            x, y = data(need, g)
            if x.shape[0] != need or y.shape[0] != need:
                raise ShapeError(f"the sampler must return {need} points, got x {tuple(x.shape)}, y {tuple(y.shape)}.")
        else:
            idx = torch.randperm(data[0].shape[0], generator=g)[:need]
            x, y = data[0][idx.to(data[0].device)], data[1][idx.to(data[1].device)]
        x_test, x_pool = x[:num_test], x[num_test:]
        y_test, y_pool = y[:num_test].to(dtype), y[num_test:].to(dtype)
        k_pool = blocked_kernel(kernel, x_pool, block=block, dtype=dtype)
        k_test = blocked_kernel(kernel, x_test, x_pool, block=block, dtype=dtype)
        row, jitter = nested_test_errors(k_pool, y_pool, k_test, y_test, sizes, ridge=ridge)
        jitters.append(jitter)
        errors.append(row)
    return curve_from_errors(sizes, errors, confidence=confidence, fit_min=fit_min, extra={"jitter": max(jitters)})
