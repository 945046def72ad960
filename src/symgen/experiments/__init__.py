"""Registered experiments, one module per reproduced claim set (the claims: docs/claims.md)."""

from __future__ import annotations

import importlib

from symgen.errors import ConfigError
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, build_config

__all__ = [
    "REGISTRY",
    "get_experiment",
    "list_experiments",
    "Claim",
    "Context",
    "Experiment",
    "ExperimentConfig",
    "build_config",
]

# name -> module holding a module-level ``EXPERIMENT``; imported lazily so the CLI starts fast.
REGISTRY: dict[str, str] = {
    "implicit-bias": "symgen.experiments.implicit_bias",
    "unit-norm": "symgen.experiments.unit_norm",
    "flat-minima": "symgen.experiments.flat_minima",
    "ntk": "symgen.experiments.ntk",
    "kip": "symgen.experiments.kip",
    "ntk-robustness": "symgen.experiments.ntk_robustness",
    "ensemble-equivariance": "symgen.experiments.ensemble_equivariance",
    "inductive-bias": "symgen.experiments.inductive_bias",
    "forgetting": "symgen.experiments.forgetting",
}


def get_experiment(name: str) -> Experiment:
    """The registered experiment called ``name``.

    Args:
        name: a key of ``REGISTRY`` (``symgen list``).

    Returns:
        the module's ``EXPERIMENT``.

    Raises:
        ConfigError: for an unknown name.
    """
    if name not in REGISTRY:
        raise ConfigError(
            f"unknown experiment '{name}'; known: {', '.join(sorted(REGISTRY)) or 'none'}. Run `symgen list`."
        )
    return importlib.import_module(REGISTRY[name]).EXPERIMENT


def list_experiments() -> list[Experiment]:
    """Every registered experiment, in registry order (the order ``symgen list`` and ``reproduce`` use)."""
    return [get_experiment(n) for n in REGISTRY]
