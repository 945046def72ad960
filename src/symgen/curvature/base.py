"""Symmetric linear operators for curvature: the base class and a dense-matrix operator (the
model-based layer shared by the Hessian and the GGN is :mod:`symgen.curvature.model`).

Vectors are columns, as in SciPy and curvlinops: ``op.matvec(v)`` with ``v (n,)`` and
``op.matmat(V)`` with ``V (n, k)``; ``op.to_scipy()`` is a ``scipy.sparse.linalg.LinearOperator``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from symgen import memory, rng
from symgen.curvature.checks import as_operator, check_positive
from symgen.curvature.lanczos import lanczos_eigenpairs, slq_density
from symgen.curvature.results import Eigenpairs, SpectralDensity, TraceEstimate
from symgen.curvature.trace import deflated_trace, hutchinson_trace, hutchpp_trace
from symgen.errors import ConfigError, ShapeError
from symgen.numerics import check_values
from symgen.rng import Seed

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

__all__ = ["CurvatureOperator", "MatrixOperator", "as_operator"]


def _renamed(deprecated: dict[str, Any], old: str, new: str, value: int, caller: str) -> int:
    """``value``, or the value passed under the deprecated keyword ``old`` (with a DeprecationWarning)."""
    if not deprecated:
        return value
    unknown = set(deprecated) - {old}
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {sorted(unknown)}.")
    warnings.warn(
        f"{caller}({old}=...) is deprecated: the count is of operator products, `{new}`.",
        DeprecationWarning,
        stacklevel=3,
    )
    return int(deprecated[old])


class CurvatureOperator:
    """A symmetric ``n x n`` linear operator known through its products, like curvlinops' operators.

    Subclasses implement ``_matvec(v)`` (``v (n,)`` already in the operator's dtype and device) and
    may override ``_matmat(V)`` (columns ``V (n, k)``, ``k >= 1``) with a batched product. The
    public ``matvec``/``matmat`` check shapes, convert and count ``num_matvecs``. ``chunk_size``:
    how many probe vectors the estimators pass per ``matmat`` (None: all at once).
    """

    chunk_size: int | None = None

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self.dim, self.dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    # -- products --

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _matvec(v).")

    def _matmat(self, V: Tensor) -> Tensor:
        # the products are stacked as rows and returned transposed: estimators that pass V = Z.T for
        # probe rows Z get back exactly the rows they would have computed one by one
        return torch.stack([self._matvec(v.contiguous()) for v in V.T]).T

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v (n,)`` (counted in ``num_matvecs``).

        Args:
            v: the vector, shape (n,); converted to the operator's dtype and device.

        Returns:
            ``A v``, shape (n,).
        """
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeError(f"matvec expects a flat vector of shape ({self.dim},), got {got}.")
        v = v.to(dtype=self.dtype, device=self.device)
        check_values(f"{type(self).__name__}.matvec", "the vector v", v, "pass a finite vector")
        self.num_matvecs += 1
        return self._checked(self._matvec(v), "matvec")

    def _column_bytes(self) -> int:
        """Bytes held per column of a product (the columns in and the products out; subclasses add their own)."""
        return 2 * self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def _checked(self, out: Tensor, caller: str) -> Tensor:
        """``out`` after one ``isfinite`` check: a DivergenceError naming the operator when it is not finite."""
        check_values(
            f"{type(self).__name__}.{caller}", "the products", out, "check the operator's matrix or model for overflow"
        )
        return out

    def _columns(self, V: Tensor, caller: str, hint: str = ".") -> Tensor:
        """``V (n, k)`` in the operator's dtype and device, or a ShapeError naming ``caller``; the working set
        of k columns checked against the memory limit, and the columns against NaN and inf."""
        if not isinstance(V, Tensor) or V.ndim != 2 or V.shape[0] != self.dim:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ShapeError(f"{caller} expects columns V of shape ({self.dim}, k), got {got}{hint}")
        memory.check_fits(
            V.shape[1] * self._column_bytes(),
            f"{type(self).__name__}.{caller} of {V.shape[1]} columns of dimension {self.dim}",
            f"pass fewer columns at a time (op.{caller}(V[:, i:j])) or set chunk_size",
            device=self.device,
        )
        V = V.to(dtype=self.dtype, device=self.device)
        check_values(f"{type(self).__name__}.{caller}", "the columns V", V, "pass finite vectors")
        return V

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for columns ``V (n, k)``: A applied to each column (k products counted).

        Args:
            V: the columns, shape (n, k) (for rows R use ``op.matmat(R.T).T``).

        Returns:
            ``A V``, shape (n, k).
        """
        V = self._columns(V, "matmat", "; vectors are columns (for rows R use op.matmat(R.T).T).")
        if V.shape[1] == 0:
            return V.clone()
        self.num_matvecs += V.shape[1]
        return self._checked(self._matmat(V), "matmat")

    def _quadratic_forms(self, V: Tensor) -> Tensor:
        return (V * self._matmat(V)).sum(0)

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """``v_i^T A v_i`` for the columns ``v_i`` of ``V (n, k)``: what Hutchinson-type trace estimators need.

        k products are counted; a Hessian takes them without products where it can (Taylor mode).

        Args:
            V: the columns, shape (n, k).

        Returns:
            The forms, shape (k,).
        """
        V = self._columns(V, "quadratic_forms")
        if V.shape[1] == 0:
            return V.new_zeros(0)
        self.num_matvecs += V.shape[1]
        return self._checked(self._quadratic_forms(V), "quadratic_forms")

    def __matmul__(self, V: Tensor) -> Tensor:
        """``A @ v`` for ``v (n,)`` or ``A @ V`` for columns ``V (n, k)``."""
        if isinstance(V, Tensor) and V.ndim == 1:
            return self.matvec(V)
        return self.matmat(V)

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out), e.g. for ``eigsh``."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).detach().to(device="cpu", dtype=torch.float64).numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
            return self.matmat(V).detach().to(device="cpu", dtype=torch.float64).numpy()

        # symmetric: the adjoint products are the products
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm, dtype=np.float64)

    # -- estimates (see symgen.curvature.trace and symgen.curvature.lanczos) --

    def trace(
        self,
        num_matvecs: int = 100,
        generator: Seed = None,
        *,
        method: str = "hutchinson",
        deflation_steps: int | None = None,
        rtol: float | None = None,
        max_matvecs: int | None = None,
        **deprecated: Any,
    ) -> TraceEstimate:
        """tr(A) with its standard error from ``num_matvecs`` operator products.

        Hutchinson: tr(A) ~ (1/m) sum_i z_i^T A z_i over m = ``num_matvecs`` Rademacher probes (one product
        each); "hutch++" (arXiv 2010.09649) and "deflated" (Lanczos-deflated Hutchinson, arXiv 2205.01736: far
        lower variance on network Hessians, whose trace is dominated by a few outliers) spend the same budget
        on a low-rank part and probes (:func:`~symgen.curvature.trace.hutchpp_trace`,
        :func:`~symgen.curvature.trace.deflated_trace`). A budget below a method's minimum raises a
        ConfigError (it is never raised silently).

        Args:
            num_matvecs: operator products to spend (Hutchinson: the number of probes; >= 1, hutch++ >= 4,
                deflated >= 3). The old keyword ``num_probes`` still works, with a DeprecationWarning.
            generator: seed or ``torch.Generator`` (None = seed 0).
            method: "hutchinson", "hutch++" or "deflated".
            deflation_steps: Lanczos steps of the deflated estimator (default: half the budget).
            rtol: deflated only: add probes until stderr <= rtol |trace|, at most ``max_matvecs`` products.
            max_matvecs: the cap on products with ``rtol`` (default 100 ``num_matvecs``).
            **deprecated: ``num_probes`` (the old name of ``num_matvecs``).

        Returns:
            The :class:`TraceEstimate` (value, stderr, products used).
        """
        num_matvecs = _renamed(deprecated, "num_probes", "num_matvecs", num_matvecs, "CurvatureOperator.trace")
        check_positive("num_matvecs", num_matvecs)
        if method == "hutchinson":
            return hutchinson_trace(self, num_matvecs, generator=generator, block_size=self.chunk_size)
        if method == "hutch++":
            return hutchpp_trace(self, num_matvecs, generator=generator)
        if method == "deflated":
            return deflated_trace(
                self,
                num_matvecs,
                deflation_steps=deflation_steps,
                rtol=rtol,
                max_matvecs=max_matvecs,
                generator=generator,
            )
        raise ConfigError(f"method must be 'hutchinson', 'hutch++' or 'deflated', got '{method}'.")

    def eigenpairs(
        self,
        k: int = 1,
        which: str = "largest",
        *,
        tol: float = 1e-4,
        max_steps: int | None = None,
        generator: Seed = None,
        criterion: str = "residual",
        start: str | Tensor = "auto",
    ) -> Eigenpairs:
        """The k largest or smallest eigenpairs (vectors as columns) by Lanczos (:func:`lanczos_eigenpairs`).

        The start vector (``start="auto"``): for the largest eigenpairs of an operator that knows a direction
        its top eigenvectors lean towards (a model's loss gradient, :meth:`start_direction`), the sum of that
        direction and a Gaussian vector, each normalized; otherwise Gaussian. The loss gradient lies largely
        in the top Hessian eigenspace (Gur-Ari, Roberts, Dyer, arXiv 1812.04754): measured cos(g, v1) = 0.92
        on the trained 86k BN CNN and 0.42 on a ResNet-20 at initialization (benchmarks/eigenvalues.py), and
        Lanczos to 1e-3 then needs 5 products instead of 7-9 and 8 instead of 9. The Gaussian half keeps every
        eigenvector's component nonzero (with probability 1), so no eigenvalue is missed by construction,
        and a gradient orthogonal to v1 costs at most the sqrt(2) shrinking of v1's component.

        Args:
            k: how many eigenpairs.
            which: "largest" or "smallest".
            tol: relative tolerance: stops as soon as every requested Ritz value theta_i has r_i <= tol
                |theta_i| ("residual") or min(r_i, r_i^2 / delta_i) <= tol |theta_i| ("gap", an estimate;
                see :func:`lanczos_eigenpairs`).
            max_steps: the most Lanczos steps (products); default max(4k + 40, 100).
            generator: seed or ``torch.Generator`` of the start vector (None = seed 0).
            criterion: "residual" (default), "gap" or "change" (see :func:`lanczos_eigenpairs`).
            start: "auto" (above), "random" (Gaussian) or a start vector (n,).

        Returns:
            :class:`Eigenpairs`: values (k,), vectors as columns (n, k), ``error_bounds`` (absolute),
            ``residuals``, ``gaps``, ``num_matvecs`` (products used), ``converged``.
        """
        gen = rng.as_generator(generator)
        x0: Tensor | None = None
        if isinstance(start, Tensor):
            x0 = start
        elif start not in ("auto", "random"):
            raise ConfigError(f"start must be 'auto', 'random' or a vector of {self.dim} entries, got {start!r}.")
        elif start == "auto" and which == "largest":
            d = self.start_direction()
            if d is not None:
                d = d.reshape(-1).to(dtype=self.dtype, device=self.device)
                u = rng.randn((1, self.dim), gen, device=self.device, dtype=self.dtype)[0]
                norm = float(d.norm())
                if math.isfinite(norm) and norm > 0:
                    x0 = u / u.norm() + d / norm
                else:
                    x0 = u
        return lanczos_eigenpairs(
            self, k, which, tol=tol, max_steps=max_steps, generator=gen, criterion=criterion, start=x0
        )

    def start_direction(self) -> Tensor | None:
        """A direction the top eigenvectors lean towards, for the Lanczos start of :meth:`eigenpairs`, or None
        (this base class: none). :class:`~symgen.curvature.model.ModelOperator` returns the loss gradient.

        Returns:
            A vector (n,) or None.
        """
        return None

    def eigenvalues(
        self,
        k: int = 1,
        which: str = "largest",
        *,
        tol: float = 1e-4,
        max_steps: int | None = None,
        generator: Seed = None,
    ) -> Tensor:
        """The k largest (descending) or smallest (ascending) eigenvalues, Lanczos to ``tol`` relative.

        Stops as soon as each Ritz residual r_i <= tol |theta_i|; the bounds and the number of products
        come with :meth:`eigenpairs`.

        Args:
            k: how many eigenvalues.
            which: "largest" or "smallest".
            tol: relative tolerance of the error bound (see :func:`lanczos_eigenpairs`).
            max_steps: the most Lanczos steps (products).
            generator: seed or ``torch.Generator`` of the start vector (None = seed 0).

        Returns:
            The eigenvalues, shape (k,).
        """
        return self.eigenpairs(k, which, tol=tol, max_steps=max_steps, generator=generator).values

    def density(self, num_steps: int = 80, num_runs: int = 1, generator: Seed = None) -> SpectralDensity:
        """The eigenvalue density by stochastic Lanczos quadrature (``num_runs`` x ``num_steps`` products).

        Ubaru, Chen, Saad 2017 (SIMAX 38:1075); Ghorbani et al. arXiv 1901.10159.

        Args:
            num_steps: Lanczos steps per run.
            num_runs: independent runs (random start vectors).
            generator: seed or ``torch.Generator`` (None = seed 0).

        Returns:
            The :class:`SpectralDensity` (nodes and weights per run).
        """
        return slq_density(self, num_steps, num_runs, generator=generator)

    def dense(self, max_dim: int = 5000) -> Tensor:
        """The full matrix (n, n), from n products, symmetrized: for tiny operators and validation only.

        Args:
            max_dim: refuse (ConfigError) above this dimension.

        Returns:
            0.5 (A + A^T) with A = op.matmat(I), shape (n, n).
        """
        if self.dim > max_dim:
            raise ConfigError(
                f"dense() builds an n x n matrix; n = {self.dim} > max_dim = {max_dim}. "
                "Use trace()/eigenvalues() or raise max_dim if you have the memory."
            )
        memory.check_fits(
            self.dim * (self.dim * torch.empty(0, dtype=self.dtype).element_size() * 2 + self._column_bytes()),
            f"{type(self).__name__}.dense() ({self.dim} x {self.dim}, {self.dtype})",
            "use trace()/eigenvalues()/density() or products on fewer columns",
            device=self.device,
        )
        A = self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))
        return 0.5 * (A + A.T)


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix ``A (n, n)`` as a :class:`CurvatureOperator` (tests, or a matrix you already have)."""

    def __init__(self, A: Tensor, *, chunk_size: int | None = None) -> None:
        if not isinstance(A, Tensor) or A.ndim != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
            got = f"shape {tuple(A.shape)}, dtype {A.dtype}" if isinstance(A, Tensor) else type(A).__name__
            raise ShapeError(f"MatrixOperator needs a square floating-point matrix (n, n); got {got}.")
        if not torch.isfinite(A).all():
            raise ShapeError("MatrixOperator: the matrix has NaN or inf entries.")
        scale = float(A.abs().max()) if A.numel() else 0.0
        if float((A - A.T).abs().max() if A.numel() else 0.0) > 100 * torch.finfo(A.dtype).eps * max(scale, 1e-30):
            raise ShapeError(
                "MatrixOperator needs a symmetric matrix (the estimators assume A = A^T); "
                "pass 0.5 * (A + A.T) if the asymmetry is rounding."
            )
        super().__init__(A.shape[0], A.dtype, A.device)
        self.matrix = A
        self.chunk_size = chunk_size

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V
