"""Accuracy, loss and PGD robust accuracy of a classifier streamed over a whole dataset (a DataLoader).

One batch in memory at a time; counts and loss sums in float64; with a process group every rank
evaluates its shard and the sums are all-reduced (:mod:`symgen.distributed`), so every rank gets the
whole dataset's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from symgen import distributed
from symgen.errors import ConfigError, ShapeError
from symgen.functional import bn_mode as _bn_mode
from symgen.rng import Seed, as_generator
from symgen.robust import LossSpec, correct_count, pgd
from symgen.streaming import BatchStream, model_device

__all__ = ["Evaluation", "evaluate"]


@dataclass
class Evaluation:
    """``clean_accuracy`` (and ``loss`` when a ``loss_fn`` was given) over ``num_data`` samples, and the
    accuracy under a PGD attack of each radius in ``robust_accuracy`` (eps -> accuracy). ``loss_stderr``:
    the standard error of the mean loss (sample standard deviation / sqrt(n)), when ``loss_fn`` returned
    per-sample losses."""

    num_data: int
    clean_accuracy: float
    loss: float | None = None
    robust_accuracy: dict[float, float] = field(default_factory=dict)
    loss_stderr: float | None = None


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    eps: Iterable[float] = (),
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    clamp: tuple[float, float] | None = None,
    attack_loss: LossSpec = "auto",
    random_start: bool = True,
    generator: Seed = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    bn_mode: str = "eval",
    process_group: Any = "auto",
) -> Evaluation:
    """Clean accuracy (and mean ``loss_fn``) and PGD robust accuracy at each radius in ``eps`` over ``data``.

    Without random starts the numbers do not depend on the batch size (eval mode: samples never interact).
    Madry et al., arXiv 1706.06083.

    Args:
        model: the classifier.
        data: a batch ``(x, y)``, a list of batches or a DataLoader, streamed (batches moved to the model's
            device).
        eps: the attack radii (finite, >= 0); empty: clean numbers only.
        steps: PGD steps (:func:`symgen.robust.pgd`), as are ``step_size``, ``norm``, ``clamp``,
            ``attack_loss`` and ``random_start``.
        step_size: PGD step size.
        norm: PGD norm.
        clamp: PGD input range.
        attack_loss: the loss PGD ascends.
        random_start: whether PGD starts at a random point of the ball.
        generator: a seed or a ``torch.Generator`` (None = seed 0) for the random starts, drawn in batch order.
        loss_fn: ``loss_fn(out, y)``, the batch's mean loss or per-sample losses ``(B,)``
            (``reduction="none"``, which also give ``loss_stderr``); it may raise a
            :class:`~symgen.errors.SymgenError` to reject outputs.
        bn_mode: BatchNorm in "eval" (running statistics) or "train" (batch statistics) mode.
        process_group: the group the counts are summed over (:func:`symgen.distributed.resolve_group`).

    Returns:
        The :class:`Evaluation`.

    Raises:
        ConfigError: a negative or non-finite radius, or a model that is not an ``nn.Module``.
        ShapeError: the model fails on a batch (naming the input shape), or ``data`` holds no samples.
    """
    radii = [float(e) for e in eps]
    if any(not math.isfinite(e) or e < 0 for e in radii):
        raise ConfigError(f"eps must be finite radii >= 0, got {radii}.")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"evaluate() takes an nn.Module, got {type(model).__name__}.")
    group = distributed.resolve_group(process_group)
    dev = model_device(model)
    stream = BatchStream(data, device=dev, allow_empty=group is not None)
    gen = as_generator(generator)
    # [count, correct, loss sum, squared-loss sum, per-sample flag, correct per eps]
    sums = torch.zeros(5 + len(radii), dtype=torch.float64)
    with _bn_mode(model, bn_mode):
        for x, y in stream:
            with torch.no_grad():
                out = _forward(model, x)
                if loss_fn is not None:
                    losses = loss_fn(out, y).detach().double().cpu()
                    if losses.ndim == 1 and losses.shape[0] == x.shape[0]:
                        sums[2:5] += torch.stack([losses.sum(), (losses * losses).sum(), losses.new_tensor(1.0)])
                    else:
                        sums[2] += x.shape[0] * float(losses)
                sums[1] += float(correct_count(out, y))
            for i, e in enumerate(radii):
                x_adv = pgd(
                    model,
                    x,
                    y,
                    e,
                    step_size,
                    steps,
                    norm=norm,
                    clamp=clamp,
                    random_start=random_start,
                    loss=attack_loss,
                    generator=gen,
                )
                with torch.no_grad():
                    sums[5 + i] += float(correct_count(model(x_adv), y))
            sums[0] += x.shape[0]
    sums = distributed.all_reduce_sum(sums, group)
    n = float(sums[0])
    if n == 0:
        raise ShapeError("data holds no samples on any rank; pass a batch (x, y) or a non-empty loader.")
    mean = None if loss_fn is None else float(sums[2]) / n
    stderr = None
    if mean is not None and float(sums[4]) > 0:  # per-sample losses were given
        var = max(float(sums[3]) - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.inf
        stderr = math.sqrt(var / n)
    return Evaluation(
        int(n), float(sums[1]) / n, mean, {e: float(sums[5 + i]) / n for i, e in enumerate(radii)}, stderr
    )


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``; a failure (typically a shape mismatch) is a :class:`ShapeError` naming the input shape."""
    try:
        return model(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise ShapeError(
            f"the model failed on inputs of shape {tuple(x.shape[1:])} "
            f"({str(e).splitlines()[0][:200]}); check that the data (--data) is the data the "
            "model was built for."
        ) from None
