"""Data-parallel execution on 2 gloo processes (CPU): curvature estimates, noise stability, NTK row blocks and
evaluation equal one process's on the whole dataset (to 1e-6 relative); a dead rank fails loudly, never hangs."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as TF
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from symgen.errors import DistributedError

WORLD = 2


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model.eval(), TensorDataset(x, y)


def _measure(model, loader, full_loader, group):
    """Everything compared between ranks and one process; ``group`` None means one process."""
    from symgen.curvature import GGNOperator, HessianOperator
    from symgen.evaluation import evaluate
    from symgen.metrics import noise_stability
    from symgen.ntk import empirical_ntk_fn

    H = HessianOperator(model, TF.cross_entropy, loader, process_group=group)
    V = torch.randn(H.dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dens = H.density(12, 1, generator=8)
    return {
        "hv": H.matmat(V),
        "trace": torch.tensor(
            [H.trace(10, generator=6).value, H.trace(12, generator=6, method="deflated", deflation_steps=5).value]
        ),
        "top": H.eigenvalues(2, tol=1e-6, generator=7),
        "gradient": H.gradient(),
        "density": dens.nodes,
        "ggn": GGNOperator(model, TF.cross_entropy, loader, process_group=group).matmat(V),
        "noise": torch.tensor(
            [noise_stability(model, TF.cross_entropy, loader, 0.05, 6, generator=9, process_group=group).value]
        ),
        "ntk": empirical_ntk_fn(model).stream(full_loader, process_group=group),
        "ntk_cross": empirical_ntk_fn(model).stream(
            full_loader, DataLoader(full_loader.dataset, batch_size=11), process_group=group
        ),
        "eval": torch.tensor(
            [evaluate(model, loader, eps=(0.1,), steps=2, random_start=False, process_group=group).robust_accuracy[0.1]]
        ),
    }


def _worker(rank: int, init_file: str, out_file: str, mode: str) -> None:
    from symgen import distributed

    torch.set_num_threads(1)
    group = distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout_s=60
    )
    if mode == "dead":
        if rank == 1:
            os._exit(0)  # dies without a word before the collective
        try:
            distributed.all_reduce_sum(torch.ones(3), group, timeout_s=10)
            result = "no error"
        except DistributedError as e:
            result = f"DistributedError: {e}"
        torch.save(result, out_file)
        os._exit(0)
    model, ds = _setup()
    loader = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, WORLD, rank, shuffle=False))
    full = DataLoader(ds, batch_size=7)
    res = _measure(model, loader, full, group)
    res["shard_range"] = torch.tensor(list(distributed.shard_range(10, group)))
    res["gathered"] = distributed.all_gather_rows(torch.full((rank + 1, 2), float(rank)), group)
    torch.save(res, f"{out_file}.{rank}")
    distributed.barrier(group)
    torch.distributed.destroy_process_group()
    os._exit(0)  # results are saved: skip interpreter teardown, where torch 2.13's gloo threads rarely abort


def _spawn(tmp_path, mode: str, deadline_s: float = 120.0) -> None:
    init, out = str(tmp_path / "init"), str(tmp_path / "out")
    ctx = mp.start_processes(_worker, args=(init, out, mode), nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > deadline_s:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {deadline_s} s")


def test_two_gloo_processes_equal_one_process(tmp_path):
    _spawn(tmp_path, "same")
    model, ds = _setup()
    ref = _measure(model, DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=7), None)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"out.{rank}")
        for key, r in ref.items():
            torch.testing.assert_close(got[key], r, rtol=1e-6, atol=1e-9, msg=f"rank {rank}: {key}")
        assert got["shard_range"].tolist() == ([0, 1, 2, 3, 4] if rank == 0 else [5, 6, 7, 8, 9])
        assert got["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_a_dead_rank_fails_loudly_on_the_others(tmp_path):
    start = time.monotonic()
    _spawn(tmp_path, "dead", deadline_s=90)
    result = torch.load(tmp_path / "out")
    assert result.startswith("DistributedError"), result
    assert "rank" in result
    assert time.monotonic() - start < 90


def test_process_group_arguments_are_checked():
    from symgen import distributed
    from symgen.errors import ConfigError

    assert distributed.resolve_group("auto") is None  # not initialized: this process alone
    assert distributed.resolve_group(None) is None
    with pytest.raises(ConfigError, match="process_group"):
        distributed.resolve_group("world")
    with pytest.raises(DistributedError, match="not initialized"):
        distributed.resolve_group(object())
    assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert list(distributed.ShardedBatches([1, 2, 3], None)) == [1, 2, 3]
    env = {k: os.environ.pop(k) for k in ("MASTER_ADDR",) if k in os.environ}
    try:
        with pytest.raises(ConfigError, match="torchrun"):
            distributed.init_process_group("gloo")
    finally:
        os.environ.update(env)
