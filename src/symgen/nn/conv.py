"""Group-convolutional networks for square images under C4 / D4: lifting and group convolutions, the G-CNN.

Filters are transformed by the spatial action and gathered into one ``F.conv2d`` call; zero
padding k//2 with odd k keeps rotations and flips of square images exact.
Source: Cohen & Welling, "Group Equivariant Convolutional Networks", arXiv 1602.07576.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen import rng
from symgen.errors import GroupActionError, ShapeError
from symgen.groups import GroupAction, ImageDihedral, ImageRotation90, LiftedImageAction, TrivialAction
from symgen.nn.base import EquivariantModule, factory_kwargs, normal_init
from symgen.nn.linear import InvariantReadout

__all__ = ["LiftingConv2d", "GroupConv2d", "GCNN"]


def _image_action(action: GroupAction | str) -> GroupAction:
    if isinstance(action, str):
        key = action.lower()
        if key in ("c4", "rot90", "rotation"):
            return ImageRotation90()
        if key in ("d4", "dihedral"):
            return ImageDihedral()
        raise GroupActionError(f"unknown image group '{action}'; use 'c4', 'd4' or an image action object.")
    if getattr(action, "event_ndim", None) != 2:
        raise GroupActionError(f"G-CNN layers need an action on the last two (spatial) dims; got {action!r}.")
    return action


class _GroupConvBase(EquivariantModule):
    """Shared parts: the image action, odd kernel, and the plain ``nn.Conv2d`` with the transformed filters."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    spatial_index: Tensor

    def _setup(self, action: GroupAction | str, in_channels: int, out_channels: int, kernel_size: int) -> None:
        if kernel_size % 2 != 1:
            raise ShapeError(f"kernel_size must be odd so the filter has a centre pixel; got {kernel_size}.")
        self.action = _image_action(action)
        self.group = self.action.group
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.out_action = LiftedImageAction(self.action)

    def filters(self) -> Tensor:
        raise NotImplementedError

    def as_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` on channel-flattened features: (B, C_in', H, W) -> (B, out_channels * |G|, H, W)."""
        w = self.filters().detach()
        conv = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            self.kernel_size,
            padding=self.kernel_size // 2,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias.detach().repeat_interleave(self.group.order))
        return conv

    def example_shape(self) -> tuple[int, ...]:
        side = 2 * self.kernel_size + 1
        return (*self._channel_shape(), side, side)

    def _channel_shape(self) -> tuple[int, ...]:
        raise NotImplementedError


class LiftingConv2d(_GroupConvBase):
    """Lifting convolution: y[o, g](x) = sum_{c,u} (g . psi_o)[c](u - x) f[c](u) on (B, C, H, W) -> (B, O, |G|, H, W).

    (g . psi)(u) = psi(g^-1 u) is the filter transformed by the spatial action; zero padding k//2 with
    odd k keeps rotations and flips of square images exact. Source: arXiv 1602.07576.

    Args:
        action: the image action (C4 or D4 on the last two dims), or "c4" / "d4".
        in_channels: C.
        out_channels: O.
        kernel_size: k, odd.
        bias: add a bias per output channel.
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    def __init__(
        self,
        action: GroupAction | str,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(action, in_channels, out_channels, kernel_size)
        self.in_action = self.action
        fk = factory_kwargs(device, dtype)
        k = kernel_size
        self.register_buffer("spatial_index", self.action.permutations((k, k)).to(fk["device"]))
        fan_in = in_channels * k * k
        self.weight = nn.Parameter(
            normal_init((out_channels, in_channels, k, k), generator).to(**fk) * math.sqrt(2.0 / fan_in)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None

    def _channel_shape(self) -> tuple[int, ...]:
        return (self.in_channels,)

    def filters(self) -> Tensor:
        """Filter bank; row o * |G| + g is g . psi_o.

        Returns:
            (out_channels * |G|, in_channels, k, k).
        """
        k, n = self.kernel_size, self.group.order
        w = self.weight.reshape(self.out_channels, self.in_channels, k * k)[..., self.spatial_index]  # (o, c, g, kk)
        return w.permute(0, 2, 1, 3).reshape(self.out_channels * n, self.in_channels, k, k)

    def forward(self, x: Tensor) -> Tensor:
        """y[o, g] = sum_{c,u} (g . psi_o)[c](u - x) f[c](u), one ``conv2d`` with the transformed filters.

        Args:
            x: images (B, in_channels, H, W).

        Returns:
            features (B, out_channels, |G|, H, W).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"LiftingConv2d expects (B, {self.in_channels}, H, W); got {tuple(x.shape)}.")
        self.action.check(x.shape)
        n = self.group.order
        bias = None if self.bias is None else self.bias.repeat_interleave(n)
        y = F.conv2d(x, self.filters(), bias, padding=self.kernel_size // 2)
        return y.reshape(x.shape[0], self.out_channels, n, *y.shape[-2:])

    def export(self) -> nn.Module:
        """``nn.Conv2d`` to out_channels * |G| channels, then ``nn.Unflatten`` to (B, O, |G|, H, W).

        Returns:
            The plain module.
        """
        return nn.Sequential(self.as_conv(), nn.Unflatten(1, (self.out_channels, self.group.order)))


class GroupConv2d(_GroupConvBase):
    """Group convolution on (B, C, |G|, H, W): y[o, g] = sum_{c,h} (g . psi[o, c, g^-1 h]) * f[c, h].

    Equivariant to (L_k f)[c, h](u) = f[c, k^-1 h](k^-1 u). Source: arXiv 1602.07576, eq. (11).

    Args:
        action: the image action (C4 or D4 on the last two dims), or "c4" / "d4".
        in_channels: C.
        out_channels: O.
        kernel_size: k, odd.
        bias: add a bias per output channel.
        generator: a seed or a ``torch.Generator`` for the initial weights (None: the global generator).
        device: where the parameters go.
        dtype: their dtype.
    """

    kernel_index: Tensor

    def __init__(
        self,
        action: GroupAction | str,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(action, in_channels, out_channels, kernel_size)
        self.in_action = self.out_action
        fk = factory_kwargs(device, dtype)
        k, n = kernel_size, self.group.order
        self.register_buffer("spatial_index", self.action.permutations((k, k)).to(fk["device"]))
        self.register_buffer("kernel_index", self.group.table[self.group.inverses].to(fk["device"]))
        fan_in = in_channels * n * k * k
        self.weight = nn.Parameter(
            normal_init((out_channels, in_channels, n, k, k), generator).to(**fk) * math.sqrt(2.0 / fan_in)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None

    def _channel_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.group.order)

    def filters(self) -> Tensor:
        """Filter bank.

        Returns:
            (out_channels * |G|, in_channels * |G|, k, k).
        """
        k, n = self.kernel_size, self.group.order
        o, c = self.out_channels, self.in_channels
        w = self.weight.reshape(o, c, n, k * k)[:, :, self.kernel_index]  # (o, c, g, h, kk)
        idx = self.spatial_index[None, None, :, None, :].expand(o, c, n, n, k * k)
        w = w.gather(-1, idx)  # spatial transform by g
        return w.permute(0, 2, 1, 3, 4).reshape(o * n, c * n, k, k)

    def forward(self, x: Tensor) -> Tensor:
        """y[o, g] = sum_{c,h} (g . psi[o, c, g^-1 h]) * f[c, h], one ``conv2d`` on channel-flattened features.

        Args:
            x: features (B, in_channels, |G|, H, W).

        Returns:
            features (B, out_channels, |G|, H, W).
        """
        n = self.group.order
        if x.ndim != 5 or x.shape[1] != self.in_channels or x.shape[2] != n:
            raise ShapeError(f"GroupConv2d expects (B, {self.in_channels}, {n}, H, W); got {tuple(x.shape)}.")
        self.action.check(x.shape)
        bias = None if self.bias is None else self.bias.repeat_interleave(n)
        y = F.conv2d(x.reshape(x.shape[0], -1, *x.shape[-2:]), self.filters(), bias, padding=self.kernel_size // 2)
        return y.reshape(x.shape[0], self.out_channels, n, *y.shape[-2:])

    def export(self) -> nn.Module:
        """``nn.Flatten`` of (C, |G|), ``nn.Conv2d``, ``nn.Unflatten`` back to (B, O, |G|, H, W).

        Returns:
            The plain module.
        """
        return nn.Sequential(nn.Flatten(1, 2), self.as_conv(), nn.Unflatten(1, (self.out_channels, self.group.order)))


class GCNN(EquivariantModule):
    """A G-CNN for images under C4 or D4: lifting conv, group convs, pointwise nonlinearity, invariant pooling.

    logits = A mean_{g,u} h_L[:, g](u) + b: invariant to the image action. Source: arXiv 1602.07576.

    Args:
        action: the image action, or "c4" / "d4".
        in_channels: image channels.
        channels: the channels of the lifting conv and of each group conv after it.
        num_classes: outputs.
        kernel_size: k, odd.
        nonlinearity: builds the pointwise nonlinearity.
        generator: a seed or a ``torch.Generator`` for all layers' initial weights (one stream).
        device: where the parameters go.
        dtype: their dtype.
    """

    def __init__(
        self,
        action: GroupAction | str = "c4",
        in_channels: int = 1,
        channels: Sequence[int] = (8, 8),
        num_classes: int = 10,
        kernel_size: int = 3,
        nonlinearity: Callable[[], nn.Module] = nn.ReLU,
        *,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ShapeError("GCNN needs at least one hidden layer: channels=(c1, ...).")
        self.action = _image_action(action)
        self.in_channels, self.kernel_size = int(in_channels), int(kernel_size)
        self.in_action = self.action
        self.out_action = TrivialAction(self.action.group)
        # One generator for all layers, so a seed gives each layer its own part of one stream.
        g = rng.init_generator(generator)
        layers: list[nn.Module] = [
            LiftingConv2d(self.action, in_channels, channels[0], kernel_size, generator=g, device=device, dtype=dtype),
            nonlinearity(),
        ]
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            conv = GroupConv2d(self.action, a, b, kernel_size, generator=g, device=device, dtype=dtype)
            layers += [conv, nonlinearity()]
        self.features = nn.Sequential(*layers)
        self.head = InvariantReadout(
            self.action.group, channels[-1], num_classes, generator=g, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        """logits = A mean_{g,u} h_L[:, g](u) + b, invariant to the image action.

        Args:
            x: images (B, in_channels, H, W).

        Returns:
            logits (B, num_classes).
        """
        h = self.features(x)  # (B, C, |G|, H, W)
        return self.head(h.mean(dim=(-2, -1)))

    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example input: (in_channels, 2k + 1, 2k + 1).

        Returns:
            The shape.
        """
        side = 2 * self.kernel_size + 1
        return (self.in_channels, side, side)

    def export(self) -> nn.Sequential:
        """A plain CNN: ``nn.Conv2d`` layers on channel-flattened (C |G|) features with the same
        nonlinearities, ``nn.AdaptiveAvgPool2d(1)``, ``nn.Flatten``, ``nn.Linear`` (mean over G folded in).

        Returns:
            The ``nn.Sequential``.
        """
        layers = [m.as_conv() if isinstance(m, _GroupConvBase) else copy.deepcopy(m) for m in self.features]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), self.head.as_linear())
