"""One run's directory: its files, written atomically, and ``status.json``, the run's own record of its state.

``<time>-<experiment>-<id>/`` holds ``config.yaml``, ``status.json``, ``metrics.jsonl``, ``result.json``,
``claims.json``, ``figures/*.png``, ``report.html``, ``trials/`` (one JSON per finished trial: the
checkpoints that ``--resume`` restarts from) and, while a process runs it, ``lock``. Every file that
cannot be read is a :class:`SymgenError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from symgen.errors import SymgenError
from symgen.experiments.base import jsonable
from symgen.io import atomic_write
from symgen.runs.locks import RunLock

__all__ = ["RunDir", "RUN_NAME", "warn", "file_mode"]

RUN_NAME = re.compile(r"^(\d{8}-\d{6})-(.+)-([0-9a-f]{6})$")
STATUS = "status.json"


def warn(text: str) -> None:
    """Print one warning line on stderr (``warning: ...``).

    Args:
        text: the warning.
    """
    sys.stderr.write(f"warning: {' '.join(text.split())}\n")
    sys.stderr.flush()


def file_mode() -> int:
    """The mode a new file gets here (``0o666`` less the umask).

    Returns:
        The mode bits.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class RunDir:
    """One run's directory.

    Args:
        path: the directory ``<time>-<experiment>-<id>`` under the store's root.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock: RunLock | None = None  # the lock of the process that created it locked (RunStore.create)

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
        """Read a JSON file of the run; a missing or damaged one is a :class:`SymgenError` naming it.

        Args:
            name: the file name, e.g. ``claims.json``.

        Returns:
            The decoded JSON value.
        """
        target = self.path / name
        if not target.exists():
            raise SymgenError(f"{target} does not exist; the run has not written it (did it finish?).")
        try:
            return json.loads(target.read_text())
        except (ValueError, OSError) as e:
            raise SymgenError(
                f"{target} is damaged ({' '.join(str(e).split())}); resume the run to rewrite it: "
                f"`symgen run <experiment> --resume-from {self.id}`."
            ) from None

    def read_config(self) -> dict[str, Any]:
        """The run's ``config.yaml`` (experiment, quick flag, settings).

        Returns:
            Its mapping.
        """
        target = self.path / "config.yaml"
        if not target.exists():
            raise SymgenError(f"{target} does not exist; the run was cut off while it was created.")
        try:
            meta = yaml.safe_load(target.read_text())
        except (yaml.YAMLError, OSError) as e:
            raise SymgenError(f"{target} is damaged ({' '.join(str(e).split())}).") from None
        if not isinstance(meta, dict):
            raise SymgenError(f"{target} is damaged (not a mapping of settings).")
        return meta

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

    def status(self) -> dict[str, Any] | None:
        """The run's ``status.json`` (None: absent or damaged; the store then infers the state from the files).

        Returns:
            Its mapping, or None.
        """
        try:
            data = json.loads((self.path / STATUS).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, **fields: Any) -> None:
        """Update ``status.json`` with ``fields`` (atomically, in the mode of the run's other files).

        Args:
            **fields: the fields to set (None values keep the stored ones).
        """
        data = self.status() or {}
        data.update({k: v for k, v in fields.items() if v is not None})
        target = atomic_write(self.path / STATUS, json.dumps(jsonable(data), indent=2) + "\n")
        target.chmod(file_mode())

    def damage(self) -> str | None:
        """What keeps a finished run from being shown: a missing or damaged result, claims or report.

        Returns:
            The problem (naming the file), or None.
        """
        for name in ("result.json", "claims.json"):
            f = self.path / name
            try:
                text = f.read_bytes()
            except FileNotFoundError:
                return f"{name} is missing"
            except OSError as e:
                return f"{name} cannot be read ({e.strerror})"
            tail = text.rstrip()[-1:]
            if tail not in (b"}", b"]"):
                return f"{name} is damaged (truncated)"
            if name == "claims.json":
                try:
                    json.loads(text)
                except ValueError:
                    return f"{name} is damaged (not JSON)"
        if not (self.path / "report.html").exists():
            return "report.html is missing"
        return None

    def created_from_name(self) -> tuple[str, float]:
        """The creation time the directory's name holds, as text and as seconds since the epoch.

        Returns:
            ``(text, seconds)``; ``("?", 0.0)`` for a name without a time stamp.
        """
        m = RUN_NAME.match(self.path.name)
        if not m:
            return "?", 0.0
        t = time.strptime(m.group(1), "%Y%m%d-%H%M%S")
        return time.strftime("%Y-%m-%d %H:%M:%S", t), time.mktime(t)

    def experiment_from_name(self) -> str:
        """The experiment's name that the directory's name holds (``?`` when it holds none).

        Returns:
            The name.
        """
        m = RUN_NAME.match(self.path.name)
        return m.group(2) if m else "?"
