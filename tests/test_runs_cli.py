"""Run store, executors, resume, reports and the CLI, on a toy experiment."""

import json
import sqlite3

import pytest

from symgen.cli import main
from symgen.errors import ConfigError
from symgen.experiments import REGISTRY, build_config
from symgen.io import atomic_write
from symgen.runs import RunStore


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", "toy_experiment")
    import toy_experiment

    return toy_experiment


def _only_run(root):
    dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


def test_run_writes_run_directory(toy, tmp_path, capsys):
    assert main(["run", "toy", "--set", "n=4", "--set", "scale=2.5", "--out", str(tmp_path)]) == 0
    run = _only_run(tmp_path)
    claims = json.loads((run / "claims.json").read_text())
    assert [c["id"] for c in claims] == ["T1", "T2"]
    assert claims[0]["measured"] == 2.5 * (0 + 1 + 4 + 9) and claims[0]["passed"]
    assert not claims[1]["passed"]
    for name in ("config.yaml", "result.json", "metrics.jsonl", "report.html", "figures/values.png"):
        assert (run / name).exists(), name
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "T1" in html and "FAIL" in html
    assert len(list((run / "trials").glob("*.json"))) == 4
    out = capsys.readouterr().out
    assert "report:" in out and "PASS" in out
    rows = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT status, passed, total FROM runs").fetchall()
    assert rows == [("done", 1, 2)]


def test_quick_and_config_file(toy, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("n: 5\n")
    cfg = build_config(toy.Config, quick=toy.EXPERIMENT.quick, file=cfg_file, sets=["scale=3"])
    assert (cfg.n, cfg.scale) == (5, 3.0)
    assert build_config(toy.Config, quick=toy.EXPERIMENT.quick).n == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope"], "unknown experiment"),
        (["run", "toy", "--set", "bogus=1"], "unknown config key 'bogus'"),
        (["run", "toy", "--set", "n=abc"], "n: Input should be a valid integer"),
        (["run", "toy", "--set", "n"], "key=value"),
        (["run", "toy", "--config", "missing.yaml"], "does not exist"),
        (["run", "toy", "--set", "nan=true"], "NaN"),
        (["run", "toy", "--device", "cuda:7"], "cuda"),
        (["run", "toy", "--executor", "carrier-pigeon"], "unknown executor"),
    ],
)
def test_bad_input_is_one_line_exit_2(toy, tmp_path, capsys, args, message):
    import torch

    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("machine has 8 GPUs")
    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_interrupted_run_resumes_from_trial_checkpoints(toy, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "calls.txt"
    monkeypatch.setenv("SYMGEN_TOY_MARKER", str(marker))
    store = tmp_path / "store"
    monkeypatch.setenv("SYMGEN_TOY_FAIL_AT", "2")
    assert main(["run", "toy", "--set", "n=4", "--out", str(store)]) == 130
    run = _only_run(store)
    assert not (run / "claims.json").exists()
    assert not list(run.rglob("*.tmp"))  # no half-written file
    assert RunStore(store).list()[0]["status"] == "interrupted"
    # Resume with the stored config: trials 0 and 1 are not recomputed.
    monkeypatch.delenv("SYMGEN_TOY_FAIL_AT")
    assert main(["run", "toy", "--set", "n=4", "--resume", "--out", str(store)]) == 0  # same settings
    assert _only_run(store) == run
    assert marker.read_text().split() == ["0", "1", "2", "2", "3"]
    assert json.loads((run / "claims.json").read_text())[0]["passed"]
    assert "2 trials resumed" in capsys.readouterr().out


def test_pool_executor_gives_same_result(toy, tmp_path):
    assert (
        main(["run", "toy", "--set", "n=3", "--executor", "pool", "--workers", "2", "--out", str(tmp_path / "a")]) == 0
    )
    assert main(["run", "toy", "--set", "n=3", "--out", str(tmp_path / "b")]) == 0
    ra = json.loads((_only_run(tmp_path / "a") / "result.json").read_text())
    rb = json.loads((_only_run(tmp_path / "b") / "result.json").read_text())
    assert ra == rb


def test_runs_ls_show_compare_report(toy, tmp_path, capsys):
    for scale in ("1", "2"):
        assert main(["run", "toy", "--set", f"scale={scale}", "--out", str(tmp_path)]) == 0
    ids = [r["id"] for r in RunStore(tmp_path).list()]
    capsys.readouterr()
    assert main(["runs", "ls", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids)
    assert main(["runs", "show", ids[0], "--out", str(tmp_path)]) == 0
    assert "T1" in capsys.readouterr().out
    assert main(["runs", "compare", *ids, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5" in out and "10" in out
    assert main(["report", ids[1], "--out", str(tmp_path)]) == 0
    assert main(["runs", "show", "zzzz", "--out", str(tmp_path)]) == 2


def test_reproduce_runs_all(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("symgen.experiments.REGISTRY", {"toy": "toy_experiment"})
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 0
    assert "1/2 claims pass" in capsys.readouterr().out
    assert main(["reproduce", "--quick", "--full", "--out", str(tmp_path)]) == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write(target, "old")

    class Boom:
        def encode(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        atomic_write(target, Boom())  # type: ignore[arg-type]
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_build_config_rejects_unknown_file_keys(toy, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("nn: 3\n")
    with pytest.raises(ConfigError, match="nn"):
        build_config(toy.Config, file=f)
