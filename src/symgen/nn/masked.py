"""Convolutions whose filters live on a fixed support (a mask), and the paper's small masked CNN.

A filter support closed under the group (the '+' for rotations) makes the space of layers
invariant under the group's action on filters, so augmented ensembles become equivariant; an
asymmetric support (4 edge neighbours and a corner) breaks that (Nordenfors & Flinth, arXiv 2410.01452).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen import rng
from symgen.errors import ConfigError, ShapeError

__all__ = ["SUPPORTS", "support_mask", "MaskedConv1d", "MaskedConv2d", "MaskedCNN"]

SUPPORTS = ("full", "symmetric", "asymmetric")


def support_mask(support: str | Tensor, kernel_size: int = 3, ndim: int = 2) -> Tensor:
    """The 0/1 filter mask of a named support, shape (k,) * ndim.

    2D, k=3: 'full' all 9 taps; 'symmetric' the '+' (centre and its 4 edge neighbours);
    'asymmetric' the 4 edge neighbours and the top-left corner, no centre.
    1D, k=3: 'full' = 'symmetric' all 3 taps (closed under reflection); 'asymmetric' centre and right.

    Args:
        support: a name in ``SUPPORTS``, or an explicit tensor of shape (k,) * ndim, used as given
            (nonzero = in the support).
        kernel_size: k ('full' takes any k, the others 3).
        ndim: 1 or 2.

    Returns:
        The mask, in torch's default dtype.
    """
    if isinstance(support, Tensor):
        if tuple(support.shape) != (kernel_size,) * ndim:
            raise ShapeError(f"support mask must have shape {(kernel_size,) * ndim}; got {tuple(support.shape)}.")
        return (support != 0).to(torch.get_default_dtype())
    if support not in SUPPORTS:
        raise ConfigError(
            f"unknown filter support '{support}'; choose one of {', '.join(SUPPORTS)} or pass a mask tensor."
        )
    if ndim not in (1, 2):
        raise ConfigError(f"support_mask supports 1D and 2D filters; got ndim={ndim}.")
    k = kernel_size
    if support == "full":
        return torch.ones((k,) * ndim)
    if k != 3:
        raise ConfigError(
            f"the named support '{support}' is defined for 3-tap filters; got kernel_size={k}. "
            "Pass an explicit mask tensor for other sizes."
        )
    if ndim == 1:
        return torch.ones(3) if support == "symmetric" else torch.tensor([0.0, 1.0, 1.0])
    m = torch.zeros(3, 3)
    m[0, 1] = m[1, 0] = m[1, 2] = m[2, 1] = 1.0
    if support == "symmetric":
        m[1, 1] = 1.0
    else:
        m[0, 0] = 1.0
    return m


class _MaskedConvNd(nn.Module):
    """A convolution whose filter is ``weight * mask`` (a fixed support), 'same' padding."""

    ndim: int = 2
    mask: Tensor
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        support: str | Tensor = "full",
        bias: bool = True,
        init_std: float = 1.0,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ConfigError(f"masked convolutions use 'same' padding and need an odd kernel_size; got {kernel_size}.")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.padding = kernel_size // 2
        mask = support_mask(support, kernel_size, self.ndim).to(device=device, dtype=dtype)
        self.register_buffer("mask", mask)
        shape = (out_channels, in_channels) + (kernel_size,) * self.ndim
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(init_std, generator)

    def reset_parameters(self, init_std: float = 1.0, generator: rng.Seed = None) -> None:
        """Gaussian N(0, init_std^2) weights on the support (zero elsewhere) and biases.

        Args:
            init_std: standard deviation of the weights and biases.
            generator: a seed or a ``torch.Generator`` (None: torch's global generator, as ``torch.nn``).
        """
        g = rng.init_generator(generator)
        with torch.no_grad():
            w = rng.randn(self.weight.shape, g, dtype=self.weight.dtype, device=self.weight.device)
            self.weight.copy_(init_std * w * self.mask)
            if self.bias is not None:
                self.bias.copy_(
                    init_std * rng.randn(self.bias.shape, g, dtype=self.bias.dtype, device=self.bias.device)
                )

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"support_size={int(self.mask.sum())}, bias={self.bias is not None}"
        )


class MaskedConv2d(_MaskedConvNd):
    """2D convolution with 'same' padding whose filter is ``weight * mask`` (a fixed support)."""

    ndim = 2

    def forward(self, x: Tensor) -> Tensor:
        """conv2d with the masked filter ``weight * mask`` and 'same' padding.

        Args:
            x: images (N, C, H, W).

        Returns:
            features (N, out_channels, H, W).
        """
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)


class MaskedConv1d(_MaskedConvNd):
    """1D convolution with 'same' padding whose filter is ``weight * mask`` (a fixed support)."""

    ndim = 1

    def forward(self, x: Tensor) -> Tensor:
        """conv1d with the masked filter ``weight * mask`` and 'same' padding.

        Args:
            x: signals (N, C, L).

        Returns:
            features (N, out_channels, L).
        """
        return F.conv1d(x, self.masked_weight(), self.bias, padding=self.padding)


class MaskedCNN(nn.Module):
    """The paper's CNN: masked 3-tap convs with tanh and 2x average pooling, global average pooling,
    LayerNorm without affine, linear head; every weight N(0, init_std^2) (arXiv 2410.01452).

    Pooling halves a spatial size only when it is even, so the grid stays symmetric under the group
    (rotations about the image centre, reflections).

    Args:
        in_channels: input channels.
        num_classes: outputs.
        channels: the width of every conv, or one width per conv.
        support: the filters' support (:func:`support_mask`).
        num_layers: the number of convs.
        ndim: 1 (signals) or 2 (images).
        init_std: the weights' standard deviation.
        generator: a seed or a ``torch.Generator`` for all initial weights (one stream).
        device: where the parameters go.
        dtype: their dtype.

    Raises:
        ConfigError: ``ndim`` not 1 or 2, or widths that do not match ``num_layers``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int | Sequence[int] = 8,
        support: str | Tensor = "symmetric",
        num_layers: int = 3,
        ndim: int = 2,
        init_std: float = 1.0,
        generator: rng.Seed = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if ndim not in (1, 2):
            raise ConfigError(f"MaskedCNN works on 1D signals or 2D images; got ndim={ndim}.")
        widths = [channels] * num_layers if isinstance(channels, int) else list(channels)
        if len(widths) != num_layers or num_layers < 1:
            raise ConfigError(f"need {num_layers} channel widths (>= 1 layer); got {widths}.")
        conv = MaskedConv2d if ndim == 2 else MaskedConv1d
        generator = rng.init_generator(generator)  # one stream for all layers
        self.ndim = ndim
        self.convs = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.convs.append(
                conv(c, w, 3, support, init_std=init_std, generator=generator, device=device, dtype=dtype)
            )
            c = w
        self.norm = nn.LayerNorm(c, elementwise_affine=False)
        self.head = nn.Linear(c, num_classes, device=device, dtype=dtype)
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(init_std * rng.randn(p.shape, generator, dtype=p.dtype, device=p.device))

    def forward(self, x: Tensor) -> Tensor:
        """The masked convolutions, pooling and the linear head.

        Args:
            x: inputs (N, C, H, W) (ndim 2) or (N, C, L) (ndim 1).

        Returns:
            logits (N, num_classes).
        """
        if x.ndim != self.ndim + 2:
            raise ShapeError(
                f"MaskedCNN(ndim={self.ndim}) expects inputs (N, C{', H, W' if self.ndim == 2 else ', L'}); "
                f"got shape {tuple(x.shape)}."
            )
        pool = F.avg_pool2d if self.ndim == 2 else F.avg_pool1d
        for i, conv in enumerate(self.convs):
            x = torch.tanh(conv(x))
            last = i == len(self.convs) - 1
            if not last and all(s % 2 == 0 and s > 2 for s in x.shape[2:]):
                x = pool(x, 2)
        x = x.mean(dim=tuple(range(2, x.ndim)))
        return self.head(self.norm(x))
