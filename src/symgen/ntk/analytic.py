"""Infinite-width NNGP and NTK of fully-connected nets in NTK parameterization, and the finite nets they describe.

The kernels equal neural-tangents' ``stax`` kernels of
``stax.serial(*[Dense(W_std, b_std), act()] * depth, Dense(W_std, b_std))`` with the input
covariance ``x . x' / d``. Gradients with respect to the inputs are finite everywhere, including
``x = x'`` where the arc-cosine kernel's derivative is infinite (KIP and attacks differentiate
through these kernels). Sources: Jacot et al. arXiv 1806.07572; Lee et al. arXiv 1902.06720;
Novak et al. (neural-tangents) arXiv 1912.02803; Kempe et al. arXiv 2307.02693.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from symgen.errors import ConfigError, DivergenceError, ShapeError
from symgen.numerics import first_bad_row
from symgen.rng import Seed, init_generator

__all__ = ["ACTIVATIONS", "analytic_ntk", "NTKLinear", "Erf", "ntk_mlp"]

ACTIVATIONS = ("relu", "erf", "identity")
_BLOCK_ENTRIES = 1 << 18


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of shape (N, ...), got {type(x).__name__}.")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(f"{name} must have shape (N, ...) with N >= 1, got {tuple(x.shape)}.")
    check_finite_input(x, name, "analytic_ntk")
    return x.reshape(x.shape[0], -1)


def check_finite_input(x: Tensor, name: str, where: str) -> None:
    """Raise a DivergenceError naming ``name`` and the batch index of its first sample with NaN or inf."""
    i = first_bad_row(x)
    if i is not None:
        raise DivergenceError(f"{where}: the input {name} at batch index {i} holds non-finite values (NaN or inf).")


def _relu_dense(
    c11: Tensor, c12: Tensor, c22: Tensor, ntk: Tensor, w2: float, b2: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ReLU then Dense, via the Cho & Saul arc-cosine kernels ("Kernel methods for deep learning", NeurIPS 2009).

    ``E[relu(u) relu(v)] = (sqrt(c11 c22 - c12^2) + (pi - arccos rho) c12) / (2 pi)`` and
    ``E[relu'(u) relu'(v)] = (pi - arccos rho) / (2 pi)``, rho = c12 / sqrt(c11 c22), followed by
    ``K <- w2 K + b2, Theta <- K + w2 Theta``. rho is clamped to [-1 + 2 eps, 1 - 2 eps], which changes
    values by O(eps) but keeps every derivative finite (arccos' is infinite at |rho| = 1, e.g. for
    x = x'; the clamp passes zero gradient there); c11 c22 is clamped at the smallest normal number
    (a zero input without bias). Fused ops: ~17 elementwise passes per layer.
    """
    finfo = torch.finfo(c12.dtype)
    prod = c11[:, None] * c22[None, :]
    inv_norm = torch.rsqrt(prod.clamp(min=finfo.tiny))
    edge = 1.0 - 2.0 * finfo.eps
    rho = (c12 * inv_norm).clamp(-edge, edge)
    j0 = math.pi - torch.arccos(rho)
    sin = torch.sqrt((1.0 - rho) * (1.0 + rho))
    scale = w2 * 0.5 / math.pi
    nngp = torch.addcmul((prod * inv_norm) * sin, j0, c12).mul_(scale).add_(b2)
    ntk = torch.addcmul(nngp, ntk, j0, value=scale)
    return w2 * c11 / 2.0 + b2, nngp, w2 * c22 / 2.0 + b2, ntk


def _erf(c11: Tensor, c12: Tensor, c22: Tensor, ntk: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # E[erf(u) erf(v)] = (2/pi) arcsin(2 c12 / sqrt((1+2c11)(1+2c22)));
    # E[erf'(u) erf'(v)] = (4/pi) / sqrt((1+2c11)(1+2c22) - 4 c12^2)   (the root is >= 1: no singularity).
    prod = (1.0 + 2.0 * c11[:, None]) * (1.0 + 2.0 * c22[None, :])
    root = torch.sqrt((prod - 4.0 * c12 * c12).clamp(min=1.0))
    nngp = (2.0 / math.pi) * torch.atan2(2.0 * c12, root)
    dot = (4.0 / math.pi) / root

    def diag(c: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan2(c, torch.sqrt(c + 0.25))

    return diag(c11), nngp, diag(c22), ntk * dot


def analytic_ntk(
    x1: Tensor,
    x2: Tensor | None = None,
    depth: int = 1,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Infinite-width ``(nngp, ntk)``, each (N1, N2), of ``[Dense, act] * depth + Dense`` (NTK param.).

    Recursion: ``K <- W^2 K + b^2, Theta <- K + W^2 Theta`` per Dense (``K0 = x.x'/d``, ``Theta0 = 0``);
    ``K <- E[act(u) act(v)], Theta <- Theta * E[act'(u) act'(v)]`` per activation (arXiv 1806.07572).

    ``x1``: (N1, ...), ``x2``: (N2, ...) or None (= x1); inputs are flattened to d features.
    ``activation``: "relu" (arc-cosine kernels), "erf" or "identity". ``dtype``: compute and return
    in this dtype (e.g. ``torch.float64``); default the inputs' floating dtype.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ConfigError(f"depth (number of hidden layers) must be an int >= 0, got {depth!r}.")
    if weight_std < 0 or bias_std < 0:
        raise ConfigError(f"weight_std and bias_std must be >= 0, got {weight_std}, {bias_std}.")
    a = _as_matrix(x1, "x1")
    b = a if x2 is None else _as_matrix(x2, "x2")
    if a.shape[1] != b.shape[1]:
        raise ShapeError(
            f"x1 and x2 must have the same number of features; got {a.shape[1]} and "
            f"{b.shape[1]} (shapes {tuple(x1.shape)} and {tuple((b if x2 is None else x2).shape)})."
        )
    if dtype is None:
        dtype = a.dtype if a.is_floating_point() else torch.get_default_dtype()
    a, b = a.to(dtype), b.to(dtype)
    d = a.shape[1]
    w2, b2 = float(weight_std) ** 2, float(bias_std) ** 2
    act: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = {
        "relu": _relu_dense,
        "erf": _erf,
        "identity": None,
    }[activation]
    c11_all = w2 * (a * a).sum(-1) / d + b2
    c22_0 = w2 * (b * b).sum(-1) / d + b2

    def block(rows: slice) -> tuple[Tensor, Tensor]:
        c11, c22 = c11_all[rows], c22_0
        c12 = (w2 / d) * (a[rows] @ b.T) + b2
        ntk = c12
        for _ in range(depth):
            if act is _relu_dense:
                c11, c12, c22, ntk = _relu_dense(c11, c12, c22, ntk, w2, b2)
                continue
            if act is not None:
                c11, c12, c22, ntk = act(c11, c12, c22, ntk)
            c11, c12, c22 = w2 * c11 + b2, w2 * c12 + b2, w2 * c22 + b2
            ntk = torch.add(c12, ntk, alpha=w2)
        return c12, ntk

    # Row blocks of ~256K entries: the ~20 elementwise passes per layer then run in cache instead of
    # streaming (and page-faulting) full N1 x N2 temporaries; 3-6x faster at 1000 x 1000.
    step = max(1, _BLOCK_ENTRIES // max(1, b.shape[0]))
    if step >= a.shape[0]:
        return block(slice(None))
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        parts = [block(slice(i, i + step)) for i in range(0, a.shape[0], step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    nngp = torch.empty(a.shape[0], b.shape[0], dtype=dtype, device=a.device)
    ntk = torch.empty_like(nngp)
    for i in range(0, a.shape[0], step):  # no autograd: write blocks in place, no concatenation
        nngp[i : i + step], ntk[i : i + step] = block(slice(i, i + step))
    return nngp, ntk


class NTKLinear(nn.Module):
    """Dense layer in NTK parameterization: ``y = (weight_std / sqrt(fan_in)) W x + bias_std b``, W, b ~ N(0, 1).

    Its infinite-width kernels are neural-tangents' ``stax.Dense(W_std, b_std)`` (arXiv 1806.07572).
    ``bias_std == 0`` means no bias parameter (as ``Dense(b_std=None)``). Initial W, b from
    ``generator`` (a seed or a ``torch.Generator``; None: the global generator, as torch.nn).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_std: float = 1.0,
        bias_std: float = 0.0,
        *,
        generator: Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"NTKLinear needs in_features, out_features >= 1, got {in_features}, {out_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.weight_std, self.bias_std = float(weight_std), float(bias_std)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if self.bias_std != 0.0:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator)

    @property
    def weight_scale(self) -> float:
        """weight_std / sqrt(in_features): the NTK parameterization's weight factor."""
        return self.weight_std / math.sqrt(self.in_features)

    @property
    def bias_scale(self) -> float:
        """bias_std: the NTK parameterization's bias factor."""
        return self.bias_std

    def reset_parameters(self, generator: Seed = None) -> None:
        """W, b ~ N(0, 1), drawn on the generator's device.

        Args:
            generator: a seed, a ``torch.Generator``, or None (the global one).
        """
        g = init_generator(generator)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=g, dtype=self.weight.dtype, device=g.device))
            if self.bias is not None:
                self.bias.copy_(torch.randn(self.bias.shape, generator=g, dtype=self.bias.dtype, device=g.device))

    def forward(self, x: Tensor) -> Tensor:
        # Scale the (batch x out) product, not the (out x in) weight: cheaper for wide layers.
        """y = (weight_std / sqrt(in)) W x + bias_std b (Jacot et al. arXiv 1806.07572).

        Args:
            x: inputs (..., in_features).

        Returns:
            outputs (..., out_features).
        """
        y = F.linear(x, self.weight) * self.weight_scale
        return y if self.bias is None else y + self.bias * self.bias_scale

    def extra_repr(self) -> str:
        """The layer's sizes and scales, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std}, bias_std={self.bias_std}"
        )


class Erf(nn.Module):
    """Elementwise ``erf`` activation (neural-tangents' ``stax.Erf()``)."""

    def forward(self, x: Tensor) -> Tensor:
        """erf(x) elementwise.

        Args:
            x: any tensor.

        Returns:
            erf(x).
        """
        return torch.erf(x)


def ntk_mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int = 1,
    activation: str = "relu",
    weight_std: float = 1.0,
    bias_std: float = 0.0,
    *,
    generator: Seed = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """The finite net ``Flatten, [NTKLinear, act] * depth, NTKLinear`` whose width -> inf kernels are :func:`analytic_ntk`.

    Randomness: ``generator``, a seed or a ``torch.Generator`` (None: the global one, as torch.nn), shared by the layers.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    if depth < 0 or width < 1:
        raise ConfigError(f"ntk_mlp needs depth >= 0 and width >= 1, got depth={depth}, width={width}.")
    generator = init_generator(generator)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers.append(NTKLinear(fan_in, width, weight_std, bias_std, generator=generator, dtype=dtype))
        layers.append({"relu": nn.ReLU, "erf": Erf, "identity": nn.Identity}[activation]())
        fan_in = width
    layers.append(NTKLinear(fan_in, out_features, weight_std, bias_std, generator=generator, dtype=dtype))
    return nn.Sequential(*layers).to(device=device)
