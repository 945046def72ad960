"""Optimizers that compute the gradient their own way and let a base optimizer take the step (SAM, NSO)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from symgen.errors import ConfigError

__all__ = ["WrapperOptimizer"]


class WrapperOptimizer(torch.optim.Optimizer):
    """A wrapper around ``base_optimizer``, given as a CLASS with its keyword arguments (lr, momentum, ...),
    as torch's ``ZeroRedundancyOptimizer(optimizer_class=...)`` takes it.

    Wrapper and base share ``param_groups`` (per-group hyper-parameters, learning-rate schedulers act on
    both) and ``state`` (so ``state_dict()`` holds the base optimizer's momentum and moments, and
    ``load_state_dict`` restores them: a resumed run continues exactly).
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        defaults: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        if not isinstance(base_optimizer, type) or not issubclass(base_optimizer, torch.optim.Optimizer):
            got = (
                f"an instance of {type(base_optimizer).__name__}"
                if isinstance(base_optimizer, torch.optim.Optimizer)
                else repr(base_optimizer)
            )
            raise ConfigError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got {got}; "
                "pass the class and its arguments (lr, momentum, ...) as keywords."
            )
        super().__init__(params, {**defaults, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state
