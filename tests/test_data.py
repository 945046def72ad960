"""Dataset loaders: shipped and generated sets, and the file readers on files the tests write."""

import gzip
import io
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from symgen.data import load_dataset, read_idx, subset_per_class
from symgen.errors import ConfigError, MissingDataError


def test_digits_shapes_and_determinism():
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    assert x.shape == (1347, 1, 8, 8) and xt.shape == (450, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.stride() == (64, 64, 8, 1)  # standard strides, not ambiguous channels-last ones
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) == set(range(10))
    x2, y2 = load_dataset("digits", "train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = load_dataset("digits", "train", generator=1)
    assert not torch.equal(x, x3)


def test_mnist1d_generated_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMGEN_CACHE", str(tmp_path))
    state = np.random.get_state()[1].copy()
    x, y = load_dataset("mnist1d", "train")
    assert np.array_equal(state, np.random.get_state()[1])  # caller's numpy stream untouched
    xt, yt = load_dataset("mnist1d", "test")
    assert x.shape == (4000, 1, 40) and xt.shape == (1000, 1, 40)
    assert set(y.tolist()) == set(range(10))
    assert (tmp_path / "mnist1d-v1.npz").exists()
    x2, _ = load_dataset("mnist1d", "train")  # from the cache
    assert torch.equal(x, x2)


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_mnist_layout(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=5)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert x.shape == (5, 1, 28, 28)
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs / 255.0).float())
    assert y.tolist() == labels.tolist()
    with pytest.raises(MissingDataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", root=tmp_path)


def test_idx_reader_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(MissingDataError, match="not an IDX"):
        read_idx(tmp_path / "bad")


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, f)
    x, y = load_dataset("cifar10", "test", root=tmp_path)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 3]
    assert torch.allclose(x[1, 2, 0, :3], torch.tensor(data[1, 2048:2051] / 255.0, dtype=torch.float32))
    with pytest.raises(MissingDataError, match="data_batch_1"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_bad_names_and_missing_root():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(MissingDataError, match="root"):
        load_dataset("mnist")


def test_subset_per_class():
    x, y = load_dataset("digits", "train")
    xs, ys = subset_per_class(x, y, 3, generator=0)
    xg, _ = subset_per_class(x, y, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xs, xg)  # a seed and the generator it names draw the same subset
    assert torch.bincount(ys).tolist() == [3] * 10
    with pytest.raises(ConfigError):
        subset_per_class(x[:20], y[:20], 10)


def write_fake_cifar(root, sizes=None, seed=0):
    """CIFAR-10 python batch files in the real format (pickled dicts of uint8 rows and label lists) under
    ``root/cifar-10-batches-py``; ``sizes``: images per file (default 20 per train file, 77 test)."""
    sizes = sizes or {**{f"data_batch_{i}": 20 for i in range(1, 6)}, "test_batch": 77}
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    return base


def test_cifar10_batches_read_lazily_file_by_file(tmp_path, monkeypatch):
    import symgen.data as data
    from symgen.data import Cifar10Batches

    write_fake_cifar(tmp_path, {**{f"data_batch_{i}": 13 for i in range(1, 6)}, "test_batch": 9})
    x, y = load_dataset("cifar10", "train", root=tmp_path)
    reads = []
    real = data._read_cifar_file
    monkeypatch.setattr(data, "_read_cifar_file", lambda p: (reads.append(p.name), real(p))[1])
    stream = Cifar10Batches("train", tmp_path, batch_size=4)
    it = iter(stream)
    xb, yb = next(it)
    assert reads == ["data_batch_1"] and xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32
    rest = list(it)
    assert reads == [f"data_batch_{i}" for i in range(1, 6)]
    # batches never straddle files (13 = 4 + 4 + 4 + 1), and together they are load_dataset's tensors
    assert [b[0].shape[0] for b in [(xb, yb), *rest]] == [4, 4, 4, 1] * 5
    assert torch.equal(torch.cat([xb, *[b[0] for b in rest]]), x)
    assert torch.equal(torch.cat([yb, *[b[1] for b in rest]]), y)
    assert len(list(stream)) == 20  # re-iterable
    with pytest.raises(MissingDataError, match="root"):
        Cifar10Batches("test")
    with pytest.raises(ConfigError, match="batch_size"):
        Cifar10Batches("test", tmp_path, batch_size=0)


def _py2_batch(data, labels):
    """A CIFAR-10 batch byte for byte as Python 2's cPickle (protocol 2) wrote the real files with numpy 1.x:
    ``str`` as SHORT_BINSTRING/BINSTRING, the array through ``numpy.core.multiarray._reconstruct``."""

    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v):
        return b"J" + struct.pack("<i", v)

    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        b"(K\x01" + i(n) + i(width) + b"\x86"
        b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R(K\x03" + s(b"|") + b"NNN" + i(-1) + i(-1) + b"K\x00tb"
        b"\x89" + s(data.tobytes()) + b"tb"
    )
    items = s(b"batch_label") + s(b"training batch 1 of 5") + s(b"labels") + b"](" + b"".join(i(v) for v in labels)
    items += b"e" + s(b"data") + array + s(b"filenames") + b"](" + b"".join(s(b"x%d.png" % k) for k in range(n)) + b"e"
    return b"\x80\x02}(" + items + b"u."


@pytest.mark.parametrize("fmt", ["python2-cpickle", "protocol-2", "protocol-4", "protocol-5", "numpy-int-labels"])
def test_cifar10_real_formats_load_identically(tmp_path, fmt):
    """The restricted unpickler reads the real files' format (and what Python 3 writes) to the same values."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=6)]
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data, b"filenames": [b"a.png"] * 6}
    if fmt == "python2-cpickle":
        raw = _py2_batch(data, labels)
        assert pickletools.dis(raw, out=io.StringIO()) is None  # a well-formed pickle
    elif fmt == "numpy-int-labels":
        raw = pickle.dumps({**batch, b"labels": list(np.asarray(labels))}, protocol=2)
    else:
        raw = pickle.dumps(batch, protocol=int(fmt[-1]))
    (tmp_path / "test_batch").write_bytes(raw)
    x, y = load_dataset("cifar10", "test", root=tmp_path)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(data.reshape(6, 3, 32, 32).astype(np.float32) / 255.0))
    assert y.dtype == torch.int64 and y.tolist() == labels


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, r"\(N, 3072\).*shape \(4, 3071\)"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8.*float32"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 images but 3 labels"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"0\.\.9"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": ["a"] * 4}, "list of integers"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 4}, "b'data' and b'labels'"),
        ([1, 2, 3], "expected a dict"),
        ({b"data": np.zeros((4, 3072), object), b"labels": [0] * 4}, "refused dtype object"),
    ],
)
def test_cifar10_wrong_structure_is_a_clear_error(tmp_path, batch, match):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(MissingDataError, match=match) as err:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(err.value) and "\n" not in str(err.value)


def test_cifar10_not_a_pickle_is_a_clear_error(tmp_path):
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MissingDataError, match="cannot read .*test_batch: not a CIFAR-10 python batch"):
        load_dataset("cifar10", "test", root=tmp_path)
