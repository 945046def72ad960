"""Experiment ``implicit-bias``: a tiny end-to-end run, its data and its config errors."""

from __future__ import annotations

import math

import pytest
import torch

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config
from symgen.experiments.implicit_bias import EXPERIMENT, Config, make_dataset, train_trial

TINY = {
    "datasets": ["cyclic"],
    "depths": [1, 2],
    "train_sizes": [4, 8],
    "claim_size": 8,
    "seeds": 1,
    "steps": 150,
    "width": 3,
    "records": 5,
    "test_size": 200,
    "cyclic_channels": 2,
    "cyclic_length": 4,
}


def _finite(v) -> bool:
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_registered_and_tiny_run(tmp_path):
    assert get_experiment("implicit-bias") is EXPERIMENT
    cfg = build_config(Config, quick=EXPERIMENT.quick, **TINY)
    result = EXPERIMENT.run(cfg, Context())
    claims = EXPERIMENT.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C1.1", "C1.2", "C1.3", "C1.4"]
    for c in claims:
        assert _finite(c.measured)
        assert (c.note == "") == c.passed  # a failing claim says why
    # the claims report the trained members at claim_size: 2 depths x 1 seed
    steer = [m for t in result["trials"] if t["kind"] == "steerable" for m in t["members"] if m["size"] == 8]
    assert claims[0].measured["members"] == len(steer) == 2
    assert claims[0].measured["min_cos_to_invariant_svm"] == min(m["cos_inv_svm"] for m in steer)
    assert set(claims[3].measured) == {"cyclic/depth1", "cyclic/depth2"}
    assert all(0 <= v <= 1 for acc in claims[3].measured.values() for v in acc.values())
    # every trained steerable predictor is invariant, whatever its convergence
    for t in result["trials"]:
        assert len(t["members"]) == 2 and len(t["trajectory"]["steps"]) >= 2
        if t["kind"] == "steerable":
            assert max(m["invariance_error"] for m in t["members"]) < 1e-10
    # the invariant SVM by orbit augmentation and by Reynolds projection agree
    assert min(r["cos_augment_reynolds"] for ref in result["svm_crosscheck"] for r in ref["rows"]) > 1 - 1e-9
    paths = EXPERIMENT.figures(result, tmp_path)
    assert len(paths) == 2 and all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_dataset_labels_are_invariant_and_nested():
    cfg = Config(cyclic_channels=2, cyclic_length=5, test_size=50).model_dump()
    a = make_dataset("cyclic", cfg, seed=0, n_train=12)
    b = make_dataset("cyclic", cfg, seed=0, n_train=12)
    assert torch.equal(a["x_train"], b["x_train"])  # deterministic
    from symgen.augment import OrbitAugment
    from symgen.groups import CyclicShift
    from symgen.margins import hard_margin_svm

    act = CyclicShift(5)
    # invariant labels with a margin: the orbit-augmented training set is separable
    xa, ya = OrbitAugment(act)(a["x_train"], a["y_train"])
    assert hard_margin_svm(xa, ya).margin > 0
    assert set(a["y_train"].tolist()) <= {-1.0, 1.0}


def test_digits_trial_runs():
    cfg = Config(train_sizes=[4], claim_size=4, seeds=1, steps=30, width=2, records=3).model_dump()
    out = train_trial({"index": 0, "dataset": "digits-c4", "kind": "steerable", "depth": 2, "config": cfg})
    m = out["members"][0]
    assert out["group"] == "C4" and out["dim"] == 64
    assert m["invariance_error"] < 1e-10 and 0.0 <= m["test_accuracy"] <= 1.0


def test_config_errors():
    with pytest.raises(ConfigError, match="claim_size"):
        EXPERIMENT.run(build_config(Config, **dict(TINY, claim_size=5)), Context())
    with pytest.raises(ConfigError):
        build_config(Config, depths=[0])
    with pytest.raises(ConfigError):
        build_config(Config, sets=["nonsense=1"])
    with pytest.raises(ConfigError):
        build_config(Config, sets=["datasets=[mnist]"])
    # nothing to measure must be an error, never a claim that passes vacuously
    for empty in ({"datasets": []}, {"depths": []}, {"train_sizes": []}, {"seeds": 0}):
        with pytest.raises(ConfigError, match=next(iter(empty))):
            build_config(Config, **empty)
