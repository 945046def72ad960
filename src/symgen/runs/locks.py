"""Run locks: the file ``lock`` in a run directory names the process that runs it (pid, host, start time).

The process holds an exclusive ``flock`` on the file while it runs, so the kernel frees the lock when
the process dies, even by SIGKILL (SQLite's rule: a lock dies with its process). A lock file whose
lock is free is stale: its process is gone, and the next run takes it over. Where ``flock`` is not
available, a lock is stale when its pid is dead on this host. A live lock refuses a second process.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from symgen.errors import SymgenError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "LockInfo", "RunLock", "alive", "read_lock", "lock_held"]

LOCK_NAME = "lock"


@dataclass
class LockInfo:
    """What a lock file says: the process that holds (or held) the run."""

    pid: int
    host: str
    started: float

    def describe(self) -> str:
        """The holder in words: ``pid 123 on host, since 2024-01-01 12:00:00``.

        Returns:
            The description.
        """
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, since {since}"


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not).

    Args:
        pid: the process id.

    Returns:
        True when it runs (or cannot be checked: another user's process).
    """
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def read_lock(path: Path) -> LockInfo | None:
    """The holder a lock file names (None: no file, or not a lock file's content).

    Args:
        path: the lock file.

    Returns:
        The holder, or None.
    """
    try:
        data = json.loads(Path(path).read_text())
        return LockInfo(int(data["pid"]), str(data["host"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flock(fd: int, shared: bool) -> bool | None:
    """Take a non-blocking flock: True taken, False held by another process, None not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def lock_held(run_path: Path) -> bool | None:
    """Whether a live process holds the run's lock.

    Args:
        run_path: the run directory.

    Returns:
        True (held by a live process), False (a stale lock file), None (no lock file).
    """
    path = Path(run_path) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        info = read_lock(path)
        return None if info is None else _pid_holds(info)
    try:
        got = _flock(fd, shared=True)
    finally:
        os.close(fd)  # closing drops a shared lock taken here
    if got is None:
        info = read_lock(path)
        return None if info is None else _pid_holds(info)
    return not got


def _pid_holds(info: LockInfo) -> bool:
    return info.host != socket.gethostname() or alive(info.pid)


class RunLock:
    """The lock of one run, held by this process from :meth:`acquire` to :meth:`release`.

    Args:
        path: the lock file.
        fd: the open file descriptor that holds the lock.
        stale: the holder of the stale lock taken over (None: the run was not locked).

    Attributes:
        path: the lock file.
        stale: the holder of the stale lock taken over (None: the run was not locked).
    """

    def __init__(self, path: Path, fd: int, stale: LockInfo | None):
        self.path, self._fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, run_path: Path, tries: int = 20) -> RunLock:
        """Lock a run for this process; a stale lock is taken over.

        Args:
            run_path: the run directory.
            tries: attempts while another process only looks at the lock.

        Returns:
            The held lock.

        Raises:
            SymgenError: a live process holds the run (the message names its pid).
        """
        path = Path(run_path) / LOCK_NAME
        for attempt in range(tries):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise SymgenError(f"cannot lock run {run_path}: {path}: {e.strerror or e}.") from None
            got = _flock(fd, shared=False)
            previous = read_lock(path)
            if got is None and previous is not None and _pid_holds(previous) and previous.pid != os.getpid():
                got = False  # no flock here: a live pid holds it
            if got is False:
                os.close(fd)
                if previous is not None and attempt >= 3 or attempt == tries - 1:
                    who = previous.describe() if previous is not None else "another process"
                    pid = f"`kill {previous.pid}`" if previous is not None else "it"
                    raise SymgenError(
                        f"run {Path(run_path).name} is still running ({who}); two processes cannot write one run. "
                        f"Wait for it to finish, or stop it ({pid}) and resume it then."
                    )
                time.sleep(0.05)  # someone only looks at the lock (`runs ls`): try again
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it while we opened it: take the new file
                os.close(fd)
                continue
            me = LockInfo(os.getpid(), socket.gethostname(), time.time())
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
            os.fsync(fd)
            stale = previous if previous is not None and previous.pid != me.pid else None
            return cls(path, fd, stale)
        raise SymgenError(f"cannot lock run {run_path}: {path} keeps changing; try again.")  # pragma: no cover

    def release(self) -> None:
        """Remove the lock file and drop the lock (a second call does nothing)."""
        if self._fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only directory: the kernel frees the flock below, the file is stale
        os.close(self._fd)
        self._fd = -1
