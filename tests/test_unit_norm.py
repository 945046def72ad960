"""UnitNormSGD against the Riemannian formula written out per filter, and against torch.optim.SGD."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symgen.errors import ConfigError
from symgen.optim import UnitNormSGD
from symgen.symmetry import find_scale_symmetries


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


class LnNet(nn.Module):
    """A joint (LayerNorm) block with its bias, and a per-filter block with a bias through ReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.ln = nn.LayerNorm(6)
        self.c = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.o = nn.Linear(4, 3)

    def forward(self, x):
        return self.o(self.bn(F.relu(self.c(F.relu(self.ln(self.a(x)))))))


def _data(n=16, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_step_equals_riemannian_formula_per_filter():
    model = _bn_net()
    x, y = _data()
    opt = UnitNormSGD(model, lr=0.3, weight_decay=0.1, example_input=x)
    assert [s.symmetry.weight for s in opt.spheres] == ["0.weight"]
    w = model[0].weight.detach().clone()
    others = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _grads(model, x, y)
    opt.step()
    for c in range(w.shape[0]):  # the formula, one filter at a time
        wc, gc = w[c], g["0.weight"][c]
        assert abs(wc.norm().item() - 1) < 1e-12
        gr = gc - torch.dot(wc, gc) * wc
        new = wc - 0.3 * gr
        assert torch.allclose(model[0].weight[c], new / new.norm(), atol=1e-14)
    for n in ("1.weight", "1.bias", "3.weight", "3.bias"):  # plain SGD with weight decay
        ref = others[n] - 0.3 * (g[n] + 0.1 * others[n])
        assert torch.allclose(dict(model.named_parameters())[n], ref, atol=1e-14), n
    # the redundant bias gets zero gradient through BatchNorm, and plain SGD with decay
    assert g["0.bias"].abs().max() < 1e-12


def test_joint_block_and_scaled_bias_follow_formula_with_momentum():
    torch.manual_seed(1)
    model = LnNet().double()
    x, y = _data()
    opt = UnitNormSGD(model, lr=0.2, momentum=0.7, example_input=x)
    kinds = {s.symmetry.weight: (s.symmetry.kind, s.symmetry.bias) for s in opt.spheres}
    assert kinds == {"a.weight": ("joint", "a.bias"), "c.weight": ("per_filter", "c.bias")}
    buf_a = None
    for _ in range(3):
        # joint block: (a.weight, a.bias) flattened is one point on one sphere
        w = torch.cat([model.a.weight.detach().reshape(-1), model.a.bias.detach()])
        c_w = torch.cat([model.c.weight.detach(), model.c.bias.detach()[:, None]], 1)
        assert abs(w.norm().item() - 1) < 1e-12
        g_all = _grads(model, x, y)
        g = torch.cat([g_all["a.weight"].reshape(-1), g_all["a.bias"]])
        gr = g - torch.dot(w, g) * w
        buf_a = gr if buf_a is None else 0.7 * (buf_a - torch.dot(w, buf_a) * w) + gr
        new = w - 0.2 * buf_a
        expected = new / new.norm()
        opt.step()
        got = torch.cat([model.a.weight.detach().reshape(-1), model.a.bias.detach()])
        assert torch.allclose(got, expected, atol=1e-13)
        # per-filter block including its bias: each row (weight row, bias) on its own sphere
        assert torch.allclose(
            torch.cat([model.c.weight, model.c.bias[:, None]], 1).norm(dim=1),
            torch.ones(4, dtype=torch.float64),
            atol=1e-12,
        )
        assert c_w.shape == (4, 7)


def test_filters_stay_unit_norm_in_float32_training():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    x = torch.randn(16, 1, 6, 6)
    y = torch.randint(0, 3, (16,))
    opt = UnitNormSGD(model, lr=0.5, momentum=0.9, example_input=x)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        norms = model[0].weight.detach().reshape(4, -1).norm(dim=1)
        assert (norms - 1).abs().max() < 1e-6
    assert losses[-1] < 0.5 * losses[0]


def test_model_without_symmetries_warns_and_matches_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref = copy.deepcopy(model)
    x, y = _data()
    with pytest.warns(UserWarning, match="found no scale-invariant"):
        opt = UnitNormSGD(model, lr=0.1, momentum=0.9, weight_decay=0.01, example_input=x)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(5):
        for m, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-14)


def test_parameter_list_with_auto_warns_and_is_plain_sgd():
    model = _bn_net()
    ref = copy.deepcopy(model)
    x, y = _data()
    with pytest.warns(UserWarning, match="cannot detect"):
        opt = UnitNormSGD(model.parameters(), lr=0.1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for m, o in ((model, opt), (ref, sgd)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_explicit_filter_lists():
    model = _bn_net()
    x, _ = _data()
    with pytest.raises(ConfigError, match="'3.weight' is not scale-invariant"):
        UnitNormSGD(model, lr=0.1, filters=["3.weight"], example_input=x)
    with pytest.raises(ConfigError, match="no parameter named"):
        UnitNormSGD(model, lr=0.1, filters=["nope"], example_input=x)
    with pytest.raises(ConfigError, match="example_input"):
        UnitNormSGD(model, lr=0.1, filters=["0.weight"])
    opt = UnitNormSGD(model, lr=0.1, filters=["0.weight"], example_input=x)
    assert [s.symmetry.weight for s in opt.spheres] == ["0.weight"]
    report = find_scale_symmetries(model, x)
    assert len(UnitNormSGD(model, lr=0.1, filters=report).spheres) == 1
    assert len(UnitNormSGD(model, lr=0.1, filters=report.symmetries).spheres) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert UnitNormSGD(model, lr=0.1, filters=None).spheres == []


def test_bad_arguments():
    model = _bn_net()
    x, _ = _data()
    with pytest.raises(ConfigError, match="example_input"):
        UnitNormSGD(model, lr=0.1)
    with pytest.raises(ConfigError, match="lr must be a positive"):
        UnitNormSGD(model, lr=0.0, example_input=x)
    with pytest.raises(ConfigError, match="momentum"):
        UnitNormSGD(model, lr=0.1, momentum=1.0, example_input=x)
    with pytest.raises(ConfigError, match="filters must be"):
        UnitNormSGD(model, lr=0.1, filters="all", example_input=x)
    report = find_scale_symmetries(model, x)
    with torch.no_grad():
        model[0].weight[2].zero_()
    with pytest.raises(ConfigError, match="zero norm"):
        UnitNormSGD(model, lr=0.1, filters=report)
    # detection itself cannot confirm a symmetry whose normalized channel is constant: it says so
    with pytest.warns(UserWarning, match="constant group"):
        UnitNormSGD(model, lr=0.1, example_input=x)


def test_normalizing_at_start_keeps_train_and_eval_function():
    model = _bn_net()
    x, _ = _data()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model.train()
        for s in range(3):
            model(_data(seed=s + 5)[0])  # running statistics that hold estimates
    model.eval()
    ev = model(x).detach()
    tr = copy.deepcopy(model).train()(x).detach()  # a copy: train mode updates running statistics
    UnitNormSGD(model, lr=0.1, example_input=x)
    assert torch.allclose(model[0].weight.norm(dim=1), torch.ones(6, dtype=torch.float64))
    model.eval()
    # eps = 1e-5 makes the match approximate (relative order eps / variance)
    assert torch.allclose(model(x), ev, rtol=1e-4, atol=1e-5)
    model.train()
    assert torch.allclose(model(x), tr, rtol=1e-4, atol=1e-5)


def test_weight_decay_does_not_move_sphere_and_state_dict_roundtrip():
    x, y = _data()
    m1, m2 = _bn_net(), _bn_net()
    o1 = UnitNormSGD(m1, lr=0.2, momentum=0.5, weight_decay=0.0, example_input=x)
    o2 = UnitNormSGD(m2, lr=0.2, momentum=0.5, weight_decay=0.3, example_input=x)
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert torch.allclose(m1[0].weight, m2[0].weight, atol=1e-14)
    assert not torch.allclose(m1[3].weight, m2[3].weight)
    # a fresh optimizer loaded with o1's state continues exactly like o1
    m3 = copy.deepcopy(m1)
    o3 = UnitNormSGD(m3, lr=0.2, momentum=0.5, example_input=x)
    o3.load_state_dict(copy.deepcopy(o1.state_dict()))  # torch aliases same-dtype tensors
    for m, o in ((m1, o1), (m3, o3)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-14)


def test_frozen_filters_are_left_alone():
    model = _bn_net()
    x, _ = _data()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    before = model[0].weight.detach().clone()
    opt = UnitNormSGD(model, lr=0.1, example_input=x)
    assert opt.spheres == [] and torch.equal(model[0].weight, before)


def test_step_with_closure_equals_manual_backward_and_takes_a_generator():
    x, y = _data()
    m1, m2 = _bn_net(), _bn_net()
    o1 = UnitNormSGD(m1, lr=0.2, momentum=0.5, example_input=x, generator=3)
    o2 = UnitNormSGD(m2, lr=0.2, momentum=0.5, example_input=x, generator=torch.Generator().manual_seed(3))
    assert [s.symmetry.weight for s in o1.spheres] == [s.symmetry.weight for s in o2.spheres] == ["0.weight"]

    def closure():
        o2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        o1.zero_grad()
        ref = F.cross_entropy(m1(x), y)
        ref.backward()
        o1.step()
        with torch.no_grad():  # step(closure) re-enables grad for the closure, like torch.optim
            loss = o2.step(closure)
        assert torch.equal(loss, ref.detach())
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="generator"):
        UnitNormSGD(_bn_net(), lr=0.1, example_input=x, generator="3")
