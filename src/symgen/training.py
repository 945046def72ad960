"""One training loop: ``fit(model, data, optimizer)``, every step through ``optimizer.step(closure)``.

Any ``torch.optim`` optimizer, SAM/ASAM, NSO and UnitNormSGD take the same step protocol: the
closure (a :class:`~symgen.optim.LossClosure`) zeroes gradients, computes the loss and calls
``backward``; wrapper optimizers call it as often as they need (NSO evaluates its perturbed copies
together with ``vmap`` when it recognizes the closure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.optim.closure import LossClosure
from symgen.rng import Seed, as_generator
from symgen.streaming import is_tensor_pair

__all__ = ["fit", "History", "LossClosure"]

Metric = Callable[[Tensor, Tensor], float]


@dataclass
class History:
    """What :func:`fit` measured: one record per epoch and the last step's loss.

    A record holds ``epoch`` (1-based), ``steps`` (in that epoch), ``loss`` (the mean over the epoch's
    samples of each step's loss at the weights before the step), each metric (same mean, on the outputs
    of that pass) and whatever the callback returned. ``history["loss"]`` is the column of one key.
    """

    records: list[dict[str, float]] = field(default_factory=list)
    num_steps: int = 0
    last_loss: float = math.nan

    def __getitem__(self, key: str) -> list[float]:
        return [r[key] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def _tensor_batches(
    x: Tensor, y: Tensor, batch_size: int | None, shuffle: bool, drop_last: bool, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of minibatches; the order ``torch.randperm(n, generator)`` is drawn at the first batch."""
    n = x.shape[0]
    if batch_size is None:  # full batch, in the given order: no permutation, no draws
        yield x, y
        return
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else None
    stop = n - batch_size + 1 if drop_last else n
    for i in range(0, stop, batch_size):
        if order is None:
            yield x[i : i + batch_size], y[i : i + batch_size]
        else:
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


def _loader_batches(data: Iterable[Any], device: torch.device | None) -> Iterator[tuple[Tensor, Tensor]]:
    # Not a streaming.BatchStream on purpose: training streams one-shot iterators without holding them, and
    # its batches may change per-sample shape from one batch to the next (sequences padded per batch).
    for b in data:
        try:
            xb, yb = b[0], b[1]
        except (TypeError, IndexError, KeyError):
            raise ShapeError(
                f"each batch of data must be (x, y) tensors (or a sequence starting with them); got {type(b).__name__}."
            ) from None
        yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)


def _check_args(
    model: nn.Module, optimizer: object, epochs: int | None, steps: int | None, batch_size: int | None
) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        what = f"the class {optimizer.__name__}" if isinstance(optimizer, type) else type(optimizer).__name__
        raise ConfigError(
            f"optimizer must be an optimizer instance built on the model's parameters, e.g. "
            f"torch.optim.SGD(model.parameters(), lr=0.1) or SAM(model.parameters(), torch.optim.SGD, "
            f"lr=0.1); got {what}."
        )
    own = {id(p) for p in model.parameters()}
    if own and not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("the optimizer updates none of the model's parameters; build it on model.parameters().")
    if epochs is not None and steps is not None:
        raise ConfigError(f"give epochs or steps, not both (got epochs={epochs}, steps={steps}).")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}.")
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"steps must be an integer >= 0, got {steps!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be an integer >= 1 or None (full batch), got {batch_size!r}.")


def fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = 128,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: Seed = None,
    device: torch.device | str | None = None,
    transform: Callable[[nn.Module, Tensor, Tensor], tuple[Any, ...]] | None = None,
    closure: Callable[..., LossClosure] = LossClosure,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    metrics: Mapping[str, Metric] | None = None,
    callback: Callable[[int, nn.Module], Mapping[str, float] | None] | None = None,
) -> History:
    """Train ``model`` on ``data``: each step is ``optimizer.step(closure(model, loss_fn, x, y))``.

    The model is in train mode during the steps; every module's mode is restored after. Per step:
    ``transform`` gives the batch ``(x', y', *extra)`` the step trains on, ``closure`` builds the closure,
    ``optimizer.step`` takes it, then ``scheduler.step()`` if given.

    Args:
        model: the model to train.
        data: ``(x, y)`` tensors, cut each epoch into minibatches of ``batch_size`` in the order
            ``torch.randperm(n, generator=g)``, g = ``rng.as_generator(generator)``; or any re-iterable of
            ``(x, y)`` batches such as a DataLoader (its own order).
        optimizer: an optimizer instance built on the model's parameters.
        loss_fn: ``loss_fn(output, y)``, the loss.
        epochs: the number of epochs (default 1); give this or ``steps``.
        steps: the exact number of steps (epochs repeat, each reshuffled, until this many are done).
        batch_size: the minibatch size for tensor data; None: the full batch in the given order, no draws.
        shuffle: reshuffle tensor data each epoch (False: in order).
        drop_last: skip a last partial batch of tensor data.
        generator: a seed or a ``torch.Generator`` for the shuffles.
        device: where tensors and batches go (default: the model's device).
        transform: ``transform(model, x, y) -> (x', y', *extra)`` (e.g. adversarial examples), or None.
        closure: ``closure(model, loss_fn, x', y', *extra)`` builds the step's closure (default
            :class:`LossClosure`: loss = loss_fn(model(x'), y')).
        scheduler: a learning-rate scheduler stepped after each step, or None.
        metrics: ``name -> fn(output, y')`` on the outputs of the pass at the weights before the step,
            averaged over the epoch's samples like the loss.
        callback: ``callback(epoch, model)`` runs after each epoch (1-based) and may return a dict for the record.

    Returns:
        The :class:`History`: one record per epoch.

    Raises:
        ConfigError: an optimizer that is not an instance on the model's parameters, both ``epochs`` and
            ``steps``, or an invalid count or batch size.
        DivergenceError: a non-finite loss (naming the epoch and step), before that step's update.
    """
    _check_args(model, optimizer, epochs, steps, batch_size)
    if steps is None and epochs is None:
        epochs = 1
    metrics = dict(metrics or {})
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else None
    device = torch.device(device) if device is not None else None
    tensors = is_tensor_pair(data)
    if tensors:
        x, y = data[0], data[1]  # type: ignore[index]
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ShapeError(f"x and y need the same non-zero number of samples; got {x.shape[0]} and {y.shape[0]}.")
        if device is not None:
            x, y = x.to(device), y.to(device)
        if batch_size is not None and drop_last and batch_size > x.shape[0]:
            raise ConfigError(
                f"drop_last with batch_size {batch_size} > {x.shape[0]} samples leaves no batch; "
                "lower batch_size or set drop_last=False."
            )
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ShapeError(
            "data must be (x, y) tensors or an iterable of (x, y) batches (e.g. a DataLoader); "
            f"got {type(data).__name__}."
        )
    g = as_generator(generator)
    history = History()
    modes = [(m, m.training) for m in model.modules()]
    epoch = 0
    try:
        model.train()
        while (history.num_steps < steps) if steps is not None else (epoch < epochs):  # type: ignore[operator]
            epoch += 1
            batches = (
                _tensor_batches(x, y, batch_size, shuffle, drop_last, g) if tensors else _loader_batches(data, device)
            )
            sums: dict[str, float] = {"loss": 0.0, **{k: 0.0 for k in metrics}}
            count, done = 0, 0
            for xb, yb in batches:
                batch = tuple(transform(model, xb, yb)) if transform is not None else (xb, yb)
                c = closure(model, loss_fn, *batch)
                optimizer.zero_grad(set_to_none=True)
                try:
                    # torch's stub types a closure as returning float; the step protocol returns the loss tensor
                    optimizer.step(c)  # type: ignore[arg-type]
                except DivergenceError as e:
                    raise DivergenceError(
                        f"training diverged in epoch {epoch}, step {done + 1} ({history.num_steps} steps done): {e}"
                    ) from e
                if c.loss is None:
                    raise ConfigError(
                        f"{type(optimizer).__name__}.step() did not call the closure; fit needs an "
                        "optimizer that takes the step protocol optimizer.step(closure)."
                    )
                value = float(c.loss)
                n = int(batch[1].shape[0])
                sums["loss"] += value * n
                for name, fn in metrics.items():
                    sums[name] += float(fn(c.output, batch[1])) * n  # type: ignore[arg-type]
                count += n
                done += 1
                history.num_steps += 1
                history.last_loss = value
                if scheduler is not None:
                    scheduler.step()
                if steps is not None and history.num_steps == steps:
                    break
            if done == 0 and steps is not None:
                raise ConfigError(
                    "an epoch of data gave no batch, so the steps can never be done; check data and batch_size."
                )
            record: dict[str, float] = {
                "epoch": epoch,
                "steps": done,
                **{k: v / max(count, 1) for k, v in sums.items()},
            }
            if callback is not None:
                extra = callback(epoch, model)
                model.train()
                if extra:
                    record.update(extra)
            history.records.append(record)
    finally:
        for m, t in modes:
            m.training = t
    return history
