"""Experiment ``unit-norm``: scale-symmetry detection (C2.1) and unit-norm SGD's stability (C2.2).

Badrinarayanan, Mishra, Cipolla, "Understanding symmetries in deep networks", arXiv 1511.01029.

C2.1: on a BatchNorm MLP, a BatchNorm CNN and a model mixing BatchNorm, GroupNorm, LayerNorm and
plain layers (all with randomized parameters), every found filter block is rescaled by random
factors in [1/2, 2] and the loss must not change (relative 1e-5); every parameter not found is
rescaled the same way (per row) and the loss must change (relative > 1e-5); the found groups must
equal the ones worked out by hand for these architectures.

C2.2: the two BatchNorm networks are trained with SGD, SGD with weight decay and UnitNormSGD on
the SAME learning-rate grid (log-spaced, >= 5 values over >= 2 orders of magnitude), the same
initializations and the same minibatch order per seed. UnitNormSGD's lr is an angular step on the
sphere for the filters (and an ordinary step for the other parameters); SGD's effective angular
step on a scale-invariant filter is lr / ||w||^2, which drifts as ||w|| changes. No method gets a
grid of its own, so none is tuned. Claim: UnitNormSGD's test accuracy averaged over the grid and
seeds is at least SGD's, and its standard deviation across learning rates (of the seed-mean
accuracy) is smaller.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from symgen.errors import DivergenceError
from symgen.experiments import unit_norm_protocol as protocol
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, num_threads
from symgen.functional import buffers_of, call, params_of
from symgen.models import build_model
from symgen.optim.unit_norm import UnitNormSGD
from symgen.report import pyplot, save_figure
from symgen.rng import as_generator, isolated_seed
from symgen.symmetry import NORMALIZATION_LAYERS, find_scale_symmetries, rescale_filters
from symgen.training import fit

__all__ = ["Config", "EXPERIMENT", "build_model", "EXPECTED", "run", "check_claims", "figures"]

METHODS = ("sgd", "sgd_wd", "unit_norm")
METHOD_LABELS = {"sgd": "SGD", "sgd_wd": "SGD + weight decay", "unit_norm": "UnitNormSGD"}
TOL_INVARIANT = 1e-5  # relative loss change allowed for found groups (PAPERS.md C2.1)
# Scaling single filters of a per-group / joint symmetry must change the loss clearly above float64
# rounding (~1e-15): the reported granularity is not too coarse.
TOL_FINER = 1e-8


class Config(ExperimentConfig):
    """Full setting: 5 seeds, 30 epochs, 8 learning rates over 3.5 orders of magnitude."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    models: list[Literal["mlp", "cnn"]] = Field(default_factory=lambda: ["mlp", "cnn"], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], min_length=1)
    seeds: int = Field(5, ge=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    width: int = Field(64, ge=2, description="hidden units of the MLP")
    channels: int = Field(16, ge=1, description="channels of the CNN's first conv (second: 2x)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, description="for the SGD + weight decay method")
    detection_batch: int = Field(256, ge=2)
    detection_models: list[Literal["mlp", "cnn", "mixed"]] = Field(
        default_factory=lambda: ["mlp", "cnn", "mixed"], min_length=1
    )
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


# What a careful reader finds by hand: weight -> (kind, redundant bias, bias scaled with it).
EXPECTED: dict[str, dict[str, tuple[str, str | None, str | None]]] = {
    "mlp": {"1.weight": ("per_filter", "1.bias", None), "4.weight": ("per_filter", "4.bias", None)},
    "cnn": {"0.weight": ("per_filter", "0.bias", None), "3.weight": ("per_filter", "3.bias", None)},
    "mixed": {
        "c1.weight": ("per_filter", "c1.bias", None),
        "c2.weight": ("per_group", None, None),
        "l2.weight": ("joint", None, "l2.bias"),
    },
}


def _load(dataset: str, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from symgen.data import load_dataset

    x, y = load_dataset(dataset, "train")
    xt, yt = load_dataset(dataset, "test")
    return x.to(device), y.to(device), xt.to(device), yt.to(device)


# ---------------------------------------------------------------------------------------------
# C2.1: detection check


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _loss(model: nn.Module, params: dict, buffers: dict, x: Tensor, y: Tensor, train: bool) -> float:
    model.train(train)
    with torch.no_grad():
        out = call(model, params, {k: v.clone() for k, v in buffers.items()}, x)
    return F.cross_entropy(out, y).item()


def _log_uniform(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.exp((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))


def _cpu_threads(device: str) -> int | None:
    """Tiny models run fastest on one CPU thread (and do not fight other processes for cores)."""
    return 1 if str(device).startswith("cpu") else None


def detection_trial(item: dict) -> dict:
    """Detect symmetries of one model, then rescale found and not-found parameters and measure the loss."""
    with num_threads(_cpu_threads(item["device"])):
        return _detect(item)


def _detect(item: dict) -> dict:
    x, y, _, _ = _load(item["dataset"], item["device"])
    with isolated_seed(item["seed"]):
        model = build_model(item["model"], tuple(x.shape[1:]), item["width"], item["channels"])
    model = model.to(device=item["device"], dtype=torch.float64)
    gen = as_generator(item["seed"])
    with torch.no_grad():  # a random point in parameter space: no zero biases, gamma != 1
        for p in model.parameters():
            rms = p.pow(2).mean().sqrt().item()
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * (0.5 * rms if rms > 0 else 0.5))
        model.train()
        for i in range(4):  # running statistics that hold estimates
            model(x[i * 64 : (i + 1) * 64].double())
    xb = x[: item["detection_batch"]].double()
    yb = y[: item["detection_batch"]]
    t0 = time.perf_counter()
    report = find_scale_symmetries(model, xb[:64], generator=item["seed"])
    detect_s = time.perf_counter() - t0
    exact = copy.deepcopy(model)
    for m in exact.modules():
        if isinstance(m, NORMALIZATION_LAYERS):
            m.eps = torch.finfo(torch.float64).tiny
    p, b = params_of(model), buffers_of(model)
    found: list[dict] = []
    for sym in report.symmetries:
        f = _log_uniform((sym.num_blocks,), gen)
        p2, b2 = rescale_filters(p, b, sym, f)
        row = {
            "weight": sym.weight,
            "kind": sym.kind,
            "blocks": sym.num_blocks,
            "redundant_bias": sym.redundant_bias,
            "bias": sym.bias,
        }
        for tag, m in (("eps", model), ("exact", exact)):
            row[f"train_{tag}"] = _rel(_loss(m, p2, b, xb, yb, True), _loss(m, p, b, xb, yb, True))
            row[f"eval_{tag}"] = _rel(_loss(m, p2, b2, xb, yb, False), _loss(m, p, b, xb, yb, False))
        if sym.kind != "per_filter":
            # Exactly this granularity: scaling single filters independently must change the loss.
            w = p[sym.weight]
            fw = _log_uniform((w.shape[sym.axis],), gen)
            shape = [1] * w.dim()
            shape[sym.axis] = -1
            p3 = dict(p)
            p3[sym.weight] = w * fw.reshape(shape).to(w)
            if sym.bias:
                p3[sym.bias] = p[sym.bias] * fw.to(w)
            row["finer_train_exact"] = _rel(_loss(exact, p3, b, xb, yb, True), _loss(exact, p, b, xb, yb, True))
        found.append(row)
    if report.symmetries:  # all found groups at once
        p_all, b_all = p, b
        for sym in report.symmetries:
            p_all, b_all = rescale_filters(p_all, b_all, sym, _log_uniform((sym.num_blocks,), gen))
        all_row = {
            tag: _rel(_loss(m, p_all, b, xb, yb, True), _loss(m, p, b, xb, yb, True))
            for tag, m in (("train_eps", model), ("train_exact", exact))
        }
    else:
        all_row = {}
    redundant = {}
    for name in report.redundant_biases:
        p4 = dict(p)
        p4[name] = p[name] + torch.randn(p[name].shape, generator=gen, dtype=torch.float64).to(p[name])
        redundant[name] = _rel(_loss(model, p4, b, xb, yb, True), _loss(model, p, b, xb, yb, True))
    found_names = set(report.parameters()) | set(report.redundant_biases)
    not_found = {}
    for name, t in p.items():
        if name in found_names:
            continue
        f = _log_uniform((t.shape[0],), gen).to(t)
        p5 = dict(p)
        p5[name] = t * f.reshape([-1] + [1] * (t.dim() - 1))
        not_found[name] = _rel(_loss(model, p5, b, xb, yb, True), _loss(model, p, b, xb, yb, True))
    expected = EXPECTED[item["model"]]
    got = {s.weight: (s.kind, s.redundant_bias, s.bias) for s in report.symmetries}
    return jsonable(
        {
            "model": item["model"],
            "found": found,
            "all_at_once": all_row,
            "redundant_bias_change": redundant,
            "not_found_change": not_found,
            "matches_expected": got == expected,
            "got": got,
            "expected": expected,
            "method": report.method,
            "unanalysed": report.unanalysed,
            "rejected": report.rejected,
            "detect_seconds": detect_s,
        }
    )


# ---------------------------------------------------------------------------------------------
# C2.2: training over a learning-rate grid


def train_trial(item: dict) -> dict:
    """Train one (model, method, lr, seed) and return its test accuracy."""
    with num_threads(_cpu_threads(item["device"])):
        return _train(item)


def _train(item: dict) -> dict:
    device = item["device"]
    x, y, xt, yt = _load(item["dataset"], device)
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
        ok = (logits.argmax(1) == yt) & torch.isfinite(logits).all(1)
        val_logits = model(xv) if num_val else None
    out = {
        "model": item["model"],
        "method": method,
        "lr": lr,
        "seed": item["seed"],
        "test_acc": ok.double().mean().item(),
        "final_train_loss": last,
        "diverged": diverged,
        "seconds": time.perf_counter() - t0,
    }
    if val_logits is not None:
        out["val_acc"] = ((val_logits.argmax(1) == yv) & torch.isfinite(val_logits).all(1)).double().mean().item()
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
    claims: list[Claim] = []
    det = result["detection"]
    found_max = max(
        (r[k] for d in det for r in d["found"] for k in ("train_exact", "eval_exact")), default=float("nan")
    )
    found_max_eps = max(
        (r[k] for d in det for r in d["found"] for k in ("train_eps", "eval_eps")), default=float("nan")
    )
    redundant_max = max((v for d in det for v in d["redundant_bias_change"].values()), default=0.0)
    not_found = {f"{d['model']}:{k}": v for d in det for k, v in d["not_found_change"].items()}
    not_found_min = min(not_found.values(), default=float("nan"))
    finer = [r["finer_train_exact"] for d in det for r in d["found"] if "finer_train_exact" in r]
    finer_min = min(finer, default=float("inf"))
    matches = {d["model"]: d["matches_expected"] for d in det}
    passed = (
        all(matches.values())
        and found_max <= TOL_INVARIANT
        and redundant_max <= TOL_INVARIANT
        and not_found_min > TOL_INVARIANT
        and finer_min > TOL_FINER
    )
    notes = []
    if not all(matches.values()):
        notes.append(f"found groups differ from the hand analysis for {[m for m, ok in matches.items() if not ok]}")
    if found_max_eps > TOL_INVARIANT:
        notes.append(
            f"at the models' own BatchNorm/LayerNorm eps = 1e-5 the loss of a rescaled "
            f"found group changes by up to {found_max_eps:.1e}: eps breaks the symmetry to "
            f"order eps/variance; the threshold is applied to the exact symmetry (eps -> 0)"
        )
    claims.append(
        Claim(
            id="C2.1",
            statement="symgen finds exactly the scale-invariant parameter groups: loss unchanged "
            "(relative 1e-5) when a found filter block is rescaled, changed for parameters "
            "not found",
            measured={
                "found_max_rel_loss_change_exact": found_max,
                "found_max_rel_loss_change_at_model_eps": found_max_eps,
                "redundant_bias_max_rel_change": redundant_max,
                "not_found_min_rel_loss_change": not_found_min,
                "finer_than_found_min_rel_change": finer_min if finer else None,
                "matches_hand_analysis": matches,
                "models": [d["model"] for d in det],
            },
            threshold={
                "found": f"<= {TOL_INVARIANT:g}",
                "not_found": f"> {TOL_INVARIANT:g}",
                "finer_than_found": f"> {TOL_FINER:g}",
                "groups": "equal to the hand analysis",
            },
            passed=bool(passed),
            note="; ".join(notes),
            headline="found_max_rel_loss_change_exact",
        )
    )

    if "protocol" in result:
        claims.append(protocol_claim(config, result))
    return claims


def protocol_claim(config: Config, result: dict) -> Claim:
    """C2.2 as the paper states it: (a) rescaled initializations, (b) lr grids centred on each method's best."""
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
    happens to be centred on (SGD's effective angular step is lr / ||w||^2)."""
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
