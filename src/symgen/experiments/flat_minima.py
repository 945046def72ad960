"""Experiment ``flat-minima``: NSO's gradient estimator (C3.1) and flatness of NSO vs SGD, SAM, ASAM (C3.2).

Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates", arXiv 2306.08553.

C3.1: on a quadratic L(w) = 1/2 (w - c)^T A (w - c), F(w) = E L(w + U) = L(w) + sigma^2/2 tr A in
closed form, and on a quartic-plus-quadratic where grad F = grad L + (terms in sigma^2) differs from
grad L, the NSO optimizer's gradient (antithetic, lam = 0) averaged over many steps must match grad F
(max |z| over coordinates below 4.5) and its variance must be below the one-sided estimator's at the
same number of gradient evaluations (2 per estimate).

C3.2 (the claim) is checked in the paper's regime, fine-tuning a pretrained network, by
``symgen.experiments.nso_finetune`` (the reference code's protocol: every method the same epochs; the
plain optimizer at NSO's gradient evaluations is reported beside). Side result, not the claim: a
BatchNorm CNN on digits (mnist1d by config) trained FROM SCRATCH by SGD, SAM, ASAM and NSO, all with the
same base SGD (momentum, weight decay, cosine learning rate), the same initialization and data order per
seed, and the SAME number of gradient evaluations (SGD: 1 per step; SAM/ASAM: 2; NSO with k antithetic
pairs: 2k, plus one forward-only BatchNorm pass); at the end test accuracy, and on the training set (mean
cross-entropy, no weight decay term, ALL trainable parameters, BatchNorm in eval mode) the Hessian trace,
the global largest eigenvalue, noise stability and the SLQ eigenvalue density. Thresholds of C3.2: NSO's
mean trace and top eigenvalue lower than SGD's by at least 17.7% and 12.8% (v3's numbers) and its mean
test accuracy not below SGD's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as TF
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from symgen.curvature import HessianOperator
from symgen.experiments import nso_finetune as ft
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, num_threads
from symgen.metrics.stability import noise_stability
from symgen.models import bn_cnn
from symgen.optim import SAM
from symgen.optim.nso import NSO
from symgen.report import pyplot, save_figure
from symgen.rng import as_generator, isolated_seed
from symgen.stats import mean_stderr
from symgen.training import fit

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
]

OPTIMIZERS = ("sgd", "sam", "asam", "nso")
LABELS = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "nso": "NSO", "sgd_equal_evals": "SGD (NSO grad evals)"}
PAPER_TRACE_REDUCTION = 0.177  # arXiv 2306.08553 v3 abstract
PAPER_TOP_EIG_REDUCTION = 0.128
MAX_Z = 4.5


class NSOVariant(BaseModel):
    """An extra NSO noise setting, reported for sensitivity only."""

    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(ge=0)
    relative: bool = False

    @property
    def label(self) -> str:
        return f"nso(sigma={self.sigma:g}{', relative' if self.relative else ''})"


class Config(ExperimentConfig):
    """Full setting: width-16 CNN, 5 seeds, 60 SGD-epochs of gradient evaluations, finer curvature."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    optimizers: list[Literal["sgd", "sam", "asam", "nso"]] = Field(
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
    finetune_optimizers: list[Literal["sgd", "sam", "asam", "nso", "sgd_equal_evals"]] = Field(
        default_factory=lambda: ["sgd", "sam", "asam", "nso", "sgd_equal_evals"],
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
# C3.1: the estimator on closed-form objectives


def _estimates(loss: Any, w0: Tensor, sigma: float, draws: int, antithetic: bool, k: int, seed: int) -> Tensor:
    """``draws`` NSO gradient estimates at ``w0`` (one per row), each from a fresh noise draw."""
    w = nn.Parameter(w0.clone())
    opt = NSO([w], torch.optim.SGD, sigma=sigma, num_samples=k, antithetic=antithetic, lr=0.0, generator=seed)

    def closure() -> Tensor:
        opt.zero_grad()
        out = loss(w)
        out.backward()
        return out

    out = torch.empty(draws, w0.numel(), dtype=w0.dtype)
    for i in range(draws):
        opt.estimate_gradient(closure)
        out[i] = w.grad.detach()
    return out


def _column_mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Per coordinate (column) of ``samples`` (draws, d): the mean and its standard error s / sqrt(draws)."""
    pairs = [mean_stderr(samples[:, j]) for j in range(samples.shape[1])]
    return (
        torch.tensor([m for m, _ in pairs], dtype=samples.dtype),
        torch.tensor([se for _, se in pairs], dtype=samples.dtype),
    )


def estimator_trial(item: dict) -> dict:
    """C3.1: NSO gradients vs closed-form grad F on a quadratic and a quartic (float64)."""
    d, sigma, draws, seed = item["dim"], item["sigma"], item["draws"], item["seed"]
    g = as_generator(seed)
    B = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2  # indefinite, like a Hessian away from a minimum
    c = torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    s2 = sigma**2
    objectives = {
        # L = 1/2 (w-c)^T A (w-c);  F = L + sigma^2/2 tr A;  grad F = A (w - c) = grad L
        "quadratic": (lambda w: 0.5 * (w - c) @ A @ (w - c), A @ (w0 - c), A @ (w0 - c)),
        # L = sum a_i w_i^4 / 4 + quadratic;  E(w+u)^4 = w^4 + 6 w^2 s2 + 3 s2^2
        # grad F = a (w^3 + 3 s2 w) + A (w - c)  differs from grad L = a w^3 + A (w - c)
        "quartic": (
            lambda w: (a * w**4).sum() / 4 + 0.5 * (w - c) @ A @ (w - c),
            a * (w0**3 + 3 * s2 * w0) + A @ (w0 - c),
            a * w0**3 + A @ (w0 - c),
        ),
    }
    out: dict[str, Any] = {}
    for name, (loss, grad_f, grad_l) in objectives.items():
        anti = _estimates(loss, w0, sigma, draws, True, 1, seed + 1)  # 1 pair: 2 gradient evaluations
        one = _estimates(loss, w0, sigma, draws, False, 2, seed + 2)  # 2 draws: 2 gradient evaluations
        mean, se = _column_mean_stderr(anti)
        mean_one, se_one = _column_mean_stderr(one)
        scale = float(grad_f.abs().max())
        z = ((mean - grad_f).abs() / se.clamp_min(1e-12 * scale)).max()
        z_l = ((mean - grad_l).abs() / se.clamp_min(1e-12 * scale)).max()
        z_one = ((mean_one - grad_f).abs() / se_one.clamp_min(1e-12 * scale)).max()
        var_anti = float(anti.var(0).sum())
        var_one = float(one.var(0).sum())
        out[name] = {
            "max_z": float(z),
            "max_z_vs_grad_L": float(z_l),
            "max_z_one_sided": float(z_one),
            "var_antithetic": var_anti,
            "var_one_sided": var_one,
            "var_ratio": var_anti / var_one if var_one > 0 else math.inf,
            "grad_F_minus_grad_L": float((grad_f - grad_l).norm()),
        }
    out.update(dim=d, sigma=sigma, draws=draws)
    return out


# ---------------------------------------------------------------------------------------------
# C3.2: training at equal gradient evaluations


def _load(dataset: str, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from symgen.data import load_dataset

    x, y = load_dataset(dataset, "train", generator=seed)
    xt, yt = load_dataset(dataset, "test", generator=seed)
    return x, y, xt, yt


def train_trial(item: dict) -> dict:
    """Train one (optimizer, seed) at the given gradient-evaluation budget, then measure curvature."""
    with num_threads(item.get("num_threads")):
        return _train_trial(item)


def _train_trial(item: dict) -> dict:
    t0 = time.perf_counter()
    opt_name, seed = item["optimizer"], item["seed"]
    device = torch.device(item.get("device", "cpu"))
    x, y, xt, yt = _load(item["dataset"], item.get("data_seed", 0))
    x, y, xt, yt = x.to(device), y.to(device), xt.to(device), yt.to(device)
    with isolated_seed(seed):  # same initialization for every optimizer at this seed
        model = bn_cnn(tuple(x.shape[1:]), int(y.max()) + 1, item["width"]).to(device)
    n, bs = x.shape[0], item["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    # a multiple of every method's evaluations per step, so all get exactly the same budget
    unit = math.lcm(2, 2 * item["nso_pairs"])
    budget = max(unit, int(round(item["grad_eval_epochs"] * steps_per_epoch)) // unit * unit)
    evals_per_step = {"sgd": 1, "sam": 2, "asam": 2, "nso": 2 * item["nso_pairs"]}[opt_name]
    steps = budget // evals_per_step
    base = dict(lr=item["lr"], momentum=item["momentum"], weight_decay=item["weight_decay"])
    gen = as_generator(10_000 + seed)
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **base)
        inner = opt
    elif opt_name in ("sam", "asam"):
        rho = item["rho_sam"] if opt_name == "sam" else item["rho_asam"]
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=opt_name == "asam", model=model, **base)
        inner = opt.base_optimizer
    else:
        opt = NSO(
            model.parameters(),
            torch.optim.SGD,
            sigma=item["nso_sigma"],
            num_samples=item["nso_pairs"],
            relative=item["nso_relative"],
            model=model,
            generator=gen,
            **base,
        )
        inner = opt.base_optimizer
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=max(steps, 1))
    # Same minibatch order for every optimizer (seeded per seed). SAM/ASAM update BatchNorm statistics
    # once, at W; NSO evaluates its perturbed copies with vmap and takes one extra forward-only pass.
    history = fit(
        model, (x, y), opt, steps=steps, batch_size=bs, drop_last=True, generator=20_000 + seed, scheduler=sched
    )
    grad_evals = history.num_steps * evals_per_step
    forwards = history.num_steps if opt_name == "nso" else 0
    train_time = time.perf_counter() - t0

    # curvature on the training set: BN eval mode, all trainable parameters, mean cross-entropy
    model.eval()
    m = item["hessian_samples"] or n
    hx, hy = x[:m], y[:m]
    H = HessianOperator(model, TF.cross_entropy, (hx, hy), bn_mode="eval")
    cg = as_generator(30_000 + seed)
    tr = H.trace(item["trace_matvecs"], cg, method="deflated")
    eig = H.eigenpairs(1, "largest", tol=item["eig_tol"], generator=cg)
    dens = H.density(item["density_steps"], item["density_runs"], generator=cg)
    ns = noise_stability(
        model, TF.cross_entropy, (hx, hy), item["noise_sigma"], item["noise_samples"], bn_mode="eval", generator=cg
    )
    with torch.no_grad():
        train_loss = float(TF.cross_entropy(model(hx), hy))
    return jsonable(
        {
            "optimizer": opt_name,
            "label": item.get("label", opt_name),
            "seed": seed,
            "nso_sigma": item["nso_sigma"] if opt_name == "nso" else None,
            "nso_relative": item["nso_relative"] if opt_name == "nso" else None,
            "steps": steps,
            "grad_evals": grad_evals,
            "extra_forward_passes": forwards,
            "test_acc": ft.eval_accuracy(model, xt, yt),
            "train_acc": ft.eval_accuracy(model, x, y),
            "train_loss": train_loss,
            "trace": tr.value,
            "trace_stderr": tr.stderr,
            "trace_matvecs": tr.num_matvecs,
            "top_eig": float(eig.values[0]),
            "top_eig_error_bound": float(eig.error_bounds[0]),
            "top_eig_converged": eig.converged,
            "top_eig_matvecs": eig.num_matvecs,
            "noise_stability": ns.value,
            "noise_stability_stderr": ns.stderr,
            "density_nodes": dens.nodes,
            "density_weights": dens.weights,
            "num_params": H.dim,
            "train_time_s": train_time,
            "time_s": time.perf_counter() - t0,
        }
    )


# ---------------------------------------------------------------------------------------------
# protocol


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def run(config: Config, ctx: Context) -> dict:
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
    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        s: dict[str, Any] = {"seeds": len(rs), "grad_evals": rs[0]["grad_evals"], "steps": rs[0]["steps"]}
        for key in ("test_acc", "train_loss", "trace", "top_eig", "noise_stability", "time_s"):
            s[key], s[key + "_std"] = _mean_std([r[key] for r in rs])
        summary[label] = s
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
    claims = []
    est = result["estimator"]
    q, c = est["quadratic"], est["quartic"]
    ok1 = q["max_z"] < MAX_Z and c["max_z"] < MAX_Z and c["var_ratio"] < 1 and q["var_ratio"] < 1
    note1 = ("" if ok1 else "bias z-score >= 4.5 or antithetic variance not lower. ") + (
        f"Power check: on the quartic the same estimates are far from grad L (max z {c['max_z_vs_grad_L']:.1f}), "
        "so the test distinguishes grad F from grad L."
    )
    claims.append(
        Claim(
            id="C3.1",
            statement="NSO's gradient is unbiased for grad F, F(W) = E L(W+U) in closed form (quadratic, quartic); "
            "antithetic variance < one-sided at equal gradient evaluations",
            # unrounded: the verdict is taken on these values, so the shown ones must be the same
            measured={
                "quadratic_max_z": q["max_z"],
                "quartic_max_z": c["max_z"],
                "quadratic_var_ratio": q["var_ratio"],
                "quartic_var_ratio": c["var_ratio"],
            },
            threshold={"max_z": f"< {MAX_Z}", "var_ratio": "< 1"},
            passed=bool(ok1),
            note=note1,
        )
    )
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
