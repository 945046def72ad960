"""Non-finite values that fail loudly: checks that raise a :class:`~symgen.errors.DivergenceError` naming where
NaN or inf appeared (an input and its batch index, a weight, a buffer, the loss or an output).

Each check costs one ``torch.isfinite(...).all()`` per tensor or block (parameters and buffers: one
stacked reduction for all of them); the element-wise search for the culprit runs only after a failure.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from symgen.errors import DivergenceError

__all__ = ["check_batch", "check_tensors", "check_values", "first_bad_row"]


def first_bad_row(x: Tensor) -> int | None:
    """The first index along dim 0 of ``x`` holding NaN or inf, or None (integer tensors are always finite).

    Args:
        x: a batch (N, ...).

    Returns:
        The index, or None.
    """
    if not x.is_floating_point() and not x.is_complex():
        return None
    # one sum first: a NaN or inf entry makes it non-finite (inf + finite = inf, inf - inf = NaN); only a
    # non-finite sum (or one that overflowed on finite entries) runs the elementwise checks
    if bool(torch.isfinite(x.detach().sum())) or bool(torch.isfinite(x).all()):
        return None
    rows = ~torch.isfinite(x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)).all(1)
    return int(rows.nonzero()[0, 0])


def check_batch(where: str, x: Tensor, y: Tensor | None = None, *, batch: int | None = None, offset: int = 0) -> None:
    """Raise a DivergenceError when the inputs ``x`` (or the floating targets ``y``) of a batch are non-finite.

    Args:
        where: the caller, for the message (e.g. "HessianOperator.matmat").
        x: the inputs (N, ...).
        y: the targets (N, ...) or None.
        batch: the batch's number in its stream, for the message.
        offset: the index of the batch's first sample in its stream.

    Raises:
        DivergenceError: naming the input (or target), the batch and the sample index.
    """
    for name, t in (("input", x), ("target", y)):
        if t is None:
            continue
        i = first_bad_row(t)
        if i is not None:
            in_batch = "" if batch is None else f" of batch {batch}"
            raise DivergenceError(
                f"{where}: the {name} at batch index {i}{in_batch} (sample {offset + i}) holds non-finite values (NaN or inf); "
                f"clean or drop that sample."
            )


def check_tensors(where: str, kind: str, tensors: Mapping[str, Tensor]) -> None:
    """Raise a DivergenceError naming the first floating tensor of ``tensors`` that holds non-finite values (NaN or inf).

    One stacked reduction for all tensors; the names are searched only after a failure.

    Args:
        where: the caller, for the message.
        kind: "weight" or "buffer".
        tensors: name -> tensor.

    Raises:
        DivergenceError: naming the tensor.
    """
    floats = {k: v for k, v in tensors.items() if v.is_floating_point() and v.numel()}
    if not floats:
        return
    flags = torch.stack([torch.isfinite(v.detach()).all() for v in floats.values()])
    if bool(flags.all()):
        return
    bad = [k for k, ok in zip(floats, flags.tolist(), strict=True) if not ok]
    fix = "restore it from a checkpoint" if kind == "weight" else "reset the running statistics (model.train() pass)"
    raise DivergenceError(
        f"{where}: the {kind} {bad[0]!r} holds non-finite values (NaN or inf){f' (also {bad[1:4]})' if len(bad) > 1 else ''}; {fix}."
    )


def check_values(where: str, what: str, values: Tensor, hint: str = "") -> None:
    """Raise a DivergenceError when ``values`` (a product block, a loss, a kernel block) are not all finite.

    Args:
        where: the caller.
        what: what the values are ("the loss", "the products", "the kernel block (rows 0:10, cols 0:10)").
        values: the tensor.
        hint: the likely cause and fix, appended to the message.

    Raises:
        DivergenceError: naming ``what``.
    """
    if bool(torch.isfinite(values).all()):
        return
    raise DivergenceError(f"{where}: {what} holds non-finite values (NaN or inf){'; ' + hint if hint else ''}.")
