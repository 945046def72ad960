"""Padding and filter means on covariance maps, shared by the generic and the fast analytic conv kernels, and
the fast path's scratch buffers and thread pool."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from symgen.errors import ShapeError

__all__ = ["pad_axis", "filter_mean", "box_matrix", "box_sum", "Workspace", "workspace", "pool", "single_threaded"]


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


@functools.lru_cache(maxsize=64)
def box_matrix(n: int, k: int, left: int, right: int, mode: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The filter sum ``t(p) -> sum_k t(p + k)`` along one axis of n positions as a (n_out, n) matrix (cached).

    Args:
        n: positions.
        k: filter size.
        left: padding before.
        right: padding after.
        mode: "circular" or zeros.
        dtype: the matrix's dtype.
        device: its device.

    Returns:
        The (n + left + right - k + 1, n) matrix of 0/1 (wrapped: counts).
    """
    m = n + left + right - k + 1
    one = torch.zeros(m, n, dtype=torch.float64)
    for o, off in itertools.product(range(m), range(k)):
        j = o - left + off
        if mode == "circular":
            one[o, j % n] += 1.0
        elif 0 <= j < n:
            one[o, j] += 1.0
    return one.to(dtype=dtype, device=device)


def box_sum(t: Tensor, fs: tuple[int, ...], pads: list[tuple[int, int]], mode: str, pairs: bool) -> Tensor:
    """``sum_k t[..., p + k, (q + k), ...]`` over the filter window, one spatial dimension at a time.

    Positions are the leading axes of ``t``; along dimension i the axes ``(i,)`` or, with ``pairs``,
    ``(i, dims + i)`` shift together. Circular wrap-around and zero padding are slices.

    Args:
        t: the map, positions leading.
        fs: filter size per spatial dimension.
        pads: (left, right) padding per spatial dimension.
        mode: "circular" or zeros.
        pairs: the leading axes are position pairs (p, q).

    Returns:
        The filter sums (a new tensor).
    """
    dims = len(fs)
    for i, (k, (left, right)) in enumerate(zip(fs, pads, strict=True)):
        axes = (i, dims + i) if pairs else (i,)
        n = t.shape[i]
        m = n + left + right - k + 1
        out_shape = list(t.shape)
        for ax in axes:
            out_shape[ax] = m
        out = t.new_zeros(out_shape)
        for off in range(k):
            d = off - left
            if mode == "circular":
                segs = [(0, n - d, d), (n - d, d, 0)] if d >= 0 else [(0, -d, n + d), (-d, n + d, 0)]
            else:
                start, stop = max(0, -d), min(m, n - d)
                segs = [(start, stop - start, start + d)] if stop > start else []
            for combo in itertools.product(segs, repeat=len(axes)):
                dst, src = out, t
                for ax, (o, length, j) in zip(axes, combo, strict=True):
                    if length <= 0:
                        break
                    dst, src = dst.narrow(ax, o, length), src.narrow(ax, j, length)
                else:
                    dst.add_(src)
        t = out
    return t


class Workspace:
    """Scratch tensors by name, reused by the tiles of a call and by later calls on the same thread: a fresh
    tile-sized tensor per op is a fresh mapping that page-faults (about 10x the op itself at 64K entries)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}
        self._views: dict[tuple[str, torch.dtype, tuple[int, ...]], Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """A contiguous (uninitialized) tensor of ``shape``: a prefix of the named buffer, grown as needed.

        Args:
            name: the buffer.
            shape: the shape wanted.
            dtype: its dtype.

        Returns:
            The view.
        """
        key = (name, dtype, tuple(shape))
        view = self._views.get(key)
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(name, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
            self._views = {k: v for k, v in self._views.items() if k[:2] != (name, dtype)}  # views of the old one
        view = self._views[key] = buf[:n].view(key[2])
        return view

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


_LOCAL = threading.local()  # per thread: {device: Workspace}, kept between calls
_KEEP_BYTES = 1 << 25  # a workspace that grew above this (a huge tile) is replaced on its next use
_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child inherits the pools but not their threads: a submit there would wait forever
os.register_at_fork(after_in_child=_POOLS.clear)


def workspace(device: torch.device) -> Workspace:
    """This thread's workspace on ``device``.

    Args:
        device: the tensors' device.

    Returns:
        The workspace (a fresh one if the kept one exceeds 32 MiB).
    """
    spaces: dict[torch.device, Workspace] = _LOCAL.__dict__.setdefault("spaces", {})
    if device not in spaces or spaces[device].nbytes() > _KEEP_BYTES:
        spaces[device] = Workspace(device)
    return spaces[device]


def pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers kept between calls (its threads keep their workspaces).

    Args:
        threads: workers.

    Returns:
        The executor.
    """
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="symgen-ntk")
    return _POOLS[threads]


def single_threaded(active: bool) -> contextlib.AbstractContextManager[None]:
    """torch's intra-op threads set to 1 inside (restored after) when ``active``; otherwise a null context
    (nothing read or set: these wrap calls of a fraction of a millisecond).

    Args:
        active: whether to change the setting.

    Returns:
        the context manager.
    """
    return _one_thread() if active else contextlib.nullcontext()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
