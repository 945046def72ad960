"""The base of every G-equivariant layer: f(rho_in(g) x) = rho_out(g) f(x) for all g, checked and exported.

An :class:`EquivariantModule` names the group actions on its inputs and outputs (``in_action``,
``out_action``: :class:`symgen.groups.GroupAction` on the trailing dims), checks its equivariance
over every group element, and exports itself to plain ``torch.nn`` layers computing the same
outputs (for deployment, or for tools that know only ``nn.Linear`` / ``nn.Conv2d``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn

from symgen import rng
from symgen.errors import GroupActionError, ShapeError
from symgen.groups import GroupAction
from symgen.metrics.equivariance import orbit_outputs

__all__ = ["EquivariantModule", "plain_linear", "reshaped"]


class EquivariantModule(nn.Module):
    """A module with f(rho_in(g) x) = rho_out(g) f(x) for every g in G (arXiv 1602.07576).

    Subclasses set ``in_action`` / ``out_action`` (actions of one group on the trailing input and
    output dims) and implement :meth:`export` and :meth:`example_shape`.
    """

    in_action: GroupAction
    out_action: GroupAction

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one input (no batch dim) used when :meth:`check_equivariance` draws its own.

        Returns:
            The shape.
        """
        shape = getattr(self.in_action, "shape", None)
        if shape is None:
            raise NotImplementedError(f"{type(self).__name__} must define example_shape().")
        return tuple(shape)

    def example_input(self, batch_size: int = 2, generator: rng.Seed = None) -> Tensor:
        """A N(0, 1) batch (batch_size, *example_shape()) in the module's dtype and device.

        Args:
            batch_size: the batch size.
            generator: a seed or a ``torch.Generator``.

        Returns:
            The batch.
        """
        ref: Tensor | None = next(iter(self.parameters()), None)
        if ref is None:
            ref = next(iter(self.buffers()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        return rng.randn((batch_size, *self.example_shape()), rng.as_generator(generator), dtype=dtype, device=device)

    def check_equivariance(self, x: Tensor | None = None, atol: float | None = None) -> float:
        """max_g max |f(rho_in(g) x) - rho_out(g) f(x)| over ALL group elements; raises if above ``atol``.

        Args:
            x: a batch of inputs (default: :meth:`example_input`).
            atol: the tolerance (default 1e3 eps(dtype) (1 + max|f(x)|)).

        Returns:
            The largest error.

        Raises:
            GroupActionError: the error exceeds ``atol`` (naming the worst element).
        """
        with torch.no_grad():
            x = self.example_input() if x is None else x
            out = orbit_outputs(self, self.in_action, x)  # f(rho_in(g) x) for every g: (|G|, B, ...)
            y = out[0]  # g = 0 is the identity
            err = (out - self.out_action.orbit(y)).abs().flatten(1).amax(1)
            err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)  # NaN counts as worst
            worst_g = int(err.argmax())
            worst = float(err[worst_g])
            scale = float(y.abs().max()) if y.numel() else 0.0
            eps = torch.finfo(y.dtype).eps if y.is_floating_point() else 0.0
            tol = 1e3 * eps * (1.0 + scale) if atol is None else float(atol)
        if not worst <= tol:
            raise GroupActionError(
                f"{type(self).__name__} is not equivariant: group element {worst_g} of {self.in_action.order} gives "
                f"max |f(rho_in(g) x) - rho_out(g) f(x)| = {worst:.3e} > atol = {tol:.1e} (max |f(x)| = {scale:.3e}). "
                "A weight or index buffer was changed outside the equivariant parameterization, or the layer "
                "was built for another action."
            )
        return worst

    def export(self) -> nn.Module:
        """Plain torch layers (``nn.Linear`` / ``nn.Conv2d`` / ``nn.Sequential``) with the same outputs.

        Returns:
            The plain module.
        """
        raise NotImplementedError


def plain_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``.

    Args:
        weight: (d_out, d_in).
        bias: (d_out,) or None.

    Returns:
        The layer.
    """
    w = weight.detach()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin


def reshaped(layer: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> nn.Module:
    """``layer`` on flat vectors, wrapped to map (..., *in_shape) -> (..., *out_shape).

    Args:
        layer: a layer on flat vectors.
        in_shape: the input's trailing shape (non-empty).
        out_shape: the output's trailing shape; () drops a size-1 dim.

    Returns:
        ``layer`` itself, or an ``nn.Sequential`` with (un)flattening.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if not in_shape:
        raise ShapeError("reshaped() needs at least one input dim.")
    layers: list[nn.Module] = []
    if len(in_shape) > 1:
        layers.append(nn.Flatten(-len(in_shape)))
    layers.append(layer)
    if not out_shape:
        layers.append(nn.Flatten(-2))
    elif len(out_shape) > 1:
        layers.append(nn.Unflatten(-1, out_shape))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def normal_init(shape: Sequence[int], generator: rng.Seed) -> Tensor:
    """float64 N(0, 1) initial weights on the generator's device (None: the global generator, as torch.nn).

    Args:
        shape: shape of the weight tensor.
        generator: a seed or a ``torch.Generator`` (None: torch's global generator, as ``torch.nn`` layers).

    Returns:
        a float64 tensor of i.i.d. standard normal entries.
    """
    return rng.randn(tuple(shape), rng.init_generator(generator), dtype=torch.float64)


def check_trailing_shape(x: Tensor, shape: tuple[int, ...], layer: str) -> None:
    """Raise a :class:`ShapeError` unless the trailing dims of ``x`` equal ``shape``.

    Args:
        x: the layer's input, ``(..., *shape)``.
        shape: the trailing dims the layer's representation acts on.
        layer: the layer's name, for the message.
    """
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        raise ShapeError(
            f"{layer} expects inputs of shape (..., {', '.join(map(str, shape))}); got "
            f"{tuple(x.shape)}. The trailing dims must match the representation the layer was built for."
        )


class FactoryKwargs(TypedDict):
    """The ``device`` and ``dtype`` keyword arguments of a layer's tensors (``Tensor.to(**kw)``)."""

    device: torch.device | str | None
    dtype: torch.dtype


def factory_kwargs(device: torch.device | str | None, dtype: torch.dtype | None) -> FactoryKwargs:
    """The ``device`` and ``dtype`` a layer builds its tensors with (dtype None: torch's default dtype).

    Args:
        device: where the tensors live (None: torch's default device).
        dtype: their dtype (None: ``torch.get_default_dtype()``).

    Returns:
        ``{"device": device, "dtype": dtype}``.
    """
    return {"device": device, "dtype": dtype or torch.get_default_dtype()}
