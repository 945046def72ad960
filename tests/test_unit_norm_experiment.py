"""Smoke test of the ``unit-norm`` experiment on a tiny config, and its models' hand-analysed symmetries."""

import math

import pytest
import torch

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
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


def test_tiny_run_computes_claims_and_figures(tmp_path):
    exp = get_experiment("unit-norm")
    cfg = build_config(Config, quick=exp.quick, seeds=1, epochs=1, lrs=[0.05, 0.5], width=8,
                       channels=2, detection_models=["mixed"], detection_batch=64)
    result = exp.run(cfg, Context())
    claims = {c.id: c for c in exp.check_claims(cfg, result)}
    assert list(claims) == ["C2.1", "C2.2"]
    m = claims["C2.1"].measured
    assert m["models"] == ["mixed"]
    assert m["matches_hand_analysis"] == {"mixed": True}
    assert m["found_max_rel_loss_change_exact"] < 1e-12
    assert math.isfinite(m["not_found_min_rel_loss_change"]) and m["not_found_min_rel_loss_change"] > 0
    # two learning rates do not make the required grid: the claim says so and fails
    assert not claims["C2.2"].passed and "grid" in claims["C2.2"].note
    for model in ("mlp", "cnn"):
        for stat in ("mean_acc", "spread_across_lr"):
            assert all(math.isfinite(v) for v in claims["C2.2"].measured["per_model"][model][stat].values())
    assert len(result["trials"]) == 2 * 3 * 2
    paths = exp.figures(result, tmp_path)
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)
