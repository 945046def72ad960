"""Optimizer steps under DistributedDataParallel on 2 gloo processes (run by tests/test_ddp_optim.py).

``python ddp_optim_worker.py OUTDIR``: each rank trains on its half of the batch and saves its final
weights to OUTDIR/rank{r}.pt; ``train(name, model, x, y)`` is also the single-process reference (for NAMES;
LOCAL_NAMES, SAM's per-process ascent, have the brute-force reference of tests/test_ddp_optim.py). Each
rank also records how many gradient all-reduces DDP ran per optimizer (a counting comm hook).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
from torch import nn

from symgen.optim import NSO, SAM, LossClosure, UnitNormSGD

STEPS = 4
NUM_DATA = 16
RHO, LR, MOMENTUM = 0.1, 0.2, 0.9


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(NUM_DATA, 6, generator=g), torch.randint(0, 3, (NUM_DATA,), generator=g)


def net() -> nn.Module:
    # LayerNorm normalizes each sample: the split batch gives the full batch's gradient (BatchNorm would not)
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def make(name: str, model: nn.Module, inner: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    if name.startswith("sam"):
        # "sam": SAM does not know the model (DDP syncs both passes); "sam_nosync": it does (no_sync on the
        # pass at W, one all-reduce); "sam_local": per-process ascent (m-sharpness)
        known = name in ("sam_nosync", "sam_local")
        return SAM(
            model.parameters(),
            torch.optim.SGD,
            rho=RHO,
            lr=LR,
            momentum=MOMENTUM,
            adaptive=name == "sam_adaptive",
            model=model if known else None,
            ascent="local" if name == "sam_local" else "global",
        )
    if name.startswith("nso"):
        return NSO(model.parameters(), torch.optim.SGD, sigma=0.05, num_samples=2, lr=0.2, generator=7)
    return UnitNormSGD(inner, lr=0.2, momentum=0.9, example_input=x)


NAMES = ["sam", "sam_adaptive", "sam_nosync", "nso_vectorized", "nso_closure", "unit_norm"]
LOCAL_NAMES = ["sam_local"]


def train(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, inner: nn.Module | None = None) -> None:
    inner = model if inner is None else inner
    opt = make(name, model, inner, x)
    for _ in range(STEPS):
        if name == "nso_closure" or name.startswith("sam"):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.step(LossClosure(model, nn.functional.cross_entropy, x, y))


def _rank(rank: int, outdir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{outdir}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        x, y = data()
        half = NUM_DATA // 2
        xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        out: dict = {"all_reduces": {}}
        for name in NAMES + LOCAL_NAMES:
            inner = net()
            model = DDP(inner)
            calls = [0]

            def counting_hook(state, bucket, calls=calls):  # unannotated: DDP checks the annotations it sees
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                calls[0] += 1
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(None, counting_hook)
            train(name, model, xs, ys, inner=inner)
            out[name] = {k: v.detach().clone() for k, v in inner.state_dict().items()}
            out["all_reduces"][name] = calls[0]
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # results are saved: skip interpreter teardown, where torch 2.13's gloo threads rarely abort


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(sys.argv[1],), nprocs=2, join=True)
