"""The closure of one optimizer step, as an object that optimizers can look inside.

``optimizer.step(closure)`` is the one step protocol (torch.optim): the closure zeroes gradients,
computes the loss, calls ``backward`` and returns the loss. :class:`LossClosure` is such a closure
for the common loss ``loss_fn(model(x), y)``. Plain optimizers just call it; :class:`~symgen.optim.NSO`
recognizes it and evaluates the loss at all of its perturbed weights at once with ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from symgen.errors import DivergenceError

__all__ = ["LossClosure"]


class LossClosure:
    """``closure()``: zero the model's gradients, loss = loss_fn(model(x), y), ``backward``; returns the loss.

    The first call (at the weights before the step) is recorded in ``loss`` and ``output`` (detached),
    so a loop can report the loss and metrics of the step whatever the optimizer; a non-finite loss there
    raises :class:`DivergenceError` before ``backward``, so no update is taken. Later calls (an
    optimizer's passes at perturbed weights) are checked by that optimizer.

    Subclasses may override :meth:`compute` for another loss of the batch; they then set
    ``vectorizable = False`` (the loss is no longer ``loss_fn(model(x), y)``, which NSO's vectorized
    path evaluates functionally).

    Args:
        model: the model.
        loss_fn: ``loss_fn(output, y)``.
        x: the batch's inputs.
        y: its targets.
    """

    vectorizable: ClassVar[bool] = True

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Any, y: Any) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.x = x
        self.y = y
        self.loss: Tensor | None = None
        self.output: Tensor | None = None
        self.num_calls = 0

    def compute(self) -> tuple[Tensor, Tensor]:
        """One forward pass at the model's current weights.

        Returns:
            ``(loss, output)``.
        """
        out = self.model(self.x)
        return self.loss_fn(out, self.y), out

    def evaluate(self, backward: bool = True, check: bool = True) -> Tensor:
        """One pass: with ``backward`` the gradients are zeroed and replaced by this loss's; else forward only.

        Args:
            backward: zero the gradients and backpropagate this loss.
            check: raise :class:`DivergenceError` if the first call's loss is not finite (NSO checks itself).

        Returns:
            The loss, detached.
        """
        with torch.enable_grad() if backward else torch.no_grad():
            if backward:
                self.model.zero_grad(set_to_none=True)
            loss, out = self.compute()
        first = self.num_calls == 0
        self.num_calls += 1
        if first:
            self.loss = loss.detach()
            self.output = out.detach() if isinstance(out, Tensor) else out
            if check and not bool(torch.isfinite(self.loss).all()):
                raise DivergenceError(
                    f"non-finite loss {float(self.loss)} at the weights before the step; lower "
                    "the learning rate, or check the data and the initialization."
                )
        if backward:
            loss.backward()
        return loss.detach()

    def __call__(self) -> Tensor:
        """The step's closure: zero the gradients, compute the loss, ``backward``.

        Returns:
            The loss, detached.
        """
        return self.evaluate(backward=True)
