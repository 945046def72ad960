"""Scale-symmetry detection at model scale: candidates confirmed in groups (symgen now: one pass per group,
failing groups split, reference passes shared) vs one candidate at a time (before issue 13 section 3), in
one process, same verdicts.

    python benchmarks/symmetry.py [--models resnet18-0.7m,resnet20,vit] [--batch 4] [--threads 2]

resnet18-0.7m is the ResNet-18 layout at a quarter of the width (16/32/64/128 channels, 0.70M parameters),
the model of issue 13's 44 s measurement; resnet18 (11M parameters) is accepted too but takes minutes.
"""

from __future__ import annotations

import argparse
import time

import torch

import symgen.symmetry as sym
from symgen import models

BUILD = {
    "resnet18-0.7m": lambda: models.ResNet((2, 2, 2, 2), (16, 32, 64, 128), 10, 3, shortcut="B"),
    "resnet20": lambda: models.resnet20(),
    "resnet18": lambda: models.resnet18(),
    "vit": lambda: models.vit(),
}


def timed(model: torch.nn.Module, x: torch.Tensor, grouped: bool) -> tuple[float, sym.ScaleSymmetryReport]:
    sym._GROUP_CONFIRMATION = grouped
    try:
        t = time.perf_counter()
        report = sym.find_scale_symmetries(model, x, generator=0)
        return time.perf_counter() - t, report
    finally:
        sym._GROUP_CONFIRMATION = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18-0.7m,resnet20,vit")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = BUILD[name]()
        x = torch.randn(args.batch, 3, 32, 32)
        timed(model, x[:2], True)  # warm-up (first-call costs would favour whichever runs second)
        t_new, new = timed(model, x, True)
        t_old, old = timed(model, x, False)
        same = (
            [s.weight for s in new.symmetries] == [s.weight for s in old.symmetries]
            and new.rejected.keys() == old.rejected.keys()
            and new.redundant_biases == old.redundant_biases
            and new.not_invariant == old.not_invariant
            and new.unanalysed == old.unanalysed
        )
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name} ({params / 1e6:.2f}M params, batch {args.batch}, {args.threads} threads): grouped "
            f"{t_new:.2f} s, one candidate at a time {t_old:.2f} s, speed-up {t_old / t_new:.2f}x, "
            f"{len(new.symmetries)} symmetries, same verdicts: {same} (target < 5 s for resnet18-0.7m)"
        )


if __name__ == "__main__":
    main()
