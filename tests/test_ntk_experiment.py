"""Smoke test of the ``ntk`` experiment (tiny config): claims computed, figures written."""

from __future__ import annotations

import math

import pytest

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config
from symgen.experiments.ntk import EXPERIMENT, Config


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return True


def test_ntk_experiment_tiny(tmp_path):
    assert get_experiment("ntk") is EXPERIMENT
    cfg = build_config(
        Config,
        quick=EXPERIMENT.quick,
        widths=[16, 64],
        kernel_points=8,
        kernel_seeds=2,
        dynamics_width=128,
        train_size=16,
        test_size=12,
        steps=30,
        records=6,
        dynamics_seeds=1,
    )
    result = EXPERIMENT.run(cfg, Context())
    claims = EXPERIMENT.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.1", "C4.2", "C4.2-spectral"]
    for c in claims:
        assert _finite(c.measured)
        assert (c.note == "") == c.passed  # a failing claim says why
    assert set(claims[0].measured["rel_error_by_width"]) == {"16", "64"}
    assert claims[1].measured["max_dev_train"] == max(result["dynamics"][0]["dev_train"])  # unrounded, as decided
    assert len(claims[2].measured["remaining_fraction_by_band_top_to_bottom"]) == 1  # one dynamics seed
    dyn = result["dynamics"][0]
    assert dyn["times"][0] == 0 and dyn["times"][-1] == 30
    assert dyn["dev_train"][0] == pytest.approx(0.0, abs=1e-6)  # net and kernel agree at t = 0
    paths = EXPERIMENT.figures(result, tmp_path)
    assert len(paths) == 3 and all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_ntk_config_errors():
    with pytest.raises(ConfigError):
        build_config(Config, widths=[64])
    with pytest.raises(ConfigError):
        build_config(Config, activation="tanh")
    # nothing measured must not pass: no seeds, or a single eigenvalue band (no order to check)
    for bad in ({"kernel_seeds": 0}, {"dynamics_seeds": 0}, {"bands": 1}, {"steps": 0}, {"records": 0}):
        with pytest.raises(ConfigError):
            build_config(Config, **bad)


def test_ntk_dynamics_divergence_names_lr_factor():
    from symgen.errors import DivergenceError
    from symgen.experiments.ntk import dynamics_trial

    cfg = build_config(
        Config, widths=[16, 64], dynamics_width=64, train_size=8, test_size=8, steps=200, records=4, lr_factor=40.0
    )  # far above the stable 2: GD blows up
    item = {
        k: getattr(cfg, k)
        for k in (
            "dataset",
            "depth",
            "activation",
            "weight_std",
            "bias_std",
            "dtype",
            "device",
            "train_size",
            "test_size",
            "steps",
            "lr_factor",
            "records",
            "discrete",
            "centered",
            "bands",
        )
    }
    with pytest.raises(DivergenceError, match="lr_factor"):
        dynamics_trial(dict(item, width=cfg.dynamics_width, seed=0))
