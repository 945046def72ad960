"""Experiment ``ntk``: the empirical NTK approaches the analytic one with width (C4.1), and a wide MLP
trained by full-batch gradient descent on MSE follows the kernel dynamics, learning the top NTK
eigendirections first (C4.2).

docs/claims.md (Kempe et al. arXiv 2307.02693; Jacot et al. arXiv 1806.07572; Lee et al. arXiv
1902.06720). Nets are NTK-parameterized MLPs (:func:`symgen.ntk.ntk_mlp`) on the digits dataset with
inputs centred and scaled to ``||x||^2 / d = 1``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable
from symgen.experiments.ntk_figures import figures
from symgen.labels import accuracy, centred_one_hot

__all__ = ["Config", "EXPERIMENT", "kernel_trial", "dynamics_trial", "run", "check_claims", "figures"]


class Config(ExperimentConfig):
    """Settings of ``ntk``; defaults are the full setting, ``--quick`` shrinks them."""

    dataset: Literal["digits", "mnist1d"] = "digits"
    depth: int = 2
    activation: Literal["relu", "erf"] = "relu"
    weight_std: float = 1.5
    bias_std: float = 0.1
    dtype: Literal["float32", "float64"] = "float32"
    # C4.1: empirical vs analytic kernel against width
    widths: list[int] = Field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048, 4096])
    kernel_points: int = 64
    kernel_seeds: int = 5
    max_slope: float = -0.3  # fitted log-log slope must be at most this (theory: -1/2)
    # C4.2: gradient-descent dynamics of a wide net against the kernel prediction
    dynamics_width: int = 2048
    train_size: int = 128
    test_size: int = 256
    steps: int = 3000
    lr_factor: float = 0.5  # lr = lr_factor * n / lambda_max(Theta), stable below 2
    records: int = 30
    dynamics_seeds: int = 2
    discrete: bool = True  # compare with discrete-step kernel dynamics (False: gradient-flow formula)
    centered: bool = True  # train f(x; theta) - f(x; theta_0) (same NTK, starts at 0; arXiv 1902.06720 §2.3)
    max_deviation: float = 0.1  # ||f_net - f_kernel|| / ||y||, max over time, train and test
    bands: int = 3  # eigenvalue bands (by rank) for the spectral-bias claim

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or min(v) < 1:
            raise ValueError("widths must list at least two widths >= 1")
        return sorted(set(v))

    @field_validator(
        "kernel_points",
        "kernel_seeds",
        "dynamics_width",
        "train_size",
        "test_size",
        "steps",
        "records",
        "dynamics_seeds",
    )
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: int) -> int:
        if v < 2:  # one band has no order to check: C4.2-spectral would pass with nothing compared
            raise ValueError("bands must be >= 2")
        return v


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _inputs(dataset: str, n: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` class-balanced-ish random inputs, centred by the training mean, scaled to ||x||^2/d = 1."""
    from symgen.data import load_dataset
    from symgen.rng import as_generator

    x, y = load_dataset(dataset, split=split, generator=0)
    x = x.reshape(x.shape[0], -1).double()
    xtrain, _ = load_dataset(dataset, split="train", generator=0)
    x = x - xtrain.reshape(xtrain.shape[0], -1).double().mean(0)
    idx = torch.randperm(x.shape[0], generator=as_generator(seed))[:n]
    x = x[idx]
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12) * math.sqrt(x.shape[1])
    return x, y[idx]


def kernel_trial(item: dict) -> dict:
    """Relative Frobenius error ||Theta_emp - Theta_inf|| / ||Theta_inf|| of one random net (and of the NNGP).

    Args:
        item: the trial's settings (width, seed, architecture and data).

    Returns:
        the width, the seed and the relative error.
    """
    from symgen.models import ntk_mlp
    from symgen.ntk import analytic_ntk, empirical_ntk

    dtype, device = _dtype(item["dtype"]), torch.device(item.get("device", "cpu"))
    x, _ = _inputs(item["dataset"], item["points"], "train", item["data_seed"])
    x = x.to(device)
    _, ntk_inf = analytic_ntk(
        x, x, item["depth"], item["activation"], item["weight_std"], item["bias_std"], dtype=torch.float64
    )
    net = ntk_mlp(
        x.shape[1],
        item["width"],
        item["depth"],
        1,
        item["activation"],
        item["weight_std"],
        item["bias_std"],
        generator=item["seed"],
        dtype=dtype,
        device=device,
    )
    ntk_emp = empirical_ntk(net, x.to(dtype), method="auto").double()
    err = ((ntk_emp - ntk_inf).norm() / ntk_inf.norm()).item()
    return {"width": item["width"], "seed": item["seed"], "rel_error": err}


def _flat_full(k: torch.Tensor) -> torch.Tensor:
    """(N1, N2, O, O) -> (N1 O, N2 O), rows (i, a), columns (j, b)."""
    n1, n2, o, _ = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)


def dynamics_trial(item: dict) -> dict:
    """Train a wide NTK-param. MLP by full-batch GD on MSE; record it against ``gd_dynamics`` over time.

    Args:
        item: the trial's settings (width, seed, steps, lr factor, architecture and data).

    Returns:
        the trial's measurements (JSON-able).
    """
    from symgen.errors import DivergenceError
    from symgen.models import ntk_mlp
    from symgen.ntk import eigen_projections, empirical_ntk, gd_dynamics, kernel_eigh, residual_decay
    from symgen.training import fit

    dtype, device = _dtype(item["dtype"]), torch.device(item.get("device", "cpu"))
    xtr, ytr = _inputs(item["dataset"], item["train_size"], "train", item["seed"])
    xte, yte = _inputs(item["dataset"], item["test_size"], "test", item["seed"])
    xtr, ytr, xte, yte = xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)
    classes = int(max(ytr.max(), yte.max()).item()) + 1
    ytr_t = centred_one_hot(ytr, classes, torch.float64)
    yte_t = centred_one_hot(yte, classes, torch.float64)
    n, m, o = xtr.shape[0], xte.shape[0], classes
    net = ntk_mlp(
        xtr.shape[1],
        item["width"],
        item["depth"],
        o,
        item["activation"],
        item["weight_std"],
        item["bias_std"],
        generator=1000 + item["seed"],
        dtype=dtype,
        device=device,
    )
    xtr_, xte_ = xtr.to(dtype), xte.to(dtype)
    with torch.no_grad():
        f0_tr, f0_te = net(xtr_).double(), net(xte_).double()
    # Centred: the trained function is f(x; theta) - f(x; theta_0), which has the same NTK and starts at 0.
    shift_tr = f0_tr.to(dtype) if item["centered"] else torch.zeros_like(f0_tr, dtype=dtype)
    shift_te = f0_te.to(dtype) if item["centered"] else torch.zeros_like(f0_te, dtype=dtype)
    if item["centered"]:
        f0_tr, f0_te = torch.zeros_like(f0_tr), torch.zeros_like(f0_te)
    k_tr = _flat_full(empirical_ntk(net, xtr_, output="full").double())
    k_te = _flat_full(empirical_ntk(net, xte_, xtr_, output="full").double())
    evals, evecs = kernel_eigh(k_tr)
    lr = item["lr_factor"] * n / evals[0].item()
    steps = item["steps"]
    times = sorted({0, *np.unique(np.geomspace(1, steps, item["records"]).round().astype(int)).tolist()})

    # Kernel (linearized-net) prediction at all record times for train and test rows at once (one eigh).
    ker = gd_dynamics(
        k_tr,
        torch.cat([k_tr, k_te]),
        ytr_t.reshape(-1),
        times,
        lr,
        f0_tr.reshape(-1),
        torch.cat([f0_tr.reshape(-1), f0_te.reshape(-1)]),
        discrete=item["discrete"],
        normalization=n,
    )
    ker_tr, ker_te = ker[:, : n * o], ker[:, n * o :]
    net_tr, net_te = [], []
    record = set(times)

    def snapshot(step: int, model: torch.nn.Module) -> None:
        """Record the net's (centred) outputs after ``step`` GD steps (full batch: one step per epoch)."""
        if step in record:
            with torch.no_grad():
                net_tr.append((model(xtr_) - shift_tr).double().reshape(-1))
                net_te.append((model(xte_) - shift_te).double().reshape(-1))

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((output - shift_tr - target) ** 2).sum() / n

    snapshot(0, net)
    try:
        fit(
            net,
            (xtr_, ytr_t.to(dtype)),
            torch.optim.SGD(net.parameters(), lr=lr),
            loss_fn=loss_fn,
            steps=steps,
            batch_size=None,
            callback=snapshot,
        )
    except DivergenceError as e:
        raise DivergenceError(
            f"{e} Here lr = lr_factor * n / lambda_max: lower lr_factor (now {item['lr_factor']})."
        ) from e
    net_tr_t, net_te_t = torch.stack(net_tr), torch.stack(net_te)
    y_norm_tr, y_norm_te = ytr_t.norm().item(), yte_t.norm().item()
    dev_tr = ((net_tr_t - ker_tr).norm(dim=1) / y_norm_tr).tolist()
    dev_te = ((net_te_t - ker_te).norm(dim=1) / y_norm_te).tolist()

    # Spectral bias: training residual of the NET along eigenvectors of Theta, as a fraction of its start.
    res0 = eigen_projections(net_tr_t[0] - ytr_t.reshape(-1), evecs)
    res_t = eigen_projections((net_tr_t - ytr_t.reshape(1, -1)).T, evecs).T  # (T, N O)
    bands = np.array_split(np.arange(n * o), item["bands"])
    band_frac = [[(res_t[t, b].norm() / res0[b].norm()).item() for b in bands] for t in range(len(times))]
    # residual_decay takes a float or a 1-D tensor of times; the same conversion it applies itself.
    times_t = torch.as_tensor(times, dtype=evals.dtype, device=evals.device)
    theory = residual_decay(evals, times_t, lr, n, discrete=item["discrete"])  # (T, N O)
    band_theory = [
        [((theory[t, b] * res0[b]).norm() / res0[b].norm()).item() for b in bands] for t in range(len(times))
    ]
    acc = {
        "net_test": accuracy(net_te_t[-1].reshape(m, o), yte),
        "kernel_test": accuracy(ker_te[-1].reshape(m, o), yte),
    }
    loss_net = [(0.5 * ((r - ytr_t.reshape(-1)) ** 2).sum() / n).item() for r in net_tr_t]
    loss_ker = [(0.5 * ((r - ytr_t.reshape(-1)) ** 2).sum() / n).item() for r in ker_tr]
    return {
        "seed": item["seed"],
        "times": times,
        "lr": lr,
        "dev_train": dev_tr,
        "dev_test": dev_te,
        "band_fraction": band_frac,
        "band_theory": band_theory,
        "loss_net": loss_net,
        "loss_kernel": loss_ker,
        "eig_top": evals[:5].tolist(),
        "eig_band_mean": [evals[b].mean().item() for b in bands],
        "accuracy": acc,
    }


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    common = {
        "dataset": config.dataset,
        "depth": config.depth,
        "activation": config.activation,
        "weight_std": config.weight_std,
        "bias_std": config.bias_std,
        "dtype": config.dtype,
        "device": config.device,
    }
    kernel_items = [
        dict(common, width=w, seed=config.seed * 1000 + s, points=config.kernel_points, data_seed=config.seed)
        for w in config.widths
        for s in range(config.kernel_seeds)
    ]
    kernel = ctx.map(kernel_trial, kernel_items, desc="C4.1 widths x seeds")
    by_width = {}
    for w in config.widths:
        errs = [r["rel_error"] for r in kernel if r["width"] == w]
        by_width[w] = {"mean": float(np.mean(errs)), "std": float(np.std(errs)), "errors": errs}
        ctx.log(claim="C4.1", width=w, rel_error=by_width[w]["mean"])
    ws = np.log(np.array(config.widths, dtype=float))
    es = np.log(np.array([by_width[w]["mean"] for w in config.widths]))
    slope = float(np.polyfit(ws, es, 1)[0])

    dyn_items = [
        dict(
            common,
            width=config.dynamics_width,
            seed=config.seed * 1000 + s,
            train_size=config.train_size,
            test_size=config.test_size,
            steps=config.steps,
            lr_factor=config.lr_factor,
            records=config.records,
            discrete=config.discrete,
            centered=config.centered,
            bands=config.bands,
        )
        for s in range(config.dynamics_seeds)
    ]
    dynamics = ctx.map(dynamics_trial, dyn_items, desc="C4.2 GD runs")
    for d in dynamics:
        ctx.log(claim="C4.2", seed=d["seed"], max_dev_train=max(d["dev_train"]), max_dev_test=max(d["dev_test"]))
    return jsonable(
        {
            "kernel": {"by_width": {str(k): v for k, v in by_width.items()}, "slope": slope, "widths": config.widths},
            "dynamics": dynamics,
        }
    )


def _spectral_time(d: dict) -> int:
    """Index of the record time where the middle of the decay happens: the first time the top band's
    remaining fraction drops below 1/e (the last time if it never does)."""
    for t, fr in enumerate(d["band_fraction"]):
        if fr[0] < math.exp(-1):
            return t
    return len(d["band_fraction"]) - 1


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    k = result["kernel"]
    # Unrounded throughout: verdicts are decided on these numbers, so the shown ones must be the same.
    means = {w: v["mean"] for w, v in k["by_width"].items()}
    first, last = means[str(k["widths"][0])], means[str(k["widths"][-1])]
    ok1 = k["slope"] <= config.max_slope and last < first
    claims = [
        Claim(
            id="C4.1",
            statement="the empirical NTK of a wide MLP at init approaches the analytic NTK as width grows",
            measured={"rel_error_by_width": means, "loglog_slope": k["slope"]},
            threshold=f"log-log slope <= {config.max_slope} (theory -0.5) and error(widest) < error(narrowest)",
            passed=bool(ok1),
            headline="loglog_slope",
            paper=-0.5,  # the 1/sqrt(width) convergence of the empirical NTK at init (arXiv 1806.07572)
            note="" if ok1 else "relative error does not fall fast enough with width",
        )
    ]

    dyn = result["dynamics"]
    dev_tr = max(max(d["dev_train"]) for d in dyn)
    dev_te = max(max(d["dev_test"]) for d in dyn)
    ok2 = dev_tr <= config.max_deviation and dev_te <= config.max_deviation
    claims.append(
        Claim(
            id="C4.2",
            statement=f"a width-{config.dynamics_width} MLP trained by full-batch GD on MSE tracks the kernel-dynamics "
            "prediction f_t = f_0 + Theta_xX Theta^-1 (I - exp(-lr Theta t)) (y - f_0) on train and test",
            measured={
                "max_dev_train": dev_tr,
                "max_dev_test": dev_te,
                "net_test_acc": [d["accuracy"]["net_test"] for d in dyn],
                "kernel_test_acc": [d["accuracy"]["kernel_test"] for d in dyn],
            },
            threshold=f"max over time of ||f_net - f_kernel|| / ||y|| <= {config.max_deviation} (train and test)",
            passed=bool(ok2),
            headline="max_dev_train" if dev_tr > dev_te else "max_dev_test",
            note="" if ok2 else "the net departs from its linearization; increase dynamics_width",
        )
    )

    fracs, ordered = [], True
    for d in dyn:
        t = _spectral_time(d)
        fr = d["band_fraction"][t]
        fracs.append({"time": d["times"][t], "net": list(fr), "theory": list(d["band_theory"][t])})
        ordered &= all(a < b for a, b in zip(fr[:-1], fr[1:], strict=True))
    claims.append(
        Claim(
            id="C4.2-spectral",
            statement="the net's training residual decays first along the top NTK eigendirections (spectral bias)",
            measured={"remaining_fraction_by_band_top_to_bottom": fracs},
            threshold=f"remaining residual fraction strictly increases from the top to the bottom of {config.bands} "
            "eigenvalue bands, at the time the top band falls below 1/e",
            passed=bool(ordered),
            headline="remaining_fraction_by_band_top_to_bottom.0",
            note="" if ordered else "band fractions are not ordered by eigenvalue",
        )
    )
    return claims


EXPERIMENT = Experiment(
    name="ntk",
    title="Neural tangent kernel: width convergence and gradient-descent dynamics",
    paper="arXiv 2307.02693 (Kempe et al.), arXiv 1806.07572, arXiv 1902.06720",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick={
        "widths": [64, 128, 256, 512, 1024],
        "kernel_points": 32,
        "kernel_seeds": 3,
        "dynamics_width": 1024,
        "train_size": 64,
        "test_size": 128,
        "steps": 800,
        "records": 20,
        "dynamics_seeds": 1,
    },
    claims=("C4.1", "C4.2", "C4.2-spectral"),
)
