"""Padding and filter means on covariance maps, shared by the generic and the fast analytic conv kernels."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from symgen.errors import ShapeError

__all__ = ["pad_axis", "filter_mean"]


def pad_axis(t: Tensor, axis: int, left: int, right: int, mode: str) -> Tensor:
    """``t`` padded along ``axis`` by ``left`` and ``right`` entries: wrapped around (``mode="circular"``) or zeros.

    Args:
        t: the tensor.
        axis: the axis padded.
        left: entries before.
        right: entries after.
        mode: "circular" or anything else for zeros.

    Returns:
        The padded tensor (``t`` itself without padding).
    """
    if left == 0 and right == 0:
        return t
    n = t.shape[axis]
    if mode == "circular":
        if left > n or right > n:
            raise ShapeError(f"circular padding of {left}/{right} needs a spatial size >= the padding, got {n}.")
        parts = [t.narrow(axis, n - left, left), t, t.narrow(axis, 0, right)]
    else:
        shape_l, shape_r = list(t.shape), list(t.shape)
        shape_l[axis], shape_r[axis] = left, right
        parts = [t.new_zeros(shape_l), t, t.new_zeros(shape_r)]
    return torch.cat(parts, dim=axis)


def filter_mean(
    t: Tensor,
    axes_groups: Sequence[tuple[int, ...]],
    filter_size: tuple[int, ...],
    pads: list[tuple[int, int]],
    mode: str,
) -> Tensor:
    """``mean_k t[..., p + k, (q + k)]``: the covariance a stride-1 conv sees (arXiv 1810.05148, 1902.04760).

    ``axes_groups[a]`` lists the axes that shift together along spatial dimension a (one axis for
    same-position kernels, two for all pairs).

    Args:
        t: the covariance map.
        axes_groups: per spatial dimension, the axes that shift together.
        filter_size: the filter's size per spatial dimension.
        pads: per spatial dimension, (left, right) padding.
        mode: "circular" or zeros.

    Returns:
        The filter mean, of the stride-1 output's size.
    """
    for group, (left, right) in zip(axes_groups, pads, strict=True):
        for ax in group:
            t = pad_axis(t, ax, left, right, mode)
    out_sizes = [t.shape[g[0]] - k + 1 for g, k in zip(axes_groups, filter_size, strict=True)]
    if min(out_sizes) < 1:
        raise ShapeError(
            f"filter size {filter_size} is larger than the (padded) input; use a smaller filter or "
            "padding='same'/'circular'."
        )
    total: Tensor | None = None
    for offset in itertools.product(*[range(k) for k in filter_size]):
        piece = t
        for group, off, size in zip(axes_groups, offset, out_sizes, strict=True):
            for ax in group:
                piece = piece.narrow(ax, off, size)
        total = piece.clone() if total is None else total.add_(piece)
    assert total is not None  # filter_size has at least one offset
    return total / math.prod(filter_size)
