"""One section, one place: a section registered in a test appears in the plan, the JSON, the HTML page and the
terminal, and unregistering it leaves no trace; old audit.json files still load; the docs list the registry."""

from pathlib import Path

import pytest
import torch
from torch import nn

from symgen.audit import AuditResult, Section, audit, registry, resolve_limits
from symgen.audit.figures import draw_figures
from symgen.audit.page import render_audit_page
from symgen.audit.planning import Timing, estimate_costs, plan_limits
from symgen.audit.precision import Target
from symgen.audit.registry import Limit
from symgen.cli_audit import audit_lines
from symgen.errors import ConfigError

DOCS = Path(__file__).parents[1] / "docs" / "audit.md"


def _weight_norm(sec, ctx):
    """The toy section: the mean norm of the first ``weight_norm_num_tensors`` parameter tensors."""
    k = ctx.lim.get("weight_norm_num_tensors")
    norms = [float(p.detach().norm()) for p in list(ctx.model.parameters())[:k]]
    t = torch.tensor(norms, dtype=torch.float64)
    se = float(t.std() / len(norms) ** 0.5) if len(norms) > 1 else None
    sec.add("mean_weight_norm", float(t.mean()), se, f"over {len(norms)} tensors")
    sec.details["norms"] = norms


def _draw(plt, sec, result):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(len(sec.details["norms"])), sec.details["norms"])
    return fig


TOY = Section(
    "weight_norm",
    "Weight norms (toy)",
    _weight_norm,
    limits=(Limit("weight_norm_num_tensors", quick=3, full=10, minimum=1),),
    cost=lambda lim, t, sizes: lim.get("weight_norm_num_tensors") * 1000 * t.forward,
    share=0.1,
    targets={"mean_weight_norm": Target(rel=0.05)},
    figure="weight_norm",
    draw=_draw,
    meanings={"mean_weight_norm": "Mean Frobenius norm of the first parameter tensors (toy)."},
    docs="mean norm of parameter tensors | standard error over tensors | the test",
    run_rank=5,
)


def _data():
    torch.manual_seed(0)
    x = torch.rand(40, 1, 4, 4)
    return x, torch.randint(0, 3, (40,))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


LIMITS = dict(time_limit=600.0, eval_num_data=None, test_num_data=20)


def _everywhere(res: AuditResult, tmp_path: Path) -> dict[str, str]:
    figs = draw_figures(res, tmp_path / "figs")
    page = render_audit_page(res, figs)
    return {
        "json": str(res.to_dict()),
        "page": page,
        "lines": audit_lines(res.to_dict()),
        "figures": " ".join(f.stem for f in figs),
        "limits": str(resolve_limits("quick").as_dict()),
        "plan": str(estimate_costs(resolve_limits("quick"), Timing(1e-4, 3e-4, 3, 3), 40, 40, 1)),
    }


def test_a_section_registered_in_a_test_is_everywhere_and_leaves_no_trace(tmp_path):
    with registry.registered(TOY):
        # the plan: its cost is predicted, its limit is a knob the planner cuts under a tight budget
        lim = resolve_limits("quick")
        assert lim.get("weight_norm_num_tensors") == 3 and resolve_limits("full").get("weight_norm_num_tensors") == 10
        slow = Timing(forward=1e-2, backward=3e-2, outputs=3, layers=3)
        assert "weight_norm" in estimate_costs(lim, slow, 40, 40, 1)
        planned, notes = plan_limits(lim, slow, 40, 40, 1)
        assert (
            planned.get("weight_norm_num_tensors") == 1
            and "weight_norm_num_tensors=1 instead of 3" in notes["weight_norm"]
        )
        # --set reaches it like any limit
        assert resolve_limits("quick", {"weight_norm_num_tensors": 2}).get("weight_norm_num_tensors") == 2
        res = audit(_model(), _data(), sections=["performance", "weight_norm"], limits=LIMITS)
        sec = res["weight_norm"]
        assert sec.status == "ok" and sec.values["mean_weight_norm"].value > 0
        assert res.limits["weight_norm_num_tensors"] == 3
        # the precision target is declared by the section: a 3-tensor mean misses 5 %
        assert sec.values["mean_weight_norm"].flag in ("IMPRECISE", "NOT RESOLVED")
        seen = _everywhere(res, tmp_path / "with")
        data = res.to_dict()
        assert (
            data["sections"]["weight_norm"]["values"]["mean_weight_norm"]["value"]
            == sec.values["mean_weight_norm"].value
        )
        again = AuditResult.from_dict(data)
        assert again["weight_norm"].values["mean_weight_norm"].flag == sec.values["mean_weight_norm"].flag
        assert "Weight norms (toy)" in seen["page"] and "Mean Frobenius norm" in seen["page"]
        assert 'alt="weight_norm"' in seen["page"] and seen["figures"].split() == ["weight_norm"]
        assert "weight_norm" in seen["lines"] and "mean_weight_norm" in seen["lines"]
        assert "weight_norm" in seen["limits"] and "weight_norm" in seen["plan"]
        assert "| weight_norm |" in registry.docs_table()
    # unregistered: no trace anywhere
    res = audit(_model(), _data(), sections=["performance"], limits=LIMITS)
    gone = _everywhere(res, tmp_path / "without")
    for where, text in gone.items():
        assert "weight_norm" not in text, where
    assert "| weight_norm |" not in registry.docs_table()
    with pytest.raises(ConfigError, match="unknown audit limit"):
        resolve_limits("quick", {"weight_norm_num_tensors": 2})
    with pytest.raises(ConfigError, match="unknown audit section"):
        audit(_model(), _data(), sections=["weight_norm"])


def test_the_page_shows_the_summary_first_then_the_figures(tmp_path):
    with registry.registered(TOY):
        res = audit(_model(), _data(), sections=["performance", "weight_norm"], limits=LIMITS)
        page = render_audit_page(res, draw_figures(res, tmp_path))
    assert page.index('id="summary"') < page.index("<h2>Figures</h2>") < page.index('id="sections"')
    assert "max-width:100%" in page  # figures at their own size, as wide as the page allows


def test_old_audit_json_still_loads_and_prints():
    old = {
        "model": "m",
        "data": "digits",
        "action": None,
        "budget": "quick",
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "num_params": 10,
        "limits": {"time_limit": 60.0},
        "sections": {
            "hessian": {
                "name": "hessian",
                "title": "Hessian: trace, top eigenvalues, density",
                "status": "ok",
                "seconds": 1.0,
                "values": {"trace": {"value": 0.58, "stderr": 3.6, "note": ""}, "eigenvalue_1": {"value": 4.0}},
            }
        },
        "seconds": 1.0,
    }
    res = AuditResult.from_dict(old)
    assert res["hessian"].values["trace"].flag == "" and res["hessian"].values["trace"].imprecise
    lines = audit_lines(old)
    assert "NOT RESOLVED" in lines and "eigenvalue_1" in lines


def test_docs_list_every_builtin_section():
    text = DOCS.read_text()
    assert registry.docs_table() in text, "docs/audit.md's section table differs from registry.docs_table()"
