"""The precision an audit states: each estimate against its section's target, flagged where it misses.

A section declares a :class:`Target` per metric: a relative standard error (curvature, stability) or an
absolute one (accuracies). A value whose standard error exceeds half its magnitude is ``NOT RESOLVED``
(its sign and size are not known); one that misses its target is ``IMPRECISE``. Either flag comes with
the section's time that would meet it, extrapolated from the measured cost: the standard error falls as
1/sqrt(samples) and the samples cost what they cost here, so it takes ``seconds * (stderr / goal)^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "NOT_RESOLVED", "IMPRECISE", "RESOLVED_FRACTION", "assess", "flag_text", "resolve_seconds"]

NOT_RESOLVED = "NOT RESOLVED"
IMPRECISE = "IMPRECISE"
#: A standard error above this fraction of the value's magnitude leaves the value not resolved.
RESOLVED_FRACTION = 0.5


@dataclass(frozen=True)
class Target:
    """A precision target: a relative standard error ``rel`` (of |value|) or an absolute one ``abs``."""

    rel: float | None = None
    abs: float | None = None

    def stderr_goal(self, value: float) -> float | None:
        """The largest standard error that meets the target at ``value`` (the tighter of both).

        Args:
            value: the estimate.

        Returns:
            The goal, or None without a target.
        """
        goals = [g for g in (None if self.rel is None else self.rel * abs(value), self.abs) if g is not None]
        return min(goals) if goals else None

    def describe(self) -> str:
        """The target in words, e.g. ``stderr <= 5% of |value|``."""
        parts = []
        if self.rel is not None:
            parts.append(f"{self.rel:.0%} of |value|")
        if self.abs is not None:
            parts.append(f"{self.abs:g}")
        return "stderr <= " + " and ".join(parts)


def assess(est: Any, target: Target | None) -> None:
    """Set ``est.flag``, ``est.target`` and ``est.resolve_factor`` from its standard error and ``target``.

    ``resolve_factor`` = (stderr / goal)^2: how many times this section's samples (and seconds) would meet the
    goal (the target, and at least stderr <= |value|/2); it depends on the numbers only, not on the clock.

    Args:
        est: the :class:`~symgen.audit.result.Estimate` (changed in place).
        target: the section's target for it (None: only the NOT RESOLVED rule applies).
    """
    est.flag, est.resolve_factor = "", None
    est.target = None if target is None else target.stderr_goal(est.value)
    se = est.stderr
    if se is None or not (math.isfinite(se) and math.isfinite(est.value)) or se == 0:
        return
    half = RESOLVED_FRACTION * abs(est.value)
    if se > half:
        est.flag = NOT_RESOLVED
    elif est.target is not None and se > est.target:
        est.flag = IMPRECISE
    else:
        return
    goal = min(g for g in (half, est.target) if g is not None) if est.target is not None else half
    if goal > 0:
        est.resolve_factor = (se / goal) ** 2


def resolve_seconds(est: Any, seconds: float) -> float | None:
    """The section's seconds that would meet ``est``'s goal: ``seconds x resolve_factor`` (None: no flag).

    Args:
        est: an assessed estimate.
        seconds: what its section cost.

    Returns:
        The seconds, or None.
    """
    factor = getattr(est, "resolve_factor", None)
    return None if factor is None or not seconds > 0 else seconds * factor


def flag_text(est: Any, seconds: float = 0.0) -> str:
    """The flag with what would lift it, e.g. ``NOT RESOLVED (stderr 8 > |value|/2; ~64 s would resolve it)``.

    Args:
        est: an assessed estimate (an old one without ``flag``: the NOT RESOLVED rule).
        seconds: what its section cost (0: the budget is not stated).

    Returns:
        The text ("" when the estimate meets its target).
    """
    flag = est.flag
    if not flag and est.stderr is not None and math.isfinite(est.value) and est.stderr > 0.5 * abs(est.value):
        flag = NOT_RESOLVED  # an audit.json written before flags were stored
    if not flag:
        return ""
    se = est.stderr or 0.0
    why = (
        f"stderr {se:.2g} > {RESOLVED_FRACTION:g} x |value|"
        if flag == NOT_RESOLVED
        else f"stderr {se:.2g} > target {est.target or 0:.2g}"
    )
    need = resolve_seconds(est, seconds)
    if need is not None:
        return f"{flag} ({why}; about {need:.3g} s of this section would meet it)"
    return (
        f"{flag} ({why}; a value of 0 cannot be resolved relative to itself)" if est.value == 0 else f"{flag} ({why})"
    )
