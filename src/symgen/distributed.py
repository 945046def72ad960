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
import hashlib
import json
import os
from collections.abc import Mapping
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
    "check_consistent",
    "agree",
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

    Args:
        backend: the torch.distributed backend; None picks "nccl" when CUDA is available, else "gloo".
        timeout_s: bounds every collective operation (seconds).
        init_method: without torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR), where the ranks meet
            (e.g. ``"file:///tmp/x"``), with ``rank`` and ``world_size``.
        rank: this process's rank (with ``init_method``).
        world_size: the number of processes (with ``init_method``).

    Returns:
        The default group.

    Raises:
        DistributedError: torch.distributed is not available, or the initialization fails.
        ConfigError: neither a torchrun environment nor ``init_method``.
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

    Args:
        process_group: "auto" (every symgen entry point's default): the default group when
            torch.distributed is initialized with more than one process, else None; None: this process
            alone; a ``ProcessGroup``: that group.

    Returns:
        The group, or None.

    Raises:
        ConfigError: a string other than "auto".
        DistributedError: a group given while torch.distributed is not initialized.
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

    Args:
        data: the iterable of batches.
        group: the group to shard over (:func:`resolve_group`); None: every batch.
    """

    def __init__(self, data: Any, group: GroupSpec = "auto") -> None:
        self.data = data
        self.group = resolve_group(group)

    def __iter__(self) -> Any:
        r, w = rank(self.group), world_size(self.group)
        for b, batch in enumerate(self.data):
            if b % w == r:
                yield batch


def _gather_ints(values: list[int], group: Group, timeout_s: float) -> Tensor:
    """(world_size, len(values)) int64: every rank's ``values`` (same length on every rank), by one sum."""
    n, r = world_size(group), rank(group)
    buf = torch.zeros(n, len(values), dtype=torch.int64)
    buf[r] = torch.tensor(values, dtype=torch.int64)
    return all_reduce_sum(buf, group, timeout_s=timeout_s)


def check_consistent(
    signature: Mapping[str, object], group: Group, *, what: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Raise the same ``DistributedError`` on every rank when the ranks' ``signature`` differ.

    Called before the first collective of an operator, kernel or audit, with a small description of
    what every rank must share (parameter shapes and dtypes, batch shapes, a plan). Every rank sends a
    fixed-size digest first, so ranks that disagree fail with a message naming the ranks and the keys
    that differ instead of a backend abort ("Received data size doesn't match").

    Args:
        signature: JSON-able description of this rank's side (values are compared by ``str`` if not JSON).
        group: the process group (None: this process alone, nothing to check).
        what: what the signature describes, for the message (e.g. "HessianOperator").
        timeout_s: the longest wait for the other ranks.

    Raises:
        DistributedError: on every rank, when any two ranks' signatures differ.
    """
    if group is None:
        return
    text = json.dumps(dict(signature), sort_keys=True, default=str)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    digests = _gather_ints([digest], group, timeout_s)[:, 0]
    if bool((digests == digests[0]).all()):
        return
    raw = text.encode()
    lengths = _gather_ints([len(raw)], group, timeout_s)[:, 0]
    width = int(lengths.max())
    padded = list(raw) + [0] * (width - len(raw))
    rows = _gather_ints(padded, group, timeout_s)
    sigs = [json.loads(bytes(int(b) for b in rows[i, : int(lengths[i])]).decode()) for i in range(rows.shape[0])]
    diffs = []
    for i, sig in enumerate(sigs[1:], start=1):
        keys = sorted(k for k in set(sig) | set(sigs[0]) if sig.get(k) != sigs[0].get(k))
        for k in keys[:5]:
            diffs.append(f"{k}: rank 0 has {sigs[0].get(k)!r:.120}, rank {i} has {sig.get(k)!r:.120}")
    raise DistributedError(
        f"{what}: the ranks disagree before their first collective ({'; '.join(diffs[:8])}); every rank must "
        "build the same model (same shapes and dtypes) and pass batches of the same shapes."
    )


def agree(ok: bool, group: Group, *, what: str, reason: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Make a local outcome collective: all ranks go on, or every rank raises the same ``DistributedError``.

    A step that can fail on one rank only (a section of the audit, a file read) calls ``agree`` after
    it, so no rank moves on while another waits in a collective.

    Args:
        ok: whether this rank's step succeeded.
        group: the process group (None: this process alone; then a failure raises here too).
        what: the step, for the message.
        reason: this rank's failure, one line (sent to the other ranks, at most 200 characters).
        timeout_s: the longest wait for the other ranks.

    Raises:
        DistributedError: on every rank, naming the ranks that failed and the first one's reason.
    """
    if group is None:
        if not ok:
            raise DistributedError(f"{what} failed: {reason}")
        return
    raw = (reason if not ok else "").encode()[:200]
    row = [0 if ok else 1, len(raw), *raw, *([0] * (200 - len(raw)))]
    got = _gather_ints(row, group, timeout_s)
    failed = [i for i in range(got.shape[0]) if int(got[i, 0])]
    if not failed:
        return
    first = failed[0]
    msg = bytes(int(b) for b in got[first, 2 : 2 + int(got[first, 1])]).decode(errors="replace")
    raise DistributedError(f"{what} failed on rank(s) {failed} (rank {first}: {msg}); every rank stops here.")
