"""Kernel ridge regression, gradient-descent dynamics of wide nets on MSE, and NTK eigen-analysis.

A wide net trained by gradient flow on ``L = 1/(2n) sum_i ||f(x_i) - y_i||^2`` follows
``f_t = f_0 + Theta_xX Theta^-1 (I - exp(-lr Theta t / n)) (y - f_0(X))`` and learns the top
eigendirections of Theta first (spectral bias). Sources: Jacot et al. arXiv 1806.07572; Lee et al.
arXiv 1902.06720; Kempe et al. arXiv 2307.02693.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import Tensor

from symgen.errors import ConfigError, DivergenceError, ShapeError

__all__ = ["Kernel", "kernel_regression", "gd_dynamics", "kernel_eigh", "eigen_projections", "residual_decay"]

Kernel: TypeAlias = Callable[[Tensor, Tensor], Tensor]
"""A kernel function ``kernel(a, b) -> K (n_a, n_b)`` on batches of inputs (KIP, learning curves)."""


def _check_square(k: Tensor, name: str) -> int:
    if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[0] != k.shape[1]:
        shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise ShapeError(f"{name} must be a square (N, N) kernel matrix, got {shape}.")
    return k.shape[0]


def _targets(y: Tensor, n: int, name: str = "y_train") -> tuple[Tensor, bool]:
    if not isinstance(y, Tensor) or y.dim() not in (1, 2) or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ShapeError(f"{name} must have shape ({n},) or ({n}, O) to match the kernel, got {shape}.")
    return (y[:, None], True) if y.dim() == 1 else (y, False)


def _cross(k: Tensor, n: int, name: str = "k_test_train") -> None:
    if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[1] != n:
        shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise ShapeError(f"{name} must have shape (M, {n}) (test x train), got {shape}.")


def _cholesky(a: Tensor, max_tries: int) -> Tensor:
    """Cholesky factor of ``a``, adding escalating jitter (with a warning) if ``a`` is not numerically PD."""
    factor: Tensor
    factor, info = torch.linalg.cholesky_ex(a)
    if not bool(info.any()):
        return factor
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = float(a.detach().diagonal().abs().mean()) or 1.0
    jitter = scale * torch.finfo(a.dtype).eps * 10.0
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(a + jitter * eye)
        if not bool(info.any()):
            warnings.warn(
                f"kernel matrix is not numerically positive definite; added jitter {jitter:.3g} "
                f"({jitter / scale:.1e} of its mean diagonal). Raise `ridge` or use float64 to avoid this.",
                RuntimeWarning,
                stacklevel=3,
            )
            return factor
        jitter *= 100.0
    raise DivergenceError(
        f"kernel matrix ({a.shape[0]} x {a.shape[0]}) is not positive definite even with jitter "
        f"{jitter / 100.0:.3g} ({jitter / 100.0 / scale:.1e} of its mean diagonal). Expected a "
        "symmetric PSD kernel; raise `ridge`, compute the kernel in float64, or remove duplicate "
        "inputs."
    )


def kernel_regression(
    k_train: Tensor, y_train: Tensor, k_test_train: Tensor, ridge: float = 0.0, *, max_jitter_tries: int = 6
) -> Tensor:
    """Kernel ridge regression predictions ``K_tX (K_XX + ridge I)^-1 y``.

    Cholesky solve, differentiable in all inputs (KIP, attacks). If ``K + ridge I`` is not numerically
    positive definite, jitter ``eps * mean diag * 10 * 100^k`` is added with a RuntimeWarning.
    Source: arXiv 2011.00050 (KIP), arXiv 2307.02693.

    Args:
        k_train: K_XX (N, N).
        y_train: y, (N,) or (N, O).
        k_test_train: K_tX (M, N).
        ridge: the ridge.
        max_jitter_tries: jitter attempts before giving up.

    Returns:
        (M,) or (M, O), like ``y_train``.

    Raises:
        DivergenceError: still not positive definite after ``max_jitter_tries``, or non-finite inputs
            (never silent NaN).
    """
    n = _check_square(k_train, "k_train")
    y, squeeze = _targets(y_train, n)
    _cross(k_test_train, n)
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}.")
    for name, t in (("k_train", k_train), ("y_train", y), ("k_test_train", k_test_train)):
        if not bool(torch.isfinite(t.detach()).all()):
            raise DivergenceError(
                f"{name} contains NaN or inf; expected finite values. Check the kernel "
                "inputs (and their dtype) before regression."
            )
    a = k_train
    if ridge:
        a = a + ridge * torch.eye(n, dtype=k_train.dtype, device=k_train.device)
    factor = _cholesky(a, max_jitter_tries)
    alpha = torch.cholesky_solve(y.to(a.dtype), factor)
    out = k_test_train.to(a.dtype) @ alpha
    return out[:, 0] if squeeze else out


def kernel_eigh(k: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and orthonormal eigenvectors (columns) of a symmetric kernel matrix.

    Args:
        k: the kernel matrix (N, N), symmetrized first.

    Returns:
        ``(eigvals (N,), eigvecs (N, N))``.
    """
    _check_square(k, "k")
    evals, evecs = torch.linalg.eigh((k + k.T) / 2)
    return evals.flip(0), evecs.flip(1)


def eigen_projections(v: Tensor, eigvecs: Tensor) -> Tensor:
    """Coefficients ``U^T v`` along the kernel eigenvectors.

    Args:
        v: (N,) or (N, O).
        eigvecs: U, eigenvectors as columns.

    Returns:
        The coefficients.
    """
    if eigvecs.dim() != 2 or v.shape[0] != eigvecs.shape[0]:
        raise ShapeError(
            f"v must have leading size {eigvecs.shape[0]} (eigvecs {tuple(eigvecs.shape)}), got {tuple(v.shape)}."
        )
    return eigvecs.T.to(v.dtype) @ v


def _times(t: float | Tensor | list[float], like: Tensor) -> tuple[Tensor, bool]:
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if tt.dim() > 1:
        raise ShapeError(f"t must be a number or a 1-D sequence of times, got shape {tuple(tt.shape)}.")
    if bool((tt < 0).any()):
        raise ConfigError(f"times t must be >= 0, got {tt.tolist()}.")
    return tt.reshape(-1), tt.dim() == 0


def residual_decay(
    eigvals: Tensor, t: float | Tensor, lr: float, normalization: float, discrete: bool = False
) -> Tensor:
    """Factor by which the training residual along each eigendirection shrinks after time ``t``.

    Gradient flow: ``exp(-lr lambda t / n)``; discrete (t GD steps): ``(1 - lr lambda / n)^t``.
    Source: arXiv 1806.07572.

    Args:
        eigvals: lambda (N,).
        t: one time or T times.
        lr: the step size.
        normalization: n.
        discrete: discrete GD steps.

    Returns:
        (T, N) for T times, or (N,) for a scalar t.
    """
    tt, scalar = _times(t, eigvals)
    rate = lr * eigvals.clamp(min=0) / normalization
    if discrete:
        out = (1.0 - rate)[None, :] ** tt[:, None]
    else:
        out = torch.exp(-rate[None, :] * tt[:, None])
    return out[0] if scalar else out


def gd_dynamics(
    k_train: Tensor,
    k_test_train: Tensor | None,
    y_train: Tensor,
    t: float | Tensor | list[float],
    lr: float,
    f0: Tensor | None = None,
    f0_test: Tensor | None = None,
    *,
    normalization: float | None = None,
    discrete: bool = False,
) -> Tensor:
    """Prediction of a wide net after time ``t`` of gradient descent on MSE (linearized / kernel dynamics).

    ``f_t(x) = f0(x) + Theta_xX Theta^-1 (I - exp(-lr Theta t / n)) (y - f0(X))`` via the eigendecomposition
    of ``Theta = k_train`` (arXiv 1902.06720 eq. 9; arXiv 1806.07572). The loss is
    ``1/(2n) sum_i ||f(x_i) - y_i||^2``.

    Args:
        k_train: Theta (N, N).
        k_test_train: Theta_xX (M, N); None predicts on the training inputs.
        y_train: y, (N,) or (N, O).
        t: GD steps of size ``lr`` (continuous time), one or several.
        lr: the step size.
        f0: the net's outputs on X at initialization (None: 0, the mean over initializations).
        f0_test: likewise on the test inputs.
        normalization: n (default N, the number of training points; torch's ``MSELoss()`` equals
            ``n = N * O / 2``).
        discrete: use ``(1 - lr lambda / n)^t``, exactly discrete GD on the linearized net.

    Returns:
        (M, O) or (T, M, O) for T times (or (M,) / (T, M) for 1-D ``y_train``).
    """
    n = _check_square(k_train, "k_train")
    y, squeeze = _targets(y_train, n)
    if k_test_train is None:
        k_test_train = k_train
        if f0_test is None:
            f0_test = f0
    _cross(k_test_train, n)
    m = k_test_train.shape[0]
    if f0 is not None and f0_test is None:
        raise ShapeError(
            "f0 (outputs at init on the training inputs) was given without f0_test (outputs at init "
            f"on the test inputs, shape ({m}, {y.shape[1]})); pass both or neither."
        )
    dtype = k_train.dtype
    y = y.to(dtype)
    f0_ = torch.zeros_like(y) if f0 is None else _targets(f0, n, "f0")[0].to(dtype)
    ft_ = (
        torch.zeros(m, y.shape[1], dtype=dtype, device=y.device)
        if f0_test is None
        else _targets(f0_test, m, "f0_test")[0].to(dtype)
    )
    if f0_.shape != y.shape or ft_.shape[1] != y.shape[1]:
        raise ShapeError(
            f"f0 / f0_test must have {y.shape[1]} outputs like y_train; got {tuple(f0_.shape)}, {tuple(ft_.shape)}."
        )
    norm = float(n if normalization is None else normalization)
    evals, evecs = kernel_eigh(k_train)
    tt, scalar = _times(t, evals)
    decay = residual_decay(evals, tt, lr, norm, discrete=discrete)  # (T, N)
    # (1 - decay) / lambda, with its limit lr t / n as lambda -> 0 (no division by ~0 eigenvalues).
    small = evals.abs() <= torch.finfo(dtype).eps * evals.abs().max() * n
    safe = torch.where(small, torch.ones_like(evals), evals)
    limit = (lr * tt[:, None] / norm).expand(-1, n)  # same limit for flow and discrete steps
    gain = torch.where(small[None, :], limit, (1.0 - decay) / safe[None, :])  # (T, N)
    coef = evecs.T @ (y - f0_)  # (N, O)
    proj = k_test_train.to(dtype) @ evecs  # (M, N)
    out = ft_[None] + torch.einsum("mk,tk,ko->tmo", proj, gain, coef)
    if squeeze:
        out = out[..., 0]
    return out[0] if scalar else out
