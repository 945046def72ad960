"""Experiment ``ntk-robustness``: adversarial examples for networks and NTK predictors (claim C4.4).

docs/claims.md (Kempe et al., arXiv 2307.02693; Tsilivis & Kempe 2022, arXiv 2210.05577; PGD and
adversarial training: Madry et al., arXiv 1706.06083). On digits: an MLP in NTK parameterization
and the kernel-regression predictor of its infinite-width NTK are attacked with PGD; examples
crafted on the kernel predictor are transferred to the network (against a random-sign control of
the same size); PGD adversarial training is compared with standard training under PGD. The kernel
predictor of a two-class subtask is split into NTK eigen-features, each scored for usefulness and
robustness (figure against eigen-feature index).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable
from symgen.experiments.ntk_robustness_figures import figures

__all__ = [
    "Config",
    "EXPERIMENT",
    "kernel_fn",
    "network_trial",
    "kernel_trial",
    "feature_trial",
    "run",
    "check_claims",
    "figures",
]


PAPER_EPS = 0.3  # arXiv 2210.05577: MNIST, L_inf, pixels in [0, 1]
PAPER_CIFAR_EPS = 8 / 255


class Config(ExperimentConfig):
    """Settings of ``ntk-robustness``; defaults are the full setting, ``--quick`` shrinks them."""

    dataset: Literal["digits"] = "digits"
    # Tsilivis & Kempe (arXiv 2210.05577) attack MNIST, pixels in [0, 1], under L_inf with eps = 0.3
    # (CIFAR-10: 8/255), PGD with 20 steps (their code's default). digits is MNIST-like, in [0, 1].
    eps: float = Field(PAPER_EPS, description="L_inf budget of the claim (the paper's MNIST budget)")
    eps_sweep: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.05, 0.1, 0.2, 0.3])
    norm: Literal["linf", "l2"] = "linf"
    pgd_steps: int = 20
    # The reference code (Tsili42/adv-ntk, robust_train_CNN.py) trains on the SAME attack it evaluates with
    # (pgd_attack(..., epsilon=FLAGS.epsilon), FLAGS.pgd_steps steps, adversarial examples only): None = that.
    train_pgd_steps: int | None = None
    seeds: int = 4
    depth: int = 2
    width: int = 512
    weight_std: float = math.sqrt(2.0)
    bias_std: float = 0.1
    epochs: int = 40  # standard training (Adam, lr, batch_size)
    batch_size: int = 128
    lr: float = 1e-3
    # PGD adversarial training's schedule (C4.4-advtrain), the reference code's (Tsili42/adv-ntk,
    # robust_train_CNN.py: 200 epochs of batch 250, a constant learning rate, eps from the first step, no
    # warm-up; Madry et al.'s MNIST code, MadryLab/mnist_challenge config.json, also keeps eps 0.3 constant).
    # Adam at ``lr`` as in standard training (the reference: plain SGD at 1e-2 on a standard-parameterized CNN).
    adv_epochs: int = 200
    adv_batch_size: int = 250
    adv_lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr * (1 + cos(pi e / E)) / 2 at epoch e
    adv_eps_warmup_epochs: int = Field(0, ge=0)  # eps ramped linearly from eps / W to eps over the first W epochs
    ridge: float = 1e-4
    feature_pair: tuple[int, int] = (3, 8)
    num_features: int = 40
    min_drop: float = 0.2
    min_transfer_gap: float = 0.1
    min_robust_gain: float = 0.1
    top_features: int = 5
    max_train: int | None = None
    max_test: int | None = None

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError("eps must be a positive number")
        return v

    @field_validator(
        "seeds",
        "depth",
        "width",
        "epochs",
        "pgd_steps",
        "train_pgd_steps",
        "num_features",
        "adv_epochs",
        "adv_batch_size",
    )
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v


def kernel_fn(cfg: dict) -> Callable[[Tensor, Tensor], Tensor]:
    """Infinite-width ReLU NTK of the network's architecture, ``(a, b) -> K`` in float64.

    Args:
        cfg: the experiment's config as a dict (``depth``, ``weight_std``, ``bias_std``).

    Returns:
        the kernel function ``(a, b) -> K``.
    """
    from symgen.ntk import analytic_ntk

    depth, w, b = int(cfg["depth"]), float(cfg["weight_std"]), float(cfg["bias_std"])

    def kernel(a: Tensor, c: Tensor) -> Tensor:
        return analytic_ntk(a, c, depth=depth, activation="relu", weight_std=w, bias_std=b, dtype=torch.float64)[1]

    return kernel


def _data(cfg: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from symgen.data import load_dataset

    x_tr, y_tr = load_dataset(cfg["dataset"], "train")
    x_te, y_te = load_dataset(cfg["dataset"], "test")
    # The first max_train / max_test examples if set (tiny test runs).
    x_tr, y_tr = x_tr[: cfg.get("max_train")], y_tr[: cfg.get("max_train")]
    x_te, y_te = x_te[: cfg.get("max_test")], y_te[: cfg.get("max_test")]
    dev = cfg["device"]
    return x_tr.to(dev), y_tr.to(dev), x_te.to(dev), y_te.to(dev)


def _attack(cfg: dict, steps: int, eps: float | None = None, loss: str = "auto"):
    """PGD inside [0, 1] pixels. Networks: cross-entropy; kernel outputs are not logits, so the kernel
    predictor is attacked through the scale-free margin loss max_{j != y} f_j - f_y instead."""
    from symgen.robust import pgd

    eps = float(cfg["eps"]) if eps is None else float(eps)
    return functools.partial(pgd, eps=eps, steps=steps, norm=cfg["norm"], clamp=(0.0, 1.0), loss=loss)


def _random_sign(x: Tensor, eps: float, norm: str, seed: int) -> Tensor:
    """Control perturbation of the attack's size: a random corner of the linf ball (or random l2 direction)."""
    from symgen.rng import as_generator

    g = as_generator(seed)
    if norm == "linf":
        d = eps * (2 * torch.randint(0, 2, x.shape, generator=g) - 1).to(x.dtype)
    else:
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        d = eps * d / d.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
    return (x + d.to(x.device)).clamp(0.0, 1.0)


def _train(cfg: dict, net: torch.nn.Module, x: Tensor, y: Tensor, seed: int, adversarial: bool) -> list[float]:
    """Train ``net`` by Adam: standard training (``epochs``), or PGD adversarial training on its schedule
    (``adv_epochs``, ``adv_batch_size``, ``adv_lr_schedule``, ``adv_eps_warmup_epochs``); the loss per epoch."""
    from symgen.rng import as_generator
    from symgen.robust import adversarial_training
    from symgen.training import fit

    lr = float(cfg["lr"])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if not adversarial:
        return fit(net, (x, y), opt, epochs=int(cfg["epochs"]), batch_size=int(cfg["batch_size"]), generator=seed)[
            "loss"
        ]
    g = as_generator(seed)  # one stream over the epochs: shuffles and the attacks' random starts
    epochs, warmup, losses = int(cfg["adv_epochs"]), int(cfg["adv_eps_warmup_epochs"]), []
    steps = int(cfg.get("train_pgd_steps") or cfg["pgd_steps"])  # None: the evaluation's attack
    for e in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr if cfg["adv_lr_schedule"] == "constant" else lr * (1 + math.cos(math.pi * e / epochs)) / 2
        attack = _attack(cfg, steps, float(cfg["eps"]) * min(1.0, (e + 1) / warmup) if warmup else None)
        hist = adversarial_training(
            net, (x, y), attack, opt, epochs=1, batch_size=int(cfg["adv_batch_size"]), generator=g
        )
        losses += hist["loss"]
    return losses


def network_trial(item: dict) -> dict:
    """One seed: standard and PGD-trained networks; clean, PGD, random-sign and kernel-transfer accuracy.

    Args:
        item: the trial's input: ``seed``, the ``config`` dict and the kernel's PGD examples ``x_kernel_adv``.

    Returns:
        the trial's measurements (JSON-able).
    """
    from symgen.models import ntk_mlp
    from symgen.robust import accuracy

    cfg = item["config"]
    seed = int(item["seed"])
    x_tr, y_tr, x_te, y_te = _data(cfg)
    x_kernel_adv = torch.tensor(item["x_kernel_adv"], dtype=x_te.dtype, device=x_te.device).view_as(x_te)
    attack = _attack(cfg, int(cfg["pgd_steps"]))
    out: dict = {"seed": seed}
    for name, adversarial in (("standard", False), ("adversarial", True)):
        net = ntk_mlp(
            x_tr[0].numel(),
            int(cfg["width"]),
            int(cfg["depth"]),
            10,
            "relu",
            float(cfg["weight_std"]),
            float(cfg["bias_std"]),
            generator=seed,
            device=cfg["device"],
        )
        losses = _train(cfg, net, x_tr, y_tr, seed, adversarial)
        net.eval()
        x_adv = attack(net, x_te, y_te, generator=seed + 1)
        sweep = [
            accuracy(net(_attack(cfg, int(cfg["pgd_steps"]), eps)(net, x_te, y_te, generator=seed + 1)), y_te)
            for eps in cfg["eps_sweep"]
        ]
        with torch.no_grad():
            out[name] = {
                "clean": accuracy(net(x_te), y_te),
                "pgd": accuracy(net(x_adv), y_te),
                "random_sign": accuracy(net(_random_sign(x_te, float(cfg["eps"]), cfg["norm"], seed + 2)), y_te),
                "kernel_transfer": accuracy(net(x_kernel_adv), y_te),
                "final_train_loss": losses[-1],
                "train_loss": losses[:: max(1, len(losses) // 20)] + losses[-1:],  # about 20 epochs, the last
                "pgd_sweep": sweep,
            }
    return jsonable(out)


def kernel_trial(item: dict) -> dict:
    """The NTK regression predictor on the full training set: clean and PGD accuracy, and the PGD examples.

    Args:
        item: the trial's input: the ``config`` dict.

    Returns:
        the trial's measurements (JSON-able).
    """
    from symgen.robust import accuracy, kernel_predictor, regression_targets

    cfg = item["config"]
    x_tr, y_tr, x_te, y_te = _data(cfg)
    kernel = kernel_fn(cfg)
    x_tr, x_te = x_tr.double(), x_te.double()
    with torch.no_grad():
        scale = kernel(x_tr[:200], x_tr[:200]).diagonal().mean().item()
    predictor = kernel_predictor(kernel, x_tr, regression_targets(y_tr, 10).double(), float(cfg["ridge"]) * scale)
    steps = int(cfg["pgd_steps"])
    x_adv = _attack(cfg, steps, loss="margin")(predictor, x_te, y_te, generator=int(cfg["seed"]))
    sweep = [
        accuracy(predictor(_attack(cfg, steps, eps, "margin")(predictor, x_te, y_te, generator=int(cfg["seed"]))), y_te)
        for eps in cfg["eps_sweep"]
    ]
    with torch.no_grad():
        out = {
            "clean": accuracy(predictor(x_te), y_te),
            "pgd": accuracy(predictor(x_adv), y_te),
            "pgd_sweep": sweep,
            "random_sign": accuracy(predictor(_random_sign(x_te, float(cfg["eps"]), cfg["norm"], 7)), y_te),
            "x_adv": x_adv.float().cpu().flatten(1),
        }
    return jsonable(out)


def feature_trial(item: dict) -> dict:
    """Usefulness / robustness of NTK eigen-features on the two-class subtask (Tsilivis & Kempe 2022).

    Args:
        item: the trial's input: the ``config`` dict.

    Returns:
        the trial's measurements (JSON-able).
    """
    from symgen.robust import ntk_feature_robustness

    cfg = item["config"]
    x_tr, y_tr, x_te, y_te = _data(cfg)
    a, b = cfg["feature_pair"]
    keep_tr, keep_te = (y_tr == a) | (y_tr == b), (y_te == a) | (y_te == b)
    xs, ys = x_tr[keep_tr].double(), (y_tr[keep_tr] == b).long()
    xt, yt = x_te[keep_te].double(), (y_te[keep_te] == b).long()
    kernel = kernel_fn(cfg)
    with torch.no_grad():
        scale = kernel(xs, xs).diagonal().mean().item()
    res = ntk_feature_robustness(
        kernel,
        xs,
        ys,
        xt,
        yt,
        _attack(cfg, int(cfg["pgd_steps"])),
        ridge=float(cfg["ridge"]) * scale,
        num_features=int(cfg["num_features"]),
    )
    return jsonable(
        {
            "pair": [a, b],
            "num_train": int(xs.shape[0]),
            "num_test": int(xt.shape[0]),
            **{
                k: getattr(res, k)
                for k in (
                    "eigenvalues",
                    "usefulness",
                    "robustness",
                    "correlation",
                    "robust_correlation",
                    "predictor_accuracy",
                    "predictor_robust_accuracy",
                )
            },
        }
    )


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    cfg = config.model_dump()
    kernel = ctx.map(kernel_trial, [{"config": cfg}], desc="kernel predictor under PGD")[0]
    features = ctx.map(feature_trial, [{"config": cfg}], desc="NTK eigen-features")[0]
    items = [{"seed": config.seed + s, "config": cfg, "x_kernel_adv": kernel["x_adv"]} for s in range(config.seeds)]
    nets = ctx.map(network_trial, items, desc="networks (standard and PGD-trained)")
    summary = {}
    for name in ("standard", "adversarial"):
        summary[name] = {
            k: statistics.fmean(n[name][k] for n in nets) for k in ("clean", "pgd", "random_sign", "kernel_transfer")
        }
    summary["kernel"] = {k: kernel[k] for k in ("clean", "pgd", "random_sign")}
    ctx.log(**{f"{a}_{b}": v for a, d in summary.items() for b, v in d.items()})
    sweep = {"eps": list(config.eps_sweep), "kernel": kernel["pgd_sweep"]}
    for name in ("standard", "adversarial"):
        sweep[name] = [statistics.fmean(n[name]["pgd_sweep"][i] for n in nets) for i in range(len(config.eps_sweep))]
    kernel_small = {k: v for k, v in kernel.items() if k != "x_adv"}
    return jsonable(
        {"kernel": kernel_small, "networks": nets, "features": features, "summary": summary, "sweep": sweep}
    )


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    s = result["summary"]
    std, adv, ker = s["standard"], s["adversarial"], s["kernel"]
    claims = []
    # measured values are unrounded: verdicts are decided on them, so the shown numbers must be the same.
    drops = {"network": std["clean"] - std["pgd"], "kernel": ker["clean"] - ker["pgd"]}
    ok = min(drops.values()) >= config.min_drop
    claims.append(
        Claim(
            id="C4.4-pgd",
            statement=f"PGD ({config.norm}, eps={config.eps}) lowers the test accuracy of the network and of the NTK "
            "kernel-regression predictor",
            measured={
                "network_clean": std["clean"],
                "network_pgd": std["pgd"],
                "kernel_clean": ker["clean"],
                "kernel_pgd": ker["pgd"],
                "drops": drops,
                "margin": min(drops.values()) - config.min_drop,
                "paper_budget": f"linf eps={PAPER_EPS} on MNIST in [0, 1] (CIFAR-10: 8/255), arXiv 2210.05577",
                "sweep": {
                    "eps": result["sweep"]["eps"],
                    "network_pgd": list(result["sweep"]["standard"]),
                    "kernel_pgd": list(result["sweep"]["kernel"]),
                },
            },
            threshold=f"accuracy drop >= {config.min_drop} for both at eps={config.eps}",
            passed=ok,
            note=("" if ok else "a predictor lost less accuracy than the threshold at this eps (see the eps sweep)")
            + ("" if config.eps == PAPER_EPS or not ok else f" (eps {config.eps} is not the paper's {PAPER_EPS})"),
            headline="margin",
        )
    )
    gap = std["random_sign"] - std["kernel_transfer"]
    ok = gap >= config.min_transfer_gap
    claims.append(
        Claim(
            id="C4.4-transfer",
            statement="adversarial examples crafted on the kernel predictor transfer to the (standard) network: they hurt "
            "it more than random-sign perturbations of the same size",
            measured={
                "network_clean": std["clean"],
                "network_on_kernel_adv": std["kernel_transfer"],
                "network_on_random_sign": std["random_sign"],
                "gap": gap,
            },
            threshold=f"random_sign - kernel_transfer >= {config.min_transfer_gap}",
            passed=ok,
            note="" if ok else "kernel-crafted examples are not much worse for the network than random noise",
            headline="gap",
        )
    )
    gain = adv["pgd"] - std["pgd"]
    ok = gain >= config.min_robust_gain
    sw = result["sweep"]
    losses = [n["adversarial"]["final_train_loss"] for n in result["networks"]]
    claims.append(
        Claim(
            id="C4.4-advtrain",
            statement="PGD adversarial training raises the network's robust (PGD) accuracy",
            measured={
                "standard_pgd": std["pgd"],
                "adversarial_pgd": adv["pgd"],
                "standard_clean": std["clean"],
                "adversarial_clean": adv["clean"],
                "gain": gain,
                "margin": gain - config.min_robust_gain,
                "gain_by_eps": {
                    str(e): a - b
                    for e, a, b in zip(sw["eps"], sw["adversarial"], sw["standard"], strict=True)  # PGD, each eps
                },
                "adversarial_final_train_loss": statistics.fmean(losses) if losses else None,
                "train_attack": {"eps": config.eps, "steps": config.train_pgd_steps or config.pgd_steps},
                "schedule": {
                    "epochs": config.adv_epochs,
                    "batch_size": config.adv_batch_size,
                    "lr": config.lr,
                    "lr_schedule": config.adv_lr_schedule,
                    "eps_warmup_epochs": config.adv_eps_warmup_epochs,
                },
            },
            threshold=f"robust accuracy gain >= {config.min_robust_gain}",
            passed=ok,
            note=""
            if ok
            else "adversarial training did not raise robust accuracy enough"
            + (f" (its final training loss {statistics.fmean(losses):.3f}; ln 10 = 2.303 is chance)" if losses else ""),
            headline="gain",
        )
    )
    f = result["features"]
    k = min(config.top_features, len(f["robustness"]) - 1)
    top = statistics.fmean(f["robustness"][:k]) if k > 0 else float("nan")
    rest = statistics.fmean(f["robustness"][k:]) if k > 0 else float("nan")
    ok = k > 0 and top > rest
    claims.append(
        Claim(
            id="C4.4-features",
            statement="robust NTK eigen-features sit at the top of the spectrum (Tsilivis & Kempe 2022): the features of "
            f"the {k} largest eigenvalues are more robust than the next {len(f['robustness']) - k}",
            measured={
                "mean_robustness_top": top,
                "mean_robustness_rest": rest,
                "mean_usefulness_top": statistics.fmean(f["usefulness"][:k]) if k > 0 else None,
                "mean_usefulness_rest": statistics.fmean(f["usefulness"][k:]) if k > 0 else None,
                "pair": f["pair"],
            },
            threshold="mean robustness (accuracy under PGD on the feature) of the top features > that of the rest",
            passed=ok,
            note="" if ok else "the top eigen-features are not more robust than the rest here",
            headline="mean_robustness_top",
        )
    )
    return claims


EXPERIMENT = Experiment(
    name="ntk-robustness",
    title="Adversarial robustness of networks and NTK predictors",
    paper="arXiv 2210.05577; arXiv 2307.02693; arXiv 1706.06083",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick={"seeds": 2, "pgd_steps": 10, "width": 256, "num_features": 20},  # adversarial training: the full schedule
    claims=("C4.4-pgd", "C4.4-transfer", "C4.4-advtrain", "C4.4-features"),
)
