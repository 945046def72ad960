"""The Hessian of a network's loss as a matrix-free symmetric operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from symgen import functional as F
from symgen.curvature.base import ModelOperator
from symgen.errors import ConfigError

__all__ = ["HessianOperator"]


class HessianOperator(ModelOperator):
    """The Hessian H = d^2 L / dW^2 of a model's loss w.r.t. its parameters (see :class:`ModelOperator`
    for ``data``, ``reduction``, ``param_names``, ``bn_mode``, ``batching``, ``chunk_size``, ``cache_graph``, ``process_group``; ``data`` may be a DataLoader, streamed).

    Products ``H v`` are taken by reverse-over-reverse on one retained graph of the gradient per
    batch (``hvp_mode="reverse"``, the fastest on CPU in benchmarks/curvature.py) or by
    forward-over-reverse (``"forward"``). Pearlmutter 1994 (Neural Computation 6:147); the retained
    graph is PyHessian's (arXiv 1912.07145). ``bn_mode="eval"`` is PyHessian's choice.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data: Any, *,
                 param_names: Iterable[str] | None = None, bn_mode: str = "eval", reduction: str = "mean",
                 hvp_mode: str = "reverse", batching: str = "loop", chunk_size: int | None = None,
                 cache_graph: bool | None = None, process_group: Any = "auto") -> None:
        if hvp_mode not in ("reverse", "forward"):
            raise ConfigError(f"hvp_mode must be 'reverse' or 'forward', got '{hvp_mode}'.")
        self.hvp_mode = hvp_mode
        super().__init__(model, loss_fn, data, param_names=param_names, bn_mode=bn_mode, reduction=reduction,
                         batching=batching, chunk_size=chunk_size, cache_graph=cache_graph,
                         process_group=process_group)

    def _build_product(self, x: Tensor, y: Tensor) -> Callable[[F.Params], F.Params]:
        return F.hvp_function(self._batch_loss(x, y), self.params, mode=self.hvp_mode)
