"""The reference networks: the small ones the experiments and tests use, and real ones for real training.

Builders draw their initial weights from the global RNG like any ``nn.Module``; build under a seed
without touching the caller's RNG state with ``with symgen.rng.isolated_seed(seed): model = resnet20()``.
Written from scratch (no torchvision): CIFAR ResNets (He et al., arXiv 1512.03385) and a Vision
Transformer (Dosovitskiy et al., arXiv 2010.11929).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symgen.errors import ConfigError, ShapeError
from symgen.nn.masked import MaskedCNN, MaskedConv2d
from symgen.ntk import ntk_mlp

__all__ = [
    "small_cnn",
    "bn_cnn",
    "bn_mlp",
    "MixedNet",
    "build_model",
    "LinearFCNet",
    "BasicBlock",
    "ResNet",
    "resnet20",
    "resnet18",
    "VisionTransformer",
    "vit",
    "MaskedCNN",
    "PaperMaskedCNN",
    "ntk_mlp",
]


# ---------------------------------------------------------------------------------------------
# small BatchNorm networks (experiments flat-minima, unit-norm; tests)


def _conv_kind(in_shape: Sequence[int], who: str) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if len(in_shape) not in (2, 3):
        raise ConfigError(f"{who} expects an input shape (C, L) or (C, H, W), got {tuple(in_shape)}.")
    return (
        (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if len(in_shape) == 2 else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    )


def small_cnn(
    in_shape: Sequence[int],
    num_classes: int = 10,
    channels: Sequence[int] = (16, 32, 32),
    pool_after: Sequence[int] = (1, 2),
) -> nn.Sequential:
    """conv3x3-BN-ReLU blocks, 2x max-pools, then a linear head; 1D or 2D convolutions by ``in_shape``.

    Args:
        in_shape: one input's shape, (C, L) or (C, H, W).
        num_classes: outputs.
        channels: the channels of each block.
        pool_after: the (0-based) blocks followed by a 2x max-pool.

    Returns:
        The network.
    """
    conv, bn, pool = _conv_kind(in_shape, "small_cnn")
    c, spatial = in_shape[0], list(in_shape[1:])
    layers: list[nn.Module] = []
    for i, w in enumerate(channels):
        layers += [conv(c, w, 3, padding=1), bn(w), nn.ReLU()]
        if i in pool_after:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * math.prod(spatial), num_classes))


def bn_cnn(in_shape: tuple[int, ...], num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """``small_cnn`` with channels (w, 2w, 2w), max-pool after the 2nd and 3rd (experiment flat-minima).

    Args:
        in_shape: one input's shape.
        num_classes: outputs.
        width: w.

    Returns:
        The network.
    """
    return small_cnn(in_shape, num_classes, (width, 2 * width, 2 * width), pool_after=(1, 2))


def bn_mlp(in_shape: Sequence[int], num_classes: int = 10, width: int = 64, depth: int = 2) -> nn.Sequential:
    """Flatten, [Linear(width), BatchNorm1d, ReLU] x depth, Linear(num_classes).

    Args:
        in_shape: one input's shape.
        num_classes: outputs.
        width: hidden width.
        depth: hidden layers.

    Returns:
        The network.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    d = math.prod(in_shape)
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, num_classes))


class MixedNet(nn.Module):
    """BatchNorm, GroupNorm (through ReLU and max pooling), LayerNorm and plain layers together.

    Args:
        in_shape: one input's shape, (C, L) or (C, H, W).
        num_classes: outputs.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        spatial = in_shape[1:]
        conv = nn.Conv2d if len(spatial) == 2 else nn.Conv1d
        self.pool = F.max_pool2d if len(spatial) == 2 else F.max_pool1d
        self.c1 = conv(in_shape[0], 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if len(spatial) == 2 else nn.BatchNorm1d(4)
        self.c2 = conv(4, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        flat = 8 * math.prod(s // 2 for s in spatial)
        self.l1 = nn.Linear(flat, 16)
        self.l2 = nn.Linear(16, 12)
        self.ln = nn.LayerNorm(12)
        self.l3 = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Convolutions with BatchNorm and GroupNorm, then linear layers with LayerNorm.

        Args:
            x: images (N, C, H, W).

        Returns:
            logits (N, num_classes).
        """
        h = F.relu(self.bn(self.c1(x)))
        h = self.gn(self.pool(F.relu(self.c2(h)), 2)).flatten(1)
        h = F.relu(self.ln(self.l2(F.relu(self.l1(h)))))
        return self.l3(h)


def build_model(
    kind: str, in_shape: tuple[int, ...], width: int = 64, channels: int = 16, num_classes: int = 10
) -> nn.Module:
    """The small BatchNorm networks by name (experiment unit-norm).

    Args:
        kind: ``"mlp"`` (:func:`bn_mlp`, 2 hidden layers of ``width``), ``"cnn"`` (:func:`small_cnn`,
            channels (c, 2c), one pool) or ``"mixed"`` (:class:`MixedNet`).
        in_shape: one input's shape.
        width: the MLP's width.
        channels: c, the CNN's first channels.
        num_classes: outputs.

    Returns:
        The network.
    """
    if kind == "mlp":
        return bn_mlp(in_shape, num_classes, width, depth=2)
    if kind == "cnn":
        return small_cnn(in_shape, num_classes, (channels, 2 * channels), pool_after=(1,))
    if kind == "mixed":
        return MixedNet(in_shape, num_classes)
    raise ConfigError(f"unknown model '{kind}'; choose mlp, cnn or mixed.")


class LinearFCNet(nn.Module):
    """A deep linear fully-connected network without bias: f(x) = W_L ... W_1 vec(x)."""

    def __init__(self, shape: tuple[int, ...], depth: int, width: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        dims = [math.prod(shape)] + [width] * (depth - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """The product of the linear layers on flattened inputs.

        Args:
            x: inputs (N, *shape).

        Returns:
            outputs (N, ...).
        """
        h = x.reshape(*x.shape[: x.ndim - len(self.shape)], -1)
        for layer in self.layers:
            h = layer(h)
        return h.squeeze(-1)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (arXiv 1512.03385)


class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.lo, self.hi = extra_channels // 2, extra_channels - extra_channels // 2
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.lo, self.hi))


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)).

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: the first conv's stride.
        shortcut: "A" (zero padding) or "B" (1x1 conv + BN), where the shape changes.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            if shortcut == "A":
                self.shortcut = _PadShortcut(channels - in_channels, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
                )
            else:
                raise ConfigError(f"shortcut must be 'A' (zero padding) or 'B' (projection), got {shortcut!r}.")

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) (arXiv 1512.03385).

        Args:
            x: features (N, C_in, H, W).

        Returns:
            features (N, C_out, H', W').
        """
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: conv3x3-BN-ReLU stem (stride 1, no max-pool), stages of BasicBlocks (the first
    block of every stage after the first has stride 2), global average pooling, linear head."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ConfigError(
                f"blocks and widths need the same non-zero length; got {list(blocks)} and {list(widths)}."
            )
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1, shortcut=shortcut))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # He initialization (arXiv 1502.01852), as in the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Stem, residual stages, global average pooling, linear classifier (arXiv 1512.03385).

        Args:
            x: images (N, C, H, W).

        Returns:
            logits (N, num_classes).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"ResNet expects images (N, {self.in_channels}, H, W); got {tuple(x.shape)}.")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        return self.fc(out.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> ResNet:
    """ResNet-20 for CIFAR (arXiv 1512.03385, section 4.2): 3 stages of 3 blocks, 16/32/64 channels,
    identity shortcuts with zero padding (option A): 0.27M parameters (269,722 for 10 classes).

    Args:
        num_classes: outputs.
        in_channels: input channels.
        shortcut: "A" or "B" (:class:`BasicBlock`).

    Returns:
        The network.
    """
    return ResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels, shortcut)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool): 4 stages of 2 blocks, 64/128/256/512 channels,
    projection shortcuts: 11.17M parameters for 10 classes.

    Args:
        num_classes: outputs.
        in_channels: input channels.

    Returns:
        The network.
    """
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, shortcut="B")


# ---------------------------------------------------------------------------------------------
# Vision Transformer (arXiv 2010.11929)


class _Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(d_head)) v, written out (works under vmap/functional_call)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: non-overlapping patches -> linear embedding, a class token, learned position embeddings,
    ``depth`` pre-norm transformer blocks, LayerNorm, linear head on the class token."""

    def __init__(
        self,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_dim: int | None = None,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h % patch_size or w % patch_size:
            raise ConfigError(f"image size {(h, w)} must be divisible by patch_size {patch_size}.")
        if dim % heads:
            raise ConfigError(f"dim {dim} must be divisible by heads {heads}.")
        self.image_size, self.in_channels = (h, w), in_channels
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_dim or 4 * dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Patch embedding, transformer encoder, class-token classifier (arXiv 2010.11929).

        Args:
            x: images (N, C, H, W) of ``image_size``.

        Returns:
            logits (N, num_classes).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ShapeError(
                f"VisionTransformer expects images (N, {self.in_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}); got {tuple(x.shape)}."
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(
    image_size: int | tuple[int, int] = 32,
    patch_size: int = 4,
    num_classes: int = 10,
    dim: int = 192,
    depth: int = 6,
    heads: int = 3,
    mlp_dim: int | None = None,
    in_channels: int = 3,
    dropout: float = 0.0,
) -> VisionTransformer:
    """A small Vision Transformer (arXiv 2010.11929); the defaults suit 32x32 images (64 patches of 4x4)."""
    return VisionTransformer(image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, in_channels, dropout)


# ---------------------------------------------------------------------------------------------
# the masked CNN exactly as Nordenfors & Flinth build it (experiment ensemble-equivariance)


class PaperMaskedCNN(nn.Module):
    """Nordenfors & Flinth's CNN (arXiv 2410.01452, their ``omegaCNN``): three masked 3x3 convs without
    bias; conv -> 2x2 average pool -> tanh -> LayerNorm over each channel's (H, W) without affine, twice,
    then conv -> tanh -> the same LayerNorm; the flattened grid into a linear head without bias; every
    weight N(0, init_std^2). Images (N, C, H, W) with H, W divisible by 4 (28 -> 7, 8 -> 2).

    Unlike :class:`MaskedCNN` (global average pooling, LayerNorm over channels) the head sees the whole
    grid, so invariance must be learned by the head as well, as in the paper.

    Args:
        in_shape: one image's shape (C, H, W).
        num_classes: outputs.
        channels: channels of each conv.
        support: the filters' support (:func:`~symgen.nn.masked.support_mask`).
        init_std: the weights' standard deviation.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int = 10,
        channels: int = 16,
        support: str | Tensor = "symmetric",
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3 or in_shape[1] % 4 or in_shape[2] % 4:
            raise ShapeError(
                f"PaperMaskedCNN expects images (C, H, W) with H and W divisible by 4; got {tuple(in_shape)}."
            )
        c, h, w = in_shape
        self.convs = nn.ModuleList(
            MaskedConv2d(a, channels, 3, support, bias=False, init_std=init_std) for a in (c, channels, channels)
        )
        self.grid = (h // 4, w // 4)
        self.head = nn.Linear(channels * self.grid[0] * self.grid[1], num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.normal_(0.0, init_std)

    def forward(self, x: Tensor) -> Tensor:
        """The masked convolutions with their nonlinearities and pooling, then the classifier.

        Args:
            x: images (N, C, H, W).

        Returns:
            logits (N, num_classes).
        """
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 2:
                x = F.avg_pool2d(x, 2)
            x = F.layer_norm(torch.tanh(x), x.shape[-2:])
        return self.head(x.flatten(1))
