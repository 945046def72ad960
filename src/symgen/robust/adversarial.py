"""PGD adversarial training, min_theta E max_{||d|| <= eps} L(f(x + d), y) (Madry et al., arXiv 1706.06083)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.errors import ConfigError
from symgen.functional import bn_mode
from symgen.rng import Seed, as_generator
from symgen.robust.attacks import accuracy
from symgen.training import LossClosure, fit

__all__ = ["adversarial_training"]


def _training_batch(x_adv: Tensor, y: Tensor, x: Tensor, clean_weight: float) -> tuple[Tensor, ...]:
    """The batch one adversarial-training step trains on: ``(x_adv, y)``, plus the clean ``x`` if it is weighted."""
    return (x_adv, y, x) if clean_weight > 0 else (x_adv, y)


def adversarial_training(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    attack: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 10,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    batch_size: int = 128,
    clean_weight: float = 0.0,
    generator: Seed = None,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """PGD adversarial training: min_theta E max_{||d|| <= eps} L(f(x + d), y) (Madry, arXiv 1706.06083).

    :func:`symgen.training.fit` with the attack as its batch transform. Attacks run in eval mode
    (BatchNorm statistics untouched); updates in train mode.

    Args:
        model: the model.
        data: ``(x, y)`` (shuffled into minibatches of ``batch_size`` by ``generator``) or a re-iterable
            of ``(x, y)`` batches (a DataLoader).
        attack: ``attack(model, x, y) -> x_adv``, e.g. ``functools.partial(pgd, eps=0.1, steps=7)``; an
            attack accepting ``generator`` gets the same generator (the shuffling and the attacks' random
            starts are one stream).
        optimizer: an instance built on ``model.parameters()`` (e.g. ``torch.optim.Adam(model.parameters(),
            lr=1e-3)``; any optimizer of the step protocol, SAM and NSO included).
        epochs: the number of epochs.
        loss_fn: L.
        batch_size: the minibatch size for ``(x, y)`` data.
        clean_weight: w in the loss ``(1 - w) L(x_adv) + w L(x)``.
        generator: a seed or a ``torch.Generator`` (None = seed 0).
        device: where the batches go (default: the model's device).

    Returns:
        The history ``{"epoch", "loss", "adv_accuracy"}`` (per epoch, on the adversarial training batches
        at the weights before each step).
    """
    if not 0.0 <= clean_weight <= 1.0:
        raise ConfigError(f"clean_weight must lie in [0, 1], got {clean_weight}.")
    g = as_generator(generator)
    try:
        takes_generator = "generator" in inspect.signature(attack).parameters
    except (TypeError, ValueError):
        takes_generator = False
    kwargs: dict[str, Any] = {"generator": g} if takes_generator else {}

    def adversarial(model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, ...]:
        with bn_mode(model, "eval"):
            x_adv = attack(model, xb, yb, **kwargs).detach()
        return _training_batch(x_adv, yb, xb, clean_weight)

    class CleanMixClosure(LossClosure):
        """loss = (1 - clean_weight) L(f(x_adv), y) + clean_weight L(f(x), y)."""

        vectorizable = False

        def __init__(
            self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_adv: Tensor, y: Tensor, x: Tensor
        ) -> None:
            super().__init__(model, loss_fn, x_adv, y)
            self.x_clean = x

        def compute(self) -> tuple[Tensor, Tensor]:
            out = self.model(self.x)
            loss = self.loss_fn(out, self.y)
            return (1 - clean_weight) * loss + clean_weight * self.loss_fn(self.model(self.x_clean), self.y), out

    hist = fit(
        model,
        data,
        optimizer,
        loss_fn=loss_fn,
        epochs=epochs,
        batch_size=batch_size,
        generator=g,
        device=device,
        transform=adversarial,
        closure=CleanMixClosure if clean_weight > 0 else LossClosure,
        metrics={"adv_accuracy": accuracy},
    )
    return {"epoch": hist["epoch"], "loss": hist["loss"], "adv_accuracy": hist["adv_accuracy"]}
