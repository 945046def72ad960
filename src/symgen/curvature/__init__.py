"""Curvature of a loss as symmetric linear operators, and estimators that take any such operator.

Operators (:mod:`~symgen.curvature.base`): :class:`CurvatureOperator` (shape, dtype, device,
``matvec``/``matmat`` over columns, ``to_scipy()``), :class:`MatrixOperator` for a dense matrix,
:class:`HessianOperator` and :class:`GGNOperator` (generalized Gauss-Newton) of a network's loss.
Estimators: the trace (Hutchinson, Hutch++, Lanczos-deflated Hutchinson), extreme eigenpairs
(Lanczos with full reorthogonalization) and the spectral density (stochastic Lanczos quadrature).
"""

from symgen.curvature.base import CurvatureOperator, MatrixOperator
from symgen.curvature.ggn import GGNOperator
from symgen.curvature.hessian import HessianOperator
from symgen.curvature.lanczos import LanczosProcess, lanczos, lanczos_eigenpairs, slq_density
from symgen.curvature.model import ModelOperator
from symgen.curvature.results import Eigenpairs, SpectralDensity, TraceEstimate
from symgen.curvature.trace import deflated_trace, hutchinson_trace, hutchpp_trace

__all__ = [
    "CurvatureOperator",
    "MatrixOperator",
    "ModelOperator",
    "HessianOperator",
    "GGNOperator",
    "TraceEstimate",
    "Eigenpairs",
    "SpectralDensity",
    "hutchinson_trace",
    "hutchpp_trace",
    "deflated_trace",
    "LanczosProcess",
    "lanczos",
    "lanczos_eigenpairs",
    "slq_density",
]
