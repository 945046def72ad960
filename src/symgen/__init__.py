"""symgen: symmetry and flatness in deep learning, with numbers.

Submodules load on first use (``symgen.curvature``, ``symgen.ntk``, ...), so ``import symgen``
stays cheap; ``from symgen.audit import audit`` then ``audit(model, data, action=...)`` audits a model.
``dir(symgen)`` lists them for tab completion, and type checkers see them as imports.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from symgen.errors import SymgenError

try:
    __version__ = version("symgen")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


if TYPE_CHECKING:
    from symgen import (
        audit,
        augment,
        curvature,
        data,
        distributed,
        ensemble,
        errors,
        evaluation,
        functional,
        groups,
        io,
        labels,
        margins,
        metrics,
        models,
        nn,
        ntk,
        optim,
        rng,
        robust,
        stats,
        streaming,
        symmetry,
        training,
    )

__all__ = [
    "SymgenError",
    "__version__",
    "audit",
    "augment",
    "curvature",
    "data",
    "distributed",
    "ensemble",
    "errors",
    "evaluation",
    "functional",
    "groups",
    "io",
    "labels",
    "margins",
    "metrics",
    "models",
    "nn",
    "ntk",
    "optim",
    "rng",
    "robust",
    "stats",
    "streaming",
    "symmetry",
    "training",
]
_SUBMODULES = frozenset(__all__[2:])  # loaded on first use


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"symgen.{name}")
    raise AttributeError(f"module 'symgen' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
