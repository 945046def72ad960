"""Errors a user can cause. The CLI prints their message without a traceback and exits 2."""

from __future__ import annotations

__all__ = [
    "SymgenError",
    "ConfigError",
    "ShapeError",
    "GroupActionError",
    "DivergenceError",
    "MissingDataError",
    "CheckpointError",
    "NotSeparableError",
    "MemoryBudgetError",
    "DistributedError",
]


class SymgenError(Exception):
    """Base class: the message says what was expected, what was given, and how to fix it."""


class ConfigError(SymgenError, ValueError):
    """An invalid configuration value, key or combination."""


class ShapeError(SymgenError, ValueError):
    """A tensor whose shape does not fit the operation."""


class GroupActionError(SymgenError, ValueError):
    """A group action that does not fit the input, or matrices that are not a representation."""


class DivergenceError(SymgenError, ArithmeticError):
    """A non-finite loss, gradient or linear solve."""


class MissingDataError(SymgenError, FileNotFoundError):
    """A dataset file that is not where it was expected."""


class CheckpointError(SymgenError, ValueError):
    """A checkpoint or state dict that does not match the model."""


class NotSeparableError(SymgenError, ValueError):
    """Labelled data that no hyperplane through the origin separates (a max-margin problem has no solution)."""


class MemoryBudgetError(SymgenError, MemoryError):
    """A memory budget too small for the smallest block of work; the message says what is needed."""


class DistributedError(SymgenError, RuntimeError):
    """A failed or timed-out collective operation (a rank died or hung), or a process group that does not fit."""


class CompileError(SymgenError, RuntimeError):
    """``torch.compile`` could not compile a function symgen compiles on request; the message names what failed."""


__all__ += ["CompileError"]
