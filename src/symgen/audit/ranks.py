"""An audit whose ranks stay in step under torchrun: one plan for all, one outcome per section.

Every rank times the model, but the plan is made from the slowest rank's timing (all ranks gather the
timings, so every rank computes the same sizes); before the first collective of the audit the ranks
compare a signature (parameter shapes and dtypes, data sizes, sections, the plan) with
:func:`symgen.distributed.check_consistent`; after each section they agree on its outcome: all go on,
all mark it failed (the same failure everywhere), or, when only some ranks failed, every rank raises the
same :class:`~symgen.errors.DistributedError` naming them. Agreement runs on a second (gloo) group, so a
rank that failed between two collectives of a section never pairs its agreement with another rank's
section collective.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
from torch import nn

from symgen import distributed
from symgen.distributed import DEFAULT_TIMEOUT_S, Group
from symgen.errors import DistributedError

__all__ = ["Ranks"]


class Ranks:
    """The audit's ranks (``group`` None: this process alone, every method a no-op or local)."""

    def __init__(self, group: Group, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.group = group
        # a rank that failed early waits here while another is still stuck in a section's collective, which
        # gives up after the group's timeout (``timeout_s``): the agreement outwaits it
        self.timeout_s = 2 * timeout_s + 5
        self.side: Group = None
        if group is not None:
            import torch.distributed as dist

            # every rank creates it at the same point (the start of the audit); CPU tensors, gloo
            self.side = dist.new_group(
                ranks=dist.get_process_group_ranks(group),
                backend="gloo",
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )

    @property
    def active(self) -> bool:
        """Whether several processes take part."""
        return self.group is not None

    def check(self, signature: dict[str, Any], what: str) -> None:
        """The same :class:`DistributedError` on every rank when the ranks' ``signature`` differ.

        Args:
            signature: what every rank must share.
            what: what it describes.
        """
        distributed.check_consistent(signature, self.side, what=what, timeout_s=self.timeout_s)

    def max_row(self, values: list[float]) -> list[float]:
        """The element-wise maximum of ``values`` over the ranks (the slowest rank's timings).

        Args:
            values: this rank's numbers (the same count on every rank).

        Returns:
            The maxima.
        """
        rows = distributed.all_gather_rows(
            torch.tensor([values], dtype=torch.float64), self.side, timeout_s=self.timeout_s
        )
        return [float(v) for v in rows.max(dim=0).values]

    def count(self, flag: bool) -> int:
        """On how many ranks ``flag`` holds.

        Args:
            flag: this rank's flag.

        Returns:
            The count (0 or 1 alone).
        """
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        return int(distributed.all_reduce_sum(t, self.side, timeout_s=self.timeout_s).item())

    def outcome(self, section: str, error: BaseException | None) -> None:
        """Agree on a section's outcome: return when it succeeded everywhere or failed everywhere (each rank
        then reports it failed), else raise the same ``DistributedError`` on every rank.

        Args:
            section: the section's name.
            error: this rank's failure (None: it succeeded).

        Raises:
            DistributedError: on every rank, when the section failed on some ranks only.
        """
        if not self.active:
            return
        failed = self.count(error is not None)
        if failed == 0:
            return
        # a rank whose collective broke because another rank failed is collateral: the ranks with a root cause
        # (any other error) are the ones named, when there are any
        collateral = isinstance(error, DistributedError)
        roots = self.count(error is not None and not collateral)
        world = distributed.world_size(self.side)
        if failed == world and roots in (0, world):
            return  # the same kind of failure on every rank: each reports the section failed
        blamed = error is not None and (not collateral or roots == 0)
        reason = "" if error is None else f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"
        distributed.agree(
            not blamed, self.side, what=f"audit section '{section}'", reason=reason, timeout_s=self.timeout_s
        )
        raise DistributedError(f"audit section '{section}' failed on some ranks only")  # agree raised already


def signature(model: nn.Module, **shared: Any) -> dict[str, Any]:
    """What every rank of an audit must share: the parameters' names, shapes and dtypes, and ``shared``.

    Args:
        model: the model every rank audits.
        **shared: further values every rank must hold alike (data sizes, sections, the plan).

    Returns:
        A JSON-able dict.
    """
    params = [f"{n}:{tuple(p.shape)}:{str(p.dtype).replace('torch.', '')}" for n, p in model.named_parameters()]
    return {"parameters": params, **shared}
