"""Side result of experiment ``flat-minima`` (not the claim): SGD, SAM, ASAM and NSO trained from scratch.

A BatchNorm CNN on digits (mnist1d by config) trained from scratch by SGD, SAM, ASAM and NSO, all with the
same base SGD (momentum, weight decay, cosine learning rate), the same initialization and data order per
seed, and the same number of gradient evaluations (SGD: 1 per step; SAM/ASAM: 2; NSO with k antithetic
pairs: 2k, plus one forward-only BatchNorm pass); at the end test accuracy, and on the training set (mean
cross-entropy, no weight decay term, all trainable parameters, BatchNorm in eval mode) the Hessian trace,
the global largest eigenvalue, noise stability and the SLQ eigenvalue density. C3.2 itself is checked on
fine-tuning (:mod:`symgen.experiments.nso_finetune`); see docs/claims.md.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

from symgen.curvature import HessianOperator
from symgen.experiments import nso_finetune as ft
from symgen.experiments.base import jsonable, num_threads
from symgen.metrics.stability import noise_stability
from symgen.models import bn_cnn
from symgen.optim import SAM
from symgen.optim.nso import NSO
from symgen.rng import as_generator, isolated_seed
from symgen.training import fit

__all__ = ["train_trial", "summarize"]


def _load(dataset: str, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from symgen.data import load_dataset

    x, y = load_dataset(dataset, "train", generator=seed)
    xt, yt = load_dataset(dataset, "test", generator=seed)
    return x, y, xt, yt


def train_trial(item: dict) -> dict:
    """Train one (optimizer, seed) at the given gradient-evaluation budget, then measure curvature.

    Args:
        item: the trial's settings (optimizer, seed, budget and curvature-measure settings).

    Returns:
        the trial's measurements (JSON-able).
    """
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def summarize(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per label (optimizer or NSO variant): seeds, budget, and mean and std over seeds of each measure.

    Args:
        runs: :func:`train_trial` results.

    Returns:
        ``{label: {"seeds", "grad_evals", "steps", key, key + "_std", ...}}`` in the order labels first appear.
    """
    summary: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        s: dict[str, Any] = {"seeds": len(rs), "grad_evals": rs[0]["grad_evals"], "steps": rs[0]["steps"]}
        for key in ("test_acc", "train_loss", "trace", "top_eig", "noise_stability", "time_s"):
            s[key], s[key + "_std"] = _mean_std([r[key] for r in rs])
        summary[label] = s
    return summary
