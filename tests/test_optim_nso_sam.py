"""NSO and SAM/ASAM against closed forms and hand-written brute-force steps."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call

from symgen.errors import ConfigError, DivergenceError
from symgen.functional import frozen_running_stats
from symgen.optim import NSO, SAM, LossClosure

D = torch.float64


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).to(D)


def _batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _brute_force_nso(model, x, y, sigma, k, seed, lam=0.0, antithetic=True, relative=False):
    """The NSO gradient written out: noise drawn in parameter order, k at a time; BN: clean pass
    in train mode updates the statistics, perturbed passes use batch statistics, no update."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    mom = 0.1
    xm, xv = None, None
    # clean-pass statistics: running = (1 - m) running + m batch (unbiased variance)
    h = x @ w0["0.weight"].T + w0["0.bias"]
    xm, xv = h.mean(0), h.var(0, unbiased=True)
    new_bufs = dict(bufs)
    new_bufs["1.running_mean"] = (1 - mom) * bufs["1.running_mean"] + mom * xm
    new_bufs["1.running_var"] = (1 - mom) * bufs["1.running_var"] + mom * xv
    new_bufs["1.num_batches_tracked"] = bufs["1.num_batches_tracked"] + 1
    noise = {}
    for n in names:
        std = sigma * w0[n].norm() / math.sqrt(w0[n].numel()) if relative else sigma
        noise[n] = torch.randn((k,) + w0[n].shape, generator=g, dtype=D) * std

    def grad_at(p):
        p = {n: v.clone().requires_grad_(True) for n, v in p.items()}
        out = functional_call(model, (p, {n: b.clone() for n, b in new_bufs.items()}), (x,))
        loss = TF.cross_entropy(out, y)
        return torch.autograd.grad(loss, [p[n] for n in names])

    total = [torch.zeros_like(w0[n]) for n in names]
    signs = (1.0, -1.0) if antithetic else (1.0,)
    for i in range(k):
        for s in signs:
            gr = grad_at({n: w0[n] + s * noise[n][i] for n in names})
            for t, gi in zip(total, gr, strict=True):
                t += (1 - lam) / (k * len(signs)) * gi
    if lam > 0:
        for t, gi in zip(total, grad_at(w0), strict=True):
            t += lam * gi
    return total, new_bufs


@pytest.mark.parametrize("lam,antithetic,relative", [(0.0, True, False), (0.3, False, True)])
def test_nso_closure_and_vectorized_match_brute_force(lam, antithetic, relative):
    x, y = _batch()
    ref_model = _bn_net().train()
    expected, expected_bufs = _brute_force_nso(
        ref_model, x, y, 0.2, 3, seed=7, lam=lam, antithetic=antithetic, relative=relative
    )
    for path in ("closure", "vectorized"):
        model = _bn_net().train()
        opt = NSO(
            model.parameters(),
            torch.optim.SGD,
            sigma=0.2,
            num_samples=3,
            antithetic=antithetic,
            clean_weight=lam,
            relative=relative,
            model=model,
            generator=torch.Generator().manual_seed(7),
            lr=0.1,
        )
        if path == "closure":
            loss = opt.estimate_gradient(_closure(model, opt, x, y))
        else:
            loss = opt.estimate_gradient(LossClosure(model, TF.cross_entropy, x, y))
        assert torch.isfinite(loss)
        for p, e in zip(model.parameters(), expected, strict=True):
            assert torch.allclose(p.grad, e, atol=1e-12), path
        for n, b in model.named_buffers():  # one clean pass of statistics, perturbed passes frozen
            assert torch.allclose(b.to(D), expected_bufs[n].to(D), atol=1e-14), (path, n)
        # parameters back at W; the step is the base optimizer's step with this gradient
        w_before = [p.detach().clone() for p in model.parameters()]
        assert all(torch.equal(p, w) for p, w in zip(_bn_net().parameters(), w_before, strict=True))
        opt.base_optimizer.step()
        for p, w, e in zip(model.parameters(), w_before, expected, strict=True):
            assert torch.allclose(p, w - 0.1 * e, atol=1e-12)


def test_nso_step_paths_agree_and_are_reproducible():
    x, y = _batch()
    finals = []
    for path in ("closure", "vectorized", "closure"):
        model = _bn_net().train()
        opt = NSO(
            model.parameters(),
            torch.optim.SGD,
            sigma=0.05,
            num_samples=2,
            model=model,
            generator=torch.Generator().manual_seed(3),
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-3,
        )
        for _ in range(3):
            if path == "closure":
                opt.step(_closure(model, opt, x, y))
            else:
                opt.step(LossClosure(model, TF.cross_entropy, x, y))
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert opt.num_steps == 3 and opt.passes_per_step == 5
        assert "momentum_buffer" in opt.base_optimizer.state[next(model.parameters())]
    assert torch.allclose(finals[0], finals[1], atol=1e-12)
    assert torch.equal(finals[0], finals[2])


def _quartic_setup(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, d, generator=g, dtype=D)
    A, c = (B + B.T) / 2, torch.randn(d, generator=g, dtype=D)
    a, w0 = torch.rand(d, generator=g, dtype=D) + 0.5, torch.randn(d, generator=g, dtype=D)
    return A, c, a, w0


def _nso_gradients(loss, w0, sigma, draws, antithetic, k, seed):
    point = nn.Module()
    point.w = nn.Parameter(w0.clone())
    opt = NSO(
        point.parameters(),
        torch.optim.SGD,
        sigma=sigma,
        num_samples=k,
        antithetic=antithetic,
        lr=0.0,
        generator=torch.Generator().manual_seed(seed),
    )

    def closure():
        opt.zero_grad()
        out = loss(point.w)
        out.backward()
        return out

    out = []
    for _ in range(draws):
        opt.estimate_gradient(closure)
        out.append(point.w.grad.clone())
    return torch.stack(out)


def test_nso_gradient_unbiased_for_closed_form_F_and_antithetic_variance_lower():
    A, c, a, w0 = _quartic_setup()
    sigma, draws = 0.4, 800
    # quadratic: F = L + sigma^2/2 tr A, grad F = A (w - c); the antithetic pair is exact
    quad = lambda w: 0.5 * (w - c) @ A @ (w - c)  # noqa: E731
    anti = _nso_gradients(quad, w0, sigma, draws, True, 1, 1)
    assert torch.allclose(anti, (A @ (w0 - c)).expand_as(anti), atol=1e-12)
    one = _nso_gradients(quad, w0, sigma, draws, False, 2, 2)
    se = one.std(0) / math.sqrt(draws)
    assert ((one.mean(0) - A @ (w0 - c)).abs() < 4.5 * se).all()
    assert float(one.var(0).sum()) > 0
    # quartic: E (w+u)^4 = w^4 + 6 w^2 s^2 + 3 s^4, so grad F = a (w^3 + 3 s^2 w) + A (w - c) != grad L
    quart = lambda w: (a * w**4).sum() / 4 + quad(w)  # noqa: E731
    grad_f = a * (w0**3 + 3 * sigma**2 * w0) + A @ (w0 - c)
    grad_l = a * w0**3 + A @ (w0 - c)
    anti = _nso_gradients(quart, w0, sigma, draws, True, 1, 3)  # 2 gradient evaluations per estimate
    one = _nso_gradients(quart, w0, sigma, draws, False, 2, 4)  # 2 gradient evaluations per estimate
    se = anti.std(0) / math.sqrt(draws)
    assert ((anti.mean(0) - grad_f).abs() < 4.5 * se).all()
    assert ((anti.mean(0) - grad_l).abs() > 6 * se).any()  # the test can tell grad F from grad L
    assert float(anti.var(0).sum()) < float(one.var(0).sum())


def test_nso_relative_sigma_scales_with_weight_norm():
    lin = nn.Linear(200, 30, bias=False).to(D)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    opt = NSO(
        lin.parameters(),
        torch.optim.SGD,
        sigma=0.1,
        num_samples=1,
        antithetic=False,
        relative=True,
        lr=0.0,
        generator=torch.Generator().manual_seed(0),
    )

    def closure():  # grad of ||W||^2/2 at W + U is W + U
        opt.zero_grad()
        out = 0.5 * (lin.weight**2).sum()
        out.backward()
        return out

    opt.estimate_gradient(closure)
    u = lin.weight.grad - lin.weight.detach()
    expected_std = 0.1 * float(lin.weight.detach().norm()) / math.sqrt(lin.weight.numel())
    assert abs(float(u.std()) / expected_std - 1) < 0.05


def test_nso_non_finite_raises_naming_step_and_leaves_state():
    x, y = _batch()
    model = _bn_net().train()
    opt = NSO(
        model.parameters(),
        torch.optim.SGD,
        sigma=0.1,
        num_samples=2,
        model=model,
        lr=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    opt.step(_closure(model, opt, x, y))
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    calls = {"n": 0}

    def bad_closure():  # finite at W, NaN at the third (perturbed) pass
        calls["n"] += 1
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        if calls["n"] == 3:
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.raises(DivergenceError, match=r"NSO step 2: non-finite loss .* W - U_1"):
        opt.step(bad_closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), bufs, strict=True))
    # vectorized path: huge noise overflows only the perturbed copies
    lin = nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt2 = NSO(lin.parameters(), torch.optim.SGD, sigma=1e3, num_samples=1, model=lin, lr=0.1)
    w2 = [p.detach().clone() for p in lin.parameters()]
    with pytest.raises(DivergenceError, match="NSO step 1: non-finite"):
        opt2.step(LossClosure(lin, lambda out, t: torch.exp(out * 1e3).mean(), torch.ones(3, 4), torch.zeros(3)))
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w2, strict=True))
    with pytest.raises(DivergenceError, match="clean weights"):
        opt2.step(LossClosure(lin, TF.mse_loss, torch.full((3, 4), float("inf")), torch.zeros(3, 1)))


def test_nso_config_errors():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match="sigma"):
        NSO(p, torch.optim.SGD, sigma=-0.1, lr=0.1)
    with pytest.raises(ConfigError, match="num_samples"):
        NSO(p, torch.optim.SGD, num_samples=0, lr=0.1)
    with pytest.raises(ConfigError, match="clean_weight"):
        NSO(p, torch.optim.SGD, clean_weight=1.5, lr=0.1)
    with pytest.raises(ConfigError, match="optimizer class"):
        NSO(p, torch.optim.SGD(p, lr=0.1), lr=0.1)
    with pytest.raises(ConfigError, match="closure"):
        NSO(p, torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ConfigError, match="model"):
        NSO(p, torch.optim.SGD, lr=0.1).step(
            LossClosure(nn.Linear(3, 3), TF.mse_loss, torch.zeros(2, 3), torch.zeros(2, 3))
        )


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_formula(adaptive):
    x, y = _batch()
    model = _bn_net().eval()
    rho = 0.5 if adaptive else 0.05
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    # by hand: g at W, e = rho g/||g|| (ASAM: rho w^2 g/||w g||), step with grad at W + e
    w = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def grads_at(ws):
        ps = [v.clone().requires_grad_(True) for v in ws]
        loss = TF.cross_entropy(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)
        return torch.autograd.grad(loss, ps)

    g = grads_at(w)
    if adaptive:
        norm = torch.sqrt(sum(((wi * gi) ** 2).sum() for wi, gi in zip(w, g, strict=True)))
        e = [rho * wi**2 * gi / norm for wi, gi in zip(w, g, strict=True)]
    else:
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        e = [rho * gi / norm for gi in g]
    g_pert = grads_at([wi + ei for wi, ei in zip(w, e, strict=True)])
    loss = opt.step(_closure(model, opt, x, y))  # no gradients yet: step computes the one at W first
    assert loss is not None and torch.isfinite(loss)
    for p, wi, gi in zip(model.parameters(), w, g_pert, strict=True):
        assert torch.allclose(p, wi - 0.1 * gi, atol=1e-12)
    # davda54 usage: first_step / second_step by hand gives the same
    model2 = _bn_net().eval()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    TF.cross_entropy(model2(x), y).backward()
    opt2.first_step(zero_grad=True)
    for p, wi, ei in zip(model2.parameters(), w, e, strict=True):
        assert torch.allclose(p, wi + ei, atol=1e-12)
    TF.cross_entropy(model2(x), y).backward()
    opt2.second_step(zero_grad=True)
    assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(model.parameters(), model2.parameters(), strict=True))


def test_sam_kwargs_state_and_frozen_running_stats():
    model = _bn_net().train()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9, weight_decay=1e-4)
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["momentum"] == 0.9
    assert opt.base_optimizer.param_groups is opt.param_groups
    x, y = _batch()
    stats = model[1].running_mean.clone()
    with frozen_running_stats(model):
        model(x)
    assert torch.equal(model[1].running_mean, stats)
    assert model[1].momentum == 0.1
    model(x)
    assert not torch.equal(model[1].running_mean, stats)
    opt.step(_closure(model, opt, x, y))
    sd = opt.state_dict()
    opt3 = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)
    opt3.load_state_dict(sd)
    assert opt3.base_optimizer.param_groups is opt3.param_groups


def test_sam_errors():
    model = _bn_net().eval()
    x, y = _batch()
    with pytest.raises(ConfigError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-1, lr=0.1)
    with pytest.raises(ConfigError, match="optimizer class"):
        SAM(model.parameters(), "sgd", lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(ConfigError, match="closure"):
        opt.step()
    with pytest.raises(ConfigError, match="no parameter has a gradient"):
        opt.first_step()
    w = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def bad():
        calls["n"] += 1
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y) * (float("nan") if calls["n"] == 2 else 1.0)
        loss.backward()
        return loss

    with pytest.raises(DivergenceError, match="SAM step 1: non-finite loss .* perturbed"):
        opt.step(bad)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


def test_sam_ascent_errors():
    """ascent='local' (m-sharpness) needs a DistributedDataParallel model; a bad value names the choices."""
    model = _bn_net().eval()
    x, y = _batch()
    with pytest.raises(ConfigError, match="ascent must be one of .*'global', 'local'.*got 'sharp'"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, ascent="sharp")
    with pytest.raises(ConfigError, match="DistributedDataParallel: pass model=ddp_model.*got model=Sequential"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, ascent="local")
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, ascent="local")
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="ascent='global'; got no model"):
        opt.step(_closure(model, opt, x, y))
    with pytest.raises(ConfigError, match="got model=Sequential"):
        opt.step(LossClosure(model, TF.cross_entropy, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))


def test_nso_without_generator_is_seed_zero():
    """generator=None means seed 0 (not the global RNG): two runs agree, and equal generator=0."""
    x, y = _batch()
    finals = []
    for gen in (None, None, 0):
        model = _bn_net().train()
        torch.manual_seed(len(finals))  # the global RNG must not matter
        opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.1, num_samples=2, generator=gen, lr=0.1)
        opt.step(LossClosure(model, TF.cross_entropy, x, y))
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[0], finals[2])


def test_nso_closure_that_raises_leaves_parameters_and_statistics():
    x, y = _batch()
    model = _bn_net().train()
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.1, num_samples=2, model=model, lr=0.1)
    w = [p.detach().clone() for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    calls = {"n": 0}

    def failing():  # the clean pass updates the statistics, the second pass (at W + U_1) fails
        calls["n"] += 1
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        if calls["n"] == 2:
            raise RuntimeError("data loader broke")
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step(failing)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), bufs, strict=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
        lambda ps: NSO(ps, torch.optim.Adam, sigma=0.01, num_samples=2, generator=3, lr=0.01),
    ],
)
def test_state_dict_round_trip_resumes_exactly(make):
    """3 steps, save, rebuild, load, 3 more steps == 6 uninterrupted steps (momentum / Adam moments included)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def closure_for(m, opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        return closure

    ref = net()
    opt = make(ref.parameters())
    for _ in range(6):
        opt.step(closure_for(ref, opt))
    a = net()
    opt_a = make(a.parameters())
    for _ in range(3):
        opt_a.step(closure_for(a, opt_a))
    saved, weights = opt_a.state_dict(), {k: v.clone() for k, v in a.state_dict().items()}
    assert saved["state"], "the base optimizer's state (momentum / moments) must be in state_dict()"
    b = net()
    b.load_state_dict(weights)
    opt_b = make(b.parameters())
    opt_b.load_state_dict(saved)
    for _ in range(3):
        opt_b.step(closure_for(b, opt_b))
    for p, q in zip(ref.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
