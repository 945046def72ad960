"""``symgen audit`` on CIFAR-10 files with models written the way torchvision writes them (torchvision itself is
not a dependency): a VisionTransformer (class token, ``nn.MultiheadAttention`` on SDPA, ``torch._assert`` and
``x.shape`` in forward, GELU MLP, pre-LayerNorm blocks), a ResNet of BasicBlocks with 1x1-conv downsampling
shortcuts, and a ResNet with an auxiliary head returning a dict. Every section runs, through the command
line as a user calls it, and every value is resolved or flagged."""

import json
import math
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

from symgen.audit import audit
from symgen.cli import main

SMALL = dict(
    time_limit=600.0,
    eval_num_data=24,
    test_num_data=24,
    invariance_num_data=8,
    symmetry_num_data=8,
    hessian_num_data=12,
    hutchinson_probes=3,
    top_eigenvalues=1,
    eigen_iters=4,
    density_runs=1,
    density_steps=4,
    noise_num_data=12,
    noise_num_samples=2,
    ntk_num_data=6,
    ntk_subsamples=1,
    pgd_num_data=6,
    pgd_steps=2,
)


class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, hidden: int, dropout: float, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.ln_1 = norm_layer(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, hidden, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, heads: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(layers):
            blocks[f"encoder_layer_{i}"] = EncoderBlock(heads, dim, hidden, dropout)
        self.layers = nn.Sequential(blocks)
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """torchvision.models.VisionTransformer's structure, small: 32x32 images, 8x8 patches."""

    def __init__(self, image_size=32, patch_size=8, layers=2, heads=2, dim=32, hidden=64, num_classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder(seq_length, layers, heads, dim, hidden, 0.0)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))
        fan_in = self.conv_proj.in_channels * self.conv_proj.kernel_size[0] * self.conv_proj.kernel_size[1]
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's structure (BasicBlock, 1x1-conv downsampling), narrow and shallow."""

    def __init__(self, widths=(8, 16), num_classes=10, aux: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], 1)
        self.layer2 = self._make_layer(widths[1], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1], num_classes)
        self.aux = nn.Linear(widths[1], 4) if aux else None

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1)
        if self.aux is None:
            return self.fc(x)
        return {"logits": self.fc(x), "aux": self.aux(x)}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from test_data import write_fake_cifar

    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, {**{f"data_batch_{i}": 16 for i in range(1, 6)}, "test_batch": 32})
    return root


def _settle_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics from one pass of random images (a model at its initialization, as trained)."""
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 3, 32, 32))
    return model.eval()


def _resolved_or_flagged(res) -> None:
    for s in res.sections.values():
        for metric, est in s.values.items():
            if est.stderr is not None and est.stderr > abs(est.value) / 2:
                assert est.flag, (s.name, metric, est)


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory", [VisionTransformer, ResNet, partial(ResNet, aux=True)], ids=["vit", "resnet", "aux"]
)
def test_every_section_runs_on_cifar_files(factory, cifar):
    model = _settle_bn(factory())
    res = audit(model, "cifar10", "d4", root=cifar, limits=SMALL)
    assert {k: s.status for k, s in res.sections.items()} == {k: "ok" for k in res.sections}, {
        k: s.skipped for k, s in res.sections.items() if s.status != "ok"
    }
    assert res.flags == [], res.flags
    hess = res["hessian"].values
    assert {"trace", "eigenvalue_1", "ggn_trace", "density_positive_part"} <= set(hess)
    assert all(math.isfinite(e.value) for s in res.sections.values() for e in s.values.values())
    assert "loss_increase@0.003" in res["noise_stability"].values
    _resolved_or_flagged(res)


def test_the_vit_through_the_command_line(cifar, tmp_path, capsys):
    """As a user runs it: a model file, a checkpoint, CIFAR-10 files, every section, JSON out."""
    (tmp_path / "vit.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})\n"
        "from test_audit_torchvision_style import VisionTransformer\n"
        "def make():\n    return VisionTransformer()\n"
    )
    torch.save(VisionTransformer().state_dict(), tmp_path / "vit.pt")
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    code = main(
        ["audit", "--model", f"{tmp_path / 'vit.py'}:make", "--checkpoint", str(tmp_path / "vit.pt"), "--data",
         "cifar10", "--root", str(cifar), "--action", "d4", "--out", str(tmp_path / "runs"), "--json", *sets]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: s["status"] for k, s in out["sections"].items()} == {k: "ok" for k in out["sections"]}
    assert (tmp_path / "runs").exists() and out["report"].endswith("report.html")
