"""Learning curves of kernel ridge(less) regression: test error against training-set size P, and the exponent
beta of ``error ~ P^-beta`` with its confidence interval.

Each draw is an independent replicate (a fresh random split of the data, or fresh data and teacher from a
sampler), so the per-draw exponents are independent and their spread gives the interval. Sources: Spigler,
Geiger & Wyart arXiv 1905.10843; Favero, Cagnetta & Wyart arXiv 2106.08619; Kempe et al. arXiv 2307.02693.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from symgen.errors import ConfigError, ShapeError
from symgen.ntk.regression import Kernel, kernel_regression
from symgen.rng import Seed, as_generator
from symgen.stats import mean_stderr
from symgen.streaming import is_tensor_pair

__all__ = ["LearningCurve", "learning_curve", "fit_power_law"]

Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class LearningCurve:
    """Test errors ``errors[draw, i]`` at ``sizes[i]`` and the fitted power law ``error ~ A P^-beta``.

    ``beta`` is the least-squares slope of ``-log error`` against ``log P`` on the mean over draws of
    ``log error``, which equals the mean of the per-draw slopes ``betas``; ``beta_ci`` is its
    Student-t interval at ``confidence`` from their spread (nan with one draw).
    """

    sizes: list[int]
    errors: list[list[float]]
    beta: float
    beta_stderr: float
    beta_ci: tuple[float, float]
    betas: list[float]
    log_amplitude: float
    confidence: float
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
) -> LearningCurve:
    """Test mean squared error of kernel ridge(less) regression for each training-set size P in ``sizes``.

    ``kernel(x1, x2) -> (N1, N2)``, e.g. ``lambda a, b: analytic_conv_ntk(a, b, ...)[1]``. ``data``: a pool
    ``(x, y)`` (each draw shuffles it: ``num_test`` test points, the training sets are the first P of the
    rest, nested within the draw) or a sampler ``sample(num_data, generator) -> (x, y)`` called once per
    draw with ``num_data = max(sizes) + num_test`` (fresh data and teacher per draw, as in teacher-student
    studies). The kernel is evaluated once per draw. Error: ``mean_i ||f(x_i) - y_i||^2`` over the test
    points. ``generator``: seed or ``torch.Generator`` (None = seed 0) for the splits and the sampler.
    """
    sizes = sorted({int(p) for p in sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"sizes must hold at least two training-set sizes >= 1, got {list(sizes)}.")
    if num_test < 1 or num_draws < 1:
        raise ConfigError(f"num_test and num_draws must be >= 1, got {num_test} and {num_draws}.")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}.")
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
        k_pool = kernel(x_pool, x_pool).to(dtype)
        k_test = kernel(x_test, x_pool).to(dtype)
        row = []
        for p in sizes:
            pred = kernel_regression(k_pool[:p, :p], y_pool[:p], k_test[:, :p], ridge)
            diff = (pred - y_test).reshape(num_test, -1)
            row.append(float((diff * diff).sum(1).mean()))
        errors.append(row)
    beta, se, ci, betas, amp = fit_power_law(sizes, errors, confidence)
    return LearningCurve(
        sizes=sizes,
        errors=errors,
        beta=beta,
        beta_stderr=se,
        beta_ci=ci,
        betas=betas,
        log_amplitude=amp,
        confidence=confidence,
    )
