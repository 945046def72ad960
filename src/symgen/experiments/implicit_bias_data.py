"""Data of experiment ``implicit-bias``: G-invariant binary classification sets and their group actions.

Cyclic shifts of 1D signals (C_n) and the digits 8x8 images under rotations by 90 degrees (C4) or the
dihedral group (D4). The claims checked on them: docs/claims.md.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from symgen.errors import ConfigError

__all__ = ["DATASETS", "group_action", "make_dataset"]

Dataset = Literal["cyclic", "digits-c4", "digits-d4"]
DATASETS: tuple[Dataset, ...] = ("cyclic", "digits-c4", "digits-d4")


def group_action(dataset: str, cfg: dict) -> tuple[Any, tuple[int, ...]]:
    """The group action of ``dataset`` and the shape of one input.

    Args:
        dataset: one of ``DATASETS``.
        cfg: the experiment's config as a dict (``cyclic_length``, ``cyclic_channels``).

    Returns:
        ``(action, shape)``: a :mod:`symgen.groups` action and the input shape it acts on.
    """
    from symgen.groups import CyclicShift, ImageDihedral, ImageRotation90

    if dataset == "cyclic":
        return CyclicShift(cfg["cyclic_length"]), (cfg["cyclic_channels"], cfg["cyclic_length"])
    if dataset == "digits-c4":
        return ImageRotation90(), (1, 8, 8)
    if dataset == "digits-d4":
        return ImageDihedral(), (1, 8, 8)
    raise ConfigError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}.")


def make_dataset(dataset: str, cfg: dict, seed: int, n_train: int) -> dict[str, Tensor]:
    """G-invariant binary data: a training pool of ``n_train`` points (nested over sizes) and a test set.

    cyclic: x ~ N(0, I) on (channels, length), y = sign <w*, x> with w* = P_G w random (invariant),
    keeping |<w*, x>| >= margin. digits: the pair (a, b) (y = +1 for a), each image moved by a
    uniformly random group element (an invariant distribution), centred by the invariant mean.

    Args:
        dataset: one of ``DATASETS``.
        cfg: the experiment's config as a dict.
        seed: seed of the draw (the same pool for every model at this seed).
        n_train: size of the training pool.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}`` in the config's dtype, labels in {-1, +1}.
    """
    action, shape = group_action(dataset, cfg)
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(1000 + seed)
    if dataset == "cyclic":
        w = action.orbit(torch.randn(shape, generator=gen, dtype=torch.float64)).mean(0)
        w = w / w.norm()

        def draw(n: int) -> tuple[Tensor, Tensor]:
            chunks, total = [], 0
            while total < n:
                x = torch.randn(4 * n + 16, *shape, generator=gen, dtype=torch.float64)
                s = (x * w).flatten(1).sum(1)
                x = x[s.abs() >= cfg["cyclic_margin"]]
                chunks.append(x)
                total += len(x)
            x = torch.cat(chunks)[:n]
            return x, torch.sign((x * w).flatten(1).sum(1))

        x_tr, y_tr = draw(n_train)
        x_te, y_te = draw(cfg["test_size"])
    else:
        from symgen.data import load_dataset

        a, b = cfg["digits_pair"]
        parts = []
        for split in ("train", "test"):
            x, y = load_dataset("digits", split=split)
            keep = (y == a) | (y == b)
            x, y = x[keep].double(), torch.where(y[keep] == a, 1.0, -1.0).double()
            parts.append((x, y))
        (x_pool, y_pool), (x_te, y_te) = parts
        if n_train > len(x_pool):
            raise ConfigError(
                f"digits pair {a},{b} has {len(x_pool)} training images; train size {n_train} is too big."
            )
        mean = action.orbit(x_pool).mean((0, 1))  # invariant, so centring keeps invariance
        perm = torch.randperm(len(x_pool), generator=gen)[:n_train]
        x_tr, y_tr = x_pool[perm], y_pool[perm]
        x_tr = action.apply_each(torch.randint(0, action.group.order, (n_train,), generator=gen), x_tr) - mean
        x_te = action.apply_each(torch.randint(0, action.group.order, (len(x_te),), generator=gen), x_te) - mean
    return {"x_train": x_tr.to(dtype), "y_train": y_tr.to(dtype), "x_test": x_te.to(dtype), "y_test": y_te.to(dtype)}
