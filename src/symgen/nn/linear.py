"""G-equivariant linear layers: the general commutant layer and the lifting / group / readout layers.

The general layer parameterizes the commutant {W : rho_out(g) W = W rho_in(g)} in an orthonormal
basis (``symgen.groups.commutant_basis``), or by weight sharing over orbits for permutation
representations. The regular-representation layers are the fully connected G-CNN layers.
Sources: Finzi, Welling & Wilson, arXiv 2104.09459; Cohen & Welling, arXiv 1602.07576.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen import rng
from symgen.errors import GroupActionError, ShapeError
from symgen.groups import FiniteGroup, GroupAction, Representation, commutant_basis, commutant_orbits, fixed_basis
from symgen.groups.representations import as_representation_pair
from symgen.nn.base import EquivariantModule, check_trailing_shape, factory_kwargs, normal_init, plain_linear, reshaped

__all__ = ["EquivariantLinear", "LiftingLinear", "GroupLinear", "InvariantReadout"]


class _RepresentationMap(EquivariantModule):
    """A linear equivariant map between representations: y = W x + b on (..., *in_shape) -> (..., *out_shape)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _set_representations(
        self, in_rep: Representation, out_rep: Representation, in_shape: Sequence[int], out_shape: Sequence[int]
    ) -> None:
        self.in_rep, self.out_rep = in_rep, out_rep
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.in_action, self.out_action = in_rep.action(self.in_shape), out_rep.action(self.out_shape)

    def weight_matrix(self) -> Tensor:
        """The dense matrix W (d_out, d_in) on flattened inputs and outputs."""
        raise NotImplementedError

    def bias_vector(self) -> Tensor | None:
        """The dense bias b (d_out,), or None."""
        raise NotImplementedError

    def as_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same map on flattened inputs and outputs."""
        return plain_linear(self.weight_matrix(), self.bias_vector())

    def export(self) -> nn.Module:
        """``nn.Linear`` (wrapped in Flatten / Unflatten where the event shapes have several dims)."""
        return reshaped(self.as_linear(), self.in_shape, self.out_shape)


class EquivariantLinear(_RepresentationMap):
    """y = W x + b with rho_out(g) W = W rho_in(g) and b in Fix(rho_out), W = sum_k theta_k B_k.

    Init: theta ~ N(0, d_out / k) so E||W||_F^2 = d_out, as for a layer with i.i.d. N(0, 1/d_in) entries.
    Source: arXiv 2104.09459 (equivariant MLPs), arXiv 1602.07576.

    Args:
        in_rep: the input representation (or its matrices).
        out_rep: the output representation (or its matrices).
        bias: learn a bias in Fix(rho_out).
        method: "dense" (orthonormal commutant basis by SVD), "orbit" (weight sharing over orbits on
            index pairs; both representations must be permutations) or "auto" (orbit when possible).
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    orbit_label: Tensor
    orbit_scale: Tensor
    basis: Tensor
    bias_basis: Tensor

    def __init__(
        self,
        in_rep: Representation | Tensor,
        out_rep: Representation | Tensor,
        bias: bool = True,
        *,
        method: str = "auto",
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_rep, out_rep = as_representation_pair(in_rep, out_rep)
        self._set_representations(in_rep, out_rep, (in_rep.dim,), (out_rep.dim,))
        if method not in ("auto", "dense", "orbit"):
            raise GroupActionError(f"method must be 'auto', 'dense' or 'orbit'; got '{method}'.")
        perm = self.in_rep.is_permutation and self.out_rep.is_permutation
        if method == "orbit" and not perm:
            raise GroupActionError("method='orbit' needs permutation representations on both sides; use 'dense'.")
        self.method = "orbit" if (method == "auto" and perm) else ("dense" if method == "auto" else method)
        fk = factory_kwargs(device, dtype)
        if self.method == "orbit":
            labels, sizes = commutant_orbits(self.in_rep, self.out_rep)
            self.register_buffer("orbit_label", labels.to(fk["device"]))
            self.register_buffer("orbit_scale", sizes.to(**fk).rsqrt())
            k = int(sizes.numel())
        else:
            basis = commutant_basis(self.in_rep, self.out_rep)
            self.register_buffer("basis", basis.to(**fk))
            k = int(basis.shape[0])
        self.num_basis = k
        std = math.sqrt(self.out_rep.dim / max(k, 1))
        self.weight = nn.Parameter(normal_init((k,), generator).to(**fk) * std)
        if bias:
            fb = fixed_basis(self.out_rep)
            self.register_buffer("bias_basis", fb.to(**fk))
            self.bias = nn.Parameter(torch.zeros(fb.shape[0], **fk))
        else:
            self.register_parameter("bias", None)

    def weight_matrix(self) -> Tensor:
        """The dense matrix W = sum_k w_k B_k on flattened inputs and outputs.

        Returns:
            (d_out, d_in).
        """
        d_in, d_out = self.in_rep.dim, self.out_rep.dim
        if self.method == "orbit":
            return (self.weight * self.orbit_scale)[self.orbit_label].reshape(d_out, d_in)
        return torch.einsum("k,koi->oi", self.weight, self.basis)

    def bias_vector(self) -> Tensor | None:
        """The dense bias b = sum_k c_k F_k in Fix(rho_out).

        Returns:
            (d_out,), or None.
        """
        return None if self.bias is None else self.bias @ self.bias_basis

    def forward(self, x: Tensor) -> Tensor:
        """y = W x + b.

        Args:
            x: inputs (..., d_in).

        Returns:
            outputs (..., d_out).
        """
        check_trailing_shape(x, (self.in_rep.dim,), "EquivariantLinear")
        return F.linear(x, self.weight_matrix(), self.bias_vector())

    def extra_repr(self) -> str:
        """The layer's sizes, number of basis elements and method.

        Returns:
            The text.
        """
        return f"{self.in_rep.dim} -> {self.out_rep.dim}, basis={self.num_basis}, method={self.method}"


class LiftingLinear(_RepresentationMap):
    """Lift an input representation to ``out_channels`` copies of the regular representation.

    y[o, g] = <psi_o, rho(g)^-1 x> = <rho(g^-1)^T psi_o, x>: one free filter psi_o per channel, shared
    over the orbit (for permutation rho the filter bank is a gather psi_o[perm[g]]). Output shape
    (..., out_channels, |G|); (L_h y)[o, g] = y[o, h^-1 g]. Source: arXiv 1602.07576, eq. (10).

    Args:
        in_rep: the input representation (with a group), or a group action with ``in_shape``.
        out_channels: the number of regular copies.
        in_shape: the input shape without batch (default (d,); needed for an action).
        bias: learn a bias.
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    filter_index: Tensor
    filter_maps: Tensor | None

    def __init__(
        self,
        in_rep: Representation | GroupAction,
        out_channels: int,
        *,
        in_shape: Sequence[int] | None = None,
        bias: bool = True,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_rep, Representation):
            if in_shape is None:
                raise ShapeError("LiftingLinear(action, ...) needs in_shape=(...) (the input shape without batch).")
            in_rep = Representation.from_action(in_rep, in_shape)
        if in_rep.group is None:
            raise GroupActionError(
                "LiftingLinear needs a representation with a group (its regular representation "
                "is indexed by the group's elements); pass group= to Representation."
            )
        self.group = in_rep.group
        d = in_rep.dim
        in_shape = tuple(int(s) for s in in_shape) if in_shape is not None else (d,)
        if math.prod(in_shape) != d:
            raise ShapeError(
                f"in_shape {in_shape} has {math.prod(in_shape)} entries; the representation has dimension {d}."
            )
        self.out_channels = int(out_channels)
        n = self.group.order
        self._set_representations(
            in_rep, Representation.regular(self.group).copies(self.out_channels), in_shape, (self.out_channels, n)
        )
        fk = factory_kwargs(device, dtype)
        if in_rep.permutations is not None:
            self.register_buffer("filter_index", in_rep.permutations.to(fk["device"]))
            self.filter_maps = None
        else:
            # rho(g^-1)^T acting on psi gives the filter of group element g.
            self.register_buffer("filter_maps", in_rep.inverse_matrices().transpose(1, 2).to(**fk))
        self.weight = nn.Parameter(normal_init((out_channels, d), generator).to(**fk) / math.sqrt(d))
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None

    def filters(self) -> Tensor:
        """The filter bank: row (o, g) is rho(g^-1)^T psi_o.

        Returns:
            (out_channels, |G|, d).
        """
        if self.filter_maps is None:
            return self.weight[:, self.filter_index]
        return torch.einsum("gij,oj->ogi", self.filter_maps, self.weight)

    def weight_matrix(self) -> Tensor:
        """The dense matrix: row (o, g) is rho(g^-1)^T psi_o.

        Returns:
            (out_channels |G|, d).
        """
        return self.filters().reshape(-1, self.in_rep.dim)

    def bias_vector(self) -> Tensor | None:
        """The bias b[o] repeated over the |G| positions of channel o.

        Returns:
            (out_channels |G|,), or None.
        """
        return None if self.bias is None else self.bias.repeat_interleave(self.group.order)

    def forward(self, x: Tensor) -> Tensor:
        """y[o, g] = <rho(g^-1)^T psi_o, x> + b[o].

        Args:
            x: inputs (..., *in_shape).

        Returns:
            outputs (..., out_channels, |G|).
        """
        check_trailing_shape(x, self.in_shape, "LiftingLinear")
        lead = x.shape[: x.ndim - len(self.in_shape)]
        flat = x.reshape(*lead, -1)
        out = flat @ self.filters().reshape(-1, self.in_rep.dim).T
        out = out.reshape(*lead, self.out_channels, self.group.order)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out

    def extra_repr(self) -> str:
        """The layer's input shape, channels and group order.

        Returns:
            The text.
        """
        return f"in_shape={self.in_shape}, out_channels={self.out_channels}, |G|={self.group.order}"


class GroupLinear(_RepresentationMap):
    """Group convolution between copies of the regular representation: y[o, g] = sum_{i,h} psi[o, i, g^-1 h] x[i, h].

    Input (..., in_channels, |G|), output (..., out_channels, |G|); c_out c_in |G| parameters = the
    number of orbits of G on index pairs. Source: arXiv 1602.07576, eq. (11).

    Args:
        group: G.
        in_channels: c_in.
        out_channels: c_out.
        bias: learn a bias.
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    kernel_index: Tensor

    def __init__(
        self,
        group: FiniteGroup,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        n = group.order
        reg = Representation.regular(group)
        self._set_representations(
            reg.copies(self.in_channels), reg.copies(self.out_channels), (self.in_channels, n), (self.out_channels, n)
        )
        fk = factory_kwargs(device, dtype)
        self.register_buffer("kernel_index", group.table[group.inverses].to(fk["device"]))  # [g, h] -> g^-1 h
        self.weight = nn.Parameter(
            normal_init((out_channels, in_channels, n), generator).to(**fk) / math.sqrt(in_channels * n)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None

    def weight_matrix(self) -> Tensor:
        """Dense matrix with rows (o, g) and columns (i, h).

        Returns:
            (c_out |G|, c_in |G|).
        """
        w = self.weight[:, :, self.kernel_index]  # (o, i, g, h)
        n = self.group.order
        return w.permute(0, 2, 1, 3).reshape(self.out_channels * n, self.in_channels * n)

    def bias_vector(self) -> Tensor | None:
        """The bias b[o] repeated over the |G| positions of channel o.

        Returns:
            (c_out |G|,), or None.
        """
        return None if self.bias is None else self.bias.repeat_interleave(self.group.order)

    def forward(self, x: Tensor) -> Tensor:
        """y[o, g] = sum_{i,h} psi[o, i, g^-1 h] x[i, h] + b[o].

        Args:
            x: inputs (..., in_channels, |G|).

        Returns:
            outputs (..., out_channels, |G|).
        """
        check_trailing_shape(x, (self.in_channels, self.group.order), "GroupLinear")
        lead = x.shape[:-2]
        out = x.reshape(*lead, -1) @ self.weight_matrix().T
        out = out.reshape(*lead, self.out_channels, self.group.order)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out

    def extra_repr(self) -> str:
        """The layer's channels and group order.

        Returns:
            The text.
        """
        return f"{self.in_channels} -> {self.out_channels}, |G|={self.group.order}"


class InvariantReadout(_RepresentationMap):
    """Invariant map from copies of the regular representation: y = A mean_g x[:, g] + b.

    Input (..., in_channels, |G|), output (..., out_features). Source: arXiv 1602.07576 (pooling over G).

    Args:
        group: G.
        in_channels: input channels.
        out_features: outputs.
        bias: learn a bias.
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    def __init__(
        self,
        group: FiniteGroup,
        in_channels: int,
        out_features: int,
        bias: bool = True,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.in_channels, self.out_features = int(in_channels), int(out_features)
        self._set_representations(
            Representation.regular(group).copies(self.in_channels),
            Representation.trivial(group, self.out_features),
            (self.in_channels, group.order),
            (self.out_features,),
        )
        fk = factory_kwargs(device, dtype)
        self.weight = nn.Parameter(
            normal_init((out_features, in_channels), generator).to(**fk) / math.sqrt(in_channels)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None

    def weight_matrix(self) -> Tensor:
        """Dense matrix: column (i, g) is A[:, i] / |G|.

        Returns:
            (out_features, c_in |G|).
        """
        return self.weight.repeat_interleave(self.group.order, dim=1) / self.group.order

    def bias_vector(self) -> Tensor | None:
        """The bias.

        Returns:
            (out_features,), or None.
        """
        return self.bias

    def forward(self, x: Tensor) -> Tensor:
        """y = A mean_g x[:, g] + b.

        Args:
            x: inputs (..., in_channels, |G|).

        Returns:
            outputs (..., out_features).
        """
        check_trailing_shape(x, (self.in_channels, self.group.order), "InvariantReadout")
        return F.linear(x.mean(-1), self.weight, self.bias)

    def extra_repr(self) -> str:
        """The layer's channels, outputs and group order.

        Returns:
            The text.
        """
        return f"{self.in_channels} -> {self.out_features}, |G|={self.group.order}"
