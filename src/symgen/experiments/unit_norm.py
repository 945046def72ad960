"""Experiment ``unit-norm``: scale-symmetry detection (C2.1) and unit-norm SGD against SGD (C2.2).

Badrinarayanan, Mishra, Cipolla, "Understanding symmetries in deep networks", arXiv 1511.01029. The claims,
their thresholds, where each threshold comes from and where symgen's protocol differs from the paper's:
docs/claims.md.

C2.1 (detection) lives in :mod:`symgen.experiments.unit_norm_detection`; C2.2's protocol in the paper's
terms (rescaled initializations, learning-rate grids centred on each method's own best) in
:mod:`symgen.experiments.unit_norm_protocol`. This module holds the config, the training trial, ``run`` and
the side result ``shared_grid_check``: the two BatchNorm networks trained with SGD, SGD with weight decay
and UnitNormSGD on ONE shared learning-rate grid (log-spaced, >= 5 values over >= 2 orders of magnitude),
the same initializations and minibatch order per seed. UnitNormSGD's lr is an angular step on the sphere
for the filters (an ordinary step for the other parameters); SGD's effective angular step on a
scale-invariant filter is lr / ||w||^2, so a shared grid favours whichever method it happens to be centred
on, which is why the claim C2.2 uses centred grids instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from symgen.errors import DivergenceError
from symgen.experiments import unit_norm_protocol as protocol
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, num_threads
from symgen.experiments.unit_norm_detection import EXPECTED, cpu_threads, detection_claim, detection_trial, load_data
from symgen.functional import params_of
from symgen.labels import accuracy
from symgen.models import build_model
from symgen.optim.unit_norm import UnitNormSGD
from symgen.report import pyplot, save_figure
from symgen.rng import as_generator, isolated_seed
from symgen.symmetry import find_scale_symmetries, rescale_filters
from symgen.training import fit

__all__ = ["Config", "EXPERIMENT", "build_model", "EXPECTED", "run", "check_claims", "figures"]

METHODS = ("sgd", "sgd_wd", "unit_norm")
Model = Literal["mlp", "cnn"]
DetectionModel = Literal["mlp", "cnn", "mixed"]
MODELS: tuple[Model, ...] = ("mlp", "cnn")
DETECTION_MODELS: tuple[DetectionModel, ...] = ("mlp", "cnn", "mixed")
METHOD_LABELS = {"sgd": "SGD", "sgd_wd": "SGD + weight decay", "unit_norm": "UnitNormSGD"}


class Config(ExperimentConfig):
    """Full setting: 5 seeds, 30 epochs, 8 learning rates over 3.5 orders of magnitude."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    models: list[Model] = Field(default_factory=lambda: list(MODELS), min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], min_length=1)
    seeds: int = Field(5, ge=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    width: int = Field(64, ge=2, description="hidden units of the MLP")
    channels: int = Field(16, ge=1, description="channels of the CNN's first conv (second: 2x)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, description="for the SGD + weight decay method")
    detection_batch: int = Field(256, ge=2)
    detection_models: list[DetectionModel] = Field(default_factory=lambda: list(DETECTION_MODELS), min_length=1)
    val_fraction: float = Field(0.2, ge=0.05, lt=0.9, description="training data held out to choose each lr")
    centred_factors: list[float] = Field(
        default_factory=lambda: [0.1, 0.1**0.5, 1.0, 10**0.5, 10.0],
        min_length=1,
        description="C2.2 (b): each method's grid is its own best lr times these factors (same width for all)",
    )
    lr_search_extensions: int = Field(
        4,
        ge=0,
        description="C2.2 (b): at most this many grid steps past the coarse grid's edge, per method, "
        "until its best lr (on the validation split) is interior",
    )
    rescalings: int = Field(5, ge=2, description="C2.2 (a): function-preserving rescaled initializations")
    rescale_range: float = Field(100.0, gt=1, description="C2.2 (a): filter factors log-uniform over this ratio")

    @field_validator("lrs")
    @classmethod
    def _distinct_positive(cls, lrs: list[float]) -> list[float]:
        if len(set(lrs)) != len(lrs) or min(lrs) <= 0:
            raise ValueError("lrs must be distinct positive numbers, e.g. [0.01, 0.1, 1.0]")
        return lrs


QUICK = {"seeds": 2, "epochs": 8, "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0], "rescalings": 4}


# ---------------------------------------------------------------------------------------------
# Models (built by symgen.models.build_model)


# ---------------------------------------------------------------------------------------------
# C2.2: training over a learning-rate grid


def train_trial(item: dict) -> dict:
    """Train one (model, method, lr, seed) and return its test accuracy.

    Args:
        item: the trial's settings (model, method, lr, seed and training settings).

    Returns:
        the trial's settings and measurements (JSON-able).
    """
    with num_threads(cpu_threads(item["device"])):
        return _train(item)


def _train(item: dict) -> dict:
    device = item["device"]
    x, y, xt, yt = load_data(item["dataset"], device)
    num_val = int(round(item.get("val_fraction", 0.0) * x.shape[0]))
    xv, yv = x[:num_val], y[:num_val]  # the split is already shuffled (stratified); validation comes first
    x, y = x[num_val:], y[num_val:]
    with isolated_seed(item["seed"]):
        model = build_model(item["model"], tuple(x.shape[1:]), item["width"], item["channels"]).to(device)
    if item.get("rescale") is not None:  # the same function from other filter scales (C2.2 a)
        _rescale_in_place(model, x[:64], item["rescale"], item["rescale_range"])
    lr, method = item["lr"], item["method"]
    if method == "unit_norm":
        opt: torch.optim.Optimizer = UnitNormSGD(model, lr, momentum=item["momentum"], example_input=x[:64])
    else:
        wd = item["weight_decay"] if method == "sgd_wd" else 0.0
        opt = torch.optim.SGD(model.parameters(), lr, momentum=item["momentum"], weight_decay=wd)
    t0 = time.perf_counter()
    try:  # same minibatches for every method; drop the last partial batch (BatchNorm needs > 1)
        history = fit(
            model,
            (x, y),
            opt,
            epochs=item["epochs"],
            batch_size=item["batch_size"],
            drop_last=True,
            generator=item["seed"],
        )
        diverged, last = False, history.last_loss
    except DivergenceError:  # stopped before the non-finite step's update; that model is evaluated
        diverged, last = True, None
    model.eval()
    with torch.no_grad():
        logits = model(xt)
        val_logits = model(xv) if num_val else None
    out = {
        "model": item["model"],
        "method": method,
        "lr": lr,
        "seed": item["seed"],
        "test_acc": accuracy(logits, yt),  # a non-finite row counts as wrong
        "final_train_loss": last,
        "diverged": diverged,
        "seconds": time.perf_counter() - t0,
    }
    if val_logits is not None:
        out["val_acc"] = accuracy(val_logits, yv)
    if item.get("rescale") is not None:
        out["rescale"] = item["rescale"]
        out["predictions"] = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1).tolist()
    return out


def _rescale_in_place(model: nn.Module, example: Tensor, seed: int, spread: float) -> None:
    """Every detected filter block times a factor log-uniform in [1/sqrt(spread), sqrt(spread)]: the function
    (and the loss) is unchanged, the Euclidean geometry SGD sees is not (arXiv 1511.01029)."""
    gen = as_generator(seed)
    report = find_scale_symmetries(model, example, generator=seed)
    p = params_of(model)
    for sym in report.symmetries:  # no buffers: a fresh model's running statistics are placeholders, not
        u = torch.rand((sym.num_blocks,), generator=gen, dtype=torch.float64)  # estimates (as if built so)
        p, _ = rescale_filters(p, None, sym, torch.exp((2 * u - 1) * 0.5 * math.log(spread)))
    with torch.no_grad():
        for name, t in p.items():
            model.get_parameter(name).copy_(t)


def _summary(trials: list[dict], models: list[str], lrs: list[float]) -> dict:
    import numpy as np

    out: dict[str, Any] = {}
    for model in models:
        out[model] = {}
        for method in METHODS:
            rows = [t for t in trials if t["model"] == model and t["method"] == method]
            per_lr = []
            for lr in lrs:
                accs = [t["test_acc"] for t in rows if t["lr"] == lr]
                per_lr.append(
                    {
                        "lr": lr,
                        "mean": float(np.mean(accs)),
                        "std": float(np.std(accs)),
                        "n": len(accs),
                        "diverged": sum(t["diverged"] for t in rows if t["lr"] == lr),
                    }
                )
            means = np.array([r["mean"] for r in per_lr])
            out[model][method] = {
                "per_lr": per_lr,
                "mean_acc": float(np.mean([t["test_acc"] for t in rows])),
                "spread_across_lr": float(np.std(means)),
                "range_across_lr": float(means.max() - means.min()),
                "best_acc": float(means.max()),
                "best_lr": lrs[int(means.argmax())],
                "seed_std_mean": float(np.mean([r["std"] for r in per_lr])),
            }
    return out


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    base = {"dataset": config.dataset, "device": config.device, "width": config.width, "channels": config.channels}
    det_items = [
        dict(base, model=m, seed=config.seed, detection_batch=config.detection_batch) for m in config.detection_models
    ]
    detection = ctx.map(detection_trial, det_items, desc="detection (C2.1)")
    train_base = dict(
        base,
        epochs=config.epochs,
        batch_size=config.batch_size,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        val_fraction=config.val_fraction,
        rescale_range=config.rescale_range,
    )
    seeds = [config.seed + s for s in range(config.seeds)]
    items = [
        dict(train_base, model=m, method=meth, lr=lr, seed=s)
        for m in config.models
        for s in seeds
        for lr in config.lrs
        for meth in METHODS
    ]
    trials = ctx.map(train_trial, items, desc="shared lr grid (choice of lr; side result)")
    for t in trials:
        ctx.log(**{k: v for k, v in t.items() if k != "seconds"})
    # C2.2 (b): each method's own best lr on the validation split (the search extended past the coarse grid's
    # edge until the best is interior, or the cap), then a grid of equal width around it
    best, extra = protocol.search_best(
        trials,
        list(config.models),
        train_base,
        seeds,
        config.lr_search_extensions,
        lambda items: ctx.map(train_trial, items, desc="lr search past the grid's edge (C2.2 b)"),
    )
    search = [t for t in trials + extra if t["method"] in protocol.PROTOCOL_METHODS]
    done = {(t["model"], t["method"], t["lr"], t["seed"]): t for t in trials + extra}
    wanted = protocol.centred_items(train_base, best, list(config.centred_factors), seeds)
    todo = [i for i in wanted if (i["model"], i["method"], i["lr"], i["seed"]) not in done]
    for t in ctx.map(train_trial, todo, desc="centred lr grids (C2.2 b)"):
        done[(t["model"], t["method"], t["lr"], t["seed"])] = t
    centred = [done[(i["model"], i["method"], i["lr"], i["seed"])] for i in wanted]
    # C2.2 (a): the same function from rescaled filters, each method at its own best lr
    rescaled = ctx.map(
        train_trial,
        protocol.rescale_items(train_base, best, config.rescalings, config.seed),
        desc="rescaled initializations (C2.2 a)",
    )
    return jsonable(
        {
            "detection": detection,
            "trials": trials,
            "summary": _summary(trials, list(config.models), list(config.lrs)),
            "lrs": list(config.lrs),
            "models": list(config.models),
            "protocol": {
                "best_lrs": best,
                "factors": list(config.centred_factors),
                "search_trials": extra,
                "search": protocol.search_summary(search, best, list(config.lrs)),
                "rescalings": config.rescalings,
                "rescale_range": config.rescale_range,
                "summary": protocol.summarize(centred, rescaled, best, list(config.centred_factors)),
            },
        }
    )


def _shown(a: float, b: float) -> tuple[float, float]:
    """``a`` and ``b`` rounded to 4 decimals, or to as many more as it takes for unequal values to differ."""
    for digits in range(4, 17):
        if a == b or round(a, digits) != round(b, digits):
            return round(a, digits), round(b, digits)
    return a, b


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    claims: list[Claim] = [detection_claim(result)]
    if "protocol" in result:
        claims.append(protocol_claim(config, result))
    return claims


def protocol_claim(config: Config, result: dict) -> Claim:
    """C2.2 as the paper states it: (a) rescaled initializations, (b) lr grids centred on each method's best.

    Args:
        config: the experiment's settings.
        result: ``run``'s output.

    Returns:
        the claim C2.2.
    """
    prot = result["protocol"]
    passed, measured, reasons = protocol.verdict(prot["summary"], prot.get("search"))
    factors = prot["factors"]
    return Claim(
        id="C2.2",
        statement="SGD is not invariant to BatchNorm's filter rescalings, unit-norm SGD is: (a) from rescaled "
        "initializations computing the same function, unit-norm SGD's final predictions agree while "
        "SGD's spread; (b) on lr grids of equal width centred on each method's own best lr (chosen on "
        "a validation split), unit-norm SGD's mean test accuracy is >= SGD's and varies less",
        measured={
            "per_model": measured,
            "best_lrs": prot["best_lrs"],
            "centred_factors": factors,
            "rescalings": prot["rescalings"],
            "rescale_range": prot["rescale_range"],
            "seeds": config.seeds,
            "epochs": config.epochs,
            "lr_search": {
                m: {k: {"grid": v["grid"], "val_acc": v["val_acc"], "interior": v["interior"]} for k, v in per.items()}
                for m, per in (prot.get("search") or {}).items()
            },
        },
        threshold=f"(a) disagreement(UnitNormSGD) < disagreement(SGD) and <= {protocol.MAX_UNIT_NORM_DISAGREEMENT}; "
        "(b) centred mean_acc(UnitNormSGD) >= SGD's and spread < SGD's; every model",
        passed=bool(passed),
        note="; ".join(reasons),
    )


def shared_grid_check(config: Config, result: dict) -> Claim:
    """Side result (not a claim): both methods on ONE shared lr grid, which favours whichever method the grid
    happens to be centred on (SGD's effective angular step is lr / ||w||^2).

    Args:
        config: the experiment's settings.
        result: ``run``'s output.

    Returns:
        the side result, as a claim-shaped record.
    """
    summ = result["summary"]
    lrs = result["lrs"]
    grid_ok = len(lrs) >= 5 and max(lrs) / min(lrs) >= 100 - 1e-9
    per_model, ok_all = {}, grid_ok
    for model in result["models"]:
        s = summ[model]
        u, g, w = s["unit_norm"], s["sgd"], s["sgd_wd"]
        ok = u["mean_acc"] >= g["mean_acc"] and u["spread_across_lr"] < g["spread_across_lr"]
        ok_all = ok_all and ok
        per_model[model] = {
            # unrounded: the verdict is taken on these values (formatting is the display's job)
            "mean_acc": {k: s[k]["mean_acc"] for k in METHODS},
            "spread_across_lr": {k: s[k]["spread_across_lr"] for k in METHODS},
            "best_acc": {k: s[k]["best_acc"] for k in METHODS},
            "passes_vs_sgd": ok,
            "passes_vs_sgd_wd": u["mean_acc"] >= w["mean_acc"] and u["spread_across_lr"] < w["spread_across_lr"],
        }
    note = (
        []
        if grid_ok
        else [f"the lr grid {lrs} has fewer than 5 values or spans < 2 orders of magnitude, which the claim requires"]
    )
    for model, pm in per_model.items():
        if not pm["passes_vs_sgd"]:
            mean_u, mean_g = _shown(pm["mean_acc"]["unit_norm"], pm["mean_acc"]["sgd"])
            spread_u, spread_g = _shown(pm["spread_across_lr"]["unit_norm"], pm["spread_across_lr"]["sgd"])
            note.append(f"{model}: UnitNormSGD mean {mean_u} vs SGD {mean_g}, spread {spread_u} vs {spread_g}")
    return Claim(
        id="C2.2-shared-grid",
        statement="(side result) across ONE shared grid of learning rates and seeds on a BN network, unit-norm SGD's test "
        "accuracy is at least SGD's on average and varies less across learning rates",
        measured={"per_model": per_model, "lrs": lrs, "seeds": config.seeds, "epochs": config.epochs},
        threshold="mean_acc(UnitNormSGD) >= mean_acc(SGD) and std over lrs of the seed-mean "
        "accuracy (UnitNormSGD) < SGD's, for every model; grid >= 5 lrs over >= 100x",
        passed=bool(ok_all),
        note="; ".join(note),
    )


def figures(result: dict, outdir: Path) -> list[Path]:
    """Draw the experiment's figures.

    Args:
        result: ``run``'s output.
        outdir: directory for the PNG files.

    Returns:
        the paths written.
    """
    plt = pyplot()

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in METHODS:
            rows = result["summary"][model][method]["per_lr"]
            ax.errorbar(
                [r["lr"] for r in rows],
                [r["mean"] for r in rows],
                yerr=[r["std"] for r in rows],
                marker="o",
                capsize=3,
                label=METHOD_LABELS[method],
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (UnitNormSGD: angular step on the sphere)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"BatchNorm {model.upper()}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [save_figure(fig, Path(outdir) / "unit_norm_acc_vs_lr.png")]


EXPERIMENT = Experiment(
    name="unit-norm",
    title="Weight-space scale symmetries and unit-norm Riemannian SGD",
    paper="arXiv 1511.01029",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick=QUICK,
    claims=("C2.1", "C2.2"),
)
