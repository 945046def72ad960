"""Running the registered sections within the budget: re-planned from the measured throughput, each with
a deadline it checks between its blocks, each value assessed against its section's precision target.

Before each section the remaining ones are re-planned (:func:`symgen.audit.planning.plan_limits` on the
seconds left, with the model's timing scaled by how much slower the sections so far ran than predicted,
never faster); a section gets a deadline of twice its share of the time left, never past
:data:`HARD` x the budget, and stops early there with what it has (flagged). Under several ranks every
input of these decisions is agreed (the slowest rank's seconds, any rank's expired clock), so all ranks
run the same sizes and stop at the same block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from symgen.audit.precision import assess
from symgen.audit.registry import Clock, Context, Section, run_order

if TYPE_CHECKING:
    from symgen.audit.limits import AuditLimits
    from symgen.audit.planning import Timing
    from symgen.audit.ranks import Ranks
    from symgen.audit.result import AuditResult, SectionResult

__all__ = ["Plan", "run_sections", "HARD"]

#: Sections stop (and later ones are skipped) by this multiple of the budget: the audit ends within 1.25x.
HARD = 1.05
#: A section whose planned size is predicted (at the measured throughput) to end past this multiple is skipped.
FIT = 1.2


@dataclass
class Plan:
    """What the schedule re-plans from: the budget's limits, the model's timing, the split sizes, what is fixed."""

    base: AuditLimits
    timing: Timing | None
    n_train: int
    n_test: int
    group_order: int
    fixed: Collection[str]
    budget: str


def run_sections(
    result: AuditResult,
    ctx: Context,
    chosen: Collection[str],
    plan: Plan,
    notes: dict[str, str],
    ranks: Ranks,
    progress: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    start: float | None = None,
    draw: bool = False,
) -> None:
    """Run every registered section in run order into ``result`` (``ctx.lim`` is updated as it re-plans).

    Args:
        result: the audit's result, its sections created.
        ctx: what the sections see (its ``lim`` is the initial plan).
        chosen: the sections asked for.
        plan: the inputs of re-planning.
        notes: per section, what the initial plan cut.
        ranks: the audit's ranks.
        progress: called with each section's title as it starts.
        device: the model's device (CUDA work is synchronized before a section's time is read).
        start: when the audit began (``time.perf_counter()``; default now): loading and timing count too.
        draw: draw each section's figure as it ends into ``result.figures``, while the budget lasts.
    """
    start = time.perf_counter() if start is None else start
    limit = plan.base.time_limit
    measured = predicted = 0.0
    drawing = 0.0  # seconds the last figure took: the next is expected to take as long
    if draw:
        result.figures = {}
    order = run_order()
    for i, section in enumerate(order):
        sec = result.sections[section.name]
        if section.name not in chosen:
            sec.status = "skipped"
            sec.skipped.append("not requested (sections=...)")
            continue
        if section.needs_action and ctx.action is None:
            sec.status = "skipped"
            sec.skipped.append("no group action given (--action c4|d4|shift)")
            continue
        elapsed = _agreed(ranks, time.perf_counter() - start)
        # The first section (accuracy and loss) always runs: everything else is read against it.
        if i > 0 and ranks.count(elapsed > HARD * limit) > 0:  # all ranks skip alike
            sec.status = "skipped"
            sec.skipped.append(
                f"time limit of the {plan.budget} budget ({limit:g} s) reached after {elapsed:.1f} s; raise it "
                "with --set time_limit=SECONDS" + (" or use --budget full" if plan.budget == "quick" else "")
            )
            continue
        rest = [s for s in order[i:] if s.name in chosen and (ctx.action is not None or not s.needs_action)]
        factor = max(1.0, measured / predicted) if predicted > 0 else 1.0
        if i > 0 and plan.timing is not None and limit > 0:
            _replan(ctx, plan, rest, factor, limit - elapsed, notes)
        need = _predicted(section, ctx.lim, plan) * factor  # its planned size at the throughput measured so far
        if i > 0 and limit > 0 and ranks.count(elapsed + need > FIT * limit) > 0:
            sec.status = "skipped"
            sec.skipped.append(
                f"time budget ({limit:g} s): even its smallest size would take about {need:.1f} s after "
                f"{elapsed:.1f} s; raise it with --set time_limit=SECONDS"
            )
            continue
        if section.name in notes:
            sec.skipped.append(notes[section.name])
        for lim in section.limits:
            result.limits[lim.name] = ctx.lim.get(lim.name)
        ctx.clock = Clock(_deadline(section, rest, limit, elapsed, start, need), ranks)
        if progress is not None:
            progress(section.title)
        guess = _predicted(section, ctx.lim, plan)
        error = _run(section, sec, ctx, device)
        seconds = _agreed(ranks, sec.seconds)
        measured, predicted = measured + seconds, predicted + guess
        ranks.outcome(section.name, error)  # all ranks went on, or all failed: else one DistributedError everywhere
        if error is not None:
            if section.required:
                raise error
            # A section the model does not support (e.g. an op without a vmap rule) must not hide the others:
            # it is reported as failed, with the error, in the table and the report.
            sec.status = "failed"
            sec.skipped.append(f"{type(error).__name__}: {str(error)[:500]}")
        for what in ctx.clock.stopped:
            sec.flags.append(f"stopped at its share of the time budget: {what}")
        for metric, est in sec.values.items():
            assess(est, section.target(metric))
        if draw and sec.status == "ok" and section.draw is not None and section.figure is not None:
            drawing = _draw(section, sec, result, start + HARD * limit if limit > 0 else None, drawing)


def _run(section: Section, sec: SectionResult, ctx: Context, device: torch.device | None) -> Exception | None:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        section.run(sec, ctx)
    except Exception as e:  # noqa: BLE001 - reported as the section's failure
        return e
    finally:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        sec.seconds = time.perf_counter() - t0
        sec.cpu_seconds = time.process_time() - c0
    return None


def _draw(section: Section, sec: SectionResult, result: AuditResult, end: float | None, last: float) -> float:
    """Draw the section's figure into ``result.figures`` unless it would end past ``end``; its seconds."""
    from symgen.audit.figures import draw_png

    assert result.figures is not None
    t0 = time.perf_counter()
    if end is not None and t0 + last > end:
        sec.skipped.append("figure not drawn: the time budget ran out")
        return last
    png = draw_png(section, sec, result)
    if png is not None:
        result.figures[section.name] = png
    return time.perf_counter() - t0


def _agreed(ranks: Ranks, seconds: float) -> float:
    """The slowest rank's seconds (this rank's alone)."""
    return ranks.max_row([seconds])[0] if ranks.active else seconds


def _predicted(section: Section, lim: AuditLimits, plan: Plan) -> float:
    from symgen.audit.registry import Sizes

    if plan.timing is None or section.cost is None:
        return 0.0
    return float(section.cost(lim, plan.timing, Sizes(plan.n_train, plan.n_test, plan.group_order)))


def _replan(ctx: Context, plan: Plan, rest: list[Section], factor: float, left: float, notes: dict[str, str]) -> None:
    """Size the sections still to run to the seconds ``left``, from the timing scaled by ``factor``."""
    from dataclasses import replace

    from symgen.audit.planning import plan_limits

    assert plan.timing is not None
    t = replace(plan.timing, forward=plan.timing.forward * factor, backward=plan.timing.backward * factor)
    base = plan.base.with_values(**{k: ctx.lim.get(k) for k in plan.fixed if _known(plan.base, k)})
    new, cut = plan_limits(
        base, t, plan.n_train, plan.n_test, plan.group_order, plan.fixed, names=[s.name for s in rest], seconds=left
    )
    ctx.lim = ctx.lim.with_values(**{lim.name: new.get(lim.name) for s in rest for lim in s.limits})
    for s in rest:
        if s.name in cut:
            slower = f"; re-planned: the sections so far ran {factor:.2g}x slower than predicted" if factor > 1 else ""
            notes[s.name] = cut[s.name] + slower
        else:
            notes.pop(s.name, None)


def _known(lim: AuditLimits, name: str) -> bool:
    try:
        lim.get(name)
    except AttributeError:
        return False
    return True


def _deadline(
    section: Section, rest: list[Section], limit: float, elapsed: float, start: float, need: float = 0.0
) -> float | None:
    """Twice the section's share of the time left, or 1.5x its predicted ``need`` (seconds) when more (up to
    four times its share), never past HARD x the budget (None without a limit)."""
    if not limit > 0:
        return None
    from symgen.audit.planning import SLACK

    total = sum(s.share for s in rest) or 1.0
    allotted = section.share / total * SLACK * max(limit - elapsed, 0.0)
    end = start + HARD * limit
    return min(time.perf_counter() + max(2.0 * allotted, min(1.5 * need, 4.0 * allotted), 0.05 * limit), end)
