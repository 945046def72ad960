"""An ensemble sharded across 2 gloo processes (members split by rank, outputs gathered) equals the one-process
ensemble: the same members, trained the same way, the same gathered logits and loss history."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from symgen.groups import ImageRotation90
from symgen.nn.masked import MaskedCNN

WORLD, MEMBERS = 2, 5
DT = torch.float64


def _factory():
    return MaskedCNN(in_channels=1, num_classes=3, channels=3, support="symmetric", dtype=DT)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(14, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (14,), generator=g)


def _train(process_group):
    from symgen.ensemble import Ensemble, train_ensemble

    x, y = _data()
    ens = Ensemble.init(_factory, MEMBERS, generator=3, process_group=process_group)
    hist = train_ensemble(
        ens,
        x,
        y,
        torch.optim.Adam(ens.parameters(), lr=0.01),
        epochs=2,
        batch_size=4,
        augment=ImageRotation90(),
        generator=3,
        lr_factors=torch.tensor([1.0 + 0.1 * i for i in ens.member_ids], dtype=DT),
    )
    return ens, hist, x


def _worker(rank: int, init_file: str, out_file: str) -> None:
    from symgen import distributed

    torch.set_num_threads(1)
    group = distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout_s=60
    )
    ens, hist, x = _train(group)
    full = ens.gathered()
    torch.save(
        {
            "ids": ens.member_ids,
            "total": ens.total_members,
            "hist": hist,
            "logits": ens.gathered_member_logits(x),
            "full_ids": full.member_ids,
            "full_params": {k: v.detach() for k, v in full.params.items()},
        },
        f"{out_file}.{rank}",
    )
    distributed.barrier(group)
    torch.distributed.destroy_process_group()


def test_sharded_ensemble_on_two_gloo_processes_equals_one_process(tmp_path):
    init, out = str(tmp_path / "init"), str(tmp_path / "out")
    ctx = mp.start_processes(_worker, args=(init, out), nprocs=WORLD, join=False, start_method="spawn")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > 120:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within 120 s")
    ens, hist, x = _train(None)
    with torch.no_grad():
        logits = ens.member_logits(x)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["ids"] == ([0, 1] if rank == 0 else [2, 3, 4])  # distributed.shard_range(5)
        assert got["total"] == MEMBERS and got["full_ids"] == list(range(MEMBERS))
        torch.testing.assert_close(got["hist"], hist, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-10, atol=1e-12)
        for k, v in ens.params.items():
            torch.testing.assert_close(got["full_params"][k], v.detach(), rtol=1e-10, atol=1e-12, msg=k)


def test_more_ranks_than_members_is_a_config_error():
    from symgen.ensemble import Ensemble
    from symgen.errors import ConfigError

    with pytest.raises(ConfigError, match="num_members"):
        Ensemble.init(_factory, 0)
