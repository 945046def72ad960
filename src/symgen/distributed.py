"""torch.distributed helpers: which process group to reduce over, sums and gathers with timeouts, shards.

Data-parallel estimates work the same way everywhere in symgen: every rank holds a shard of the data and
the same random draws (the same seed), computes its local sum in float64, and :func:`all_reduce_sum`
adds the shards' sums; the result equals one process's on the whole dataset up to round-off. Every
collective waits at most ``timeout`` seconds: a rank that died or hangs makes the others raise a
:class:`~symgen.errors.DistributedError` instead of hanging. Launch with ``torchrun --nproc_per_node=N``
and call :func:`init_process_group` (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, Union

import torch
from torch import Tensor

from symgen.errors import ConfigError, DistributedError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
else:  # resolvable at run time too (documentation tools evaluate the aliases); absent from some builds
    try:
        from torch.distributed import ProcessGroup
    except ImportError:  # pragma: no cover - a PyTorch built without torch.distributed
        ProcessGroup = Any

__all__ = [
    "Group",
    "GroupSpec",
    "DEFAULT_TIMEOUT_S",
    "init_process_group",
    "resolve_group",
    "rank",
    "world_size",
    "all_reduce_sum",
    "all_gather_rows",
    "shard_range",
    "ShardedBatches",
    "barrier",
]

DEFAULT_TIMEOUT_S = 300.0

#: A resolved group: a ``torch.distributed`` ``ProcessGroup``, or None for this process alone.
Group: TypeAlias = Union[ProcessGroup, None]
#: What every ``process_group=`` argument in symgen accepts (default "auto"): see :func:`resolve_group`.
GroupSpec: TypeAlias = Union[ProcessGroup, Literal["auto"], None]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def init_process_group(
    backend: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    """Initialize the default process group (once) from torchrun's environment or the given arguments.

    ``backend``: None picks "nccl" when CUDA is available, else "gloo". ``timeout_s`` bounds every
    collective operation. Returns the default group. Without torchrun's variables (RANK, WORLD_SIZE,
    MASTER_ADDR) pass ``init_method`` (e.g. ``"file:///tmp/x"``), ``rank`` and ``world_size``.
    """
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build.")
    if dist.is_initialized():
        return dist.group.WORLD
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            "init_process_group(): no torchrun environment (MASTER_ADDR, RANK, WORLD_SIZE) and no "
            "init_method; launch with `torchrun --nproc_per_node=N script.py` or pass "
            "init_method='file:///path', rank and world_size."
        )
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not initialize the process group ({backend}): {e}") from e
    return dist.group.WORLD


def resolve_group(process_group: GroupSpec = "auto") -> Group:
    """The group to reduce over, or None for this process alone.

    "auto" (every symgen entry point's default): the default group when torch.distributed is initialized
    with more than one process, else None; None: this process alone; a ``ProcessGroup``: that group.
    """
    if process_group is None or (isinstance(process_group, bool) and not process_group):  # False: like None
        return None
    dist = _dist()
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ConfigError(
                f"process_group must be 'auto', None or a torch.distributed ProcessGroup, got {process_group!r}."
            )
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "a process group was given but torch.distributed is not initialized; call "
            "symgen.distributed.init_process_group() first (or launch with torchrun)."
        )
    return process_group


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed).

    Args:
        group: the process group (None: this process alone).

    Returns:
        The rank.
    """
    return 0 if group is None else _dist().get_rank(group)


def world_size(group: Group = None) -> int:
    """The number of processes in ``group`` (1 without torch.distributed).

    Args:
        group: the process group (None: this process alone).

    Returns:
        The number of processes.
    """
    return 1 if group is None else _dist().get_world_size(group)


def _wait(work: Any, what: str, timeout_s: float) -> None:
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo: a closed connection or a timeout
        raise DistributedError(
            f"{what} failed on rank {_dist().get_rank()}: {str(e).splitlines()[0][:300]}; "
            "another rank probably died or hangs (its own error says why)."
        ) from e
    if ok is False:
        raise DistributedError(
            f"{what} did not finish within {timeout_s:.0f} s on rank {_dist().get_rank()}; "
            "another rank probably died or hangs."
        )


def _comm_tensor(t: Tensor, group: Group) -> Tensor:
    # NCCL reduces only CUDA tensors; gloo only CPU ones
    backend = _dist().get_backend(group)
    if backend == "nccl":
        return t if t.is_cuda else t.cuda()
    return t.cpu() if t.is_cuda and backend == "gloo" else t


def all_reduce_sum(t: Tensor, group: Group = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tensor:
    """The element-wise sum of ``t`` over the ranks of ``group`` (a new tensor; ``t`` itself for None).

    Args:
        t: this rank's tensor.
        group: the process group (None: this process alone).
        timeout_s: the longest wait for the other ranks.

    Returns:
        The sum.
    """
    if group is None:
        return t
    buf = _comm_tensor(t.detach().clone(), group)
    _wait(_dist().all_reduce(buf, group=group, async_op=True), "all_reduce", timeout_s)
    return buf.to(t.device)


def barrier(group: Group = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait for every rank, at most ``timeout_s`` seconds.

    Args:
        group: the process group (None: this process alone).
        timeout_s: the longest wait.
    """
    if group is not None:
        all_reduce_sum(torch.zeros(1), group, timeout_s=timeout_s)


def all_gather_rows(t: Tensor, group: Group = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tensor:
    """The rows of ``t (m_r, ...)`` of every rank concatenated in rank order (row counts may differ).

    Args:
        t: this rank's rows.
        group: the process group (None: this process alone).
        timeout_s: the longest wait for the other ranks.

    Returns:
        Every rank's rows.
    """
    if group is None:
        return t
    n = world_size(group)
    sizes = all_reduce_sum(
        torch.zeros(n, dtype=torch.int64).index_fill_(0, torch.tensor(rank(group)), t.shape[0]),
        group,
        timeout_s=timeout_s,
    )
    m = int(sizes.max())
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    pad = _comm_tensor(pad, group)
    out = [torch.empty_like(pad) for _ in range(n)]
    _wait(_dist().all_gather(out, pad, group=group, async_op=True), "all_gather", timeout_s)
    return torch.cat([o[: int(s)].to(t.device) for o, s in zip(out, sizes, strict=True)])


def shard_range(n: int, group: Group = None) -> range:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one; rank order).

    Args:
        n: the number of items.
        group: the process group (None: this process alone).

    Returns:
        This rank's range.
    """
    r, w = rank(group), world_size(group)
    return range(r * n // w, (r + 1) * n // w)


class ShardedBatches:
    """The batches of ``data`` this rank owns: batch ``b`` goes to rank ``b % world_size`` (round robin).

    For an iterable of batches that has no sampler to shard (for a DataLoader over a Dataset,
    ``torch.utils.data.DistributedSampler(dataset, shuffle=False)`` does the same job without loading the
    other ranks' batches). Every rank must see the same batches in the same order.
    """

    def __init__(self, data: Any, group: GroupSpec = "auto") -> None:
        self.data = data
        self.group = resolve_group(group)

    def __iter__(self) -> Any:
        r, w = rank(self.group), world_size(self.group)
        for b, batch in enumerate(self.data):
            if b % w == r:
                yield batch
