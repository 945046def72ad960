"""Experiment ``flat-minima``: NSO's gradient estimator (C3.1) and flatness of NSO vs SGD, SAM, ASAM (C3.2).

Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates", arXiv 2306.08553. The
claims, their thresholds, where each threshold comes from and the paper's numbers: docs/claims.md.

The work is split by study: C3.1, the estimator on objectives with a closed-form F
(:mod:`symgen.experiments.flat_minima_estimator`); C3.2, the claim, in the paper's regime, fine-tuning a
pretrained network (:mod:`symgen.experiments.nso_finetune`: the reference code's protocol, every method the
same epochs, the plain optimizer at NSO's gradient evaluations reported beside); and a side result that is
not the claim, SGD, SAM, ASAM and NSO trained from scratch at equal gradient evaluations
(:mod:`symgen.experiments.flat_minima_scratch`). This module holds the config, ``run``, the C3.2 verdict
and the figures. Thresholds of C3.2: NSO's mean trace and top eigenvalue lower than SGD's by at least 17.7%
and 12.8% (the paper's v3 numbers) and its mean test accuracy not below SGD's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from symgen.experiments import nso_finetune as ft
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable
from symgen.experiments.flat_minima_estimator import MAX_Z, estimator_claim, estimator_trial
from symgen.experiments.flat_minima_scratch import summarize, train_trial
from symgen.models import bn_cnn
from symgen.report import pyplot, save_figure

__all__ = [
    "Config",
    "EXPERIMENT",
    "bn_cnn",
    "train_trial",
    "estimator_trial",
    "run",
    "check_claims",
    "figures",
    "OPTIMIZERS",
    "MAX_Z",
]

OptimizerName = Literal["sgd", "sam", "asam", "nso"]
FinetuneMethod = Literal["sgd", "sam", "asam", "nso", "sgd_equal_evals"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "sam", "asam", "nso")
FINETUNE_METHODS: tuple[FinetuneMethod, ...] = ("sgd", "sam", "asam", "nso", "sgd_equal_evals")
LABELS = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "nso": "NSO", "sgd_equal_evals": "SGD (NSO grad evals)"}
PAPER_TRACE_REDUCTION = 0.177  # arXiv 2306.08553 v3 abstract
PAPER_TOP_EIG_REDUCTION = 0.128


class NSOVariant(BaseModel):
    """An extra NSO noise setting, reported for sensitivity only."""

    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(ge=0)
    relative: bool = False

    @property
    def label(self) -> str:
        """The variant's name in tables and figures, e.g. ``nso(sigma=0.1, relative)``."""
        return f"nso(sigma={self.sigma:g}{', relative' if self.relative else ''})"


class Config(ExperimentConfig):
    """Full setting: width-16 CNN, 5 seeds, 60 SGD-epochs of gradient evaluations, finer curvature."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    optimizers: list[OptimizerName] = Field(
        default_factory=lambda: list(OPTIMIZERS),
        min_length=1,
        description="optimizers to train (C3.2 compares nso with sgd; it is checked only when both run)",
    )
    seeds: int = Field(5, ge=1)
    width: int = Field(16, ge=1, description="channels of the first conv (then 2x, 2x)")
    grad_eval_epochs: float = Field(60.0, gt=0, description="budget: gradient evaluations of this many SGD epochs")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    rho_sam: float = Field(0.05, ge=0)
    rho_asam: float = Field(2.0, ge=0)
    nso_sigma: float = Field(0.01, ge=0, description="NSO noise std (absolute unless nso_relative)")
    nso_relative: bool = False
    nso_pairs: int = Field(1, ge=1, description="k antithetic pairs per NSO step (2k gradient evaluations)")
    hessian_samples: int | None = Field(None, ge=1, description="training samples for curvature (None: all)")
    trace_matvecs: int = Field(100, ge=3)
    eig_tol: float = Field(1e-4, gt=0)
    density_steps: int = Field(60, ge=2)
    density_runs: int = Field(2, ge=1)
    noise_sigma: float = Field(0.01, ge=0)
    noise_samples: int = Field(64, ge=2)
    estimator_dim: int = Field(20, ge=2)
    estimator_draws: int = Field(4000, ge=10)
    estimator_sigma: float = Field(0.3, gt=0)
    num_threads: int | None = Field(1, ge=1, description="torch threads per trial (small models run fastest on 1)")
    finetune_optimizers: list[FinetuneMethod] = Field(
        default_factory=lambda: list(FINETUNE_METHODS),
        min_length=1,
        description="C3.2 (fine-tuning, the claim): methods; 'sgd' is the plain base optimizer at equal epochs "
        "(the claim's baseline), 'sgd_equal_evals' the same at NSO's gradient evaluations (side)",
    )
    finetune_seeds: int = Field(5, ge=0, description="C3.2 seeds (pretraining, head and data order per seed)")
    finetune_width: int = Field(16, ge=1)
    pretrain_epochs: int = Field(20, ge=1, description="source task digits 0-4, Adam")
    pretrain_lr: float = Field(1e-3, gt=0)
    finetune_epochs: int = Field(30, ge=1, description="epochs of the regularized methods (reference: 30)")
    finetune_lr: float = Field(1e-4, gt=0, description="Adam (amsgrad) lr of the reference fine-tuning configs")
    finetune_batch_size: int = Field(32, ge=2)
    finetune_weight_decay: float = Field(0.0, ge=0)
    finetune_rho_sam: float = Field(0.01, ge=0, description="reference code's SAM rho for fine-tuning")
    finetune_rho_asam: float = Field(0.1, ge=0, description="no reference value; fixed before the first run")
    nso_variants: list[NSOVariant] = Field(
        default_factory=lambda: [
            NSOVariant(sigma=0.03),
            NSOVariant(sigma=0.1, relative=True),
            NSOVariant(sigma=0.2, relative=True),
        ],
        description="extra NSO noise settings reported beside (sensitivity; not part of the claim)",
    )


QUICK: dict[str, Any] = {
    "seeds": 1,
    "optimizers": ["sgd", "nso"],
    "width": 8,
    "grad_eval_epochs": 10.0,
    "hessian_samples": 256,
    "trace_matvecs": 20,
    "eig_tol": 1e-2,
    "density_steps": 20,
    "density_runs": 1,
    "noise_samples": 8,
    "estimator_draws": 1000,
    "nso_variants": [],
    "finetune_optimizers": ["sgd", "nso", "sgd_equal_evals"],
    "finetune_seeds": 3,
    "finetune_width": 8,
    "pretrain_epochs": 10,
    "finetune_epochs": 15,
}


# ---------------------------------------------------------------------------------------------
# protocol


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    base = {
        k: getattr(config, k)
        for k in (
            "dataset",
            "width",
            "grad_eval_epochs",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "rho_sam",
            "rho_asam",
            "nso_sigma",
            "nso_relative",
            "nso_pairs",
            "hessian_samples",
            "trace_matvecs",
            "eig_tol",
            "density_steps",
            "density_runs",
            "noise_sigma",
            "noise_samples",
            "num_threads",
        )
    }
    base["device"] = config.device
    base["data_seed"] = config.seed
    est = ctx.map(
        estimator_trial,
        [
            {
                "dim": config.estimator_dim,
                "sigma": config.estimator_sigma,
                "draws": config.estimator_draws,
                "seed": config.seed,
            }
        ],
        desc="C3.1 estimator",
    )[0]
    items = []
    for s in range(config.seeds):
        items += [dict(base, optimizer=o, label=o, seed=config.seed + s) for o in config.optimizers]
        items += [
            dict(base, optimizer="nso", label=v.label, nso_sigma=v.sigma, nso_relative=v.relative, seed=config.seed + s)
            for v in config.nso_variants
        ]
    ft_runs = ctx.map(ft.finetune_trial, ft.trial_items(config), desc="C3.2 fine-tuning + curvature")
    for r in ft_runs:
        ctx.log(**{k: v for k, v in r.items() if k != "layer_top_eigs"})
    runs = ctx.map(train_trial, items, desc="from scratch (side result) + curvature")
    for r in runs:
        ctx.log(**{k: v for k, v in r.items() if not k.startswith("density")})
    summary = summarize(runs)
    return jsonable(
        {
            "estimator": est,
            "runs": runs,
            "summary": summary,
            "finetune": {
                "runs": ft_runs,
                "summary": ft.summarize(ft_runs) if ft_runs else {},
                "protocol": ft.__doc__.split("\n\n", 1)[1].strip(),
            },
            "hessian": {
                "parameters": f"all trainable ({runs[0]['num_params']}: conv, BatchNorm affine, linear)",
                "bn_mode": "eval (running statistics)",
                "data": f"{config.dataset} training set ({config.hessian_samples or 'all'} samples)",
                "loss": "mean cross-entropy, no weight decay term",
                "trace": "Lanczos-deflated Hutchinson (arXiv 2205.01736)",
                "top_eigenvalue": "global, Lanczos with full reorthogonalization",
            },
        }
    )


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    claims = []
    claims.append(estimator_claim(result))
    ftr = result.get("finetune") or {}
    fts = ftr.get("summary") or {}
    finetuned = "sgd" in fts and "nso" in fts
    # results stored before the fine-tuning protocol: the from-scratch summary (labelled as such)
    s = fts if finetuned else result["summary"]
    if "sgd" in s and "nso" in s:
        sg, ns = s["sgd"], s["nso"]
        tr_red = 1 - ns["trace"] / sg["trace"]
        eig_red = 1 - ns["top_eig"] / sg["top_eig"]
        # unrounded: the verdict is taken on these values (formatting is the display's job)
        measured: dict[str, Any] = {
            "trace_reduction_vs_sgd": tr_red,
            "top_eig_reduction_vs_sgd": eig_red,
            "test_acc_nso": ns["test_acc"],
            "test_acc_sgd": sg["test_acc"],
        }
        if finetuned:
            measured = ft.claim_values(s, PAPER_TRACE_REDUCTION, PAPER_TOP_EIG_REDUCTION)
        else:
            for o in ("sam", "asam"):
                if o in s:
                    measured[f"trace_reduction_{o}_vs_sgd"] = 1 - s[o]["trace"] / sg["trace"]
                    measured[f"top_eig_reduction_{o}_vs_sgd"] = 1 - s[o]["top_eig"] / sg["top_eig"]
                    measured[f"test_acc_{o}"] = s[o]["test_acc"]
            if "sam" in s:
                measured["trace_reduction_nso_vs_sam"] = 1 - ns["trace"] / s["sam"]["trace"]
                measured["top_eig_reduction_nso_vs_sam"] = 1 - ns["top_eig"] / s["sam"]["top_eig"]
        ok_tr = tr_red >= PAPER_TRACE_REDUCTION
        ok_eig = eig_red >= PAPER_TOP_EIG_REDUCTION
        ok_acc = ns["test_acc"] >= sg["test_acc"]
        fails = [
            name
            for name, ok in (
                ("trace reduction", ok_tr),
                ("top-eigenvalue reduction", ok_eig),
                ("test accuracy", ok_acc),
            )
            if not ok
        ]
        note = (
            f"means over {sg['seeds']} seeds at {sg['grad_evals']} gradient evaluations each; "
            f"NSO sigma={config.nso_sigma}{' (relative)' if config.nso_relative else ''}, k={config.nso_pairs}. "
        )
        if finetuned:
            note = (
                "Fine-tuning (the paper's regime): pretrained on digits 0-4, fine-tuned on digits 5-9, base "
                f"optimizer Adam(amsgrad) lr {config.finetune_lr:g} as the reference code; 'SGD' = the plain "
                "base optimizer at equal epochs, as the reference code compares (every method "
                f"{config.finetune_epochs} epochs, NSO with k pairs epochs/k; NSO and SAM use 2 gradient "
                "evaluations per sample and epoch, plain fine-tuning 1). Trace and top eigenvalue as the reference code (conv and linear weights, "
                "per-layer top eigenvalues summed, BN eval); global ones in measured. Paper v4: -15.8% trace, "
                "-9.7% top eigenvalue, up to +2.4% accuracy. " + note.replace("gradient evaluations each", "steps each")
            )
        else:
            note = "From-scratch result layout (no fine-tuning in this result). " + note
        if fails:
            note += "Fails on: " + ", ".join(fails) + ". "
            if not finetuned:
                note += "The paper's numbers are for fine-tuning ResNet-34; this is a small CNN trained from scratch. "
        side = ft.equal_evals_verdict(measured, PAPER_TRACE_REDUCTION, PAPER_TOP_EIG_REDUCTION) if finetuned else None
        if side:
            note += side
        sc = result["summary"]
        if finetuned and "sgd" in sc and "nso" in sc:
            note += (
                f"From scratch (side result, not the claim): NSO trace {1 - sc['nso']['trace'] / sc['sgd']['trace']:+.1%}"
                f", top eigenvalue {1 - sc['nso']['top_eig'] / sc['sgd']['top_eig']:+.1%} vs SGD, test acc "
                f"{sc['nso']['test_acc']:.4f} vs {sc['sgd']['test_acc']:.4f}. "
            )
        variants = [k for k in sc if k.startswith("nso(")]
        if variants and "sgd" in sc:
            note += (
                "Sensitivity (not part of the claim), trace / top-eigenvalue reduction vs SGD, test acc: "
                + "; ".join(
                    f"{k}: {1 - sc[k]['trace'] / sc['sgd']['trace']:+.1%} / {1 - sc[k]['top_eig'] / sc['sgd']['top_eig']:+.1%}, "
                    f"{sc[k]['test_acc']:.4f}"
                    for k in variants
                )
                + "."
            )
        claims.append(
            Claim(
                id="C3.2",
                statement="NSO ends with Hessian trace and top eigenvalue lower than SGD's by >= 17.7% and 12.8%, "
                "test accuracy not below SGD's, "
                + ("fine-tuning at equal epochs (the paper's code)" if finetuned else "at equal gradient evaluations"),
                measured=measured,
                threshold={
                    "trace_reduction": PAPER_TRACE_REDUCTION,
                    "top_eig_reduction": PAPER_TOP_EIG_REDUCTION,
                    "test_acc": "nso >= sgd",
                },
                passed=bool(ok_tr and ok_eig and ok_acc),
                note=note.strip(),
                headline="trace_reduction_vs_sgd",
                paper=0.158,
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

    from symgen.curvature import SpectralDensity

    outdir = Path(outdir)
    paths = []
    runs = result["runs"]
    opts = list(result["summary"])
    # eigenvalue densities (first seed of each optimizer)
    fig, ax = plt.subplots(figsize=(7, 4))
    lo = min(min(min(row) for row in r["density_nodes"]) for r in runs)
    hi = max(max(max(row) for row in r["density_nodes"]) for r in runs)
    grid = torch.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 600, dtype=torch.float64)
    for o in opts:
        r = next(r for r in runs if r["label"] == o)
        d = SpectralDensity(
            torch.tensor(r["density_nodes"], dtype=torch.float64),
            torch.tensor(r["density_weights"], dtype=torch.float64),
            r["num_params"],
            0,
        )
        ax.semilogy(grid, d.evaluate(grid, bandwidth=0.01 * (hi - lo)).clamp_min(1e-8), label=LABELS.get(o, o))
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian-smoothed)")
    ax.set_title("Hessian eigenvalue density at the end of training")
    ax.legend()
    paths.append(save_figure(fig, outdir / "hessian_density.png", dpi=120))
    # bars: trace, top eigenvalue, noise stability, test accuracy
    keys = [
        ("trace", "Hessian trace"),
        ("top_eig", "top eigenvalue"),
        ("noise_stability", "noise stability"),
        ("test_acc", "test accuracy"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (k, title) in zip(axes, keys, strict=True):
        means = [result["summary"][o][k] for o in opts]
        stds = [result["summary"][o][k + "_std"] for o in opts]
        ax.bar(range(len(opts)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(opts))])
        ax.set_xticks(range(len(opts)), [LABELS.get(o, o) for o in opts], rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
    fig.suptitle("equal gradient evaluations; mean +- std over seeds")
    paths.append(save_figure(fig, outdir / "flatness_bars.png", dpi=120))
    fts = (result.get("finetune") or {}).get("summary") or {}
    if fts:  # C3.2: fine-tuning, the claim's regime
        keys = [
            ("trace", "trace (conv/linear weights)"),
            ("top_eig", "sum of layer top eigenvalues"),
            ("global_top_eig", "global top eigenvalue"),
            ("test_acc", "test accuracy"),
        ]
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
        for ax, (k, title) in zip(axes, keys, strict=True):
            ax.bar(
                range(len(fts)),
                [fts[o][k] for o in fts],
                yerr=[fts[o][k + "_stderr"] for o in fts],
                capsize=3,
                color=[f"C{i}" for i in range(len(fts))],
            )
            ax.set_xticks(range(len(fts)), [LABELS.get(o, o) for o in fts], rotation=30, ha="right", fontsize=7)
            ax.set_title(title, fontsize=9)
        fig.suptitle("fine-tuning digits 0-4 -> 5-9, equal epochs (SGD (NSO grad evals): side); mean +- SE over seeds")
        paths.append(save_figure(fig, outdir / "finetune_bars.png", dpi=120))
    return paths


EXPERIMENT = Experiment(
    name="flat-minima",
    title="Noise stability optimization: estimator and flat minima vs SGD, SAM, ASAM",
    paper="arXiv 2306.08553",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick=QUICK,
    claims=("C3.1", "C3.2"),
)
