"""The empirical NTK over DataLoaders, block by block (:meth:`symgen.ntk.EmpiricalNTKFn.stream`): row blocks
shared round robin over the ranks, the kernel sized against the memory limit as it grows, a failure on one
rank stopping every rank before the sum, and the helpers that join, mirror and symmetrize kernel blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from symgen import distributed, memory
from symgen.distributed import Group
from symgen.errors import DivergenceError, MemoryBudgetError
from symgen.ntk.inputs import kernel_bytes, resolve_params
from symgen.streaming import BatchStream, model_device

__all__: list[str] = []  # internal: reached through symgen.ntk.empirical_ntk_fn


def kernel_shape(n1: int, n2: int, output: str, o: int) -> tuple[int, ...]:
    return (n1, n2, o, o) if output == "full" else (n1, n2)


def computed(block: Tensor | None) -> Tensor:
    """A computed kernel block (every block is computed or mirrored before the blocks are joined)."""
    assert block is not None
    return block


def mirror(block: Tensor, output: str) -> Tensor:
    """The block (j, i) of a symmetric kernel from block (i, j)."""
    return block.permute(1, 0, 3, 2) if output == "full" else block.T


def upper_blocks(kernel: Tensor, sizes: list[int], output: str) -> Tensor:
    """The kernel with its strictly lower block triangle zeroed (blocks of ``sizes`` samples)."""
    out = kernel.clone()
    edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for i in range(len(sizes)):
        for j in range(i):
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = 0
    return out


def symmetrize_blocks(kernel: Tensor, sizes: list[int], output: str) -> Tensor:
    edges = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for i in range(len(sizes)):
        for j in range(i):
            up = kernel[edges[j] : edges[j + 1], edges[i] : edges[i + 1]]
            kernel[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = mirror(up, output)
    return kernel


def stream_kernel(kfn: Any, data1: Any, data2: Any, group: Group) -> Tensor:
    """``Theta`` over the batches of ``data1`` (rows) and ``data2`` (columns; None: data1, symmetric) for the
    kernel function ``kfn`` (an ``EmpiricalNTKFn``); see its ``stream`` method.

    The ranks first compare the parameters and options (:func:`symgen.distributed.check_consistent`), then
    each computes its row blocks; a DivergenceError or MemoryBudgetError on one rank becomes every rank's
    (:func:`symgen.distributed.agree`), and the kernel shapes are compared before the sum.
    """
    r, w = distributed.rank(group), distributed.world_size(group)
    p, _ = resolve_params(kfn.model, kfn.params, kfn.buffers)
    dev = model_device(kfn.model, p)
    name = f"{type(kfn).__name__}.stream"
    sig: dict[str, object] = {"output": kfn.output, "symmetric": data2 is None}
    sig.update({f"parameter {k}": f"{list(v.shape)} {v.dtype}" for k, v in p.items()})
    distributed.check_consistent(sig, group, what=name)  # before any collective
    rows = BatchStream(data1, device=dev, inputs_only=True)
    cols = rows if data2 is None else BatchStream(data2, device=dev, inputs_only=True)
    some = next(iter(p.values()))
    copies = 2 if group is None else 3  # the blocks, their concatenation (and the all-reduce's buffer)
    out: list[Tensor] = []
    col_sizes: list[int] = []
    err: Exception | None = None
    try:
        n_rows = 0
        for i, (xi,) in enumerate(rows):
            row: list[Tensor] = []
            o = kfn._o(p, xi)
            for j, (xj,) in enumerate(cols):
                if i == 0:
                    col_sizes.append(xj.shape[0])
                # the rows so far and this one, before this row's block is allocated
                held = kernel_bytes(n_rows + xi.shape[0], sum(col_sizes), kfn.output, o, some.element_size())
                memory.check_fits(
                    copies * held,
                    f"{name}: the kernel's first {n_rows + xi.shape[0]} rows (output='{kfn.output}', "
                    f"{copies} copies while the blocks are joined)",
                    "stream fewer rows (a DataLoader over a subset), output='trace', or kernel rows in slices",
                    device=dev,
                )
                if i % w == r and not (data2 is None and j < i):
                    row.append(kfn(xi) if data2 is None and i == j else kfn(xi, xj))
                else:
                    row.append(
                        torch.zeros(kernel_shape(xi.shape[0], xj.shape[0], kfn.output, o), dtype=some.dtype, device=dev)
                    )
            out.append(torch.cat(row, dim=1))
            n_rows += xi.shape[0]
            del row
    except (DivergenceError, MemoryBudgetError) as e:
        if group is None:
            raise
        err = e
    if group is not None:  # a failure on one rank stops every rank before the sum
        try:
            distributed.agree(err is None, group, what=name, reason=str(err or "")[:200])
        except Exception as e:
            raise (err or e) from e
        shape = [n_rows, sum(col_sizes)]
        distributed.check_consistent({"kernel shape": shape}, group, what=f"{name} (the data's sizes)")
    kernel = torch.cat(out, dim=0)
    del out
    if data2 is None:
        kernel = symmetrize_blocks(kernel, col_sizes, kfn.output) if group is None else kernel
    if group is None:
        return kernel
    if data2 is None:  # mirrored blocks were zeros on ranks that do not own their row: rebuild after the sum
        kernel = distributed.all_reduce_sum(upper_blocks(kernel, col_sizes, kfn.output), group)
        return symmetrize_blocks(kernel, col_sizes, kfn.output)
    return distributed.all_reduce_sum(kernel, group)
