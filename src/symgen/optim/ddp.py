"""DistributedDataParallel helpers for the wrapper optimizers: find a DDP model's process group, skip
DDP's gradient synchronization for a pass, and average gradients in one coalesced all-reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import Tensor, nn

from symgen import distributed
from symgen.distributed import Group

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_group", "is_ddp", "no_sync", "all_reduce_mean"]


def is_ddp(model: object) -> TypeGuard[DistributedDataParallel]:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` module.

    Args:
        model: anything.

    Returns:
        True for a DDP module.
    """
    if not isinstance(model, nn.Module) or not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def ddp_group(model: object) -> Group:
    """The process group of a ``DistributedDataParallel`` model.

    Args:
        model: anything.

    Returns:
        The DDP module's process group; None for any other object.
    """
    if not is_ddp(model):
        return None
    group: Group = model.process_group
    return group


@contextlib.contextmanager
def no_sync(model: object) -> Iterator[None]:
    """``model.no_sync()`` for a DDP model (backward passes inside accumulate local gradients, no all-reduce).

    A no-op for any other module.

    Args:
        model: the model.

    Yields:
        Nothing: the passes run inside.
    """
    with model.no_sync() if is_ddp(model) else contextlib.nullcontext():
        yield


@torch.no_grad()
def all_reduce_mean(tensors: list[Tensor], group: Group, extra: Tensor | None = None) -> Tensor | None:
    """Average ``tensors`` in place over the processes of ``group`` in ONE flat all-reduce (as DDP averages).

    Args:
        tensors: the tensors to average (e.g. gradients), in place.
        group: the process group (None: this process alone).
        extra: a small tensor summed (not averaged) over the processes in the same message, e.g. a count
            of processes whose loss was not finite, so that every process takes the same branch.

    Returns:
        The summed ``extra`` (None without it).
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
