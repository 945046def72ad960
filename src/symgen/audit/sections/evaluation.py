"""Sections that evaluate the model on test inputs: accuracy and loss, invariance under a group action,
PGD robust accuracy (arXiv 1706.06083)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.audit.limits import AuditLimits
from symgen.audit.registry import Clock
from symgen.audit.result import SectionResult
from symgen.audit.sections.common import batch_means, check_logits, logits, stream, stream_seed, subsample
from symgen.audit.splits import Split
from symgen.distributed import Group
from symgen.stats import binomial_stderr, mean_stderr

if TYPE_CHECKING:
    from symgen.groups import GroupAction

__all__ = ["performance", "invariance", "robustness"]


def performance(
    sec: SectionResult,
    model: nn.Module,
    train: Split,
    test: Split,
    lim: AuditLimits,
    seed: int,
    same: bool,
    group: Group = None,
    clock: Clock | None = None,
) -> None:
    """Accuracy (binomial standard error) and mean cross-entropy (sample standard error) per split,
    by :func:`symgen.evaluation.evaluate` (float64 sums, all-reduced over the ranks).

    The test split is streamed whole (``test_num_data`` None), batch by batch: forward passes are
    cheap, so the budget cuts what the headline accuracy is measured on only when the clock runs out
    (a slow model or a loaded machine). Tensors are then streamed in a seeded random order, so the
    samples measured before the deadline are a uniform subsample (a stream keeps its own order, said
    so). The training split is a subsample of ``eval_num_data`` (the budget). With a process group
    each rank evaluates every ``world_size``-th batch and stops at its own deadline (the sums are
    all-reduced once, after the loop).

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        train: the training split.
        test: the test split.
        lim: the limits.
        seed: the audit's integer seed (stream ``performance``).
        same: the data was given as one source (only the test split is measured).
        group: the process group the sums are all-reduced over.
        clock: the section's deadline, looked at between batches (None: none).
    """
    from symgen.evaluation import evaluate

    gen, shuffle = stream(seed, "performance"), stream(seed, "performance_order")
    clock = clock or Clock()
    splits = (
        [("test", test, lim.test_num_data)]
        if same
        else [("train", train, lim.eval_num_data), ("test", test, lim.test_num_data)]
    )
    parts = {}
    for split, data, k in splits:  # the subsamples drawn in this order, whatever the order measured in
        idx = subsample(data.num_data, k, gen)
        if idx.numel() < data.num_data:
            sec.skipped.append(f"{split}: {idx.numel()} of {data.num_data} samples (budget)")
        part = data if idx.numel() == data.num_data else Split(data.take(idx), data.what, data.device, data.dtype)
        parts[split] = (part, torch.randperm(part.num_data, generator=shuffle))
    measured = {}
    for split in sorted(parts, key=lambda s: s != "test"):  # the headline first: the clock may stop the rest
        part, order = parts[split]
        if split != "test" and clock.expired():  # agreed: every rank skips alike (evaluate all-reduces)
            clock.stop(f"{split} accuracy and loss not measured")
            continue
        measured[split] = evaluate(
            model,
            _Until(clock, part, order, lim.batch_size, group),
            loss_fn=_checked_cross_entropy,
            bn_mode="eval",
            process_group=group,
        )
    for split, data, _ in splits:
        if split not in measured:
            continue
        ev, total = measured[split], parts[split][0].num_data
        n, acc = ev.num_data, ev.clean_accuracy
        what = f"{n} samples" + (", the whole split, streamed" if n == data.num_data else "")
        if n < total:
            how = "in random order" if parts[split][0].tensors is not None else "the first of the stream"
            what = f"{n} of {total} samples ({how})"
            clock.stop(f"{split} accuracy and loss from {n} of {total} samples")
        sec.add(f"{split}_accuracy", acc, binomial_stderr(acc, n), what)
        loss = float("nan") if ev.loss is None else ev.loss  # never None: a loss_fn was given
        sec.add(f"{split}_loss", loss, ev.loss_stderr, "cross-entropy")
        sec.samples = (sec.samples or 0) + n
    if same:
        sec.skipped.append("train split: data given as one source, so only one split is measured")


class _Until:
    """This rank's batches of ``part`` (tensors: in ``order``) until ``clock`` says the next would end late.

    A re-iterable (a stream that is not one is gathered into memory by ``BatchStream``). The verdict is
    this rank's own (ranks may hold different numbers of batches): no collective here."""

    def __init__(self, clock: Clock, part: Split, order: Tensor, batch_size: int, group: Group) -> None:
        self.clock, self.part, self.order, self.batch_size, self.group = clock, part, order, batch_size, group

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i, batch in enumerate(self.part.batches(self.batch_size, self.group, self.order)):
            if i > 0 and self.clock.expired(agree=False):
                return
            yield batch
            del batch  # one batch in memory: the stream makes the next while this frame would hold the last


def _checked_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits checked first (one logit per class, finite values)."""
    check_logits(out, out, y)
    return F.cross_entropy(out, y, reduction="none")


def invariance(
    sec: SectionResult,
    model: nn.Module,
    action: GroupAction,
    test: Split,
    lim: AuditLimits,
    seed: int,
    clock: Clock | None = None,
) -> None:
    """OSP, symmetric KL, logit deviation and orbit accuracy over the group orbits of test inputs
    (Nordenfors & Flinth, arXiv 2410.01452); standard errors by batch means.

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        action: the group action on inputs.
        test: the test split.
        lim: the limits.
        seed: the audit's integer seed (stream ``invariance``).
        clock: the section's deadline, looked at between blocks of samples (the subsample is drawn at random,
            so the samples measured before it are a uniform subsample).
    """
    from symgen.metrics import invariance_metrics, orbit_outputs

    clock = clock or Clock()
    gen = stream(seed, "invariance")
    idx = subsample(test.num_data, lim.invariance_num_data, gen)
    if idx.numel() < test.num_data:
        sec.skipped.append(f"{idx.numel()} of {test.num_data} test samples (budget)")
    idx = idx[torch.randperm(idx.numel(), generator=gen)]  # any prefix is a uniform subsample
    xs, ys = test.take(idx)
    chunk = max(1, lim.batch_size // action.group.order)
    outs: list[Tensor] = []
    with torch.no_grad():
        for i, xb in enumerate(xs.split(max(32, chunk))):
            if i > 0 and clock.expired():
                clock.stop(f"orbits of {sum(o.shape[1] for o in outs)} of {idx.numel()} samples")
                break
            outs.append(orbit_outputs(model, action, xb, chunk_size=chunk))
    orbit = torch.cat(outs, dim=1)
    idx, ys = idx[: orbit.shape[1]], ys[: orbit.shape[1]]
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
    sec.details.update(
        group=str(action),
        order=order,
        agreement=[p["osp"] - 1.0 for p in per_g],
        kl_per_element=[p["kl"] for p in per_g],
    )
    sec.samples = idx.numel()


def robustness(
    sec: SectionResult, model: nn.Module, test: Split, lim: AuditLimits, seed: int, clock: Clock | None = None
) -> None:
    """Accuracy under L_inf PGD at eps = fractions of the input range (arXiv 1706.06083), binomial errors.

    ``clock``: checked between attack sizes; past its deadline the larger sizes are not attacked (said so).

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        test: the test split.
        lim: the limits.
        seed: the audit's integer seed (streams ``robustness`` and ``robustness_attack``).
        clock: the section's deadline (None: none).
    """
    from symgen.robust import accuracy, pgd

    idx = subsample(test.num_data, lim.pgd_num_data, stream(seed, "robustness"))
    if idx.numel() < test.num_data:
        sec.skipped.append(f"{idx.numel()} of {test.num_data} test samples (budget)")
    xs, ys = test.take(idx)
    lo, hi = test.bounds
    span = hi - lo if hi > lo else 1.0
    # Inputs in [0, 1] are images: keep adversarial pixels in range. Other data is left unclamped.
    clamp = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else None
    clean = accuracy(logits(model, xs, lim.batch_size), ys)
    curve = []
    for i, frac in enumerate(lim.pgd_eps):
        if i > 0 and clock is not None and clock.expired():
            clock.stop(f"eps {', '.join(f'{e:g}' for e in lim.pgd_eps[i:])} not attacked")
            break
        eps = frac * span
        x_adv = pgd(
            model,
            xs,
            ys,
            eps,
            steps=lim.pgd_steps,
            norm="linf",
            clamp=clamp,
            loss="ce",
            batch_size=lim.batch_size,
            generator=stream_seed(seed, "robustness_attack"),
        )
        acc = accuracy(logits(model, x_adv, lim.batch_size), ys)
        err = binomial_stderr(acc, idx.numel())
        curve.append({"eps_fraction": frac, "eps": eps, "accuracy": acc, "stderr": err})
        sec.add(
            f"robust_accuracy@{frac:g}",
            acc,
            err,
            f"L_inf eps = {eps:.4g} ({frac:g} of the input range), {lim.pgd_steps} PGD steps",
        )
    sec.add("clean_accuracy", clean, binomial_stderr(clean, idx.numel()), "on the attacked subsample")
    sec.details.update(curve=curve, clean=clean, clamp=clamp, span=span)
    sec.samples = idx.numel()
