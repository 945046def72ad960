"""Smoke test of the ``kip`` experiment (C4.3) on a tiny config: claims computed, figures written."""

from __future__ import annotations

import math

from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config


def test_kip_experiment_tiny(tmp_path):
    exp = get_experiment("kip")
    cfg = build_config(
        exp.config,
        quick=exp.quick,
        datasets=["digits"],
        support_sizes=[1],
        seeds=2,
        steps=5,
        target_per_class=3,
        net_width=16,
        net_steps=5,
        max_train=200,
        max_test=60,
    )
    result = exp.run(cfg, Context())
    claims = exp.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.3", "C4.3-net"]
    assert all((c.note == "") == c.passed for c in claims)  # a failing claim says why
    assert set(claims[0].measured) == set(claims[1].measured) == {"digits/1"}
    m = claims[0].measured["digits/1"]
    for key in ("distilled", "random", "full"):
        assert 0 <= m[key] <= 1
    assert math.isfinite(m["gain"]) and math.isfinite(m["min_paired_gain"])
    assert m["gain"] == m["distilled"] - m["random"]  # unrounded: the numbers the verdict is decided on
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
    with pytest.raises(ConfigError):  # no dataset: nothing measured, the claim must not pass
        build_config(exp.config, datasets=[])


def test_kip_network_training_matches_plain_adam_loop():
    """The finite network of C4.3-net: full-batch Adam on 0.5 * MSE, against a hand-written loop."""
    import torch

    from symgen.experiments.kip import _train_net
    from symgen.models import ntk_mlp

    cfg = {"net_width": 16, "depth": 2, "weight_std": 1.4, "bias_std": 0.1, "net_lr": 1e-2, "net_steps": 25}
    g = torch.Generator().manual_seed(3)
    x_s, y_s = (
        torch.randn(6, 1, 2, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 3, generator=g, dtype=torch.float64),
    )
    x_te = torch.randn(40, 1, 2, 3, generator=g, dtype=torch.float64)
    net = ntk_mlp(6, 16, 2, 3, "relu", 1.4, 0.1, generator=7, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        (0.5 * (net(x_s) - y_s).pow(2).mean()).backward()
        opt.step()
    with torch.no_grad():
        y_te = net(x_te).argmax(1)  # labels the reference net gets all right
    assert _train_net(cfg, x_s, y_s, x_te, y_te, seed=7) == 1.0
    assert _train_net(cfg, x_s, y_s, x_te, (y_te + 1) % 3, seed=7) == 0.0
