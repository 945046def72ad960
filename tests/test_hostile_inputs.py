"""Hostile files and strings: a CIFAR-10 batch that would run code, HTML built from strings that would inject
markup or script, terminal output of strings holding control sequences.

Each check looks at an independent fact: a marker file on disk that must not exist, the stdlib HTML
parser's view of a page, the characters that reach a stream.
"""

import os
import pickle
import re

import numpy as np
import pytest

from symgen.data import Cifar10Batches, load_dataset
from symgen.errors import MissingDataError

# ---------------------------------------------------------------------------------------------- CIFAR-10


class _RunsShell:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpensFile:
    """Unpickling calls ``open(path, "w")``: creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _EvalsCode:
    """Unpickling calls ``eval`` on code that creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w')",))


def _cifar_dir(tmp_path, payload, protocol):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({**good, b"labels": [0, payload]}, protocol=protocol))
    return base


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    ("make", "refused"),
    [
        (lambda m: _RunsShell(f"touch {m}"), r"(posix|nt|os)\.system"),
        (lambda m: _OpensFile(m), r"(builtins|__builtin__|io)\.open"),
        (lambda m: _EvalsCode(m), r"(builtins|__builtin__)\.eval"),
    ],
)
def test_malicious_cifar_batch_never_runs(tmp_path, make, refused, protocol):
    marker = tmp_path / "PWNED"
    _cifar_dir(tmp_path, make(marker), protocol)
    with pytest.raises(MissingDataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert not marker.exists(), "unpickling a CIFAR-10 batch ran the code it names"
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("refused to load ")
    assert "data_batch_1" in msg and "CIFAR-10 batches hold only arrays, lists and strings" in msg
    assert re.search(rf"refused to load {refused} from ", msg), msg
    with pytest.raises(MissingDataError, match="refused to load"):
        list(Cifar10Batches("test", tmp_path, batch_size=1))  # the lazy reader too
    assert not marker.exists()


def test_malicious_cifar_batch_one_line_from_the_cli(tmp_path, capsys):
    """``symgen audit --data cifar10 --root DIR`` on a hostile batch: exit 2, one line on stderr, no command run."""
    from symgen.cli import main

    marker = tmp_path / "PWNED"
    _cifar_dir(tmp_path, _RunsShell(f"touch {marker}"), 2)
    model = f"{os.path.join(os.path.dirname(__file__), 'audit_user_model.py')}:make_model"
    code = main(["audit", "--model", model, "--data", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refused to load" in lines[0] and "system" in lines[0], err


def test_numpy_global_tricks_are_refused(tmp_path):
    """Names of numpy and the codec module other than the admitted helpers are refused too."""
    marker = tmp_path / "PWNED"

    class _NumpyLoad:
        def __reduce__(self):
            return (np.save, (str(marker), np.zeros(1)))

    class _Codec:
        def __reduce__(self):
            import codecs

            return (codecs.encode, ("x", "rot13"))

    for payload, name in [(_NumpyLoad(), "numpy.save"), (_Codec(), "_codecs.encode")]:
        (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": payload}, protocol=4))
        with pytest.raises(MissingDataError) as err:
            load_dataset("cifar10", "test", root=tmp_path)
        assert "test_batch" in str(err.value) and name in str(err.value), str(err.value)
    assert not marker.exists() and not marker.with_suffix(".npy").exists()
