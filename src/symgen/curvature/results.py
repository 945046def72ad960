"""Result types of the curvature estimators: a trace estimate, Ritz pairs, a spectral density."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from symgen.errors import ConfigError

__all__ = ["TraceEstimate", "Eigenpairs", "SpectralDensity"]


@dataclass
class TraceEstimate:
    """A stochastic trace estimate: ``value`` +- ``stderr`` (one standard error) from ``num_matvecs`` products.

    ``exact_part`` is the deterministic part tr(Q^T A Q) of a deflated estimator (0 for plain
    Hutchinson); ``samples`` the per-probe quadratic forms of the stochastic part.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    exact_part: float = 0.0
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def relative_stderr(self) -> float:
        """stderr / |value| (inf for a zero value)."""
        return self.stderr / abs(self.value) if self.value else math.inf

    def __iter__(self) -> Iterator[float]:
        """Unpack as ``value, stderr = estimate``."""
        return iter((self.value, self.stderr))


@dataclass
class Eigenpairs:
    """Ritz pairs from Lanczos: ``values (k,)``, eigenvectors as columns ``vectors (n, k)``, error bounds, cost.

    ``error_bounds (k,)``: absolute, the bound of the stopping criterion (r_i, or the estimate min(r_i,
    r_i^2 / delta_i) with the gap delta_i from the Ritz values; see
    :func:`~symgen.curvature.lanczos.lanczos_eigenpairs`); ``residuals`` the Ritz residual norms r_i (an
    eigenvalue lies within r_i, no assumption); ``gaps`` the gap estimates delta_i; ``num_matvecs`` the
    products; ``converged``: the stopping criterion was met.
    """

    values: Tensor
    vectors: Tensor
    error_bounds: Tensor
    num_matvecs: int
    converged: bool
    residuals: Tensor | None = None
    gaps: Tensor | None = None

    @property
    def relative_error_bounds(self) -> Tensor:
        """``error_bounds / |values|`` (the quantity the stopping rule compares with ``tol``)."""
        return self.error_bounds / self.values.detach().double().cpu().abs().clamp_min(1e-300)


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: nodes and weights per run; the density is their Gaussian smoothing.

    ``rho(t) = (1/R) sum_r sum_i w_ri N(t; theta_ri, bandwidth^2)`` integrates to 1; ``dim * rho`` counts eigenvalues.
    Ubaru, Chen, Saad 2017 (SIMAX 38:1075); Ghorbani, Krishnan, Xiao 2019 (arXiv 1901.10159).
    """

    nodes: Tensor
    weights: Tensor
    dim: int
    num_matvecs: int

    def evaluate(self, grid: Tensor | Sequence[float], bandwidth: float | None = None) -> Tensor:
        """The smoothed density rho(t) = (1/R) sum_r sum_i w_ri N(t; theta_ri, bandwidth^2) on ``grid``.

        Args:
            grid: the points t.
            bandwidth: the Gaussian's standard deviation (default: 1% of the node range).

        Returns:
            rho on the grid, shape (len(grid),).
        """
        grid = torch.as_tensor(grid, dtype=self.nodes.dtype)
        if bandwidth is None:
            span = float(self.nodes.max() - self.nodes.min())
            bandwidth = 0.01 * span if span > 0 else 1.0
        if bandwidth <= 0:
            raise ConfigError(f"bandwidth must be > 0, got {bandwidth}.")
        z = (grid[:, None, None] - self.nodes[None]) / bandwidth
        kern = torch.exp(-0.5 * z**2) / (bandwidth * math.sqrt(2 * math.pi))
        return (kern * self.weights[None]).sum(dim=(1, 2)) / self.nodes.shape[0]

    def trace(self) -> float:
        """The SLQ trace estimate ``dim * mean_r sum_i w_ri theta_ri``."""
        return float(self.dim * (self.weights * self.nodes).sum(1).mean())
