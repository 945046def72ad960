"""The audit's budget: how many samples, probes and steps each section may use, and its time limit."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from symgen.errors import ConfigError

__all__ = [
    "AuditLimits",
    "BUDGETS",
    "RENAMED",
    "resolve_limits",
    "budget_seconds",
    "current_limit_names",
    "register_limit",
    "unregister_limit",
]


@dataclass(frozen=True)
class AuditLimits:
    """Sample sizes and iteration counts of every section, and the wall-time limit of the audit.

    The audit sizes each section's work to ``time_limit`` (:mod:`symgen.audit.planning`) from a
    timing of the model, re-planned after each section from the throughput measured so far; a long
    section checks the clock between its blocks and stops early with what it has (and says so).

    Names follow the conventions of ``docs/architecture.md``: a count of data points is ``*_num_data``
    (a subsample of a split), a count of noise draws ``*_num_samples``. The names they replace
    (:data:`RENAMED`) are still accepted with a ``DeprecationWarning``.
    """

    time_limit: float = 60.0
    batch_size: int = 512
    eval_num_data: int | None = 2000  # training-split subsample of the performance section (None: whole)
    test_num_data: int | None = None  # None: the whole test split, streamed batch by batch
    invariance_num_data: int = 256
    symmetry_num_data: int = 32
    hessian_num_data: int = 128
    hutchinson_probes: int = 24
    top_eigenvalues: int = 3
    eigen_iters: int = 30
    density_runs: int = 2  # >= 2 gives the density's implied trace an error bar
    density_steps: int = 24
    noise_num_data: int = 128
    noise_num_samples: int = 16
    noise_sigmas: tuple[float, ...] = (0.003, 0.01, 0.03)
    ntk_num_data: int = 48
    ntk_subsamples: int = 3
    pgd_num_data: int = 200
    pgd_steps: int = 10
    pgd_eps: tuple[float, ...] = (0.01, 0.03, 0.1)  # fractions of the input range
    # limits of sections registered beyond the built-in ones (symgen.audit.registry.Limit), by name
    extra: dict[str, Any] = field(default_factory=dict, compare=True)

    def get(self, name: str) -> Any:
        """The limit ``name``: a field, or a registered section's limit in ``extra``.

        Args:
            name: the limit's name.

        Returns:
            Its value.
        """
        return self.extra[name] if name in self.extra else getattr(self, name)

    def with_values(self, **values: Any) -> AuditLimits:
        """A copy with these limits replaced (fields or ``extra`` entries).

        Args:
            **values: limit name -> value.

        Returns:
            The new limits.
        """
        own = {k: v for k, v in values.items() if k in _FIELDS}
        extra = {**self.extra, **{k: v for k, v in values.items() if k not in _FIELDS}}
        return replace(self, **own, extra=extra)

    def as_dict(self) -> dict[str, Any]:
        """Every limit by name, ``extra`` flattened in (what ``audit.json`` stores)."""
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "extra"}, **self.extra}


#: Former limit names -> current ones. "samples" meant data points here but noise draws everywhere else
#: in symgen; a count of data points is now ``*_num_data`` and the noise draws ``noise_num_samples``.
RENAMED: dict[str, str] = {
    "eval_samples": "eval_num_data",
    "test_samples": "test_num_data",
    "invariance_samples": "invariance_num_data",
    "symmetry_samples": "symmetry_num_data",
    "hessian_samples": "hessian_num_data",
    "noise_samples": "noise_num_data",
    "ntk_samples": "ntk_num_data",
    "pgd_samples": "pgd_num_data",
    "noise_draws": "noise_num_samples",
}


def current_limit_names(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``overrides`` with every former limit name (:data:`RENAMED`) replaced by the current one.

    A former name gives a ``DeprecationWarning`` that names its replacement; the same limit given
    under both names is a :class:`ConfigError`.

    Args:
        overrides: limit name -> value, as a user gave them (None: none).

    Returns:
        A new dict under the current names, in the given order.
    """
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        new = RENAMED.get(key)
        if new is not None:
            if new in (overrides or {}):
                raise ConfigError(f"audit limit '{key}' is the former name of '{new}'; give only '{new}'.")
            warnings.warn(
                f"audit limit '{key}' is renamed '{new}' (a count of data points is *_num_data, of noise "
                f"draws *_num_samples); '{key}' will stop working in a future version.",
                DeprecationWarning,
                stacklevel=3,
            )
            key = new
        out[key] = value
    return out


_FIELDS = {f.name for f in fields(AuditLimits)} - {"extra"}
# registered sections' limits that are not AuditLimits fields: name -> (quick value, full value)
_EXTRA: dict[str, tuple[Any, Any]] = {}


def register_limit(name: str, quick: Any, full: Any) -> None:
    """Make ``name`` a limit of every budget (a registered section's; a field of AuditLimits is left as is).

    Args:
        name: the limit's name.
        quick: its value in the quick budget (and a budget in seconds).
        full: its value in the full budget (None: the quick value).
    """
    if name not in _FIELDS:
        _EXTRA[name] = (quick, quick if full is None else full)


def unregister_limit(name: str) -> None:
    """Forget a registered section's limit.

    Args:
        name: the limit's name.
    """
    _EXTRA.pop(name, None)


BUDGETS: dict[str, AuditLimits] = {
    "quick": AuditLimits(),
    "full": AuditLimits(
        time_limit=3600.0,
        eval_num_data=None,
        invariance_num_data=2000,
        symmetry_num_data=64,
        hessian_num_data=2000,
        hutchinson_probes=200,
        top_eigenvalues=5,
        eigen_iters=150,
        density_runs=3,
        density_steps=80,
        noise_num_data=2000,
        noise_num_samples=64,
        noise_sigmas=(0.001, 0.003, 0.01, 0.03, 0.1),
        ntk_num_data=200,
        ntk_subsamples=3,
        pgd_num_data=1000,
        pgd_steps=40,
        pgd_eps=(0.003, 0.01, 0.03, 0.1, 0.3),
    ),
}


def budget_seconds(budget: str | float) -> float | None:
    """The seconds of a numeric budget (``60``, ``"90"``, ``"2.5"``), None for a named one.

    Args:
        budget: a budget name or a number of seconds.

    Returns:
        The seconds, or None.
    """
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
    with single fields replaced by ``overrides``.

    Args:
        budget: quick, full or a number of seconds.
        overrides: limit name -> value; a former name (:data:`RENAMED`) is accepted with a
            ``DeprecationWarning``.

    Returns:
        The validated limits.
    """
    overrides = current_limit_names(overrides)
    seconds = budget_seconds(budget)
    if seconds is not None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"a budget in seconds must be a number > 0; got {budget!r} (e.g. --budget 60).")
        limits = replace(BUDGETS["quick"], time_limit=seconds)
        budget = "quick"
    elif budget not in BUDGETS:
        raise ConfigError(
            f"unknown budget '{budget}'; choose one of {', '.join(BUDGETS)} or a number of seconds (e.g. --budget 120)."
        )
    else:
        limits = BUDGETS[str(budget)]
    extra = {k: (q if budget != "full" else f) for k, (q, f) in _EXTRA.items()}
    limits = replace(limits, extra=extra)
    if overrides:
        names = _FIELDS | set(_EXTRA)
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(f"unknown audit limit(s) {bad}; valid: {', '.join(sorted(names))}.")
        limits = limits.with_values(**{k: _check_limit(k, v) for k, v in overrides.items()})
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
    if key in _EXTRA and not isinstance(_EXTRA[key][0], int):
        return value  # a registered section's limit that is not a count: the section checks it
    if key in ("eval_num_data", "test_num_data") and value is None:
        return None
    if key == "time_limit":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"limit time_limit must be a number of seconds >= 0; got {value!r}.")
        return float(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "density_runs" else 1):
        raise ConfigError(f"limit {key} must be an integer >= 1; got {value!r}.")
    return value
