"""The empirical NTK section: effective rank, condition number and kernel-target alignment on test
subsamples (arXiv 1806.07572, 2307.02693)."""

from __future__ import annotations

import math

import torch
from torch import nn

from symgen.audit.limits import AuditLimits
from symgen.audit.registry import Clock
from symgen.audit.result import SectionResult
from symgen.audit.sections.common import stream
from symgen.audit.splits import Split
from symgen.errors import ShapeError
from symgen.stats import mean_stderr

__all__ = ["ntk"]


def ntk(
    sec: SectionResult, model: nn.Module, test: Split, lim: AuditLimits, seed: int, clock: Clock | None = None
) -> None:
    """Effective rank exp(H(lambda / sum lambda)) (Roy & Vetterli 2007), condition number lambda_max / lambda_min
    and kernel-target alignment <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F) (Cristianini et al. 2001) of the
    output-summed empirical NTK, on disjoint random subsamples of the test set.

    Args:
        sec: the section's result, filled in.
        model: the classifier.
        test: the test split.
        lim: the limits.
        seed: the audit's integer seed (stream ``ntk``).
        clock: checked between subsamples; past its deadline the section keeps those it has (said so).
    """
    from symgen.labels import centred_one_hot
    from symgen.ntk.empirical import empirical_ntk_fn
    from symgen.ntk.regression import kernel_eigh

    n = test.num_data
    per = (
        min(lim.ntk_num_data, n // max(1, lim.ntk_subsamples))
        if n >= 2 * lim.ntk_subsamples
        else min(lim.ntk_num_data, n)
    )
    reps = max(1, min(lim.ntk_subsamples, n // max(per, 1)))
    if per < 2:
        raise ShapeError(f"the NTK section needs at least 2 test samples; got {n}.")
    perm = torch.randperm(n, generator=stream(seed, "ntk"))
    x, y = test.take(perm[: reps * per])  # the subsamples, gathered in one pass
    num_classes = test.num_classes
    kernel = empirical_ntk_fn(model, output="trace")  # one kernel: its method is chosen once per shape
    ranks, conds, aligns, spectra = [], [], [], []
    for r in range(reps):
        if r > 0 and clock is not None and clock.expired():
            clock.stop(f"NTK from {r} of {reps} subsamples")
            break
        idx = torch.arange(r * per, (r + 1) * per, device=x.device)
        k = kernel(x[idx]).double()
        evals = kernel_eigh(k)[0].clamp_min(0.0)
        p = evals / evals.sum()
        ranks.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
        conds.append(float(evals[0] / evals[-1]) if float(evals[-1]) > 0 else float("inf"))
        t = centred_one_hot(y[idx], num_classes, dtype=torch.float64).to(k.device)
        yy = t @ t.T
        aligns.append(float((k * yy).sum() / (k.norm() * yy.norm())))
        spectra.append(evals.cpu().tolist())
    reps = len(ranks)  # fewer when the clock stopped it

    def agg(v: list[float]) -> tuple[float, float | None]:
        # One subsample has no spread to measure: no standard error rather than an infinite one.
        if not all(math.isfinite(a) for a in v):
            return float("inf"), None
        mean, se = mean_stderr(v)
        return mean, (se if len(v) > 1 else None)

    note = f"{reps} disjoint subsamples of {per} test inputs, output-summed NTK (eval mode)"
    sec.add("effective_rank", *agg(ranks), note=f"exp(entropy of normalized eigenvalues), of {per}; {note}")
    sec.add(
        "log10_condition_number",
        *agg([math.log10(c) if math.isfinite(c) else float("inf") for c in conds]),
        note="log10(lambda_max / lambda_min)",
    )
    sec.add("target_alignment", *agg(aligns), note="<K, YY^T> / (|K| |YY^T|), Y centred one-hot")
    sec.details.update(
        spectra=spectra, effective_rank=ranks, condition_number=conds, alignment=aligns, subsample=per, subsamples=reps
    )
    if reps < lim.ntk_subsamples or per < lim.ntk_num_data:
        sec.skipped.append(
            f"{reps} subsample(s) of {per} inputs instead of {lim.ntk_subsamples} of "
            f"{lim.ntk_num_data}: the test set has {n}"
        )
    if reps * per < n:
        sec.skipped.append(
            f"the kernel on all {n} test inputs: its cost grows as N^2 x outputs x parameters; "
            f"the budget allows {lim.ntk_subsamples} x {lim.ntk_num_data}"
        )
    sec.samples = reps * per
