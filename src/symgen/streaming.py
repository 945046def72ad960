"""Streaming over data: a re-iterable, validated stream of batches (a batch, a list, or a DataLoader)
and the one device of a model. Operators, noise stability, the NTK and evaluation loops iterate a
:class:`BatchStream` so memory holds one batch at a time, whatever the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, TypeAlias, TypeGuard, Union

import torch
from torch import Tensor, nn

from symgen.errors import ConfigError, ShapeError

__all__: list[str] = []

__all__ += ["Batch", "Data", "BatchStream", "model_device"]

#: One batch: ``(x, y)`` (a tuple or list of tensors; ``(x,)`` or a tensor ``x`` where only inputs are needed).
Batch: TypeAlias = Union[tuple[Tensor, ...], list[Tensor], Tensor]
#: Data a streaming function takes: one batch, a list of batches, or any re-iterable of batches (a
#: ``torch.utils.data.DataLoader``, a :class:`BatchStream`); see :func:`is_tensor_pair`.
Data: TypeAlias = Union[Batch, Sequence[Batch], Iterable[Any]]


def _signature(t: Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return (tuple(t.shape[1:]), t.dtype)


class BatchStream:
    """A re-iterable stream of batches ``(x, y)`` (or ``(x,)`` with ``inputs_only``), moved to ``device``.

    ``data``: one batch ``(x, y)`` (or one tensor ``x`` with ``inputs_only``), a list of batches (kept in
    memory), or any re-iterable of batches such as a ``torch.utils.data.DataLoader`` (iterated afresh on
    every pass, so memory holds one batch at a time). A one-shot iterator is materialized once. Every batch
    must have the per-sample shapes and dtypes of the first (the last may be shorter); a change midway, a
    non-tensor batch or an empty stream is a ``ShapeError``. ``num_data`` and ``num_batches`` are known
    after the first full pass (or at once for in-memory data). ``allow_empty``: a data-parallel rank may
    own no batch (the operators check the total over ranks). A shuffling loader is fine for sums over
    the dataset (eval-mode products); with train-mode BatchNorm the batch composition matters.

    Args:
        data: one batch, a list of batches or a re-iterable of batches (:data:`Data`).
        device: where batches are moved (None: left where they are).
        inputs_only: batches are inputs ``x`` (the labels, if any, are dropped).
        allow_empty: an empty stream is allowed (a rank that owns no batch).
    """

    def __init__(
        self,
        data: Data,
        device: torch.device | str | None = None,
        *,
        inputs_only: bool = False,
        allow_empty: bool = False,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.inputs_only = inputs_only
        self.allow_empty = allow_empty
        self._sig: tuple[tuple[tuple[int, ...], torch.dtype], ...] | None = None
        self._source: Iterable[Any]
        self.num_data: int | None = None
        self.num_batches: int | None = None
        if isinstance(data, BatchStream):
            data = data._source
        if inputs_only and isinstance(data, Tensor):
            data = [data]
        elif not inputs_only and is_tensor_pair(data):
            data = [tuple(data)]
        elif not isinstance(data, (list, tuple)) and iter_is_self(data):
            data = list(data)  # a one-shot iterator: a second pass would see nothing
        if not hasattr(data, "__iter__") or isinstance(data, (Tensor, str, bytes, dict)):
            what = "tensors x" if inputs_only else "batches (x, y)"
            raise ShapeError(
                f"data must be {'a tensor x, ' if inputs_only else 'a batch (x, y) of tensors, '}a list "
                f"of {what} or a DataLoader yielding them; got {type(data).__name__}."
            )
        self._source = data
        if isinstance(data, (list, tuple)):
            for _ in self:  # validate in-memory data at once and learn its size
                pass

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        if not isinstance(self._source, Sized):
            raise TypeError(f"object of type '{type(self._source).__name__}' has no len()")
        return len(self._source)

    def _check(self, i: int, batch: Any) -> tuple[Tensor, ...]:
        if isinstance(batch, Tensor) and self.inputs_only:
            parts: tuple[Tensor, ...] = (batch,)
        elif isinstance(batch, (tuple, list)) and len(batch) >= (1 if self.inputs_only else 2):
            parts = (batch[0],) if self.inputs_only else (batch[0], batch[1])
        else:
            raise ShapeError(
                f"batch {i} is a {type(batch).__name__}; expected "
                f"{'a tensor x or (x, y)' if self.inputs_only else 'a pair (x, y) of tensors'}."
            )
        if not all(isinstance(t, Tensor) and t.dim() >= 1 for t in parts):
            raise ShapeError(
                f"batch {i} holds {[type(t).__name__ for t in parts]}; expected tensors with a leading batch axis."
            )
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ShapeError(
                f"batch {i}: x has {parts[0].shape[0]} samples but y has {parts[1].shape[0]}; "
                "each batch must be (x, y) with the same leading size."
            )
        sig = tuple(_signature(t) for t in parts)
        if self._sig is None:
            self._sig = sig
        elif sig != self._sig:
            raise ShapeError(
                f"batch {i} has per-sample (shape, dtype) {sig}, but the first batch had {self._sig}; "
                "a loader must yield batches of one per-sample shape and type (fix the dataset's "
                "transform or collate_fn)."
            )
        if self.device is not None:
            parts = tuple(t.to(self.device, non_blocking=True) for t in parts)
        return parts

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        count = num = 0
        for i, batch in enumerate(self._source):
            parts = self._check(i, batch)
            if parts[0].shape[0] == 0:
                continue
            count += 1
            num += parts[0].shape[0]
            yield parts
        if count == 0 and not self.allow_empty:
            raise ShapeError(
                "data holds no samples (an empty loader or only empty batches); pass a batch (x, y) "
                "or a non-empty loader."
            )
        self.num_batches, self.num_data = count, num


def is_tensor_pair(data: object) -> TypeGuard[tuple[Tensor, Tensor] | list[Tensor]]:
    """Whether ``data`` is one batch ``(x, y)``: a tuple or list of exactly two tensors.

    Args:
        data: anything.

    Returns:
        True for a tuple or list of exactly two tensors.
    """
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def iter_is_self(data: object) -> bool:
    """Whether ``data`` is a one-shot iterator (``iter(data) is data``), which cannot be streamed twice.

    Args:
        data: anything.

    Returns:
        True for an iterator (a generator, ``iter(loader)``).
    """
    if not isinstance(data, Iterable):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False


def model_device(module: nn.Module, params: Mapping[str, Tensor] | None = None) -> torch.device:
    """The one device of a model's parameters (and buffers); a model spread over devices is a ``ConfigError``.

    Args:
        module: the model.
        params: its parameters, when given apart from the module (functional calls).

    Returns:
        The device (the CPU for a model without tensors).
    """
    tensors = list((params or {}).values()) or [*module.parameters(), *module.buffers()]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ConfigError(
            f"the model's parameters and buffers lie on several devices {sorted(map(str, devices))}; "
            "move the whole model to one device (model.to(device))."
        )
    return devices.pop() if devices else torch.device("cpu")


def check_same_device(module: nn.Module, x: Tensor, what: str = "x") -> None:
    """A clear ``ConfigError`` when input ``x`` and the model live on different devices.

    Args:
        module: the model.
        x: its input.
        what: how the message names ``x``.
    """
    dev = model_device(module)
    if isinstance(x, Tensor) and x.device != dev and next(iter([*module.parameters()]), None) is not None:
        raise ConfigError(
            f"{what} is on {x.device} but the model is on {dev}; move one of them "
            f"({what}.to(device) or model.to(device))."
        )


__all__ += ["is_tensor_pair", "iter_is_self", "check_same_device"]
