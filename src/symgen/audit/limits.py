"""The audit's budget: how many samples, probes and steps each section may use, and its time limit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from symgen.errors import ConfigError

__all__ = ["AuditLimits", "BUDGETS", "resolve_limits", "budget_seconds"]


@dataclass(frozen=True)
class AuditLimits:
    """Sample sizes and iteration counts of every section, and the wall-time limit of the audit.

    The audit sizes each section's work to ``time_limit`` (:mod:`symgen.audit.planning`) from a
    timing of the model; a section that would start after twice the limit (a gross misestimate) is
    skipped and says so; a section that runs is never cut short.
    """

    time_limit: float = 60.0
    batch_size: int = 512
    eval_samples: int | None = 2000  # training-split subsample of the performance section (None: whole)
    test_samples: int | None = None  # None: the whole test split, streamed batch by batch
    invariance_samples: int = 256
    symmetry_samples: int = 32
    hessian_samples: int = 128
    hutchinson_probes: int = 24
    top_eigenvalues: int = 3
    eigen_iters: int = 30
    density_runs: int = 2  # >= 2 gives the density's implied trace an error bar
    density_steps: int = 24
    noise_samples: int = 128
    noise_draws: int = 16
    noise_sigmas: tuple[float, ...] = (0.003, 0.01, 0.03)
    ntk_samples: int = 48
    ntk_subsamples: int = 3
    pgd_samples: int = 200
    pgd_steps: int = 10
    pgd_eps: tuple[float, ...] = (0.01, 0.03, 0.1)  # fractions of the input range

    def describe_against(self, other: AuditLimits) -> dict[str, tuple[Any, Any]]:
        """Fields where these limits are below ``other``'s: name -> (this, other)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out[f.name] = (a, b)
        return out


BUDGETS: dict[str, AuditLimits] = {
    "quick": AuditLimits(),
    "full": AuditLimits(
        time_limit=3600.0,
        eval_samples=None,
        invariance_samples=2000,
        symmetry_samples=64,
        hessian_samples=2000,
        hutchinson_probes=200,
        top_eigenvalues=5,
        eigen_iters=150,
        density_runs=3,
        density_steps=80,
        noise_samples=2000,
        noise_draws=64,
        noise_sigmas=(0.001, 0.003, 0.01, 0.03, 0.1),
        ntk_samples=200,
        ntk_subsamples=3,
        pgd_samples=1000,
        pgd_steps=40,
        pgd_eps=(0.003, 0.01, 0.03, 0.1, 0.3),
    ),
}


def budget_seconds(budget: str | float) -> float | None:
    """The seconds of a numeric budget (``60``, ``"90"``, ``"2.5"``), None for a named one."""
    if isinstance(budget, bool):
        return None
    if isinstance(budget, (int, float)):
        return float(budget)
    try:
        return float(budget)
    except (TypeError, ValueError):
        return None


def resolve_limits(budget: str | float, overrides: Mapping[str, Any] | None = None) -> AuditLimits:
    """The limits of ``budget`` (a key of :data:`BUDGETS`, or seconds: the quick sizes within that time)
    with single fields replaced by ``overrides``."""
    seconds = budget_seconds(budget)
    if seconds is not None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"a budget in seconds must be a number > 0; got {budget!r} (e.g. --budget 60).")
        limits = replace(BUDGETS["quick"], time_limit=seconds)
    elif budget not in BUDGETS:
        raise ConfigError(
            f"unknown budget '{budget}'; choose one of {', '.join(BUDGETS)} or a number of seconds (e.g. --budget 120)."
        )
    else:
        limits = BUDGETS[budget]
    if overrides:
        names = {f.name for f in fields(AuditLimits)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(f"unknown audit limit(s) {bad}; valid: {', '.join(sorted(names))}.")
        limits = replace(limits, **{k: _check_limit(k, v) for k, v in overrides.items()})
    return limits


def _check_limit(key: str, value: Any) -> Any:
    """A validated limit value: positive numbers, tuples of non-negative numbers for the sigma / eps lists."""
    if key in ("noise_sigmas", "pgd_eps"):
        vals = value if isinstance(value, (list, tuple)) else [value]
        if not vals or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in vals
        ):
            raise ConfigError(
                f"limit {key} must be a non-empty list of numbers >= 0, e.g. [0.01, 0.03]; got {value!r}."
            )
        return tuple(float(v) for v in vals)
    if key in ("eval_samples", "test_samples") and value is None:
        return None
    if key == "time_limit":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"limit time_limit must be a number of seconds >= 0; got {value!r}.")
        return float(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "density_runs" else 1):
        raise ConfigError(f"limit {key} must be an integer >= 1; got {value!r}.")
    return value
