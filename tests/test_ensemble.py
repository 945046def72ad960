"""Vectorized ensembles and masked convolutions, checked against per-member loops in plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from symgen.ensemble import (
    Ensemble,
    epoch_plan,
    infinite_ensemble_deviation,
    member_generator,
    sub_ensemble_metrics,
    train_ensemble,
)
from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.groups import ImageRotation90
from symgen.metrics import invariance_metrics, invariance_report
from symgen.nn.masked import MaskedCNN, MaskedConv1d, MaskedConv2d, support_mask

DT = torch.float64


def _tiny_cnn(support="symmetric"):
    return MaskedCNN(in_channels=1, num_classes=3, channels=3, support=support, dtype=DT)


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


# --------------------------------------------------------------------------- masked convolutions


def test_support_masks():
    plus, asym, full = (support_mask(s) for s in ("symmetric", "asymmetric", "full"))
    assert plus.sum() == 5 and asym.sum() == 5 and full.sum() == 9
    assert plus[1, 1] == 1 and asym[1, 1] == 0 and asym[0, 0] == 1
    for k in range(4):  # '+' is closed under rotations, the asymmetric support is not
        assert torch.equal(torch.rot90(plus, k), plus)
    assert not torch.equal(torch.rot90(asym, 1), asym)
    assert torch.equal(support_mask("asymmetric", ndim=1), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ConfigError):
        support_mask("diagonal")
    with pytest.raises(ConfigError):
        support_mask("symmetric", kernel_size=5)
    with pytest.raises(ShapeError):
        support_mask(torch.ones(2, 2))


@pytest.mark.parametrize("support", ["full", "symmetric", "asymmetric"])
def test_masked_conv_matches_dense_conv_and_keeps_support(support):
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 3, support=support, dtype=DT)
    mask = support_mask(support).to(DT)
    assert torch.equal(conv.weight * (1 - mask), torch.zeros_like(conv.weight))
    x = torch.randn(4, 2, 5, 5, dtype=DT)
    ref = F.conv2d(x, conv.weight.detach() * mask, conv.bias.detach(), padding=1)
    out = conv(x)
    assert torch.allclose(out, ref)
    out.square().sum().backward()
    assert torch.equal(conv.weight.grad * (1 - mask), torch.zeros_like(conv.weight))
    conv1 = MaskedConv1d(2, 3, 3, support=support, dtype=DT)
    z = torch.randn(2, 2, 7, dtype=DT)
    m1 = support_mask(support, ndim=1).to(DT)
    assert torch.allclose(conv1(z), F.conv1d(z, conv1.weight.detach() * m1, conv1.bias.detach(), padding=1))


def test_gaussian_init_on_support():
    g = torch.Generator().manual_seed(0)
    conv = MaskedConv2d(64, 64, 3, support="symmetric", generator=g, init_std=1.0, dtype=DT)
    on = conv.weight.detach()[:, :, support_mask("symmetric").bool()]
    assert on.numel() == 64 * 64 * 5
    assert abs(float(on.mean())) < 0.02 and abs(float(on.std()) - 1.0) < 0.02
    # seeded: the same generator seed gives the same filters
    conv2 = MaskedConv2d(64, 64, 3, support="symmetric", generator=torch.Generator().manual_seed(0), dtype=DT)
    assert torch.equal(conv.weight, conv2.weight)


def _rotate_filters(model: MaskedCNN, k: int) -> MaskedCNN:
    import copy

    rot = copy.deepcopy(model)
    with torch.no_grad():
        for conv in rot.convs:
            conv.weight.copy_(torch.rot90(conv.weight, k, dims=(-2, -1)))
    return rot


def test_symmetric_support_cnn_is_compatible_with_rotations():
    """f(g x; rho(g) W) = f(x; W): rotating input and filters together leaves the logits unchanged."""
    torch.manual_seed(0)
    model = MaskedCNN(1, 5, channels=4, support="symmetric", dtype=DT)
    x = torch.randn(3, 1, 8, 8, dtype=DT)
    for k in range(4):
        rot = _rotate_filters(model, k)
        # the rotated '+' filters are still on the support (the layer space is invariant)
        for conv in rot.convs:
            assert torch.equal(conv.weight * (1 - conv.mask), torch.zeros_like(conv.weight))
        assert torch.allclose(rot(torch.rot90(x, k, dims=(-2, -1))), model(x), atol=1e-12)
    # the asymmetric support is not: rotated filters leave the support
    asym = _rotate_filters(MaskedCNN(1, 5, channels=4, support="asymmetric", dtype=DT), 1)
    assert any(bool((c.weight * (1 - c.mask)).abs().sum() > 0) for c in asym.convs)


def test_masked_cnn_shapes_and_errors():
    m2 = MaskedCNN(1, 10, channels=[4, 5, 6])
    assert m2(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert m2(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    m1 = MaskedCNN(1, 10, channels=4, ndim=1)
    assert m1(torch.randn(2, 1, 40)).shape == (2, 10)
    with pytest.raises(ShapeError):
        m2(torch.randn(2, 8, 8))
    with pytest.raises(ConfigError):
        MaskedCNN(channels=[4, 4], num_layers=3)


# ------------------------------------------------------------------------------------ ensembles


def test_ensemble_init_and_member_logits_match_loop():
    ens = Ensemble.init(_tiny_cnn, 5, generator=7, first_member=2)
    assert ens.num_members == 5 and ens.member_ids == [2, 3, 4, 5, 6]
    x, _ = _data(6)
    logits = ens.member_logits(x)
    assert logits.shape == (5, 6, 3)
    for m in range(5):
        torch.manual_seed(7 + 2 + m)  # member i is built under seed + i
        ref = _tiny_cnn()
        assert torch.allclose(logits[m], ref(x), atol=1e-12)
        assert torch.allclose(ens.member(m)(x), ref(x), atol=1e-12)
    assert torch.allclose(ens(x), logits.mean(0))
    sub = ens.subset([4, 1])
    assert sub.member_ids == [6, 3] and torch.allclose(sub.member_logits(x), logits[[4, 1]])


def _train_loop_reference(member_id, seed, x, y, epochs, batch_size, lr, momentum, action, optimizer):
    """One member trained alone with plain autograd and torch.optim, applying g one sample at a time."""
    torch.manual_seed(seed + member_id)
    model = _tiny_cnn()
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    gen = member_generator(seed, member_id)
    n = x.shape[0]
    for _ in range(epochs):
        order, elems = epoch_plan(gen, n, action.group.order if action is not None else None)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            xb = x[idx]
            if action is not None:
                xb = torch.stack([action.apply(int(elems[s + i]), xb[i]) for i in range(len(idx))])
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.mark.parametrize("optimizer,momentum,augment", [("sgd", 0.0, True), ("sgd", 0.9, False), ("adam", 0.0, True)])
def test_vectorized_training_matches_member_loop(optimizer, momentum, augment):
    x, y = _data(22)
    action = ImageRotation90() if augment else None
    ens = Ensemble.init(_tiny_cnn, 3, generator=5, first_member=1)
    lr = 0.01 if optimizer == "adam" else 0.1
    opt = (
        torch.optim.SGD(ens.parameters(), lr=lr, momentum=momentum)
        if optimizer == "sgd"
        else torch.optim.Adam(ens.parameters(), lr=lr)
    )  # elementwise: each member its own update
    hist = train_ensemble(ens, x, y, opt, epochs=2, batch_size=8, augment=action, generator=5)
    assert hist.shape == (3, 2) and torch.isfinite(hist).all()
    xt, _ = _data(5, seed=1)
    for m in range(3):
        ref = _train_loop_reference(1 + m, 5, x, y, 2, 8, lr, momentum, action, optimizer)
        for name, p in ref.named_parameters():
            assert torch.allclose(ens.params[name][m], p.detach(), atol=1e-10), name
        assert torch.allclose(ens.member_logits(xt)[m], ref(xt), atol=1e-10)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_per_member_learning_rate_schedules_match_member_loops(optimizer):
    """lr_factors: member m steps with lr * f_m(epoch, step), under a torch scheduler too; each member equals a
    loop that trains it alone with that learning rate set in its own optimizer before every step."""
    x, y = _data(12)
    base = [1.0, 0.5, 0.1]
    lr = 0.02 if optimizer == "adam" else 0.1

    def factors(epoch, step):
        return torch.tensor([f * (0.7**epoch) * (1 + 0.1 * step) for f in base], dtype=DT)

    def make(params):
        return (
            torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
            if optimizer == "sgd"
            else torch.optim.Adam(params, lr=lr, weight_decay=1e-3)
        )

    ens = Ensemble.init(_tiny_cnn, 3, generator=2)
    opt = make(ens.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # the common schedule, per epoch
    train_ensemble(
        ens, x, y, opt, epochs=2, batch_size=5, generator=2, lr_factors=factors, on_epoch=lambda e, h: sched.step()
    )
    for m in range(3):
        torch.manual_seed(2 + m)
        model = _tiny_cnn()
        ref_opt = make(model.parameters())
        gen = member_generator(2, m)
        for epoch in range(2):
            order, _ = epoch_plan(gen, 12, None)
            for step, s in enumerate(range(0, 12, 5)):
                for g in ref_opt.param_groups:
                    g["lr"] = lr * 0.5**epoch * float(factors(epoch, step)[m])
                idx = order[s : s + 5]
                ref_opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                ref_opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(ens.params[name][m], p.detach(), rtol=1e-9, atol=1e-11, msg=name)
    # a constant tensor of factors; a wrong shape or a negative factor is a ConfigError
    ens2 = Ensemble.init(_tiny_cnn, 3, generator=2)
    with pytest.raises(ConfigError, match="lr_factors"):
        train_ensemble(ens2, x, y, torch.optim.SGD(ens2.parameters(), lr=0.1), lr_factors=torch.ones(2))
    with pytest.raises(ConfigError, match="lr_factors"):
        train_ensemble(ens2, x, y, torch.optim.SGD(ens2.parameters(), lr=0.1), lr_factors=torch.tensor([1.0, -1, 1]))
    zero = Ensemble.init(_tiny_cnn, 2, generator=2)
    w0 = zero.params["head.weight"].clone()
    train_ensemble(
        zero, x, y, torch.optim.SGD(zero.parameters(), lr=0.1), epochs=1, lr_factors=torch.tensor([0.0, 1.0])
    )
    assert torch.equal(zero.params["head.weight"][0], w0[0]) and not torch.equal(zero.params["head.weight"][1], w0[1])


def test_training_changes_with_seed_and_divergence_error():
    x, y = _data(16)
    a = Ensemble.init(_tiny_cnn, 2, generator=0)
    b = Ensemble.init(_tiny_cnn, 2, generator=0)
    train_ensemble(
        a, x, y, torch.optim.SGD(a.parameters(), lr=0.1), epochs=1, batch_size=4, augment=ImageRotation90(), generator=0
    )
    train_ensemble(
        b, x, y, torch.optim.SGD(b.parameters(), lr=0.1), epochs=1, batch_size=4, augment=ImageRotation90(), generator=1
    )
    assert not torch.allclose(a.params["head.weight"], b.params["head.weight"])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    c = Ensemble.init(_tiny_cnn, 2)
    with pytest.raises(DivergenceError):
        train_ensemble(c, bad, y, torch.optim.SGD(c.parameters(), lr=0.01), epochs=1, batch_size=16)
    with pytest.raises(ShapeError):
        train_ensemble(c, x, y[:3], torch.optim.SGD(c.parameters(), lr=0.01))
    with pytest.raises(ConfigError):
        train_ensemble(c, x, y, "lbfgs")
    with pytest.raises(ConfigError, match="ensemble.parameters"):  # built on other tensors
        train_ensemble(c, x, y, torch.optim.SGD(a.parameters(), lr=0.1))


def test_compiled_training_matches_eager():
    """compile="aot_eager" (dynamo + AOTAutograd; no C compiler needed): the same members as eager vmap, to
    float32 round-off; a backend that does not exist and a graph break under fullgraph are CompileErrors."""
    from symgen.errors import CompileError

    x, y = (t.float() if t.is_floating_point() else t for t in _data(16))

    def factory():
        return MaskedCNN(in_channels=1, num_classes=3, channels=3, support="symmetric")

    runs = []
    for compile in (False, "aot_eager"):
        ens = Ensemble.init(factory, 3, generator=0)
        opt = torch.optim.SGD(ens.parameters(), lr=0.1, momentum=0.9)
        hist = train_ensemble(ens, x, y, opt, epochs=2, batch_size=8, augment=ImageRotation90(), compile=compile)
        runs.append((ens, hist))
    (eager, h_eager), (compiled, h_compiled) = runs
    torch.testing.assert_close(h_compiled, h_eager, rtol=1e-5, atol=1e-6)
    for k, v in eager.params.items():
        torch.testing.assert_close(compiled.params[k], v, rtol=1e-5, atol=1e-6)
        assert not torch.equal(v, Ensemble.init(factory, 3, generator=0).params[k]) or "mask" in k

    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 3)

        def forward(self, z):
            torch._dynamo.graph_break()  # a no-op in eager mode
            return self.lin(z.flatten(1))

    ens = Ensemble.init(Breaks, 2)
    with pytest.raises(CompileError, match="not supported here.*compile=False"):
        train_ensemble(ens, x, y, torch.optim.SGD(ens.parameters(), lr=0.1), epochs=1, compile="aot_eager")
    with pytest.raises(CompileError, match="no_such_backend"):
        train_ensemble(ens, x, y, torch.optim.SGD(ens.parameters(), lr=0.1), epochs=1, compile="no_such_backend")
    with pytest.raises(ConfigError, match="compile must be"):
        train_ensemble(ens, x, y, torch.optim.SGD(ens.parameters(), lr=0.1), epochs=1, compile=3)
    train_ensemble(ens, x, y, torch.optim.SGD(ens.parameters(), lr=0.1), epochs=1)  # eager vmap still trains it


def test_member_generator_is_the_documented_mix():
    """Member streams: seed (s * 0x9E3779B1 + (m + 1) * 0x85EBCA77 + 0x5BD1E995) mod 2^62, independent of M."""
    for s, m in [(0, 0), (5, 3), (123456789, 17)]:
        expected = (s * 0x9E3779B1 + (m + 1) * 0x85EBCA77 + 0x5BD1E995) % (2**62)
        assert member_generator(s, m).initial_seed() == expected
    ens = Ensemble.init(_tiny_cnn, 2, generator=torch.Generator().manual_seed(4))  # a generator: one seed drawn
    assert ens.num_members == 2 and ens.parameters()[0] is ens.parameters()[0]


def test_sub_ensemble_metrics_against_enumeration():
    torch.manual_seed(0)
    outs = torch.randn(6, 4, dtype=DT)  # 6 members, scalar-vector outputs

    def metric(mean):
        return {"first": float(mean[0])}

    res = sub_ensemble_metrics(outs, [1, 6], metric, num_subsets=50, generator=torch.Generator().manual_seed(0))
    # size 6 without replacement: only one subset, the full pool mean
    assert res[6]["first"]["mean"] == pytest.approx(float(outs[:, 0].mean())) and res[6]["first"]["std"] == 0
    # size 1: capped at the 6 distinct subsets, every value is some member's
    assert res[1]["first"]["n"] == 6
    assert outs[:, 0].min() <= res[1]["first"]["min"] <= res[1]["first"]["max"] <= outs[:, 0].max()
    # bootstrap with replacement: the mean over many resamples approaches the pool mean
    boot = sub_ensemble_metrics(
        outs, [6], metric, num_subsets=4000, replace=True, generator=torch.Generator().manual_seed(1)
    )
    se = float(outs[:, 0].std(unbiased=False)) / math.sqrt(6)
    assert boot[6]["first"]["mean"] == pytest.approx(float(outs[:, 0].mean()), abs=4 * se / math.sqrt(4000) * 10)
    assert boot[6]["first"]["std"] == pytest.approx(se, rel=0.1)
    with pytest.raises(ConfigError):
        sub_ensemble_metrics(outs, [7], metric)


def test_ensemble_mean_at_init_concentrates_like_one_over_m():
    """At t = 0 the ensemble mean's deviation from invariance is Monte-Carlo noise: KL ~ 1/M.

    (With a zero-mean Gaussian head the expected logits are 0 for any support, so at init the
    ensemble mean tends to an invariant function whatever the filter support; training decides.)
    """
    act = ImageRotation90()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    ens = Ensemble.init(lambda: MaskedCNN(1, 4, channels=4, support="symmetric", dtype=DT), 512, generator=0)
    with torch.no_grad():
        orbit = torch.stack([ens.member_logits(act.apply(g, x)) for g in range(4)], 1)  # (M, G, N, K)
    member_kl = sum(invariance_metrics(orbit[m])["kl"] for m in range(64)) / 64
    ens_kl = invariance_metrics(orbit.mean(0))["kl"]
    assert ens_kl < member_kl / 50
    assert invariance_report(ens, act, x)["kl"] == pytest.approx(ens_kl, rel=1e-9)


def test_infinite_ensemble_deviation_against_pairs_and_loo_loop():
    torch.manual_seed(0)
    p, order, n, k = 7, 3, 4, 2
    logits = torch.randn(p, order, n, k, dtype=DT) + torch.randn(1, order, n, k, dtype=DT)  # shared bias
    d = logits - logits[:, :1]

    def u_stat(dd):  # mean over pairs i != j of <d_i, d_j>, averaged over (g, x)
        m = dd.shape[0]
        tot = sum(float((dd[i] * dd[j]).sum()) for i in range(m) for j in range(m) if i != j)
        return tot / (m * (m - 1)) / (order * n)

    res = infinite_ensemble_deviation(logits)
    assert res["estimate"] == pytest.approx(u_stat(d), rel=1e-10)
    loo = torch.tensor([u_stat(torch.cat([d[:i], d[i + 1 :]])) for i in range(p)], dtype=DT)
    se = float(((p - 1) / p * ((loo - loo.mean()) ** 2).sum()).sqrt())
    assert res["se"] == pytest.approx(se, rel=1e-10)
    # unbiased: for members = bias + iid noise, the estimate targets ||bias deviation||^2 (not + noise/M)
    bias = torch.randn(1, order, n, k, dtype=DT)
    target = float(((bias - bias[:, :1]) ** 2).sum()) / (order * n)
    ests = [infinite_ensemble_deviation(bias + torch.randn(20, order, n, k, dtype=DT))["estimate"] for _ in range(200)]
    assert sum(ests) / len(ests) == pytest.approx(target, abs=0.1)
    with pytest.raises(ShapeError):
        infinite_ensemble_deviation(torch.zeros(2, 3, 4, 5))


def test_ensemble_equivariance_experiment_smoke(tmp_path):
    from symgen.experiments import Context, build_config, get_experiment

    exp = get_experiment("ensemble-equivariance")
    cfg = build_config(
        exp.config,
        quick=exp.quick,
        members=4,
        epochs=1,
        train_size=64,
        test_size=16,
        num_subsets=2,
        num_bootstrap=3,
        channels=4,
        slope_min_size=1,
    )
    result = exp.run(cfg, Context())
    assert result["sizes"] == [1, 2, 4] and set(result["settings"]) == {
        "symmetric-augmented",
        "asymmetric-augmented",
        "symmetric-no-augmentation",
    }
    claims = exp.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C5.1", "C5.2", "C5.3"]
    for c in claims:
        assert (c.note == "") == c.passed  # a failing claim says why
        nums = [v for v in c.measured.values() if isinstance(v, (int, float))]
        assert nums and all(math.isfinite(v) for v in nums)
    sym = result["settings"]["symmetric-augmented"]["curve"]
    assert (
        claims[0].measured["kl_M4"] == sym["4"]["kl"]["mean"]
        and claims[0].measured["osp_M1"] == sym["1"]["osp"]["mean"]
    )
    paths = exp.figures(result, tmp_path)
    assert len(paths) == 2 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    from symgen.errors import ConfigError

    with pytest.raises(ConfigError):
        build_config(exp.config, sets=["settings=[bogus]"])
