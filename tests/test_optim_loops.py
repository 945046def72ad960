"""SAM/ASAM, NSO and UnitNormSGD in real training loops (issue 13, section 1), each against an independent
reference: the same steps without loss scaling or in float32, the full batch, the base optimizer, a closed
form. DDP: tests/test_ddp_optim.py."""

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from symgen.errors import ConfigError
from symgen.optim import NSO, SAM, LossClosure, UnitNormSGD


def _data(n=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _net(norm="bn", dtype=torch.float32):
    torch.manual_seed(2)
    layer = nn.BatchNorm1d(8) if norm == "bn" else nn.LayerNorm(8)
    return nn.Sequential(nn.Linear(5, 8), layer, nn.ReLU(), nn.Linear(8, 3)).to(dtype)


MAKERS = {
    "sam": lambda m, x: SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=m),
    "asam": lambda m, x: SAM(m.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9, model=m),
    "nso": lambda m, x: NSO(
        m.parameters(), torch.optim.SGD, sigma=0.02, num_samples=2, lr=0.1, momentum=0.9, model=m, generator=4
    ),
    "unit_norm": lambda m, x: UnitNormSGD(m, lr=0.1, momentum=0.9, example_input=x),
}


def _flat(model):
    return torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values() if t.is_floating_point()])


def _amp_run(name, x, y, steps=4, scaler=None, autocast=False, pattern="closure", model=None):
    model = _net() if model is None else model
    opt = MAKERS[name](model, x)
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = TF.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        if scaler is None:
            opt.step(closure)
        elif pattern == "closure":
            opt.step(closure, scaler=scaler)
            scaler.update()
        else:  # GradScaler's own pattern, for an optimizer that steps on the gradient in .grad
            closure()
            scaler.step(opt)
            scaler.update()
    return model, opt


# -------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", list(MAKERS))
def test_grad_scaler_steps_equal_unscaled_steps_and_bf16_autocast_stays_close(name):
    x, y = _data()
    ref, _ = _amp_run(name, x, y)
    # a power-of-two scale is exact: the scaled steps are the float32 steps to round-off
    scaled, _ = _amp_run(name, x, y, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**14))
    torch.testing.assert_close(_flat(scaled), _flat(ref), rtol=1e-5, atol=1e-6)
    if name == "unit_norm":
        via_scaler, _ = _amp_run(name, x, y, scaler=torch.amp.GradScaler("cpu"), pattern="scaler.step")
        torch.testing.assert_close(_flat(via_scaler), _flat(ref), rtol=1e-5, atol=1e-6)
    mixed, _ = _amp_run(name, x, y, scaler=torch.amp.GradScaler("cpu"), autocast=True)
    init = _flat(_amp_run(name, x, y, steps=0)[0])  # after construction (UnitNormSGD normalizes)
    moved = (_flat(ref) - init).norm()
    # bfloat16 keeps 8 bits: within 5% of the distance travelled in float32
    assert (_flat(mixed) - _flat(ref)).norm() <= 0.05 * moved + 1e-3 * _flat(ref).norm()


@pytest.mark.parametrize("name", list(MAKERS) + ["sgd"])
def test_inf_nan_step_is_skipped_like_grad_scaler_skips(name):
    """A batch with an inf input: parameters and optimizer state untouched, the scale backs off like plain SGD's."""
    x, y = _data()
    bad = x.clone()
    bad[0, 0] = float("inf")
    model = _net("ln")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if name == "sgd" else MAKERS[name](model, x)
    # one good step first, so there is momentum state to keep
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for batch in (x, bad):

        def closure(batch=batch):
            opt.zero_grad()
            loss = TF.cross_entropy(model(batch), y)
            scaler.scale(loss).backward()
            return loss

        before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])
        if name == "sgd":
            closure()
            scaler.step(opt)
        else:
            opt.step(closure, scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 512.0  # halved once, as for torch.optim.SGD
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    after = opt.state_dict()["state"]
    assert after.keys() == before[1].keys() and after  # momentum exists and was not touched
    for i in after:
        for k, v in after[i].items():
            assert torch.equal(v, before[1][i][k]) if isinstance(v, torch.Tensor) else v == before[1][i][k]


def test_scaler_misuse_gives_clear_errors():
    x, y = _data()
    model = _net()
    sam = MAKERS["sam"](model, x)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ConfigError, match="scaler.scale\\(loss\\).backward"):
        sam.step(LossClosure(model, TF.cross_entropy, x, y), scaler=scaler)
    scaler.scale(TF.cross_entropy(model(x), y)).backward()
    with pytest.raises(ConfigError, match="closure"):
        scaler.step(sam)
    with pytest.raises(ConfigError, match="GradScaler"):
        sam.step(LossClosure(model, TF.cross_entropy, x, y), scaler=object())


# -------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("name", list(MAKERS))
def test_accumulated_micro_batches_equal_the_full_batch(name):
    x, y = _data(30)
    results = []
    for micro in (None, [12, 12, 6]):
        model = _net("ln")
        opt = MAKERS[name](model, x)
        for _ in range(3):

            def closure(micro=micro, model=model, opt=opt):
                opt.zero_grad()
                if micro is None:
                    loss = TF.cross_entropy(model(x), y)
                    loss.backward()
                    return loss.detach()
                total, start = 0.0, 0
                for size in micro:  # each micro-batch weighted by its share of the batch
                    xb, yb = x[start : start + size], y[start : start + size]
                    part = TF.cross_entropy(model(xb), yb) * (size / x.shape[0])
                    part.backward()
                    total, start = total + part.detach(), start + size
                return total

            opt.step(closure)
        results.append(_flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=2e-5, atol=2e-6)


# ----------------------------------------------- base optimizer, schedulers, param groups, state


def _groups(model, **extra):
    return [
        {"params": model[0].parameters(), "weight_decay": 1e-2, **extra.get("first", {})},
        {"params": list(model[1].parameters()) + list(model[3].parameters()), "lr": 0.05, **extra.get("second", {})},
    ]


@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
        (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)),
    ],
)
@pytest.mark.parametrize("which", ["sam", "asam", "nso_vectorized", "nso_closure"])
def test_rho_and_sigma_zero_reproduce_the_base_optimizer_with_schedulers_and_groups(base, kw, which):
    x, y = _data(dtype=torch.float64)
    ref, mine = _net(dtype=torch.float64), _net(dtype=torch.float64)
    opt_ref = base(_groups(ref), **kw)
    if which.startswith("nso"):
        opt = NSO(_groups(mine), base, sigma=0.0, num_samples=3, model=mine, **kw)
    else:
        opt = SAM(_groups(mine), base, rho=0.0, adaptive=which == "asam", model=mine, **kw)
    lam = lambda step: 0.9**step  # noqa: E731
    sched_ref, sched = (torch.optim.lr_scheduler.LambdaLR(o, lam) for o in (opt_ref, opt))
    for i in range(5):
        xb, yb = x[6 * i : 6 * i + 12], y[6 * i : 6 * i + 12]
        opt_ref.zero_grad()
        TF.cross_entropy(ref(xb), yb).backward()
        opt_ref.step()
        if which == "nso_vectorized":
            opt.step(LossClosure(mine, TF.cross_entropy, xb, yb))
        else:

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = TF.cross_entropy(mine(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
        sched_ref.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt_ref.param_groups]
    for k, v in ref.state_dict().items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(mine.state_dict()[k], v), k


def test_sam_per_group_rho_follows_the_formula():
    """e_p = rho_group(p) g_p / ||g|| (the norm over all parameters), per group, checked by hand."""
    x, y = _data(dtype=torch.float64)
    model = _net("ln", torch.float64)
    opt = SAM(_groups(model, first={"rho": 0.3}, second={"rho": 0.0}), torch.optim.SGD, rho=0.1, lr=0.1)
    TF.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    norm = torch.cat([t.reshape(-1) for t in g]).norm()
    opt.first_step()
    rhos = [0.3, 0.3, 0.0, 0.0, 0.0, 0.0]
    for p, w0, g0, rho in zip(model.parameters(), w, g, rhos, strict=True):
        torch.testing.assert_close(p.detach(), w0 + rho * g0 / norm, rtol=1e-10, atol=1e-12)


class _TwoHeads(nn.Module):
    """Loss separable in the two layers: the gradient of one does not depend on the other's weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(5, 2).double(), nn.Linear(5, 2).double()

    def forward(self, x):
        return torch.cat([self.a(x), torch.tanh(self.b(x))], 1)


def test_nso_per_group_sigma_zero_gives_the_clean_gradient():
    x, _ = _data(dtype=torch.float64)
    t = torch.randn(x.shape[0], 4, dtype=torch.float64)
    model = _TwoHeads()
    ref = copy.deepcopy(model)
    TF.mse_loss(ref(x), t).backward()
    groups = [{"params": model.a.parameters(), "sigma": 0.0}, {"params": model.b.parameters(), "sigma": 0.5}]
    opt = NSO(groups, torch.optim.SGD, sigma=0.1, num_samples=1, antithetic=False, lr=0.1, generator=0)
    opt.estimate_gradient(LossClosure(model, TF.mse_loss, x, t))
    for p, q in zip(model.a.parameters(), ref.a.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)  # no noise on this group
    assert not torch.allclose(model.b.weight.grad, ref.b.weight.grad, rtol=1e-3)  # noise on that one


@pytest.mark.parametrize("name", ["sam", "nso", "unit_norm"])
def test_resume_with_scheduler_continues_bit_for_bit(name, tmp_path):
    x, y = _data(dtype=torch.float64)

    def build():
        model = _net(dtype=torch.float64)
        opt = MAKERS[name](model, x)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def steps(model, opt, sched, n):
        for _ in range(n):
            opt.step(LossClosure(model, TF.cross_entropy, x, y))
            sched.step()

    ref = build()
    steps(*ref, 6)
    first = build()
    steps(*first, 3)
    torch.save(
        {"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()},
        tmp_path / "ckpt.pt",
    )
    second = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    second[0].load_state_dict(ckpt["model"])
    second[1].load_state_dict(ckpt["opt"])
    second[2].load_state_dict(ckpt["sched"])
    steps(*second, 3)
    for k, v in ref[0].state_dict().items():
        assert torch.equal(second[0].state_dict()[k], v), k


# ----------------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_model_takes_the_same_steps(name):
    """torch.compile of the model (aot_eager: dynamo + AOTAutograd, no C compiler needed in the test)."""
    x, y = _data()
    results = []
    for compiled in (False, True):
        model = _net()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        opt = MAKERS[name](run, x)
        for _ in range(3):
            opt.step(LossClosure(run, TF.cross_entropy, x, y))
        results.append(_flat(model))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", list(MAKERS))
def test_zero_gradient_gives_a_finite_no_op_step(name):
    x, _ = _data()
    model = _net("ln")
    opt = MAKERS[name](model, x)
    before = _flat(model)

    def closure():
        opt.zero_grad()
        loss = 0.0 * model(x).sum()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert torch.isfinite(_flat(model)).all()
    torch.testing.assert_close(_flat(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 5e-3)])
def test_unit_norm_filters_stay_on_the_sphere_for_ten_thousand_steps(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).to(dtype)
    opt = UnitNormSGD(model, lr=0.05, momentum=0.9, filters=["0.weight"], example_input=torch.randn(8, 6, dtype=dtype))
    w = model[0].weight
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(10_000, *w.shape, generator=g).to(dtype)
    for i in range(10_000):
        w.grad = grads[i]
        model[0].bias.grad = None
        opt.step()
    norms = w.detach().double().norm(dim=1)
    assert torch.isfinite(w).all()
    assert (norms - 1).abs().max() <= tol


@pytest.mark.parametrize("path", ["vectorized", "closure"])
def test_nso_updates_batchnorm_statistics_once_per_step_from_the_clean_pass(path):
    """After an NSO step the running statistics are those of one train-mode pass at W, nothing else."""
    x, y = _data()
    model = _net("bn")
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        ref(x)
    opt = NSO(model.parameters(), torch.optim.SGD, sigma=0.3, num_samples=2, lr=0.1, model=model)
    if path == "vectorized":
        opt.step(LossClosure(model, TF.cross_entropy, x, y))
    else:

        def closure():
            opt.zero_grad()
            loss = TF.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    for k, v in ref.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(model.state_dict()[k], v), k
