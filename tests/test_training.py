"""symgen.training.fit and the one step protocol, against hand-written loops in plain PyTorch."""

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.functional import frozen_running_stats
from symgen.optim import NSO, SAM, LossClosure
from symgen.training import History, fit

D = torch.float64


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).to(D)


def _data(n: int = 50, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _accuracy(out, y):
    return float((out.argmax(1) == y).double().mean())


# ------------------------------------------------------------------------------------- fit itself


def test_fit_matches_hand_written_loop():
    x, y = _data()
    bs, epochs = 16, 3  # 50 samples: batches of 16, 16, 16 and 2
    ref = _bn_net().eval()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(5)
    ref.train()
    losses, accs = [], []
    for _ in range(epochs):
        perm = torch.randperm(50, generator=g)
        tot, acc = 0.0, 0.0
        for i in range(0, 50, bs):
            idx = perm[i : i + bs]
            opt.zero_grad()
            out = ref(x[idx])
            loss = TF.cross_entropy(out, y[idx])
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            acc += _accuracy(out, y[idx]) * len(idx)
        losses.append(tot / 50)
        accs.append(acc / 50)

    model = _bn_net().eval()
    seen = []
    hist = fit(
        model,
        (x, y),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
        epochs=epochs,
        batch_size=bs,
        generator=5,
        metrics={"accuracy": _accuracy},
        callback=lambda e, m: seen.append((e, m.training)) or {"tag": 10.0 * e},
    )
    assert _same(_state(model), _state(ref))  # weights and BatchNorm statistics, bit for bit
    assert not model.training and not model[1].training  # modes restored
    assert isinstance(hist, History) and len(hist) == epochs and hist.num_steps == 4 * epochs
    assert hist["epoch"] == [1, 2, 3] and hist["steps"] == [4, 4, 4] and hist["tag"] == [10.0, 20.0, 30.0]
    assert hist["loss"] == pytest.approx(losses, abs=1e-15) and hist["accuracy"] == pytest.approx(accs, abs=1e-15)
    assert seen == [(1, True), (2, True), (3, True)]


def test_fit_steps_with_drop_last_and_full_batch():
    x, y = _data()
    bs, steps = 16, 7  # 3 full batches per epoch (the 2 left over are dropped), reshuffled after each 3
    ref = _bn_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    perm, pos = torch.randperm(50, generator=g), 0
    for _ in range(steps):
        if pos + bs > 50:
            perm, pos = torch.randperm(50, generator=g), 0
        idx = perm[pos : pos + bs]
        pos += bs
        opt.zero_grad()
        TF.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    model = _bn_net()
    hist = fit(
        model,
        (x, y),
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps=steps,
        batch_size=bs,
        drop_last=True,
        generator=2,
    )
    assert _same(_state(model), _state(ref))
    assert hist.num_steps == 7 and hist["steps"] == [3, 3, 1]
    # full batch (batch_size=None): gradient descent on the data in order, no random draws
    ref = _bn_net()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        TF.cross_entropy(ref(x), y).backward()
        opt.step()
    model = _bn_net()
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    fit(model, (x, y), torch.optim.Adam(model.parameters(), lr=0.01), steps=5, batch_size=None, generator=gen)
    assert _same(_state(model), _state(ref)) and torch.equal(gen.get_state(), state)


def test_fit_dataloader_equals_tensors_in_the_same_order():
    x, y = _data()
    a, b = _bn_net(), _bn_net()
    fit(a, (x, y), torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.5), epochs=2, batch_size=8, generator=3)
    g = torch.Generator().manual_seed(3)

    # (shuffle=True would not do: the loader draws a base seed from its generator, and RandomSampler a
    # second, empty permutation per epoch)
    class Permutation(Sampler):  # torch.randperm(n, generator=g) once per epoch
        def __len__(self):
            return 50

        def __iter__(self):
            return iter(torch.randperm(50, generator=g).tolist())

    loader = DataLoader(TensorDataset(x, y), batch_size=8, sampler=Permutation())
    hist = fit(b, loader, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.5), epochs=2)
    assert _same(_state(a), _state(b)) and hist["steps"] == [7, 7]


def test_fit_transform_and_closure_factory():
    x, y = _data(20)
    a, b = _bn_net(), _bn_net()
    fit(a, (-x, y), torch.optim.SGD(a.parameters(), lr=0.1), epochs=2, batch_size=5, generator=0)
    fit(
        b,
        (x, y),
        torch.optim.SGD(b.parameters(), lr=0.1),
        epochs=2,
        batch_size=5,
        generator=0,
        transform=lambda model, xb, yb: (-xb, yb),
    )
    assert _same(_state(a), _state(b))

    class Doubled(LossClosure):  # another loss of the batch: 2 L
        vectorizable = False

        def compute(self):
            out = self.model(self.x)
            return 2.0 * self.loss_fn(out, self.y), out

    c, d = _bn_net(), _bn_net()
    fit(c, (x, y), torch.optim.SGD(c.parameters(), lr=0.2), batch_size=5, generator=0)
    hist = fit(d, (x, y), torch.optim.SGD(d.parameters(), lr=0.1), batch_size=5, generator=0, closure=Doubled)
    assert all(torch.allclose(p, q, atol=1e-14) for p, q in zip(c.parameters(), d.parameters(), strict=True))
    assert hist["loss"][0] > 0


def test_fit_divergence_names_epoch_and_step_and_skips_the_update():
    x, y = _data(32)
    x[20, 0] = float("nan")  # the second batch of 16 (in order) holds a NaN
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DivergenceError, match=r"epoch 1, step 2 \(1 steps done\).*non-finite loss.*learning rate"):
        fit(model, (x, y), opt, batch_size=16, shuffle=False)
    # the weights are those after step 1 exactly: the failing step took no update
    ref = _bn_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    TF.cross_entropy(ref(x[:16]), y[:16]).backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    # a wrapper optimizer's own error is named too
    bad = _bn_net()
    nso = NSO(bad.parameters(), torch.optim.SGD, sigma=1e200, lr=0.1)
    with pytest.raises(DivergenceError, match=r"epoch 1, step 1 .*NSO step 1: non-finite"):
        fit(bad, _data(8), nso, batch_size=None, loss_fn=lambda out, t: (out * 1e200).pow(2).mean())


def test_fit_bad_input():
    x, y = _data(10)
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="instance"):
        fit(model, (x, y), torch.optim.SGD)
    with pytest.raises(ConfigError, match="none of the model's parameters"):
        fit(model, (x, y), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="not both"):
        fit(model, (x, y), opt, epochs=1, steps=3)
    with pytest.raises(ConfigError, match="batch_size"):
        fit(model, (x, y), opt, batch_size=0)
    with pytest.raises(ConfigError, match="drop_last"):
        fit(model, (x, y), opt, batch_size=32, drop_last=True)
    with pytest.raises(ShapeError, match="same non-zero number"):
        fit(model, (x, y[:3]), opt)
    with pytest.raises(ShapeError, match="iterable"):
        fit(model, x, opt)
    with pytest.raises(ConfigError, match="no batch"):
        fit(model, [], opt, steps=2)


# ------------------------------------------------------------------------- SAM on the step protocol


def test_sam_closure_steps_equal_explicit_first_second_steps():
    """8 closure steps = 8 hand-written steps (gradient at W computed by the step, BN stats once, at W)."""
    x, y = _data(24)
    a, b = _bn_net(), _bn_net()
    kw = dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_a = SAM(a.parameters(), torch.optim.SGD, model=a, **kw)
    opt_b = SAM(b.parameters(), torch.optim.SGD, **kw)
    for i in range(8):
        xb, yb = x[3 * i : 3 * i + 12], y[3 * i : 3 * i + 12]
        for p in a.parameters():  # a stale gradient must not be used as the gradient at W
            p.grad = torch.full_like(p, 123.0)
        loss = opt_a.step(_closure(a, opt_a, xb, yb))
        opt_b.zero_grad()
        ref_loss = TF.cross_entropy(b(xb), yb)
        ref_loss.backward()
        opt_b.first_step(zero_grad=True)
        with frozen_running_stats(b):
            TF.cross_entropy(b(xb), yb).backward()
        opt_b.second_step(zero_grad=True)
        assert torch.equal(loss, ref_loss.detach())  # the loss at W
    assert _same(_state(a), _state(b))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_rho_zero_equals_sgd_including_batchnorm_statistics(adaptive):
    x, y = _data()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    sgd = _bn_net()
    fit(sgd, (x, y), torch.optim.SGD(sgd.parameters(), **kw), epochs=2, batch_size=16, generator=4)
    with_model, via_closure = _bn_net(), _bn_net()
    fit(
        with_model,
        (x, y),
        SAM(with_model.parameters(), torch.optim.SGD, rho=0.0, adaptive=adaptive, model=with_model, **kw),
        epochs=2,
        batch_size=16,
        generator=4,
    )
    # without model=, SAM finds the model in the LossClosure that fit passes
    fit(
        via_closure,
        (x, y),
        SAM(via_closure.parameters(), torch.optim.SGD, rho=0.0, adaptive=adaptive, **kw),
        epochs=2,
        batch_size=16,
        generator=4,
    )
    assert _same(_state(with_model), _state(sgd)) and _same(_state(via_closure), _state(sgd))
    assert int(sgd[1].num_batches_tracked) == 8  # one update of the statistics per step


# ------------------------------------------------------------------------- NSO's vectorized path


@pytest.mark.parametrize("lam,antithetic,relative", [(0.0, True, False), (0.4, False, True)])
def test_nso_loss_closure_fast_path_equals_sequential_closure_path(lam, antithetic, relative):
    x, y = _data(24)
    models = []
    for path in ("fast", "sequential"):
        model = _bn_net()
        opt = NSO(
            model.parameters(),
            torch.optim.SGD,
            sigma=0.05,
            num_samples=3,
            antithetic=antithetic,
            clean_weight=lam,
            relative=relative,
            model=model,
            generator=11,
            lr=0.1,
            momentum=0.9,
        )
        for i in range(3):
            closure = LossClosure(model, TF.cross_entropy, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
            # a plain function is not recognized: NSO calls it 1 + 2k times
            loss = opt.step(closure if path == "fast" else (lambda c=closure: c()))
            assert math.isfinite(float(loss))
        models.append(model)
    fast, seq = models
    for (n, p), q in zip(fast.state_dict().items(), seq.state_dict().values(), strict=True):
        assert torch.allclose(p.to(D), q.to(D), atol=1e-12, rtol=0), n
    # fit passes a LossClosure: the same steps as stepping by hand
    model = _bn_net()
    opt = NSO(
        model.parameters(),
        torch.optim.SGD,
        sigma=0.05,
        num_samples=3,
        antithetic=antithetic,
        clean_weight=lam,
        relative=relative,
        generator=11,
        lr=0.1,
        momentum=0.9,
    )
    fit(model, (x, y), opt, batch_size=8, shuffle=False)
    assert _same(_state(model), _state(fast))


def test_fit_with_unit_norm_sgd_matches_hand_written_loop():
    from symgen.models import build_model
    from symgen.optim import UnitNormSGD

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g, dtype=D), torch.randint(0, 10, (40,), generator=g)
    models = []
    for how in ("fit", "loop"):
        torch.manual_seed(0)
        model = build_model("cnn", (1, 8, 8), channels=3).to(D)
        opt = UnitNormSGD(model, lr=0.1, momentum=0.9, example_input=x[:16])
        if how == "fit":
            fit(model, (x, y), opt, epochs=2, batch_size=16, drop_last=True, generator=1)
        else:
            gen = torch.Generator().manual_seed(1)
            model.train()
            for _ in range(2):
                perm = torch.randperm(40, generator=gen)
                for i in range(0, 40 - 16 + 1, 16):
                    opt.zero_grad()
                    TF.cross_entropy(model(x[perm[i : i + 16]]), y[perm[i : i + 16]]).backward()
                    opt.step()
        models.append(model)
    assert _same(_state(models[0]), _state(models[1]))
