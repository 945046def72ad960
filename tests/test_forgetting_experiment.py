"""Smoke test of the ``forgetting`` experiment (tiny config): claims computed and explained, figures written."""

from __future__ import annotations

import pytest

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config
from symgen.experiments.forgetting import EXPERIMENT, Config


def test_forgetting_tiny(tmp_path):
    assert get_experiment("forgetting") is EXPERIMENT
    cfg = build_config(Config, quick=EXPERIMENT.quick, widths=[32, 64], tasks=["relabel", "perm100", "split"],
                       train_size=12, test_size=16, steps_a=20, steps_b=20, records=4, num_components=4)
    result = EXPERIMENT.run(cfg, Context())
    claims = EXPERIMENT.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.6-overlap", "C4.6-prediction", "C4.6-ogd"]
    for c in claims:
        assert (c.note == "") == c.passed
    top = result["by_width"]["64"]
    assert top["times"][0] == 0 and top["times"][-1] == 20
    for rec in top["pairs"].values():
        # at step 0 of task B nothing has moved: kernel prediction and net agree exactly
        assert rec["mse_a_predicted"][0] == pytest.approx(rec["mse_a_measured"][0], rel=1e-9)
        assert rec["ogd"]["directions"] == 12 * 5
        assert 0 <= rec["overlap"] <= 1
    assert "ogd" not in result["by_width"]["32"]["pairs"]["split"]
    paths = EXPERIMENT.figures(result, tmp_path)
    assert all(p.exists() for p in paths) and len(paths) == 2


def test_forgetting_config_errors():
    with pytest.raises(ConfigError, match="tasks"):
        build_config(Config, tasks=["relabel", "nope", "split"])
    with pytest.raises(ConfigError, match="widths"):
        build_config(Config, widths=[64])
