"""symgen.models: parameter counts against closed forms, output shapes, layer structure."""

import pytest
import torch
from torch import nn

from symgen.errors import ConfigError, ShapeError
from symgen.models import LinearFCNet, MixedNet, bn_cnn, bn_mlp, build_model, resnet18, resnet20, small_cnn, vit
from symgen.rng import isolated_seed


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bn_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _resnet_params(widths, blocks, num_classes, projection):
    """conv3x3 (no bias) + BN (2c) per layer; 1x1 projection + BN where a stage widens; fc."""
    conv = lambda a, b, k=3: a * b * k * k  # noqa: E731
    total, c = conv(3, widths[0]) + 2 * widths[0], widths[0]
    for w, n in zip(widths, blocks, strict=True):
        for _ in range(n):
            total += conv(c, w) + conv(w, w) + 4 * w
            if c != w and projection:
                total += conv(c, w, 1) + 2 * w
            c = w
    return total + c * num_classes + num_classes


def test_resnet20_and_resnet18_parameter_counts():
    assert _resnet_params((16, 32, 64), (3, 3, 3), 10, False) == 269_722  # the paper's "0.27M"
    assert _count(resnet20()) == 269_722
    assert _count(resnet20(shortcut="B")) == _resnet_params((16, 32, 64), (3, 3, 3), 10, True) == 272_474
    n18 = _count(resnet18())
    assert n18 == _resnet_params((64, 128, 256, 512), (2, 2, 2, 2), 10, True)
    assert round(n18 / 1e6, 2) == 11.17
    assert _count(resnet20(num_classes=100)) == 269_722 + 90 * 65


def test_resnet_shapes_and_batchnorm():
    x = torch.randn(2, 3, 32, 32)
    with isolated_seed(0):
        r20, r18 = resnet20(), resnet18(num_classes=100)
    assert r20(x).shape == (2, 10) and r18(x).shape == (2, 100)
    assert _bn_layers(r20) == 19 and _bn_layers(r18) == 20  # 1 + 2 per block (+ 3 projections in resnet18)
    # the option-A shortcut subsamples and zero-pads: no parameters, the block output is still a residual
    assert resnet20(in_channels=1)(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ShapeError):
        r20(torch.randn(2, 1, 32, 32))
    with pytest.raises(ConfigError):
        resnet20(shortcut="C")


def test_vit_parameter_count_and_shapes():
    dim, depth, heads, mlp, patch, k = 48, 3, 4, 96, 4, 7
    model = vit(
        image_size=16, patch_size=patch, num_classes=k, dim=dim, depth=depth, heads=heads, mlp_dim=mlp, in_channels=1
    )
    patches = (16 // patch) ** 2
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp + mlp * dim + dim)
    expected = (1 * patch * patch * dim + dim) + dim + (patches + 1) * dim + depth * block + 2 * dim + dim * k + k
    assert _count(model) == expected
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, k)
    assert _bn_layers(model) == 0
    assert vit()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError):
        vit(image_size=30, patch_size=4)
    with pytest.raises(ConfigError):
        vit(dim=50, heads=4)
    with pytest.raises(ShapeError):
        model(torch.randn(3, 1, 8, 8))


def test_vit_attention_is_permutation_equivariant_without_positions():
    """With zero position embeddings and no class token in play, attention mixes tokens symmetrically:
    permuting the patches of the input leaves the class-token output unchanged."""
    torch.manual_seed(0)
    model = vit(image_size=8, patch_size=4, dim=16, depth=2, heads=2, in_channels=1).double().eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    swapped = x.clone()  # swap the top-left and bottom-right 4x4 patches
    swapped[..., :4, :4], swapped[..., 4:, 4:] = x[..., 4:, 4:], x[..., :4, :4]
    assert torch.allclose(model(x), model(swapped), atol=1e-12)


def test_small_builders_keep_their_layout():
    # flat-minima's CNN: conv-BN-ReLU x3 (w, 2w, 2w), pools after the 2nd and 3rd
    net = bn_cnn((1, 8, 8), 10, 4)
    assert [type(m).__name__ for m in net] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Flatten",
        "Linear",
    ]
    assert net[-1].in_features == 8 * 2 * 2 and net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert bn_cnn((1, 40), 10, 4)(torch.zeros(2, 1, 40)).shape == (2, 10)
    # unit-norm's CNN is the same builder with (c, 2c) and one pool
    cnn = build_model("cnn", (1, 8, 8), channels=3)
    assert [type(m).__name__ for m in cnn] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Flatten",
        "Linear",
    ]
    assert cnn[-1].in_features == 6 * 4 * 4
    assert small_cnn((2, 12), 5, (3,), pool_after=())(torch.zeros(4, 2, 12)).shape == (4, 5)
    mlp = build_model("mlp", (1, 40), width=8)
    assert isinstance(mlp[1], nn.Linear) and isinstance(mlp[4], nn.Linear) and _bn_layers(mlp) == 2
    assert _count(bn_mlp((3,), 2, width=4, depth=1)) == (3 * 4 + 4) + 2 * 4 + (4 * 2 + 2)
    assert isinstance(build_model("mixed", (1, 8, 8)), MixedNet)
    assert build_model("mixed", (1, 40))(torch.zeros(2, 1, 40)).shape == (2, 10)
    lin = LinearFCNet((2, 3), depth=3, width=5)
    assert _count(lin) == 6 * 5 + 5 * 5 + 5 and lin(torch.zeros(4, 2, 3)).shape == (4,)
    with pytest.raises(ConfigError, match="input shape"):
        bn_cnn((8,), 10)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet", (1, 8, 8))
