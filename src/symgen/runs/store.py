"""The run store: run directories (the truth) and their SQLite index (a cache that can be rebuilt).

``runs/<time>-<experiment>-<id>/`` is one run (:class:`~symgen.runs.rundir.RunDir`); ``runs/index.sqlite``
lists them (:class:`~symgen.runs.index.RunIndex`). A run directory is built under a hidden name and
renamed into place, so it appears whole or not at all; a directory the index does not know is found
and listed; an index row whose directory is gone is listed as ``missing``. Each run's state is
read off its directory: ``done``, ``running`` (its lock is held), ``interrupted`` (resumable: Ctrl-C,
SIGTERM, a broken pipe, a full disk, a lost pool worker, or a process that died), ``failed`` (an
error), ``incomplete`` (a file is missing or damaged) or ``missing`` (the directory is gone).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from symgen.errors import SymgenError
from symgen.experiments.base import ExperimentConfig, jsonable
from symgen.runs.index import COLUMNS, RunIndex
from symgen.runs.locks import RunLock, alive, lock_held
from symgen.runs.rundir import RUN_NAME, RunDir, file_mode, warn

__all__ = ["RunDir", "RunStore", "config_hash", "share_mode", "STATES"]

STATES = ("done", "running", "interrupted", "failed", "incomplete", "missing")
_CREATING = ".creating-"


class RunStore:
    """Run directories under ``root`` and their SQLite index.

    The index holds each run's directory name, resolved against ``root`` when read: a store can be
    moved or copied and read from any working directory. An index that is missing (while runs
    exist), empty or damaged is set aside and rebuilt from the run directories, with a warning.

    Args:
        root: the store's directory (created when missing).
    """

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SymgenError(f"--out {self.root} is a file, not a run store directory; give a directory.")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SymgenError(f"cannot create the run store {self.root}: {e.strerror} ({e.filename}).") from None
        self.index = self.root / "index.sqlite"
        self._index = RunIndex(self.index)
        self._index_ok = True
        with self._index.opening():
            damage = self._index.health()
            if damage is not None:
                self._rebuild_damaged(damage)
            elif not self.index.exists():
                if not self.writable():
                    self._index_ok = False  # a read-only store without an index: read the directories alone
                elif self._run_dirs():
                    self._index.replace_with(self._rows_from_dirs({}))
                    warn(f"the run index {self.index} was missing; rebuilt from the run directories.")
                else:
                    self._index.replace_with([])  # written aside and renamed: never seen half-made
            elif self.writable():
                self._index.ensure_schema()

    def writable(self) -> bool:
        """Whether this process may write the store's directory.

        Returns:
            True when it may.
        """
        return os.access(self.root, os.W_OK | os.X_OK)

    def _rebuild_damaged(self, damage: str) -> None:
        if not self.writable():
            raise SymgenError(
                f"the run index {self.index} is {damage}, and the store is read-only so it cannot be rebuilt; "
                "copy the store somewhere writable and run `symgen runs repair` there."
            )
        aside = self._index.set_aside("corrupt")
        self._index.replace_with(self._rows_from_dirs({}))
        where = f"; set aside as {aside.name}" if aside is not None else ""
        warn(f"the run index {self.index} was {damage}{where}; rebuilt from the run directories.")

    # -- writing -------------------------------------------------------------------------------------

    def create(
        self, experiment: str, config: ExperimentConfig, quick: bool, subject: str = "", locked: bool = False
    ) -> RunDir:
        """A new run directory holding ``config.yaml`` and ``status.json``, indexed as ``running``.

        The directory is written under a hidden name and renamed into place: it appears whole.

        Args:
            experiment: the experiment's name (``audit`` for an audit).
            config: the run's settings.
            quick: whether the run uses the quick settings.
            subject: what the run measures (an audit's model and data), shown by ``runs ls``.
            locked: lock the run for this process before it appears (``run.lock``).

        Returns:
            The new run.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{experiment}-{secrets.token_hex(3)}"
        tmp, run = self.root / f"{_CREATING}{name}", RunDir(self.root / name)
        try:
            tmp.mkdir(parents=True)
            if locked:
                run.lock = RunLock.acquire(tmp)
            building = RunDir(tmp)
            building.write_yaml(
                "config.yaml", {"experiment": experiment, "quick": quick, "config": config.model_dump()}
            )
            building.write_status(
                experiment=experiment,
                status="running",
                created=time.strftime("%Y-%m-%d %H:%M:%S"),
                created_ts=time.time(),
                quick=quick,
                config_hash=config_hash(config),
                subject=subject,
                pid=os.getpid(),
                host=socket.gethostname(),
                seconds=0.0,
            )
            os.rename(tmp, run.path)
        except OSError as e:
            if run.lock is not None:
                run.lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise SymgenError(
                f"cannot create a run in the store {self.root}: {e.strerror} ({e.filename or tmp})."
            ) from None
        if run.lock is not None:
            run.lock.path = run.path / run.lock.path.name
        self._index_write(run, experiment, "running", quick=quick, config_hash=config_hash(config), subject=subject)
        return run

    def record(
        self,
        run: RunDir,
        experiment: str,
        status: str,
        quick: bool | None = None,
        passed: int | None = None,
        total: int | None = None,
        seconds: float | None = None,
        config_hash: str | None = None,
        subject: str | None = None,
        note: str | None = None,
    ) -> None:
        """Write a run's state into its ``status.json``, then its index row (fields given as None are kept).

        Args:
            run: the run.
            experiment: its experiment's name.
            status: ``running``, ``done``, ``failed`` or ``interrupted``.
            quick: whether it uses the quick settings.
            passed: the number of claims that passed.
            total: the number of claims checked.
            seconds: its wall time, over every attempt.
            config_hash: :func:`config_hash` of its settings.
            subject: what it measures (an audit's model and data).
            note: why it stopped (``disk full``, ``broken pipe`` ...); an empty string clears it.
        """
        run.write_status(
            experiment=experiment,
            status=status,
            quick=quick,
            passed=passed,
            total=total,
            seconds=seconds,
            config_hash=config_hash,
            subject=subject,
            note=note,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        self._index_write(run, experiment, status, quick, passed, total, seconds, config_hash, subject)

    def _index_write(
        self,
        run: RunDir,
        experiment: str,
        status: str,
        quick: bool | None = None,
        passed: int | None = None,
        total: int | None = None,
        seconds: float | None = None,
        config_hash: str | None = None,
        subject: str | None = None,
    ) -> None:
        if not self._index_ok:
            return
        row = {
            "id": run.id,
            "experiment": experiment,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "status": status,
            "path": run.path.name,
            "passed": passed,
            "total": total,
            "seconds": seconds,
            "quick": None if quick is None else int(quick),
            "config_hash": config_hash,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "subject": subject,
        }
        keep = ("created", "passed", "total", "seconds", "quick", "config_hash", "subject")
        try:
            self._index.upsert(row, keep=keep)
        except SymgenError as e:  # the directory holds the truth: the run goes on, the index is rebuilt later
            self._index_ok = False
            warn(f"{e} The run goes on; its directory holds its state.")

    def discard(self, run: RunDir) -> None:
        """Remove a run that holds nothing (it failed before its first result) from disk and index.

        Args:
            run: the run to remove.
        """
        if self._index_ok:
            self._index.delete(run.id)
        shutil.rmtree(run.path, ignore_errors=True)
        if run.lock is not None:
            run.lock.release()

    # -- reading -------------------------------------------------------------------------------------

    def _run_dirs(self) -> list[Path]:
        try:
            entries = list(self.root.iterdir())
        except OSError as e:
            raise SymgenError(f"cannot read the run store {self.root}: {e.strerror}.") from None
        return [
            d
            for d in entries
            if not d.name.startswith(".")
            and d.is_dir()
            and (RUN_NAME.match(d.name) or (d / "config.yaml").exists() or (d / "status.json").exists())
        ]

    def _rows_from_dirs(self, index_rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [self._dir_row(RunDir(d), index_rows.get(RunDir(d).id)) for d in self._run_dirs()]
        rows.sort(key=lambda r: r["_sort"])
        return [{k: r.get(k) for k in (*COLUMNS, "note")} for r in rows]

    def _dir_row(self, run: RunDir, irow: dict[str, Any] | None) -> dict[str, Any]:
        """A run's row read off its directory (the index row fills what the directory lacks)."""
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row["note"] = None
        if irow:
            row.update({k: v for k, v in irow.items() if k != "_order"})
        st = run.status()
        if st:
            row.update({k: st[k] for k in (*COLUMNS, "note") if k in st and k not in ("id", "path", "pid", "host")})
            if not irow:
                row["pid"], row["host"] = st.get("pid"), st.get("host")
            if isinstance(row["quick"], bool):
                row["quick"] = int(row["quick"])
        row["id"], row["path"] = run.id, str(run.path)
        created, ts = run.created_from_name()
        row["experiment"] = row["experiment"] or run.experiment_from_name()
        row["created"] = row["created"] or created
        if (st or {}).get("created_ts") is not None:
            ts = float(st["created_ts"])  # type: ignore[index]
        row["_sort"] = (ts, irow["_order"] if irow else 1 << 62, run.path.name)
        if not (run.path / "config.yaml").exists():
            row["status"], row["note"] = "incomplete", "no config.yaml: cut off while it was created"
            return row
        if row["config_hash"] is None or row["quick"] is None:
            try:
                meta = run.read_config()
                row["config_hash"] = row["config_hash"] or hash_settings(meta.get("config") or {})
                row["quick"] = int(bool(meta.get("quick"))) if row["quick"] is None else row["quick"]
            except SymgenError:
                pass
        recorded = row["status"] if st or irow else None
        if recorded is None:  # neither status.json nor an index row: read the state off the files
            recorded = "done" if (run.path / "claims.json").exists() else "interrupted"
        if recorded == "done":
            damage = run.damage()
            if damage is not None:
                recorded, row["note"] = "incomplete", damage
            elif row["total"] is None:
                try:
                    claims = run.read_json("claims.json")
                    row["passed"], row["total"] = sum(bool(c.get("passed")) for c in claims), len(claims)
                except (SymgenError, AttributeError, TypeError):
                    pass
        elif recorded == "running":
            held = lock_held(run.path)
            if held is None:  # no lock file: the process recorded in the index (or status.json), if alive
                pid, host = row.get("pid"), row.get("host")
                held = bool(pid) and (host != socket.gethostname() or alive(int(pid or 0)))
            if not held:
                recorded = "interrupted"
                row["note"] = row["note"] or "its process is gone"
        row["status"] = recorded
        return row

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every run, oldest first, in its true state; ``path`` resolved against the store root.

        Directories the index does not know are listed (and added to it); index rows whose directory
        is gone are listed as ``missing``.

        Args:
            experiment: only the runs of this experiment (None: all).

        Returns:
            One dict per run: its index columns and ``note`` (why it stopped, or what is damaged).
        """
        index_rows = {r["id"]: r for r in self._index.rows()} if self._index_ok else {}
        rows = [self._dir_row(RunDir(d), index_rows.get(RunDir(d).id)) for d in self._run_dirs()]
        found = {r["id"] for r in rows}
        unknown = [r for r in rows if r["id"] not in index_rows]
        if unknown and self._index_ok and self.writable():
            for r in unknown:  # a run whose registration was cut off: the index learns of it
                try:
                    self._index.upsert({k: r[k] for k in COLUMNS})
                except SymgenError:
                    break
        for rid, irow in index_rows.items():
            if rid not in found:
                row = {**irow, "status": "missing", "note": "its directory is gone"}
                row["path"] = str(self.root / Path(irow["path"] or rid).name)
                row["_sort"] = (RunDir(Path(row["path"])).created_from_name()[1], irow["_order"], row["path"])
                row.pop("_order", None)
                rows.append(row)
        if experiment:
            rows = [r for r in rows if r["experiment"] == experiment]
        rows.sort(key=lambda r: r["_sort"])
        for r in rows:
            r.pop("_sort")
        return rows

    def get(self, ref: str) -> RunDir:
        """A run by id, id prefix, directory name or path.

        Args:
            ref: the reference the user typed.

        Returns:
            The one run it names (none or several: a :class:`SymgenError`).
        """
        p = Path(ref)
        if p.is_dir() and (p / "config.yaml").exists():
            return RunDir(p)
        rows = [r for r in self.list() if r["id"].startswith(ref) or Path(r["path"]).name == ref]
        if len(rows) == 1:
            return RunDir(Path(rows[0]["path"]))
        if not rows:
            raise SymgenError(f"no run '{ref}' in {self.root}; `symgen runs ls --out {self.root}` lists them.")
        raise SymgenError(f"run reference '{ref}' is ambiguous ({len(rows)} runs); give more of the id.")

    def row(self, run: RunDir) -> dict[str, Any]:
        """A run's row in its true state (``?`` for the fields of a run the store does not hold).

        Args:
            run: the run.

        Returns:
            Its columns.
        """
        rows = [r for r in self.list() if r["id"] == run.id]
        return rows[0] if rows else {"id": run.id, "experiment": "?", "status": "?", "path": str(run.path)}

    def readable(self, run: RunDir) -> dict[str, Any]:
        """A run's row, or a :class:`SymgenError` when its directory is gone.

        Args:
            run: the run.

        Returns:
            Its row.
        """
        row = self.row(run)
        if row["status"] == "missing" or not run.path.is_dir():
            raise SymgenError(
                f"run {run.id}'s directory {run.path} is gone (deleted?); "
                f"`symgen runs repair --out {self.root}` drops it from the index."
            )
        return row

    def resumable(self, experiment: str, config: ExperimentConfig | None = None) -> RunDir | None:
        """The latest interrupted run of ``experiment`` (with the same config, when given); never a failed,
        finished or running one.

        Args:
            experiment: the experiment's name.
            config: only runs with these settings (None: any).

        Returns:
            The run, or None when there is none.
        """
        want = None if config is None else config_hash(config)
        rows = [
            r
            for r in self.list(experiment)
            if r["status"] == "interrupted" and (want is None or r.get("config_hash") == want)
        ]
        return RunDir(Path(rows[-1]["path"])) if rows else None

    def repair(self) -> dict[str, Any]:
        """Rebuild the index from the run directories (the directories are the truth).

        A damaged index is set aside (``index.sqlite.corrupt-<time>``); rows of deleted directories are
        dropped; directories left half-created by a killed process are removed.

        Returns:
            What was done: ``runs`` (per state), ``dropped`` (ids), ``set_aside``, ``damage``, ``removed``.
        """
        if not self.writable():
            raise SymgenError(f"the run store {self.root} is read-only; `runs repair` must rewrite its index.")
        with self._index.opening():
            damage = self._index.health()
            old: dict[str, dict[str, Any]] = {}
            if damage is None and self.index.exists():
                old = {r["id"]: r for r in self._index.rows()}
            aside = self._index.set_aside("corrupt") if damage is not None else None
            removed = []
            for d in self.root.glob(f"{_CREATING}*"):
                if d.is_dir() and not lock_held(d):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
            rows = self._rows_from_dirs(old)
            self._index.replace_with(rows)
        self._index_ok = True
        states: dict[str, int] = {}
        for r in rows:
            states[r["status"]] = states.get(r["status"], 0) + 1
        found = {r["id"] for r in rows}
        return {
            "index": str(self.index),
            "damage": damage,
            "set_aside": None if aside is None else str(aside),
            "runs": states,
            "dropped": sorted(rid for rid in old if rid not in found),
            "removed": removed,
        }


def hash_settings(settings: dict[str, Any]) -> str:
    """The identity of a run's settings for ``--resume`` (the device is not part of it).

    Args:
        settings: the config's fields (``config.model_dump()``, or ``config.yaml``'s ``config``).

    Returns:
        16 hex digits of their SHA-256.
    """
    data = {k: v for k, v in jsonable(settings).items() if k != "device"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config: ExperimentConfig) -> str:
    """The identity of a config for ``--resume`` (the device is not part of it).

    Args:
        config: the settings.

    Returns:
        16 hex digits of their SHA-256.
    """
    return hash_settings(config.model_dump())


def share_mode(root: Path) -> None:
    """Give every file of a run directory the mode a new file gets here (umask), not the 0600 of temp files.

    Args:
        root: the run directory.
    """
    mode = file_mode()
    for f in Path(root).rglob("*"):
        if f.is_file() and f.name != "lock":
            f.chmod(mode)
