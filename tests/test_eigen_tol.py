"""eigenpairs(k, tol): the default residual rule stops at the first step its bound allows, and the bound it returns
holds (against dense eigvalsh) on adversarial spectra: clustered, a tiny gap, a missed eigenvalue."""

import pytest
import torch

from symgen.curvature import MatrixOperator
from symgen.curvature.lanczos import lanczos_eigenpairs


def _matrix(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=g, dtype=torch.float64))
    A = Q @ torch.diag(eigs.double()) @ Q.T
    return 0.5 * (A + A.T)


def _spectra(n: int = 300) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bulk = torch.rand(n, generator=g, dtype=torch.float64)
    return {
        # a cluster at the top: five eigenvalues within 1e-4 relative
        "clustered": torch.cat([10 + 1e-3 * torch.rand(5, generator=g, dtype=torch.float64), bulk[5:]]),
        # a tiny gap between the two largest
        "tiny gap": torch.cat([torch.tensor([10.0, 10.0 - 1e-5], dtype=torch.float64), bulk[2:]]),
        # well separated outliers over a bulk of both signs (a network Hessian's shape)
        "outliers": torch.cat([torch.tensor([50.0, 20.0, 8.0], dtype=torch.float64), bulk[3:] - 0.5]),
        # slow geometric decay: many steps
        "decay": 0.97 ** torch.arange(n, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_spectra()))
@pytest.mark.parametrize("k,which", [(1, "largest"), (3, "largest"), (2, "smallest")])
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-6])
def test_residual_bound_holds_and_stops_at_the_first_step_it_allows(name, k, which, tol):
    eigs = _spectra()[name]
    A = _matrix(eigs, seed=1)
    exact = torch.linalg.eigvalsh(A)
    op = MatrixOperator(A)
    pairs = lanczos_eigenpairs(op, k, which, tol=tol, max_steps=300, generator=2)
    assert pairs.converged
    theta = pairs.values.double()
    bounds = pairs.error_bounds.double()
    # the bound carried is the one the rule used: r_i, and it meets tol relative
    torch.testing.assert_close(bounds, pairs.residuals.double().clamp_min(float(bounds.min())), rtol=0, atol=0)
    assert bool((pairs.relative_error_bounds <= tol).all())
    # Weyl/Kahan: an eigenvalue of A within r_i of each theta_i (some eigenvalue, no gap assumption)
    dist = (theta[:, None] - exact[None, :]).abs().min(1).values
    assert bool((dist <= bounds * (1 + 1e-8) + 1e-12).all()), (dist, bounds)
    # no wasted step: one step fewer does not meet the rule
    if pairs.num_matvecs > k:
        fewer = lanczos_eigenpairs(op, k, which, tol=tol, max_steps=pairs.num_matvecs - 1, generator=2)
        assert not fewer.converged


def test_a_missed_eigenvalue_keeps_the_bound_true_for_the_eigenvalue_found():
    """A start vector orthogonal to the top eigenvector never sees it (exact arithmetic aside): the residual bound
    still holds for the eigenvalue theta approximates (lambda_2), which is all a Krylov bound can say; the pairing
    with lambda_1 is the assumption every Krylov method makes."""
    eigs = torch.cat([torch.tensor([5.0, 3.0], dtype=torch.float64), torch.linspace(-1, 1, 98, dtype=torch.float64)])
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(eigs) @ Q.T
    A = 0.5 * (A + A.T)
    start = torch.randn(100, generator=g, dtype=torch.float64)
    start -= (start @ Q[:, 0]) * Q[:, 0]
    pairs = lanczos_eigenpairs(MatrixOperator(A), 1, tol=1e-6, max_steps=20, start=start)
    assert pairs.converged
    theta, bound = float(pairs.values[0]), float(pairs.error_bounds[0])
    assert abs(theta - 3.0) <= bound + 1e-12
    assert abs(theta - 5.0) > 1.0
