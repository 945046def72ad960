"""Sections that evaluate the model on test inputs: accuracy and loss, invariance under a group action,
PGD robust accuracy (arXiv 1706.06083)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.audit.limits import AuditLimits
from symgen.audit.result import SectionResult
from symgen.audit.sections.common import batch_means, check_logits, logits, subsample
from symgen.errors import ShapeError
from symgen.stats import binomial_stderr, mean_stderr

__all__ = ["performance", "stream_stats", "invariance", "robustness"]


def performance(sec: SectionResult, model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                lim: AuditLimits, gen: torch.Generator, same: bool, group: Any = None) -> None:
    """Accuracy (binomial standard error) and mean cross-entropy (sample standard error) per split.

    The test split is streamed whole (``test_samples`` None), batch by batch through a DataLoader:
    forward passes are cheap, so the budget never cuts what the headline accuracy is measured on.
    The training split is a subsample of ``eval_samples`` (the budget). With a process group each
    rank streams its shard (``DistributedSampler(shuffle=False)``) and the float64 sums are added.
    """
    splits = [("test", test, lim.test_samples)] if same else [("train", train, lim.eval_samples),
                                                              ("test", test, lim.test_samples)]
    for split, (x, y), k in splits:
        idx = subsample(x.shape[0], k, gen)
        if idx.numel() < x.shape[0]:
            sec.skipped.append(f"{split}: {idx.numel()} of {x.shape[0]} samples (budget)")
        n, correct, loss_sum, loss_sq = stream_stats(model, x[idx] if idx.numel() < x.shape[0] else x,
                                                     y[idx] if idx.numel() < x.shape[0] else y,
                                                     lim.batch_size, group, split)
        acc = correct / n
        mean = loss_sum / n
        var = max(loss_sq - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.inf
        sec.add(f"{split}_accuracy", acc, binomial_stderr(acc, n),
                f"{n} samples" + (", the whole split, streamed" if n == x.shape[0] else ""))
        sec.add(f"{split}_loss", mean, math.sqrt(var / n), "cross-entropy")
        sec.samples = (sec.samples or 0) + n
    if same:
        sec.skipped.append("train split: data given as one (x, y) pair, so only one split is measured")


def stream_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, group: Any = None,
                 split: str = "test") -> tuple[int, float, float, float]:
    """(samples, correct, loss sum, squared-loss sum) over ``(x, y)`` streamed through a DataLoader in
    batches of ``batch_size``; sums in float64, all-reduced over ``group`` (each rank its shard)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from symgen import distributed

    data = TensorDataset(x, y)
    order: Any = None
    if group is not None:
        r, w = distributed.rank(group), distributed.world_size(group)
        sampler = DistributedSampler(data, num_replicas=w, rank=r, shuffle=False, drop_last=False)
        # DistributedSampler pads the last round with repeated samples; drop them so each sample counts once.
        order = [i for j, i in enumerate(sampler) if r + j * w < len(data)]
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, sampler=order)
    sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for xb, yb in loader:
            try:
                out = model(xb)
            except RuntimeError as e:
                raise ShapeError(f"the model failed on {split} inputs of shape {tuple(x.shape[1:])} "
                                 f"({str(e).splitlines()[0][:200]}); check that --data is the data the model "
                                 "was built for.") from None
            check_logits(out, xb, yb)
            losses = F.cross_entropy(out, yb, reduction="none").double().cpu()
            sums += torch.stack([torch.tensor(float(xb.shape[0]), dtype=torch.float64),
                                 (out.argmax(1) == yb).sum().double().cpu(), losses.sum(), (losses * losses).sum()])
    sums = distributed.all_reduce_sum(sums, group)
    n, correct, loss_sum, loss_sq = sums.tolist()
    return int(n), correct, loss_sum, loss_sq


def invariance(sec: SectionResult, model: nn.Module, action: Any, test: tuple[Tensor, Tensor],
               lim: AuditLimits, gen: torch.Generator) -> None:
    """OSP, symmetric KL, logit deviation and orbit accuracy over the group orbits of test inputs
    (Nordenfors & Flinth, arXiv 2410.01452); standard errors by batch means."""
    from symgen.metrics import invariance_metrics, orbit_outputs

    x, y = test
    idx = subsample(x.shape[0], lim.invariance_samples, gen)
    if idx.numel() < x.shape[0]:
        sec.skipped.append(f"{idx.numel()} of {x.shape[0]} test samples (budget)")
    xs, ys = x[idx], y[idx]
    with torch.no_grad():
        orbit = orbit_outputs(model, action, xs, chunk_size=max(1, lim.batch_size // action.group.order))
    full = invariance_metrics(orbit, ys)
    # Standard errors by batch means: the metrics of 16 disjoint batches of samples.
    parts = [invariance_metrics(orbit[:, b], ys[b]) for b in batch_means(idx.numel(), 16)]

    def se(key: str) -> float:
        return mean_stderr([p[key] for p in parts])[1]

    order = int(full["group_order"])
    sec.add("osp", full["osp"], se("osp"), f"orbit same predictions, 1..{order}")
    sec.add("kl", full["kl"], se("kl"), "symmetric KL, mean over g and x")
    sec.add("kl_max", full["kl_max"], None, "max over g and x")
    sec.add("logit_deviation", full["logit_deviation"], se("logit_deviation"), "||f(gx) - f(x)|| / ||f(x)||")
    sec.add("orbit_accuracy", full["orbit_accuracy"], se("orbit_accuracy"), "accuracy over all g x")
    # Per group element: agreement with the identity and KL, from the 2-element orbits {e, g}.
    per_g = [invariance_metrics(orbit[[0, g]]) for g in range(order)]
    sec.details.update(group=str(action), order=order,
                       agreement=[p["osp"] - 1.0 for p in per_g], kl_per_element=[p["kl"] for p in per_g])
    sec.samples = idx.numel()


def robustness(sec: SectionResult, model: nn.Module, test: tuple[Tensor, Tensor], lim: AuditLimits,
               gen: torch.Generator, seed: int) -> None:
    """Accuracy under L_inf PGD at eps = fractions of the input range (arXiv 1706.06083), binomial errors."""
    from symgen.robust import accuracy, pgd

    x, y = test
    idx = subsample(x.shape[0], lim.pgd_samples, gen)
    if idx.numel() < x.shape[0]:
        sec.skipped.append(f"{idx.numel()} of {x.shape[0]} test samples (budget)")
    xs, ys = x[idx], y[idx]
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    # Inputs in [0, 1] are images: keep adversarial pixels in range. Other data is left unclamped.
    clamp = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else None
    clean = accuracy(logits(model, xs, lim.batch_size), ys)
    curve = []
    for frac in lim.pgd_eps:
        eps = frac * span
        x_adv = pgd(model, xs, ys, eps, steps=lim.pgd_steps, norm="linf", clamp=clamp, loss="ce",
                    batch_size=lim.batch_size, generator=seed)
        acc = accuracy(logits(model, x_adv, lim.batch_size), ys)
        err = binomial_stderr(acc, idx.numel())
        curve.append({"eps_fraction": frac, "eps": eps, "accuracy": acc, "stderr": err})
        sec.add(f"robust_accuracy@{frac:g}", acc, err,
                f"L_inf eps = {eps:.4g} ({frac:g} of the input range), {lim.pgd_steps} PGD steps")
    sec.add("clean_accuracy", clean, binomial_stderr(clean, idx.numel()), "on the attacked subsample")
    sec.details.update(curve=curve, clean=clean, clamp=clamp, span=span)
    sec.samples = idx.numel()
