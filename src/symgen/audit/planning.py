"""Sizing the audit to its time budget: a cheap timing of one forward and one backward pass predicts
each section's cost; sections over their share of the budget get fewer samples, probes, steps.

Every section runs; each says what it could afford and what a longer budget would add. Limits the
user set explicitly (``--set``) are kept as given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.audit.limits import AuditLimits

__all__ = ["Timing", "time_passes", "estimate_costs", "plan_limits", "SHARES", "KNOBS"]

# Share of the budget each section may use (the curvature sections are the costly ones).
SHARES = {
    "performance": 0.05,
    "invariance": 0.10,
    "robustness": 0.15,
    "ntk": 0.15,
    "scale_symmetries": 0.05,
    "hessian": 0.35,
    "noise_stability": 0.15,
}
# Knobs of each section: (limit, smallest value the section still means something with).
KNOBS: dict[str, tuple[tuple[str, int], ...]] = {
    "performance": (("eval_num_data", 100),),
    "invariance": (("invariance_num_data", 16),),
    "robustness": (("pgd_num_data", 16), ("pgd_steps", 2)),
    "ntk": (("ntk_num_data", 8), ("ntk_subsamples", 1)),
    "scale_symmetries": (("symmetry_num_data", 4),),
    "hessian": (("hessian_num_data", 8), ("hutchinson_probes", 3), ("eigen_iters", 5), ("density_steps", 5)),
    "noise_stability": (("noise_num_data", 8), ("noise_num_samples", 2)),
}
SLACK = 0.8  # plan for this fraction of the budget: the rest covers loading, figures and misestimates


@dataclass
class Timing:
    """Seconds per sample of a forward pass and of a forward plus backward pass; outputs per sample."""

    forward: float
    backward: float
    outputs: int
    layers: int


def time_passes(model: nn.Module, x: Tensor, y: Tensor, batch: int = 16) -> Timing:
    """Time one forward and one forward+backward pass of ``batch`` data points (best of two, after a warm-up).

    Args:
        model: the classifier.
        x: inputs (the first ``batch`` are used).
        y: their labels.
        batch: how many data points a pass takes.

    Returns:
        Seconds per data point of each pass, the number of outputs and of leaf modules.
    """
    xb, yb = x[:batch], y[:batch]
    n = xb.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]

    def fb() -> None:
        loss = F.cross_entropy(model(xb), yb)
        torch.autograd.grad(loss, params, allow_unused=True)

    def fwd() -> Tensor:
        with torch.no_grad():
            return model(xb)

    out = fwd()
    fb()
    tf = tb = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        fwd()
        tf = min(tf, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb = min(tb, time.perf_counter() - t0)
    layers = sum(1 for m in model.modules() if not list(m.children()))
    return Timing(forward=tf / n, backward=tb / n, outputs=int(out.shape[-1]), layers=layers)


def _n(k: int | None, n: int) -> int:
    return n if k is None else min(k, n)


def estimate_costs(lim: AuditLimits, t: Timing, n_train: int, n_test: int, group_order: int) -> dict[str, float]:
    """Predicted seconds of each section under ``lim``. The factors are calibrated on measured runs
    (benchmarks/audit.py, CIFAR ResNet-18 on 2 cores, session 5: predicted against measured wall time):
    the NTK's per-sample Jacobian rows cost about 7 batched backward passes per row, not 1.5; a forward
    pass under weight noise 2.5x a batch-16 forward (parameter copies and noise). The streamed evaluation
    took 1.6x its prediction there (data decoding, large-batch memory traffic); it is not scaled, since
    the whole test split is evaluated whatever the budget and SLACK covers it."""
    hvp = 2.5 * t.backward  # a Hessian-vector product per sample: about two and a half backward passes
    h = _n(lim.hessian_num_data, n_train)
    # one Lanczos run serves the eigenvalues, the trace's deflation and the first SLQ run; the GGN's is separate
    lanczos = max(lim.eigen_iters, lim.density_steps if lim.density_runs > 0 else 0)
    matvecs = (
        max(3, lim.hutchinson_probes) + lanczos + lim.eigen_iters + max(lim.density_runs - 1, 0) * lim.density_steps
    )
    ntk_n = min(lim.ntk_num_data * lim.ntk_subsamples, n_test)
    return {
        "performance": (_n(lim.eval_num_data, n_train) + _n(lim.test_num_data, n_test)) * t.forward,
        "invariance": _n(lim.invariance_num_data, n_test) * group_order * t.forward,
        "robustness": _n(lim.pgd_num_data, n_test) * (1 + len(lim.pgd_eps) * (lim.pgd_steps + 1)) * t.backward,
        "ntk": 7.0 * ntk_n * t.outputs * t.backward,
        "scale_symmetries": _n(lim.symmetry_num_data, n_train) * (4 + 2 * t.layers) * t.forward,
        "hessian": h * matvecs * hvp,
        "noise_stability": 2.5
        * _n(lim.noise_num_data, n_train)
        * (1 + 2 * len(lim.noise_sigmas) * lim.noise_num_samples)
        * t.forward,
    }


def plan_limits(
    lim: AuditLimits, t: Timing, n_train: int, n_test: int, group_order: int, fixed: Collection[str] = ()
) -> tuple[AuditLimits, dict[str, str]]:
    """Limits whose predicted cost fits ``lim.time_limit``, and per section a note of what was cut.

    A section over its share of the budget (:data:`SHARES`) has its knobs (:data:`KNOBS`) scaled by
    the same factor, each kept at or above its minimum; knobs in ``fixed`` (set by the user) stay.

    Args:
        lim: the budget's limits.
        t: the timing of the model's passes.
        n_train: the training split's size.
        n_test: the test split's size.
        group_order: the order of the group action (1 without one).
        fixed: the limits the user set (kept as given).

    Returns:
        ``(limits, notes)``: the sized limits and, per section cut, what was cut.
    """
    costs = estimate_costs(lim, t, n_train, n_test, group_order)
    target = SLACK * lim.time_limit
    notes: dict[str, str] = {}
    if sum(costs.values()) <= target:
        return lim, notes
    new = lim
    for section, knobs in KNOBS.items():
        allowed = SHARES[section] * target
        if costs[section] <= allowed:
            continue
        free = [(k, lo) for k, lo in knobs if k not in fixed]
        if not free:
            continue
        # Shrink every free knob by the same step until the section fits its share (or all are at their
        # minimum): the cost is a product of sample counts and sums of iteration counts.
        start: dict[str, Any] = {}
        for k, _ in free:
            size = (
                n_train if k in ("hessian_num_data", "noise_num_data", "symmetry_num_data", "eval_num_data") else n_test
            )
            cur = getattr(new, k)
            start[k] = size if cur is None else (min(cur, size) if k.endswith("num_data") else cur)
        vals: dict[str, Any] = dict(start)
        trial = new
        for _ in range(60):
            if estimate_costs(trial, t, n_train, n_test, group_order)[section] <= allowed:
                break
            step: dict[str, Any] = {k: max(lo, int(vals[k] * 0.85)) for k, lo in free}
            if step == vals:
                break
            vals = step
            trial = replace(new, **vals)
        changed = {k: (vals[k], start[k]) for k in vals if vals[k] < start[k]}
        if changed:
            shrunk: dict[str, Any] = {k: v for k, (v, _) in changed.items()}
            new = replace(new, **shrunk)
            if "eigen_iters" in changed and new.eigen_iters < new.top_eigenvalues + 1:
                new = replace(new, top_eigenvalues=max(1, new.eigen_iters - 1))
            predicted = estimate_costs(new, t, n_train, n_test, group_order)[section]
            notes[section] = (
                f"sized to the {lim.time_limit:g} s budget (about {predicted:.1f} s predicted): "
                + ", ".join(f"{k}={v} instead of {old}" for k, (v, old) in changed.items())
                + "; a longer budget (--budget SECONDS or full) would use the larger values "
                "and give smaller standard errors"
            )
    return new, notes
