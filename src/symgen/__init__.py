"""symgen: symmetry and flatness in deep learning, with numbers.

Submodules load on first use (``symgen.curvature``, ``symgen.ntk``, ...), so ``import symgen``
stays cheap; ``from symgen.audit import audit`` then ``audit(model, data, action=...)`` audits a model.
"""

from __future__ import annotations

import importlib
from typing import Any

from symgen.errors import SymgenError

__version__ = "0.1.0"

_SUBMODULES = (
    "audit",
    "augment",
    "curvature",
    "data",
    "ensemble",
    "errors",
    "functional",
    "groups",
    "io",
    "margins",
    "metrics",
    "models",
    "nn",
    "ntk",
    "optim",
    "rng",
    "robust",
    "stats",
    "symmetry",
    "training",
)

__all__ = ["SymgenError", "__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"symgen.{name}")
    raise AttributeError(f"module 'symgen' has no attribute '{name}'")
