"""Datasets that need no network: generated, shipped in an installed package, or read from a path.

``load_dataset(name, split, root, generator)`` returns ``(x, y)``: x float32 in [0, 1] for images
(standardized for mnist1d, as its generator does), y int64 class labels.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from symgen.errors import ConfigError, MissingDataError
from symgen.io import atomic_write
from symgen.rng import Seed, as_generator, seed_of

__all__ = [
    "DATASETS",
    "load_dataset",
    "Cifar10Batches",
    "cache_dir",
    "read_idx",
    "class_balanced_indices",
    "subset_per_class",
]

DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$SYMGEN_CACHE`` or ``~/.cache/symgen``."""
    path = Path(os.environ.get("SYMGEN_CACHE", Path.home() / ".cache" / "symgen"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, generator: Seed = None
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of dataset ``name`` and ``split`` ("train" or "test").

    digits: (N, 1, 8, 8) in [0, 1], a stratified 75/25 split shuffled by ``generator`` (a seed or a
    ``torch.Generator``; None = seed 0).
    mnist1d: (N, 1, 40), generated offline (seed 42 template set, 4000/1000 split), cached.
    mnist, fashion-mnist: (N, 1, 28, 28) from IDX files (gzipped or not) under ``root``.
    cifar10: (N, 3, 32, 32) from the python batches under ``root``.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got '{split}'.")
    if name == "digits":
        return _digits(split, seed_of(generator) % 2**32)  # scikit-learn takes seeds below 2^32
    if name == "mnist1d":
        return _mnist1d(split)
    if name in ("mnist", "fashion-mnist"):
        return _idx_dataset(name, split, root)
    if name == "cifar10":
        return _cifar10(split, root)
    raise ConfigError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}.")


def _digits(split: str, seed: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    xs, ys = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    # unsqueeze in torch: a numpy size-1 axis can carry strides that read as channels-last.
    return torch.from_numpy(np.ascontiguousarray(xs)).unsqueeze(1), torch.from_numpy(ys)


def _mnist1d(split: str) -> tuple[Tensor, Tensor]:
    path = cache_dir() / "mnist1d-v1.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        # The generator seeds numpy/random globally; keep the caller's streams untouched.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(get_dataset_args())  # never downloads
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: data[k] for k in ("x", "y", "x_test", "y_test")}
        atomic_write(path, lambda f: np.savez(f, **arrays))
    with np.load(path) as d:
        x, y = (d["x"], d["y"]) if split == "train" else (d["x_test"], d["y_test"])
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
        return x, torch.from_numpy(y.astype(np.int64))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MissingDataError(f"{path} is not an IDX file (bad magic number); expected MNIST-format files.")
    dtypes: dict[int, np.dtype[Any]] = {
        0x08: np.dtype(np.uint8),
        0x09: np.dtype(np.int8),
        0x0B: np.dtype(">i2"),
        0x0C: np.dtype(">i4"),
        0x0D: np.dtype(">f4"),
        0x0E: np.dtype(">f8"),
    }
    dtype = dtypes[raw[2]]
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise MissingDataError(f"{path} is truncated: header says {shape}, file holds {data.size} values.")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _require_root(name: str, root: str | Path | None, expected: list[str]) -> Path:
    if root is None:
        raise MissingDataError(
            f"dataset '{name}' is read from local files; pass root=DIR (CLI: --root DIR) "
            f"holding {', '.join(expected)}. symgen never downloads data."
        )
    return Path(root).expanduser()


def _idx_dataset(name: str, split: str, root: str | Path | None) -> tuple[Tensor, Tensor]:
    stems = _IDX_FILES[split]
    root = _require_root(name, root, list(stems))
    found = [_find(root, s) for s in stems]
    if any(f is None for f in found):
        missing = [s for s, f in zip(stems, found, strict=True) if f is None]
        raise MissingDataError(
            f"dataset '{name}' ({split}): missing {', '.join(missing)} (or .gz) under {root}. "
            "Put the original IDX files there."
        )
    images, labels = (read_idx(f) for f in found)  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise MissingDataError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels under {root}.")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def _cifar10_files(split: str, root: str | Path | None) -> list[Path]:
    """The python batch files of a CIFAR-10 split under ``root`` (or its ``cifar-10-batches-py``)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    root = _require_root("cifar10", root, names)
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [n for n in names if not (base / n).exists()]
    if missing:
        raise MissingDataError(
            f"dataset 'cifar10' ({split}): missing {', '.join(missing)} under {base}. "
            "Extract cifar-10-python.tar.gz there."
        )
    return [base / n for n in names]


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 of one CIFAR-10 python batch file."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return (
        np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
        np.asarray(batch[b"labels"], dtype=np.int64),
    )


def _cifar10(split: str, root: str | Path | None) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(_read_cifar_file(p) for p in _cifar10_files(split, root)), strict=True)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(ys))


class Cifar10Batches:
    """A CIFAR-10 split as a re-iterable of ``(x, y)`` batches of ``batch_size``, read lazily: one batch
    file (10000 images, 30 MB as uint8) and one float32 batch in memory at a time. The same values,
    in the same order, as :func:`load_dataset` ("cifar10"); usable wherever a DataLoader is."""

    def __init__(self, split: str = "test", root: str | Path | None = None, batch_size: int = 512) -> None:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got '{split}'.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self.files = _cifar10_files(split, root)
        self.split, self.batch_size = split, batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for path in self.files:
            images, labels = _read_cifar_file(path)
            for i in range(0, images.shape[0], self.batch_size):
                x = torch.from_numpy(images[i : i + self.batch_size].astype(np.float32) / 255.0)
                yield x, torch.from_numpy(labels[i : i + self.batch_size].copy())
            del images, labels


def class_balanced_indices(y: Tensor, per_class: int, classes: int | Sequence[int], generator: Seed = None) -> Tensor:
    """``per_class`` random indices of each class (without replacement), classes in the given order.

    ``classes``: a count C (classes 0..C-1) or an explicit list of labels.
    """
    labels = range(classes) if isinstance(classes, int) else classes
    generator = as_generator(generator)
    y_cpu = y.cpu()
    idx = []
    for c in labels:
        members = torch.nonzero(y_cpu == c).flatten()
        if len(members) < per_class:
            raise ConfigError(
                f"class {c} has {len(members)} examples but {per_class} per class are needed; "
                "lower the per-class count or pass more data."
            )
        idx.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(idx)


def subset_per_class(
    x: Tensor, y: Tensor, per_class: int, generator: Seed = None, classes: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """A class-balanced random subset with ``per_class`` examples of each class (``generator``: a seed or a Generator)."""
    labels = classes if classes is not None else sorted(torch.unique(y).tolist())
    order = class_balanced_indices(y, per_class, labels, generator)
    return x[order], y[order]
