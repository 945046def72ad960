"""Smoke test of the ``inductive-bias`` experiment (tiny config): claims computed and explained, figures written."""

from __future__ import annotations

import pytest

from symgen.errors import ConfigError
from symgen.experiments import get_experiment
from symgen.experiments.base import Context, build_config
from symgen.experiments.inductive_bias import EXPERIMENT, Config


def test_inductive_bias_tiny(tmp_path):
    assert get_experiment("inductive-bias") is EXPERIMENT
    cfg = build_config(
        Config,
        quick=EXPERIMENT.quick,
        dims=[4, 8],
        student_filters=[2, 3],
        train_sizes=[8, 16, 32],
        fit_min=16,
        num_test=20,
        num_draws=2,
    )
    result = EXPERIMENT.run(cfg, Context())
    claims = EXPERIMENT.check_claims(cfg, result)
    assert [c.id for c in claims] == ["C4.5-local", "C4.5-fc", "C4.5-gap"]
    for c in claims:
        assert (c.note == "") == c.passed
    assert {k for k in claims[1].measured if isinstance(k, int)} == {4, 8}
    assert claims[0].measured["predicted"] == {"local_s2": 0.5, "local_s3": pytest.approx(1 / 3)}
    # headline numbers and the paper's predictions beside them (arXiv 2106.08619: beta = 1/s local, 1/d FC)
    assert claims[0].paper == pytest.approx(0.5 - 1 / 3) and claims[0].headline == "beta_s2_minus_s3_at_d8"
    beta = {k: claims[0].measured[f"local_s{k}"][8]["beta"] for k in (2, 3)}
    assert claims[0].measured[claims[0].headline] == pytest.approx(beta[2] - beta[3])
    assert claims[1].paper == pytest.approx(1 / 4 - 1 / 8)
    assert claims[1].measured["beta_drop"] == pytest.approx(
        claims[1].measured[4]["beta"] - claims[1].measured[8]["beta"]
    )
    assert claims[2].paper == pytest.approx(1 / 3 - 1 / 8) and claims[2].headline == "s3.gap"
    from symgen.terminal import claim_headline

    for c in claims:
        h = claim_headline(c.model_dump())
        assert h["measured"] is not None and h["paper"] == c.paper
    # the exponent is fitted on P >= fit_min only; the whole curve is kept for the figures
    curve = result["by_d"]["8"]["fc"]
    assert curve["sizes"] == [8, 16, 32] and curve["fit_sizes"] == [16, 32] and len(curve["errors"]) == 2
    from symgen.ntk import fit_power_law

    assert curve["beta"] == pytest.approx(fit_power_law([16, 32], [e[1:] for e in curve["errors"]])[0])
    paths = EXPERIMENT.figures(result, tmp_path)
    assert all(p.exists() for p in paths) and len(paths) == 2


def test_inductive_bias_config_errors():
    with pytest.raises(ConfigError, match="teacher_filter"):
        build_config(Config, student_filters=[1], teacher_filter=2)
    with pytest.raises(ConfigError, match="fit in the smallest"):
        build_config(Config, student_filters=[16], dims=[8, 16])
    with pytest.raises(ConfigError, match="fit_min"):
        build_config(Config, train_sizes=[64, 128, 256], fit_min=256)
    assert EXPERIMENT.quick["train_sizes"][-1] == 4096 and build_config(Config).train_sizes[-1] == 16384


def _brute_laplace(x: list[float], y: list[float], s: int | None) -> float:
    """The kernel entry from its definition, pair by pair in plain Python (s None: fully connected)."""
    import math

    d = len(x)
    if s is None:
        return math.exp(-math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y, strict=True))))
    total = 0.0
    for p in range(d):  # the d circular windows of s adjacent pixels
        r = math.sqrt(sum((x[(p + k) % d] - y[(p + k) % d]) ** 2 for k in range(s)))
        total += math.exp(-r / s)
    return total / d


@pytest.mark.parametrize("d", [1, 4, 7])
def test_patch_laplace_kernels_brute_force(d):
    import torch

    from symgen.experiments.inductive_bias_kernels import patch_laplace_kernels, uniform_cube

    g = torch.Generator().manual_seed(d)
    x, y = uniform_cube(9, d, g), uniform_cube(5, d, g)
    assert float(x.min()) >= 0 and float(x.max()) < 1 and x.dtype == torch.float64
    filters = sorted({1, min(2, d), d})
    # tiny blocks: several row blocks, the symmetric mirror included
    cross = patch_laplace_kernels(x, y, filters, block_entries=3 * d)
    sym = patch_laplace_kernels(x, None, filters, block_entries=2 * 9 * d)
    for name, s in [("fc", None)] + [(f"local_s{f}", f) for f in filters]:
        want = torch.tensor([[_brute_laplace(a.tolist(), b.tolist(), s) for b in y] for a in x], dtype=torch.float64)
        torch.testing.assert_close(cross[name], want, rtol=1e-13, atol=1e-13)
        want_sym = torch.tensor(
            [[_brute_laplace(a.tolist(), b.tolist(), s) for b in x] for a in x], dtype=torch.float64
        )
        torch.testing.assert_close(sym[name], want_sym, rtol=1e-13, atol=1e-13)
        assert torch.equal(sym[name], sym[name].T) and torch.all(sym[name].diagonal() == 1.0)
    # one window covering the ring: every window has all d pixels, so K_d = exp(-|x - y| / d)
    torch.testing.assert_close(cross[f"local_s{d}"], cross["fc"] ** (1.0 / d), rtol=1e-12, atol=1e-14)


def test_patch_laplace_kernels_errors():
    import torch

    from symgen.errors import ShapeError
    from symgen.experiments.inductive_bias_kernels import patch_laplace_kernels

    with pytest.raises(ConfigError, match="filter sizes"):
        patch_laplace_kernels(torch.zeros(2, 3), None, [4])
    with pytest.raises(ShapeError):
        patch_laplace_kernels(torch.zeros(2, 3), torch.zeros(2, 4), [2])


def test_patch_laplace_kernels_symmetric_matches_cross():
    """The symmetric call (upper tiles, mirrored in strips) against the cross call on the same points, which
    evaluates every entry; several strips, column pieces and row tiles, filter sizes with wrapped windows."""
    import torch

    from symgen.experiments.inductive_bias_kernels import patch_laplace_kernels, uniform_cube

    x = uniform_cube(150, 6, torch.Generator().manual_seed(3))
    for block_entries in (40 * 6, 400 * 6):
        sym = patch_laplace_kernels(x, None, [2, 3, 4], block_entries=block_entries)
        cross = patch_laplace_kernels(x, x, [2, 3, 4], block_entries=7 * 6)
        assert sorted(sym) == ["fc", "local_s2", "local_s3", "local_s4"]
        for name, k in sym.items():
            assert torch.equal(k, k.T) and torch.all(k.diagonal() == 1.0)
            torch.testing.assert_close(k, cross[name], rtol=1e-14, atol=0)
    # no points on a side: empty matrices
    assert patch_laplace_kernels(x[:0], None, [2])["fc"].shape == (0, 0)
    assert patch_laplace_kernels(x[:3], x[:0], [2])["local_s2"].shape == (3, 0)


@pytest.mark.parametrize("threads", [2, 3])
def test_patch_laplace_kernels_threads(threads):
    """Tiles shared out to threads (the caller's torch thread count) give the same bits as one thread, on
    several tiles of both calls, and match the brute force."""
    import torch

    from symgen.experiments.base import num_threads
    from symgen.experiments.inductive_bias_kernels import patch_laplace_kernels, uniform_cube

    g = torch.Generator().manual_seed(5)
    x, y = uniform_cube(40, 5, g), uniform_cube(11, 5, g)
    with num_threads(1):
        one = patch_laplace_kernels(x, None, [2, 4], block_entries=30 * 5)
        one_cross = patch_laplace_kernels(x, y, [2, 4], block_entries=30 * 5)
    with num_threads(threads):
        assert torch.get_num_threads() == threads
        many = patch_laplace_kernels(x, None, [2, 4], block_entries=30 * 5)
        many_cross = patch_laplace_kernels(x, y, [2, 4], block_entries=30 * 5)
    for name in one:
        assert torch.equal(one[name], many[name]) and torch.equal(one_cross[name], many_cross[name])
    want = torch.tensor([[_brute_laplace(a.tolist(), b.tolist(), 4) for b in y] for a in x], dtype=torch.float64)
    torch.testing.assert_close(many_cross["local_s4"], want, rtol=1e-13, atol=1e-13)
