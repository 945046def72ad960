"""Smoke test of the flat-minima experiment with a tiny config; the model builder's shapes."""

import math

import pytest
import torch

from symgen.errors import ConfigError
from symgen.experiments import Context, build_config, get_experiment
from symgen.experiments.flat_minima import EXPERIMENT, OPTIMIZERS, Config, bn_cnn


def test_bn_cnn_shapes():
    assert bn_cnn((1, 8, 8), 10, 4)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert bn_cnn((1, 40), 10, 4)(torch.zeros(2, 1, 40)).shape == (2, 10)
    with pytest.raises(ConfigError, match="input shape"):
        bn_cnn((8,), 10)


def test_flat_minima_tiny_run(tmp_path):
    assert get_experiment("flat-minima") is EXPERIMENT
    cfg = build_config(
        Config,
        quick=EXPERIMENT.quick,
        seeds=1,
        width=2,
        grad_eval_epochs=0.5,
        hessian_samples=64,
        trace_matvecs=6,
        density_steps=4,
        noise_samples=2,
        estimator_draws=40,
        nso_variants=[{"sigma": 0.1, "relative": True}],
        optimizers=list(OPTIMIZERS),
        finetune_optimizers=["sgd", "sam", "asam", "nso", "sgd_equal_evals"],
        finetune_seeds=2,
        finetune_width=2,
        pretrain_epochs=1,
        finetune_epochs=1,
    )
    result = EXPERIMENT.run(cfg, Context())
    runs = result["runs"]
    assert {r["label"] for r in runs} == {"sgd", "sam", "asam", "nso", "nso(sigma=0.1, relative)"}
    evals = {r["label"]: r["grad_evals"] for r in runs}
    assert len(set(evals.values())) == 1  # equal gradient evaluations
    steps = {r["label"]: r["steps"] for r in runs}
    assert steps["sgd"] == 2 * steps["sam"] == 2 * steps["nso"]
    claims = EXPERIMENT.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C3.1", "C3.2"]
    for c in claims:
        assert c.measured and all(math.isfinite(v) for v in c.measured.values())
    assert "Power check" in claims[0].note and "Sensitivity" in claims[1].note
    # C3.2 is checked on the fine-tuning protocol at equal epochs (the reference code's); equal gradient
    # evaluations ("sgd_equal_evals") is the side comparison
    ft_runs = result["finetune"]["runs"]
    ft_evals = {r["optimizer"]: r["grad_evals"] for r in ft_runs}
    assert ft_evals["sgd_equal_evals"] == ft_evals["sam"] == ft_evals["asam"] == ft_evals["nso"] == 2 * ft_evals["sgd"]
    ft_steps = {r["optimizer"]: r["steps"] for r in ft_runs}
    assert (
        ft_steps["sgd_equal_evals"] == 2 * ft_steps["nso"] == 2 * ft_steps["sam"] and ft_steps["sgd"] == ft_steps["nso"]
    )
    assert "Fine-tuning" in claims[1].note and "From scratch (side result" in claims[1].note
    # the reported reductions are those of the run's fine-tuning summary (means over seeds)
    s = result["finetune"]["summary"]
    assert claims[1].measured["trace_reduction_vs_sgd"] == 1 - s["nso"]["trace"] / s["sgd"]["trace"]
    assert claims[1].measured["test_acc_sgd"] == s["sgd"]["test_acc"]
    assert {"trace_reduction_sam_vs_sgd", "trace_reduction_asam_vs_sgd", "trace_reduction_nso_vs_sam"} <= set(
        claims[1].measured
    )
    eq = s["nso"]["trace_reduction_equal_evals"]  # both comparisons are printed, the claim on equal epochs
    assert (
        claims[1].measured["trace_reduction_vs_sgd_equal_evals"]
        == eq
        == 1 - s["nso"]["trace"] / s["sgd_equal_evals"]["trace"]
    )
    assert "At equal gradient evaluations" in claims[1].note and "equal epochs" in claims[1].statement
    paths = EXPERIMENT.figures(result, tmp_path)
    assert len(paths) == 3 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    with pytest.raises(ConfigError):
        build_config(Config, nso_pairs=0)


def test_config_needs_an_optimizer():
    with pytest.raises(ConfigError, match="optimizers"):
        build_config(Config, optimizers=[])
