"""DistributedDataParallel helpers for the wrapper optimizers: find a DDP model's process group, skip
DDP's gradient synchronization for a pass, and average gradients in one coalesced all-reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from symgen import distributed

__all__ = ["ddp_group", "is_ddp", "no_sync", "all_reduce_mean"]


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` module."""
    if not isinstance(model, nn.Module) or not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def ddp_group(model: Any) -> Any:
    """The process group of a ``DistributedDataParallel`` model (None for any other module)."""
    return model.process_group if is_ddp(model) else None


@contextlib.contextmanager
def no_sync(model: Any) -> Iterator[None]:
    """``model.no_sync()`` for a DDP model (backward passes inside accumulate local gradients, no all-reduce);
    a no-op for any other module."""
    with model.no_sync() if is_ddp(model) else contextlib.nullcontext():
        yield


@torch.no_grad()
def all_reduce_mean(tensors: list[Tensor], group: Any, extra: Tensor | None = None) -> Tensor | None:
    """Average ``tensors`` in place over the processes of ``group`` in ONE flat all-reduce (as DDP averages).

    ``extra``: a small tensor summed (not averaged) over the processes in the same message, returned
    (e.g. a count of processes whose loss was not finite, so that every process takes the same branch).
    """
    parts = [t.reshape(-1) for t in tensors]
    if extra is not None:
        parts.append(extra.reshape(-1).to(device=parts[0].device, dtype=parts[0].dtype) if parts else extra.reshape(-1))
    flat = distributed.all_reduce_sum(torch.cat(parts), group)  # a DistributedError, not a hang, if a rank dies
    size = distributed.world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t) / size)
        offset += t.numel()
    return flat[offset:].view_as(extra) if extra is not None else None
