"""`symgen audit` under torchrun (2 gloo processes on CPU) against one process, and `--executor ray`
against the in-process executor."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from symgen.cli import main
from symgen.runs import RunStore

MODEL_FILE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)  # float64: the two runs must agree to round-off, not to float32's 1e-7
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 10)).double().eval()
"""
# Odd sizes: the shards differ in length and DistributedSampler would pad them (the audit drops the padding).
TINY = dict(
    time_limit=600.0,
    eval_num_data=101,
    invariance_num_data=16,
    symmetry_num_data=8,
    hessian_num_data=37,
    hutchinson_probes=3,
    top_eigenvalues=2,
    eigen_iters=8,
    density_runs=2,
    density_steps=5,
    noise_num_data=37,
    noise_num_samples=2,
    ntk_num_data=8,
    ntk_subsamples=2,
    pgd_num_data=16,
    pgd_steps=2,
    batch_size=16,
)
ARGS = [
    "audit",
    "--data",
    "digits",
    "--action",
    "c4",
    "--json",
    "--set",
    "test_num_data=null",
    *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")],
]


def _values(audit: dict) -> dict[str, tuple[float, float | None]]:
    return {
        f"{s}.{m}": (e["value"], e["stderr"]) for s, sec in audit["sections"].items() for m, e in sec["values"].items()
    }


@pytest.mark.slow
def test_audit_under_torchrun_equals_one_process_and_writes_one_run(tmp_path, capsys):
    (tmp_path / "dist_model.py").write_text(MODEL_FILE)
    spec = f"{tmp_path / 'dist_model.py'}:make"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "symgen.cli",
        *ARGS,
        "--model",
        spec,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # only rank 0 prints: one JSON document
    runs = RunStore(tmp_path / "two").list()
    assert len(runs) == 1 and runs[0]["status"] == "done"
    assert len([d for d in (tmp_path / "two").iterdir() if d.is_dir()]) == 1

    assert main([*ARGS, "--model", spec, "--out", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    a, b = _values(one), _values(two)
    assert set(a) == set(b) and len(a) > 15
    for key, (v1, e1) in a.items():
        v2, e2 = b[key]
        assert v2 == pytest.approx(v1, rel=1e-6, abs=1e-9), key
        if e1 is not None:
            assert e2 == pytest.approx(e1, rel=1e-6, abs=1e-9), key
    # the whole test split (450 digits), streamed, on both
    assert two["sections"]["performance"]["samples"] == one["sections"]["performance"]["samples"] == 101 + 450
    assert "the whole split, streamed" in two["sections"]["performance"]["values"]["test_accuracy"]["note"]


def test_audit_of_cifar10_streams_the_whole_test_split(tmp_path, capsys):
    import pickle

    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    base = tmp_path / "data" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 77)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    (tmp_path / "cnn.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), "
        "nn.Linear(4 * 64, 10))\n"
    )
    sets = [a for k, v in {**TINY, "eval_num_data": 30, "batch_size": 10}.items() for a in ("--set", f"{k}={v}")]
    assert (
        main(
            [
                "audit",
                "--model",
                f"{tmp_path / 'cnn.py'}:make",
                "--data",
                "cifar10",
                "--root",
                str(tmp_path / "data"),
                "--json",
                "--out",
                str(tmp_path / "runs"),
                *sets,
                "--set",
                "test_num_data=null",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    perf = res["sections"]["performance"]
    assert perf["values"]["test_accuracy"]["note"].startswith("77 samples, the whole split, streamed")
    # against a loop over the 77 test images, one at a time
    raw = pickle.loads((base / "test_batch").read_bytes())
    x = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    y = torch.tensor(raw[b"labels"])
    spec = importlib.util.spec_from_file_location("cnn_ref", tmp_path / "cnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.make().eval()
    with torch.no_grad():
        correct = sum(int(net(x[i : i + 1]).argmax() == y[i]) for i in range(77))
    assert perf["values"]["test_accuracy"]["value"] == pytest.approx(correct / 77)


@pytest.mark.slow
def test_ray_executor_gives_the_in_process_numbers(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    from symgen.experiments import REGISTRY

    monkeypatch.setitem(REGISTRY, "toy", "toy_experiment")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    import ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}},
    )
    try:
        assert main(["run", "toy", "--quick", "--json", "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
        by_ray = json.loads(capsys.readouterr().out)
    finally:
        ray.shutdown()
    assert main(["run", "toy", "--quick", "--json", "--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert [c["measured"] for c in by_ray["claims"]] == [c["measured"] for c in local["claims"]]
    assert [c["passed"] for c in by_ray["claims"]] == [c["passed"] for c in local["claims"]]
