"""NSO step with k antithetic pairs: the vectorized path (a LossClosure: vmap over the 2k perturbed copies
through symgen.functional) vs the loop over samples (a plain closure, 1 + 2k passes), in one process.

    python benchmarks/nso.py [--pairs 4] [--batch 64] [--steps 20] [--threads 2]

Prints, per small model, the time per step of each path, their ratio, the agreement of the updated
weights (same seeded noise) and achieved FLOP/s next to the measured matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as TF
from torch import nn

from symgen.models import bn_cnn
from symgen.optim import NSO, LossClosure


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(40, 128), nn.BatchNorm1d(128), nn.ReLU(),
                        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    return {"BN MLP 40-128-128-10 (mnist1d-sized)": (mlp, (1, 40)),
            "BN CNN width 8 (digits 8x8)": (bn_cnn((1, 8, 8), 10, 8), (1, 8, 8)),
            "BN CNN width 16 (digits 8x8)": (bn_cnn((1, 8, 8), 10, 16), (1, 8, 8))}


def run_path(model: nn.Module, state: dict, path: str, x: torch.Tensor, y: torch.Tensor, pairs: int,
             steps: int) -> tuple[float, torch.Tensor]:
    model.load_state_dict(state)
    model.train()
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.01, num_samples=pairs, model=model, lr=0.05,
              momentum=0.9, generator=torch.Generator().manual_seed(1))

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        if path == "loop":
            opt.step(closure)
        else:
            opt.step(LossClosure(model, TF.cross_entropy, x, y))

    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return sorted(times)[len(times) // 2], weights


def loop_flops(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, pairs: int) -> int:
    """FLOPs of one step, counted on the loop path (FlopCounterMode counts the grouped kernels that
    vmap produces differently, but the arithmetic is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.load_state_dict(state)
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.01, num_samples=pairs, model=model, lr=0.05)

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with FlopCounterMode(display=False) as fc:
        opt.step(closure)
    model.load_state_dict(state)
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_flops()
    print(f"NSO step, k = {args.pairs} antithetic pairs (1 + {2 * args.pairs} passes), batch {args.batch}, "
          f"{args.threads} threads; median of {args.steps} steps; matmul {peak / 1e9:.1f} GFLOP/s "
          "(timings on a shared machine are noisy)")
    for name, (model, shape) in models().items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn((args.batch,) + shape, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        t_loop, w_loop = run_path(model, state, "loop", x, y, args.pairs, args.steps)
        t_vec, w_vec = run_path(model, state, "vectorized", x, y, args.pairs, args.steps)
        flops = loop_flops(model, state, x, y, args.pairs)
        diff = float((w_loop - w_vec).abs().max() / w_loop.abs().max())
        n = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {n} parameters")
        print(f"  loop over samples (closure): {t_loop * 1000:7.2f} ms/step")
        print(f"  vectorized (vmap)          : {t_vec * 1000:7.2f} ms/step  -> {t_loop / t_vec:.2f}x "
              f"(target >= 1.5x)")
        print(f"  weights after {args.steps + 1} steps agree to {diff:.1e} (relative max)")
        print(f"  {flops / 1e6:.1f} MFLOP/step: vectorized {flops / t_vec / 1e9:.2f} GFLOP/s "
              f"({flops / t_vec / peak:.1%} of matmul), loop {flops / t_loop / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
    main()
