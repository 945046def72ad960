"""The audit's data: one split held as tensors ``(x, y)`` or streamed from a re-iterable of batches (a
``torch.utils.data.DataLoader``, :class:`symgen.data.Cifar10Batches`, a list of batches).

Both kinds answer the same questions the same way, so a section's numbers do not depend on how the
data was given: ``num_data``, the value range, the first samples (for timing), seeded subsamples
(``take``: gathered in one pass, one batch in memory at a time beside the subsample) and the whole
split in batches (each rank its share). A stream is passed over once per question; a loader that
shuffles or augments at random gives other samples on every pass (the seed then no longer fixes them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from symgen.distributed import Group
from symgen.errors import ConfigError, ShapeError
from symgen.streaming import BatchStream, Data, is_tensor_pair, iter_is_self

__all__ = ["Split", "as_split"]

HEAD = 16  # samples kept from the first pass: the planner times one forward and backward pass on them


class Split:
    """One split of the audit's data on ``device`` in ``dtype`` (inputs; labels stay integer).
    ``num_classes``: the largest label + 1.

    ``source``: an ``(x, y)`` pair of tensors, or a re-iterable of ``(x, y)`` batches. A stream is
    surveyed once on construction (size, per-sample shape, value range, first samples, label checks).

    Args:
        source: the split's data.
        what: how messages name it (e.g. ``data['train']``).
        device: where its tensors go.
        dtype: the inputs' dtype (the model's).
    """

    def __init__(self, source: Data, what: str, device: torch.device, dtype: torch.dtype) -> None:
        self.what, self.device, self.dtype = what, device, dtype
        if is_tensor_pair(source):
            x, y = source
            _check_labels(y, what)
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ShapeError(
                    f"{what}: x has {x.shape[0]} samples and y {y.shape[0]}; need the same, non-zero number."
                )
            self.source_dtype = x.dtype  # before the cast: uint8 pixels say the inputs were not scaled
            self.declared_classes: int | None = None
            self.tensors: tuple[Tensor, Tensor] | None = (x.to(device, dtype), y.to(device))
            self.num_data = x.shape[0]
            self.num_classes = int(y.max()) + 1
            self.input_shape = tuple(x.shape[1:])
            xd = self.tensors[0]
            self.bounds = (float(xd.min()), float(xd.max())) if xd.numel() else (0.0, 0.0)
            self._head = (self.tensors[0][:HEAD], self.tensors[1][:HEAD])
            return
        self.tensors = None
        self._stream = BatchStream(source)
        classes = getattr(getattr(source, "dataset", None), "classes", None)  # torchvision datasets declare them
        self.declared_classes = len(classes) if isinstance(classes, (list, tuple)) and classes else None
        self.source_dtype = torch.float32
        n, lo, hi, top = 0, float("inf"), float("-inf"), -1
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        for xb, yb in self._stream:
            _check_labels(yb, what)
            n += xb.shape[0]
            top = max(top, int(yb.max()))
            self.source_dtype = xb.dtype
            xd = xb.to(dtype)  # the range of the values the model sees
            lo, hi = min(lo, float(xd.min())), max(hi, float(xd.max()))
            if sum(t.shape[0] for t in xs) < HEAD:
                xs.append(xb[:HEAD].clone())  # a copy: a view would keep the whole batch alive
                ys.append(yb[:HEAD].clone())
        self.num_data = n
        self.num_classes = top + 1
        self.bounds = (lo, hi)
        self.input_shape = tuple(xs[0].shape[1:])
        self._head = (torch.cat(xs)[:HEAD].to(device, dtype), torch.cat(ys)[:HEAD].to(device))

    @property
    def streamed(self) -> bool:
        """Whether the split is streamed from batches (not held as tensors)."""
        return self.tensors is None

    def head(self, k: int = HEAD) -> tuple[Tensor, Tensor]:
        """The first ``min(k, 16)`` data points.

        Args:
            k: how many.

        Returns:
            ``(x, y)`` on the split's device.
        """
        return self._head[0][:k], self._head[1][:k]

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Samples at positions ``idx`` (in that order): indexing, or one pass over the stream that keeps
        the chosen rows of each batch and stops once it has them all.

        Args:
            idx: positions in the split.

        Returns:
            ``(x, y)`` of those data points, on the split's device.
        """
        idx = idx.reshape(-1).long().cpu()
        if self.tensors is not None:
            x, y = self.tensors
            at = idx.to(x.device)
            return x[at], y[at]
        if idx.numel() == 0:
            raise ShapeError(f"{self.what}: an empty subsample was requested.")
        if int(idx.max()) >= self.num_data or int(idx.min()) < 0:
            raise ShapeError(f"{self.what}: position {int(idx.max())} requested of {self.num_data} samples.")
        ordered, order = idx.sort()
        xs, ys, j, offset = [], [], 0, 0
        for xb, yb in self._stream:
            b = xb.shape[0]
            k = int(torch.searchsorted(ordered, offset + b))
            if k > j:
                sel = (ordered[j:k] - offset).to(xb.device)
                xs.append(xb[sel].to(self.device, self.dtype))
                ys.append(yb[sel].to(self.device))
                j = k
            offset += b
            if j == ordered.numel():
                break
        if j < ordered.numel():
            raise ShapeError(
                f"{self.what}: the loader yielded {offset} samples on this pass but {self.num_data} on "
                "the first; a loader must give the same samples on every pass."
            )
        x, y = torch.cat(xs), torch.cat(ys)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel())
        back = back.to(x.device)
        return x[back], y[back]

    def batches(self, batch_size: int, group: Group = None, order: Tensor | None = None) -> _Batches:
        """The whole split in batches (the stream's own batches; tensors in ``batch_size``), moved to the
        device; with a process group every rank gets every ``world_size``-th batch.

        Args:
            batch_size: the batch size of a split held as tensors.
            group: the process group (None: this process alone).
            order: a permutation the tensors are taken in (None: as stored; a stream keeps its own order).

        Returns:
            A re-iterable of this rank's batches.
        """
        return _Batches(self, batch_size, group, order)


class _Batches:
    """A re-iterable of this rank's batches of a :class:`Split`."""

    def __init__(self, split: Split, batch_size: int, group: Group, order: Tensor | None = None) -> None:
        from symgen import distributed

        self.split, self.batch_size, self.order = split, batch_size, order
        self.rank = distributed.rank(group) if group is not None else 0
        self.world = distributed.world_size(group) if group is not None else 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        s = self.split
        if s.tensors is not None and self.order is not None:
            x, y = s.tensors
            at = self.order.to(x.device).split(self.batch_size)
            source: Iterable[tuple[Tensor, ...]] = ((x[i], y[i]) for i in at)
        elif s.tensors is not None:
            x, y = s.tensors
            source = zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)
        else:
            source = s._stream
        for i, (xb, yb) in enumerate(source):
            if i % self.world == self.rank:
                yield xb.to(s.device, s.dtype), yb.to(s.device)


def as_split(source: Data | Split, what: str, device: torch.device, dtype: torch.dtype) -> Split:
    """A :class:`Split`, or a :class:`ConfigError` saying what the audit accepts.

    Args:
        source: the split's data (a :class:`Split` is returned as is).
        what: how messages name it.
        device: where its tensors go.
        dtype: the inputs' dtype.

    Returns:
        The split.
    """
    if isinstance(source, Split):
        return source
    if is_tensor_pair(source):
        return Split(source, what, device, dtype)
    if isinstance(source, (Tensor, str, bytes)) or not hasattr(source, "__iter__"):
        raise ConfigError(
            f"{what} must be a dataset name (e.g. 'digits'), an (x, y) pair of tensors, a DataLoader "
            f"(or another re-iterable) of (x, y) batches, or {{'train': ..., 'test': ...}}; got "
            f"{type(source).__name__}."
        )
    if iter_is_self(source):
        raise ConfigError(
            f"{what} is a one-shot iterator ({type(source).__name__}); the audit passes over its data "
            "several times and cannot re-iterate it. Pass a DataLoader, a list of (x, y) batches or "
            "(x, y) tensors instead."
        )
    return Split(source, what, device, dtype)


def _check_labels(y: Tensor, what: str) -> None:
    if y.is_floating_point() or y.ndim != 1:
        raise ShapeError(
            f"{what}: the audit measures classifiers; y must be integer class labels of shape (N,), "
            f"got {y.dtype} {tuple(y.shape)}."
        )
