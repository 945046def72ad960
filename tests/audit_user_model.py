"""A user's own model file, as ``symgen audit --model tests/audit_user_model.py:FACTORY`` loads it.

Nothing here imports symgen: the audit must work on plain PyTorch modules.
"""

import torch
from torch import nn


class SmallBNCNN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> global average pool -> linear, for (N, 1, 8, 8) digits.

    Both conv weights feed a BatchNorm, so each of their 8 + 8 filters has its own scale symmetry;
    the conv biases are cancelled by the BatchNorm mean; the head is not scale-invariant.
    """

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(-2, -1)))


class RotationInvariant(nn.Module):
    """Logits averaged over the four 90-degree rotations of the input: exactly C4-invariant."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.stack([self.inner(torch.rot90(x, k, dims=(-2, -1))) for k in range(4)]).mean(0)


class TinyMLP(nn.Module):
    """A tiny tanh MLP on flattened inputs (few parameters, so tests can form dense Hessians and Jacobians)."""

    def __init__(self, inputs: int = 64, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return SmallBNCNN()


def make_invariant_model() -> nn.Module:
    torch.manual_seed(0)
    return RotationInvariant(SmallBNCNN())


def make_wide_model() -> nn.Module:
    """Same architecture, other width: its checkpoints do not fit make_model's (shape mismatch)."""
    torch.manual_seed(0)
    return SmallBNCNN(width=12)


def make_tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP()


NOT_A_FACTORY = 3


def make_not_a_module():
    return "not a module"


def make_raising_model() -> nn.Module:
    """A factory with a bug of its own: the CLI reports it in one line (exit 2), not a traceback."""
    raise RuntimeError("\x1b[31mCUDA out of memory\x1b[0m while building the model (simulated)")


def make_digits_mlp() -> nn.Module:
    """An MLP for 8x8 digits (64 inputs): mnist1d's (1, 40) inputs do not fit it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
