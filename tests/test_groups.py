"""Finite groups and their actions, checked against closed forms and brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

from symgen.errors import GroupActionError, SymgenError
from symgen.groups import (
    CyclicGroup,
    CyclicShift,
    DihedralGroup,
    DirectProduct,
    FiniteGroup,
    ImageDihedral,
    ImageRotation90,
    LiftedImageAction,
    PermutationAction,
    PermutationGroup,
    Reflection,
    Representation,
    TrivialAction,
    reynolds_projector,
)

DT = torch.float64

ACTIONS = [
    pytest.param(ImageRotation90(), (1, 5, 5), id="rot90"),
    pytest.param(ImageDihedral(), (2, 4, 4), id="dihedral"),
    pytest.param(CyclicShift(6), (3, 6), id="shift"),
    pytest.param(CyclicShift(4, dim=-2), (4, 3), id="shift-dim-2"),
    pytest.param(Reflection(), (2, 5), id="reflect"),
    pytest.param(Reflection(dims=(-1, -2)), (3, 4), id="reflect2"),
    pytest.param(PermutationAction([[1, 2, 3, 0, 4], [1, 0, 2, 3, 4]]), (5,), id="perm-S4"),
    pytest.param(LiftedImageAction(ImageDihedral()), (2, 8, 3, 3), id="lifted-d4"),
    pytest.param(Representation.regular(DihedralGroup(3)).copies(2).action((2, 6)), (2, 6), id="regular-rep"),
]


def _order_of(group: FiniteGroup, g: int) -> int:
    k, h = 1, g
    while h != 0:
        h, k = group.mul(h, g), k + 1
    return k


# ------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize(
    "group",
    [
        CyclicGroup(1),
        CyclicGroup(7),
        DihedralGroup(1),
        DihedralGroup(3),
        DihedralGroup(4),
        DirectProduct(CyclicGroup(2), DihedralGroup(3)),
    ],
    ids=lambda g: g.name,
)
def test_group_axioms(group):
    n = group.order
    assert group.is_associative()
    # brute-force associativity check independent of is_associative()
    for a, b, c in itertools.product(range(n), repeat=3):
        assert group.mul(group.mul(a, b), c) == group.mul(a, group.mul(b, c))
    for g in group.elements():
        assert group.mul(g, 0) == g == group.mul(0, g)
        assert group.mul(g, group.inv(g)) == 0 == group.mul(group.inv(g), g)


def test_dihedral_structure():
    d4 = DihedralGroup(4)
    assert d4.order == 8
    r, s = 1, 4
    # r^4 = s^2 = e and s r s = r^-1
    assert _order_of(d4, r) == 4 and _order_of(d4, s) == 2
    assert d4.mul(d4.mul(s, r), s) == d4.inv(r)
    assert not torch.equal(d4.table, d4.table.T)  # non-abelian
    orders = sorted(_order_of(d4, g) for g in d4.elements())
    assert orders == [1, 2, 2, 2, 2, 2, 4, 4]  # D4: identity, 5 involutions, 2 of order 4


def test_cyclic_and_product():
    c5 = CyclicGroup(5)
    assert all(c5.mul(a, b) == (a + b) % 5 for a in range(5) for b in range(5))
    g = DirectProduct(CyclicGroup(3), CyclicGroup(4))
    assert g.order == 12
    # C3 x C4 is cyclic of order 12: some element has order 12
    assert max(_order_of(g, e) for e in g.elements()) == 12
    a, b = g.pair(g.mul(g.element(2, 3), g.element(2, 2)))
    assert (a, b) == ((2 + 2) % 3, (3 + 2) % 4)


def test_permutation_group_closure_matches_enumeration():
    # S4 from a 4-cycle and a transposition
    pg = PermutationGroup([[1, 2, 3, 0], [1, 0, 2, 3]])
    assert pg.order == 24
    assert {tuple(p) for p in pg.perms.tolist()} == set(itertools.permutations(range(4)))
    assert pg.is_associative()
    # table = composition sigma_{gh}(i) = sigma_g(sigma_h(i)), checked by brute force
    for g in range(pg.order):
        for h in range(pg.order):
            sg, sh, sgh = pg.perms[g], pg.perms[h], pg.perms[pg.mul(g, h)]
            assert [int(sg[int(sh[i])]) for i in range(4)] == sgh.tolist()
    # a list that is already a group (identity first) keeps its order
    c3 = [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert PermutationGroup(c3).perms.tolist() == c3


def test_group_errors():
    with pytest.raises(GroupActionError):
        PermutationGroup([[0, 0, 1]])
    with pytest.raises(GroupActionError):
        PermutationGroup([[0, 1], [0, 1, 2]])
    with pytest.raises(GroupActionError):
        FiniteGroup("bad", torch.tensor([[0, 1], [1, 1]]), [1])
    with pytest.raises(GroupActionError):
        PermutationGroup([list(range(1, 12)) + [0], [1, 0] + list(range(2, 12))], max_order=1000)


# ------------------------------------------------------------------------------------ actions


@pytest.mark.parametrize("action,shape", ACTIONS)
def test_homomorphism_all_pairs(action, shape):
    g_ = action.group
    x = torch.randn(3, *shape, dtype=DT)
    for g in g_.elements():
        for h in g_.elements():
            assert torch.equal(action.apply(g, action.apply(h, x)), action.apply(g_.mul(g, h), x))
    assert torch.equal(action.apply(0, x), x)


@pytest.mark.parametrize("action,shape", ACTIONS)
def test_orbit_and_permutations(action, shape):
    x = torch.randn(2, *shape, dtype=DT)
    orbit = action.orbit(x)
    assert orbit.shape == (action.group.order, *x.shape)
    perms = action.permutations(shape)
    d = x[0].numel()
    assert perms.shape == (action.group.order, d)
    for g in action.group.elements():
        assert torch.equal(orbit[g], action.apply(g, x))
        assert torch.equal(action.apply(g, x).reshape(2, d), x.reshape(2, d)[:, perms[g]])
    # a generic input has a free orbit (all transforms distinct) for these faithful actions
    flat = orbit[:, 0].reshape(action.group.order, -1)
    assert torch.unique(flat, dim=0).shape[0] == action.group.order
    # apply_each == per-sample apply
    elems = torch.tensor([1 % action.group.order, action.group.order - 1])
    each = action.apply_each(elems, x)
    for b in range(2):
        assert torch.equal(each[b], action.apply(int(elems[b]), x[b]))


@pytest.mark.parametrize("action,shape", ACTIONS)
def test_matrices_unitary_representation(action, shape):
    mats = action.matrices(shape, dtype=DT)
    d = mats.shape[-1]
    eye = torch.eye(d, dtype=DT)
    x = torch.randn(*shape, dtype=DT)
    for g in action.group.elements():
        assert torch.allclose(mats[g] @ mats[g].T, eye)
        assert torch.allclose(mats[g] @ x.reshape(-1), action.apply(g, x).reshape(-1))
        for h in action.group.elements():
            assert torch.allclose(mats[g] @ mats[h], mats[action.group.mul(g, h)])


def _num_orbits(perms: torch.Tensor) -> int:
    """Number of orbits of positions under the gather permutations (union-find, brute force)."""
    d = perms.shape[1]
    parent = list(range(d))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in perms.tolist():
        for i, j in enumerate(row):
            parent[find(i)] = find(j)
    return len({find(i) for i in range(d)})


@pytest.mark.parametrize("action,shape", ACTIONS)
def test_reynolds_projector(action, shape):
    p = reynolds_projector(action, shape, dtype=DT)
    assert torch.allclose(p @ p, p)
    assert torch.allclose(p, p.T)
    # rank = dim Fix(rho) = number of orbits of positions (Burnside)
    assert torch.linalg.matrix_rank(p).item() == _num_orbits(action.permutations(shape))
    x = torch.randn(*shape, dtype=DT)
    px = (p @ x.reshape(-1)).reshape(shape)
    for g in action.group.elements():
        assert torch.allclose(action.apply(g, px), px)
    assert torch.allclose(p @ x.reshape(-1), action.orbit(x).mean(0).reshape(-1))


def test_rotation_matches_coordinate_formula():
    n = 5
    x = torch.randn(n, n, dtype=DT)
    r = ImageRotation90().apply(1, x)
    # counter-clockwise rotation: r[i, j] = x[j, n-1-i]
    expected = torch.tensor([[x[j, n - 1 - i].item() for j in range(n)] for i in range(n)], dtype=DT)
    assert torch.equal(r, expected)
    f = ImageDihedral().apply(4, x)  # pure reflection
    assert torch.equal(f, x[:, torch.arange(n - 1, -1, -1)])


def test_shift_matches_formula():
    x = torch.arange(6.0)
    assert CyclicShift(6).apply(2, x).tolist() == [4.0, 5.0, 0.0, 1.0, 2.0, 3.0]


def test_permutation_action_with_group_and_convention():
    c3 = CyclicGroup(3)
    perms = [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    act = PermutationAction(perms, group=c3)
    x = torch.tensor([10.0, 20.0, 30.0])
    # sigma_1 moves entry i to position sigma_1(i)
    y = act.apply(1, x)
    for i in range(3):
        assert y[perms[1][i]] == x[i]
    with pytest.raises(GroupActionError):
        PermutationAction([[0, 1, 2], [1, 2, 0], [1, 0, 2]], group=c3)
    with pytest.raises(GroupActionError):
        PermutationAction(perms[:2], group=c3)
    # event_ndim=2 flattens the trailing two dims
    act2 = PermutationAction([[1, 2, 3, 0]], event_ndim=2)
    z = torch.randn(3, 2, 2)
    assert act2.apply(1, z).shape == z.shape
    assert torch.equal(act2.apply(1, z).reshape(3, 4)[:, [1, 2, 3, 0]], z.reshape(3, 4))


def test_trivial_action():
    act = TrivialAction(CyclicGroup(4))
    x = torch.randn(2, 3)
    assert torch.equal(act.orbit(x), x.expand(4, 2, 3))


def test_bad_shapes_raise():
    with pytest.raises(GroupActionError, match="square"):
        ImageRotation90().apply(1, torch.randn(2, 3, 4))
    with pytest.raises(GroupActionError, match="square"):
        ImageDihedral().orbit(torch.randn(3, 5))
    with pytest.raises(GroupActionError):
        ImageRotation90().check((5,))
    with pytest.raises(GroupActionError):
        CyclicShift(5).apply(1, torch.randn(2, 4))
    with pytest.raises(GroupActionError):
        PermutationAction([[1, 0, 2]]).orbit(torch.randn(2, 4))
    with pytest.raises(GroupActionError):
        ImageRotation90().apply(4, torch.randn(3, 3))
    with pytest.raises(GroupActionError):
        CyclicShift(3, dim=1)
    with pytest.raises(SymgenError):
        ImageRotation90().matrices((3, 4))
    with pytest.raises(GroupActionError):
        ImageRotation90().apply_each(torch.tensor([0, 1, 2]), torch.randn(2, 3, 3))


# ------------------------------------------------------------------------------ representations


def _rotation_rep_c4() -> Representation:
    """C4 rotating the plane: closed-form rotation matrices, not a permutation representation."""
    r = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    return Representation(torch.stack([torch.linalg.matrix_power(r, k) for k in range(4)]), group=CyclicGroup(4))


@pytest.mark.parametrize("action,shape", ACTIONS)
def test_representation_from_action_is_the_action_matrices(action, shape):
    rep = Representation.from_action(action, shape)
    assert torch.equal(rep.matrices, action.matrices(shape, dtype=DT))
    assert torch.allclose(reynolds_projector(rep, dtype=DT), reynolds_projector(action, shape, dtype=DT))
    # its action on tensors is the original action
    x = torch.randn(2, *shape, dtype=DT)
    back = rep.action(shape)
    for g in action.group.elements():
        assert torch.equal(back.apply(g, x), action.apply(g, x))


def test_lifted_image_action_formula():
    act = LiftedImageAction(ImageRotation90())
    group = act.group
    f = torch.randn(2, 4, 5, 5, dtype=DT)
    for k in group.elements():
        # (L_k f)[h](u) = f[k^-1 h](k^-1 u): rotate every map, then move map k^-1 h to position h
        expected = torch.stack([torch.rot90(f[:, group.mul(group.inv(k), h)], k, (-2, -1)) for h in range(4)], 1)
        assert torch.equal(act.apply(k, f), expected)
    with pytest.raises(GroupActionError, match="dim -3"):
        act.check((2, 3, 5, 5))
    with pytest.raises(GroupActionError):
        LiftedImageAction(CyclicShift(4))


def test_representation_action_non_permutation():
    rot = _rotation_rep_c4()
    act = rot.action((2,))
    x = torch.randn(5, 2, dtype=DT)
    orbit = act.orbit(x)
    for g in range(4):
        assert torch.allclose(orbit[g], x @ rot.matrices[g].T)
        for h in range(4):
            assert torch.allclose(act.apply(g, act.apply(h, x)), act.apply(rot.group.mul(g, h), x))
    elems = torch.tensor([0, 1, 2, 3, 1])
    each = act.apply_each(elems, x)
    for b in range(5):
        assert torch.allclose(each[b], rot.matrices[int(elems[b])] @ x[b])
    assert torch.allclose(
        reynolds_projector(rot, dtype=DT), torch.zeros(2, 2, dtype=DT)
    )  # no invariant vector in the plane
    with pytest.raises(GroupActionError, match="not a permutation"):
        act.permutations((2,))
    with pytest.raises(GroupActionError):
        rot.action((3,))
    with pytest.raises(GroupActionError):
        act.apply(0, torch.randn(5, 3))
    # without a group the elements are the matrix indices
    raw = Representation(rot.matrices).action()
    assert raw.order == 4 and torch.allclose(raw.apply(1, x), x @ rot.matrices[1].T)
