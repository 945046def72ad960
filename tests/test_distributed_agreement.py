"""Ranks that disagree fail together with one DistributedError naming the difference (2 gloo processes, CPU),
never a backend abort ("Received data size doesn't match") or a rank left waiting in a collective."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from symgen.errors import DistributedError

WORLD = 2


def _worker(rank: int, init_file: str, out_file: str, mode: str) -> None:
    from symgen import distributed

    torch.set_num_threads(1)
    group = distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout_s=60
    )
    results = []
    # the same signature: passes; then a width that differs on rank 1 (a longer string there, too)
    distributed.check_consistent({"w": [3, 4], "dtype": "float32"}, group, what="same")
    width = 8 if rank == 0 else 16
    sig = {"layer.weight": [width, 4], "dtype": "float32", "note": "x" * (5 + 40 * rank)}
    try:
        distributed.check_consistent(sig, group, what="toy operator")
        results.append("no error")
    except DistributedError as e:
        results.append(str(e))
    # a step that fails on rank 1 only: every rank raises, naming rank 1 and its reason
    distributed.agree(True, group, what="all fine")
    try:
        distributed.agree(rank != 1, group, what="section X", reason="out of memory" if rank == 1 else "")
        results.append("no error")
    except DistributedError as e:
        results.append(str(e))
    # after agreeing, the ranks are still in step: a collective works
    results.append(float(distributed.all_reduce_sum(torch.ones(1), group)))
    torch.save(results, f"{out_file}.{rank}")
    distributed.barrier(group)
    torch.distributed.destroy_process_group()
    os._exit(0)  # results are saved: skip interpreter teardown (torch 2.13 gloo threads can abort there)


def test_disagreeing_ranks_raise_the_same_error_on_every_rank(tmp_path):
    init, out = str(tmp_path / "init"), str(tmp_path / "out")
    ctx = mp.start_processes(_worker, args=(init, out, "x"), nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > 120:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes did not finish within 120 s")
    got = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for r in range(WORLD):
        mismatch, failed, total = got[r]
        assert "toy operator" in mismatch and "layer.weight" in mismatch, mismatch
        assert "[8, 4]" in mismatch and "[16, 4]" in mismatch and "rank 1" in mismatch
        assert "dtype" not in mismatch.split("(")[1].split(")")[0]  # only the keys that differ are named
        assert "section X failed on rank(s) [1]" in failed and "out of memory" in failed, failed
        assert total == 2.0
    assert got[0][0] == got[1][0] and got[0][1] == got[1][1]


def test_single_process_checks():
    from symgen import distributed

    distributed.check_consistent({"a": 1}, None, what="x")  # nothing to compare
    distributed.agree(True, None, what="x")
    with pytest.raises(DistributedError, match="step failed: boom"):
        distributed.agree(False, None, what="step", reason="boom")
