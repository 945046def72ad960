"""symgen audit: model and checkpoint loading, every section against an independent computation, the CLI.

References are independent of the library: brute-force loops over samples and group elements,
dense Hessians and Jacobians of a tiny float64 MLP (torch.autograd.functional), a closed-form
worst-case attack on a linear binary classifier, and the scale symmetries known by construction.
"""

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symgen.audit import BUDGETS, AuditResult, audit, load_checkpoint, load_model
from symgen.cli import main
from symgen.errors import CheckpointError, ConfigError, GroupActionError, ShapeError
from symgen.runs import RunStore, run_audit, write_audit_run

USER_MODEL = Path(__file__).parent / "audit_user_model.py"
# Tiny sizes; a generous time limit so a loaded test machine never skips a section.
TINY = dict(
    time_limit=600.0,
    eval_num_data=None,
    invariance_num_data=32,
    symmetry_num_data=8,
    hessian_num_data=32,
    hutchinson_probes=4,
    top_eigenvalues=1,
    eigen_iters=5,
    density_runs=1,
    density_steps=5,
    noise_num_data=32,
    noise_num_samples=2,
    ntk_num_data=8,
    ntk_subsamples=2,
    pgd_num_data=16,
    pgd_steps=2,
)


@pytest.fixture(scope="module")
def digits3():
    """Digits 0, 1, 2: 60 train and 30 test images (N, 1, 8, 8), float64."""
    from symgen.data import load_dataset

    out = []
    for split, n in (("train", 60), ("test", 30)):
        x, y = load_dataset("digits", split)
        keep = torch.nonzero(y < 3).flatten()[:n]
        out.append((x[keep].double(), y[keep]))
    return out


def _tiny_mlp():
    torch.manual_seed(0)
    from audit_user_model import TinyMLP

    return TinyMLP().double()


# ------------------------------------------------------------------------------------ model loading


def test_load_model_from_file_and_module():
    m1 = load_model(f"{USER_MODEL}:make_model")
    m2 = load_model("audit_user_model:make_model")  # tests/ is on sys.path (conftest)
    assert isinstance(m1, nn.Module) and not m1.training
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    m3 = load_model("audit_user_model:SmallBNCNN", dtype=torch.float64)  # a class is a factory too
    assert next(m3.parameters()).dtype == torch.float64


@pytest.mark.parametrize(
    "spec, message",
    [
        ("audit_user_model", "MODULE:FACTORY"),
        ("audit_user_model:", "MODULE:FACTORY"),
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("missing_file.py:make", "does not exist"),
        ("audit_user_model:nope", "has no attribute 'nope'"),
        ("audit_user_model:make_not_a_module", "must return a torch.nn.Module"),
        ("audit_user_model:NOT_A_FACTORY", "not a factory"),
    ],
)
def test_load_model_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_model(spec)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    trained = load_model("audit_user_model:make_model")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "ck.pt"
    torch.save(trained.state_dict(), path)
    loaded = load_model("audit_user_model:make_model", path)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A wrapped checkpoint and a DataParallel prefix load too.
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "wrapped.pt"
    )
    wrapped = load_model("audit_user_model:make_model", tmp_path / "wrapped.pt")
    assert torch.equal(wrapped.head.weight, trained.head.weight)

    state = dict(trained.state_dict())
    del state["head.weight"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_model("audit_user_model:make_model", tmp_path / "bad.pt")
    assert "missing keys ['head.weight']" in str(err.value) and "unexpected keys ['extra.weight']" in str(err.value)
    with pytest.raises(CheckpointError, match=r"conv1.weight: checkpoint \(8, 1, 3, 3\) vs model \(12, 1, 3, 3\)"):
        load_model("audit_user_model:make_wide_model", path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(trained, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(trained, tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(trained, tmp_path / "list.pt")


# ------------------------------------------------------------------------------------ sections


def test_performance_matches_a_loop(digits3):
    train, test = digits3
    model = _tiny_mlp()
    res = audit(model, {"train": train, "test": test}, sections=["performance"])
    for split, (x, y) in (("train", train), ("test", test)):
        correct, losses = 0, []
        for i in range(x.shape[0]):  # one sample at a time
            with torch.no_grad():
                out = model(x[i : i + 1])
            correct += int(out.argmax() == y[i])
            losses.append(float(F.cross_entropy(out, y[i : i + 1])))
        acc = correct / x.shape[0]
        assert res.value("performance", f"{split}_accuracy") == pytest.approx(acc)
        assert res["performance"].values[f"{split}_accuracy"].stderr == pytest.approx(
            math.sqrt(acc * (1 - acc) / x.shape[0])
        )
        assert res.value("performance", f"{split}_loss") == pytest.approx(np.mean(losses), rel=1e-10)
        assert res["performance"].values[f"{split}_loss"].stderr == pytest.approx(
            np.std(losses, ddof=1) / math.sqrt(len(losses)), rel=1e-8
        )
    assert res["invariance"].status == "skipped" and res["ntk"].status == "skipped"


def test_invariance_against_brute_force(digits3):
    train, test = digits3
    x, y = test
    torch.manual_seed(1)
    from audit_user_model import RotationInvariant, SmallBNCNN

    inv = RotationInvariant(SmallBNCNN(classes=3).double()).eval()
    plain = _tiny_mlp()  # flattens the image: far from invariant
    lim = dict(TINY, invariance_num_data=1000)
    r_inv = audit(inv, (x, y), "c4", limits=lim, sections=["invariance"])
    assert r_inv.value("invariance", "osp") == pytest.approx(4.0)
    assert r_inv.value("invariance", "kl") < 1e-12
    r = audit(plain, (x, y), "c4", limits=lim, sections=["invariance"])
    with torch.no_grad():
        ref = plain(x)
        agree = [
            float((plain(torch.rot90(x, k, dims=(-2, -1))).argmax(1) == ref.argmax(1)).double().mean())
            for k in range(4)
        ]
        logp0 = torch.log_softmax(ref, -1)
        kls = []
        for k in range(4):
            logp = torch.log_softmax(plain(torch.rot90(x, k, dims=(-2, -1))), -1)
            kls.append(
                float(
                    0.5
                    * (
                        F.kl_div(logp, logp0, log_target=True, reduction="sum")
                        + F.kl_div(logp0, logp, log_target=True, reduction="sum")
                    )
                    / x.shape[0]
                )
            )
    assert r["invariance"].details["agreement"] == pytest.approx(agree)
    assert r.value("invariance", "osp") == pytest.approx(sum(agree))
    assert r.value("invariance", "kl") == pytest.approx(np.mean(kls), rel=1e-8)
    assert sum(agree) < 3.5 and r["invariance"].values["osp"].stderr > 0
    with pytest.raises(GroupActionError):
        audit(plain, (x[:, :, :, :6], y), "c4", sections=["invariance"])  # 8x6 images are not square


def test_scale_symmetries_known_by_construction(digits3):
    train, _ = digits3
    model = load_model("audit_user_model:make_model", dtype=torch.float64)
    res = audit(model, train, limits=TINY, sections=["scale_symmetries"])
    sec = res["scale_symmetries"]
    # conv1 and conv2 each feed a BatchNorm: one factor per filter (8 + 8); the head feeds nothing.
    assert sorted(s["weight"] for s in sec.details["symmetries"]) == ["conv1.weight", "conv2.weight"]
    assert res.value("scale_symmetries", "groups") == 2
    assert res.value("scale_symmetries", "filters") == 16
    n = {k: p.numel() for k, p in model.named_parameters()}
    assert res.value("scale_symmetries", "parameter_fraction") == pytest.approx(
        (n["conv1.weight"] + n["conv2.weight"]) / sum(n.values())
    )
    mlp = audit(_tiny_mlp(), train, limits=TINY, sections=["scale_symmetries"])
    assert mlp.value("scale_symmetries", "groups") == 0


def _dense_ntk(model, x):
    params = dict(model.named_parameters())
    names = list(params)

    def f(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    j = torch.cat([t.reshape(x.shape[0], -1, t[0, 0].numel()) for t in jac], dim=-1)  # (N, O, P)
    return torch.einsum("iap,jap->ij", j, j)


def test_ntk_metrics_against_dense_jacobian(digits3):
    _, (x, y) = digits3
    model = _tiny_mlp()
    n = x.shape[0]
    # One subsample of every input: the metrics do not depend on the order of the samples.
    res = audit(model, (x, y), limits=dict(TINY, ntk_num_data=n, ntk_subsamples=1), sections=["ntk"])
    k = _dense_ntk(model, x).detach().numpy()
    lam = np.clip(np.linalg.eigvalsh(k)[::-1], 0, None)
    p = lam / lam.sum()
    t = np.eye(3)[y.numpy()] - 1 / 3
    yy = t @ t.T
    assert res.value("ntk", "effective_rank") == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-8)
    assert res.value("ntk", "log10_condition_number") == pytest.approx(np.log10(lam[0] / lam[-1]), rel=1e-6)
    assert res.value("ntk", "target_alignment") == pytest.approx(
        (k * yy).sum() / (np.linalg.norm(k) * np.linalg.norm(yy)), rel=1e-8
    )
    # Several subsamples: a standard error over them.
    res2 = audit(model, (x, y), limits=dict(TINY, ntk_num_data=10, ntk_subsamples=3), sections=["ntk"])
    assert res2["ntk"].details["subsamples"] == 3
    assert res2["ntk"].values["target_alignment"].stderr > 0


def _dense_hessian(model, x, y):
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(flat):
        tensors = dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)), strict=True))
        return F.cross_entropy(torch.func.functional_call(model, tensors, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def test_hessian_against_dense_hessian(digits3):
    train, _ = digits3
    model = _tiny_mlp()
    n = train[0].shape[0]
    res = audit(
        model,
        train,
        limits=dict(
            TINY,
            hessian_num_data=n,
            hutchinson_probes=60,
            top_eigenvalues=2,
            eigen_iters=400,
            density_runs=1,
            density_steps=30,
        ),
        sections=["hessian"],
    )
    h = _dense_hessian(model, *train)
    exact = torch.linalg.eigvalsh(h).flip(0)
    tr = res["hessian"].values["trace"]
    assert tr.stderr > 0 and abs(tr.value - float(h.trace())) <= 4 * tr.stderr + 1e-8 * abs(float(h.trace()))
    for i in range(2):
        est = res["hessian"].values[f"eigenvalue_{i + 1}"]
        assert est.value == pytest.approx(float(exact[i]), rel=2e-3)
        assert abs(est.value - float(exact[i])) <= est.stderr + 1e-9 * abs(float(exact[i]))
    # SLQ's nodes are Ritz values: inside the spectrum.
    assert res.value("hessian", "smallest_ritz_value") >= float(exact[-1]) - 1e-9
    assert len(res["hessian"].details["density"]) == len(res["hessian"].details["density_grid"])


def test_ggn_top_eigenvalue_beside_the_hessian(digits3):
    # A linear classifier has no second derivative of its outputs, so H = J^T H_loss J = G exactly:
    # the GGN's top eigenvalue equals the dense Hessian's (cross-entropy here; MSE behaves the same).
    train, _ = digits3
    x, y = train
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double()
    lim = dict(TINY, hessian_num_data=x.shape[0], top_eigenvalues=1, eigen_iters=200)
    res = audit(linear, train, limits=lim, sections=["hessian"])
    top = float(torch.linalg.eigvalsh(_dense_hessian(linear, x, y))[-1])
    ggn = res["hessian"].values["ggn_top_eigenvalue"]
    assert ggn.value == pytest.approx(top, rel=1e-6)
    assert ggn.value == pytest.approx(res.value("hessian", "eigenvalue_1"), rel=1e-6)
    # A nonlinear net: the dense J^T H_loss J, built from explicit Jacobians.
    model = _tiny_mlp()
    res = audit(model, train, limits=lim, sections=["hessian"])
    params = dict(model.named_parameters())
    names = list(params)

    def f(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    j = torch.cat([t.reshape(x.shape[0] * 3, -1) for t in jac], dim=1)  # (N * O, P)
    out = f(*params.values()).detach().reshape(-1)
    h_out = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.reshape(-1, 3), y), out)
    g = j.T @ h_out @ j
    assert res.value("hessian", "ggn_top_eigenvalue") == pytest.approx(float(torch.linalg.eigvalsh(g)[-1]), rel=1e-6)


def test_noise_stability_matches_second_order_expansion(digits3):
    # E_U[L(W + U)] - L(W) = sigma^2/2 tr(H) + O(sigma^4): at small sigma the dense Hessian predicts it.
    train, _ = digits3
    model = _tiny_mlp()
    n = train[0].shape[0]
    sigmas = (1e-3, 3e-3)
    res = audit(
        model,
        train,
        limits=dict(TINY, hessian_num_data=n, noise_num_data=n, noise_num_samples=64, noise_sigmas=sigmas),
        sections=["hessian", "noise_stability"],
    )
    tr = float(_dense_hessian(model, *train).trace())
    for sigma, pred in zip(sigmas, res["noise_stability"].details["predicted"], strict=True):
        est = res["noise_stability"].values[f"loss_increase@{sigma:g}"]
        exact = 0.5 * sigma**2 * tr
        assert est.stderr > 0
        assert abs(est.value - exact) <= 4 * est.stderr + 0.02 * exact, (sigma, est, exact)
        assert pred == pytest.approx(0.5 * sigma**2 * res.value("hessian", "trace"))


def test_pgd_matches_closed_form_on_linear_binary_classifier():
    # Two logits of a linear map: the worst L_inf perturbation flips the sample iff
    # margin = (w_y - w_o).x + (b_y - b_o) <= eps ||w_y - w_o||_1 (no clamping: data is not in [0, 1]).
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    with torch.no_grad():
        y = (model(x) + 0.3 * torch.randn(200, 2, generator=gen, dtype=torch.float64)).argmax(1)
    fracs = (0.0, 0.02, 0.05)
    res = audit(
        model, (x, y), limits=dict(TINY, pgd_num_data=200, pgd_steps=20, pgd_eps=fracs), sections=["robustness"]
    )
    w, b = model.weight.detach(), model.bias.detach()
    span = float(x.max() - x.min())
    sign = torch.where(y == 1, 1.0, -1.0).double()
    margin = sign * (x @ (w[1] - w[0]) + (b[1] - b[0]))
    for frac in fracs:
        exact = float((margin > frac * span * (w[1] - w[0]).abs().sum()).double().mean())
        assert res.value("robustness", f"robust_accuracy@{frac:g}") == pytest.approx(exact), frac
    assert res.value("robustness", "robust_accuracy@0") == res.value("robustness", "clean_accuracy")


# ------------------------------------------------------------------------------------ budget and errors


def test_budget_skips_and_bad_input(digits3):
    train, test = digits3
    model = _tiny_mlp()
    res = audit(model, {"train": train, "test": test}, limits=dict(TINY, time_limit=0.0))
    assert res["performance"].status == "ok"
    for name in ("scale_symmetries", "hessian", "noise_stability", "ntk", "robustness"):
        assert res[name].status == "skipped" and "time limit" in res[name].skipped[0], name
    assert "no group action" in res["invariance"].skipped[0]
    with pytest.raises(ConfigError, match="unknown budget"):
        audit(model, train, budget="huge")
    with pytest.raises(ConfigError, match="unknown audit limit"):
        audit(model, train, limits={"probes": 3})
    with pytest.raises(ConfigError, match="integer >= 1"):
        audit(model, train, limits={"ntk_num_data": "many"})
    with pytest.raises(ConfigError, match="unknown action"):
        audit(model, train, "c7")
    with pytest.raises(ConfigError, match="unknown audit section"):
        audit(model, train, sections=["curvature"])
    with pytest.raises(GroupActionError):
        audit(model, (torch.randn(4, 1, 40, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), "c4")
    with pytest.raises(ShapeError, match="model failed"):
        audit(model, (torch.randn(4, 1, 40, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ShapeError, match="integer class labels"):
        audit(model, (train[0], train[1].double()))
    with pytest.raises(ShapeError, match="outputs"):
        audit(model, (train[0], train[1] + 5))
    assert set(BUDGETS) == {"quick", "full"}


class _NumpyModel(nn.Module):
    """Leaves torch inside forward: plain evaluation works, nothing that differentiates through it does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 3).double()

    def forward(self, x):
        return torch.as_tensor(self.lin(x.flatten(1)).detach().numpy())


def test_a_section_the_model_cannot_support_fails_alone(digits3):
    train, _ = digits3
    res = audit(_NumpyModel(), train, limits=TINY)
    assert res["performance"].status == "ok"
    for name in ("hessian", "robustness"):
        assert res[name].status == "failed" and res[name].skipped, name
    assert "failed" in {r["status"] for r in res.section_rows()}


def test_audit_leaves_the_model_unchanged(digits3):
    train, test = digits3
    model = load_model("audit_user_model:make_model", dtype=torch.float64)
    model.train()
    model.bn2.eval()  # mixed modes are restored too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = audit(model, {"train": train, "test": test}, "c4", limits=TINY)
    assert all(s.status == "ok" for s in res.sections.values())
    assert model.training and model.bn1.training and not model.bn2.training
    for k, v in model.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, before[k]), k


def test_broken_user_file_is_a_config_error(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2\n")
    with pytest.raises(ConfigError, match="importing the model file"):
        load_model(f"{tmp_path / 'broken.py'}:make")


# ------------------------------------------------------------------------------------ run store and CLI


def test_run_audit_writes_an_indexed_run(tmp_path):
    result, run = run_audit(
        f"{USER_MODEL}:make_model", "digits", action="d4", out=tmp_path, limits=dict(TINY, eval_num_data=100)
    )
    assert isinstance(result, AuditResult)
    for name in ("config.yaml", "audit.json", "result.json", "claims.json", "report.html"):
        assert (run.path / name).exists(), name
    data = json.loads((run.path / "audit.json").read_text())
    assert data["action"] == "d4" and data["data"] == "digits"
    assert data["sections"]["performance"]["values"]["test_accuracy"]["value"] == result.value(
        "performance", "test_accuracy"
    )
    assert (run.path / "figures" / "invariance.png").exists()
    rows = sqlite3.connect(tmp_path / "index.sqlite").execute("SELECT experiment, status FROM runs").fetchall()
    assert rows == [("audit", "done")]
    # Each section reports its cost; every stochastic value has a standard error.
    for sec in data["sections"].values():
        if sec["status"] == "ok":
            assert sec["seconds"] > 0


def test_library_audit_writes_nothing(digits3, tmp_path, monkeypatch):
    """``audit`` computes and returns; storing it is the run store's job (write_audit_run)."""
    import symgen.io

    def refuse(*args, **kwargs):
        raise AssertionError("the library audit must not write files")

    monkeypatch.setattr(symgen.io, "atomic_write", refuse)
    monkeypatch.chdir(tmp_path)
    train, test = digits3
    res = audit(
        load_model("audit_user_model:make_model", dtype=torch.float64),
        {"train": train, "test": test},
        "c4",
        limits=TINY,
    )
    assert all(s.status == "ok" for s in res.sections.values())
    assert list(tmp_path.iterdir()) == []
    assert not hasattr(res, "write")
    monkeypatch.undo()

    # The shell stores it: an indexed run whose audit.json holds the result's values.
    run = write_audit_run(RunStore(tmp_path / "runs"), res)
    for name in ("config.yaml", "audit.json", "result.json", "claims.json", "report.html", "figures/invariance.png"):
        assert (run.path / name).exists(), name
    data = json.loads((run.path / "audit.json").read_text())
    for sec in res.sections.values():
        for metric, est in sec.values.items():
            assert data["sections"][sec.name]["values"][metric]["value"] == est.value, (sec.name, metric)
    assert RunStore(tmp_path / "runs").list()[0]["status"] == "done"


def test_generator_seeds_each_section_from_its_own_stream(digits3):
    """generator=None is seed 0; the performance subsample is randperm under rng.derive(seed, its stream key)."""
    from symgen import rng
    from symgen.audit.sections.common import STREAMS

    train, test = digits3
    model = _tiny_mlp()
    lim = dict(TINY, eval_num_data=17)
    data = {"train": train, "test": test}
    res = audit(model, data, sections=["performance"], limits=lim, generator=5)
    assert res.seed == 5
    gen = torch.Generator().manual_seed(rng.derive(5, STREAMS["performance"]))
    for split, (x, y) in (("train", train), ("test", test)):
        idx = torch.randperm(x.shape[0], generator=gen)[:17].sort().values
        correct = sum(int(model(x[i : i + 1]).argmax() == y[i]) for i in idx.tolist())
        assert res.value("performance", f"{split}_accuracy") == pytest.approx(correct / 17)
    default = audit(model, data, sections=["performance"], limits=lim)
    zero = audit(model, data, sections=["performance"], limits=lim, generator=0)
    assert default.to_dict()["sections"]["performance"]["values"] == zero.to_dict()["sections"]["performance"]["values"]
    assert default.seed == 0


def test_report_does_not_import_the_run_store():
    import subprocess
    import sys

    code = "import sys, symgen.report; assert 'symgen.runs' not in sys.modules, 'runs imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_cli_audit_and_errors(tmp_path, capsys):
    torch.save(load_model("audit_user_model:make_model").state_dict(), tmp_path / "ck.pt")
    args = [
        "audit",
        "--model",
        f"{USER_MODEL}:make_model",
        "--checkpoint",
        str(tmp_path / "ck.pt"),
        "--data",
        "digits",
        "--action",
        "c4",
        "--out",
        str(tmp_path / "runs"),
    ]
    tiny = [x for k, v in dict(TINY, eval_num_data=64).items() for x in ("--set", f"{k}={v}")]
    assert main(args + tiny) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "test_accuracy" in out
    assert main(["runs", "ls", "--out", str(tmp_path / "runs")]) == 0
    assert "audit" in capsys.readouterr().out

    assert (
        main(
            [
                "audit",
                "--model",
                f"{USER_MODEL}:make_wide_model",
                "--checkpoint",
                str(tmp_path / "ck.pt"),
                "--data",
                "digits",
                "--out",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert "conv1.weight" in capsys.readouterr().err
    assert main(args + ["--budget", "huge"]) == 2
    assert "unknown budget" in capsys.readouterr().err
    assert main(args + ["--set", "ntk_num_data"]) == 2
    assert main(args + ["--action", "c7"]) == 2
    assert "unknown action" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the experiments' models


def _train(model, x, y, epochs, lr, optimizer=None):
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model.eval()


def test_audit_models_the_experiments_train(tmp_path, capsys):
    """The BN CNNs of the unit-norm (UnitNormSGD) and flat-minima (NSO) experiments on digits, a BN MLP on mnist1d."""
    from symgen.data import load_dataset
    from symgen.optim import UnitNormSGD

    cnn_spec = "symgen.experiments.unit_norm:build_model('cnn', (1, 8, 8), channels=4)"
    cnn = load_model(cnn_spec)
    x, y = load_dataset("digits", "train")
    opt = UnitNormSGD(cnn, lr=0.1, momentum=0.9, example_input=x[:64])
    _train(cnn, x, y, epochs=2, lr=0.1, optimizer=opt)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    tiny = [a for k, v in dict(TINY, eval_num_data=200).items() for a in ("--set", f"{k}={v}")]
    assert (
        main(
            [
                "audit",
                "--model",
                cnn_spec,
                "--checkpoint",
                str(tmp_path / "cnn.pt"),
                "--data",
                "digits",
                "--action",
                "c4",
                "--out",
                str(tmp_path / "runs"),
            ]
            + tiny
        )
        == 0
    )
    assert "report:" in capsys.readouterr().out
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    data = json.loads((run_dir / "audit.json").read_text())
    perf = data["sections"]["performance"]["values"]
    assert perf["test_accuracy"]["value"] > 0.5  # trained: far above 10 % chance
    assert data["sections"]["scale_symmetries"]["values"]["groups"]["value"] == 2  # conv -> BN, twice
    assert all(s["status"] in ("ok", "skipped") for s in data["sections"].values()), {
        k: s["skipped"] for k, s in data["sections"].items() if s["status"] == "failed"
    }

    # The flat-minima experiment's BatchNorm CNN, trained with NSO (vectorized perturbed passes).
    from symgen.optim import NSO, LossClosure

    nso_cnn = load_model("symgen.experiments.flat_minima:bn_cnn((1, 8, 8), width=8)")
    opt = NSO(
        nso_cnn.parameters(),
        lr=0.05,
        momentum=0.9,
        sigma=0.01,
        num_samples=1,
        model=nso_cnn,
        generator=torch.Generator().manual_seed(0),
    )
    nso_cnn.train()
    for _ in range(2):
        for i in range(0, x.shape[0], 64):
            opt.step(LossClosure(nso_cnn, F.cross_entropy, x[i : i + 64], y[i : i + 64]))
    res = audit(nso_cnn.eval(), "digits", "d4", limits=dict(TINY, eval_num_data=200))
    assert all(s.status == "ok" for s in res.sections.values()), {
        k: s.skipped for k, s in res.sections.items() if s.status != "ok"
    }
    assert res.value("performance", "test_accuracy") > 0.3
    assert res.value("scale_symmetries", "groups") == 3  # three conv -> BN pairs

    mlp = load_model("symgen.experiments.unit_norm:build_model('mlp', (1, 40), width=32)")
    x1, y1 = load_dataset("mnist1d", "train")
    _train(mlp, x1[:1000], y1[:1000], epochs=2, lr=0.05)
    res = audit(mlp, "mnist1d", "shift", limits=dict(TINY, eval_num_data=200))
    assert res["invariance"].details["order"] == 40
    assert res.value("scale_symmetries", "groups") == 2  # both hidden Linear layers feed a BatchNorm1d
    assert all(s.status == "ok" for s in res.sections.values()), {
        k: s.skipped for k, s in res.sections.items() if s.status != "ok"
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_audit_on_cuda_matches_cpu(digits3):
    train, test = digits3
    lim = dict(TINY, hessian_num_data=60, hutchinson_probes=40)
    cpu = audit(_tiny_mlp(), {"train": train, "test": test}, "c4", limits=lim)
    gpu = audit(_tiny_mlp(), {"train": train, "test": test}, "c4", limits=lim, device="cuda")
    assert gpu.device.startswith("cuda") and all(s.status == "ok" for s in gpu.sections.values())
    for metric in ("train_accuracy", "test_accuracy", "train_loss"):
        assert gpu.value("performance", metric) == pytest.approx(cpu.value("performance", metric), rel=1e-9)
    assert gpu.value("invariance", "osp") == pytest.approx(cpu.value("invariance", "osp"))
    assert gpu.value("hessian", "eigenvalue_1") == pytest.approx(cpu.value("hessian", "eigenvalue_1"), rel=1e-6)
    t_cpu, t_gpu = cpu["hessian"].values["trace"], gpu["hessian"].values["trace"]
    assert abs(t_cpu.value - t_gpu.value) <= 4 * math.hypot(t_cpu.stderr, t_gpu.stderr) + 1e-9


# ------------------------------------------------------------------------------------ data from a DataLoader


def _values(res):
    return {
        (s, k): (e.value, e.stderr)
        for s, sec in res.sections.items()
        if sec.status == "ok"
        for k, e in sec.values.items()
    }


def test_audit_on_a_dataloader_gives_the_tensor_numbers(digits3):
    """A DataLoader of batch 7 (and one that only yields batches, never indexed) against the same data as
    tensors, every section, same seed: every number agrees to round-off. The subsamples (training,
    invariance, NTK, PGD, Hessian, noise) are the same positions of the same data, gathered in one
    pass, so the sampled sections (probes, noise draws, attacks, NTK subsamples) agree as well; only
    the performance sums see other batch boundaries (float64 sums of the same per-sample losses)."""
    from torch.utils.data import DataLoader, TensorDataset

    train, test = digits3
    model = load_model("audit_user_model:make_model", dtype=torch.float64)
    lim = dict(TINY, eval_num_data=40, batch_size=16)
    ref = audit(model, {"train": train, "test": test}, "c4", limits=lim, generator=3)
    assert all(s.status == "ok" for s in ref.sections.values())

    class Batches:  # a re-iterable that is not a DataLoader: batches of 11, fresh tensors each pass
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __iter__(self):
            for i in range(0, self.x.shape[0], 11):
                yield self.x[i : i + 11].clone(), self.y[i : i + 11].clone()

    loaders = {"train": DataLoader(TensorDataset(*train), batch_size=7), "test": Batches(*test)}
    res = audit(model, loaders, "c4", limits=lim, generator=3)
    a, b = _values(ref), _values(res)
    assert a.keys() == b.keys() and len(a) > 25
    for key, (v1, e1) in a.items():
        v2, e2 = b[key]
        assert v2 == pytest.approx(v1, rel=1e-9, abs=1e-12), key
        assert (e1 is None) == (e2 is None), key
        if e1 is not None:
            assert e2 == pytest.approx(e1, rel=1e-9, abs=1e-12), key
    assert res["performance"].values["test_accuracy"].note.startswith("30 samples, the whole split, streamed")
    assert res.to_dict()["limits"] == ref.to_dict()["limits"]


def test_audit_streams_a_loader_one_batch_at_a_time(digits3):
    """The audit never holds more than one of the loader's batches (beside the budget's subsamples)."""
    import gc
    import weakref

    train, _ = digits3
    alive: list = []

    class Loader:
        passes = 0

        def __iter__(self):
            Loader.passes += 1
            for i in range(0, 60, 6):
                xb = train[0][i : i + 6].clone()
                assert sum(r() is not None for r in alive) <= 1, "an earlier batch is still held"
                alive.append(weakref.ref(xb))
                yield xb, train[1][i : i + 6]
                del xb
                gc.collect()

    model = load_model("audit_user_model:make_model", dtype=torch.float64)
    res = audit(
        model,
        Loader(),
        limits=dict(TINY, eval_num_data=None, hessian_num_data=10, noise_num_data=10),
        sections=["performance", "hessian", "noise_stability"],
    )
    assert all(res[s].status == "ok" for s in ("performance", "hessian", "noise_stability"))
    assert res["performance"].samples == 60 and res["hessian"].samples == 10
    assert Loader.passes >= 3


def test_audit_rejects_a_generator_and_bad_batches(digits3):
    train, _ = digits3
    model = _tiny_mlp()
    batches = ((train[0][i : i + 8], train[1][i : i + 8]) for i in range(0, 60, 8))
    with pytest.raises(ConfigError, match="one-shot iterator.*DataLoader"):
        audit(model, batches)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        audit(model, {"train": iter([train]), "test": [train]})
    with pytest.raises(ShapeError, match="integer class labels"):
        audit(model, [(train[0], train[1].double())])
    with pytest.raises(ShapeError, match="no samples"):
        audit(model, [])
    with pytest.raises(ShapeError, match="per-sample"):
        audit(model, [train, (train[0][:, :, :4], train[1])])
    with pytest.raises(ConfigError, match="DataLoader"):
        audit(model, 42)


def test_cifar10_audit_reads_files_lazily_with_the_in_memory_numbers(tmp_path, monkeypatch):
    """``data="cifar10"`` streams the batch files (one file in memory at a time; a subsample that lies in
    the first file stops the pass there) and gives the numbers of the same data loaded as tensors."""
    from test_data import write_fake_cifar

    import symgen.data as data
    from symgen.data import load_dataset

    write_fake_cifar(tmp_path, {**{f"data_batch_{i}": 12 for i in range(1, 6)}, "test_batch": 30})
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    ).eval()
    lim = dict(TINY, eval_num_data=20, test_num_data=None, batch_size=8, hessian_num_data=8, noise_num_data=8)
    reads = []
    real = data._read_cifar_file
    monkeypatch.setattr(data, "_read_cifar_file", lambda p: (reads.append(p.name), real(p))[1])
    res = audit(model, "cifar10", "d4", root=tmp_path, limits=lim)
    assert all(s.status == "ok" for s in res.sections.values()), res.section_rows()
    assert res["performance"].values["test_accuracy"].note.startswith("30 samples, the whole split, streamed")
    monkeypatch.undo()
    tensors = {s: load_dataset("cifar10", s, root=tmp_path) for s in ("train", "test")}
    ref = audit(model, tensors, "d4", limits=lim)
    a, b = _values(ref), _values(res)
    assert a.keys() == b.keys()
    for key, (v1, e1) in a.items():
        assert b[key][0] == pytest.approx(v1, rel=1e-5, abs=1e-7), key  # float32 model: round-off
        if e1 is not None:
            assert b[key][1] == pytest.approx(e1, rel=1e-4, abs=1e-7), key
    # every pass reads the files in order, one at a time: never all the train files at once
    assert reads.count("test_batch") >= 3 and reads.count("data_batch_1") >= 3
    from symgen.audit.splits import Split
    from symgen.data import Cifar10Batches

    split = Split(Cifar10Batches("train", tmp_path, 5), "data", torch.device("cpu"), torch.float64)
    monkeypatch.setattr(data, "_read_cifar_file", lambda p: (reads.append(p.name), real(p))[1])
    reads.clear()
    xs, ys = split.take(torch.tensor([7, 2, 11]))
    assert reads == ["data_batch_1"]  # the pass stops once it has the subsample
    assert torch.equal(xs, tensors["train"][0][[7, 2, 11]].double()) and torch.equal(
        ys, tensors["train"][1][[7, 2, 11]]
    )


# ---------------------------------------------------------------------------------------------
# Random streams and limit names


def test_audit_streams_are_pairwise_distinct_at_seed_zero():
    """Every random use of the audit has its own stream of the run seed: at seed 0 (the default, where
    hand-built seeds like seed + 1 collided) no two streams start with the same draws."""
    from symgen import rng
    from symgen.audit.sections.common import STREAMS, stream, stream_seed

    assert len(set(STREAMS.values())) == len(STREAMS)  # one key per use
    names = [(name,) for name in STREAMS] + [("noise_stability", i) for i in range(5)]
    seeds = {key: stream_seed(0, key[0], *key[1:]) for key in names}
    assert len(set(seeds.values())) == len(seeds)
    for name, key in STREAMS.items():  # each derives from the run seed by symgen.rng.derive
        assert seeds[(name,)] == rng.derive(0, key)
    firsts = {key: tuple(torch.randint(0, 2**62, (4,), generator=stream(0, *key)).tolist()) for key in names}
    assert len(set(firsts.values())) == len(firsts)
    # and none equals the draws of a generator seeded with small integers (the old hand-built seeds)
    hand_built = {
        tuple(torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(s)).tolist()) for s in range(200)
    }
    assert not hand_built & set(firsts.values())


def test_audit_sources_seed_only_through_streams():
    """No section seeds a generator by hand: the one manual_seed of the audit is the stream helper's."""
    root = Path(__file__).resolve().parents[1] / "src" / "symgen" / "audit"
    uses = {
        str(p.relative_to(root)): p.read_text().count("manual_seed(")
        for p in root.rglob("*.py")
        if "manual_seed(" in p.read_text()
    }
    assert uses == {"sections/common.py": 1}


def test_renamed_limits_say_data_points_and_noise_draws():
    """Counts of data points are *_num_data, the count of noise draws noise_num_samples (the conventions
    of docs/architecture.md); the former names still work, with a DeprecationWarning."""
    from dataclasses import fields

    from symgen.audit import AuditLimits, resolve_limits
    from symgen.audit.limits import RENAMED

    names = {f.name for f in fields(AuditLimits)}
    assert not {n for n in names if n.endswith("_samples") and n != "noise_num_samples"}
    assert set(RENAMED.values()) <= names and not set(RENAMED) & names
    with pytest.warns(DeprecationWarning) as caught:
        lim = resolve_limits("quick", {"noise_samples": 7, "noise_draws": 3})
    assert lim.noise_num_data == 7 and lim.noise_num_samples == 3
    said = [str(w.message) for w in caught]
    assert any("'noise_samples' is renamed 'noise_num_data'" in m for m in said)
    assert any("'noise_draws' is renamed 'noise_num_samples'" in m for m in said)
    with pytest.raises(ConfigError, match="former name"):
        resolve_limits("quick", {"noise_samples": 7, "noise_num_data": 8})


def test_cli_accepts_a_former_limit_name_with_a_warning(tmp_path, capsys):
    torch.save(load_model("audit_user_model:make_model").state_dict(), tmp_path / "ck.pt")
    lim = dict(TINY, eval_num_data=64)
    del lim["pgd_num_data"]
    sets = [x for k, v in lim.items() for x in ("--set", f"{k}={v}")]
    args = ["audit", "--model", f"{USER_MODEL}:make_model", "--checkpoint", str(tmp_path / "ck.pt"), "--data"]
    code = main([*args, "digits", *sets, "--set", "pgd_samples=12", "--out", str(tmp_path / "runs"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "'pgd_samples' is renamed 'pgd_num_data'" in out.err
    assert json.loads(out.out)["limits"]["pgd_num_data"] == 12
