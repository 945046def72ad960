"""C3.2's fine-tuning protocol: the source/target split, the reference code's curvature measures against a
dense Hessian, and the paired summary against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as TF

from symgen.experiments import nso_finetune as ft
from symgen.models import bn_cnn
from symgen.rng import isolated_seed


def test_split_keeps_and_relabels_the_classes():
    y = torch.tensor([0, 5, 9, 4, 7, 5])
    x = torch.arange(6.0)[:, None]
    xs, ys = ft._split(x, y, ft.TARGET)
    assert xs[:, 0].tolist() == [1.0, 2.0, 4.0, 5.0] and ys.tolist() == [0, 4, 2, 0]
    assert set(ft.SOURCE).isdisjoint(ft.TARGET)


def _dense_hessian(model, names, x, y):
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        chunks = flat.split([math.prod(s) for s in shapes])
        p = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return TF.cross_entropy(torch.func.functional_call(model, {**dict(model.named_parameters()), **p}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0), [math.prod(s) for s in shapes]


def test_paper_curvature_matches_a_dense_hessian():
    with isolated_seed(0):
        model = bn_cnn((1, 4, 4), 3, 1).double()
        x = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(12) % 3
    model.train()
    model(x)  # running statistics away from their initial values
    model.eval()
    names = ft.weight_names(model)
    assert names == ["0.weight", "3.weight", "7.weight", "12.weight"]  # conv and linear weights, no BN, no bias
    H, sizes = _dense_hessian(model, names, x, y)
    Hall, _ = _dense_hessian(model, [n for n, _ in model.named_parameters()], x, y)
    blocks = torch.split(torch.arange(H.shape[0]), sizes)
    layer_tops = [float(torch.linalg.eigvalsh(H[b][:, b])[-1]) for b in blocks]
    item = {"trace_matvecs": 3 * Hall.shape[0], "eig_tol": 1e-8}
    curv = ft._curvature(model, (x, y), item, 0)
    assert curv["num_weights"] == H.shape[0] and curv["num_params"] == Hall.shape[0]
    assert curv["trace"] == pytest.approx(float(H.trace()), rel=1e-6, abs=1e-8)
    assert curv["global_trace"] == pytest.approx(float(Hall.trace()), rel=1e-6, abs=1e-8)
    assert curv["top_eig"] == pytest.approx(sum(layer_tops), rel=1e-6)
    assert list(curv["layer_top_eigs"].values()) == pytest.approx(layer_tops, rel=1e-6)
    assert curv["global_top_eig"] == pytest.approx(float(torch.linalg.eigvalsh(Hall)[-1]), rel=1e-6)


def test_summary_reductions_and_paired_stderr():
    runs = [
        {
            "optimizer": o,
            "seed": s,
            "grad_evals": 8,
            "steps": 4,
            "test_acc": acc,
            "train_loss": 0.1,
            "trace": tr,
            "top_eig": te,
            "global_trace": tr + 1,
            "global_top_eig": te + 1,
            "time_s": 1.0,
        }
        for o, s, acc, tr, te in [
            ("sgd", 0, 0.9, 10.0, 4.0),
            ("sgd", 1, 0.8, 20.0, 6.0),
            ("nso", 0, 0.92, 8.0, 3.0),
            ("nso", 1, 0.8, 12.0, 6.0),
        ]
    ]
    s = ft.summarize(runs)
    assert s["nso"]["trace_reduction"] == pytest.approx(1 - 10 / 15)  # ratio of the means
    per_seed = torch.tensor([1 - 8 / 10, 1 - 12 / 20], dtype=torch.float64)
    assert s["nso"]["trace_reduction_stderr"] == pytest.approx(float(per_seed.std() / math.sqrt(2)))
    assert s["nso"]["test_acc_diff"] == pytest.approx(0.01)
    m = ft.claim_values(s, 0.177, 0.128)
    assert m["trace_margin_se"] == pytest.approx((1 - 10 / 15 - 0.177) / s["nso"]["trace_reduction_stderr"])
    assert m["global_trace_reduction_vs_sgd"] == pytest.approx(1 - 11 / 16)


def test_both_compute_matchings_are_summarized():
    runs = [
        {
            "optimizer": o,
            "seed": s,
            "grad_evals": 8,
            "steps": 4,
            "test_acc": acc,
            "train_loss": 0.1,
            "trace": tr,
            "top_eig": te,
            "global_trace": tr,
            "global_top_eig": te,
            "time_s": 1.0,
        }
        for o, s, acc, tr, te in [
            ("sgd", 0, 0.9, 10.0, 4.0),
            ("sgd", 1, 0.8, 20.0, 6.0),
            ("sgd_equal_evals", 0, 0.95, 6.0, 2.0),
            ("sgd_equal_evals", 1, 0.9, 10.0, 3.0),
            ("nso", 0, 0.92, 8.0, 3.0),
            ("nso", 1, 0.8, 12.0, 6.0),
        ]
    ]
    s = ft.summarize(runs)
    assert s["nso"]["trace_reduction"] == pytest.approx(1 - 10 / 15)  # vs equal epochs (the claim)
    assert s["nso"]["trace_reduction_equal_evals"] == pytest.approx(1 - 10 / 8)  # vs equal gradient evaluations
    per_seed = torch.tensor([1 - 8 / 6, 1 - 12 / 10], dtype=torch.float64)
    assert s["nso"]["trace_reduction_equal_evals_stderr"] == pytest.approx(float(per_seed.std() / math.sqrt(2)))
    assert s["nso"]["test_acc_diff_equal_evals"] == pytest.approx((0.92 - 0.95 + 0.8 - 0.9) / 2)
    m = ft.claim_values(s, 0.177, 0.128)
    assert m["trace_reduction_vs_sgd"] == pytest.approx(1 - 10 / 15)
    assert m["trace_reduction_vs_sgd_equal_evals"] == pytest.approx(1 - 10 / 8)
    assert m["top_eig_reduction_vs_sgd_equal_evals"] == pytest.approx(1 - 4.5 / 2.5)
    assert m["test_acc_sgd_equal_evals"] == pytest.approx(0.925)
    assert m["trace_margin_se_equal_evals"] == pytest.approx(
        (1 - 10 / 8 - 0.177) / float(per_seed.std() / math.sqrt(2))
    )
    assert "FAIL there" in ft.equal_evals_verdict(m, 0.177, 0.128)
    del s["sgd_equal_evals"]
    assert ft.equal_evals_verdict(ft.claim_values(s, 0.177, 0.128), 0.177, 0.128) is None


def test_steps_follow_the_reference_protocol():
    """Plain fine-tuning and SAM run ``epochs``; NSO with k pairs epochs / k (the reference's --num_perturbs 2
    --epochs 15); plain fine-tuning at equal gradient evaluations 2k x NSO's steps."""
    item = dict(
        width=1,
        pretrain_lr=1e-3,
        pretrain_epochs=1,
        batch_size=512,
        lr=1e-4,
        weight_decay=0.0,
        epochs=2,
        nso_pairs=2,
        nso_sigma=0.01,
        rho_sam=0.01,
        rho_asam=0.1,
        hessian_samples=8,
        trace_matvecs=3,
        eig_tol=1e-1,
        num_threads=1,
        data_seed=0,
        seed=0,
    )
    out = {o: ft.finetune_trial(dict(item, optimizer=o)) for o in ("sgd", "nso", "sam", "sgd_equal_evals")}
    per_epoch = out["sgd"]["steps"] // 2
    assert per_epoch >= 1 and out["sgd"]["steps"] == out["sam"]["steps"] == 2 * per_epoch
    assert out["nso"]["steps"] == per_epoch and out["nso"]["grad_evals"] == 4 * per_epoch == out["sam"]["grad_evals"]
    assert out["sgd_equal_evals"]["steps"] == out["sgd_equal_evals"]["grad_evals"] == out["nso"]["grad_evals"]
