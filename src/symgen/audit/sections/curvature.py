"""Curvature sections on a training subsample: the Hessian's trace, top eigenvalues and spectral
density (arXiv 2205.01736, 1912.07145, 1901.10159), and noise stability E_U[L(W + U)] - L(W)
beside its second-order prediction sigma^2/2 tr(H) (arXiv 2306.08553)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.audit.limits import AuditLimits
from symgen.audit.registry import Clock
from symgen.audit.result import AuditResult, SectionResult
from symgen.audit.sections.common import curvature_subsample, stream
from symgen.audit.sections.timed import (
    explain_indefinite,
    ggn_values,
    spectrum_parts,
    timed_density,
    timed_eigenpairs,
    timed_noise,
    timed_trace,
)

__all__ = ["hessian", "noise_stability", "shard_batches", "density_trace"]
from symgen.audit.splits import Split
from symgen.distributed import Group
from symgen.stats import mean_stderr

if TYPE_CHECKING:
    from symgen.curvature.results import SpectralDensity, TraceEstimate


def shard_batches(
    x: Tensor, y: Tensor, idx: Tensor, batch_size: int, group: Group = None
) -> list[tuple[Tensor, Tensor]]:
    """The batches of subsample ``idx`` this rank owns: a contiguous share of it (all of it without a
    process group); the operators all-reduce their sums over the ranks.

    Args:
        x: the subsample's inputs.
        y: its labels.
        idx: positions into ``x`` and ``y``.
        batch_size: the largest batch.
        group: the process group (None: this process alone).

    Returns:
        This rank's batches ``(x, y)``.
    """
    from symgen import distributed

    share = distributed.shard_range(idx.numel(), group)
    mine = idx[share.start : share.stop]
    return [(x[i], y[i]) for i in mine.to(x.device).split(batch_size)]


def hessian(
    sec: SectionResult,
    model: nn.Module,
    train: Split,
    lim: AuditLimits,
    seed: int,
    group: Group = None,
    clock: Clock | None = None,
) -> None:
    """tr(H) by Lanczos-deflated Hutchinson, the top eigenvalues by Lanczos, the density by SLQ
    of the mean cross-entropy on a training subsample, and beside them the trace and top eigenvalue of the
    generalized Gauss-Newton matrix G = J^T H_loss J (arXiv 1412.1193); BatchNorm in eval mode.
    One Lanczos process from a Gaussian start serves all three: the eigenvalues, the trace's
    deflation subspace (its probes are fresh) and the first SLQ run (its first density_steps steps).
    The density's positive and negative parts (dim x sum of w theta over theta > 0 and < 0) say how much
    negative curvature a small or negative trace hides. ``clock``: checked between Lanczos blocks, probe
    blocks and SLQ runs; past its deadline the section stops with what it has (and says so).

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        train: the training split.
        lim: the limits.
        seed: the audit's integer seed (streams ``curvature_subsample``, ``hessian_*``, ``ggn_*``).
        group: the process group the products are all-reduced over.
        clock: the section's deadline (None: none).
    """
    from symgen import rng
    from symgen.curvature import GGNOperator, HessianOperator
    from symgen.curvature.lanczos import LanczosProcess

    clock = clock or Clock()
    idx = curvature_subsample(train.num_data, lim.hessian_num_data, seed)
    if idx.numel() < train.num_data:
        sec.skipped.append(f"{idx.numel()} of {train.num_data} training samples (budget)")
    batches = shard_batches(*train.take(idx), torch.arange(idx.numel()), lim.batch_size, group)
    hess = HessianOperator(model, F.cross_entropy, batches, bn_mode="eval", process_group=group)
    # A separate generator per estimate keeps each reproducible whatever the budget of the others.
    gen = stream(seed, "hessian_lanczos")
    proc = LanczosProcess(hess, rng.randn((1, hess.dim), gen, device=hess.device, dtype=hess.dtype)[0], gen)
    k = min(lim.top_eigenvalues, hess.dim)
    pairs = timed_eigenpairs(hess, k, max(lim.eigen_iters, k + 1), proc, clock)
    if lim.density_runs > 0 and not clock.expired():
        proc.extend(lim.density_steps - proc.steps)  # the first SLQ run needs this many steps
    trace = timed_trace(hess, max(3, lim.hutchinson_probes), stream(seed, "hessian_trace"), clock, proc)
    sec.add(
        "trace",
        trace.value,
        trace.stderr,
        f"Hutchinson deflated by the {proc.steps} Lanczos vectors of the eigenvalue run, {trace.num_matvecs} "
        f"probes v^T H v ({'Taylor mode' if hess.taylor else 'from Hessian-vector products'}); "
        "eval-mode BatchNorm",
    )
    tops = [float(v) for v in pairs.values]
    for i, (val, bound) in enumerate(zip(tops, pairs.error_bounds.tolist(), strict=True)):
        sec.add(
            f"eigenvalue_{i + 1}",
            val,
            bound,
            "uncertainty = Lanczos error bound"
            + ("" if pairs.converged else f" (not converged to 1e-3 in {proc.steps} steps)"),
        )
    if not pairs.converged:
        sec.skipped.append(
            f"Lanczos stopped at {proc.steps} steps before every top eigenvalue reached "
            "relative error 1e-3 (budget); the error bounds say how far off they may be"
        )
    if lim.density_runs > 0:
        steps = min(lim.density_steps, proc.steps)
        proc.release_basis()  # SLQ's first run needs only T: the basis would sit beside the next run's
        dens = timed_density(hess, steps, lim.density_runs, proc, stream(seed, "hessian_density"), clock)
        lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
        runs = dens.nodes.shape[0]
        sec.add(
            "smallest_ritz_value",
            lo,
            None,
            f"most negative curvature seen by SLQ ({runs} run(s) of {dens.nodes.shape[1]} Lanczos steps)",
        )
        density_trace(sec, dens, trace)
        sec.details.update(
            density_grid=grid.tolist(),
            density=dens.evaluate(grid.to(dens.nodes.dtype)).tolist(),
            nodes=dens.nodes.tolist(),
            weights=dens.weights.tolist(),
        )
    else:
        sec.skipped.append("spectral density: density_runs = 0")
    sec.details.update(top_eigenvalues=tops, dim=hess.dim, matvecs=hess.num_matvecs, bn_mode="eval")
    del hess, proc, pairs  # the Hessian's retained graph and Lanczos basis, before the GGN builds its own
    if clock.expired():
        sec.skipped.append("GGN trace and top eigenvalue: not measured, the section's time was spent")
        clock.stop("no GGN trace or top eigenvalue")
    else:
        try:
            ggn = GGNOperator(model, F.cross_entropy, batches, bn_mode="eval", process_group=group)
            ggn_values(sec, ggn, lim, seed, clock)
        except Exception as e:  # noqa: BLE001 - an extra metric must not hide the Hessian's
            sec.skipped.append(f"GGN: {type(e).__name__}: {str(e)[:300]}")
    explain_indefinite(sec)
    sec.samples = idx.numel()


def noise_stability(
    sec: SectionResult,
    model: nn.Module,
    train: Split,
    lim: AuditLimits,
    seed: int,
    result: AuditResult,
    group: Group = None,
    clock: Clock | None = None,
) -> None:
    """E_U[L(W + U)] - L(W), U ~ N(0, sigma^2 I), antithetic draws, next to the second-order
    prediction sigma^2/2 tr(H) from the Hessian section. ``clock``: checked between blocks of draws; past
    its deadline the section keeps the draws it has (at least two per sigma) and skips the larger sigmas.

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        train: the training split.
        lim: the limits.
        seed: the audit's integer seed (streams ``curvature_subsample`` and ``noise_stability``, one
            sub-stream per sigma).
        result: the audit so far (the Hessian section's trace).
        group: the process group the losses are all-reduced over.
        clock: the section's deadline (None: none).
    """
    clock = clock or Clock()
    idx = curvature_subsample(train.num_data, lim.noise_num_data, seed)
    if idx.numel() < train.num_data:
        sec.skipped.append(f"{idx.numel()} of {train.num_data} training samples (budget)")
    batches = shard_batches(*train.take(idx), torch.arange(idx.numel()), lim.batch_size, group)
    hes = result.sections.get("hessian")
    trace = hes.values["trace"].value if hes is not None and hes.status == "ok" else None
    same_data = trace is not None and lim.noise_num_data == lim.hessian_num_data
    curve, predicted = [], []
    for i, sigma in enumerate(lim.noise_sigmas):
        if i > 0 and clock.expired():
            clock.stop(f"noise levels {', '.join(f'{s:g}' for s in lim.noise_sigmas[i:])} not measured")
            break
        ns = timed_noise(
            model, batches, sigma, max(2, lim.noise_num_samples), stream(seed, "noise_stability", i), clock, group
        )
        pred = 0.5 * sigma**2 * trace if trace is not None else None
        note = f"E[L(W+U)] - L(W), U ~ N(0, {sigma:g}^2 I), {ns.num_samples} antithetic draws"
        if pred is not None:
            note += f"; sigma^2/2 tr(H) = {pred:.4g}" + ("" if same_data else " (Hessian on other samples)")
        sec.add(f"loss_increase@{sigma:g}", ns.value, ns.stderr, note)
        curve.append({"sigma": sigma, "increase": ns.value, "stderr": ns.stderr, "clean_loss": ns.clean_loss})
        predicted.append(pred)
    sec.details.update(curve=curve, predicted=predicted if trace is not None else None, bn_mode="eval")
    if trace is None:
        sec.skipped.append("no second-order prediction sigma^2/2 tr(H): the Hessian section did not run")
    sec.samples = idx.numel()


def density_trace(sec: SectionResult, dens: SpectralDensity, trace: TraceEstimate) -> None:
    """The density's implied trace dim * sum_i w_i theta_i per SLQ run, with the standard error over runs,
    checked against the Hutchinson trace: they estimate the same number and must agree within 3 combined
    standard errors (a disagreement is reported, never hidden). Beside it the positive and negative parts
    (the same sum over theta_i > 0 and theta_i < 0).

    Args:
        sec: the Hessian section (values added).
        dens: the SLQ nodes and weights.
        trace: the Hutchinson trace.
    """
    import math

    pos, neg = spectrum_parts(dens.nodes, dens.weights, dens.dim)
    per_run = [p + n for p, n in zip(pos, neg, strict=True)]
    if len(per_run) < 2:
        sec.add("density_trace", per_run[0], None, "one SLQ run: no error bar (density_runs >= 2 gives one)")
        sec.add("density_positive_part", pos[0], None, "dim x sum of w theta over theta > 0 (one SLQ run)")
        sec.add("density_negative_part", neg[0], None, "dim x sum of w theta over theta < 0 (one SLQ run)")
        return
    mean, se = mean_stderr(per_run)
    sec.add("density_trace", mean, se, f"dim x sum w theta over {len(per_run)} SLQ runs; standard error over runs")
    runs = f"{len(per_run)} SLQ runs; standard error over runs"
    sec.add("density_positive_part", *mean_stderr(pos), f"dim x sum of w theta over theta > 0, {runs}")
    sec.add("density_negative_part", *mean_stderr(neg), f"dim x sum of w theta over theta < 0, {runs}")
    t_val, t_se = float(trace.value), trace.stderr
    combined = math.hypot(se, t_se or 0.0)
    if combined > 0 and abs(mean - t_val) > 3 * combined:
        sec.skipped.append(
            f"the density's implied trace {mean:.4g} ± {se:.2g} disagrees with the Hutchinson "
            f"trace {t_val:.4g} ± {t_se or 0:.2g} (more than 3 combined standard errors); "
            "more density runs or probes (a longer budget) would settle it"
        )
