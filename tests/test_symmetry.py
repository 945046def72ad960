"""Scale-symmetry detection against hand analysis, brute-force rescaling loops and recomputed statistics."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symgen.errors import ConfigError, ShapeError
from symgen.symmetry import NORMALIZATION_LAYERS, find_scale_symmetries, rescale_filters

TINY = 1e-300  # eps of normalizations in the exact checks: the symmetry is exact only as eps -> 0


def _tiny_eps(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, NORMALIZATION_LAYERS):
            m.eps = TINY
    return model


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.l1 = nn.Linear(8 * 16, 16)
        self.l2 = nn.Linear(16, 12)
        self.ln = nn.LayerNorm(12)
        self.l3 = nn.Linear(12, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = self.gn(F.max_pool2d(F.relu(self.c2(h)), 2)).flatten(1)
        h = F.relu(self.ln(self.l2(F.relu(self.l1(h)))))
        return self.l3(h)


class DenseCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.o = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        return self.o(self.bn(torch.cat([x, self.c(x)], 1)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x + self.c(x))


class ScalarOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(2.0 * self.c(x) + 1.0 - 3)


class FanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.b1 = nn.BatchNorm2d(4)
        self.g = nn.GroupNorm(2, 4)

    def forward(self, x):
        h = self.c(x)
        return self.b1(h) * self.g(F.relu(h))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.o = nn.Linear(5, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1
        return self.o(self.bn(self.l(x)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.l(x)) + F.linear(x, self.l.weight).sum()


img = (8, 3, 6, 6)
# name -> (factory, input shape, {weight: (kind, num_blocks, redundant bias, scaled bias)}, not invariant)
CASES = {
    "bn_mlp": (
        lambda: nn.Sequential(
            nn.Linear(5, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Linear(6, 3),
        ),
        (8, 5),
        {"0.weight": ("per_filter", 6, "0.bias", None), "3.weight": ("per_filter", 6, "3.bias", None)},
        {"6.weight", "6.bias"},
    ),
    "relu_before_bn": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
        img,
        {"0.weight": ("per_filter", 4, None, "0.bias")},
        set(),
    ),
    "mixed": (
        Mixed,
        (8, 1, 8, 8),
        {
            "c1.weight": ("per_filter", 4, "c1.bias", None),
            "c2.weight": ("per_group", 2, None, None),
            "l2.weight": ("joint", 1, None, "l2.bias"),
        },
        {"l1.weight", "l1.bias", "l3.weight", "l3.bias"},
    ),
    "linear3d_bn1d": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(7)),
        (4, 7, 5),
        {"0.weight": ("joint", 1, None, "0.bias")},
        set(),
    ),
    "conv_layernorm_lastdim": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.LayerNorm(8)),
        (4, 2, 10),
        {"0.weight": ("per_filter", 3, "0.bias", None)},
        set(),
    ),
    "flatten_layernorm": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LayerNorm(64)),
        img,
        {"0.weight": ("joint", 1, None, "0.bias")},
        set(),
    ),
    "adaptive_flatten_bn1d": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.BatchNorm1d(16)),
        img,
        {"0.weight": ("per_filter", 4, "0.bias", None)},
        set(),
    ),
    "avgpool_zero_padding": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 1, padding=1), nn.BatchNorm2d(4)),
        img,
        {"0.weight": ("per_filter", 4, None, "0.bias")},
        set(),
    ),
    "dropout_before_bn": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.BatchNorm1d(4)),
        (6, 3),
        {"0.weight": ("per_filter", 4, None, "0.bias")},
        set(),
    ),
    "dense_cat": (DenseCat, img, {"c.weight": ("per_filter", 4, "c.bias", None)}, {"o.weight", "o.bias"}),
    "residual_before_bn": (Residual, img, {}, {"c.weight", "c.bias"}),
    "scalar_ops": (ScalarOps, img, {"c.weight": ("per_filter", 4, "c.bias", None)}, set()),
    "fan_out_bn_gn": (FanOut, img, {"c.weight": ("per_group", 2, None, "c.bias")}, set()),
    "conv_transpose": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)),
        img,
        {"0.weight": ("per_filter", 4, "0.bias", None)},
        set(),
    ),
    "instance_norm": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
        img,
        {"0.weight": ("per_filter", 4, "0.bias", None)},
        set(),
    ),
    "gelu_before_bn": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.BatchNorm1d(4)),
        (6, 3),
        {},
        {"0.weight", "0.bias"},
    ),
    "no_norm": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        (6, 3),
        {},
        {"0.weight", "0.bias", "2.weight", "2.bias"},
    ),
}
if hasattr(nn, "RMSNorm"):
    CASES["rms_norm"] = (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4)),
        (6, 3),
        {"0.weight": ("joint", 1, None, "0.bias")},
        set(),
    )


def _build(name):
    factory, shape, expected, not_inv = CASES[name]
    torch.manual_seed(0)
    model = factory().double()
    with torch.no_grad():  # a generic parameter point (no zero biases, gamma != 1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, torch.randn(shape, dtype=torch.float64), expected, not_inv


def _scale_loop(model, weight, axis, blocks, factors, bias=None):
    """Independent reference: scale filters one by one with an explicit loop over blocks."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, block in enumerate(blocks):
            for c in block:
                params[weight].select(axis, c).mul_(float(factors[k]))
                if bias is not None:
                    params[bias][c] *= float(factors[k])
    return m


def _out(model, x, train=True, seed=0):
    model.train(train)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(x)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_finds_exactly_the_hand_analysed_groups(name):
    model, x, expected, not_inv = _build(name)
    report = find_scale_symmetries(model, x)
    got = {s.weight: (s.kind, s.num_blocks, s.redundant_bias, s.bias) for s in report.symmetries}
    assert got == expected, report.summary()
    assert set(report.not_invariant) == not_inv, report.summary()
    assert not report.rejected and not report.unanalysed, report.summary()


@pytest.mark.parametrize(
    "name",
    [
        "bn_mlp",
        "mixed",
        "dense_cat",
        "fan_out_bn_gn",
        "scalar_ops",
        "avgpool_zero_padding",
        "conv_transpose",
        "linear3d_bn1d",
    ],
)
def test_rescaling_found_blocks_by_loop_leaves_train_output_unchanged(name):
    model, x, _, not_inv = _build(name)
    report = find_scale_symmetries(model, x)
    exact = _tiny_eps(copy.deepcopy(model))
    ref = _out(exact, x)
    gen = torch.Generator().manual_seed(1)
    for s in report.symmetries:
        f = torch.exp(torch.empty(s.num_blocks, dtype=torch.float64).uniform_(-1.5, 1.5, generator=gen))
        scaled = _scale_loop(exact, s.weight, s.axis, s.blocks, f, s.bias)
        assert _rel(_out(scaled, x), ref) < 1e-10, s.weight
        if s.kind != "per_filter":  # the reported granularity is not too coarse
            fine = _scale_loop(
                exact,
                s.weight,
                s.axis,
                [[c] for c in range(s.num_filters)],
                torch.linspace(0.5, 2.0, s.num_filters, dtype=torch.float64),
                s.bias,
            )
            assert _rel(_out(fine, x), ref) > 1e-6, s.weight
    # parameters reported as not invariant do change the output when their rows are rescaled
    params = dict(exact.named_parameters())
    for pname in not_inv:
        m = copy.deepcopy(exact)
        with torch.no_grad():
            p = dict(m.named_parameters())[pname]
            p.mul_(torch.linspace(0.5, 2.0, p.shape[0], dtype=p.dtype).reshape([-1] + [1] * (p.dim() - 1)))
        assert params[pname].abs().sum() > 0
        assert _rel(_out(m, x), ref) > 1e-6, pname


def test_redundant_bias_is_cancelled_in_train_mode():
    model, x, _, _ = _build("mixed")
    report = find_scale_symmetries(model, x)
    assert list(report.redundant_biases) == ["c1.bias"]
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.c1.bias.copy_(torch.randn(4, dtype=torch.float64) * 5)
    assert _rel(_out(m, x), _out(model, x)) < 1e-12
    # in eval mode with the old running mean it is not
    model.train()
    model(x)
    m.load_state_dict({**model.state_dict(), "c1.bias": m.c1.bias.detach()})
    assert _rel(_out(m, x, train=False), _out(model, x, train=False)) > 1e-6


def _recompute_stats(model, batches):
    """Running statistics from scratch: a cumulative average over ``batches`` in train mode."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        for xb in batches:
            m(xb)
    return m


@pytest.mark.parametrize("name", ["bn_mlp", "scalar_ops", "mixed", "dense_cat", "conv_transpose"])
def test_eval_mode_rescaled_statistics_equal_recomputed_ones(name):
    model, x, _, _ = _build(name)
    model = _tiny_eps(model)
    batches = [torch.randn_like(x) for _ in range(3)]
    report = find_scale_symmetries(model, x)
    gen = torch.Generator().manual_seed(2)
    base = _recompute_stats(model, batches)
    for s in report.symmetries:
        f = torch.exp(torch.empty(s.num_blocks, dtype=torch.float64).uniform_(-1, 1, generator=gen))
        recomputed = _recompute_stats(_scale_loop(base, s.weight, s.axis, s.blocks, f, s.bias), batches)
        # eval mode is invariant once the statistics are recomputed for the rescaled filters ...
        assert _rel(_out(recomputed, x, train=False), _out(base, x, train=False)) < 1e-9
        # ... and rescale_filters maps the old statistics to exactly the recomputed ones
        p, b = dict(base.named_parameters()), dict(base.named_buffers())
        p2, b2 = rescale_filters(p, b, s, f)
        for k, v in recomputed.named_buffers():
            if "running" in k:
                assert torch.allclose(b2[k], v, rtol=1e-9, atol=1e-12), k
        for k, v in recomputed.named_parameters():
            assert torch.allclose(p2[k], v, rtol=0, atol=1e-14), k


def test_every_parameter_is_accounted_for_once_and_model_untouched():
    model, x, _, _ = _build("mixed")
    model.eval()
    before = copy.deepcopy(model.state_dict())
    report = find_scale_symmetries(model, x)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    places = (
        report.parameters()
        + list(report.redundant_biases)
        + list(report.not_invariant)
        + list(report.unanalysed)
        + list(report.rejected)
        + list(report.not_candidates)
    )
    assert sorted(places) == sorted(n for n, _ in model.named_parameters())
    assert "bn.weight" in report.not_candidates
    assert report.get("l2.bias").weight == "l2.weight"
    assert "joint" in report.reason("l2.weight") and "not scale-invariant" in report.reason("l3.weight")
    assert "c2.weight" in report.summary()
    d = report.to_dict()
    assert d["method"] == "torch.fx" and len(d["symmetries"]) == 3


def test_eps_makes_the_symmetry_approximate_and_is_reported():
    model, x, _, _ = _build("bn_mlp")
    s = find_scale_symmetries(model, x).symmetries[0]
    assert s.check["train_exact"] < 1e-12
    # eps = 1e-5 against per-channel variances: a deviation of order eps / var, not zero
    assert 1e-12 < s.check["train_eps"] < 1e-2
    # stale running statistics in eval mode are not invariant
    assert s.check["eval_stale_stats"] > 1e-4


def test_falls_back_to_hooks_when_fx_cannot_trace():
    torch.manual_seed(0)
    report = find_scale_symmetries(Untraceable().double(), torch.randn(6, 4, dtype=torch.float64))
    assert report.method == "hooks"
    assert any("torch.fx could not trace" in n for n in report.notes)
    assert [s.weight for s in report.symmetries] == ["l.weight"]
    assert set(report.not_invariant) == {"o.weight", "o.bias"}


def test_weight_used_by_a_functional_op_is_reported_unanalysed():
    report = find_scale_symmetries(Tied().double(), torch.randn(6, 4, dtype=torch.float64))
    assert not report.symmetries
    assert set(report.unanalysed) == {"l.weight", "l.bias"}
    assert "functional" in report.unanalysed["l.weight"]


def test_float32_model_is_checked_in_float64_and_left_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    report = find_scale_symmetries(model, torch.randn(6, 4))
    assert report.symmetries[0].check["train_exact"] < 1e-12
    assert model[0].weight.dtype == torch.float32


def test_rescale_filters_matches_loop_and_checks_shape():
    model, x, _, _ = _build("mixed")
    report = find_scale_symmetries(model, x)
    s = report.get("c2.weight")
    f = torch.tensor([0.5, 3.0], dtype=torch.float64)
    p2, _ = rescale_filters(dict(model.named_parameters()), {}, s, f)
    ref = _scale_loop(model, s.weight, s.axis, s.blocks, f)
    assert torch.equal(p2["c2.weight"], ref.c2.weight)
    with pytest.raises(ShapeError, match="expected 2 factors"):
        rescale_filters(dict(model.named_parameters()), {}, s, torch.ones(3))


def test_bad_input_gives_clear_errors():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
    with pytest.raises(ConfigError, match="nn.Module"):
        find_scale_symmetries(lambda x: x, torch.randn(4, 4))
    with pytest.raises(ShapeError, match="at least 2"):
        find_scale_symmetries(model, torch.randn(1, 4))
    with pytest.raises(ConfigError, match="example_input"):
        find_scale_symmetries(model, (3,))
    with pytest.raises(ShapeError, match="failed on example_input"):
        find_scale_symmetries(model, torch.randn(6, 7))


def test_block_structure_of_groupnorm_is_contiguous_groups():
    model, x, _, _ = _build("mixed")
    s = find_scale_symmetries(model, x).get("c2.weight")
    assert sorted(s.blocks) == [tuple(range(4)), tuple(range(4, 8))]
    assert s.channel_block().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert math.isclose(s.check["train_exact"], 0.0, abs_tol=1e-12)


def test_global_rng_state_is_left_unchanged():
    # dropout draws in the train-mode checks, and a zero filter sends one candidate down the
    # rejection path (a second train-mode pass looks for constant normalized groups)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Dropout(0.3), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)
    ).double()
    with torch.no_grad():
        model[4].weight[1].zero_()
    x = torch.randn(8, 5, dtype=torch.float64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    report = find_scale_symmetries(model, x)
    assert torch.equal(torch.get_rng_state(), before)
    assert [s.weight for s in report.symmetries] == ["0.weight"]
    assert "constant group" in report.rejected["4.weight"]
    # a torch.Generator is used as given (and advanced); the global state is still untouched
    g = torch.Generator().manual_seed(5)
    g_before = g.get_state()
    find_scale_symmetries(model, x, generator=g)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(g.get_state(), g_before)


def test_generator_seed_reproduces_and_bad_generator_is_a_config_error():
    model, x, _, _ = _build("mixed")
    a = find_scale_symmetries(model, x, generator=3).to_dict()
    assert a == find_scale_symmetries(model, x, generator=3).to_dict()
    # None means seed 0
    assert find_scale_symmetries(model, x).to_dict() == find_scale_symmetries(model, x, generator=0).to_dict()
    with pytest.raises(ConfigError, match="generator"):
        find_scale_symmetries(model, x, generator="seed")


@pytest.mark.parametrize(
    "build,shape,found",
    [
        (lambda: __import__("symgen.models", fromlist=["x"]).resnet20(), (3, 3, 8, 8), True),
        (
            lambda: __import__("symgen.models", fromlist=["x"]).vit(
                image_size=8, patch_size=4, dim=16, depth=2, heads=2, dropout=0.1
            ),
            (3, 3, 8, 8),
            False,
        ),
    ],
)
def test_shared_reference_passes_give_the_verdicts_of_per_candidate_passes(build, shape, found, monkeypatch):
    """Candidates share the passes at the unchanged weights (issue 13 section 3): the report, every check
    value included, equals the one where each candidate runs its own reference passes."""
    import symgen.symmetry as symmetry_pkg

    monkeypatch.setattr(symmetry_pkg, "_GROUP_CONFIRMATION", False)  # one candidate per check on both sides
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    shared = symmetry_pkg.find_scale_symmetries(model, x, generator=5)
    confirm = symmetry_pkg.confirm_one
    monkeypatch.setattr(symmetry_pkg, "confirm_one", lambda *a, **k: confirm(*a[:5]))  # refs=None: fresh passes
    alone = symmetry_pkg.find_scale_symmetries(model, x, generator=5)
    assert bool(shared.symmetries) == found  # ResNet: BatchNorm symmetries; pre-norm ViT: none (residual adds)
    assert [s.to_dict() for s in shared.symmetries] == [s.to_dict() for s in alone.symmetries]
    assert [s.check for s in shared.symmetries] == [s.check for s in alone.symmetries]
    assert (shared.not_invariant, shared.rejected, shared.unanalysed) == (
        alone.not_invariant,
        alone.rejected,
        alone.unanalysed,
    )


class _HiddenResidual(nn.Module):
    """Three BatchNorm candidates; fx cannot trace it (data-dependent branch), and the hook graph does not see
    the in-place residual add before ``bn2``: the middle candidate is predicted and then rejected numerically."""

    def __init__(self):
        super().__init__()
        self.lin1, self.bn1 = nn.Linear(5, 6), nn.BatchNorm1d(6)
        self.lin2, self.bn2 = nn.Linear(6, 4), nn.BatchNorm1d(4)
        self.lin3, self.bn3 = nn.Linear(4, 3), nn.BatchNorm1d(3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.lin1(x)))
        if float(x.sum()) > -1e9:
            g = self.lin2(h)
            g += h[:, :4].tanh()  # in place: the tensor keeps its identity, so the hooks see lin2 -> bn2
        return self.bn3(self.lin3(torch.relu(self.bn2(g))))


@pytest.mark.parametrize(
    "build,shape",
    [
        (lambda: __import__("symgen.models", fromlist=["x"]).resnet20(), (3, 3, 8, 8)),
        (
            lambda: __import__("symgen.models", fromlist=["x"]).ResNet((1, 1, 1, 1), (4, 4, 8, 8), 10, 3, "B"),
            (3, 3, 8, 8),
        ),
        (lambda: __import__("symgen.models", fromlist=["x"]).bn_cnn((1, 8, 8), 10, 4), (4, 1, 8, 8)),
        (lambda: __import__("symgen.models", fromlist=["x"]).bn_mlp((1, 6), 3, 5), (4, 1, 6)),
        (
            lambda: __import__("symgen.models", fromlist=["x"]).build_model("mixed", (1, 8, 8), width=6, channels=4),
            (4, 1, 8, 8),
        ),
        (
            lambda: __import__("symgen.models", fromlist=["x"]).vit(
                image_size=8, patch_size=4, dim=16, depth=1, heads=2
            ),
            (3, 3, 8, 8),
        ),
        (lambda: _HiddenResidual().double(), (6, 5)),
    ],
)
def test_grouped_confirmation_gives_the_verdicts_of_one_candidate_at_a_time(build, shape, monkeypatch):
    """Issue 13 section 3: candidates confirmed in groups (one pass per group, failing groups split) give the
    same symmetries, redundant biases and rejections as checking every candidate alone, on symgen.models."""
    import symgen.symmetry as symmetry_pkg

    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape, dtype=next(model.parameters()).dtype)
    calls: list[int] = []
    group = symmetry_pkg.confirm_group
    monkeypatch.setattr(
        symmetry_pkg, "confirm_group", lambda m, syms, *a: calls.append(len(syms)) or group(m, syms, *a)
    )
    grouped = symmetry_pkg.find_scale_symmetries(model, x, generator=3)
    monkeypatch.setattr(symmetry_pkg, "_GROUP_CONFIRMATION", False)
    alone = symmetry_pkg.find_scale_symmetries(model, x, generator=3)
    assert [s.to_dict() | {"check": None} for s in grouped.symmetries] == [
        s.to_dict() | {"check": None} for s in alone.symmetries
    ]
    assert grouped.redundant_biases == alone.redundant_biases
    assert (grouped.not_invariant, grouped.unanalysed) == (alone.not_invariant, alone.unanalysed)
    assert set(grouped.rejected) == set(alone.rejected)
    for s in grouped.symmetries:  # the group's check: the joint rescaling changes the output by round-off only
        assert s.check["train_exact"] < 1e-10 and s.check["eval_exact"] < 1e-10
    if len(alone.symmetries) + len(alone.rejected) > 1:
        assert calls and calls[0] > 1  # really one pass for several candidates
    if isinstance(model, _HiddenResidual):
        assert [s.weight for s in grouped.symmetries] == ["lin1.weight", "lin3.weight"]
        # isolated by splitting, then checked alone (other random factors than the one-at-a-time run)
        assert (
            grouped.rejected["lin2.weight"].split("(relative")[0] == alone.rejected["lin2.weight"].split("(relative")[0]
        )
        assert calls == [3, 2]  # 3 fail together; halves [lin1] and [lin2, lin3], which fails: [lin2], [lin3]


def test_reasons_name_modules_and_operations_not_fx_node_dumps():
    """Issue 14: no raw torch.fx node text (``%add : [num_users=1] = call_function[...]``) in the report."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.skip = nn.Sequential(nn.Linear(4, 4))
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.norm(self.inner(x) + self.skip(x)) * F.linear(x, torch.eye(4)) * self.scale

    report = find_scale_symmetries(Residual(), torch.randn(3, 4))
    text = report.summary() + " ".join(report.to_dict()["notes"])
    for bad in ("%", "call_function[", "num_users", "target="):
        assert bad not in text, text
    assert report.not_invariant["inner.weight"].startswith("add(inner, skip.0) in forward() adds a tensor")
