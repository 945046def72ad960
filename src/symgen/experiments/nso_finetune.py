"""C3.2 in the paper's regime (Ju, Li, Zhang, arXiv 2306.08553): fine-tuning a pretrained network.

The claim, its threshold and where the protocol differs from the paper's: docs/claims.md.

The paper fine-tunes ImageNet-pretrained ResNets on six small image data sets. The embedded stand-in:
the flat-minima BatchNorm CNN is pretrained on the SOURCE task digits 0-4 (Adam, lr 1e-3), its head is
replaced by a fresh 5-way linear layer, and it is fine-tuned on the TARGET task digits 5-9 (a disjoint
label set on the same kind of images, like ImageNet -> Aircraft) by SGD (the plain base optimizer),
SAM, ASAM and NSO. Hyper-parameters follow the reference code's fine-tuning configs: base optimizer
Adam (amsgrad) lr 1e-4, no weight decay, batch 32, 30 epochs with the learning rate x0.1 every 10;
NSO sigma 0.01, k = 1 antithetic pair, lam 0; SAM rho 0.01. Compute is matched as the reference code
matches it: every method runs the same ``epochs`` (its configs: ``trainer.epochs`` 30 for SGD, SAM and
NSO alike), except that NSO with k > 1 pairs runs epochs / k (its scripts: ``--num_perturbs 2 --epochs
15``, ``--num_perturbs 3 --epochs 10``), so NSO and SAM/ASAM use the same gradient evaluations (2 per
sample per epoch) and the plain base optimizer ("sgd", the claim's baseline) half of them.
"sgd_equal_evals" (side comparison) is plain fine-tuning with as many gradient evaluations as NSO
(2k x NSO's steps, its schedule stretched to the same fractions). Every method starts from the same
pretrained weights and head at a seed.

Curvature at the end, on the target training set, mean cross-entropy, BatchNorm in eval mode:
- "paper": as the reference code: over the conv and linear WEIGHTS only; trace = sum of the per-layer
  Hessian traces (= the trace over those weights), top eigenvalue = SUM over layers of each layer's
  largest eigenvalue (the reference's per-layer power iterations);
- "global": all trainable parameters; trace and the global largest eigenvalue.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from symgen.curvature import HessianOperator
from symgen.experiments.base import jsonable, num_threads
from symgen.models import bn_cnn
from symgen.optim import SAM
from symgen.optim.nso import NSO
from symgen.rng import as_generator, isolated_seed
from symgen.stats import mean_stderr
from symgen.training import fit

__all__ = [
    "SOURCE",
    "TARGET",
    "BASELINES",
    "finetune_trial",
    "summarize",
    "weight_names",
    "trial_items",
    "claim_values",
    "eval_accuracy",
    "equal_evals_verdict",
]

SOURCE = (0, 1, 2, 3, 4)
TARGET = (5, 6, 7, 8, 9)
EVALS_PER_STEP = {"sgd": 1, "sgd_equal_evals": 1, "sam": 2, "asam": 2}
BASELINES = {
    "sgd": "equal epochs (the reference code's protocol; the claim)",
    "sgd_equal_evals": "equal gradient evaluations (side comparison)",
}


def _split(x: Tensor, y: Tensor, classes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    return x[keep], remap[y[keep]]


def eval_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy of ``model`` in eval mode on ``(x, y)`` (its mode restored after).

    Args:
        model: the classifier.
        x: inputs.
        y: integer labels.

    Returns:
        the fraction classified correctly.
    """
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def weight_names(model: nn.Module) -> list[str]:
    """The conv and linear weights (the parameters the reference code's Hessian measures run over).

    Args:
        model: the network.

    Returns:
        the names of its conv and linear weights.
    """
    mods = dict(model.named_modules())
    return [
        n
        for n, _ in model.named_parameters()
        if n.endswith(".weight") and isinstance(mods[n.rsplit(".", 1)[0]], (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]


def pretrained(item: dict, x: Tensor, y: Tensor) -> nn.Sequential:
    """The source-task network with a fresh target head (deterministic in the item's seed).

    Args:
        item: the trial's settings (seed, width, pretraining lr, epochs and batch size, device).
        x: inputs of all classes.
        y: their labels.

    Returns:
        the pretrained network, its head replaced for the target classes.
    """
    seed, dev = item["seed"], torch.device(item.get("device", "cpu"))
    xs, ys = _split(x, y, SOURCE)
    with isolated_seed(seed):
        model = bn_cnn(tuple(x.shape[1:]), len(SOURCE), item["width"]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=item["pretrain_lr"])
    fit(
        model,
        (xs.to(dev), ys.to(dev)),
        opt,
        epochs=item["pretrain_epochs"],
        batch_size=item["batch_size"],
        generator=40_000 + seed,
    )
    head = model[-1]
    assert isinstance(head, nn.Linear)  # bn_cnn ends in its linear head
    with isolated_seed(50_000 + seed):  # same fresh head for every method at this seed
        model[-1] = nn.Linear(head.in_features, len(TARGET)).to(dev)
    return model


def _curvature(model: nn.Module, data: tuple[Tensor, Tensor], item: dict, seed: int) -> dict:
    cg = as_generator(30_000 + seed)
    names = weight_names(model)
    H = HessianOperator(model, TF.cross_entropy, data, bn_mode="eval")
    Hw = HessianOperator(model, TF.cross_entropy, data, param_names=names, bn_mode="eval")
    tr = H.trace(item["trace_matvecs"], cg, method="deflated")
    trw = Hw.trace(item["trace_matvecs"], cg, method="deflated")
    top = H.eigenpairs(1, "largest", tol=item["eig_tol"], generator=cg)
    layer_tops = {
        n: float(
            HessianOperator(model, TF.cross_entropy, data, param_names=[n], bn_mode="eval")
            .eigenpairs(1, "largest", tol=item["eig_tol"], generator=cg)
            .values[0]
        )
        for n in names
    }
    return {
        "trace": trw.value,
        "trace_stderr": trw.stderr,
        "top_eig": sum(layer_tops.values()),
        "layer_top_eigs": layer_tops,
        "global_trace": tr.value,
        "global_trace_stderr": tr.stderr,
        "global_top_eig": float(top.values[0]),
        "num_weights": Hw.dim,
        "num_params": H.dim,
    }


def finetune_trial(item: dict) -> dict:
    """Pretrain on the source classes, fine-tune on the target classes with one method, measure curvature.

    Args:
        item: the trial's settings: one (seed, method) of the protocol.

    Returns:
        the trial's measurements (JSON-able).
    """
    with num_threads(item.get("num_threads")):
        return _finetune_trial(item)


def _finetune_trial(item: dict) -> dict:
    from symgen.data import load_dataset

    t0 = time.perf_counter()
    name, seed = item["optimizer"], item["seed"]
    x, y = load_dataset("digits", "train", generator=item.get("data_seed", 0))
    xt, yt = load_dataset("digits", "test", generator=item.get("data_seed", 0))
    model = pretrained(item, x, y)
    dev = torch.device(item.get("device", "cpu"))
    x, y = (t.to(dev) for t in _split(x, y, TARGET))
    xt, yt = (t.to(dev) for t in _split(xt, yt, TARGET))
    k = item["nso_pairs"]
    evals = 2 * k if name == "nso" else EVALS_PER_STEP[name]
    steps_per_epoch = math.ceil(x.shape[0] / item["batch_size"])
    budget = 2 * item["epochs"] * steps_per_epoch  # SAM's, ASAM's and NSO's gradient evaluations
    nso_evals = budget // (2 * k) * 2 * k  # NSO's gradient evaluations (k > 1: epochs / k)
    steps = {"sgd": item["epochs"] * steps_per_epoch, "sgd_equal_evals": nso_evals}.get(name, budget // evals)
    base = dict(lr=item["lr"], amsgrad=True, weight_decay=item["weight_decay"])
    if name in ("sgd", "sgd_equal_evals"):
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), **base)
        inner = opt
    elif name in ("sam", "asam"):
        opt = SAM(
            model.parameters(),
            torch.optim.Adam,
            rho=item["rho_sam" if name == "sam" else "rho_asam"],
            adaptive=name == "asam",
            model=model,
            **base,
        )
        inner = opt.base_optimizer
    else:
        opt = NSO(
            model.parameters(),
            torch.optim.Adam,
            sigma=item["nso_sigma"],
            num_samples=k,
            model=model,
            generator=as_generator(10_000 + seed),
            **base,
        )
        inner = opt.base_optimizer
    # StepLR(step_size=epochs/3, gamma=0.1) of the reference, in steps (stretched for the longer run)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=max(1, steps // 3), gamma=0.1)
    history = fit(
        model, (x, y), opt, steps=steps, batch_size=item["batch_size"], generator=20_000 + seed, scheduler=sched
    )
    train_time = time.perf_counter() - t0
    model.eval()
    m = item["hessian_samples"] or x.shape[0]
    curv = _curvature(model, (x[:m], y[:m]), item, seed)
    with torch.no_grad():
        train_loss = float(TF.cross_entropy(model(x), y))
    return jsonable(
        dict(
            curv,
            optimizer=name,
            seed=seed,
            steps=history.num_steps,
            grad_evals=history.num_steps * evals,
            test_acc=eval_accuracy(model, xt, yt),
            train_acc=eval_accuracy(model, x, y),
            train_loss=train_loss,
            train_time_s=train_time,
            time_s=time.perf_counter() - t0,
        )
    )


def _reductions(runs: list[dict], out: dict[str, Any], o: str, baseline: str, suffix: str) -> None:
    """Into ``out[o]``: method ``o``'s reductions against ``baseline`` (ratio of means, the verdict's number),
    the paired per-seed reductions' standard error, and the paired test-accuracy difference."""
    base = {r["seed"]: r for r in runs if r["optimizer"] == baseline}
    rs = [r for r in runs if r["optimizer"] == o and r["seed"] in base]
    for key in ("trace", "top_eig", "global_trace", "global_top_eig"):
        out[o][f"{key}_reduction{suffix}"] = 1 - out[o][key] / out[baseline][key]
        per_seed = torch.tensor([1 - r[key] / base[r["seed"]][key] for r in rs], dtype=torch.float64)
        out[o][f"{key}_reduction{suffix}_stderr"] = mean_stderr(per_seed)[1] if len(rs) > 1 else math.nan
    acc_diff = torch.tensor([r["test_acc"] - base[r["seed"]]["test_acc"] for r in rs], dtype=torch.float64)
    out[o][f"test_acc_diff{suffix}"], out[o][f"test_acc_diff{suffix}_stderr"] = mean_stderr(acc_diff)


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per method: means and standard errors over seeds; per regularized method: the reductions vs plain
    fine-tuning at equal epochs ("sgd", the claim's baseline; keys ``*_reduction``) and, for NSO, vs plain
    fine-tuning at equal gradient evaluations (keys ``*_reduction_equal_evals``).

    Args:
        runs: the outputs of :func:`finetune_trial`.

    Returns:
        the summary, keyed by method.
    """
    out: dict[str, Any] = {}
    methods = list(dict.fromkeys(r["optimizer"] for r in runs))
    for o in methods:
        rs = sorted((r for r in runs if r["optimizer"] == o), key=lambda r: r["seed"])
        s: dict[str, Any] = {"seeds": len(rs), "grad_evals": rs[0]["grad_evals"], "steps": rs[0]["steps"]}
        for key in ("test_acc", "train_loss", "trace", "top_eig", "global_trace", "global_top_eig", "time_s"):
            s[key], s[key + "_stderr"] = mean_stderr(torch.tensor([r[key] for r in rs], dtype=torch.float64))
        out[o] = s
    if "sgd" in out:
        for o in methods:
            if o != "sgd":
                _reductions(runs, out, o, "sgd", "")
    if "nso" in out and "sgd_equal_evals" in out:
        _reductions(runs, out, "nso", "sgd_equal_evals", "_equal_evals")
    return out


def trial_items(config: Any) -> list[dict]:
    """One item per (seed, method) of the fine-tuning protocol (``config``: the flat-minima Config).

    Args:
        config: the flat-minima Config.

    Returns:
        the trial inputs of :func:`finetune_trial`.
    """
    base = dict(
        width=config.finetune_width,
        pretrain_lr=config.pretrain_lr,
        pretrain_epochs=config.pretrain_epochs,
        batch_size=config.finetune_batch_size,
        lr=config.finetune_lr,
        weight_decay=config.finetune_weight_decay,
        epochs=config.finetune_epochs,
        nso_pairs=config.nso_pairs,
        nso_sigma=config.nso_sigma,
        rho_sam=config.finetune_rho_sam,
        rho_asam=config.finetune_rho_asam,
        hessian_samples=config.hessian_samples,
        trace_matvecs=config.trace_matvecs,
        eig_tol=config.eig_tol,
        num_threads=config.num_threads,
        data_seed=config.seed,
        device=config.device,
    )
    return [
        dict(base, optimizer=o, seed=config.seed + s)
        for s in range(config.finetune_seeds)
        for o in config.finetune_optimizers
    ]


def _margin_se(value: float, threshold: float, stderr: float) -> float:
    return (value - threshold) / stderr if stderr and math.isfinite(stderr) and stderr > 0 else math.nan


def _comparison(ns: dict, suffix: str, trace_threshold: float, eig_threshold: float) -> dict[str, float]:
    """NSO's reductions against one baseline and their margins in standard errors of the paired reductions."""
    return {
        "trace": ns[f"trace_reduction{suffix}"],
        "top_eig": ns[f"top_eig_reduction{suffix}"],
        "trace_margin_se": _margin_se(
            ns[f"trace_reduction{suffix}"], trace_threshold, ns[f"trace_reduction{suffix}_stderr"]
        ),
        "top_eig_margin_se": _margin_se(
            ns[f"top_eig_reduction{suffix}"], eig_threshold, ns[f"top_eig_reduction{suffix}_stderr"]
        ),
        "test_acc_margin_se": _margin_se(ns[f"test_acc_diff{suffix}"], 0.0, ns[f"test_acc_diff{suffix}_stderr"]),
        "global_trace": ns[f"global_trace_reduction{suffix}"],
        "global_top_eig": ns[f"global_top_eig_reduction{suffix}"],
    }


def claim_values(s: dict[str, Any], trace_threshold: float, eig_threshold: float) -> dict[str, Any]:
    """The C3.2 measured dict from a fine-tuning summary (``summarize``): NSO's reductions vs plain
    fine-tuning at equal epochs (the claim; verdict: ratio of means), their margins in standard errors of
    the paired per-seed reductions, the global measures, the same at equal gradient evaluations
    (``*_equal_evals``, where that baseline ran) and SAM/ASAM beside.

    Args:
        s: the output of :func:`summarize`.
        trace_threshold: the claim's threshold on the trace reduction.
        eig_threshold: the claim's threshold on the top-eigenvalue reduction.

    Returns:
        the measured values of C3.2.
    """
    sg, ns = s["sgd"], s["nso"]
    c = _comparison(ns, "", trace_threshold, eig_threshold)
    m: dict[str, Any] = {
        "trace_reduction_vs_sgd": c["trace"],
        "top_eig_reduction_vs_sgd": c["top_eig"],
        "test_acc_nso": ns["test_acc"],
        "test_acc_sgd": sg["test_acc"],
        "trace_margin_se": c["trace_margin_se"],
        "top_eig_margin_se": c["top_eig_margin_se"],
        "test_acc_margin_se": c["test_acc_margin_se"],
        "global_trace_reduction_vs_sgd": c["global_trace"],
        "global_top_eig_reduction_vs_sgd": c["global_top_eig"],
    }
    if "sgd_equal_evals" in s and "trace_reduction_equal_evals" in ns:
        e = _comparison(ns, "_equal_evals", trace_threshold, eig_threshold)
        m.update(
            {
                "trace_reduction_vs_sgd_equal_evals": e["trace"],
                "top_eig_reduction_vs_sgd_equal_evals": e["top_eig"],
                "test_acc_sgd_equal_evals": s["sgd_equal_evals"]["test_acc"],
                "trace_margin_se_equal_evals": e["trace_margin_se"],
                "top_eig_margin_se_equal_evals": e["top_eig_margin_se"],
                "test_acc_margin_se_equal_evals": e["test_acc_margin_se"],
                "global_trace_reduction_vs_sgd_equal_evals": e["global_trace"],
                "global_top_eig_reduction_vs_sgd_equal_evals": e["global_top_eig"],
            }
        )
    for o in ("sam", "asam"):
        if o in s:
            m[f"trace_reduction_{o}_vs_sgd"] = s[o]["trace_reduction"]
            m[f"top_eig_reduction_{o}_vs_sgd"] = s[o]["top_eig_reduction"]
            m[f"test_acc_{o}"] = s[o]["test_acc"]
    if "sam" in s:
        m["trace_reduction_nso_vs_sam"] = 1 - ns["trace"] / s["sam"]["trace"]
        m["top_eig_reduction_nso_vs_sam"] = 1 - ns["top_eig"] / s["sam"]["top_eig"]
    return m


def equal_evals_verdict(m: dict[str, Any], trace_threshold: float, eig_threshold: float) -> str | None:
    """The side comparison at equal gradient evaluations, in words (None where it did not run).

    Args:
        m: the output of :func:`claim_values`.
        trace_threshold: the claim's threshold on the trace reduction.
        eig_threshold: the claim's threshold on the top-eigenvalue reduction.

    Returns:
        a sentence, or None where the equal-evaluations baseline did not run.
    """
    if "trace_reduction_vs_sgd_equal_evals" not in m:
        return None
    ok = (
        m["trace_reduction_vs_sgd_equal_evals"] >= trace_threshold
        and m["top_eig_reduction_vs_sgd_equal_evals"] >= eig_threshold
        and m["test_acc_nso"] >= m["test_acc_sgd_equal_evals"]
    )
    return (
        f"At equal gradient evaluations (side comparison: plain fine-tuning with 2k x NSO's steps) NSO's trace "
        f"{m['trace_reduction_vs_sgd_equal_evals']:+.1%}, top eigenvalue "
        f"{m['top_eig_reduction_vs_sgd_equal_evals']:+.1%}, test acc {m['test_acc_nso']:.4f} vs "
        f"{m['test_acc_sgd_equal_evals']:.4f}: it would {'PASS' if ok else 'FAIL'} there. "
    )
