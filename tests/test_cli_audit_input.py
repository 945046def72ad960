"""The audit's bad input, every case answered in one line (exit 2) with no run directory left; the budget
sized to the model; imprecise estimates flagged; the density's trace beside Hutchinson's."""

from pathlib import Path

import pytest
import torch
from torch import nn

from symgen.audit import AuditLimits, audit, load_model, resolve_limits
from symgen.audit.planning import Timing, estimate_costs, plan_limits
from symgen.cli import main

USER_MODEL = Path(__file__).parent / "audit_user_model.py"


def _no_runs(out):
    return not Path(out).exists() or not [d for d in Path(out).iterdir() if d.is_dir()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    model = load_model(f"{USER_MODEL}:make_model")
    sd = model.state_dict()
    torch.save(sd, d / "good.pt")
    torch.save({**sd, "conv1.weight": sd["conv1.weight"] * float("nan")}, d / "nan_weight.pt")
    torch.save({**sd, "bn1.running_var": sd["bn1.running_var"] * float("nan")}, d / "nan_bn.pt")
    torch.save(model, d / "whole_module.pt")
    (d / "garbage.pt").write_bytes(b"this is not a checkpoint at all\n" * 10)
    wide = load_model(f"{USER_MODEL}:make_wide_model").state_dict()
    torch.save(wide, d / "wide.pt")
    return d


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "mnist1d"], "shape"),  # wrong data shape for the model
        (["--checkpoint", "{ck}/nan_weight.pt"], "NaN"),
        (["--checkpoint", "{ck}/nan_bn.pt"], "bn1.running_var"),
        (["--data", "imagenet"], "imagenet"),  # unknown dataset
        (["--data", "mnist", "--root", "{ck}/empty"], "mnist"),  # empty root
        (["--data", "mnist", "--root", "{ck}/missing"], "mnist"),  # missing root
        (["--data", "cifar10"], "root"),  # cifar10 without --root
        (["--data", "mnist1d", "--action", "c4"], "c4"),  # an action that does not fit the data
        (["--checkpoint", "{ck}/whole_module.pt"], "state_dict()"),
        (["--checkpoint", "{ck}/garbage.pt"], "not a file saved by torch.save"),
        (["--checkpoint", "{ck}/wide.pt"], "wrong shape"),
        (["--set", "time_limit=0"], "time_limit"),
        (["--budget", "-5"], "budget"),
    ],
)
def test_bad_audit_input_is_one_line_and_leaves_nothing(checkpoints, tmp_path, capsys, extra, message):
    (checkpoints / "empty").mkdir(exist_ok=True)
    extra = [a.replace("{ck}", str(checkpoints)) for a in extra]
    args = ["audit", "--model", f"{USER_MODEL}:make_model", "--out", str(tmp_path / "runs")]
    if "--data" not in extra:
        args += ["--data", "digits"]
    assert main(args + extra) == 2
    err = "\n".join(
        line for line in capsys.readouterr().err.splitlines() if not line.startswith("  [") and line.strip()
    )  # progress lines: "  [ 0.1 s] section"
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert len(err) < 600, f"message of {len(err)} characters"
    assert "\x1b[" not in err and "Traceback" not in err
    assert _no_runs(tmp_path / "runs"), "bad input left a run directory"


def test_budget_in_seconds_and_sizing_to_the_model():
    assert resolve_limits("30").time_limit == 30.0 and resolve_limits(12.5).time_limit == 12.5
    t = Timing(forward=2e-3, backward=6e-3, outputs=10, layers=60)  # a ResNet-sized model on a CPU
    lim = resolve_limits("quick")
    before = estimate_costs(lim, t, 50000, 10000, 4)
    assert sum(before.values()) > lim.time_limit  # the quick sizes would overrun
    planned, notes = plan_limits(lim, t, 50000, 10000, 4, fixed={"pgd_steps"})
    after = estimate_costs(planned, t, 50000, 10000, 4)
    assert sum(after.values()) <= lim.time_limit
    assert planned.pgd_steps == lim.pgd_steps  # what the user set is kept
    assert planned.hessian_num_data < lim.hessian_num_data and "hessian_num_data=" in notes["hessian"]
    assert "longer budget" in notes["hessian"]
    # A model that fits is left alone.
    small = Timing(forward=1e-6, backward=3e-6, outputs=3, layers=3)
    assert plan_limits(lim, small, 1000, 300, 4) == (lim, {})


def test_every_section_runs_within_a_small_budget_and_says_what_it_afforded(monkeypatch):
    import symgen.audit.planning as planning

    # As if each pass were slow (a large model): the plan must cut; the real tiny model then runs fast. The
    # budget is large beside the tiny model's real seconds (several on a loaded machine), which the schedule
    # adds to the timing's predictions: the plan's cuts are those of a 10 s budget at a sixth of the timing.
    monkeypatch.setattr(planning, "time_passes", lambda *a, **k: Timing(3e-2, 9e-2, outputs=10, layers=20))
    model = load_model(f"{USER_MODEL}:make_model")
    res = audit(model, "digits", "c4", budget="60")
    assert all(s.status == "ok" for s in res.sections.values()), {k: s.skipped for k, s in res.sections.items()}
    notes = [n for s in res.sections.values() for n in s.skipped if "sized to the 60 s budget" in n]
    assert notes, "no section says what the budget let it afford"
    assert res.limits["time_limit"] == 60.0 and res.limits["hessian_num_data"] < 128


def test_density_trace_agrees_with_trace_and_dense_hessian():
    from symgen.data import load_dataset

    x, y = load_dataset("digits", "train")
    keep = torch.nonzero(y < 3).flatten()[:40]
    x, y = x[keep].double(), y[keep]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    lim = dict(
        time_limit=600.0,
        hessian_num_data=40,
        hutchinson_probes=30,
        eigen_iters=10,
        density_runs=8,
        density_steps=20,
        top_eigenvalues=1,
    )
    res = audit(model, (x, y), sections=["hessian"], limits=lim)
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss(v):
        out, i = [], 0
        for p in params:
            out.append(v[i : i + p.numel()].view_as(p))
            i += p.numel()
        h = torch.tanh(x.flatten(1) @ out[0].T + out[1])
        return nn.functional.cross_entropy(h @ out[2].T + out[3], y)

    exact = float(torch.autograd.functional.hessian(loss, flat).trace())
    t, d = res["hessian"].values["trace"], res["hessian"].values["density_trace"]
    assert d.stderr is not None and d.stderr > 0
    assert abs(t.value - exact) <= 4 * t.stderr + 1e-9
    assert abs(d.value - exact) <= 4 * d.stderr + 1e-9
    assert not any("disagrees" in n for n in res["hessian"].skipped)


def test_imprecise_estimates_are_flagged():
    from symgen.audit.result import IMPRECISE, AuditResult, Estimate, SectionResult

    assert Estimate(0.58, 3.6).imprecise and not Estimate(166.0, 26.0).imprecise and not Estimate(1.0).imprecise
    sec = SectionResult("hessian", "Hessian")
    sec.add("trace", 0.58, 3.6)
    res = AuditResult(
        model="m",
        data="d",
        action=None,
        budget="quick",
        device="cpu",
        dtype="float32",
        seed=0,
        num_params=1,
        limits={},
        sections={"hessian": sec},
    )
    row = res.summary_rows()[0]
    # stderr > IMPRECISE x |value|: the value is not resolved (its sign is not known)
    assert row["flag"].startswith("NOT RESOLVED") and str(IMPRECISE) in row["flag"]
    assert "NOT RESOLVED" in res.summary()
    again = AuditResult.from_dict(res.to_dict())
    assert again.sections["hessian"].values["trace"].stderr == 3.6
    assert isinstance(AuditLimits().density_runs, int) and AuditLimits().density_runs >= 2
