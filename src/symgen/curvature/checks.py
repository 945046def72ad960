"""Checks shared by the operators and the estimators: counts, the operator protocol, visible fallbacks.

The estimators (:mod:`~symgen.curvature.trace`, :mod:`~symgen.curvature.lanczos`) need only what
:class:`SymmetricOperator` describes, so they import this module and never the operator classes
(no import cycle between the operators, whose methods call the estimators, and the estimators),
as curvlinops keeps its checks apart from its operators.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from symgen import memory
from symgen.errors import ConfigError

__all__ = ["SymmetricOperator", "FallbackWarning", "as_operator", "check_positive", "check_vectors"]


@runtime_checkable
class SymmetricOperator(Protocol):
    """What an estimator needs of a symmetric ``n x n`` operator (e.g. a ``CurvatureOperator``).

    ``matvec(v)``: ``A v`` for ``v (n,)``; ``matmat(V)``: ``A V`` for columns ``V (n, k)``;
    ``quadratic_forms(V)``: ``(v_i^T A v_i)_i`` for the columns of ``V``, shape ``(k,)``.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v (n,)``.

        Args:
            v: shape (n,).

        Returns:
            shape (n,).
        """
        ...

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for columns ``V (n, k)``.

        Args:
            V: shape (n, k).

        Returns:
            shape (n, k).
        """
        ...

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """``v_i^T A v_i`` for the columns ``v_i`` of ``V (n, k)``.

        Args:
            V: shape (n, k).

        Returns:
            shape (k,).
        """
        ...


class FallbackWarning(UserWarning):
    """An operator could not take its fast path (Taylor mode, the fast double backward) and fell back."""


def check_positive(name: str, value: Any, minimum: int = 1, why: str = "") -> None:
    """Raise a ConfigError unless ``value`` is an int ``>= minimum``.

    Args:
        name: the argument's name, as the user wrote it.
        value: the value passed.
        minimum: the smallest valid value.
        why: the reason for the minimum, appended to the message (e.g. "two probes for a standard error").
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        reason = f" ({why})" if why else ""
        raise ConfigError(f"{name} must be an integer >= {minimum}{reason}, got {value!r}.")


def as_operator(op: Any, caller: str) -> SymmetricOperator:
    """``op`` itself if it is a symmetric operator; otherwise a ConfigError that says how to make one.

    Args:
        op: the object passed as the operator.
        caller: the public function's name, for the message.

    Returns:
        ``op``, typed as a :class:`SymmetricOperator`.
    """
    if isinstance(op, Tensor) or not isinstance(op, SymmetricOperator):
        raise ConfigError(
            f"{caller}() takes a CurvatureOperator (HessianOperator, GGNOperator, or "
            f"MatrixOperator(A) for a symmetric matrix A); got {type(op).__name__}."
        )
    return op


def warn_fallback(owner: object, path: str, reason: str) -> None:
    """Warn once per ``owner`` and ``path`` that ``owner`` falls back from ``path`` because of ``reason``.

    Args:
        owner: the operator (its type names it in the message).
        path: the fast path given up ("Taylor mode", "the fast double backward").
        reason: why, e.g. the operation without a Taylor rule.
    """
    warned: set[str] = owner.__dict__.setdefault("_warned_fallbacks", set())
    if path in warned:
        return
    warned.add(path)
    warnings.warn(
        f"{type(owner).__name__}: {path} cannot be used ({reason}); falling back.", FallbackWarning, stacklevel=3
    )


def check_vectors(op: SymmetricOperator, count: int, what: str, how_to_fix: str) -> None:
    """Raise a MemoryBudgetError before ``count`` vectors of the operator's size are allocated, if they cannot fit.

    Args:
        op: the operator (its dimension, dtype and device size the vectors).
        count: how many n-vectors will be held at once.
        what: what holds them (e.g. "a Lanczos basis of 100 steps").
        how_to_fix: how to ask for less, for the message.
    """
    item = torch.empty(0, dtype=op.dtype).element_size()
    memory.check_fits(count * op.dim * item, f"{what} ({count} x {op.dim} {op.dtype})", how_to_fix, device=op.device)
