"""The run store: run directories written atomically and their SQLite index.

``runs/<time>-<experiment>-<id>/`` holds ``config.yaml``, ``metrics.jsonl``, ``result.json``,
``claims.json``, ``figures/*.png``, ``report.html`` and ``trials/`` (one JSON per finished trial:
the checkpoints that ``--resume`` restarts from). ``runs/index.sqlite`` lists every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import yaml

from symgen.errors import SymgenError
from symgen.experiments.base import ExperimentConfig, jsonable
from symgen.io import atomic_write

__all__ = ["RunDir", "RunStore", "config_hash", "share_mode"]


class RunDir:
    """One run's directory.

    Args:
        path: the directory ``<time>-<experiment>-<id>`` under the store's root.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        """The run's id: the last part of its directory name."""
        return self.path.name.rsplit("-", 1)[-1]

    @property
    def figures_dir(self) -> Path:
        """The run's ``figures/`` directory (created when missing)."""
        d = self.path / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as JSON into the run directory, atomically.

        Args:
            name: the file name, e.g. ``result.json``.
            obj: anything :func:`symgen.experiments.base.jsonable` turns into JSON types.

        Returns:
            The file's path.
        """
        target = self.path / name
        atomic_write(target, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")
        return target

    def read_json(self, name: str) -> Any:
        """Read a JSON file of the run; a missing one is a :class:`SymgenError`.

        Args:
            name: the file name, e.g. ``claims.json``.

        Returns:
            The decoded JSON value.
        """
        target = self.path / name
        if not target.exists():
            raise SymgenError(f"{target} does not exist; the run has not written it (did it finish?).")
        return json.loads(target.read_text())

    def write_yaml(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as YAML into the run directory, atomically.

        Args:
            name: the file name, e.g. ``config.yaml``.
            obj: anything :func:`symgen.experiments.base.jsonable` turns into JSON types.

        Returns:
            The file's path.
        """
        target = self.path / name
        atomic_write(target, yaml.safe_dump(jsonable(obj), sort_keys=False))
        return target

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one record as a line of ``metrics.jsonl``.

        Args:
            record: the metrics of one step (JSON-able values).
        """
        line = json.dumps(jsonable(record)) + "\n"
        with open(self.path / "metrics.jsonl", "a") as f:  # one short line per write: append is atomic enough
            f.write(line)

    def trial_path(self, key: str) -> Path:
        """The checkpoint file of one finished trial.

        Args:
            key: the trial's key (:func:`symgen.experiments.base.trial_key`).

        Returns:
            ``trials/<key>.json`` in the run directory.
        """
        return self.path / "trials" / f"{key}.json"


class RunStore:
    """Run directories under ``root`` and their SQLite index.

    The index holds each run's directory name, resolved against ``root`` when read: a store can be
    moved or copied and read from any working directory. Status: ``running``, ``done``, ``failed``
    (an error), ``interrupted`` (Ctrl-C, SIGTERM, or a ``running`` run whose process is gone).

    Args:
        root: the store's directory (created when missing).
    """

    _COLUMNS = {
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

    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self.root / "index.sqlite"
        with self._db() as db:
            cols = ", ".join(f"{k} {v}" for k, v in self._COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            for k, v in self._COLUMNS.items():  # stores made by older versions gain the new columns
                if k not in have:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {k} {v}")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.index, timeout=30)

    def create(self, experiment: str, config: ExperimentConfig, quick: bool, subject: str = "") -> RunDir:
        """A new run directory holding ``config.yaml``, indexed as ``running``.

        Args:
            experiment: the experiment's name (``audit`` for an audit).
            config: the run's settings.
            quick: whether the run uses the quick settings.
            subject: what the run measures (an audit's model and data), shown by ``runs ls``.

        Returns:
            The new run.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = RunDir(self.root / f"{stamp}-{experiment}-{secrets.token_hex(3)}")
        run.path.mkdir(parents=True)
        run.write_yaml("config.yaml", {"experiment": experiment, "quick": quick, "config": config.model_dump()})
        self.record(run, experiment, status="running", quick=quick, config_hash=config_hash(config), subject=subject)
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
    ) -> None:
        """Insert or update a run's index row; the fields given as None keep their stored values.

        Args:
            run: the run.
            experiment: its experiment's name.
            status: ``running``, ``done``, ``failed`` or ``interrupted``.
            quick: whether it uses the quick settings.
            passed: the number of claims that passed.
            total: the number of claims checked.
            seconds: its wall time.
            config_hash: :func:`config_hash` of its settings.
            subject: what it measures (an audit's model and data).
        """
        with self._db() as db:
            db.execute(
                """INSERT INTO runs (id, experiment, created, status, path, passed, total, seconds, quick,
                                            config_hash, pid, host, subject)
                          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                          ON CONFLICT(id) DO UPDATE SET status=excluded.status, pid=excluded.pid,
                            host=excluded.host,
                            passed=COALESCE(excluded.passed, passed), total=COALESCE(excluded.total, total),
                            seconds=COALESCE(excluded.seconds, seconds), quick=COALESCE(excluded.quick, quick),
                            config_hash=COALESCE(excluded.config_hash, config_hash),
                            subject=COALESCE(excluded.subject, subject)""",
                (
                    run.id,
                    experiment,
                    time.strftime("%Y-%m-%d %H:%M:%S"),
                    status,
                    run.path.name,
                    passed,
                    total,
                    seconds,
                    None if quick is None else int(quick),
                    config_hash,
                    os.getpid(),
                    socket.gethostname(),
                    subject,
                ),
            )

    def discard(self, run: RunDir) -> None:
        """Remove a run that holds nothing (it failed before its first result) from disk and index.

        Args:
            run: the run to remove.
        """
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run.id,))
        shutil.rmtree(run.path, ignore_errors=True)

    def list(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Index rows, oldest first, ``path`` resolved against the store root.

        Args:
            experiment: only the runs of this experiment (None: all).

        Returns:
            One dict per run: its index columns.
        """
        with self._db() as db:
            db.row_factory = sqlite3.Row
            q = "SELECT rowid AS _order, * FROM runs"
            args: tuple[str, ...] = ()
            if experiment:
                q, args = q + " WHERE experiment = ?", (experiment,)
            rows = [dict(r) for r in db.execute(q, args)]
        host = socket.gethostname()
        for r in rows:
            r["path"] = str(self.root / Path(r["path"]).name)
            if r["status"] == "running" and r.get("host") == host and r.get("pid") and not _alive(r["pid"]):
                r["status"] = "interrupted"  # its process is gone (killed): resumable like a Ctrl-C
        return sorted(rows, key=lambda r: r.pop("_order"))  # creation order

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
        """A run's index row (``?`` for the fields of a run the index does not hold).

        Args:
            run: the run.

        Returns:
            Its index columns.
        """
        rows = [r for r in self.list() if r["id"] == run.id]
        return rows[0] if rows else {"id": run.id, "experiment": "?", "status": "?", "path": str(run.path)}

    def resumable(self, experiment: str, config: ExperimentConfig | None = None) -> RunDir | None:
        """The latest interrupted run of ``experiment`` (with the same config, when given); never a failed
        or finished one.

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


def config_hash(config: ExperimentConfig) -> str:
    """The identity of a config for ``--resume`` (the device is not part of it).

    Args:
        config: the settings.

    Returns:
        16 hex digits of their SHA-256.
    """
    data = {k: v for k, v in jsonable(config.model_dump()).items() if k != "device"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def share_mode(root: Path) -> None:
    """Give every file of a run directory the mode a new file gets here (umask), not the 0600 of temp files.

    Args:
        root: the run directory.
    """
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(root).rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)
