"""Orbit and random group augmentation, checked against per-sample loops over the group."""

from __future__ import annotations

import pytest
import torch

from symgen.augment import OrbitAugment, RandomGroupAugment
from symgen.errors import ConfigError, GroupActionError, ShapeError
from symgen.groups import CyclicShift, ImageDihedral, ImageRotation90, Reflection


@pytest.mark.parametrize(
    "action,shape", [(ImageRotation90(), (1, 4, 4)), (ImageDihedral(), (2, 3, 3)), (CyclicShift(5), (5,))]
)
def test_orbit_augment_matches_loop(action, shape):
    x = torch.randn(3, *shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    xa, ya = OrbitAugment(action)(x, y)
    order = action.group.order
    assert xa.shape == (order * 3, *shape) and ya.shape == (order * 3,)
    for g in range(order):
        for b in range(3):
            assert torch.equal(xa[g * 3 + b], action.apply(g, x[b]))
            assert ya[g * 3 + b] == y[b]
    # the augmented set is closed under the group: applying h permutes the orbit copies
    for h in range(order):
        moved = action.apply(h, xa.reshape(order, 3, *shape))
        for g in range(order):
            assert torch.equal(moved[g], xa.reshape(order, 3, *shape)[action.group.mul(h, g)])


def test_orbit_augment_equivariant_targets():
    act = CyclicShift(4)
    x = torch.randn(2, 4)
    y = x.clone()  # an equivariant target transforms with the input
    xa, ya = OrbitAugment(act, out_action=act)(x, y)
    assert torch.equal(xa, ya)
    with pytest.raises(GroupActionError):
        OrbitAugment(act, out_action=Reflection())


def test_random_augment_per_sample_and_seeded():
    act = ImageRotation90()
    x = torch.randn(64, 1, 5, 5)
    aug = RandomGroupAugment(act, generator=3)
    xa = aug(x)
    elems = aug.last_elements
    assert elems.shape == (64,)
    for b in range(64):
        assert torch.equal(xa[b], act.apply(int(elems[b]), x[b]))
    # every element shows up (64 draws from 4 elements)
    assert set(elems.tolist()) == {0, 1, 2, 3}
    # same seed -> same draws; different seed -> different draws
    assert torch.equal(RandomGroupAugment(act, generator=3)(x), xa)
    assert not torch.equal(RandomGroupAugment(act, generator=4)(x), xa)
    # a torch.Generator gives the same stream as the int seed
    g = torch.Generator().manual_seed(3)
    assert torch.equal(RandomGroupAugment(act, generator=g)(x), xa)


def test_random_augment_uniform():
    act = ImageDihedral()
    aug = RandomGroupAugment(act, generator=0)
    draws = aug.sample((8000,))
    counts = torch.bincount(draws, minlength=8).double()
    # chi-square against uniform with 7 dof: 99.9% quantile is 24.3
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 24.3


def test_random_augment_two_batch_dims_and_labels():
    act = CyclicShift(6)
    x = torch.randn(3, 4, 6)  # (members, batch, features)
    y = torch.arange(12).reshape(3, 4)
    aug = RandomGroupAugment(act, generator=1, batch_dims=2)
    xa, ya = aug(x, y)
    assert torch.equal(ya, y)
    e = aug.last_elements
    assert e.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert torch.equal(xa[i, j], torch.roll(x[i, j], int(e[i, j])))
    aug2 = RandomGroupAugment(act, generator=1, out_action=act)
    xb, yb = aug2(x[0], x[0].clone())
    assert torch.equal(xb, yb)


def test_augment_bad_input():
    with pytest.raises(GroupActionError):
        OrbitAugment(ImageRotation90())(torch.randn(2, 3, 4))
    with pytest.raises(ShapeError):
        OrbitAugment(CyclicShift(3))(torch.randn(2, 3), torch.zeros(3))
    with pytest.raises(GroupActionError):
        RandomGroupAugment(CyclicShift(3))(torch.randn(2, 4))
    with pytest.raises(ShapeError):
        RandomGroupAugment(CyclicShift(3), batch_dims=2)(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="generator"):
        RandomGroupAugment(CyclicShift(3), generator="1")
