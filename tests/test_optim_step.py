"""The one step skeleton of symgen.optim (WrapperOptimizer): a new flat-minima optimizer in ~30 lines (RWP,
against a hand-written loop), divergence handled the same way by every optimizer (against clones saved before
the step), BatchNorm statistics with and without ``model=`` (against plain SGD)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call

from symgen.errors import DivergenceError
from symgen.optim import NSO, OGD, SAM, LossClosure, StepContext, UnitNormSGD, WrapperOptimizer

D = torch.float64


# ------------------------------------------------------------ a user's optimizer on the skeleton (RWP)


class RWP(WrapperOptimizer):
    """Random weight perturbation: the base optimizer steps with grad L(W + U), U ~ N(0, sigma^2 I)."""

    divergence_hint = "lower the learning rate or sigma"

    def __init__(self, params, base_optimizer=torch.optim.SGD, sigma=0.01, model=None, seed=0, **kwargs):
        super().__init__(params, base_optimizer, {"sigma": sigma}, model=model, **kwargs)
        self.generator = torch.Generator().manual_seed(seed)

    def estimate(self, closure, ctx: StepContext):
        loss = ctx.clean(closure)  # the loss at W (BatchNorm statistics are updated by this pass only)
        noise = [
            g["sigma"] * torch.randn(p.shape, generator=self.generator, dtype=p.dtype)
            for g in self.param_groups
            for p in g["params"]
        ]
        ctx.move(noise)  # W + U; the step puts the weights back at W before the base optimizer steps
        ctx.perturbed(closure, "at W + U")
        return loss


def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).to(D)


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def test_rwp_in_thirty_lines_equals_a_hand_written_loop():
    x, y = _batch()
    sigma, lr, mom = 0.1, 0.2, 0.9
    model = _bn_mlp().train()
    opt = RWP(model.parameters(), torch.optim.SGD, sigma=sigma, model=model, seed=5, lr=lr, momentum=mom)
    ref = _bn_mlp().train()
    names = [n for n, _ in ref.named_parameters()]
    gen = torch.Generator().manual_seed(5)
    bufs = {}
    for step in range(3):

        def closure():
            opt.zero_grad()
            loss = TF.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        # by hand: a train-mode pass at W updates the running statistics and gives the loss; the gradient
        # at W + U with batch statistics and the statistics left alone (a copy of the buffers); SGD + momentum
        ref_loss = TF.cross_entropy(ref(x), y).detach()
        w = {n: p.detach().clone() for n, p in ref.named_parameters()}
        u = {n: sigma * torch.randn(w[n].shape, generator=gen, dtype=D) for n in names}
        pert = {n: (w[n] + u[n]).requires_grad_(True) for n in names}
        scratch = {n: b.clone() for n, b in ref.named_buffers()}
        grads = torch.autograd.grad(
            TF.cross_entropy(functional_call(ref, (pert, scratch), (x,)), y), list(pert.values())
        )
        with torch.no_grad():
            for (n, p), g in zip(ref.named_parameters(), grads, strict=True):
                bufs[n] = g.clone() if step == 0 else mom * bufs[n] + g
                p.sub_(lr * bufs[n])
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-14)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-13, msg=k)
    assert opt.num_steps == 3
    assert not torch.equal(model[0].weight, _bn_mlp()[0].weight)


def test_rwp_gets_divergence_handling_for_free():
    x, y = _batch()
    model = _bn_mlp().train()
    opt = RWP(model.parameters(), sigma=1e300, model=model, lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DivergenceError, match=r"RWP step 1: non-finite .* at W \+ U.*lower the learning rate or sigma"):
        opt.step(LossClosure(model, lambda out, t: out.pow(2).mean(), x, y))  # (1e300)^2 overflows
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- divergence, one way


def _cnn():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _images():
    g = torch.Generator().manual_seed(4)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


MAKERS = {
    "sam": lambda m, x: SAM(m.parameters(), rho=0.05, lr=1e6, momentum=0.9, model=m),
    "sam_closure_model": lambda m, x: SAM(m.parameters(), rho=0.05, lr=1e6, momentum=0.9, model=m),
    "nso": lambda m, x: NSO(m.parameters(), sigma=0.01, num_samples=2, lr=1e6, momentum=0.9, generator=0),
    "nso_closure": lambda m, x: NSO(m.parameters(), sigma=0.01, num_samples=2, lr=1e6, momentum=0.9, model=m),
    "ogd": lambda m, x: OGD(m.parameters(), lr=1e6, momentum=0.9),
    "unit_norm": lambda m, x: UnitNormSGD(m, lr=1e6, momentum=0.9, example_input=x),
}


def _state(opt):
    return {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_huge_learning_rate_raises_divergence_and_leaves_everything_as_before_the_step(name):
    x, y = _images()
    model = _cnn().train()
    opt = MAKERS[name](model, x)
    for step in range(1, 51):
        if name.endswith("closure") or name == "sam_closure_model":

            def closure():
                opt.zero_grad()
                loss = TF.cross_entropy(model(x), y)
                loss.backward()
                return loss

        else:
            closure = LossClosure(model, TF.cross_entropy, x, y)
        params = [p.detach().clone() for p in model.parameters()]
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        state = _state(opt)
        try:
            loss = opt.step(closure)
        except DivergenceError as e:
            message, failed_at = str(e), step
            break
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p).all() for p in model.parameters()), "ran on with non-finite weights"
        assert all(torch.isfinite(b.float()).all() for b in model.buffers()), "ran on with non-finite buffers"
    else:
        pytest.fail(f"{name} ran 50 steps at lr=1e6 without a DivergenceError")
    assert f"step {failed_at}" in message and "non-finite" in message and "lower the learning rate" in message
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    after = _state(opt)
    assert after.keys() == state.keys()
    for i, s in state.items():
        for k, v in s.items():
            assert torch.equal(after[i][k], v) if torch.is_tensor(v) else after[i][k] == v
    assert all(p.grad is None for p in model.parameters()) or name == "unit_norm"


def test_non_finite_gradient_names_it_and_a_later_good_step_still_works():
    x, y = _images()
    model = _cnn().train()
    opt = OGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # outside the step: this pass's BatchNorm update is the user's
    model[4].weight.grad[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DivergenceError, match="OGD step 1: non-finite gradient"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt.step(LossClosure(model, TF.cross_entropy, x, y))
    assert opt.num_steps == 1


# ---------------------------------------------------------------------------- BatchNorm statistics


def _sgd_reference(steps, x, y, lr=0.1):
    model = _bn_mlp().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _sam_run(steps, x, y, model_arg, closure_kind="plain", rho=0.0):
    model = _bn_mlp().train()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, model=model if model_arg else None)
    for _ in range(steps):
        if closure_kind == "loss_closure":
            opt.step(LossClosure(model, TF.cross_entropy, x, y))
        else:

            def closure():
                opt.zero_grad()
                loss = TF.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return model


def _stats(model):
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_sam_rho_zero_batchnorm_statistics_equal_sgd_with_model_and_warn_once_without():
    x, y = _batch()
    ref = _stats(_sgd_reference(3, x, y))
    for model_arg, kind in [(True, "plain"), (False, "loss_closure")]:  # the model is known: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _stats(_sam_run(3, x, y, model_arg, kind))
        for k, v in ref.items():
            assert torch.equal(got[k], v), (model_arg, kind, k)
    with pytest.warns(UserWarning, match="pass model=|Pass model=") as record:
        got = _stats(_sam_run(3, x, y, model_arg=False))
    assert len([w for w in record if "model=" in str(w.message)]) == 1  # once, not once per step
    assert record[0].filename == __file__  # points at the user's code
    # what the warning is about: the pass at W + e updated the statistics too
    assert not torch.equal(got["1.running_mean"], ref["1.running_mean"])


def test_no_warning_without_batchnorm_or_in_eval_mode():
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin = nn.Sequential(nn.Linear(5, 3)).to(D)
        opt = NSO(lin.parameters(), sigma=0.1, lr=0.1)

        def closure():
            opt.zero_grad()
            loss = TF.cross_entropy(lin(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        model = _bn_mlp().eval()
        sam = SAM(model.parameters(), rho=0.05, lr=0.1)

        def closure2():
            sam.zero_grad()
            loss = TF.cross_entropy(model(x), y)
            loss.backward()
            return loss

        sam.step(closure2)
