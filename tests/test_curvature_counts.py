"""Counts mean one thing each: num_probes (probe vectors) and num_matvecs (operator products); a count below an
estimator's minimum raises a ConfigError naming the minimum, never a silent increase. Checked on a dense matrix
whose trace is known exactly."""

import math
import warnings

import pytest
import torch

from symgen.curvature import MatrixOperator, deflated_trace, hutchinson_trace, hutchpp_trace
from symgen.errors import ConfigError

D = torch.float64


def _op(n: int = 30) -> MatrixOperator:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    vals = torch.cat([torch.tensor([50.0, 20.0], dtype=D), torch.rand(n - 2, generator=g, dtype=D)])
    return MatrixOperator((Q * vals) @ Q.T)


def test_each_estimator_spends_exactly_the_count_it_is_given():
    op = _op()
    exact = float(torch.trace(op.matrix))
    for est, want in (
        (hutchinson_trace(op, 7, generator=1), 7),
        (hutchpp_trace(op, 4, generator=1), 4),  # the minimum: 1 sketch, 1 for A Q, 2 probes
        (hutchpp_trace(op, 13, generator=1), 13),
        (deflated_trace(op, 3, generator=1), 3),  # the minimum: 1 Lanczos step, 2 probes
        (deflated_trace(op, 12, deflation_steps=4, generator=1), 12),
        (op.trace(9, 1, method="hutch++"), 9),
        (op.trace(5, 1, method="deflated"), 5),
    ):
        assert est.num_matvecs == want
        if want >= 9:  # a few probes give a standard error of its own standard error: check the larger budgets
            assert abs(est.value - exact) <= 6 * est.stderr + 1e-9 * abs(exact)
    before = op.num_matvecs
    op.trace(6, 2)
    assert op.num_matvecs - before == 6  # Hutchinson: one product per probe


@pytest.mark.parametrize(
    "call, minimum",
    [
        (lambda op: op.trace(0), 1),
        (lambda op: hutchinson_trace(op, 0), 1),
        (lambda op: op.trace(3, method="hutch++"), 4),
        (lambda op: hutchpp_trace(op, 3), 4),
        (lambda op: op.trace(2, method="deflated"), 3),
        (lambda op: deflated_trace(op, 2), 3),
        (lambda op: deflated_trace(op, 10, block_size=1, rtol=0.1), 2),
    ],
)
def test_too_small_counts_raise_with_the_minimum_and_why(call, minimum):
    op = _op()
    with pytest.raises(ConfigError, match=f">= {minimum}") as info:
        call(op)
    assert minimum == 1 or "standard error" in str(info.value)
    assert op.num_matvecs == 0  # refused before any product


def test_deflated_budget_below_its_lanczos_steps_raises_unless_the_steps_span_the_space():
    op = _op(30)
    with pytest.raises(ConfigError, match=r"num_matvecs = 5 .* >= 12"):
        deflated_trace(op, 5, deflation_steps=10)
    assert op.num_matvecs == 0
    # j = n: the whole space, the exact trace, no probes needed
    est = deflated_trace(op, 5, deflation_steps=30)
    assert est.stderr == 0.0 and est.num_matvecs == 30
    assert math.isclose(est.value, float(torch.trace(op.matrix)), rel_tol=1e-10)


def test_old_keyword_num_probes_of_op_trace_still_works_with_a_deprecation_warning():
    op = _op()
    with pytest.warns(DeprecationWarning, match="num_matvecs"):
        old = op.trace(num_probes=20, generator=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = op.trace(num_matvecs=20, generator=3)
    assert old.value == new.value and old.num_matvecs == new.num_matvecs == 20
    with pytest.raises(TypeError, match="num_prob"):
        op.trace(num_probs=20)
