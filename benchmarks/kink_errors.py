"""What the error columns of the curvature rows measure on ReLU / max-pool networks (no timings).

A float32 forward pass puts a few of a network's ReLU pre-activations on the other side of zero than float64
does (those within rounding of 0), and picks another max-pool winner where two inputs tie or nearly tie (8x8
digits are integer images with constant regions: exact ties). The float64 reference is then a product on
another linear piece of the loss, and every float32 tool's Hessian- or GGN-vector product differs from it by
that piece's share (1e-5 to 1e-3 relative at batch 512), whatever its rounding. Which tool lands on which
piece depends on its kernels and on the training step. This script counts those flips and measures each
tool's error against float64 on the BN CNN of the peers table and on its smooth twin (GELU for ReLU,
average- for max-pooling: no kinks), where the errors are the tools' rounding alone.

    .venv-peers/bin/python benchmarks/kink_errors.py [--steps 0 10 50] [--batch 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os

import torch
import torch.nn.functional as TF
from peers_torch import Ref64, flat, split_like, trained
from torch import nn

F64 = torch.float64


def smooth_twin(c: int = 39) -> nn.Module:
    """The BN CNN of symgen.models.bn_cnn with GELU for ReLU and average- for max-pooling (same shapes)."""
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.GELU(),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 4, 10),
    )


def kinks(model: nn.Module, x: torch.Tensor, fast: bool = False) -> tuple[int, int, int]:
    """(ReLU units whose sign differs between the float32 and float64 forward passes, max-pool windows whose
    winner differs, units in all); ``fast``: the forward passes symgen's operators run on CPU in float32
    (symgen.curvature.double_backward: convolutions channels-last, other kernels, other rounding)."""
    from symgen.curvature.double_backward import fast_double_backward

    seen: dict[str, list[torch.Tensor]] = {"32": [], "64": []}

    def hook(key):
        def fn(mod, inp, _out):
            z = inp[0]
            if isinstance(mod, nn.ReLU):
                seen[key].append(z > 0)
            else:
                seen[key].append(TF.max_pool2d(z, mod.kernel_size, mod.stride, return_indices=True)[1])

        return fn

    total = 0
    for key, m, xx in (("32", model, x), ("64", copy.deepcopy(model).to(F64), x.to(F64))):
        hs = [mod.register_forward_hook(hook(key)) for mod in m.modules() if isinstance(mod, (nn.ReLU, nn.MaxPool2d))]
        with torch.no_grad(), fast_double_backward() if fast else contextlib.nullcontext():
            m.eval()(xx)
        for h in hs:
            h.remove()
    relu = pool = 0
    for a, b in zip(seen["32"], seen["64"], strict=True):
        if a.dtype == torch.bool:
            relu += int((a != b).sum())
            total += a.numel()
        else:
            pool += int((a != b).sum())
    return relu, pool, total


def errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, float | str]:
    from symgen.curvature import GGNOperator, HessianOperator

    ref = Ref64(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(ref.dim, generator=torch.Generator().manual_seed(seed))
    hv, gv = ref.hvp(v), ref.ggn_mv(v)

    def rel(a, r):
        return float((a.double() - r).abs().max() / r.abs().max())

    def autograd_hvp():
        m = copy.deepcopy(model).eval()
        ps = [p for p in m.parameters() if p.requires_grad]
        g = torch.autograd.grad(TF.cross_entropy(m(x), y), ps, create_graph=True)
        return flat(torch.autograd.grad(g, ps, split_like(v, ps)))

    def eigenthings_hvp():
        import hessian_eigenthings as he

        return he.HessianOperator(model, [(x, y)], he.supervised_loss(TF.cross_entropy)).matvec(v)

    def curvlinops(kind):
        import curvlinops

        cls = getattr(curvlinops, f"{kind}LinearOperator")
        return cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False, num_data=x.shape[0]) @ v

    tools = {
        "symgen HVP": (lambda: HessianOperator(model, TF.cross_entropy, (x, y)).matvec(v), hv),
        "autograd HVP": (autograd_hvp, hv),
        "eigenthings HVP": (eigenthings_hvp, hv),
        "curvlinops HVP": (lambda: curvlinops("Hessian"), hv),
        "symgen GGN": (lambda: GGNOperator(model, TF.cross_entropy, (x, y)).matvec(v), gv),
        "curvlinops GGN": (lambda: curvlinops("GGN"), gv),
    }
    out: dict[str, float | str] = {}
    for name, (fn, ref_out) in tools.items():
        try:
            out[name] = rel(fn(), ref_out)
        except Exception as e:  # noqa: BLE001 (a peer missing or failing: said, not fatal)
            out[name] = f"n/a ({type(e).__name__})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 10, 50], help="SGD steps from the seeded init")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from symgen.data import load_dataset
    from symgen.models import bn_cnn

    x, y = load_dataset("digits", "train")
    x, y = x[: args.batch], y[: args.batch]
    print(f"digits batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, load {os.getloadavg()}")
    print("max |error| / max |float64 product|, one random v per model; flips: float32 vs float64 forward")
    for name, build in (("BN CNN (ReLU, max-pool)", lambda: bn_cnn((1, 8, 8), 10, 39)), ("smooth twin", smooth_twin)):
        for steps in args.steps:
            torch.manual_seed(args.seed)
            model = trained(build(), x, y, steps)
            (relu, pool, total), (relu_s, pool_s, _) = kinks(model, x), kinks(model, x, fast=True)
            errs = errors(model, x, y, args.seed + 1)
            flips = (
                f"ReLU signs flipped {relu} (symgen's forward: {relu_s}) of {total}, max-pool winners changed "
                f"{pool} (symgen's: {pool_s})"
                if total
                else "no kinks"
            )
            print(f"{name}, {steps} steps: {flips}")
            print("   " + "  ".join(f"{k} {e:.1e}" if isinstance(e, float) else f"{k} {e}" for k, e in errs.items()))


if __name__ == "__main__":
    main()
