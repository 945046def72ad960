"""NSO step with k antithetic pairs: the vectorized path (a LossClosure: vmap over the 2k perturbed copies
through symgen.functional) vs the loop over samples (a plain closure, 1 + 2k passes), in one process.

    python benchmarks/nso.py [--pairs 4] [--batch 64] [--steps 20] [--threads 1,2]

Per small model and thread count: the two paths step alternately (one loop step, one vectorized step, ...
on two copies of the model), so a change in the machine's load hits both alike. Prints the time per step
(wall clock and process CPU time; min and median over the steps), the ratios, the agreement of the
weights after the steps (same seeded noise), achieved FLOP/s next to the measured matmul FLOP/s, and
what the loop spends per pass that vectorizing could save at most (the fixed cost of a pass, measured
on a batch of one sample), which bounds the ratio that vectorizing can give.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
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
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(40, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    return {
        "BN MLP 40-128-128-10 (mnist1d-sized)": (mlp, (1, 40)),
        "BN CNN width 8 (digits 8x8)": (bn_cnn((1, 8, 8), 10, 8), (1, 8, 8)),
        "BN CNN width 16 (digits 8x8)": (bn_cnn((1, 8, 8), 10, 16), (1, 8, 8)),
    }


def make_step(model: nn.Module, path: str, x: torch.Tensor, y: torch.Tensor, pairs: int):
    model.train()
    opt = NSO(
        model.parameters(),
        torch.optim.SGD,
        sigma=0.01,
        num_samples=pairs,
        model=model,
        lr=0.05,
        momentum=0.9,
        generator=torch.Generator().manual_seed(1),
    )

    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if path == "loop":
        return lambda: opt.step(closure)
    return lambda: opt.step(LossClosure(model, TF.cross_entropy, x, y))


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def alternate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pairs: int, steps: int):
    """Both paths from the same weights, stepping alternately; per path the (wall, cpu) times and the weights."""
    nets = {p: copy.deepcopy(model) for p in ("loop", "vectorized")}
    step = {p: make_step(nets[p], p, x, y, pairs) for p in nets}
    for p in nets:
        step[p]()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in nets}
    for _ in range(steps):
        for p in nets:
            times[p].append(timed(step[p]))
    weights = {p: torch.cat([q.detach().reshape(-1) for q in nets[p].parameters()]) for p in nets}
    return times, weights


def pass_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 15) -> float:
    """Min CPU time of one forward+backward pass of the plain module (what the loop runs 1 + 2k times)."""
    net = copy.deepcopy(model).train()
    best = math.inf
    for i in range(reps + 2):
        t = time.process_time()
        net.zero_grad()
        TF.cross_entropy(net(x), y).backward()
        if i >= 2:
            best = min(best, time.process_time() - t)
    return best


def loop_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pairs: int) -> int:
    """FLOPs of one step, counted on the loop path (FlopCounterMode counts the grouped kernels that
    vmap produces differently, but the arithmetic is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model)
    step = make_step(net, "loop", x, y, pairs)
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def med(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, e.g. 1,2")
    ap.add_argument("--models", default="", help="only models whose name contains this text")
    args = ap.parse_args()
    passes = 1 + 2 * args.pairs
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        peak = matmul_flops()
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(
            f"\n=== NSO step, k = {args.pairs} antithetic pairs ({passes} passes), batch {args.batch}, "
            f"{threads} thread(s); {args.steps} alternating steps per path; matmul {peak / 1e9:.1f} GFLOP/s; "
            f"load average {load} (2-core machine shared with other jobs: wall times are noisy, the "
            "process CPU time less so)"
        )
        for name, (model, shape) in models().items():
            if args.models not in name:
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.randn((args.batch,) + shape, generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            times, w = alternate(model, x, y, args.pairs, args.steps)
            flops = loop_flops(model, x, y, args.pairs)
            diff = float((w["loop"] - w["vectorized"]).abs().max() / w["loop"].abs().max())
            n = sum(p.numel() for p in model.parameters())
            print(f"\n{name}: {n} parameters")
            stats = {}
            for p, label in (("loop", "loop over samples (closure)"), ("vectorized", "vectorized (vmap)          ")):
                wall, cpu = [t[0] for t in times[p]], [t[1] for t in times[p]]
                stats[p] = (min(wall), med(wall), min(cpu), med(cpu))
                print(
                    f"  {label}: wall {min(wall) * 1e3:7.2f} min {med(wall) * 1e3:7.2f} median ms/step;  "
                    f"CPU {min(cpu) * 1e3:7.2f} min {med(cpu) * 1e3:7.2f} median ms/step"
                )
            r = [a / b for a, b in zip(stats["loop"], stats["vectorized"], strict=True)]
            print(
                f"  ratio loop/vectorized: wall {r[0]:.2f}x (min) {r[1]:.2f}x (median); CPU {r[2]:.2f}x (min) "
                f"{r[3]:.2f}x (median)   (target >= 1.5x)"
            )
            print(f"  weights after {args.steps + 1} steps agree to {diff:.1e} (relative max)")
            t_vec = stats["vectorized"][0]
            print(
                f"  {flops / 1e6:.1f} MFLOP/step: vectorized {flops / t_vec / 1e9:.2f} GFLOP/s "
                f"({flops / t_vec / peak:.1%} of matmul), loop {flops / stats['loop'][0] / 1e9:.2f} GFLOP/s"
            )
            full, fixed = pass_time(model, x, y), pass_time(model, x[:2], y[:2])
            bound = stats["loop"][2] / max(stats["loop"][2] - (passes - 1) * fixed, 1e-9)
            print(
                f"  one plain pass (fwd+bwd, CPU min): batch {args.batch} {full * 1e3:.2f} ms, batch 2 "
                f"{fixed * 1e3:.2f} ms (its fixed cost, {fixed / full:.0%}); removing the fixed cost of "
                f"{passes - 1} of the {passes} passes bounds the CPU-time ratio at about {bound:.2f}x "
                "unless the batched kernels run faster per FLOP than the loop's"
            )


if __name__ == "__main__":
    main()
