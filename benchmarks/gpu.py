"""The real-scale jobs on CUDA: a CIFAR ResNet-18's HVP/gradient cost ratio (eager and torch.compile'd gradient),
its top-5 Hessian eigenvalues over 10k images streamed from a DataLoader, and empirical-NTK blocks.

    python benchmarks/gpu.py [--images 10000] [--batch 500] [--ntk-samples 64]

Needs a CUDA GPU (exits with a message otherwise). Inputs are CIFAR-shaped random images with random
labels (no download); peak memory is ``torch.cuda.max_memory_allocated``. Write the printed numbers into
benchmarks/README.md with the date and the GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as TF
from torch.utils.data import DataLoader, TensorDataset


def timed_cuda(fn, *a, **k):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn(*a, **k)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--ntk-samples", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd gradient")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here (numbers pending).")
        sys.exit(0)
    from symgen.curvature import HessianOperator
    from symgen.models import resnet18
    from symgen.ntk import empirical_ntk_fn

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = resnet18().to(dev).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    n = sum(p.numel() for p in model.parameters())
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; ResNet-18 ({n} parameters)")

    xb, yb = x[: args.batch].to(dev), y[: args.batch].to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):  # warm-up (cuDNN autotuning)
        torch.autograd.grad(TF.cross_entropy(model(xb), yb), params)
    _, t_g, m_g = timed_cuda(lambda: torch.autograd.grad(TF.cross_entropy(model(xb), yb), params))
    v = torch.randn(n, device=dev)
    for mode in ("reverse", "forward"):
        H = HessianOperator(model, TF.cross_entropy, (xb, yb), hvp_mode=mode, cache_graph=False)
        H.matvec(v)
        _, t_h, m_h = timed_cuda(H.matvec, v)
        print(
            f"batch {args.batch}: HVP ({mode}) {t_h * 1e3:.1f} ms = {t_h / t_g:.2f}x a gradient ({t_g * 1e3:.1f} ms); "
            f"peak memory {m_h:.0f} MiB = {m_h / m_g:.2f}x the gradient's"
        )
    if args.compile:
        cmodel = torch.compile(model)
        for _ in range(3):
            torch.autograd.grad(TF.cross_entropy(cmodel(xb), yb), params)
        _, t_c, _ = timed_cuda(lambda: torch.autograd.grad(TF.cross_entropy(cmodel(xb), yb), params))
        print(f"compiled gradient {t_c * 1e3:.1f} ms ({t_g / t_c:.2f}x eager)")

    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, pin_memory=True)
    H = HessianOperator(model, TF.cross_entropy, loader)
    pairs, t_e, m_e = timed_cuda(H.eigenpairs, 5, tol=1e-3, criterion="gap", generator=0)
    print(
        f"top-5 Hessian eigenvalues over {args.images} images (streamed, batch {args.batch}): "
        f"{[round(float(v), 4) for v in pairs.values]}, {pairs.num_matvecs} products, {t_e:.1f} s, "
        f"peak {m_e:.0f} MiB"
    )

    kernel = empirical_ntk_fn(model, memory_budget=8 << 30)
    xs = x[: args.ntk_samples].to(dev)
    kernel(xs[:4])
    k, t_k, m_k = timed_cuda(kernel, xs)
    print(f"NTK block {tuple(k.shape)} (method {kernel.method_for(xs)}): {t_k:.2f} s, peak {m_k:.0f} MiB")


if __name__ == "__main__":
    main()
