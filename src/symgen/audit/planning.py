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

__all__ = ["Timing", "time_passes", "choose_threads", "estimate_costs", "plan_limits", "shares", "knobs", "SLACK"]

SLACK = 0.8  # plan for this fraction of the budget: the rest covers loading, figures and misestimates


def shares() -> dict[str, float]:
    """Share of the budget each registered section may use (:attr:`Section.share`)."""
    from symgen.audit.registry import sections

    return {s.name: s.share for s in sections()}


def knobs() -> dict[str, tuple[tuple[str, int], ...]]:
    """Per registered section: (limit, smallest value the section still means something with)."""
    from symgen.audit.registry import sections

    return {s.name: s.knobs for s in sections()}


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


def choose_threads(model: nn.Module, x: Tensor, batch: int = 16) -> tuple[int, float, float]:
    """The faster of torch's intra-op thread count and a single thread for this model's passes, here and now.

    On a machine loaded by other processes, threads that wait at OpenMP barriers for a descheduled sibling
    make every pass several times slower than one thread (measured: a CIFAR ResNet-20 forward of 200
    images 1.99 s on 2 threads vs 0.55 s on 1 at load average 12 on 2 cores; 2 threads win when quiet).
    A forward pass of ``batch`` data points is timed on one thread (best of two, after a warm-up), then
    at the current count: once when that is already slower (a loaded machine pays for one slow pass),
    best of two otherwise.

    Args:
        model: the classifier.
        x: inputs (the first ``batch`` are used).
        batch: how many data points a pass takes.

    Returns:
        ``(threads, seconds at the current count, seconds on one thread)``; the current count, with NaN
        timings, when it is already 1.
    """
    n = torch.get_num_threads()
    if n <= 1:
        return n, math.nan, math.nan
    xb = x[:batch]

    def fwd() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(xb)
        return time.perf_counter() - t0

    try:
        torch.set_num_threads(1)
        fwd()  # warm-up
        one = min(fwd(), fwd())
        torch.set_num_threads(n)
        many = fwd()
        if many < one:
            many = min(many, fwd())
    finally:
        torch.set_num_threads(n)
    return (1 if one < many else n), many, one


def estimate_costs(
    lim: AuditLimits, t: Timing, n_train: int, n_test: int, group_order: int, names: Collection[str] | None = None
) -> dict[str, float]:
    """Predicted seconds of each registered section under ``lim`` (its :attr:`Section.cost`; 0 without one).

    Args:
        lim: the limits.
        t: the timing of the model's passes.
        n_train: the training split's size.
        n_test: the test split's size.
        group_order: the order of the group action (1 without one).
        names: only these sections (default: all registered).

    Returns:
        Section name -> predicted seconds.
    """
    from symgen.audit.registry import Sizes, sections

    sizes = Sizes(n_train, n_test, group_order)
    return {
        s.name: (s.cost(lim, t, sizes) if s.cost is not None else 0.0)
        for s in sections()
        if names is None or s.name in names
    }


def plan_limits(
    lim: AuditLimits,
    t: Timing,
    n_train: int,
    n_test: int,
    group_order: int,
    fixed: Collection[str] = (),
    *,
    names: Collection[str] | None = None,
    seconds: float | None = None,
) -> tuple[AuditLimits, dict[str, str]]:
    """Limits whose predicted cost fits the time, and per section a note of what was cut.

    A section over its share of the time (:attr:`Section.share`, renormalized over ``names``) has its
    knobs (:attr:`Section.knobs`) scaled by the same factor, each kept at or above its minimum; knobs in
    ``fixed`` (set by the user) stay. Re-planning passes the sections still to run, the seconds left and a
    timing scaled by the throughput measured so far.

    Args:
        lim: the budget's limits (the sizes are never raised above them).
        t: the timing of the model's passes.
        n_train: the training split's size.
        n_test: the test split's size.
        group_order: the order of the group action (1 without one).
        fixed: the limits the user set (kept as given).
        names: the sections to plan (default: every registered one).
        seconds: the time they may take (default: ``lim.time_limit``).

    Returns:
        ``(limits, notes)``: the sized limits and, per section cut, what was cut.
    """
    from symgen.audit.registry import sections

    todo = [s for s in sections() if names is None or s.name in names]
    costs = estimate_costs(lim, t, n_train, n_test, group_order, [s.name for s in todo])
    target = SLACK * (lim.time_limit if seconds is None else max(seconds, 0.0))
    notes: dict[str, str] = {}
    if sum(costs.values()) <= target:
        return lim, notes
    total_share = sum(s.share for s in todo) or 1.0
    new = lim
    for sec in todo:
        allowed = sec.share / total_share * target
        if costs[sec.name] <= allowed:
            continue
        free = [(k, lo) for k, lo in sec.knobs if k not in fixed]
        if not free:
            continue
        # Shrink every free knob by the same step until the section fits its share (or all are at their
        # minimum): the cost is a product of sample counts and sums of iteration counts.
        start: dict[str, Any] = {}
        for k, _ in free:
            size = n_train if k in _TRAIN_KNOBS else n_test
            cur = new.get(k)
            start[k] = size if cur is None else (min(cur, size) if k.endswith("num_data") else cur)
        vals: dict[str, Any] = dict(start)
        trial = new
        for _ in range(60):
            if _cost(sec, trial, t, n_train, n_test, group_order) <= allowed:
                break
            step: dict[str, Any] = {k: max(lo, int(vals[k] * 0.85)) for k, lo in free}
            if step == vals:
                break
            vals = step
            trial = new.with_values(**vals)
        changed = {k: (vals[k], start[k]) for k in vals if vals[k] < start[k]}
        if changed:
            new = new.with_values(**{k: v for k, (v, _) in changed.items()})
            if "eigen_iters" in changed and new.eigen_iters < new.top_eigenvalues + 1:
                new = replace(new, top_eigenvalues=max(1, new.eigen_iters - 1))
            predicted = _cost(sec, new, t, n_train, n_test, group_order)
            notes[sec.name] = (
                f"sized to the {lim.time_limit:g} s budget (about {predicted:.1f} s predicted): "
                + ", ".join(f"{k}={v} instead of {old}" for k, (v, old) in changed.items())
                + "; a longer budget (--budget SECONDS or full) would use the larger values "
                "and give smaller standard errors"
            )
    return new, notes


_TRAIN_KNOBS = frozenset({"hessian_num_data", "noise_num_data", "symmetry_num_data", "eval_num_data"})


def _cost(sec: Any, lim: AuditLimits, t: Timing, n_train: int, n_test: int, group_order: int) -> float:
    from symgen.audit.registry import Sizes

    return float(sec.cost(lim, t, Sizes(n_train, n_test, group_order))) if sec.cost is not None else 0.0
