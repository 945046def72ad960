"""Invariance / equivariance metrics, checked against explicit loops over group elements and samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symgen.errors import GroupActionError, ShapeError
from symgen.groups import CyclicShift, ImageDihedral, ImageRotation90, Reflection, TrivialAction
from symgen.metrics import equivariance_error, invariance_metrics, invariance_report, orbit_outputs

DT = torch.float64


class CountingFn:
    def __init__(self, fn):
        self.fn, self.calls, self.sizes = fn, 0, []

    def __call__(self, x):
        self.calls += 1
        self.sizes.append(x.shape[0])
        return self.fn(x)


def _loop_metrics(fn, action, x):
    """Brute force: each sample, each group element, scalar formulas."""
    order, n = action.group.order, x.shape[0]
    osp, kls, devs, norms = 0.0, [], 0.0, 0.0
    for b in range(n):
        f0 = fn(x[b : b + 1])[0]
        p0 = [math.exp(v) for v in f0.tolist()]
        z0 = sum(p0)
        p0 = [v / z0 for v in p0]
        norms += float((f0**2).sum())
        for g in range(order):
            fg = fn(action.apply(g, x[b : b + 1]))[0]
            pg = [math.exp(v) for v in fg.tolist()]
            zg = sum(pg)
            pg = [v / zg for v in pg]
            kl1 = sum(a * math.log(a / c) for a, c in zip(p0, pg, strict=True))
            kl2 = sum(c * math.log(c / a) for a, c in zip(p0, pg, strict=True))
            kls.append(0.5 * (kl1 + kl2))
            osp += float(int(fg.argmax()) == int(f0.argmax()))
            devs += float(((fg - f0) ** 2).sum())
    return {
        "osp": osp / n,
        "kl": sum(kls) / len(kls),
        "kl_max": max(kls),
        "logit_deviation": math.sqrt(devs) / (math.sqrt(norms) * math.sqrt(order)),
    }


@pytest.mark.parametrize(
    "action,shape", [(ImageRotation90(), (1, 4, 4)), (ImageDihedral(), (1, 3, 3)), (CyclicShift(5), (5,))]
)
def test_invariance_report_matches_loop_and_one_pass(action, shape):
    torch.manual_seed(1)
    d = math.prod(shape)
    lin = nn.Linear(d, 6).to(DT)
    fn = CountingFn(lambda z: lin(z.reshape(z.shape[0], -1)))
    x = torch.randn(7, *shape, dtype=DT)
    rep = invariance_report(fn, action, x)
    assert fn.calls == 1 and fn.sizes == [action.group.order * 7]
    ref = _loop_metrics(lambda z: lin(z.reshape(z.shape[0], -1)).detach(), action, x)
    for k in ref:
        assert rep[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    assert 1.0 <= rep["osp"] <= action.group.order


def test_invariant_function_scores_perfectly():
    act = ImageRotation90()
    torch.manual_seed(0)
    lin = nn.Linear(16, 5).to(DT)

    def symmetrized(z):  # f(x) = h(mean_g gx) is exactly invariant
        return lin(act.orbit(z).mean(0).reshape(z.shape[0], -1))

    x = torch.randn(10, 1, 4, 4, dtype=DT)
    rep = invariance_report(symmetrized, act, x)
    assert rep["osp"] == 4.0
    assert rep["kl"] < 1e-24 and rep["kl_max"] < 1e-24
    assert rep["logit_deviation"] < 1e-12


def test_labels_and_chunking():
    act = Reflection()
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).to(DT)
    x = torch.randn(9, 6, dtype=DT)
    y = torch.randint(0, 3, (9,))
    full = invariance_report(lin, act, x, labels=y)
    chunked = invariance_report(lin, act, x, labels=y, chunk_size=4)
    for k in full:
        assert chunked[k] == pytest.approx(full[k], rel=1e-12)
    with torch.no_grad():
        acc = float((lin(x).argmax(1) == y).double().mean())
        orb = float(((lin(x).argmax(1) == y).double().mean() + (lin(x.flip(-1)).argmax(1) == y).double().mean()) / 2)
    assert full["accuracy"] == pytest.approx(acc) and full["orbit_accuracy"] == pytest.approx(orb)


def test_invariance_metrics_from_logits_closed_form():
    # two classes, logits (0, 0) vs (a, 0): symmetric KL has a closed form
    a = 1.3
    logits = torch.tensor([[[0.0, 0.0]], [[a, 0.0]]], dtype=DT)
    q = 1 / (1 + math.exp(-a))
    expected = 0.5 * ((0.5 - q) * (math.log(0.5) - math.log(q)) + (0.5 - (1 - q)) * (math.log(0.5) - math.log(1 - q)))
    m = invariance_metrics(logits)
    assert m["kl"] == pytest.approx(expected / 2)  # mean over g includes the identity (0)
    assert m["kl_max"] == pytest.approx(expected)
    assert m["osp"] == 2.0  # both argmax 0: identity and g agree (OSP counts the identity)
    logits2 = torch.tensor([[[0.0, 1.0]], [[a, 0.0]]], dtype=DT)
    assert invariance_metrics(logits2)["osp"] == 1.0
    with pytest.raises(ShapeError):
        invariance_metrics(torch.zeros(2, 3))


def test_equivariance_error_equivariant_and_not():
    act = CyclicShift(8)
    torch.manual_seed(0)
    k = torch.randn(3, dtype=DT)

    def circ_conv(z):  # circular convolution commutes with cyclic shifts
        return sum(k[i] * torch.roll(z, i - 1, dims=-1) for i in range(3))

    x = torch.randn(5, 8, dtype=DT)
    assert equivariance_error(circ_conv, act, act, x) < 1e-14
    assert equivariance_error(torch.tanh, ImageDihedral(), ImageDihedral(), torch.randn(3, 4, 4, dtype=DT)) == 0
    w = torch.randn(8, 8, dtype=DT)
    fn = CountingFn(lambda z: z @ w.T)
    errs = equivariance_error(fn, act, act, x, reduction="none")
    assert fn.calls == 1
    # loop reference
    for g in range(8):
        ref = (torch.roll(x, g, -1) @ w.T - torch.roll(x @ w.T, g, -1)).norm() / (x @ w.T).norm()
        assert errs[g] == pytest.approx(float(ref), rel=1e-10)
    assert equivariance_error(fn, act, act, x) == pytest.approx(float(errs.max()))
    assert equivariance_error(fn, act, act, x, reduction="mean") == pytest.approx(float(errs.mean()))
    # invariant outputs: trivial output action
    inv = equivariance_error(lambda z: z.sum(-1, keepdim=True), act, TrivialAction(act.group), x)
    assert inv < 1e-14


def test_equivariance_error_bad_input():
    with pytest.raises(GroupActionError):
        equivariance_error(torch.tanh, CyclicShift(4), ImageRotation90(), torch.randn(2, 4))
    with pytest.raises(ShapeError):
        equivariance_error(torch.tanh, CyclicShift(4), CyclicShift(4), torch.randn(2, 4), reduction="sum")
    with pytest.raises(GroupActionError):
        invariance_report(lambda z: z, ImageRotation90(), torch.randn(2, 3, 4))
    with pytest.raises(ShapeError):
        orbit_outputs(lambda z: z[:1], CyclicShift(4), torch.randn(2, 4))
