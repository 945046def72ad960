"""The run store's SQLite index, ``runs/index.sqlite``: a cache of what the run directories hold.

The directories are the truth (as in MLflow's file store): every run directory holds its own
``status.json``. The index lists the runs for tools and remembers runs whose directory was deleted.
An index that is missing, empty or damaged is set aside (``index.sqlite.corrupt-<time>``) and
rebuilt from the directories; a rebuilt index is written aside and renamed into place (atomic).
SQLite's own rollback journal keeps it whole through a crash (one file: a store can be copied or
read on a read-only disk, which WAL would not allow).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from symgen.errors import SymgenError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["COLUMNS", "RunIndex"]

COLUMNS = {
    "id": "TEXT PRIMARY KEY",
    "experiment": "TEXT",
    "created": "TEXT",
    "status": "TEXT",
    "path": "TEXT",
    "passed": "INTEGER",
    "total": "INTEGER",
    "seconds": "REAL",
    "quick": "INTEGER",
    "config_hash": "TEXT",
    "pid": "INTEGER",
    "host": "TEXT",
    "subject": "TEXT",
}


class RunIndex:
    """The SQLite file that lists a store's runs; every failure is a :class:`SymgenError` naming it.

    Args:
        path: the index file (``<root>/index.sqlite``).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self, path: Path | None = None) -> sqlite3.Connection:
        db = sqlite3.connect(path or self.path, timeout=30)
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def opening(self) -> Iterator[None]:
        """Inside: this process alone checks, creates or rebuilds the index (an exclusive ``flock`` on
        ``index.sqlite.lock``; no lock where ``flock`` is missing or the directory is read-only). Without it,
        processes opening a fresh store at once raced: one took another's half-created (0-byte) index for
        damaged and set it aside under that process's open transaction, which then failed with a disk I/O error.

        Yields:
            None, once.
        """
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            f = open(lock, "a") if fcntl is not None else None  # noqa: SIM115 - closed below
        except OSError:
            f = None  # a read-only store: it cannot be rebuilt, and nothing here writes it
        try:
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            yield
        finally:
            if f is not None:
                f.close()  # closing releases the flock

    def health(self) -> str | None:
        """What is wrong with the index file (None: it is whole, or it does not exist yet).

        Returns:
            ``"empty"``, a damage description, or None.
        """
        if not self.path.exists():
            return None
        if self.path.stat().st_size == 0:
            return "empty (0 bytes)"
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            try:
                (check,) = db.execute("PRAGMA quick_check").fetchone()
                have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            return f"damaged ({e})"
        if check != "ok":
            return f"damaged ({check})"
        if "id" not in have:
            return "damaged (no runs table)"
        return None

    def ensure_schema(self) -> None:
        """Create the table, and add the columns that older versions lacked."""
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        with self._guard("update"):
            db = self._connect()
            try:
                with db:
                    have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
                    if not have:
                        db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
                    for k, v in COLUMNS.items():  # stores made by older versions gain the new columns
                        if have and k not in have:
                            db.execute(f"ALTER TABLE runs ADD COLUMN {k} {v}")
            finally:
                db.close()

    def rows(self) -> list[dict[str, Any]]:
        """Every row, with ``_order`` (its insertion order).

        Returns:
            One dict per run.
        """
        if not self.path.exists():
            return []
        with self._guard("read"):
            db = self._connect()
            try:
                db.row_factory = sqlite3.Row
                return [dict(r) for r in db.execute("SELECT rowid AS _order, * FROM runs")]
            finally:
                db.close()

    def upsert(self, row: dict[str, Any], keep: Iterable[str] = ()) -> None:
        """Insert or update a run's row; the fields in ``keep`` that are None keep their stored values.

        Args:
            row: the columns (``id`` required).
            keep: columns whose None means "unchanged".
        """
        names = [k for k in COLUMNS if k in row]
        sets = ", ".join(
            f"{k}=COALESCE(excluded.{k}, {k})" if k in set(keep) else f"{k}=excluded.{k}" for k in names if k != "id"
        )
        sql = (
            f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)}) "
            f"ON CONFLICT(id) DO UPDATE SET {sets}"
        )
        with self._guard("update"):
            db = self._connect()
            try:
                with db:
                    db.execute(sql, [row[k] for k in names])
            finally:
                db.close()

    def delete(self, run_id: str) -> None:
        """Remove a run's row.

        Args:
            run_id: the run's id.
        """
        with self._guard("update"):
            db = self._connect()
            try:
                with db:
                    db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            finally:
                db.close()

    def set_aside(self, why: str) -> Path | None:
        """Rename the index file to ``index.sqlite.corrupt-<time>`` (kept for inspection).

        Args:
            why: the suffix's word (``corrupt`` or ``old``).

        Returns:
            The new name, or None when there was no file.
        """
        aside = self.path.with_name(f"{self.path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return None  # another process set it aside first
        except OSError as e:
            raise SymgenError(f"the run index {self.path} must be rebuilt but cannot be moved: {e.strerror}.") from None
        for suffix in ("-journal", "-wal", "-shm"):  # a journal belongs to the file set aside
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    def replace_with(self, rows: list[dict[str, Any]]) -> None:
        """Write a fresh index holding ``rows`` aside, then rename it over the index (atomic).

        Args:
            rows: the runs, in creation order.
        """
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.rebuild")
        tmp.unlink(missing_ok=True)
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        with self._guard("rebuild"):
            db = self._connect(tmp)
            try:
                with db:
                    db.execute(f"CREATE TABLE runs ({cols})")
                    for row in rows:
                        names = [k for k in COLUMNS if k in row]
                        db.execute(
                            f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                            [row[k] for k in names],
                        )
            finally:
                db.close()
            os.replace(tmp, self.path)

    def _guard(self, action: str) -> AbstractContextManager[None]:
        return _index_errors(self.path, action)


@contextmanager
def _index_errors(path: Path, action: str) -> Iterator[None]:
    """Turn sqlite3 and OS errors into one :class:`SymgenError` that names the index file."""
    try:
        yield
    except (sqlite3.Error, OSError) as err:
        text = " ".join(str(err).split())
        if isinstance(err, sqlite3.OperationalError) and "readonly" in text:
            hint = "the store is read-only"
        elif "disk is full" in text or getattr(err, "errno", None) == 28:
            hint = "disk full"
        else:
            hint = "`symgen runs repair` rebuilds it from the run directories"
        raise SymgenError(f"cannot {action} the run index {path}: {text} ({hint}).") from None
