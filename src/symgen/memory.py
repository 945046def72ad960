"""Memory sized before it is spent: the memory a device has available, the limit on what one result and
its working set may take, and the check that raises a :class:`~symgen.errors.MemoryBudgetError` first.

The limit is the device's available memory (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of
``/proc/meminfo`` on Linux, else ``psutil`` if installed, else a conservative 2 GiB), unless set: by
:func:`set_memory_limit` (or the :func:`memory_limit` context manager) or the environment variable
``SYMGEN_MEMORY_LIMIT`` (bytes, or with a suffix K, M, G, T: ``SYMGEN_MEMORY_LIMIT=8G``). Kernels, curvature
operators and estimators call :func:`check_fits` with the bytes of their output and working set before
allocating them, so a request that cannot fit fails at once with the sizes and a way to block or stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from symgen.errors import ConfigError, MemoryBudgetError

__all__ = ["available_bytes", "limit_bytes", "set_memory_limit", "memory_limit", "check_fits", "format_bytes"]

FALLBACK_BYTES = 2 << 30  # a conservative guess where the available memory cannot be read
ENV_VAR = "SYMGEN_MEMORY_LIMIT"
_limit: int | None = None
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(nbytes: float) -> str:
    """``nbytes`` for a message: "1.5 GiB", "12.0 MiB", "512 B".

    Args:
        nbytes: a number of bytes.

    Returns:
        The human-readable size (with the exact count above 1 KiB).
    """
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit} ({int(nbytes)} bytes)"
    return f"{int(nbytes)} B"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device | str | None = None) -> int:
    """The memory ``device`` has available now, in bytes.

    Args:
        device: a CUDA device (free memory by ``torch.cuda.mem_get_info``) or the CPU / None (``MemAvailable``
            of ``/proc/meminfo``, else ``psutil.virtual_memory().available``, else 2 GiB).

    Returns:
        The available bytes.
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        return FALLBACK_BYTES


def _parse(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = _SUFFIXES.get(t[-1:], 1) if t else 1
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        value = -1.0
    if not value >= 1:
        raise ConfigError(f"{ENV_VAR} must be a positive number of bytes (e.g. 8G, 512M), got {text!r}.")
    return int(value)


def limit_bytes(device: torch.device | str | None = None) -> int:
    """The most bytes one result and its working set may take on ``device``.

    Args:
        device: where it is allocated.

    Returns:
        The limit set by :func:`set_memory_limit` / :func:`memory_limit`, else ``SYMGEN_MEMORY_LIMIT``, else
        :func:`available_bytes`.
    """
    if _limit is not None:
        return _limit
    env = os.environ.get(ENV_VAR)
    if env:
        return _parse(env)
    return available_bytes(device)


def set_memory_limit(nbytes: int | None) -> None:
    """Set the limit every size check uses (None: back to the environment variable or the available memory).

    Args:
        nbytes: the limit in bytes, or None.
    """
    global _limit
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1):
        raise ConfigError(f"the memory limit must be a positive number of bytes or None, got {nbytes!r}.")
    _limit = nbytes


@contextlib.contextmanager
def memory_limit(nbytes: int | None) -> Iterator[None]:
    """Within the block, every size check uses ``nbytes`` as the limit (see :func:`set_memory_limit`).

    Args:
        nbytes: the limit in bytes, or None.

    Yields:
        Nothing.
    """
    before = _limit
    set_memory_limit(nbytes)
    try:
        yield
    finally:
        set_memory_limit(before)


def check_fits(
    nbytes: float, what: str, how_to_fix: str, *, device: torch.device | str | None = None, limit: int | None = None
) -> None:
    """Raise a :class:`MemoryBudgetError` when ``nbytes`` exceed the limit, before anything is allocated.

    Args:
        nbytes: the bytes the request will hold at once.
        what: what needs them, for the message (e.g. "the empirical NTK's (50000, 50000) float32 output").
        how_to_fix: how to block or stream instead, for the message.
        device: where they would be allocated (the limit is that device's).
        limit: the limit to use instead of :func:`limit_bytes`.

    Raises:
        MemoryBudgetError: naming the size needed, the limit and ``how_to_fix``.
    """
    cap = limit_bytes(device) if limit is None else limit
    if nbytes <= cap:
        return
    source = (
        "the limit given"
        if limit is not None
        else ("the memory limit set" if _limit is not None or os.environ.get(ENV_VAR) else "the available memory")
    )
    raise MemoryBudgetError(
        f"{what} needs {format_bytes(nbytes)}, more than {source} ({format_bytes(cap)}"
        f"{'' if device is None else ' on ' + str(device)}); {how_to_fix}. The limit is the available memory "
        f"unless set by symgen.memory.set_memory_limit(nbytes) or {ENV_VAR}."
    )
