"""Smoke test of the ``unit-norm`` experiment on a tiny config, and its models' hand-analysed symmetries."""

import math

import pytest
import torch

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments import unit_norm as exp_module
from symgen.experiments.base import Context, build_config
from symgen.experiments.unit_norm import EXPECTED, Config, build_model
from symgen.symmetry import find_scale_symmetries


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "mixed"])
def test_models_have_the_hand_analysed_symmetries(kind, shape):
    torch.manual_seed(0)
    model = build_model(kind, shape, width=8, channels=2).double()
    report = find_scale_symmetries(model, torch.rand((6,) + shape, dtype=torch.float64))
    got = {s.weight: (s.kind, s.redundant_bias, s.bias) for s in report.symmetries}
    assert got == EXPECTED[kind]


def test_quick_config_meets_the_issue_and_bad_keys_fail():
    exp = get_experiment("unit-norm")
    cfg = build_config(Config, quick=exp.quick)
    assert len(cfg.lrs) >= 5 and max(cfg.lrs) / min(cfg.lrs) >= 100
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(Config, sets=["lr=0.1"])
    with pytest.raises(ConfigError):
        build_config(Config, models=["resnet"])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("models", [], "models"),  # nothing trained: C2.2 must not pass on an empty loop
        ("detection_models", [], "detection_models"),
        ("lrs", [], "lrs"),
        ("lrs", [0.1, 0.1], "distinct positive"),
        ("lrs", [0.0, 0.1], "distinct positive"),
    ],
)
def test_config_rejects_empty_or_bad_lists(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config(Config, **{key: value})


def test_tiny_run_computes_claims_and_figures(tmp_path):
    exp = get_experiment("unit-norm")
    cfg = build_config(
        Config,
        quick=exp.quick,
        seeds=1,
        epochs=1,
        lrs=[0.05, 0.5],
        width=8,
        channels=2,
        detection_models=["mixed"],
        detection_batch=64,
        rescalings=2,
        centred_factors=[0.5, 1.0, 2.0],
        lr_search_extensions=1,
    )
    result = exp.run(cfg, Context())
    claims = {c.id: c for c in exp.check_claims(cfg, result)}
    assert list(claims) == ["C2.1", "C2.2"]
    m = claims["C2.1"].measured
    assert m["models"] == ["mixed"]
    assert m["matches_hand_analysis"] == {"mixed": True}
    assert m["found_max_rel_loss_change_exact"] < 1e-12
    assert math.isfinite(m["not_found_min_rel_loss_change"]) and m["not_found_min_rel_loss_change"] > 0
    # two learning rates do not make the required grid: the shared-grid side result says so and fails
    shared = exp_module.shared_grid_check(cfg, result)
    assert not shared.passed and "grid" in shared.note
    for model in ("mlp", "cnn"):
        for stat in ("mean_acc", "spread_across_lr"):
            assert all(math.isfinite(v) for v in shared.measured["per_model"][model][stat].values())
    assert len(result["trials"]) == 2 * 3 * 2
    # C2.2 (a, b): every model and method measured; UnitNormSGD normalizes filters at construction, so
    # its runs from rescaled initializations are the same run (checked against SGD's, which differ)
    pm = claims["C2.2"].measured["per_model"]
    for model in ("mlp", "cnn"):
        assert pm[model]["a_disagreement"]["unit_norm"] == 0.0
        for key in ("b_centred_mean_acc", "b_centred_spread", "a_acc_std"):
            assert all(math.isfinite(v) for v in pm[model][key].values())
    assert (claims["C2.2"].note == "") == claims["C2.2"].passed
    # the lr search: a best at the edge of [0.05, 0.5] was extended one step (the cap here) past that edge
    for model, per in result["protocol"]["search"].items():
        for method, info in per.items():
            assert info["best_lr"] == result["protocol"]["best_lrs"][model][method]
            assert info["extensions"] <= 1 and set(info["grid"]) >= {0.05, 0.5}
            if not info["interior"]:
                assert f"{model} (b): {method}'s best lr" in claims["C2.2"].note and not claims["C2.2"].passed
    paths = exp.figures(result, tmp_path)
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_c2_2_reports_unrounded_values_and_a_note_that_tells_them_apart():
    det = [
        {
            "model": "mlp",
            "found": [],
            "redundant_bias_change": {},
            "not_found_change": {"1.weight": 0.1},
            "matches_expected": True,
        }
    ]
    stats = {"sgd": (0.82891, 0.05), "sgd_wd": (0.8, 0.05), "unit_norm": (0.82889, 0.01)}  # equal to 4 decimals
    summary = {"mlp": {k: {"mean_acc": a, "spread_across_lr": s, "best_acc": a} for k, (a, s) in stats.items()}}
    result = {"detection": det, "trials": [], "summary": summary, "lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "models": ["mlp"]}
    c = exp_module.shared_grid_check(Config(seeds=1, epochs=1), result)
    assert not c.passed  # 0.82889 < 0.82891
    assert c.measured["per_model"]["mlp"]["mean_acc"] == {"sgd": 0.82891, "sgd_wd": 0.8, "unit_norm": 0.82889}
    assert "mean 0.82889 vs SGD 0.82891" in c.note and "spread 0.01 vs 0.05" in c.note


def _val_trials(items):
    """Validation accuracy peaked at lr = 3 (a known answer for the search)."""
    return [dict(i, val_acc=1.0 - abs(math.log10(i["lr"] / 3.0)) - 0.01 * i["seed"]) for i in items]


def test_lr_search_extends_past_the_edge_until_the_best_is_interior():
    from symgen.experiments import unit_norm_protocol as up

    coarse = [0.01, 0.03, 0.1, 0.3]
    base = {"dataset": "digits"}
    trials = _val_trials(
        [
            dict(base, model="mlp", method=m, lr=lr, seed=s)
            for m in ("sgd", "sgd_wd", "unit_norm")
            for lr in coarse
            for s in (0, 1)
        ]
    )
    calls = []
    best, extra = up.search_best(
        trials, ["mlp"], base, [0, 1], 4, lambda items: calls.append(items) or _val_trials(items)
    )
    # steps of x3 (0.3 / 0.1) past 0.3: 0.9, 2.7, 8.1; the best (2.7) is interior once 8.1 was searched
    assert best["mlp"]["sgd"] == pytest.approx(2.7) and best["mlp"]["unit_norm"] == best["mlp"]["sgd"]
    assert len(calls) == 3 and all(i["method"] != "sgd_wd" for c in calls for i in c)
    search = [t for t in trials + extra if t["method"] != "sgd_wd"]
    info = up.search_summary(search, best, coarse)["mlp"]["sgd"]
    assert info["interior"] and info["extensions"] == 3
    assert info["grid"] == pytest.approx([0.01, 0.03, 0.1, 0.3, 0.9, 2.7, 8.1])
    # a cap of one step leaves the best at the edge: the protocol fails with that reason
    best1, extra1 = up.search_best(trials, ["mlp"], base, [0, 1], 1, _val_trials)
    info1 = up.search_summary([t for t in trials + extra1 if t["method"] != "sgd_wd"], best1, coarse)
    assert not info1["mlp"]["sgd"]["interior"] and best1["mlp"]["sgd"] == pytest.approx(0.9)
    ok = {
        "best_lr": 1.0,
        "centred_grid": [],
        "centred_mean_acc": 0.9,
        "centred_spread": 0.01,
        "rescaled_accs": [],
        "rescaled_acc_std": 0.0,
        "rescaled_acc_range": 0.0,
        "rescaled_disagreement": 0.0,
    }
    summary = {"mlp": {"sgd": dict(ok, rescaled_disagreement=0.1, centred_spread=0.05), "unit_norm": ok}}
    assert up.verdict(summary)[0]  # passes on its numbers alone
    passed, _, reasons = up.verdict(summary, info1)
    assert not passed and "still at an edge" in reasons[0] and "1 extension step" in reasons[0]
    # no step at all where the best is already interior
    assert up.extension_items(base, search, best, [0]) == []
