"""Smoke test of the ``ntk-robustness`` experiment (C4.4) on a tiny config: claims computed, figures written."""

from __future__ import annotations

import math

import pytest

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config


def test_ntk_robustness_experiment_tiny(tmp_path):
    exp = get_experiment("ntk-robustness")
    cfg = build_config(
        exp.config,
        quick=exp.quick,
        seeds=1,
        epochs=1,
        adv_epochs=3,
        adv_batch_size=64,
        adv_lr_schedule="cosine",
        adv_eps_warmup_epochs=2,
        pgd_steps=2,
        train_pgd_steps=1,
        width=16,
        num_features=3,
        max_train=150,
        max_test=40,
    )
    result = exp.run(cfg, Context())
    claims = exp.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.4-pgd", "C4.4-transfer", "C4.4-advtrain", "C4.4-features"]
    assert all((c.note == "") == c.passed for c in claims)  # a failing claim says why
    s = result["summary"]
    # unrounded: the numbers the verdicts are decided on
    assert claims[0].measured["drops"]["network"] == s["standard"]["clean"] - s["standard"]["pgd"]
    assert claims[2].measured["gain"] == s["adversarial"]["pgd"] - s["standard"]["pgd"]
    adv = result["networks"][0]["adversarial"]  # the adversarial schedule: one loss per epoch of adv_epochs
    assert len(adv["train_loss"]) >= 3 and adv["final_train_loss"] == adv["train_loss"][-1]
    assert claims[2].measured["schedule"]["eps_warmup_epochs"] == 2
    assert set(claims[2].measured["gain_by_eps"]) == {str(e) for e in cfg.eps_sweep}
    # 3 features, top_features capped at 2: both means are over real features
    assert math.isfinite(claims[3].measured["mean_robustness_top"])
    assert math.isfinite(claims[3].measured["mean_robustness_rest"])
    for name in ("standard", "adversarial", "kernel"):
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in result["summary"][name].values())
    f = result["features"]
    assert len(f["usefulness"]) == len(f["robustness"]) == len(f["eigenvalues"]) == 3
    paths = exp.figures(result, tmp_path)
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_ntk_robustness_config_rejects_bad_values():
    exp = get_experiment("ntk-robustness")
    with pytest.raises(ConfigError):
        build_config(exp.config, eps=-0.1)
    with pytest.raises(ConfigError):
        build_config(exp.config, norm="l1")
    with pytest.raises(ConfigError):
        build_config(exp.config, adv_epochs=0)
    with pytest.raises(ConfigError):
        build_config(exp.config, adv_lr_schedule="step")
