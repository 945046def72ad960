"""The run store under faults: damaged index and JSON files, deleted directories, SIGKILL at chosen points,
concurrent resume, lost pool workers, broken pipes, a full disk, read-only stores and unsafe YAML.

Every check reads independent facts: the files on disk, the index through sqlite3, the process table."""

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from symgen.cli import main
from symgen.experiments import REGISTRY

HERE = Path(__file__).parent
CLI = str(HERE / "run_store_cli.py")


@pytest.fixture(autouse=True)
def storetoy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "storetoy", "run_store_toy")
    for k in list(os.environ):
        if k.startswith("SYMGEN_STORE_"):
            monkeypatch.delenv(k)


def _dirs(root):
    return sorted(d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))


def _ids(root):
    return [d.name.rsplit("-", 1)[-1] for d in _dirs(root)]


def _ls(root, capsys):
    capsys.readouterr()
    assert main(["runs", "ls", "--json", "--out", str(root)]) == 0
    return {r["id"]: r for r in json.loads(capsys.readouterr().out)}


def _cli(args, env=None, **kw):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, env=full, timeout=120, **kw)


def _one_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _wait_for(cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _two_done_runs(root):
    for n in (2, 4):
        assert main(["run", "storetoy", "--set", f"n={n}", "--out", str(root)]) == 0
    return _ids(root)


# -- 1. the index ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "garbage", "half", "missing"])
def test_damaged_index_is_set_aside_and_rebuilt_from_directories(tmp_path, capsys, damage):
    ids = _two_done_runs(tmp_path)
    index = tmp_path / "index.sqlite"
    data = index.read_bytes()
    if damage == "empty":
        index.write_bytes(b"")
    elif damage == "garbage":
        index.write_bytes(b"this is not a database" * 200)
    elif damage == "half":
        index.write_bytes(data[: len(data) // 2])
    else:
        index.unlink()
    capsys.readouterr()
    rows = _ls(tmp_path, capsys)
    assert sorted(rows) == sorted(ids) and {r["status"] for r in rows.values()} == {"done"}
    on_disk = sqlite3.connect(index).execute("SELECT id, status FROM runs").fetchall()
    assert sorted(on_disk) == sorted((i, "done") for i in ids)
    aside = list(tmp_path.glob("index.sqlite.corrupt-*"))
    assert len(aside) == (0 if damage == "missing" else 1)
    if aside and damage != "missing":
        assert aside[0].read_bytes() == index.read_bytes() or aside[0].stat().st_size != index.stat().st_size
    for cmd in (["runs", "show", ids[0]], ["report", ids[1]]):
        assert main([*cmd, "--out", str(tmp_path)]) == 0
        assert "Traceback" not in capsys.readouterr().err


def test_deleted_run_is_missing_and_repair_drops_it(tmp_path, capsys):
    import shutil

    ids = _two_done_runs(tmp_path)
    gone = _dirs(tmp_path)[0]
    shutil.rmtree(gone)
    rows = _ls(tmp_path, capsys)
    assert rows[ids[0]]["status"] == "missing" and rows[ids[1]]["status"] == "done"
    for cmd in (["runs", "show", ids[0]], ["report", ids[0]]):
        assert main([*cmd, "--out", str(tmp_path)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(gone) in line and "repair" in line
    assert main(["runs", "repair", "--out", str(tmp_path)]) == 0
    assert ids[0] in capsys.readouterr().out
    in_index = [r[0] for r in sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT id FROM runs")]
    assert in_index == _ids(tmp_path) == [ids[1]]


def test_repair_sets_a_corrupt_index_aside(tmp_path, capsys):
    ids = _two_done_runs(tmp_path)
    (tmp_path / "index.sqlite").write_bytes(b"\0garbage" * 100)
    assert main(["runs", "repair", "--json", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    done = json.loads(out[out.index("{") :])
    assert done["runs"] == {"done": 2}
    assert len(list(tmp_path.glob("index.sqlite.corrupt-*"))) == 1
    assert sorted(r[0] for r in sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT id FROM runs")) == sorted(
        ids
    )


@pytest.mark.parametrize("name", ["claims.json", "result.json"])
def test_truncated_json_is_incomplete_and_named(tmp_path, capsys, name):
    (run_id,) = [_two_done_runs(tmp_path)[0]]
    target = _dirs(tmp_path)[0] / name
    target.write_bytes(target.read_bytes()[:7])
    rows = _ls(tmp_path, capsys)
    assert rows[run_id]["status"] == "incomplete" and name in rows[run_id]["note"]
    assert main(["report", run_id, "--out", str(tmp_path)]) == 2
    assert name in _one_line(capsys.readouterr().err)
    if name == "claims.json":
        assert main(["runs", "compare", run_id, "--out", str(tmp_path)]) == 2
        assert str(target) in _one_line(capsys.readouterr().err)


def test_kill_while_registering_leaves_a_listed_resumable_run(tmp_path, capsys):
    proc = _cli(["run", "storetoy", "--out", str(tmp_path)], env={"SYMGEN_STORE_FAULT": "register"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run,) = _dirs(tmp_path)
    assert (run / "config.yaml").exists()
    in_index = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT id FROM runs").fetchall()
    assert in_index == []  # killed before the index learnt of it
    rows = _ls(tmp_path, capsys)
    rid = run.name.rsplit("-", 1)[-1]
    assert rows[rid]["status"] == "interrupted"
    assert main(["run", "storetoy", "--resume-from", rid, "--out", str(tmp_path)]) == 0
    assert (run / "report.html").exists() and json.loads((run / "claims.json").read_text())[0]["passed"]


def test_kill_between_claims_and_report(tmp_path, capsys):
    proc = _cli(["run", "storetoy", "--out", str(tmp_path)], env={"SYMGEN_STORE_FAULT": "before-report"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run,) = _dirs(tmp_path)
    rid = run.name.rsplit("-", 1)[-1]
    assert (run / "claims.json").exists() and not (run / "report.html").exists()
    assert _ls(tmp_path, capsys)[rid]["status"] == "interrupted"
    assert main(["runs", "show", rid, "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "report.html" not in shown and "interrupted" in shown and "n: 6" in shown
    assert main(["report", rid, "--out", str(tmp_path)]) == 2
    assert "interrupted" in _one_line(capsys.readouterr().err)
    assert not (run / "report.html").exists()
    assert main(["run", "storetoy", "--resume-from", rid, "--out", str(tmp_path)]) == 0
    assert (run / "report.html").exists() and _ls(tmp_path, capsys)[rid]["status"] == "done"


def test_resume_logs_each_record_once_and_sums_the_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMGEN_STORE_SLEEP", "*:0.3")
    monkeypatch.setenv("SYMGEN_STORE_STOP_AT", "4")
    t0 = time.time()
    assert main(["run", "storetoy", "--out", str(tmp_path)]) == 130
    (run,) = _dirs(tmp_path)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # the first phase
    monkeypatch.delenv("SYMGEN_STORE_STOP_AT")
    assert main(["run", "storetoy", "--resume", "--out", str(tmp_path)]) == 0
    wall = time.time() - t0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["i"] for r in records) == list(range(6))
    seconds = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT seconds FROM runs").fetchone()[0]
    assert 6 * 0.3 <= seconds <= wall  # both attempts' trials slept: 4 before, 2 after the resume


# -- 2. resume ------------------------------------------------------------------------------------------


def test_damaged_checkpoint_is_set_aside_and_recomputed(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "calls.txt"
    monkeypatch.setenv("SYMGEN_STORE_MARKER", str(marker))
    monkeypatch.setenv("SYMGEN_STORE_STOP_AT", "4")
    store = tmp_path / "runs"
    assert main(["run", "storetoy", "--out", str(store)]) == 130
    (run,) = _dirs(store)
    checkpoints = sorted((run / "trials").glob("*.json"))
    assert len(checkpoints) == 4
    bad = next(c for c in checkpoints if json.loads(c.read_text())["item"]["i"] == 2)
    bad.write_text(bad.read_text()[:10])
    monkeypatch.delenv("SYMGEN_STORE_STOP_AT")
    marker.write_text("")
    capsys.readouterr()
    assert main(["run", "storetoy", "--resume", "--out", str(store)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str(bad) in err
    assert sorted(int(line.split()[0]) for line in marker.read_text().splitlines()) == [2, 4, 5]
    assert list((run / "trials").glob(f"{bad.name}.corrupt-*"))
    assert json.loads(bad.read_text())["result"]["i"] == 2


def _start_sleeping(store, marker, n=6, sleep_at="2:120", extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYMGEN_STORE_MARKER": str(marker), "SYMGEN_STORE_SLEEP": sleep_at}
    proc = subprocess.Popen(
        [sys.executable, CLI, "run", "storetoy", "--set", f"n={n}", *extra, "--out", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def test_live_run_cannot_be_resumed_and_its_stale_lock_is_taken_over(tmp_path, capsys):
    store, marker = tmp_path / "runs", tmp_path / "calls.txt"
    proc = _start_sleeping(store, marker)
    try:
        assert _wait_for(lambda: marker.exists() and "2" in marker.read_text().split()[::2])
        (run,) = _dirs(store)
        rid = run.name.rsplit("-", 1)[-1]
        assert json.loads((run / "lock").read_text())["pid"] == proc.pid
        assert _ls(store, capsys)[rid]["status"] == "running"
        assert main(["run", "storetoy", "--resume-from", rid, "--out", str(store)]) == 2
        assert f"pid {proc.pid}" in _one_line(capsys.readouterr().err)
    finally:
        proc.kill()
        proc.wait()
    assert _ls(store, capsys)[rid]["status"] == "interrupted"
    assert main(["run", "storetoy", "--resume-from", rid, "--out", str(store)]) == 0
    assert _ls(store, capsys)[rid]["status"] == "done" and not (run / "lock").exists()


def test_interrupt_hint_names_its_own_run(tmp_path, monkeypatch, capsys):
    store, marker = tmp_path / "runs", tmp_path / "calls.txt"
    other = _start_sleeping(store, marker, n=3, sleep_at="1:120")
    try:
        assert _wait_for(lambda: marker.exists() and "1" in marker.read_text().split()[::2])
        monkeypatch.setenv("SYMGEN_STORE_STOP_AT", "1")
        capsys.readouterr()
        assert main(["run", "storetoy", "--set", "n=4", "--out", str(store)]) == 130
        err = capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    mine = next(d for d in _dirs(store) if "n: 4" in (d / "config.yaml").read_text())
    theirs = next(d for d in _dirs(store) if d != mine)
    assert f"--resume-from {mine.name.rsplit('-', 1)[-1]}" in err
    assert theirs.name.rsplit("-", 1)[-1] not in err


def test_killed_pool_worker_leaves_a_resumable_run(tmp_path, capsys):
    store = tmp_path / "runs"
    args = ["run", "storetoy", "--set", "n=4", "--executor", "pool", "--workers", "2", "--out", str(store)]
    proc = _cli(args, env={"SYMGEN_STORE_KILL_AT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "worker" in _one_line(proc.stderr)
    (run,) = _dirs(store)
    rid = run.name.rsplit("-", 1)[-1]
    assert _ls(store, capsys)[rid]["status"] == "interrupted"
    proc = _cli(
        ["run", "storetoy", "--set", "n=4", "--resume", "--executor", "pool", "--workers", "2", "--out", str(store)]
    )
    assert proc.returncode == 0, proc.stderr
    assert _dirs(store) == [run] and json.loads((run / "claims.json").read_text())[0]["passed"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
def test_killing_the_main_process_takes_the_pool_workers_with_it(tmp_path):
    store, marker = tmp_path / "runs", tmp_path / "calls.txt"
    proc = _start_sleeping(store, marker, n=4, sleep_at="*:120", extra=("--executor", "pool", "--workers", "2"))
    try:
        assert _wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) >= 2)
        workers = {int(line.split()[1]) for line in marker.read_text().splitlines()}
        assert proc.pid not in workers and all(_alive(p) for p in workers)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_for(lambda: not any(_alive(p) for p in workers), timeout=15), workers


def test_sigterm_stops_pool_workers_at_once(tmp_path):
    store, marker = tmp_path / "runs", tmp_path / "calls.txt"
    proc = _start_sleeping(store, marker, n=4, sleep_at="*:120", extra=("--executor", "pool", "--workers", "2"))
    try:
        assert _wait_for(lambda: marker.exists() and len(marker.read_text().splitlines()) >= 2)
        workers = {int(line.split()[1]) for line in marker.read_text().splitlines()}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()
    assert _wait_for(lambda: not any(_alive(p) for p in workers), timeout=10), workers


def test_broken_pipe_is_an_interruption(tmp_path, capsys):
    store = tmp_path / "runs"
    env = {**os.environ, "SYMGEN_STORE_PRINT": "1", "SYMGEN_STORE_SLEEP": "*:0.2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, CLI, "run", "storetoy", "--out", str(store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    (run,) = _dirs(store)
    rid = run.name.rsplit("-", 1)[-1]
    row = _ls(store, capsys)[rid]
    assert row["status"] == "interrupted" and row["note"] == "broken pipe"
    assert main(["run", "storetoy", "--resume-from", rid, "--out", str(store)]) == 0
    assert (run / "report.html").exists()


def test_full_disk_keeps_the_run_resumable(tmp_path, monkeypatch, capsys):
    import symgen.runs.rundir as rundir

    marker = tmp_path / "calls.txt"
    monkeypatch.setenv("SYMGEN_STORE_MARKER", str(marker))
    real = rundir.atomic_write

    def full(path, data):
        if Path(path).name == "claims.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(rundir, "atomic_write", full)
    store = tmp_path / "runs"
    assert main(["run", "storetoy", "--out", str(store)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "disk full" in line and "claims.json" in line
    (run,) = _dirs(store)
    assert len(list((run / "trials").glob("*.json"))) == 6 and (run / "result.json").exists()
    rid = run.name.rsplit("-", 1)[-1]
    row = _ls(store, capsys)[rid]
    assert row["status"] == "interrupted" and row["note"] == "disk full"
    monkeypatch.setattr(rundir, "atomic_write", real)
    marker.write_text("")
    assert main(["run", "storetoy", "--resume-from", rid, "--out", str(store)]) == 0
    assert marker.read_text() == ""  # every trial read back
    assert (run / "claims.json").exists() and _ls(store, capsys)[rid]["status"] == "done"


def test_read_only_store_and_out_file_are_one_line(tmp_path, capsys):
    store = tmp_path / "runs"
    ids = _two_done_runs(store)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", "storetoy", "--out", str(afile)]) == 2
    assert "is a file" in _one_line(capsys.readouterr().err)
    store.chmod(0o555)
    try:
        if os.access(store, os.W_OK):
            pytest.skip("running as root: chmod does not make the store read-only")
        assert main(["run", "storetoy", "--out", str(store)]) == 2
        assert str(store) in _one_line(capsys.readouterr().err)
        assert sorted(_ls(store, capsys)) == sorted(ids)  # reading a read-only store still works
        assert _ids(store) == ids
    finally:
        store.chmod(0o755)


def test_config_with_python_tag_is_a_one_line_error(tmp_path, capsys):
    evil = tmp_path / "evil.yaml"
    witness = tmp_path / "witness"
    evil.write_text(f'n: !!python/object/apply:os.system ["touch {witness}"]\n')
    assert main(["run", "storetoy", "--config", str(evil), "--out", str(tmp_path / "runs")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(evil) in line and "python/object/apply" in line
    assert not witness.exists() and not (tmp_path / "runs").exists() or not _dirs(tmp_path / "runs")
