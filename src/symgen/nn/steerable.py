"""Linear steerable networks: products of G-equivariant linear maps, f(x) = <beta, x> with beta in Fix(rho).

Source: Chen & Zhu, "Implicit bias of linear equivariant steerable networks", arXiv 2303.04198.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from symgen import rng
from symgen.errors import ShapeError
from symgen.groups import GroupAction, Representation
from symgen.nn.base import EquivariantModule, check_trailing_shape
from symgen.nn.linear import EquivariantLinear, GroupLinear, InvariantReadout, LiftingLinear

__all__ = ["LinearSteerableNet"]


class LinearSteerableNet(EquivariantModule):
    """f(x) = <beta, x>, a product of G-equivariant linear maps without nonlinearity or bias.

    beta lies in Fix(rho_0) by construction. Source: Chen & Zhu, arXiv 2303.04198.

    Args:
        action: the group action rho_0 on inputs.
        shape: one input's shape.
        depth: 1: one invariant linear map (rho_0 -> trivial); L >= 2: lifting to ``width`` regular
            copies, L-2 group convolutions, invariant readout.
        width: the number of regular copies.
        generator: a seed or a ``torch.Generator`` for all layers' initial weights (one stream).
        device: where the parameters go.
        dtype: their dtype.
    """

    def __init__(
        self,
        action: GroupAction,
        shape: Sequence[int],
        depth: int = 2,
        width: int = 8,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ShapeError(f"LinearSteerableNet needs depth >= 1 and width >= 1; got depth={depth}, width={width}.")
        self.shape = tuple(int(s) for s in shape)
        self.rep = Representation.from_action(action, self.shape)
        self.group = action.group  # = self.rep.group
        self.depth, self.width = int(depth), int(width)
        self.in_action = self.rep.action(self.shape)
        self.out_action = Representation.trivial(self.group).action(())
        # One generator for all layers, so a seed gives each layer its own part of one stream.
        g = rng.init_generator(generator)
        if depth == 1:
            layers: list[nn.Module] = [
                EquivariantLinear(
                    self.rep, Representation.trivial(self.group), bias=False, generator=g, device=device, dtype=dtype
                )
            ]
        else:
            layers = [
                LiftingLinear(self.rep, width, in_shape=self.shape, bias=False, generator=g, device=device, dtype=dtype)
            ]
            layers += [
                GroupLinear(self.group, width, width, bias=False, generator=g, device=device, dtype=dtype)
                for _ in range(depth - 2)
            ]
            layers += [InvariantReadout(self.group, width, 1, bias=False, generator=g, device=device, dtype=dtype)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        """f(x) = <beta, x>: the layers applied in turn, no nonlinearity.

        Args:
            x: inputs (..., *shape).

        Returns:
            outputs (...).
        """
        check_trailing_shape(x, self.shape, "LinearSteerableNet")
        h = x.reshape(*x.shape[: x.ndim - len(self.shape)], -1) if self.depth == 1 else x
        for layer in self.layers:
            h = layer(h)
        return h.squeeze(-1)

    def predictor(self) -> Tensor:
        """The end-to-end beta with f(x) = <beta, x>, by evaluating f on the unit vectors.

        Returns:
            beta, shaped like one input.
        """
        p = next(self.parameters())
        d = self.rep.dim
        eye = torch.eye(d, dtype=p.dtype, device=p.device).reshape(d, *self.shape)
        return self(eye).reshape(self.shape)

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one input, ``shape``.

        Returns:
            The shape.
        """
        return self.shape

    def _linears(self) -> list[nn.Linear]:
        """Every layer as an ``nn.Linear`` on flattened features, in order."""
        maps = (EquivariantLinear, LiftingLinear, GroupLinear, InvariantReadout)
        return [layer.as_linear() for layer in self.layers if isinstance(layer, maps)]

    def export(self) -> nn.Module:
        """The same factorization as plain ``nn.Linear`` layers on flattened features: (..., *shape) -> (...).

        Returns:
            The plain module.
        """
        flatten = [nn.Flatten(-len(self.shape))] if len(self.shape) > 1 else []
        return nn.Sequential(*flatten, *self._linears(), nn.Flatten(-2))
