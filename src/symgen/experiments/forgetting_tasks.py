"""Tasks of experiment ``forgetting``: task A (digits 0-4) and the B tasks, from most to least similar to A.

B tasks: fresh digits of A's classes with labels shifted by one (``relabel``), the same with 25%, 50% or
100% of the pixels permuted (``perm25``, ``perm50``, ``perm100``), rotated by 90 or 180 degrees
(``rot90``, ``rot180``), and the split task, classes 5-9 as labels 0-4 (``split``). The claims checked on
them: docs/claims.md.
"""

from __future__ import annotations

import torch

__all__ = ["TASKS", "make_tasks"]

TASKS = ("relabel", "perm25", "perm50", "perm100", "rot90", "rot180", "split")


def make_tasks(seed: int, n: int, m: int, tasks: list[str]) -> dict:
    """Task A and each task B as (x_train, y_train, x_test, labels_test); inputs centred, ||x||^2 / d = 1.

    Args:
        seed: seed of the shuffles and permutations.
        n: training points per task.
        m: test points per task.
        tasks: names of the B tasks, from ``TASKS``.

    Returns:
        ``{"A": (...), task: (...), ...}``: float64 inputs (n, 64) and integer labels in 0..4.
    """
    from symgen.data import load_dataset
    from symgen.rng import as_generator

    g = as_generator(seed)
    xtr, ytr = load_dataset("digits", "train", generator=0)
    xte, yte = load_dataset("digits", "test", generator=0)
    mean = xtr.reshape(len(xtr), -1).double().mean(0)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1).double() - mean
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12) * 8.0

    def pick(
        x: torch.Tensor, y: torch.Tensor, classes: range, k: int, skip: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero((y >= classes.start) & (y < classes.stop))[:, 0]
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][skip : skip + k]
        return prep(x[idx]), y[idx] - classes.start

    a_tr, a_ytr = pick(xtr, ytr, range(0, 5), n)
    a_te, a_yte = pick(xte, yte, range(0, 5), m)
    out = {"A": (a_tr, a_ytr, a_te, a_yte)}
    perm_all = torch.randperm(64, generator=g)
    for task in tasks:
        if task == "split":
            b_tr, b_ytr = pick(xtr, ytr, range(5, 10), n)
            b_te, b_yte = pick(xte, yte, range(5, 10), m)
        else:  # fresh digits of A's classes (the next n of the same shuffled order), labels shifted by one
            b_tr, b_ytr = pick(xtr, ytr, range(0, 5), n, skip=n)
            b_te, b_yte = a_te.clone(), a_yte.clone()
            b_ytr, b_yte = (b_ytr + 1) % 5, (b_yte + 1) % 5
            if task.startswith("perm"):
                k = round(64 * int(task[4:]) / 100)
                perm = torch.arange(64)
                chosen = perm_all[:k]
                perm[chosen] = chosen[torch.randperm(k, generator=g)]
                b_tr, b_te = b_tr[:, perm], b_te[:, perm]
            elif task.startswith("rot"):
                turns = int(task[3:]) // 90
                b_tr = torch.rot90(b_tr.reshape(-1, 8, 8), turns, (1, 2)).reshape(-1, 64)
                b_te = torch.rot90(b_te.reshape(-1, 8, 8), turns, (1, 2)).reshape(-1, 64)
        out[task] = (b_tr, b_ytr, b_te, b_yte)
    return out
