"""Stochastic trace estimators of a symmetric operator: Hutchinson, Hutch++, Lanczos-deflated Hutchinson.

Each takes a symmetric operator (a :class:`~symgen.curvature.base.SymmetricOperator`, or anything with
the :class:`~symgen.curvature.checks.SymmetricOperator` methods) and a ``generator`` (an int seed or a
``torch.Generator``; None = seed 0). Probes are drawn on the generator's device as rows ``Z (m, n)`` and
applied as columns ``op.matmat(Z.T)``. Counts: ``num_probes`` is a number of probe vectors (Hutchinson),
``num_matvecs`` a budget of operator products (Hutch++, deflated: products spent on the low-rank part
and on probes together). A count below an estimator's minimum raises a ConfigError saying why; it is
never raised silently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symgen import rng
from symgen.curvature.checks import SymmetricOperator, as_operator, check_positive, check_vectors
from symgen.curvature.lanczos import LanczosProcess, check_process
from symgen.curvature.results import TraceEstimate
from symgen.errors import ConfigError
from symgen.rng import Seed
from symgen.stats import mean_stderr

__all__ = ["hutchinson_trace", "hutchpp_trace", "deflated_trace"]


def _rademacher_rows(op: SymmetricOperator, m: int, generator: torch.Generator) -> Tensor:
    return rng.rademacher((m, op.dim), generator, device=op.device, dtype=op.dtype)


def _quadratic_forms(op: SymmetricOperator, Z: Tensor) -> Tensor:
    """``z_i^T A z_i`` for the rows ``z_i`` of ``Z (m, n)``."""
    forms: Tensor = op.quadratic_forms(Z.T)
    return forms


def _orthonormal_rows(Y: Tensor) -> Tensor:
    """Orthonormal basis of the row space of ``Y (m, n)`` as rows."""
    Q: Tensor = torch.linalg.qr(Y.T, mode="reduced")[0]
    return Q.T.contiguous()


def _project_out(Z: Tensor, Q: Tensor) -> Tensor:
    """Rows of ``Z`` with their components along the orthonormal rows of ``Q`` removed."""
    # twice: one classical Gram-Schmidt pass loses orthogonality in floating point
    for _ in range(2):
        Z = Z - (Z @ Q.T) @ Q
    return Z


def hutchinson_trace(
    op: SymmetricOperator, num_probes: int, *, generator: Seed = None, block_size: int | None = None
) -> TraceEstimate:
    """Hutchinson's estimator with Rademacher probes: tr(A) ~ (1/m) sum_i z_i^T A z_i, SE = std/sqrt(m).

    Hutchinson 1989 (Commun. Stat. Simul. 18:1059).

    Args:
        op: the symmetric operator.
        num_probes: m, the number of probe vectors (one product each); >= 1.
        generator: seed or ``torch.Generator`` (None = seed 0).
        block_size: probes applied per ``quadratic_forms`` call (None: all at once).

    Returns:
        The :class:`TraceEstimate` (``num_matvecs`` = m).
    """
    op = as_operator(op, "hutchinson_trace")
    check_positive("num_probes", num_probes)
    gen = rng.as_generator(generator)
    block = block_size or num_probes
    check_vectors(
        op, 2 * block, f"a block of {block} probes", "pass a smaller block_size (or the operator's chunk_size)"
    )
    qs = []
    for s in range(0, num_probes, block):
        qs.append(_quadratic_forms(op, _rademacher_rows(op, min(block, num_probes - s), gen)))
    q = torch.cat(qs)
    mean, se = mean_stderr(q)
    return TraceEstimate(mean, se, num_probes, "hutchinson", 0.0, q.tolist())


def hutchpp_trace(op: SymmetricOperator, num_matvecs: int, *, generator: Seed = None) -> TraceEstimate:
    """Hutch++: tr(A) = tr(Q^T A Q) + Hutchinson on (I - QQ^T) A (I - QQ^T), Q = orth(A S).

    Meyer, Musco, Musco, Woodruff 2021 (arXiv 2010.09649).

    Args:
        op: the symmetric operator.
        num_matvecs: m, the budget of operator products, split as floor(m/3) sketch products A S,
            floor(m/3) for A Q and the rest residual probes; >= 4 (one sketch vector, its A Q product and
            two residual probes, the fewest that give a standard error).
        generator: seed or ``torch.Generator`` (None = seed 0).

    Returns:
        The :class:`TraceEstimate` (``num_matvecs`` = m, ``exact_part`` = tr(Q^T A Q)).
    """
    op = as_operator(op, "hutchpp_trace")
    check_positive(
        "num_matvecs", num_matvecs, 4, "one sketch product, one for A Q and two residual probes for a standard error"
    )
    gen = rng.as_generator(generator)
    s = num_matvecs // 3
    r = num_matvecs - 2 * s
    # the sketch S, A S, its basis Q and A Q, then the residual probes
    check_vectors(op, 4 * s + r, f"Hutch++ with {num_matvecs} products", "use fewer num_matvecs or method='hutchinson'")
    S = _rademacher_rows(op, s, gen)
    Q = _orthonormal_rows(op.matmat(S.T).T)
    exact = float((Q * op.matmat(Q.T).T).sum())
    q = _quadratic_forms(op, _project_out(_rademacher_rows(op, r, gen), Q))
    mean, se = mean_stderr(q)
    return TraceEstimate(exact + mean, se, 2 * s + r, "hutch++", exact, q.tolist())


def deflated_trace(
    op: SymmetricOperator,
    num_matvecs: int,
    *,
    deflation_steps: int | None = None,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    block_size: int = 8,
    generator: Seed = None,
    deflation: LanczosProcess | None = None,
) -> TraceEstimate:
    """Lanczos-deflated Hutchinson: tr(A) = sum_j alpha_j + Hutchinson on (I - QQ^T) A (I - QQ^T).

    Q holds j Lanczos vectors from a Gaussian start: they capture the outlying eigenvalues that
    dominate a network Hessian's trace and Hutchinson's variance, and tr(Q^T A Q) = sum of the
    Lanczos alphas costs nothing extra. The stochastic part, on fresh Rademacher probes projected off
    Q, is unbiased given Q. Fixed budget (``rtol=None``): j = ``deflation_steps`` (default half of
    ``num_matvecs``), the rest are probes. Target (``rtol``): starting from j = ``deflation_steps``
    (default 10), j doubles while a pilot block of ``block_size`` probes predicts that more than 4j
    probes are still needed (balancing deflation against probes, as Hutch++ does); then probes are
    added until stderr <= rtol |value| or ``max_matvecs`` products (discarded pilots are counted).
    Krylov-aware Hutch++: Chen & Hallman 2023 (arXiv 2205.01736); Meyer et al. 2021 (arXiv 2010.09649).

    Args:
        op: the symmetric operator.
        num_matvecs: the budget of operator products (Lanczos steps and probes together); >= 3 (one
            Lanczos step and two probes for a standard error). With ``rtol=None`` and a budget below the
            Lanczos steps + 2, a ConfigError (unless the steps span the whole space: then exact).
        deflation_steps: j, the Lanczos steps (see above).
        rtol: a relative standard error to reach instead of a fixed budget.
        max_matvecs: the cap on products with ``rtol`` (default 100 ``num_matvecs``).
        block_size: probes per block (pilot and later blocks); >= 2.
        generator: seed or ``torch.Generator`` (None = seed 0).
        deflation: a :class:`LanczosProcess` already run on ``op`` (e.g. by ``lanczos_eigenpairs(process=)``)
            whose basis is reused: its past products are free, only new ones count toward the budgets and
            ``num_matvecs`` (without ``deflation_steps`` it is used as it stands). The probes are fresh, so
            the estimate stays unbiased given Q.

    Returns:
        The :class:`TraceEstimate` (``exact_part`` = sum of the alphas; ``num_matvecs`` = this call's products).
    """
    op = as_operator(op, "deflated_trace")
    check_positive("num_matvecs", num_matvecs, 3, "one Lanczos step and two probes for a standard error")
    check_positive("block_size", block_size, 2, "two probes per block for a standard error")
    gen = rng.as_generator(generator)
    dim = op.dim
    if deflation is None:
        proc = LanczosProcess(op, rng.randn((1, dim), gen, device=op.device, dtype=op.dtype)[0], gen)
    else:
        proc = check_process(deflation, op, "deflation")
    free = proc.steps  # products spent before this call

    def probes(m: int) -> Tensor:
        return _quadratic_forms(op, _project_out(_rademacher_rows(op, m, gen), proc.Q.T))

    if rtol is None:
        j = deflation_steps if deflation_steps is not None else (num_matvecs // 2 if free == 0 else free)
        check_positive("deflation_steps", j)
        steps = max(free, min(j, dim))  # after extending: never beyond the dimension, never fewer than given
        if steps < dim and num_matvecs < steps - free + 2:
            raise ConfigError(
                f"num_matvecs = {num_matvecs} leaves fewer than two probes after {steps - free} Lanczos steps; "
                f"it must be >= {steps - free + 2} (the steps plus two probes for a standard error), or lower "
                "deflation_steps."
            )
        proc.extend(j - proc.steps)
        exact = float(proc.alphas.sum())
        if proc.steps >= dim:  # the whole space: exact
            return TraceEstimate(exact, 0.0, proc.steps - free, "lanczos-deflated", exact, [])
        r = num_matvecs - (proc.steps - free)
        q = torch.cat([probes(min(block_size, r - s)) for s in range(0, r, block_size)])
        mean, se = mean_stderr(q)
        return TraceEstimate(exact + mean, se, proc.steps - free + q.numel(), "lanczos-deflated", exact, q.tolist())

    if not rtol > 0:
        raise ConfigError(f"rtol must be > 0, got {rtol}.")
    cap = max_matvecs if max_matvecs is not None else 100 * num_matvecs
    j = deflation_steps if deflation_steps is not None else max(10, free)
    check_positive("deflation_steps", j)
    wasted = -free  # the products counted below are proc.steps + wasted: this call's only
    while True:
        proc.extend(j - proc.steps)
        exact = float(proc.alphas.sum())
        if proc.steps >= dim:
            return TraceEstimate(exact, 0.0, proc.steps + wasted, "lanczos-deflated", exact, [])
        q = probes(block_size)
        mean, se = mean_stderr(q)
        need = (float(q.std()) / (rtol * max(abs(exact + mean), 1e-300))) ** 2
        nxt = min(2 * proc.steps, dim)
        # doubling j costs j more products; it pays if it saves j probes, i.e. if it cuts the predicted
        # count by a quarter whenever need > 4 j (the residual variance falls slowly past the outliers)
        if need > 4 * proc.steps and nxt > proc.steps and wasted + nxt + 2 * block_size <= cap:
            wasted += block_size  # these probes were projected off a smaller Q
            j = nxt
            continue
        break
    qs = [q]
    while True:
        mean, se = mean_stderr(torch.cat(qs))
        used = proc.steps + wasted + sum(x.numel() for x in qs)
        if se <= rtol * abs(exact + mean) or used + block_size > cap:
            break
        qs.append(probes(block_size))
    q = torch.cat(qs)
    mean, se = mean_stderr(q)
    return TraceEstimate(exact + mean, se, proc.steps + wasted + q.numel(), "lanczos-deflated", exact, q.tolist())
