"""Experiment ``inductive-bias`` (claim C4.5): locality beats the curse of dimensionality.

Teacher-student kernel regression in the set-up of Favero, Cagnetta & Wyart (arXiv 2106.08619): inputs drawn
uniformly in the hypercube [0, 1]^d, read as a ring of d pixels (periodic boundaries); the teacher is a
Gaussian random field whose covariance is the *local* Laplacian kernel of filter size t, the average over the
d windows of t adjacent pixels of ``exp(-|x_p - y_p| / t)``; the students are ridgeless kernel regressors with
the local Laplacian kernel of filter size s >= t and with the fully-connected Laplacian ``exp(-|x - y|)`` on
all d pixels (:mod:`symgen.experiments.inductive_bias_kernels`). The test error (MSE on a fixed test set per
draw) falls as P^-beta; beta is fitted on P >= ``fit_min`` (quick: 512-4096; full: 1024-16384), the smaller P
are kept for the figures. Per draw every kernel comes from one pass over the pairs, and one float64 Cholesky
of each student's largest training kernel serves every (nested) P; the student with s = t reuses the
teacher's factor.

Predicted exponents (arXiv 2106.08619, with the Laplacian's cusp exponent alpha_t = 1): local student
beta = alpha_t / s = 1/s, independent of d; fully-connected student beta = alpha_t / d = 1/d.

The claims, their thresholds and where the protocol differs from the paper's: docs/claims.md.

Claim C4.5, thresholds fixed before the first run:
- C4.5-local: for every s, the exponents at every d agree with the one at the smallest d within the sum of
  their 95% half-widths or within 20% of it; and at the largest d the smallest s has a larger exponent than
  the largest s by more than the sum of their half-widths.
- C4.5-fc: the fully-connected exponent falls with d: its mean decreases from each d to the next, and
  beta_FC(d_min) - beta_FC(d_max) exceeds the sum of their half-widths.
- C4.5-gap: at the largest d, beta_local(s) - beta_FC > half-width(local) + half-width(FC) for every s.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, num_threads
from symgen.experiments.inductive_bias_kernels import patch_laplace_kernels, uniform_cube
from symgen.report import pyplot, save_figure

__all__ = ["Config", "EXPERIMENT", "curve_trial", "run", "check_claims", "figures"]


class Config(ExperimentConfig):
    """Settings of ``inductive-bias``; defaults are the full setting, ``--quick`` shrinks them."""

    teacher_filter: int = Field(2, ge=1)
    student_filters: list[int] = Field(default_factory=lambda: [2, 4])
    dims: list[int] = Field(default_factory=lambda: [9, 18, 36, 72])  # d = 9: the paper's default
    train_sizes: list[int] = Field(default_factory=lambda: [2**k for k in range(7, 15)])  # 128 .. 16384
    fit_min: int = Field(1024, ge=1)  # beta is fitted on P >= fit_min (the asymptotic range); smaller P: figures
    num_test: int = Field(1024, ge=1)
    num_draws: int = Field(8, ge=2)
    teacher_jitter: float = Field(1e-10, ge=0)  # x mean diagonal, added to the teacher's kernel to sample it
    confidence: float = Field(0.95, gt=0, lt=1)
    relative_tolerance: float = Field(0.2, ge=0)  # C4.5-local: spread of beta_s over d allowed besides the CIs

    @field_validator("student_filters", "dims", "train_sizes")
    @classmethod
    def _sorted_positive(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("must list integers >= 1")
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if min(self.student_filters) < self.teacher_filter:
            raise ValueError(
                f"student_filters {self.student_filters} must be >= teacher_filter "
                f"{self.teacher_filter} (the regime s >= t of arXiv 2106.08619)"
            )
        if max(self.student_filters) > min(self.dims):
            raise ValueError(
                f"student filters {self.student_filters} must fit in the smallest dimension {min(self.dims)}"
            )
        if len(self.dims) < 2 or len(self.train_sizes) < 2:
            raise ValueError("dims and train_sizes need at least two values each")
        if sum(p >= self.fit_min for p in self.train_sizes) < 2:
            raise ValueError(f"fit_min {self.fit_min} leaves fewer than two train_sizes {self.train_sizes} to fit")
        return self


def _draw(item: dict, g: torch.Generator) -> dict[str, list[float]]:
    """One draw at one d: fresh inputs and teacher, then the test errors of every student at every size."""
    from symgen.ntk.learning_curves import cholesky_jittered, nested_test_errors

    d, t, filters = item["d"], item["teacher_filter"], item["student_filters"]
    sizes, pmax = item["train_sizes"], max(item["train_sizes"])
    device = torch.device(item.get("device", "cpu"))
    # the first pmax points train (nested: the first P), the last num_test test; drawn on the CPU generator
    x = uniform_cube(pmax + item["num_test"], d, g)
    kernels = patch_laplace_kernels(x, None, sorted({t, *filters}), fc=True)  # every kernel in one pass
    k = kernels.pop(f"local_s{t}").to(device)
    k.diagonal().add_(item["teacher_jitter"] * float(k.diagonal().mean()))
    chol, _ = cholesky_jittered(k)
    y = chol @ torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(device)
    y_train, y_test = y[:pmax], y[pmax:]
    out: dict[str, list[float]] = {}
    # past its factorization a kernel is read only in its test rows: those are kept, the (N, N) matrix is
    # freed before the solves (peak memory: the kernels still to use plus one factor and one solve buffer)
    k_test = k[pmax:, :pmax].clone()
    del k
    if t in filters:  # the teacher's own kernel: the leading block of its factor is the training kernel's
        out[f"local_s{t}"], _ = nested_test_errors(None, y_train, k_test, y_test, sizes, factor=chol)
    del chol
    for name in [f"local_s{s}" for s in filters if s != t] + ["fc"]:
        kk = kernels.pop(name).to(device)
        factor, _ = cholesky_jittered(kk[:pmax, :pmax])  # what nested_test_errors would compute
        k_test = kk[pmax:, :pmax].clone()
        del kk
        out[name], _ = nested_test_errors(None, y_train, k_test, y_test, sizes, factor=factor)
        del factor
    return out


def curve_trial(item: dict) -> dict:
    """Learning curves at one input dimension d: the local students (each s) and the fully-connected one.

    Per draw: fresh inputs x uniform in [0, 1]^d (the first max(P) train, nested; ``num_test`` fixed test
    points), every Laplacian kernel on all of them in one pass, the teacher sampled with one float64 Cholesky
    of its kernel, then per student one Cholesky of its largest training kernel, reused for every P
    (:func:`symgen.ntk.learning_curves.nested_test_errors`). The exponent is fitted on P >= ``fit_min``.

    Args:
        item: the trial's settings (input dimension ``d``, filter sizes, train sizes, seed, ...).

    Returns:
        ``d`` and the learning curves, one per student.
    """
    from symgen.ntk.learning_curves import curve_from_errors
    from symgen.rng import as_generator

    g = as_generator(item["seed"])
    rows: dict[str, list[list[float]]] = {}
    with num_threads(item.get("threads")):
        for _ in range(item["num_draws"]):
            for name, errs in _draw(item, g).items():
                rows.setdefault(name, []).append(errs)
    names = [f"local_s{s}" for s in item["student_filters"]] + ["fc"]
    curves = {
        name: curve_from_errors(
            item["train_sizes"], rows[name], confidence=item["confidence"], fit_min=item["fit_min"]
        ).to_dict()
        for name in names
    }
    return {"d": item["d"], "curves": curves}


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    items = [
        dict(
            d=d,
            teacher_filter=config.teacher_filter,
            student_filters=config.student_filters,
            train_sizes=config.train_sizes,
            num_test=config.num_test,
            num_draws=config.num_draws,
            fit_min=config.fit_min,
            teacher_jitter=config.teacher_jitter,
            confidence=config.confidence,
            seed=config.seed * 1000 + d,
            threads=None,  # the Choleskys and solves take every core in process (a pool's workers run one thread)
            device=config.device,
        )
        for d in config.dims
    ]
    trials = ctx.map(curve_trial, items, desc="C4.5 dimensions")
    by_d = {str(t["d"]): t["curves"] for t in trials}
    for t in trials:
        ctx.log(claim="C4.5", d=t["d"], **{f"beta_{k}": v["beta"] for k, v in t["curves"].items()})
    return jsonable(
        {
            "dims": config.dims,
            "student_filters": config.student_filters,
            "teacher_filter": config.teacher_filter,
            "by_d": by_d,
        }
    )


def _half(c: dict) -> float:
    lo, hi = c["beta_ci"]
    return (hi - lo) / 2 if lo is not None and hi is not None else math.inf


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    dims, filters, by_d = result["dims"], result["student_filters"], result["by_d"]
    d0, dmax = str(dims[0]), str(dims[-1])
    table = {
        k: {d: {"beta": by_d[str(d)][k]["beta"], "ci": by_d[str(d)][k]["beta_ci"]} for d in dims}
        for k in [f"local_s{s}" for s in filters] + ["fc"]
    }
    predicted = {**{f"local_s{s}": 1.0 / s for s in filters}, "fc": {d: 1.0 / d for d in dims}}

    ok_d, notes = True, []
    for s in filters:
        ref = by_d[d0][f"local_s{s}"]
        for d in dims[1:]:
            c = by_d[str(d)][f"local_s{s}"]
            diff = abs(c["beta"] - ref["beta"])
            if not (diff <= _half(c) + _half(ref) or diff <= config.relative_tolerance * abs(ref["beta"])):
                ok_d = False
                notes.append(f"s={s}: beta changes from {ref['beta']:.3f} (d={d0}) to {c['beta']:.3f} (d={d})")
    lo_s, hi_s = by_d[dmax][f"local_s{filters[0]}"], by_d[dmax][f"local_s{filters[-1]}"]
    ok_s = len(filters) < 2 or lo_s["beta"] - hi_s["beta"] > _half(lo_s) + _half(hi_s)
    if not ok_s:
        notes.append(
            f"at d={dmax} beta(s={filters[0]}) - beta(s={filters[-1]}) = {lo_s['beta'] - hi_s['beta']:.3f} "
            "is within the intervals"
        )
    s_gap = f"beta_s{filters[0]}_minus_s{filters[-1]}_at_d{dmax}"
    claims = [
        Claim(
            id="C4.5-local",
            statement="the local student's exponent depends on its filter size s and not on the input dimension d",
            measured={
                **{k: v for k, v in table.items() if k != "fc"},
                s_gap: lo_s["beta"] - hi_s["beta"],
                "predicted": {k: v for k, v in predicted.items() if k != "fc"},
            },
            headline=s_gap,
            paper=1.0 / filters[0] - 1.0 / filters[-1],
            threshold={
                "rule": (
                    f"for each s, |beta(d) - beta(d={d0})| <= sum of 95% half-widths or <= "
                    f"{config.relative_tolerance} beta(d={d0}); at d={dmax} beta(s_min) - beta(s_max) > sum of "
                    "half-widths"
                ),
                s_gap: _half(lo_s) + _half(hi_s),  # the headline's bar
            },
            passed=bool(ok_d and ok_s),
            note="; ".join(notes),
        )
    ]

    fc = [by_d[str(d)]["fc"] for d in dims]
    mono = all(a["beta"] > b["beta"] for a, b in zip(fc[:-1], fc[1:], strict=True))
    drop = fc[0]["beta"] - fc[-1]["beta"]
    ok_fc = mono and drop > _half(fc[0]) + _half(fc[-1])
    claims.append(
        Claim(
            id="C4.5-fc",
            statement="the fully-connected student's exponent falls with the input dimension d (curse of dimensionality)",
            measured={**table["fc"], "beta_drop": drop, "predicted": predicted["fc"]},
            headline="beta_drop",
            paper=1.0 / dims[0] - 1.0 / dims[-1],
            threshold={
                "rule": "mean beta_FC decreases from each d to the next and beta_FC(d_min) - beta_FC(d_max) > sum "
                "of 95% half-widths",
                "beta_drop": _half(fc[0]) + _half(fc[-1]),
            },
            passed=bool(ok_fc),
            note=""
            if ok_fc
            else (
                f"beta_FC by d: {[round(c['beta'], 3) for c in fc]}; drop {drop:.3f} vs half-widths "
                f"{_half(fc[0]):.3f} + {_half(fc[-1]):.3f}"
            ),
        )
    )

    gaps, ok_gap = {}, True
    f_max = by_d[dmax]["fc"]
    for s in filters:
        c = by_d[dmax][f"local_s{s}"]
        gaps[f"s{s}"] = {"gap": c["beta"] - f_max["beta"], "sum_half_widths": _half(c) + _half(f_max)}
        ok_gap &= gaps[f"s{s}"]["gap"] > gaps[f"s{s}"]["sum_half_widths"]
    claims.append(
        Claim(
            id="C4.5-gap",
            statement=f"at the largest d = {dmax}, local students learn with a larger exponent than the fully-connected one",
            measured={**gaps, "predicted": {f"s{s}": 1.0 / s - 1.0 / dims[-1] for s in filters}},
            headline=f"s{filters[-1]}.gap",
            paper=1.0 / filters[-1] - 1.0 / dims[-1],
            threshold={
                "rule": "beta_local(s) - beta_FC > half-width(local) + half-width(FC) (95%) for every s",
                f"s{filters[-1]}.gap": gaps[f"s{filters[-1]}"]["sum_half_widths"],
            },
            passed=bool(ok_gap),
            note="" if ok_gap else "a local exponent is not above the FC one beyond the intervals",
        )
    )
    return claims


def figures(result: dict, outdir: Path) -> list[Path]:
    """Draw the experiment's figures.

    Args:
        result: ``run``'s output.
        outdir: directory for the PNG files.

    Returns:
        the paths written.
    """
    plt = pyplot()
    outdir = Path(outdir)
    dims, by_d = result["dims"], result["by_d"]
    names = list(by_d[str(dims[0])])
    fig, axes = plt.subplots(1, len(dims), figsize=(3.6 * len(dims), 3.4), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        for name in names:
            c = by_d[str(d)][name]
            p = np.array(c["sizes"], dtype=float)
            (line,) = ax.loglog(p, c["mean_errors"], "o-", ms=3, label=f"{name} (beta {c['beta']:.2f})")
            fit = np.array(c.get("fit_sizes", c["sizes"]), dtype=float)  # the fitted power law on its range
            ax.loglog(fit, np.exp(c["log_amplitude"]) * fit ** -c["beta"], "--", lw=1, color=line.get_color())
        ax.set_title(f"d = {d} (dashed: fit)")
        ax.set_xlabel("training-set size P")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test MSE")
    fig.suptitle(f"C4.5: local teacher (t = {result['teacher_filter']}), local vs fully-connected students")
    paths = [save_figure(fig, outdir / "inductive_bias_learning_curves.png")]

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in names:
        betas = [by_d[str(d)][name]["beta"] for d in dims]
        err = [_half(by_d[str(d)][name]) for d in dims]
        ax.errorbar(dims, betas, yerr=err, marker="o", capsize=3, label=name)
    for s in result["student_filters"]:
        ax.axhline(1.0 / s, ls=":", lw=1, color="gray")
    ax.plot(dims, [1.0 / d for d in dims], "k--", lw=1, label="1/d (FC prediction)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input dimension d")
    ax.set_ylabel("exponent beta (95% CI)")
    ax.set_title("C4.5: exponents; dotted: 1/s predictions")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, outdir / "inductive_bias_exponents.png"))
    return paths


EXPERIMENT = Experiment(
    name="inductive-bias",
    title="Locality defeats the curse of dimensionality: local vs fully-connected NTK students",
    paper="arXiv 2106.08619 (Favero, Cagnetta & Wyart); arXiv 2307.02693 (Kempe et al.)",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick={
        "dims": [9, 18, 36],
        "train_sizes": [64, 128, 256, 512, 1024, 2048, 4096],
        "fit_min": 512,
        "num_test": 512,
        # the full protocol's 8 draws (fixed before its first run); 4 left 95% bars as wide as the s = 4 gap
        # (session 10; docs/claims.md)
        "num_draws": 8,
    },
    claims=("C4.5-local", "C4.5-fc", "C4.5-gap"),
)
