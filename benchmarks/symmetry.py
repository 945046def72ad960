"""Scale-symmetry detection at model scale: candidates confirmed with shared reference passes (symgen now)
vs each candidate running its own reference passes (before issue 13), in one process, same verdicts.

    python benchmarks/symmetry.py [--models resnet20,vit] [--batch 4] [--threads 2]

resnet18 (11M parameters) is accepted too but takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import torch

import symgen.symmetry as sym
from symgen import models

BUILD = {"resnet20": lambda: models.resnet20(), "resnet18": lambda: models.resnet18(), "vit": lambda: models.vit()}


def timed(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, sym.ScaleSymmetryReport]:
    t = time.perf_counter()
    report = sym.find_scale_symmetries(model, x, generator=0)
    return time.perf_counter() - t, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,vit")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    confirm = sym._confirm
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = BUILD[name]()
        x = torch.randn(args.batch, 3, 32, 32)
        timed(model, x[:2])  # warm-up (first-call costs would favour whichever runs second)
        sym._confirm = lambda *a, **k: confirm(*a[:5])  # the per-candidate reference passes of before
        try:
            t_old, old = timed(model, x)
        finally:
            sym._confirm = confirm
        t_new, new = timed(model, x)
        same = ([s.to_dict() for s in new.symmetries] == [s.to_dict() for s in old.symmetries]
                and [s.check for s in new.symmetries] == [s.check for s in old.symmetries])
        params = sum(p.numel() for p in model.parameters())
        print(f"{name} ({params / 1e6:.2f}M params, batch {args.batch}): shared refs {t_new:.2f} s, "
              f"per-candidate {t_old:.2f} s, speed-up {t_old / t_new:.2f}x, {len(new.symmetries)} symmetries, "
              f"same verdicts and checks: {same}")


if __name__ == "__main__":
    main()
