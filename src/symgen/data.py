"""Datasets that need no network: generated, shipped in an installed package, or read from a path.

``load_dataset(name, split, root, generator)`` returns ``(x, y)``: x float32 in [0, 1] for images
(standardized for mnist1d, as its generator does), y int64 class labels.
"""

from __future__ import annotations

import gzip
import math
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
    """Where generated datasets are cached: ``$SYMGEN_CACHE`` or ``~/.cache/symgen``.

    Returns:
        The folder (made if missing).
    """
    path = Path(os.environ.get("SYMGEN_CACHE", Path.home() / ".cache" / "symgen"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, generator: Seed = None
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of dataset ``name`` and ``split``.

    digits: (N, 1, 8, 8) in [0, 1], a stratified 75/25 split shuffled by ``generator``.
    mnist1d: (N, 1, 40), generated offline (seed 42 template set, 4000/1000 split), cached.
    mnist, fashion-mnist: (N, 1, 28, 28) from IDX files (gzipped or not) under ``root``.
    cifar10: (N, 3, 32, 32) from the python batches under ``root``, read with a restricted unpickler
    (dicts, lists, strings, numbers and numeric arrays only: a batch naming any other global, such as
    ``os.system``, is a :class:`MissingDataError` and nothing it names is called) and checked
    (``b"data"`` (N, 3072) uint8, N ``b"labels"`` in 0..9).

    Args:
        name: digits, mnist1d, mnist, fashion-mnist or cifar10.
        split: "train" or "test".
        root: the folder of the downloaded files (mnist, fashion-mnist, cifar10).
        generator: a seed or a ``torch.Generator`` for the digits split; None = seed 0.

    Returns:
        ``(x, y)``.

    Raises:
        ConfigError: an unknown dataset or split.
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
    """Read an IDX file (the MNIST format), gzipped or not.

    Args:
        path: the file (``.gz``: gzipped).

    Returns:
        The array, shaped as its header says.

    Raises:
        MissingDataError: not an IDX file, or truncated.
    """
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


_CIFAR_REFUSAL = "CIFAR-10 batches hold only arrays, lists and strings"
_NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex


class _RefusedGlobal(pickle.UnpicklingError):
    """A global that a CIFAR-10 batch never holds (a function or class of any other module)."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


def _text(value: Any) -> str:
    """A pickled string: ``str``, or ``bytes`` where a Python 2 ``str`` was read with ``encoding='bytes'``."""
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, str):
        return value
    raise pickle.UnpicklingError(f"expected a string, found {type(value).__name__}")


class _Dtype:
    """Stand-in for ``numpy.dtype(code, align, copy)`` while unpickling: a numeric dtype only, built from its
    type code and byte order; no other dtype state (fields, subarrays, flags) reaches numpy."""

    def __init__(self, code: Any, *_: Any) -> None:
        dtype = np.dtype(_text(code))
        if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise pickle.UnpicklingError(f"refused dtype {dtype!s}: only numeric arrays are data")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("refused a structured or sub-array dtype: only numeric arrays are data")
        order = _text(state[1])
        if order not in "<>|=" or len(order) != 1:
            raise pickle.UnpicklingError(f"bad byte order {order!r} in a dtype")
        if order == "<":
            self.dtype = self.dtype.newbyteorder("<")
        elif order == ">":
            self.dtype = self.dtype.newbyteorder(">")


def _as_dtype(value: Any) -> np.dtype[Any]:
    if not isinstance(value, _Dtype):
        raise pickle.UnpicklingError(f"expected a dtype, found {type(value).__name__}")
    return value.dtype


def _buffer(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # numpy 1.x pickles of Python 2 era: raw data as a latin-1 str
        return value.encode("latin1")
    raise pickle.UnpicklingError(f"expected raw array data, found {type(value).__name__}")


def _array(raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    if not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"bad array shape {shape!r}")
    flat = np.frombuffer(_buffer(raw), dtype=_as_dtype(dtype))
    if flat.size != math.prod(shape):
        raise pickle.UnpicklingError(f"array of shape {tuple(shape)} holds {flat.size} values")
    return flat.reshape(tuple(shape), order="F" if fortran else "C").copy()


class _Array:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, shape, code)``: its ``__setstate__`` takes
    the array's (version, shape, dtype, fortran, raw bytes) and builds the array with ``np.frombuffer``."""

    def __init__(self, subtype: Any, *_: Any) -> None:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("refused an ndarray subclass: only plain arrays are data")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("bad ndarray state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array(raw, dtype, shape, bool(fortran))


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Stand-in for numpy's ``_frombuffer`` (arrays pickled with protocol 5)."""
    return _array(buf, dtype, shape, _text(order) == "F")


def _scalar(dtype: Any, raw: Any = b"") -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar`` (a numpy number such as ``np.int64(3)``)."""
    return _array(raw, dtype, (1,), False)[0]


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: how Python 3 pickles ``bytes`` with protocol 2 (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than a string to latin-1 bytes")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes()``: how protocol 2 pickles ``b''``."""
    if args:
        raise pickle.UnpicklingError("refused bytes() with arguments")
    return b""


_NUMPY_HELPERS = {"_reconstruct": _Array, "scalar": _scalar, "_frombuffer": _frombuffer}
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    **{
        (module, name): helper
        for name, helper in _NUMPY_HELPERS.items()
        for module in (  # numpy 1.x and 2.x module names
            "numpy.core.multiarray",
            "numpy._core.multiarray",
            "numpy.core.numeric",
            "numpy._core.numeric",
        )
    },
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds (dicts, lists, strings, bytes, numbers, numeric arrays)
    and refuses every other global, so a batch file can never name a function to call."""

    def find_class(self, module: str, name: str) -> Any:
        """The admitted stand-in for ``module.name``; :class:`_RefusedGlobal` for anything else."""
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (a CIFAR-10 batch has none)."""
        raise pickle.UnpicklingError("refused a persistent id")


def _materialize(obj: Any) -> Any:
    """``obj`` with each array stand-in replaced by its array."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("an ndarray without its data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    return obj


def _unpickle_cifar(path: Path) -> Any:
    """The object a CIFAR-10 batch file holds, through the restricted unpickler; a one-line
    :class:`MissingDataError` naming the file for a refused global or a file that is not a pickle."""
    try:
        with open(path, "rb") as f:
            return _materialize(_CifarUnpickler(f, encoding="bytes").load())
    except _RefusedGlobal as e:
        raise MissingDataError(f"refused to load {e.qualified} from {path}: {_CIFAR_REFUSAL}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise MissingDataError(f"cannot read {path}: not a CIFAR-10 python batch ({why}).") from None


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 of one CIFAR-10 python batch file, checked: a dict
    with ``b"data"`` (n, 3072) uint8 and ``b"labels"``, n class labels in 0..9."""
    batch = _unpickle_cifar(path)
    bad = f"{path} is not a CIFAR-10 python batch"
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise MissingDataError(f"{bad}: expected a dict with keys b'data' and b'labels', found {keys}.")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MissingDataError(f"{bad}: b'data' must be a uint8 array of shape (N, 3072), found a {found}.")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise MissingDataError(f"{bad}: b'labels' must be a list of integers.")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.shape[0] != data.shape[0]:
        raise MissingDataError(f"{bad}: {data.shape[0]} images but {y.shape[0]} labels.")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise MissingDataError(f"{bad}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}.")
    return data.reshape(-1, 3, 32, 32), y


def _cifar10(split: str, root: str | Path | None) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(_read_cifar_file(p) for p in _cifar10_files(split, root)), strict=True)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(ys))


class Cifar10Batches:
    """A CIFAR-10 split as a re-iterable of ``(x, y)`` batches of ``batch_size``, read lazily: one batch
    file (10000 images, 30 MB as uint8) and one float32 batch in memory at a time. The same values,
    in the same order, as :func:`load_dataset` ("cifar10"); usable wherever a DataLoader is.

    Args:
        split: "train" or "test".
        root: the folder of the python batches.
        batch_size: images per batch.
    """

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

    Args:
        y: labels.
        per_class: indices per class.
        classes: a count C (classes 0..C-1) or an explicit list of labels.
        generator: a seed or a ``torch.Generator``.

    Returns:
        The indices, class by class.

    Raises:
        ConfigError: a class has fewer than ``per_class`` examples.
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
    """A class-balanced random subset with ``per_class`` examples of each class.

    Args:
        x: inputs.
        y: labels.
        per_class: examples per class.
        generator: a seed or a ``torch.Generator``.
        classes: the labels to keep, in order (default: every label in y, sorted).

    Returns:
        ``(x_subset, y_subset)``.
    """
    labels = classes if classes is not None else sorted(torch.unique(y).tolist())
    order = class_balanced_indices(y, per_class, labels, generator)
    return x[order], y[order]
