"""Ranks holding different models fail together before their first collective (2 gloo processes, CPU): the
Hessian and GGN operators, the NTK's stream and noise stability raise the same DistributedError on every rank,
naming the parameter that differs, instead of gloo's abort ("Received data size doesn't match")."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as TF
from torch import nn

WORLD = 2


def _worker(rank: int, init_file: str, out_file: str) -> None:
    from symgen import distributed
    from symgen.curvature import GGNOperator, HessianOperator
    from symgen.errors import DistributedError, DivergenceError
    from symgen.metrics import noise_stability
    from symgen.ntk import empirical_ntk_fn

    torch.set_num_threads(1)
    group = distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout_s=60
    )
    torch.manual_seed(0)
    width = 4 if rank == 0 else 6  # rank 1's hidden layer is wider
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    results = {}
    for name, run in [
        (
            "hessian",
            lambda: HessianOperator(model, TF.cross_entropy, (x, y)).matmat(
                torch.ones(3 * width + width + 2 * width + 2, 1, dtype=torch.float64)
            ),
        ),
        ("ggn", lambda: GGNOperator(model, TF.cross_entropy, (x, y)).trace(3)),
        ("ntk", lambda: empirical_ntk_fn(model).stream([x[:3], x[3:]])),
        ("noise", lambda: noise_stability(model, TF.cross_entropy, (x, y), 0.1, 2)),
    ]:
        try:
            run()
            results[name] = "no error"
        except DistributedError as e:
            results[name] = str(e)
    # the same models again: a NaN input on rank 1 only stops both ranks (no rank left waiting)
    torch.manual_seed(0)
    same = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    bad = x.clone()
    if rank == 1:
        bad[2, 0] = float("nan")
    try:
        HessianOperator(same, TF.cross_entropy, (bad, y)).trace(2)
        results["nan"] = "no error"
    except DivergenceError as e:
        results["nan"] = str(e)
    results["sum"] = float(distributed.all_reduce_sum(torch.ones(1), group))  # still in step
    torch.save(results, f"{out_file}.{rank}")
    distributed.barrier(group)
    torch.distributed.destroy_process_group()
    os._exit(0)  # results are saved: skip interpreter teardown (torch gloo threads can abort there)


def test_different_models_raise_the_same_error_on_every_rank(tmp_path):
    init, out = str(tmp_path / "init"), str(tmp_path / "out")
    ctx = mp.start_processes(_worker, args=(init, out), nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > 240:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the processes did not finish within 240 s")
    got = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for r in range(WORLD):
        for name, what in [
            ("hessian", "HessianOperator"),
            ("ggn", "GGNOperator"),
            ("ntk", "stream"),
            ("noise", "noise_stability"),
        ]:
            msg = got[r][name]
            assert what in msg and "0.weight" in msg and "[4, 3]" in msg and "[6, 3]" in msg, (name, msg)
            assert msg == got[1 - r][name]  # the same error on both ranks
        assert "non-finite" in got[r]["nan"] or "NaN" in got[r]["nan"], got[r]["nan"]
        assert got[r]["sum"] == 2.0
    assert "batch index 2" in got[1]["nan"]  # the rank that met it names the place; rank 0 says another rank did
    assert "other rank" in got[0]["nan"]
