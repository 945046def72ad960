"""The curvature section's estimators in blocks, the clock checked between them: Lanczos steps, probe
blocks, SLQ runs, noise draws. A block-wise estimate equals the one-call estimate on the same draws (one
generator shared by the blocks); past the deadline it stops with the blocks it has and says so. Also the
density's positive and negative parts and the explanation of an indefinite Hessian's trace."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.audit.registry import Clock
from symgen.audit.sections.common import stream
from symgen.stats import mean_stderr

if TYPE_CHECKING:
    from symgen.audit.limits import AuditLimits
    from symgen.audit.result import SectionResult
    from symgen.curvature.lanczos import LanczosProcess
    from symgen.curvature.results import Eigenpairs, SpectralDensity, TraceEstimate
    from symgen.metrics.stability import NoiseStability

__all__ = [
    "timed_eigenpairs",
    "timed_trace",
    "timed_density",
    "timed_noise",
    "ggn_values",
    "spectrum_parts",
    "explain_indefinite",
    "blocks",
]

LANCZOS_BLOCK = 5  # Lanczos steps between two looks at the clock
PROBE_BLOCK = 4  # probes between two looks at the clock
NOISE_BLOCK = 8  # noise draws between two looks at the clock (the vmap chunk)


def blocks(total: int, size: int, least: int) -> list[int]:
    """``total`` split into blocks of ``size``, the last one merged into its neighbour when below ``least``.

    Args:
        total: the count to split.
        size: the block size.
        least: the smallest block an estimator accepts.

    Returns:
        The block sizes (summing to ``total``).
    """
    out: list[int] = []
    left = total
    while left > 0:
        take = left if left < size + least else size
        out.append(take)
        left -= take
    return out


def timed_eigenpairs(op: Any, k: int, max_steps: int, proc: LanczosProcess, clock: Clock) -> Eigenpairs:
    """The top ``k`` eigenpairs by Lanczos on ``proc``, :data:`LANCZOS_BLOCK` steps between looks at the clock.

    Args:
        op: the operator.
        k: how many eigenpairs.
        max_steps: the most Lanczos steps.
        proc: the Lanczos process (extended in place).
        clock: the section's deadline.

    Returns:
        The eigenpairs (``converged`` False when stopped early).
    """
    from symgen.curvature.lanczos import lanczos_eigenpairs

    cap = min(max_steps, max(k + 1, LANCZOS_BLOCK))
    while True:
        pairs = lanczos_eigenpairs(op, k, tol=1e-3, max_steps=cap, process=proc)
        if pairs.converged or proc.steps >= min(max_steps, op.dim) or proc.steps < cap:
            return pairs
        if clock.expired():
            clock.stop(f"Lanczos at {proc.steps} of {max_steps} steps")
            return pairs
        cap = min(max_steps, cap + LANCZOS_BLOCK)


def timed_trace(
    op: Any, num_probes: int, gen: torch.Generator, clock: Clock, deflation: LanczosProcess | None = None
) -> TraceEstimate:
    """Hutchinson's trace (deflated by ``deflation`` when given), :data:`PROBE_BLOCK` probes per block.

    Args:
        op: the operator.
        num_probes: the probes wanted.
        gen: the probes' generator (shared by the blocks).
        clock: the section's deadline.
        deflation: a Lanczos process whose basis deflates the probes (None: plain Hutchinson).

    Returns:
        The estimate over the probes drawn before the deadline (at least one block).
    """
    from symgen.curvature.results import TraceEstimate
    from symgen.curvature.trace import deflated_trace, hutchinson_trace

    samples: list[float] = []
    exact, matvecs = 0.0, 0
    sizes = blocks(num_probes, PROBE_BLOCK, 3)
    for i, m in enumerate(sizes):
        if i > 0 and clock.expired():
            clock.stop(f"trace from {len(samples)} of {num_probes} probes")
            break
        if deflation is not None:
            est = deflated_trace(op, m, block_size=2, generator=gen, deflation=deflation)
            if not est.samples:  # the deflation spans the whole space: exact
                return est
        else:
            est = hutchinson_trace(op, m, generator=gen, block_size=2)
        exact = est.exact_part
        samples += est.samples
        matvecs += est.num_matvecs
    mean, se = mean_stderr(samples)
    method = "lanczos-deflated" if deflation is not None else "hutchinson"
    return TraceEstimate(exact + mean, se, matvecs, method, exact, samples)


def timed_density(
    op: Any, steps: int, runs: int, first: LanczosProcess, gen: torch.Generator, clock: Clock
) -> SpectralDensity:
    """SLQ with ``runs`` runs of ``steps`` steps (the first from ``first``), the clock checked between runs.

    Args:
        op: the operator.
        steps: Lanczos steps per run.
        runs: the runs wanted.
        first: the process that serves as the first run.
        gen: the further runs' generator.
        clock: the section's deadline.

    Returns:
        The density of the runs made before the deadline (at least the first).
    """
    from symgen.curvature.lanczos import slq_density
    from symgen.curvature.results import SpectralDensity

    parts = [slq_density(op, steps, 1, generator=gen, first=first)]
    for r in range(1, runs):
        if clock.expired():
            clock.stop(f"spectral density from {r} of {runs} SLQ runs")
            break
        parts.append(slq_density(op, steps, 1, generator=gen))
    m = min(p.nodes.shape[1] for p in parts)
    nodes = torch.cat([p.nodes[:, -m:] for p in parts])
    weights = torch.cat([p.weights[:, -m:] for p in parts])
    return SpectralDensity(nodes, weights, op.dim, sum(p.num_matvecs for p in parts))


def timed_noise(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    sigma: float,
    num_samples: int,
    gen: torch.Generator,
    clock: Clock,
    group: Any = None,
) -> NoiseStability:
    """Noise stability at ``sigma`` in blocks of :data:`NOISE_BLOCK` draws, pooled (mean and standard error
    over all draws); the clock checked between blocks.

    Args:
        model: the classifier.
        batches: this rank's batches.
        sigma: the noise's standard deviation.
        num_samples: the draws wanted (>= 2).
        gen: the draws' generator (shared by the blocks).
        clock: the section's deadline.
        group: the process group the losses are all-reduced over.

    Returns:
        The pooled estimate over the draws made before the deadline (at least one block).
    """
    from dataclasses import replace

    from symgen.metrics import noise_stability as measure

    parts: list[NoiseStability] = []
    for i, m in enumerate(blocks(num_samples, NOISE_BLOCK, 2)):
        if i > 0 and clock.expired():
            clock.stop(f"sigma {sigma:g} from {sum(p.num_samples for p in parts)} of {num_samples} draws")
            break
        parts.append(
            measure(
                model,
                F.cross_entropy,
                batches,
                sigma,
                num_samples=m,
                bn_mode="eval",
                generator=gen,
                chunk_size=NOISE_BLOCK,
                process_group=group,
            )
        )
    if len(parts) == 1:
        return parts[0]
    n = [p.num_samples for p in parts]
    total = sum(n)
    mean = sum(k * p.value for k, p in zip(n, parts, strict=True)) / total
    # pooled variance of the draws from each block's mean and standard error (se^2 n = its sample variance)
    ss = sum((k - 1) * p.stderr**2 * k + k * (p.value - mean) ** 2 for k, p in zip(n, parts, strict=True))
    se = math.sqrt(ss / (total - 1) / total)
    perturbed = sum(k * p.perturbed_loss for k, p in zip(n, parts, strict=True)) / total
    return replace(parts[0], value=mean, stderr=se, perturbed_loss=perturbed, num_samples=total)


def ggn_values(sec: SectionResult, ggn: Any, lim: AuditLimits, seed: int, clock: Clock) -> None:
    """The GGN's trace (Hutchinson; PSD, so never negative) and top eigenvalue (Lanczos) into ``sec``.

    Args:
        sec: the Hessian section.
        ggn: the :class:`~symgen.curvature.GGNOperator`.
        lim: the limits (the Hessian's probes and Lanczos steps).
        seed: the audit's seed (streams ``ggn_trace``, ``ggn_lanczos``).
        clock: the section's deadline.
    """
    top = ggn.eigenpairs(1, tol=1e-3, max_steps=max(lim.eigen_iters, 2), generator=stream(seed, "ggn_lanczos"))
    sec.add(
        "ggn_top_eigenvalue",
        float(top.values[0]),
        float(top.error_bounds[0]),
        "generalized Gauss-Newton J^T H_loss J (PSD part of H); uncertainty = Lanczos error bound"
        + ("" if top.converged else f" (not converged to 1e-3 in {top.num_matvecs} steps)"),
    )
    if clock.expired():
        clock.stop("no GGN trace")
        return
    tr = timed_trace(ggn, max(3, lim.hutchinson_probes), stream(seed, "ggn_trace"), clock)
    sec.add(
        "ggn_trace",
        tr.value,
        tr.stderr,
        f"generalized Gauss-Newton J^T H_loss J (PSD part of H), Hutchinson over {tr.num_matvecs} probes",
    )
    sec.details.update(ggn_matvecs=ggn.num_matvecs)


def spectrum_parts(nodes: Tensor, weights: Tensor, dim: int) -> tuple[list[float], list[float]]:
    """Per SLQ run, the positive and negative parts of the trace the density implies.

    dim x sum_i w_i theta_i over theta_i > 0 and over theta_i < 0 (the integrals of lambda over lambda > 0
    and lambda < 0 of the density, scaled to count eigenvalues); their sum is the density's trace.

    Args:
        nodes: SLQ nodes (runs, steps).
        weights: their weights (runs, steps).
        dim: the operator's dimension.

    Returns:
        ``(positive, negative)``: one value per run each.
    """
    wt = (weights * nodes).double()
    pos = dim * torch.where(nodes > 0, wt, torch.zeros_like(wt)).sum(1)
    neg = dim * torch.where(nodes < 0, wt, torch.zeros_like(wt)).sum(1)
    return pos.tolist(), neg.tolist()


def explain_indefinite(sec: SectionResult) -> None:
    """A negative or small trace is explained where it is read: the density's negative part against its
    positive part, and the GGN's (PSD) trace, in the trace's note and the section's flags.

    Args:
        sec: the Hessian section (its values so far).
    """
    v = sec.values
    trace, pos, neg = v.get("trace"), v.get("density_positive_part"), v.get("density_negative_part")
    if trace is None:
        return
    heavy = pos is not None and neg is not None and abs(neg.value) > 0.25 * abs(pos.value)
    if trace.value >= 0 and not heavy:
        return
    parts = []
    if pos is not None and neg is not None:
        parts.append(f"the density's positive part {pos.value:.4g} and negative part {neg.value:.4g}")
    ggn = v.get("ggn_trace")
    if ggn is not None:
        parts.append(f"the Gauss-Newton (PSD) trace {ggn.value:.4g} ± {ggn.stderr or 0:.2g}")
    text = (
        "indefinite Hessian: negative curvature "
        + ("outweighs the positive in the trace" if trace.value < 0 else "cancels much of the positive in the trace")
        + (f"; see {' and '.join(parts)}" if parts else "")
    )
    trace.note += f"; {text}"
    sec.flags.append(text)
