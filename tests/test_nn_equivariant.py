"""Equivariant layers: checked over every group element, against the character formula and an
independent averaging (Reynolds) projector on weight space."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from symgen import rng
from symgen.errors import GroupActionError, ShapeError
from symgen.groups import (
    CyclicGroup,
    CyclicShift,
    DihedralGroup,
    ImageDihedral,
    ImageRotation90,
    Reflection,
    Representation,
    commutant_basis,
    commutant_dimension,
    commutant_orbits,
    fixed_basis,
)
from symgen.nn import (
    GCNN,
    EquivariantLinear,
    GroupConv2d,
    GroupLinear,
    InvariantReadout,
    LiftingConv2d,
    LiftingLinear,
    LinearSteerableNet,
)

DT = torch.float64
TOL = 1e-10


def rotation_rep_c4() -> Representation:
    """The 2D rotation representation of C4 (not a permutation representation)."""
    mats = []
    for k in range(4):
        c, s = round(math.cos(k * math.pi / 2)), round(math.sin(k * math.pi / 2))
        mats.append([[c, -s], [s, c]])
    return Representation(torch.tensor(mats, dtype=DT), group=CyclicGroup(4), name="rot2d")


def standard_rep_d4() -> Representation:
    """The 2D standard representation of D4 in the element order of DihedralGroup(4): r^k s^b."""
    g = DihedralGroup(4)
    r = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)
    s = torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=DT)
    mats = [torch.linalg.matrix_power(r, e % 4) @ (s if e // 4 else torch.eye(2, dtype=DT)) for e in range(8)]
    return Representation(torch.stack(mats), group=g, name="std2d")


def averaging_projector(in_rep: Representation, out_rep: Representation) -> torch.Tensor:
    """Independent: the Reynolds operator W -> |G|^-1 sum_g rho_out(g) W rho_in(g)^-1 as a (D, D) matrix."""
    d_in, d_out = in_rep.dim, out_rep.dim
    eye = torch.eye(d_out * d_in, dtype=DT).reshape(-1, d_out, d_in)
    inv = torch.linalg.inv(in_rep.matrices)
    avg = torch.einsum("gab,kbc,gcd->kad", out_rep.matrices, eye, inv) / in_rep.order
    return avg.reshape(d_out * d_in, d_out * d_in).T


def cases():
    c4 = ImageRotation90()
    d4 = ImageDihedral()
    cyc = CyclicShift(5)
    return [
        (Representation.from_action(c4, (1, 3, 3)), Representation.regular(c4.group).copies(2)),
        (Representation.from_action(d4, (1, 3, 3)), Representation.regular(d4.group)),
        (Representation.from_action(d4, (2, 3, 3)), Representation.from_action(d4, (1, 3, 3))),
        (Representation.from_action(cyc, (2, 5)), Representation.from_action(cyc, (5,))),
        (Representation.regular(d4.group), Representation.trivial(d4.group, 2)),
        (rotation_rep_c4(), Representation.regular(c4.group)),
        (rotation_rep_c4() + Representation.trivial(c4.group), rotation_rep_c4().copies(2)),
        (standard_rep_d4(), standard_rep_d4() + Representation.from_action(d4, (1, 2, 2))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_commutant_basis_dimension_equivariance_and_span(case):
    in_rep, out_rep = cases()[case]
    basis = commutant_basis(in_rep, out_rep)
    # dimension = character inner product, computed here directly from traces
    chi = in_rep.matrices.diagonal(dim1=1, dim2=2).sum(-1) * out_rep.matrices.diagonal(dim1=1, dim2=2).sum(-1)
    assert basis.shape[0] == round(float(chi.sum()) / in_rep.order) == commutant_dimension(in_rep, out_rep)
    # orthonormal, and every element equivariant for every g
    gram = torch.einsum("kij,lij->kl", basis, basis)
    assert torch.allclose(gram, torch.eye(basis.shape[0], dtype=DT), atol=TOL)
    lhs = torch.einsum("gab,kbc->gkac", out_rep.matrices, basis)
    rhs = torch.einsum("kab,gbc->gkac", basis, in_rep.matrices)
    assert (lhs - rhs).abs().max() <= TOL
    # span equals the range of the independent averaging projector
    flat = basis.reshape(basis.shape[0], -1)
    assert torch.allclose(flat.T @ flat, averaging_projector(in_rep, out_rep), atol=1e-9)
    assert commutant_basis(in_rep, out_rep) is basis  # cached


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4])
def test_orbit_fast_path_spans_the_dense_basis(case):
    in_rep, out_rep = cases()[case]
    labels, sizes = commutant_orbits(in_rep, out_rep)
    k = sizes.numel()
    orbit_basis = torch.zeros(k, labels.numel(), dtype=DT)
    orbit_basis[labels, torch.arange(labels.numel())] = 1.0
    orbit_basis /= sizes.to(DT).sqrt()[:, None]
    dense = commutant_basis(in_rep, out_rep).reshape(k, -1)
    assert torch.allclose(orbit_basis.T @ orbit_basis, dense.T @ dense, atol=1e-10)


def test_fixed_basis_matches_reynolds_projector():
    from symgen.groups import reynolds_projector

    act = ImageDihedral()
    rep = Representation.from_action(act, (1, 4, 4))
    fb = fixed_basis(rep)
    assert torch.allclose(fb.T @ fb, reynolds_projector(act, (1, 4, 4), dtype=DT), atol=TOL)
    std = standard_rep_d4() + Representation.trivial(act.group)
    fb2 = fixed_basis(std)
    assert fb2.shape == (1, 3) and torch.allclose(fb2.abs(), torch.tensor([[0.0, 0.0, 1.0]], dtype=DT), atol=TOL)


def _regular_act(group, y: torch.Tensor, g: int) -> torch.Tensor:
    """(L_g y)[..., h] = y[..., g^-1 h] on the last (group) axis, from the Cayley table directly."""
    idx = torch.tensor([group.table[group.inv(g), h] for h in range(group.order)])
    return y[..., idx]


@pytest.mark.parametrize("method", ["dense", "orbit"])
def test_equivariant_linear_equivariance_all_elements(method):
    act = ImageDihedral()
    shape = (2, 3, 3)
    in_rep = Representation.from_action(act, shape)
    out_rep = Representation.regular(act.group).copies(2)
    gen = torch.Generator().manual_seed(0)
    layer = EquivariantLinear(in_rep, out_rep, bias=True, method=method, generator=gen, dtype=DT)
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    x = torch.randn(5, *shape, generator=gen, dtype=DT)
    y = layer(x.reshape(5, -1))
    for g in act.group.elements():
        y_g = layer(act.apply(g, x).reshape(5, -1))
        expected = y @ out_rep.matrices[g].T
        assert (y_g - expected).abs().max() <= TOL


def test_equivariant_linear_non_permutation_and_raw_matrices():
    rot = rotation_rep_c4()
    std = standard_rep_d4()
    gen = torch.Generator().manual_seed(1)
    layer = EquivariantLinear(rot + Representation.trivial(rot.group), rot.copies(2), generator=gen, dtype=DT)
    assert layer.method == "dense"
    x = torch.randn(7, 3, generator=gen, dtype=DT)
    for g in range(4):
        rin = torch.block_diag(rot.matrices[g], torch.ones(1, 1, dtype=DT))
        rout = torch.block_diag(rot.matrices[g], rot.matrices[g])
        assert (layer(x @ rin.T) - layer(x) @ rout.T).abs().max() <= TOL
    # raw tensors without a group: closure is checked jointly, all elements act as constraints
    raw = EquivariantLinear(std.matrices, std.matrices, bias=False, generator=gen, dtype=DT)
    assert raw.num_basis == commutant_dimension(std, std) == 1  # Schur: an irreducible real rep of type R


def test_lifting_group_readout_equivariance_and_fast_path_equals_basis():
    act = ImageRotation90()
    shape = (2, 3, 3)
    group = act.group
    gen = torch.Generator().manual_seed(2)
    lift = LiftingLinear(act, 3, in_shape=shape, generator=gen, dtype=DT)
    conv = GroupLinear(group, 3, 2, generator=gen, dtype=DT)
    read = InvariantReadout(group, 2, 4, generator=gen, dtype=DT)
    for m in (lift, conv, read):
        with torch.no_grad():
            m.bias.normal_(generator=gen)
    x = torch.randn(6, *shape, generator=gen, dtype=DT)
    h1, h2, out = lift(x), None, None
    h2 = conv(h1)
    out = read(h2)
    for g in group.elements():
        xg = act.apply(g, x)
        assert (lift(xg) - _regular_act(group, h1, g)).abs().max() <= TOL
        assert (conv(_regular_act(group, h1, g)) - _regular_act(group, h2, g)).abs().max() <= TOL
        assert (read(_regular_act(group, h2, g)) - out).abs().max() <= TOL

    # The fast paths parameterize exactly the commutant: the linear map params -> W has rank = dim
    # and its image lies in the dense basis span.
    in_rep = Representation.from_action(act, shape)
    reg = Representation.regular(group)
    for layer, rin, rout, weight_of in [
        (lift, in_rep, reg.copies(3), lambda p: p[:, lift.filter_index].reshape(-1, in_rep.dim)),
        (conv, reg.copies(3), reg.copies(2), lambda p: p[:, :, conv.kernel_index].permute(0, 2, 1, 3).reshape(8, 12)),
    ]:
        jac = torch.func.jacrev(weight_of)(layer.weight.detach()).reshape(rout.dim * rin.dim, -1)
        basis = commutant_basis(rin, rout).reshape(-1, rout.dim * rin.dim)
        assert torch.linalg.matrix_rank(jac).item() == basis.shape[0] == jac.shape[1]
        assert torch.allclose(basis.T @ (basis @ jac), jac, atol=TOL)
    # readout: mean over G then linear == the commutant regular^2 -> trivial^4 (dimension 2 * 4)
    assert commutant_dimension(reg.copies(2), Representation.trivial(group, 4)) == read.weight.numel()


def test_lifting_linear_non_permutation_rep():
    rot = rotation_rep_c4()
    gen = torch.Generator().manual_seed(3)
    lift = LiftingLinear(rot, 2, generator=gen, dtype=DT)
    x = torch.randn(4, 2, generator=gen, dtype=DT)
    y = lift(x)
    for g in range(4):
        assert (lift(x @ rot.matrices[g].T) - _regular_act(rot.group, y, g)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["c4", "d4"])
def test_gcnn_invariance_and_conv_equivariance(name):
    act = ImageRotation90() if name == "c4" else ImageDihedral()
    group = act.group
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 7, 7, generator=gen, dtype=DT)
    lift = LiftingConv2d(act, 2, 3, 3, generator=gen, dtype=DT)
    gconv = GroupConv2d(act, 3, 2, 5, generator=gen, dtype=DT)
    with torch.no_grad():
        lift.bias.normal_(generator=gen)
        gconv.bias.normal_(generator=gen)
    f1 = lift(x)
    f2 = gconv(f1)

    def act_feature(f, g):  # spatial action then the regular action on the group axis
        f = act.apply(g, f)
        idx = torch.tensor([group.table[group.inv(g), h] for h in range(group.order)])
        return f[:, :, idx]

    for g in group.elements():
        assert (lift(act.apply(g, x)) - act_feature(f1, g)).abs().max() <= TOL
        assert (gconv(act_feature(f1, g)) - act_feature(f2, g)).abs().max() <= TOL
    net = GCNN(name, in_channels=2, channels=(3, 2), num_classes=5, generator=gen, dtype=DT)
    out = net(x)
    assert out.shape == (2, 5)
    for g in group.elements():
        assert (net(act.apply(g, x)) - out).abs().max() <= TOL


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_linear_steerable_net_predictor_in_fixed_space(depth):
    act = CyclicShift(6)
    shape = (2, 6)
    gen = torch.Generator().manual_seed(5)
    net = LinearSteerableNet(act, shape, depth=depth, width=3, generator=gen, dtype=DT)
    beta = net.predictor()
    assert beta.shape == shape
    proj = act.orbit(beta).mean(0)
    assert (beta - proj).abs().max() <= TOL * beta.abs().max()
    x = torch.randn(9, *shape, generator=gen, dtype=DT)
    assert torch.allclose(net(x), (x * beta).sum((1, 2)), atol=TOL)
    for g in act.group.elements():
        assert (net(act.apply(g, x)) - net(x)).abs().max() <= TOL


def test_bad_input_errors():
    c4 = CyclicGroup(4)
    reg = Representation.regular(c4)
    # matrices that are not a homomorphism (two elements swapped)
    bad = reg.matrices.clone()[[0, 2, 1, 3]]
    with pytest.raises(GroupActionError, match="homomorphism"):
        Representation(bad, group=c4)
    with pytest.raises(GroupActionError, match="closed under multiplication"):
        Representation(torch.randn(3, 2, 2, dtype=DT))
    with pytest.raises(GroupActionError, match="3 matrices"):
        Representation(reg.matrices[:3], group=c4)
    with pytest.raises(GroupActionError):
        EquivariantLinear(reg, Representation.regular(DihedralGroup(4)))
    with pytest.raises(GroupActionError):
        Representation.from_action(ImageRotation90(), (1, 3, 4))  # not square
    with pytest.raises(GroupActionError, match="orbit"):
        EquivariantLinear(rotation_rep_c4(), reg, method="orbit")
    # shape mismatch between action/representation and input
    layer = EquivariantLinear(reg, reg)
    with pytest.raises(ShapeError):
        layer(torch.randn(2, 5))
    lift = LiftingLinear(CyclicShift(4), 2, in_shape=(3, 4))
    with pytest.raises(ShapeError):
        lift(torch.randn(2, 3, 5))
    with pytest.raises(ShapeError):
        GroupLinear(c4, 2, 2)(torch.randn(2, 2, 8))
    with pytest.raises(ShapeError):
        InvariantReadout(c4, 2, 1)(torch.randn(2, 3, 4))
    with pytest.raises(ShapeError):
        LinearSteerableNet(Reflection((-1,)), (4,), depth=2)(torch.randn(2, 5))
    with pytest.raises(ShapeError):
        LiftingConv2d("c4", 1, 2, kernel_size=2)
    with pytest.raises(GroupActionError):
        GCNN("c4", 1)(torch.randn(1, 1, 5, 6))


# ------------------------------------------------------------------ base: check_equivariance, export, generator


def _layers() -> dict:
    """One instance of every equivariant layer class (and its variants), float64, with random biases."""
    c4, d4 = ImageRotation90(), ImageDihedral()
    reg4, reg8 = Representation.regular(c4.group), Representation.regular(d4.group)
    rot = rotation_rep_c4()
    gen = torch.Generator().manual_seed(11)
    kw = {"generator": gen, "dtype": DT}
    layers = {
        "linear-orbit": EquivariantLinear(Representation.from_action(d4, (1, 3, 3)), reg8.copies(2), **kw),
        "linear-dense": EquivariantLinear(Representation.from_action(d4, (1, 3, 3)), reg8, method="dense", **kw),
        "linear-rot": EquivariantLinear(rot + Representation.trivial(rot.group), rot.copies(2), **kw),
        "linear-raw": EquivariantLinear(rot.matrices, rot.matrices, **kw),
        "lifting": LiftingLinear(c4, 3, in_shape=(2, 3, 3), **kw),
        "lifting-rot": LiftingLinear(rot, 2, **kw),
        "group": GroupLinear(d4.group, 3, 2, **kw),
        "readout": InvariantReadout(reg4.group, 3, 4, **kw),
        "lifting-conv": LiftingConv2d(d4, 2, 3, 3, **kw),
        "group-conv": GroupConv2d(c4, 2, 3, 5, **kw),
        "gcnn": GCNN("d4", in_channels=2, channels=(3, 2), num_classes=5, **kw),
        "steerable-1": LinearSteerableNet(CyclicShift(6), (2, 6), depth=1, **kw),
        "steerable-3": LinearSteerableNet(ImageRotation90(), (1, 4, 4), depth=3, width=2, **kw),
    }
    with torch.no_grad():
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if name.endswith("bias"):
                    p.normal_(generator=gen)
    return layers


LAYERS = list(_layers())


@pytest.mark.parametrize("name", LAYERS)
def test_check_equivariance_passes_and_export_has_same_outputs(name):
    layer = _layers()[name]
    x = layer.example_input(4, generator=1)
    err = layer.check_equivariance()
    assert 0.0 <= err <= 1e-11
    assert layer.check_equivariance(x, atol=1e-11) <= 1e-11
    plain = layer.export()
    assert isinstance(plain, (nn.Linear, nn.Conv2d, nn.Sequential))
    assert not [type(m) for m in plain.modules() if type(m).__module__.startswith("symgen")]
    with torch.no_grad():
        y, y_plain = layer(x), plain(x)
    assert y_plain.shape == y.shape and torch.allclose(y_plain, y, atol=1e-12, rtol=1e-12)
    # the export is a copy: training the original afterwards leaves it unchanged
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
        assert torch.equal(plain(x), y_plain)


def _break(name: str, layer: nn.Module) -> None:
    """Corrupt a layer outside its equivariant parameterization (index buffers, basis, readout)."""
    with torch.no_grad():
        if name in ("linear-orbit",):
            layer.orbit_label.copy_(
                torch.randperm(layer.orbit_label.numel(), generator=torch.Generator().manual_seed(0)) % layer.num_basis
            )
        elif name in ("linear-dense", "linear-rot", "linear-raw"):
            layer.basis[:, 0, 0] += 0.5  # one entry of W, not tied to its orbit
            layer.weight.fill_(1.0)
        elif name == "lifting":
            layer.filter_index[1] = layer.filter_index[0]
        elif name == "lifting-rot":
            layer.filter_maps[1] = layer.filter_maps[0]
        elif name == "group":
            layer.kernel_index[0] = layer.kernel_index[1]
        elif name == "readout":
            layer.forward = lambda x: torch.nn.functional.linear(x[..., 0], layer.weight, layer.bias)
        elif name in ("lifting-conv", "group-conv"):
            layer.spatial_index[1] = torch.arange(layer.spatial_index.shape[1])
        elif name == "gcnn":
            layer.features[0].spatial_index[1] = torch.arange(layer.features[0].spatial_index.shape[1])
        elif name.startswith("steerable"):
            first = layer.layers[0]
            if hasattr(first, "filter_index"):
                first.filter_index[1] = first.filter_index[0]
            else:
                first.orbit_label[0] = (first.orbit_label[0] + 1) % first.num_basis


@pytest.mark.parametrize("name", LAYERS)
def test_check_equivariance_fails_loudly_on_a_broken_layer(name):
    layer = _layers()[name]
    _break(name, layer)
    with pytest.raises(GroupActionError, match=r"not equivariant: group element \d+ of \d+"):
        layer.check_equivariance()
    assert layer.check_equivariance(atol=float("inf")) > 1e-6


def _brute_force_error(layer, act_in, act_out, x, order):
    """max_g max |f(act_in(g, x)) - act_out(g, f(x))| by a loop, and its argmax."""
    with torch.no_grad():
        y = layer(x)
        errs = [float((layer(act_in(g, x)) - act_out(g, y)).abs().max()) for g in range(order)]
    return max(errs), errs.index(max(errs))


def test_check_equivariance_reports_the_worst_element_against_a_loop():
    rot = rotation_rep_c4()
    layer = EquivariantLinear(rot, rot.copies(2), bias=False, generator=0, dtype=DT)
    with torch.no_grad():
        layer.basis.add_(torch.tensor([[0.0, 0.3], [0.0, 0.0], [0.1, 0.0], [0.0, 0.0]], dtype=DT))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    out2 = lambda g, y: y @ torch.block_diag(rot.matrices[g], rot.matrices[g]).T  # noqa: E731
    worst, worst_g = _brute_force_error(layer, lambda g, v: v @ rot.matrices[g].T, out2, x, 4)
    assert worst > 1e-3
    assert layer.check_equivariance(x, atol=worst * 1.01) == pytest.approx(worst, rel=1e-9)
    with pytest.raises(GroupActionError, match=f"group element {worst_g} of 4"):
        layer.check_equivariance(x, atol=worst * 0.99)

    act = ImageRotation90()
    group = act.group
    conv = GroupConv2d(act, 2, 2, 3, generator=0, dtype=DT)
    with torch.no_grad():
        conv.kernel_index[2] = conv.kernel_index[1]

    def act_feature(g, f):
        idx = torch.tensor([group.table[group.inv(g), h] for h in range(group.order)])
        return act.apply(g, f)[:, :, idx]

    x = torch.randn(2, 2, 4, 5, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    worst, worst_g = _brute_force_error(conv, act_feature, act_feature, x, 4)
    assert conv.check_equivariance(x, atol=math.inf) == pytest.approx(worst, rel=1e-9)
    with pytest.raises(GroupActionError, match=f"group element {worst_g} of 4"):
        conv.check_equivariance(x)


def test_layers_take_a_seed_or_a_generator_or_follow_the_global_rng_like_torch_nn():
    state = torch.random.get_rng_state()
    a = GCNN("c4", 1, (2,), 3, generator=5, dtype=DT)
    b = GCNN("c4", 1, (2,), 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert torch.equal(torch.random.get_rng_state(), state)  # an explicit generator leaves the global one alone
    with rng.isolated_seed(5):  # None: the global generator, as torch.nn modules
        c = GCNN("c4", 1, (2,), 3, dtype=DT)
    with rng.isolated_seed(6):
        d = GCNN("c4", 1, (2,), 3, dtype=DT)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (_, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert not torch.equal(c.features[0].weight, d.features[0].weight)
    # one stream for the whole net: its layers do not repeat each other's draws
    net = LinearSteerableNet(CyclicShift(4), (4,), depth=3, width=4, generator=0, dtype=DT)
    assert not torch.equal(net.layers[1].weight[0, 0], net.layers[0].weight[0, :4])
