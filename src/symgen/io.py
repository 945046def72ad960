"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the old file intact (SQLite's
rule for a file that must survive a crash: write aside, fsync, rename). An ``OSError`` (a full disk,
a read-only directory) names the target file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file object) to ``path`` atomically.

    Args:
        path: the target file (its directory is created when missing).
        data: text, bytes, or a function that writes to a binary file object.

    Returns:
        ``path``, as a ``Path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            raise _naming(e, path) from e
        raise
    return path


def _naming(e: OSError, path: Path) -> OSError:
    """The same error (same subclass and errno) with ``path`` as its file name, when it names none."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
