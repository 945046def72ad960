"""Smoke test of the ``kip`` experiment (C4.3) on a tiny config: claims computed, figures written."""

from __future__ import annotations

import math

from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config


def test_kip_experiment_tiny(tmp_path):
    exp = get_experiment("kip")
    cfg = build_config(exp.config, quick=exp.quick, datasets=["digits"], support_sizes=[1], seeds=2, steps=5,
                       target_per_class=3, net_width=16, net_steps=5, max_train=200, max_test=60)
    result = exp.run(cfg, Context())
    claims = exp.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.3", "C4.3-net"]
    assert all((c.note == "") == c.passed for c in claims)  # a failing claim says why
    assert set(claims[0].measured) == set(claims[1].measured) == {"digits/1"}
    m = claims[0].measured["digits/1"]
    for key in ("distilled", "random", "full"):
        assert 0 <= m[key] <= 1
    assert math.isfinite(m["gain"]) and math.isfinite(m["min_paired_gain"])
    assert abs(m["gain"] - (m["distilled"] - m["random"])) < 2e-4  # each of the three rounded to 4 digits
    assert all(0 <= v <= 1 for v in claims[1].measured["digits/1"].values())
    assert len(result["trials"]) == 2 and result["full"][0]["num_train"] == 200
    paths = exp.figures(result, tmp_path)
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_kip_config_rejects_bad_values():
    import pytest

    from symgen.errors import ConfigError

    exp = get_experiment("kip")
    with pytest.raises(ConfigError):
        build_config(exp.config, support_sizes=[0])
    with pytest.raises(ConfigError):
        build_config(exp.config, datasets=["cifar"])
