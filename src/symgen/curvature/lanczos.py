"""Lanczos with full reorthogonalization on a symmetric operator: the process, extreme eigenpairs,
and the spectral density by stochastic Lanczos quadrature.

Each function takes a symmetric operator (:class:`~symgen.curvature.checks.SymmetricOperator`, e.g. a
:class:`~symgen.curvature.base.CurvatureOperator`) and a ``generator`` (an
int seed or a ``torch.Generator``; None = seed 0). Bases and eigenvectors are columns ``(n, j)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from symgen import rng
from symgen.curvature.checks import SymmetricOperator, as_operator, check_positive, check_vectors
from symgen.curvature.results import Eigenpairs, SpectralDensity
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.rng import Seed

__all__ = ["LanczosProcess", "lanczos", "lanczos_eigenpairs", "slq_density"]


class LanczosProcess:
    """An extendable Lanczos tridiagonalization with full reorthogonalization: Q^T A Q = T.

    ``extend(m)`` runs m more steps; ``alphas``, ``betas`` (the last one is the residual norm of the
    current step) and the orthonormal columns ``Q (n, steps)`` grow. On breakdown (an invariant
    subspace) the next vector is a fresh random one orthogonal to Q, with beta = 0. Lanczos 1950; full
    reorthogonalization as in Golub & Van Loan, sec. 10.3 (twice: "twice is enough", Parlett).
    """

    def __init__(self, op: SymmetricOperator, start: Tensor, generator: Seed = None) -> None:
        self.op = as_operator(op, "LanczosProcess")
        if not isinstance(start, Tensor) or start.numel() != self.op.dim:
            got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
            raise ShapeError(
                f"Lanczos start vector must have {self.op.dim} entries (the operator's dimension), got {got}."
            )
        self.generator = rng.as_generator(generator)
        self.start = start.reshape(-1).to(dtype=self.op.dtype, device=self.op.device)
        self.dim = self.start.numel()
        # the basis is stored as rows (steps, n): each new vector is one contiguous row
        self._Q: Tensor | None = torch.zeros(0, self.dim, dtype=self.start.dtype, device=self.start.device)
        self._alphas: list[Tensor] = []
        self._betas: list[Tensor] = []
        self._next = self.start / self.start.norm()
        self._scale = 0.0

    @property
    def steps(self) -> int:
        """The number of steps taken (= products)."""
        return len(self._alphas)

    @property
    def _rows(self) -> Tensor:
        if self._Q is None:
            raise ConfigError("this LanczosProcess released its basis (release_basis()); Q is gone.")
        return self._Q[: self.steps]

    @property
    def Q(self) -> Tensor:
        """The orthonormal Lanczos basis as columns ``(n, steps)``."""
        return self._rows.T

    @property
    def alphas(self) -> Tensor:
        """The diagonal of T, shape (steps,)."""
        return torch.stack(self._alphas)

    @property
    def betas(self) -> Tensor:
        """The off-diagonal of T (length steps - 1)."""
        return torch.stack(self._betas[:-1]) if self.steps > 1 else self.start.new_zeros(0)

    def _orthogonalize(self, w: Tensor) -> Tensor:
        Q = self._rows
        w = w - Q.T @ (Q @ w)
        return w - Q.T @ (Q @ w)

    def release_basis(self) -> None:
        """Free the basis Q (steps x n floats), keeping T (``alphas``, ``betas``): enough for a density's
        first run; ``Q`` and ``extend`` then raise."""
        self._Q = None

    def extend(self, num_steps: int, callback: Callable[[LanczosProcess], bool] | None = None) -> None:
        """Run up to ``num_steps`` more steps (never beyond the dimension), one product each.

        Args:
            num_steps: how many more steps.
            callback: ``callback(self) -> bool``, called after each step; True stops early.
        """
        end = self.steps + max(0, min(num_steps, self.dim - self.steps))
        if end > self.steps and self._Q is None:
            raise ConfigError("this LanczosProcess released its basis (release_basis()); it cannot take more steps.")
        if end > self.steps and (self._Q is None or end > self._Q.shape[0]):
            # the basis of `end` rows and a few work vectors, sized before the first product
            check_vectors(
                self.op,
                end + 4,
                f"a Lanczos basis of {end} steps",
                "ask for fewer steps (max_steps / num_steps) or fewer eigenpairs",
            )
        for _ in range(end - self.steps):
            j = self.steps
            if j > 0:
                beta = self._betas[-1]
                if float(beta) <= 1e-10 * max(self._scale, 1e-30):
                    # invariant subspace found: restart in the orthogonal complement
                    self._betas[-1] = torch.zeros_like(beta)
                    r = rng.randn((1, self.dim), self.generator, device=self.start.device, dtype=self.start.dtype)
                    w = self._orthogonalize(r[0])
                    self._next = w / w.norm()
            basis = self._Q
            assert basis is not None  # checked above
            if basis.shape[0] <= j:  # grow storage geometrically, never past the steps asked for
                grow = torch.zeros(min(max(8, j), end - j), self.dim, dtype=basis.dtype, device=basis.device)
                basis = self._Q = torch.cat([basis, grow])
            q = self._next
            basis[j] = q
            w = self.op.matvec(q)
            if not torch.isfinite(w).all():  # an operator without its own check (models name the place)
                raise DivergenceError(
                    f"Lanczos step {j}: the operator returned non-finite values; "
                    "check the loss and parameters for NaN/inf."
                )
            alpha = torch.dot(w, q)
            self._alphas.append(alpha)
            w = self._orthogonalize(w)
            beta = w.norm()
            self._scale = max(self._scale, float(alpha.abs()), float(beta))
            self._betas.append(beta)
            self._next = w / beta if float(beta) > 0 else w
            if callback is not None and callback(self):
                break


def check_process(process: Any, op: SymmetricOperator, name: str) -> LanczosProcess:
    """``process`` itself if it is a :class:`LanczosProcess` on ``op``; otherwise a ConfigError naming ``name``.

    Args:
        process: the object passed.
        op: the operator it must run on.
        name: the argument's name, for the message.

    Returns:
        ``process``.
    """
    if not isinstance(process, LanczosProcess) or process.op is not op:
        raise ConfigError(f"{name} must be a LanczosProcess on the same operator (LanczosProcess(op, start)).")
    return process


def lanczos(
    op: SymmetricOperator,
    start: Tensor,
    num_steps: int,
    *,
    generator: Seed = None,
    callback: Callable[[int, Tensor, Tensor], bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos tridiagonalization with full reorthogonalization (see :class:`LanczosProcess`): T = Q^T A Q.

    Lanczos 1950; Golub & Van Loan sec. 10.3.

    Args:
        op: the symmetric operator.
        start: the start vector (n entries).
        num_steps: j, the steps (= products); >= 1.
        generator: seed or ``torch.Generator`` for restarts after a breakdown (None = seed 0).
        callback: ``callback(j, alphas, betas_including_last) -> bool``; True stops early.

    Returns:
        ``(alphas (j,), betas (j-1,), Q (n, j))`` with orthonormal columns, so T = Q^T A Q up to rounding.
    """
    check_positive("num_steps", num_steps)
    proc = LanczosProcess(op, start, generator)
    cb = None
    if callback is not None:

        def cb(p: LanczosProcess) -> bool:
            return callback(p.steps, p.alphas, torch.stack(p._betas))

    proc.extend(num_steps, cb)
    return proc.alphas, proc.betas, proc.Q


def _tridiag(a: Tensor, b: Tensor) -> Tensor:
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def _ritz(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    # eigh of the small tridiagonal in float64 for stable Ritz values
    T = _tridiag(a.double().cpu(), b.double().cpu())
    vals, vecs = torch.linalg.eigh(T)
    return vals, vecs


def lanczos_eigenpairs(
    op: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-4,
    max_steps: int | None = None,
    generator: Seed = None,
    start: Tensor | None = None,
    criterion: str = "residual",
    process: LanczosProcess | None = None,
) -> Eigenpairs:
    """The k largest (or smallest) eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Stops when every wanted Ritz value theta_i passes ``criterion`` at relative tolerance ``tol``:
    "residual": r_i = ||A y_i - theta_i y_i|| = beta_j |s_ji| <= tol |theta_i| (an eigenvalue lies
    within r_i of theta_i; Parlett, The Symmetric Eigenvalue Problem, ch. 11; ARPACK's test);
    "gap": min(r_i, r_i^2 / gap_i) <= tol |theta_i|, gap_i to the nearest other Ritz value (an
    estimate: the Ritz gap can exceed the true gap); "change": theta_i moved by <= tol |theta_i| in
    the last step (a heuristic, PyHessian's test for power iteration). Single-vector Lanczos finds each
    distinct eigenvalue once: a multiple eigenvalue is reported once (its multiplicity is not resolved).

    Args:
        op: the symmetric operator.
        k: how many eigenpairs.
        which: "largest" or "smallest".
        tol: the relative tolerance.
        max_steps: the most Lanczos steps (default max(4k + 40, 100), at most n).
        generator: seed or ``torch.Generator`` of the start vector (None = seed 0).
        start: the start vector (default Gaussian); ignored with ``process``.
        criterion: "residual", "gap" or "change".
        process: a :class:`LanczosProcess` on ``op`` to continue (its steps count toward ``max_steps``)
            and leave extended, so its basis can serve a later estimate (``deflated_trace(deflation=)``,
            ``slq_density(first=)``).

    Returns:
        :class:`Eigenpairs`: values (k,), vectors as columns (n, k), ``error_bounds`` (the residuals r_i),
        ``num_matvecs`` (this call's products), ``converged``.
    """
    op = as_operator(op, "lanczos_eigenpairs")
    dim = op.dim
    check_positive("k", k)
    if which not in ("largest", "smallest"):
        raise ConfigError(f"which must be 'largest' or 'smallest', got '{which}'.")
    if k > dim:
        raise ConfigError(f"k = {k} eigenvalues requested but the operator has dimension {dim}.")
    if tol <= 0:
        raise ConfigError(f"tol must be > 0, got {tol}.")
    if criterion not in ("residual", "gap", "change"):
        raise ConfigError(f"criterion must be 'residual', 'gap' or 'change', got '{criterion}'.")
    gen = rng.as_generator(generator)
    steps = min(dim, max_steps if max_steps is not None else max(4 * k + 40, 100))
    if process is None:
        x0 = start if start is not None else rng.randn((1, dim), gen, device=op.device, dtype=op.dtype)[0]
        process = LanczosProcess(op, x0, gen)
    else:
        check_process(process, op, "process")
    state: dict[str, Any] = {"done": False}

    def wanted(vals: Tensor) -> Tensor:
        idx = torch.arange(vals.numel())
        return idx[-k:].flip(0) if which == "largest" else idx[:k]

    def callback(j: int, a: Tensor, b_all: Tensor) -> bool:
        if j < k:
            return False
        vals, vecs = _ritz(a, b_all[: j - 1])
        res = b_all[j - 1].double().cpu().abs() * vecs[-1].abs()
        w = wanted(vals)
        if criterion == "residual":
            err = res[w]
        elif criterion == "gap":
            d = (vals[:, None] - vals[None, :]).abs() + torch.diag(torch.full_like(vals, math.inf))
            err = torch.minimum(res, res**2 / d.min(1).values.clamp_min(1e-300))[w] if j > 1 else res[w]
        else:
            prev = state.get("prev")
            err = (vals[w] - prev).abs() if prev is not None else torch.full((k,), math.inf, dtype=vals.dtype)
            state["prev"] = vals[w]
        state["err"] = res[w]
        done = bool((err <= tol * vals[w].abs().clamp_min(1e-30)).all()) or j == dim
        state["done"] = done
        return done

    def cb(p: LanczosProcess) -> bool:
        return callback(p.steps, p.alphas, torch.stack(p._betas))

    done_before, before = process.steps > 0 and cb(process), process.steps
    if not done_before:
        process.extend(steps - process.steps, cb)
    a, b, Q = process.alphas, process.betas, process.Q
    vals, vecs = _ritz(a, b)
    w = wanted(vals)
    S = vecs[:, w].to(dtype=Q.dtype, device=Q.device)
    err = state.get("err", torch.full((k,), math.nan, dtype=torch.float64))
    return Eigenpairs(
        vals[w].to(dtype=op.dtype, device=Q.device), Q @ S, err, process.steps - before, bool(state["done"])
    )


def slq_density(
    op: SymmetricOperator,
    num_steps: int = 80,
    num_runs: int = 1,
    *,
    generator: Seed = None,
    first: LanczosProcess | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: sum_i w_i f(theta_i) ~ tr f(A) / n per run.

    Per run, Lanczos from a normalized Rademacher vector; nodes = Ritz values theta_i, weights = (first
    component of the Ritz vector)^2. Ubaru, Chen, Saad 2017 (SIMAX 38:1075); Ghorbani et al. arXiv 1901.10159.

    Args:
        op: the symmetric operator.
        num_steps: Lanczos steps per run.
        num_runs: independent runs (random start vectors).
        generator: seed or ``torch.Generator`` (None = seed 0).
        first: a :class:`LanczosProcess` on ``op`` from a random start (Rademacher or Gaussian, both
            isotropic after normalization) that serves as the first run: its first ``num_steps`` steps
            (extended if fewer).

    Returns:
        :class:`SpectralDensity` (``num_matvecs`` counts only this call's products).
    """
    op = as_operator(op, "slq_density")
    check_positive("num_steps", num_steps)
    check_positive("num_runs", num_runs)
    if first is not None:
        check_process(first, op, "first")
    gen = rng.as_generator(generator)
    # one run's basis at a time (each run's is freed before the next): sized before the first product
    check_vectors(op, min(num_steps, op.dim) + 4, f"a Lanczos basis of {num_steps} steps", "use fewer num_steps")
    nodes, weights, used = [], [], 0
    for run in range(num_runs):
        if run == 0 and first is not None:
            before = first.steps
            first.extend(num_steps - first.steps)
            used += first.steps - before
            m = min(num_steps, first.steps)
            a, b = first.alphas[:m], first.betas[: m - 1]
        else:
            v = rng.rademacher((1, op.dim), gen, device=op.device, dtype=op.dtype)[0]
            a, b, _ = lanczos(op, v, num_steps, generator=gen)
            used += a.numel()
        vals, vecs = _ritz(a, b)
        nodes.append(vals)
        weights.append(vecs[0] ** 2)
    m = min(x.numel() for x in nodes)
    return SpectralDensity(torch.stack([x[-m:] for x in nodes]), torch.stack([w[-m:] for w in weights]), op.dim, used)
