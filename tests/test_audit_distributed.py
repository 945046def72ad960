"""An audit on 2 gloo processes (CPU) whose ranks stay in step: one plan for both even when their timings
differ, and a section that fails on one rank only stops both with the same DistributedError (no hang)."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 15.0


def _model():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    ).eval()


def _worker(rank: int, init_file: str, out_file: str, mode: str) -> None:
    from symgen import distributed
    from symgen.audit import audit, planning
    from symgen.audit.sections import curvature
    from symgen.data import load_dataset
    from symgen.errors import DistributedError

    torch.set_num_threads(1)
    group = distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout_s=TIMEOUT_S
    )
    if mode == "plan" and rank == 1:
        # rank 1 times the model 20x slower than rank 0: without a shared plan the ranks would size their
        # sections differently and pair collectives of different sizes (gloo aborts the process)
        real = planning.time_passes

        def slow(*args, **kwargs):
            t = real(*args, **kwargs)
            return planning.Timing(t.forward * 20, t.backward * 20, t.outputs, t.layers)

        planning.time_passes = slow
    if mode == "fail" and rank == 1:

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory in the Hessian on rank 1")

        curvature.hessian = broken
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    data = {"train": (x[:300], y[:300]), "test": (xt[:100], yt[:100])}
    out: dict = {}
    try:
        budget = 20.0 if mode == "plan" else 120.0
        limits = None if mode == "plan" else {"hessian_num_data": 16, "eigen_iters": 5, "density_steps": 5}
        res = audit(
            _model(), data, "c4", budget=budget, limits=limits, process_group=group, collective_timeout_s=TIMEOUT_S
        )
        out["limits"] = res.limits
        out["skipped"] = {k: s.skipped for k, s in res.sections.items()}
        out["status"] = {k: s.status for k, s in res.sections.items()}
        out["values"] = {f"{k}.{m}": e.value for k, s in res.sections.items() for m, e in s.values.items()}
    except DistributedError as e:
        out["error"] = str(e)
    torch.save(out, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()
    os._exit(0)  # results are saved: skip interpreter teardown (gloo threads can abort there)


def _run(tmp_path, mode: str, deadline: float) -> list[dict]:
    init, out = str(tmp_path / "init"), str(tmp_path / "out")
    ctx = mp.start_processes(_worker, args=(init, out, mode), nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {deadline:.0f} s (a rank hangs in a collective)")
    return [torch.load(f"{out}.{r}") for r in range(WORLD)]


@pytest.mark.slow
def test_ranks_share_one_plan_and_complete(tmp_path):
    got = _run(tmp_path, "plan", deadline=240)
    assert "error" not in got[0] and "error" not in got[1], got
    assert got[0]["limits"] == got[1]["limits"]
    # the budget cut the sections on both ranks alike, from the slower rank's timing
    assert any("sized to the 20 s budget" in s for s in got[0]["skipped"]["hessian"]), got[0]["skipped"]
    assert got[0]["skipped"] == got[1]["skipped"] and got[0]["status"] == got[1]["status"]
    assert "hessian.trace" in got[0]["values"]
    assert got[0]["values"].keys() == got[1]["values"].keys()


@pytest.mark.slow
def test_a_section_failing_on_one_rank_stops_every_rank_with_one_error(tmp_path):
    got = _run(tmp_path, "fail", deadline=120 + 4 * TIMEOUT_S)
    assert "error" in got[0] and "error" in got[1], got
    assert got[0]["error"] == got[1]["error"]
    msg = got[0]["error"]
    assert "audit section 'hessian' failed on rank(s) [1]" in msg and "out of memory in the Hessian" in msg, msg
