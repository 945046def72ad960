"""Experiment ``implicit-bias``: linear steerable networks converge to the G-invariant max-margin classifier.

Claims C1.1-C1.4 (Chen & Zhu, arXiv 2303.04198; the claims, thresholds and protocol: docs/claims.md).
The data sets and their group actions are in :mod:`symgen.experiments.implicit_bias_data`. Models: a linear steerable
network (lifting, group convolutions, invariant readout; depths 1-3) on raw data, a linear
fully-connected net of the same depth on the orbit-augmented data, and the same FC net on raw data.
Training: gradient descent on log L(theta), L the mean exponential loss (the normalized gradient
grad L / L), with the step clipped to ``max_step`` in parameter norm; every member of a trial
(training sizes x seeds) is trained at once with ``torch.func.vmap``. References: homogeneous
hard-margin SVMs from an exact QP (``symgen.margins``). The loop is this module's own, not
``symgen.training.fit``: it steps all members together, each with its own normalized, clipped step.
"""

from __future__ import annotations

import math
from typing import Literal, TypedDict, cast

import torch
from pydantic import Field, field_validator
from torch import Tensor
from torch.func import vmap

from symgen.errors import ConfigError, DivergenceError
from symgen.experiments.base import Claim, Context, Experiment, ExperimentConfig, jsonable, num_threads
from symgen.experiments.implicit_bias_data import DATASETS, Dataset, group_action, make_dataset
from symgen.experiments.implicit_bias_figures import figures
from symgen.models import LinearFCNet
from symgen.nn import LinearSteerableNet

__all__ = ["Config", "EXPERIMENT", "make_dataset", "train_trial", "run", "check_claims", "figures"]

KINDS = ("steerable", "fc_augmented", "fc_raw")


class Config(ExperimentConfig):
    """Settings of ``implicit-bias``; defaults are the full setting, ``--quick`` shrinks them."""

    # Non-empty lists: a claim over no dataset, depth or size would pass with nothing measured.
    datasets: list[Dataset] = Field(default_factory=lambda: list(DATASETS), min_length=1)
    depths: list[int] = Field(default_factory=lambda: [1, 2, 3])
    train_sizes: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64])
    claim_size: int = 32
    seeds: int = Field(5, ge=1)
    width: int = Field(16, ge=1)
    steps: int = Field(6000, ge=1)
    lr: float = Field(1.0, gt=0)
    max_step: float = Field(1.0, gt=0)
    records: int = Field(40, ge=1)
    cyclic_channels: int = 3
    cyclic_length: int = 8
    cyclic_margin: float = 0.3
    digits_pair: tuple[int, int] = (3, 4)
    test_size: int = Field(2000, ge=1)
    dtype: Literal["float64", "float32"] = "float64"

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("depths must be a non-empty list of integers >= 1")
        return v

    @field_validator("train_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 2:
            raise ValueError("train_sizes must be a non-empty list of integers >= 2")
        return sorted(set(v))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def _factory(kind: str, action, shape: tuple[int, ...], depth: int, width: int):
    if kind == "steerable":
        # stacked_init seeds the global generator per member (isolated_seed): draw from it, as nn.Linear does.
        return lambda: LinearSteerableNet(action, shape, depth, width)
    return lambda: LinearFCNet(shape, depth, width)


# ----------------------------------------------------------------------------------------------
# Trial
# ----------------------------------------------------------------------------------------------


class _Reference(TypedDict):
    """One member's training set and its max-margin references (invariant and raw SVM)."""

    inv: Tensor
    raw: Tensor
    inv_margin: float
    raw_margin: float
    xa: Tensor
    ya: Tensor
    x: Tensor
    y: Tensor


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def train_trial(item: dict) -> dict:
    """Train every (size, seed) member of one (dataset, model kind, depth) at once; a pure function of ``item``.

    Args:
        item: the trial's input: ``dataset``, ``kind``, ``depth``, ``index`` and the ``config`` dict.

    Returns:
        per member: the learned predictor, its alignment with the SVM references, margins and accuracy.
    """
    # Tiny matrices: intra-op threads only add synchronization (10x slower on a loaded 2-core box).
    with num_threads(1 if torch.device(item["config"]["device"]).type == "cpu" else None):
        return _train_trial(item)


def _train_trial(item: dict) -> dict:
    from symgen.augment import OrbitAugment
    from symgen.functional import call, stacked_init
    from symgen.margins import hard_margin_svm, normalized_margin

    cfg = item["config"]
    dataset, kind, depth = item["dataset"], item["kind"], int(item["depth"])
    dtype = getattr(torch, cfg["dtype"])
    action, shape = group_action(dataset, cfg)
    d = math.prod(shape)
    order = action.group.order
    sizes, seeds = cfg["train_sizes"], list(range(cfg["seed"], cfg["seed"] + cfg["seeds"]))
    members = [(n, s) for s in seeds for n in sizes]
    pools = {s: make_dataset(dataset, cfg, s, max(sizes)) for s in seeds}

    # Per-member training sets, padded to a common length; padded points get weight 0 (log-weight -inf).
    xs, ys = [], []
    refs: list[_Reference] = []
    for n, s in members:
        x, y = pools[s]["x_train"][:n], pools[s]["y_train"][:n]
        xa, ya = OrbitAugment(action)(x, y)
        sol_aug = hard_margin_svm(xa.double(), ya.double())
        sol_raw = hard_margin_svm(x.double(), y.double())
        refs.append(
            {
                "inv": sol_aug.direction.reshape(-1),
                "raw": sol_raw.direction.reshape(-1),
                "inv_margin": sol_aug.margin,
                "raw_margin": sol_raw.margin,
                "xa": xa,
                "ya": ya,
                "x": x,
                "y": y,
            }
        )
        xt, yt = (xa, ya) if kind == "fc_augmented" else (x, y)
        xs.append(xt)
        ys.append(yt)
    length = max(len(x) for x in xs)
    m_count = len(members)
    X = torch.zeros(m_count, length, *shape, dtype=dtype)
    Y = torch.ones(m_count, length, dtype=dtype)
    LW = torch.full((m_count, length), -math.inf, dtype=dtype)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        X[i, : len(x)], Y[i, : len(y)], LW[i, : len(x)] = x, y, -math.log(len(x))
    device = torch.device(cfg["device"])
    X, Y, LW = X.to(device), Y.to(device), LW.to(device)

    model, params, _ = stacked_init(
        _factory(kind, action, shape, depth, cfg["width"]),
        m_count,
        generator=10_000 * item["index"] + cfg["seed"],
        dtype=dtype,
        device=device,
    )

    forward = vmap(lambda p, x: call(model, p, None, x))
    eye = torch.eye(d, dtype=dtype, device=device).reshape(d, *shape)
    beta_fn = vmap(lambda p: call(model, p, None, eye).reshape(-1))
    inv_ref = torch.stack([r["inv"] for r in refs]).to(device=device, dtype=dtype)
    raw_ref = torch.stack([r["raw"] for r in refs]).to(device=device, dtype=dtype)

    steps = int(cfg["steps"])
    record_at = sorted(
        {int(round(v)) for v in torch.logspace(0, math.log10(steps), cfg["records"]).tolist()} | {0, steps}
    )
    traj_steps, traj_inv, traj_raw = [], [], []

    def record(step: int) -> None:
        with torch.no_grad():
            b = _unit(beta_fn(params))
        traj_steps.append(step)
        traj_inv.append((1 - (b * inv_ref).sum(1)).tolist())
        traj_raw.append((1 - (b * raw_ref).sum(1)).tolist())

    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    leaves = list(params.values())
    lr, max_step = float(cfg["lr"]), float(cfg["max_step"])
    for step in range(steps + 1):
        if step in record_at:
            record(step)
        if step == steps:
            break
        # log L_m = log mean_i exp(-y_i f_m(x_i)) per member m; its gradient is the normalized gradient
        # grad L / L. Members are independent, so the gradient of the sum is each member's own gradient.
        log_loss = torch.logsumexp(-Y * forward(params, X) + LW, dim=1)
        grads = torch.autograd.grad(log_loss.sum(), leaves)
        with torch.no_grad():
            # grads is one tensor per leaf and the model has leaves: the sum is a Tensor, never the int 0.
            gnorm = torch.sqrt(cast(Tensor, sum(g.reshape(m_count, -1).pow(2).sum(1) for g in grads)))
            if not bool(torch.isfinite(gnorm).all()):
                raise DivergenceError(
                    f"implicit-bias: non-finite gradient at step {step} ({dataset}, {kind}, "
                    f"depth {depth}); lower lr or max_step."
                )
            scale = lr * torch.clamp(max_step / (lr * gnorm), max=1.0)  # step length <= max_step
            for p, g in zip(leaves, grads, strict=True):
                p.sub_(scale.view(-1, *([1] * (p.ndim - 1))) * g)

    with torch.no_grad():
        betas = beta_fn(params).double().cpu()
    out_members = []
    for i, ((n, s), r) in enumerate(zip(members, refs, strict=True)):
        b = betas[i]
        bx = b.reshape(shape)
        proj = action.orbit(bx).mean(0).reshape(-1)
        te = pools[s]
        acc = float(
            ((te["x_test"].double().reshape(len(te["x_test"]), -1) @ b).sign() == te["y_test"].double()).double().mean()
        )
        out_members.append(
            {
                "size": n,
                "seed": s,
                "cos_inv_svm": float(_unit(b) @ r["inv"]),
                "cos_raw_svm": float(_unit(b) @ r["raw"]),
                "invariance_error": float((b - proj).norm() / b.norm()),
                "margin_augmented": normalized_margin(b, r["xa"].double(), r["ya"].double()),
                "margin_raw": normalized_margin(b, r["x"].double(), r["y"].double()),
                "svm_inv_margin": r["inv_margin"],
                "svm_raw_margin": r["raw_margin"],
                "test_accuracy": acc,
                "beta": b.tolist(),
            }
        )
    return jsonable(
        {
            "dataset": dataset,
            "kind": kind,
            "depth": depth,
            "group": action.group.name,
            "dim": d,
            "group_order": order,
            "members": out_members,
            "trajectory": {"steps": traj_steps, "one_minus_cos_inv": traj_inv, "one_minus_cos_raw": traj_raw},
        }
    )


def _reference_trial(item: dict) -> dict:
    """Cross-check of the invariant SVM: orbit augmentation vs Reynolds projection (unitary action)."""
    from symgen.margins import invariant_max_margin

    cfg = item["config"]
    action, _ = group_action(item["dataset"], cfg)
    rows = []
    for s in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
        data = make_dataset(item["dataset"], cfg, s, cfg["claim_size"])
        x, y = data["x_train"].double(), data["y_train"].double()
        a = invariant_max_margin(x, y, action, method="augment").reshape(-1)
        r = invariant_max_margin(x, y, action, method="reynolds").reshape(-1)
        rows.append({"seed": s, "cos_augment_reynolds": float(a @ r)})
    return {"dataset": item["dataset"], "rows": rows}


# ----------------------------------------------------------------------------------------------
# run / claims / figures
# ----------------------------------------------------------------------------------------------


def run(config: Config, ctx: Context) -> dict:
    """Run the experiment: every trial through ``ctx.map``, then the summaries the claims read.

    Args:
        config: the experiment's settings.
        ctx: where trials run and metrics go (:class:`~symgen.experiments.base.Context`).

    Returns:
        the JSON-able result that ``check_claims`` and ``figures`` take.
    """
    if config.claim_size not in config.train_sizes:
        raise ConfigError(f"claim_size={config.claim_size} must be one of train_sizes={config.train_sizes}.")
    cfg = config.model_dump()
    items = [
        {"index": i, "dataset": ds, "kind": kind, "depth": depth, "config": cfg}
        for i, (ds, depth, kind) in enumerate(
            (ds, depth, kind) for ds in config.datasets for depth in config.depths for kind in KINDS
        )
    ]
    trials = ctx.map(train_trial, items, desc="implicit-bias trials")
    refs = ctx.map(
        _reference_trial, [{"dataset": ds, "config": cfg} for ds in config.datasets], desc="SVM cross-checks"
    )
    for t in trials:
        ctx.log(
            dataset=t["dataset"],
            kind=t["kind"],
            depth=t["depth"],
            min_cos_inv=min(m["cos_inv_svm"] for m in t["members"]),
            min_cos_raw=min(m["cos_raw_svm"] for m in t["members"]),
        )
    # Direction agreement of the steerable net and the FC net on augmented data (same data, depth).
    pairs = []
    index = {(t["dataset"], t["kind"], t["depth"]): t for t in trials}
    for ds in config.datasets:
        for depth in config.depths:
            st, fa = index[(ds, "steerable", depth)], index[(ds, "fc_augmented", depth)]
            for a, b in zip(st["members"], fa["members"], strict=True):
                ba, bb = torch.tensor(a["beta"]), torch.tensor(b["beta"])
                pairs.append(
                    {
                        "dataset": ds,
                        "depth": depth,
                        "size": a["size"],
                        "seed": a["seed"],
                        "cos_steerable_fc_augmented": float(ba @ bb / (ba.norm() * bb.norm())),
                    }
                )
    return jsonable({"trials": trials, "agreement": pairs, "svm_crosscheck": refs})


def _members(result: dict, kind: str, size: int | None = None) -> list[dict]:
    out = []
    for t in result["trials"]:
        if t["kind"] == kind:
            out += [
                dict(m, dataset=t["dataset"], depth=t["depth"])
                for m in t["members"]
                if size is None or m["size"] == size
            ]
    return out


def check_claims(config: Config, result: dict) -> list[Claim]:
    """The claims of this experiment on ``result``, in the order of ``EXPERIMENT.claims`` (docs/claims.md).

    Args:
        config: the settings the result was computed with (thresholds are read from it).
        result: ``run``'s output.

    Returns:
        one :class:`~symgen.experiments.base.Claim` per claim id, with the measured values and the verdict.
    """
    size = config.claim_size
    steer, fca, fcr = (_members(result, k, size) for k in KINDS)
    claims = []

    cos_steer = min(m["cos_inv_svm"] for m in steer)
    inv_err = max(m["invariance_error"] for m in steer)
    ok = cos_steer >= 0.99 and inv_err <= 1e-6
    claims.append(
        Claim(
            id="C1.1",
            statement=f"linear steerable nets (depths {config.depths}) converge to the invariant max-margin "
            "direction, staying in Fix(rho_0)",
            measured={"min_cos_to_invariant_svm": cos_steer, "max_invariance_error": inv_err, "members": len(steer)},
            threshold={"min_cos": 0.99, "max_invariance_error": 1e-6},
            passed=ok,
            headline="min_cos_to_invariant_svm",
            note="" if ok else "cos below 0.99 or beta left Fix(rho_0); more steps or a larger max_step may be needed",
        )
    )

    cos_fca = min(m["cos_inv_svm"] for m in fca)
    agree = [p["cos_steerable_fc_augmented"] for p in result["agreement"] if p["size"] == size]
    cos_agree = min(agree)
    ok = cos_fca >= 0.99 and cos_agree >= 0.99
    claims.append(
        Claim(
            id="C1.2",
            statement="an FC net on orbit-augmented data reaches the same direction as the steerable net",
            measured={"min_cos_fc_augmented_to_invariant_svm": cos_fca, "min_cos_steerable_vs_fc_augmented": cos_agree},
            threshold={"min_cos": 0.99},
            passed=ok,
            headline="min_cos_fc_augmented_to_invariant_svm",
            note="" if ok else "one of the cosines is below 0.99",
        )
    )

    diffs = [a["margin_augmented"] - b["margin_augmented"] for a, b in zip(steer, fcr, strict=True)]
    cos_raw = min(m["cos_raw_svm"] for m in fcr)
    frac = sum(x >= 0 for x in diffs) / len(diffs)
    ok = min(diffs) >= 0 and cos_raw >= 0.99
    claims.append(
        Claim(
            id="C1.3",
            statement="the steerable net's normalized margin on the augmented training set is >= the raw FC "
            "net's; the raw FC net converges to the raw-data SVM",
            measured={
                "mean_margin_steerable": sum(a["margin_augmented"] for a in steer) / len(steer),
                "mean_margin_fc_raw": sum(b["margin_augmented"] for b in fcr) / len(fcr),
                "min_margin_difference": min(diffs),
                "fraction_steerable_ge": frac,
                "min_cos_fc_raw_to_raw_svm": cos_raw,
            },
            threshold={"min_margin_difference": 0.0, "min_cos": 0.99},
            passed=ok,
            headline="min_margin_difference",
            note="" if ok else "some raw FC net had a larger augmented margin, or did not reach the raw SVM",
        )
    )

    per = {}
    for ds in config.datasets:
        for depth in config.depths:
            acc = {
                k: [m["test_accuracy"] for m in _members(result, k) if m["dataset"] == ds and m["depth"] == depth]
                for k in KINDS
            }
            per[f"{ds}/depth{depth}"] = {k: round(sum(acc[k]) / len(acc[k]), 4) for k in ("steerable", "fc_raw")}
    ok = all(v["steerable"] >= v["fc_raw"] for v in per.values())
    worst = min(per.items(), key=lambda kv: kv[1]["steerable"] - kv[1]["fc_raw"])
    claims.append(
        Claim(
            id="C1.4",
            statement=f"held-out invariant test accuracy, mean over seeds and training sizes {config.train_sizes}: "
            "steerable >= raw FC",
            measured=per,
            threshold="steerable >= fc_raw in every dataset/depth",
            passed=ok,
            headline=f"{worst[0]}.steerable",  # the setting where steerable leads raw FC by the least
            note="" if ok else f"steerable below raw FC at {worst[0]}: {worst[1]}",
        )
    )
    return claims


EXPERIMENT = Experiment(
    name="implicit-bias",
    title="Implicit bias of linear equivariant steerable networks",
    paper="arXiv 2303.04198",
    config=Config,
    run=run,
    check_claims=check_claims,
    figures=figures,
    quick={
        "datasets": ["cyclic", "digits-d4"],
        "train_sizes": [4, 8, 16, 32],
        "seeds": 3,
        "steps": 1000,
        "width": 8,
        "records": 25,
        "test_size": 1000,
    },
    claims=("C1.1", "C1.2", "C1.3", "C1.4"),
)
