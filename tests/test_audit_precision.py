"""A budget the audit keeps and the precision it states: flags from planted estimates in the JSON, the terminal
and the page; the density's positive and negative parts; the GGN trace beside the Hessian's; re-planning
from measured throughput keeps the whole audit within 1.25x its budget on a loaded machine."""

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from symgen.audit import AuditResult, Section, audit, registry
from symgen.audit.page import render_audit_page
from symgen.audit.precision import Target, assess
from symgen.audit.result import SectionResult
from symgen.cli_audit import audit_lines


def _result(sec: SectionResult) -> AuditResult:
    return AuditResult(
        model="m",
        data="d",
        action=None,
        budget="quick",
        device="cpu",
        dtype="float32",
        seed=0,
        num_params=1,
        limits={},
        sections={sec.name: sec},
    )


def test_flags_from_planted_estimates_in_json_terminal_and_page():
    sec = SectionResult("hessian", "Hessian", seconds=2.0)
    sec.add("far", 10.0, 8.0)
    sec.add("near", 10.0, 1.0)
    sec.add("fine", 10.0, 0.1)
    sec.add("exact", 10.0)
    for est in sec.values.values():
        assess(est, Target(rel=0.05))
    v = sec.values
    assert v["far"].flag == "NOT RESOLVED" and v["near"].flag == "IMPRECISE" and v["fine"].flag == ""
    assert v["exact"].flag == ""
    # se ~ 1/sqrt(samples): 8 -> 0.5 (the 5 % target) takes (8 / 0.5)^2 = 256x the 2 s spent
    assert v["far"].resolve_factor == pytest.approx(256)
    assert v["near"].resolve_factor == pytest.approx(4)
    assert v["fine"].resolve_factor is None
    res = _result(sec)
    data = res.to_dict()
    values = data["sections"]["hessian"]["values"]
    assert values["far"]["flag"] == "NOT RESOLVED" and values["near"]["flag"] == "IMPRECISE"
    assert values["fine"]["flag"] == "" and values["far"]["resolve_factor"] == pytest.approx(256)
    assert values["near"]["target"] == pytest.approx(0.5)
    lines = {
        line.split()[0] if line.split()[0] != "hessian" else line.split()[1]: line
        for line in audit_lines(data).splitlines()[2:]
        if line.strip()
    }
    assert "NOT RESOLVED" in lines["far"] and "~512 s" in lines["far"]
    assert "IMPRECISE" in lines["near"] and "~8 s" in lines["near"]
    assert "NOT RESOLVED" not in lines["fine"] and "IMPRECISE" not in lines["fine"]
    page = render_audit_page(AuditResult.from_dict(data), [])
    assert page.count("NOT RESOLVED (stderr 8") == 1 and page.count("IMPRECISE (stderr 1 &gt; target 0.5") == 1
    assert "about 512 s of this section would meet it" in page


def test_absolute_target_of_an_accuracy():
    sec = SectionResult("robustness", "PGD", seconds=1.0)
    sec.add("robust_accuracy@0.1", 0.6, 0.08)
    sec.add("clean_accuracy", 0.9, 0.01)
    section = registry.get("robustness")
    assert section is not None
    for metric, est in sec.values.items():
        assess(est, section.target(metric))
    assert sec.values["robust_accuracy@0.1"].flag == "IMPRECISE"  # 0.08 > 0.05 absolute
    assert sec.values["clean_accuracy"].flag == ""


def test_positive_and_negative_parts_of_the_spectrum_against_a_hand_computed_density():
    from symgen.audit.sections.curvature import density_trace
    from symgen.audit.sections.timed import explain_indefinite, spectrum_parts
    from symgen.curvature.results import SpectralDensity, TraceEstimate

    nodes = torch.tensor([[-2.0, 1.0, 3.0], [-4.0, 0.5, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]], dtype=torch.float64)
    pos, neg = spectrum_parts(nodes, weights, 10)
    # run 1: 10 (0.3 + 1.5) = 18, 10 (-0.4) = -4; run 2: 10 (0.125 + 0.5) = 6.25, 10 (-2) = -20
    assert pos == pytest.approx([18.0, 6.25]) and neg == pytest.approx([-4.0, -20.0])
    sec = SectionResult("hessian", "Hessian")
    sec.add("trace", -1.0, 0.5)
    density_trace(sec, SpectralDensity(nodes, weights, 10, 6), TraceEstimate(-1.0, 0.5, 4, "x"))
    assert sec.values["density_positive_part"].value == pytest.approx(12.125)
    assert sec.values["density_negative_part"].value == pytest.approx(-12.0)
    assert sec.values["density_positive_part"].stderr == pytest.approx(5.875)
    assert sec.values["density_trace"].value == pytest.approx(0.125)
    sec.add("ggn_trace", 30.0, 1.0)
    explain_indefinite(sec)
    assert any("indefinite Hessian" in f for f in sec.flags)
    assert "negative part -12" in sec.values["trace"].note and "Gauss-Newton (PSD) trace 30" in sec.values["trace"].note


def test_ggn_trace_beside_the_hessian_trace_on_a_tiny_model():
    torch.manual_seed(0)
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    lim = dict(
        time_limit=600.0,
        hessian_num_data=30,
        hutchinson_probes=40,
        eigen_iters=8,
        density_runs=2,
        density_steps=8,
        top_eigenvalues=1,
    )
    res = audit(model, (x, y), sections=["hessian"], limits=lim)
    v = res["hessian"].values
    assert {"trace", "ggn_trace", "density_positive_part", "density_negative_part"} <= set(v)
    # the dense GGN: (1/N) sum_i J_i^T (diag p - p p^T) J_i, its trace
    from torch.func import functional_call, jacrev

    params = {k: p.detach() for k, p in model.named_parameters()}
    flat_names = list(params)

    def out(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    total = 0.0
    for xi in x:
        jac = jacrev(out)(params, xi)
        J = torch.cat([jac[k].reshape(3, -1) for k in flat_names], 1)
        p = torch.softmax(out(params, xi), 0)
        H = torch.diag(p) - torch.outer(p, p)
        total += float(torch.trace(J.T @ H @ J))
    exact = total / len(x)
    g = v["ggn_trace"]
    assert g.value > 0 and abs(g.value - exact) <= 4 * g.stderr + 1e-9, (g, exact)
    assert v["density_positive_part"].value >= 0 >= v["density_negative_part"].value


BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"


def _slow_section(sleep_s: float) -> Section:
    def run(sec, ctx):
        time.sleep(sleep_s)  # a section far slower than its cost model said (0.01 s)
        sec.add("waited", sleep_s)

    return Section("slow", "A slow section", run, cost=lambda lim, t, sizes: 0.01, share=0.05, run_rank=15)


def _digits(n):
    from symgen.data import load_dataset

    x, y = load_dataset("digits", "train")
    return x[:n], y[:n]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_replanning_after_a_slow_section_keeps_the_budget_under_load():
    budget = 8.0
    model, data = _mlp(), _digits(300)
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        with registry.registered(_slow_section(4.0)):
            t0 = time.perf_counter()
            res = audit(model, data, budget=budget, sections=["performance", "slow", "robustness", "noise_stability"])
            wall = time.perf_counter() - t0
    finally:
        busy.kill()
        busy.wait()
    assert wall <= 1.25 * budget, (wall, {k: s.seconds for k, s in res.sections.items()})
    # re-planned from the measured throughput: what runs after the slow section is cut (or, on a machine too
    # loaded for even its smallest size, skipped) and says why
    for name in ("robustness", "noise_stability"):
        sec = res[name]
        said = " ".join(sec.skipped + sec.flags)
        if sec.status == "ok":
            assert "re-planned" in said or "stopped at its share" in said, said
        else:
            assert sec.status == "skipped" and ("time budget" in said or "time limit" in said), said


def test_a_section_stops_at_its_deadline_and_says_so():
    from symgen.audit.registry import Clock
    from symgen.audit.sections.timed import timed_trace
    from symgen.curvature import MatrixOperator

    a = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    clock = Clock(deadline=time.perf_counter() - 1.0)  # already past
    est = timed_trace(MatrixOperator(a), 40, torch.Generator().manual_seed(0), clock)
    assert est.num_matvecs == 4 and clock.stopped and "4 of 40 probes" in clock.stopped[0]
    full = timed_trace(MatrixOperator(a), 40, torch.Generator().manual_seed(0), Clock())
    assert full.num_matvecs == 40
