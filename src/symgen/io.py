"""Atomic file writes: a temporary file in the target's directory, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the old file intact.
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
