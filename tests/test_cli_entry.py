"""The installed `symgen` entry point: usage errors and bad input are one line and exit 2 (no traceback,
no run directory), output through a pipe is never cut at 80 or 200 columns."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USER_MODEL = Path(__file__).parent / "audit_user_model.py"
SYMGEN = shutil.which("symgen", path=str(Path(sys.executable).parent)) or shutil.which("symgen")


def _symgen(args, tmp_path, columns=80):
    if SYMGEN is None:
        pytest.fail("the `symgen` entry point is not installed (pip install -e .)")
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1"}
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([SYMGEN, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _run_dirs(out):
    return [d for d in Path(out).iterdir() if d.is_dir()] if Path(out).exists() else []


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "--data", "digits"], "--model"),  # usage error
        (["audit", "--model", f"{USER_MODEL}:make_raising_model", "--data", "digits"], "CUDA out of memory"),
        (["run", "kip", "--set", "seeds=-3"], "seeds"),
        (["run", "kip", "--set", "seeds=0"], "seeds"),
        (["run", "ntk", "--set", "steps=0"], "steps"),
        (["run", "kip", "--set", "lr=-1"], "lr"),
        (
            ["audit", "--model", f"{USER_MODEL}:make_tiny_mlp", "--data", "digits", "--set", "time_limit=0"],
            "time_limit",
        ),
    ],
)
def test_entry_point_answers_bad_input_in_one_line(tmp_path, args, message):
    rc, out, err = _symgen([*args, "--out", str(tmp_path / "runs")], tmp_path)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "ModuleNotFoundError" not in err, err
    assert message in err, err
    assert "\x1b[" not in err, "ANSI escape codes in the message"
    assert not _run_dirs(tmp_path / "runs"), "bad input left a run directory behind"
    if args[0] != "audit" or "--model" in args:  # typer's usage errors print a usage line first
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("columns", [80, 200])
def test_list_through_a_pipe_is_never_cut(tmp_path, columns):
    from symgen.experiments import REGISTRY

    rc, out, err = _symgen(["list"], tmp_path, columns)
    assert rc == 0, err
    assert "…" not in out and "..." not in out
    words = out.split()
    for name in REGISTRY:
        assert name in words, f"{name} is not printed whole at {columns} columns"
