"""The run store seen from the command line: a store that moves, failed and killed runs, --resume,
file modes, audit runs as first-class runs, --json, and the one page of a whole reproduction."""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from symgen.cli import main
from symgen.experiments import REGISTRY
from symgen.runs import RunStore

USER_MODEL = Path(__file__).parent / "audit_user_model.py"
TINY = dict(
    time_limit=600.0,
    eval_num_data=64,
    invariance_num_data=16,
    symmetry_num_data=8,
    hessian_num_data=16,
    hutchinson_probes=3,
    top_eigenvalues=1,
    eigen_iters=5,
    density_runs=2,
    density_steps=5,
    noise_num_data=16,
    noise_num_samples=2,
    ntk_num_data=8,
    ntk_subsamples=2,
    pgd_num_data=16,
    pgd_steps=2,
)
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", "toy_experiment")
    import toy_experiment

    return toy_experiment


def _dirs(root):
    return sorted(d for d in Path(root).iterdir() if d.is_dir()) if Path(root).exists() else []


def test_store_can_be_moved_copied_and_read_from_anywhere(toy, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["run", "toy", "--out", "runs"]) == 0  # a relative store
    (run_id,) = [r["id"] for r in RunStore(work / "runs").list()]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["runs", "show", run_id, "--out", str(work / "runs")]) == 0
    assert "T1" in capsys.readouterr().out
    shutil.copytree(work / "runs", tmp_path / "copy")
    original = (work / "runs").glob("*/report.html").__next__()
    before = original.stat().st_mtime_ns
    assert main(["report", run_id, "--out", str(tmp_path / "copy")]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed).resolve().is_relative_to((tmp_path / "copy").resolve()), printed
    assert original.stat().st_mtime_ns == before, "the copy's report rewrote the original store's"
    paths = [r["path"] for r in RunStore(tmp_path / "copy").list()]
    assert all(Path(p).parent == tmp_path / "copy" for p in paths)


def test_failed_runs_are_failed_and_never_resumed(toy, tmp_path, capsys, monkeypatch):
    store = tmp_path / "runs"
    # Bad input found at run time (a diverging trial at once): one line, exit 2, no directory left.
    assert main(["run", "toy", "--set", "nan=true", "--out", str(store)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert _dirs(store) == []
    assert RunStore(store).list() == []
    # A config error is found before anything is created.
    assert main(["run", "toy", "--set", "scale=.nan", "--out", str(store)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert _dirs(store) == []
    # An error after the first finished trial: the run is kept, marked failed, and never resumed.
    from symgen.errors import DivergenceError

    orig = toy.trial

    def trial(item):
        if item["i"] == 1:
            raise DivergenceError("loss became NaN in trial 1 (simulated)")
        return orig(item)

    monkeypatch.setattr(toy, "trial", trial)
    assert main(["run", "toy", "--out", str(store)]) == 2
    assert [r["status"] for r in RunStore(store).list()] == ["failed"]
    monkeypatch.setattr(toy, "trial", orig)
    assert main(["run", "toy", "--resume", "--out", str(store)]) == 0
    assert sorted(r["status"] for r in RunStore(store).list()) == ["done", "failed"]


def test_resume_picks_the_same_settings_or_the_named_run(toy, tmp_path, monkeypatch, capsys):
    store = tmp_path / "runs"
    monkeypatch.setenv("SYMGEN_TOY_FAIL_AT", "1")
    assert main(["run", "toy", "--set", "n=3", "--out", str(store)]) == 130
    assert main(["run", "toy", "--set", "n=4", "--out", str(store)]) == 130
    rows = RunStore(store).list()
    assert [r["status"] for r in rows] == ["interrupted", "interrupted"]
    err = capsys.readouterr().err
    assert f"symgen run toy --resume-from {rows[1]['id']} --out {store}" in err  # the hint is whole
    monkeypatch.delenv("SYMGEN_TOY_FAIL_AT")
    assert main(["run", "toy", "--set", "n=3", "--resume", "--out", str(store)]) == 0
    rows = {r["id"]: r for r in RunStore(store).list()}
    first, second = list(rows)  # creation order: n=3, then n=4
    assert rows[first]["status"] == "done" and rows[second]["status"] == "interrupted"
    assert len(_dirs(store)) == 2
    assert main(["run", "toy", "--resume-from", second, "--out", str(store)]) == 0
    assert RunStore(store).row(RunStore(store).get(second))["status"] == "done"
    assert main(["run", "toy", "--resume-from", second, "--out", str(store)]) == 2  # done: not resumable
    assert "only an interrupted run" in capsys.readouterr().err


def test_a_killed_run_is_interrupted_not_running(toy, tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("toy", toy.Config(), quick=False)
    with sqlite3.connect(store.index) as db:  # as if its process had been killed (SIGKILL)
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 12345, run.id))
    assert store.list()[0]["status"] == "interrupted"
    assert store.resumable("toy", toy.Config()).path == run.path


def test_sigterm_marks_the_run_interrupted(tmp_path):
    here, store = str(Path(__file__).parent), str(tmp_path / "runs")
    code = (
        f"import os, signal, sys; sys.path.insert(0, {here!r})\n"
        "from symgen.experiments import REGISTRY; REGISTRY['toy'] = 'toy_experiment'\n"
        "import toy_experiment\n"
        "orig = toy_experiment.trial\n"
        "def trial(item):\n"
        "    if item['i'] == 1: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return orig(item)\n"
        "toy_experiment.trial = trial\n"
        f"from symgen.cli import main; sys.exit(main(['run', 'toy', '--out', {store!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert [r["status"] for r in RunStore(tmp_path / "runs").list()] == ["interrupted"]


def test_files_of_a_run_share_one_mode(toy, tmp_path):
    assert main(["run", "toy", "--out", str(tmp_path)]) == 0
    (run,) = _dirs(tmp_path)
    modes = {f.relative_to(run).as_posix(): stat.S_IMODE(f.stat().st_mode) for f in run.rglob("*") if f.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_json_outputs_and_lines_never_cut(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "runs"
    assert main(["run", "toy", "--json", "--out", str(deep)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["experiment"] == "toy" and [c["id"] for c in res["claims"]] == ["T1", "T2"]
    assert res["claims"][0]["measured"] == 5.0 and Path(res["report"]).exists()
    assert main(["runs", "ls", "--out", str(deep)]) == 0
    out = capsys.readouterr().out
    assert res["path"] in out and "…" not in out  # the whole path, on one line
    assert main(["runs", "show", res["run"], "--json", "--out", str(deep)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["claims"] == res["claims"] and shown["status"] == "done"
    assert main(["runs", "ls", "--json", "--out", str(deep)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == res["run"]
    assert main(["run", "toy", "--out", str(deep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    t1 = next(line for line in lines if line.startswith("T1"))
    assert "PASS" in t1 and "value=5 vs 5" in t1  # one line per claim: headline against threshold


def test_audit_runs_are_first_class(tmp_path, capsys):
    out = tmp_path / "runs"
    assert (
        main(
            [
                "audit",
                "--model",
                f"{USER_MODEL}:make_digits_mlp",
                "--data",
                "digits",
                "--json",
                "--out",
                str(out),
                *TINY_SETS,
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["sections"]["performance"]["status"] == "ok"
    assert main(["runs", "ls", "--out", str(out)]) == 0
    ls = capsys.readouterr().out
    assert f"{USER_MODEL}:make_digits_mlp on digits" in ls
    assert main(["runs", "show", res["run"], "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    acc = res["sections"]["performance"]["values"]["test_accuracy"]["value"]
    assert "test_accuracy" in shown and f"{acc:.4g}" in shown
    assert main(["runs", "compare", res["run"], res["run"], "--out", str(out)]) == 0
    assert "performance.test_accuracy" in capsys.readouterr().out
    page = Path(res["report"])
    page.write_text("stale")
    assert main(["report", res["run"], "--out", str(out)]) == 0
    html = page.read_text()
    assert "symgen audit" in html and 'id="summary"' in html and "meaning" in html


def test_reproduce_writes_one_page(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("symgen.experiments.REGISTRY", {"toy": "toy_experiment"})
    assert main(["reproduce", "--quick", "--seed", "3", "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 3 and summary["experiments"][0]["name"] == "toy"
    page = (tmp_path / "index.html").read_text()
    run_dir = tmp_path / summary["experiments"][0]["report"]
    assert run_dir.exists() and f'href="{summary["experiments"][0]["report"]}"' in page
    assert "1/2 claims pass" in page and "torch" in page
    assert json.loads((tmp_path / "reproduce.json").read_text())["experiments"] == summary["experiments"]
    cfg = (run_dir.parent / "config.yaml").read_text()
    assert "seed: 3" in cfg


def test_claims_gate(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import claims_gate

    readme = Path(__file__).parents[1] / "README.md"
    verdicts = claims_gate.readme_verdicts(readme.read_text())
    assert len(verdicts) >= 10 and any(verdicts.values())
    summary = {"experiments": []}
    for (exp, cid), passed in verdicts.items():
        entry = next((e for e in summary["experiments"] if e["name"] == exp), None)
        if entry is None:
            entry = {"name": exp, "claims": []}
            summary["experiments"].append(entry)
        entry["claims"].append({"id": cid, "passed": passed})
    f = tmp_path / "reproduce.json"
    f.write_text(json.dumps(summary))
    assert claims_gate.main(["--readme", str(readme), "--summary", str(f)]) == 0
    passing = next(k for k, v in verdicts.items() if v)
    for e in summary["experiments"]:
        for c in e["claims"]:
            if (e["name"], c["id"]) == passing:
                c["passed"] = False
    f.write_text(json.dumps(summary))
    assert claims_gate.main(["--readme", str(readme), "--summary", str(f)]) == 1
    diffs = claims_gate.compare(verdicts, claims_gate.run_verdicts(summary))
    assert diffs[0].startswith("REGRESSION") and passing[1] in diffs[0]
    summary["experiments"][0]["claims"].append({"id": "C9.9", "passed": True})
    assert any("missing from README" in d for d in claims_gate.compare(verdicts, claims_gate.run_verdicts(summary)))


def test_claims_gate_prints_margins_of_flips_and_times(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import claims_gate

    readme = tmp_path / "README.md"
    readme.write_text(
        "<!-- claims:start -->\n| exp (quick) | C1: a | x | y | PASS |\n"
        "| exp (quick) | C2: b | x | y | **FAIL** |\n<!-- claims:end -->\n"
    )
    claims = [
        {"id": "C1", "passed": False, "measured": {"cos": 0.98999}, "threshold": {"cos": 0.99}},
        {"id": "C2", "passed": False, "measured": {"gap": 0.5}, "threshold": {"gap": 0.2}},
    ]
    summary = {"seconds": 12.5, "experiments": [{"name": "exp", "seconds": 12.0, "claims": claims}]}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(summary))
    assert claims_gate.main(["--readme", str(readme), "--summary", str(f)]) == 1  # a regression always fails
    out, err = capsys.readouterr()
    assert "REGRESSION exp: C1" in err and "cos=0.98999 vs 0.99, margin -1e-05 (tiny: may flip across CPUs)" in err
    assert "exp" in out and "12.0" in out and "total 12.5 s" in out
    claims[0]["passed"], claims[1]["passed"] = True, True  # a README FAIL that passes: README is stale
    claims[0]["measured"]["cos"] = 0.995
    f.write_text(json.dumps(summary))
    assert claims_gate.main(["--readme", str(readme), "--summary", str(f)]) == 1
    err = capsys.readouterr().err
    assert "exp: C2: README says FAIL, the run says PASS" in err and "margin +0.3" in err


def test_claims_gate_is_time_bounded(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import claims_gate

    readme = Path(__file__).parents[1] / "README.md"
    assert claims_gate.main(["--readme", str(readme), "--timeout", "0.5"]) == 1
    assert "did not finish within 0.5 s" in capsys.readouterr().err
