"""symgen audit on models written as a user writes them: outputs that are tuples, dicts or objects with
``.logits``; a head whose class count does not match the data; raw 0-255 inputs; a ViT that torch.fx
cannot trace (``len`` in forward), whose scale-symmetry analysis covers only part of the model."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from symgen.audit import audit
from symgen.audit.outputs import parse_output, select_logits
from symgen.cli import main
from symgen.errors import ConfigError, ShapeError

SMALL = dict(
    time_limit=600.0,
    eval_num_data=40,
    invariance_num_data=8,
    symmetry_num_data=8,
    hessian_num_data=16,
    hutchinson_probes=3,
    top_eigenvalues=1,
    eigen_iters=5,
    density_runs=1,
    density_steps=5,
    noise_num_data=16,
    noise_num_samples=2,
    ntk_num_data=8,
    ntk_subsamples=1,
    pgd_num_data=8,
    pgd_steps=2,
)


class TupleCNN(nn.Module):
    """A CNN with an auxiliary head: forward returns (logits, aux)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 64, classes)
        self.aux = nn.Linear(4 * 64, 3)

    def features(self, x):
        return torch.relu(self.bn(self.conv(x))).flatten(1)

    def forward(self, x):
        h = self.features(x)
        return self.head(h), self.aux(h)


class DictCNN(TupleCNN):
    """Returns {"logits": ..., "features": ...}."""

    def forward(self, x):
        h = self.features(x)
        return {"features": h, "logits": self.head(h)}


@dataclass
class ModelOutput:
    """A Hugging Face style output object."""

    logits: torch.Tensor
    hidden: torch.Tensor


class HFStyleCNN(TupleCNN):
    """Returns an object with ``.logits``."""

    def forward(self, x):
        h = self.features(x)
        return ModelOutput(logits=self.head(h), hidden=h)


class PlainCNN(TupleCNN):
    """The same weights, returning the logits tensor: the reference."""

    def forward(self, x):
        return self.head(self.features(x))


class TwoTensorDict(TupleCNN):
    """A dict without "logits" and with two tensors: the rule cannot tell."""

    def forward(self, x):
        h = self.features(x)
        return {"scores": self.head(h), "aux": self.aux(h)}


class TinyViT(nn.Module):
    """Patch embedding, one nn.TransformerEncoderLayer, a class head; ``len(x)`` in forward (torch.fx fails)."""

    def __init__(self, classes: int = 10, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(1, dim, 4, stride=4)  # 8x8 -> 2x2 patches
        self.pos = nn.Parameter(torch.zeros(1, 4, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n = len(x)
        t = self.patch(x).reshape(n, self.pos.shape[-1], -1).transpose(1, 2) + self.pos
        return self.head(self.norm(self.block(t)).mean(dim=1))


@pytest.fixture(scope="module")
def digits():
    from symgen.data import load_dataset

    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    return {"train": (x[:80], y[:80]), "test": (xt[:40], yt[:40])}


@pytest.mark.parametrize("cls", [TupleCNN, DictCNN, HFStyleCNN])
def test_tuple_dict_and_object_outputs_give_the_plain_models_numbers(cls, digits):
    sections = ["performance", "hessian", "ntk", "invariance"]
    ref = audit(PlainCNN().eval(), digits, "c4", limits=SMALL, sections=sections)
    got = audit(cls().eval(), digits, "c4", limits=SMALL, sections=sections)
    for s in sections:
        assert got[s].status == "ok", got[s].skipped
        for metric, est in ref[s].values.items():
            assert got[s].values[metric].value == pytest.approx(est.value, rel=1e-5, abs=1e-7), (s, metric)
    assert got.flags == [] and got.output is None


def test_output_option_picks_and_explains(digits):
    res = audit(TupleCNN(classes=10).eval(), digits, limits=SMALL, sections=["performance"], output=0)
    assert res["performance"].status == "ok" and res.output == 0
    res = audit(TwoTensorDict().eval(), digits, limits=SMALL, sections=["performance"], output="scores")
    assert res["performance"].status == "ok"
    with pytest.raises(ConfigError, match=r"'scores': Tensor\(2, 10\).*--output") as e:
        audit(TwoTensorDict().eval(), digits, limits=SMALL, sections=["performance"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="out of range"):
        audit(TupleCNN().eval(), digits, limits=SMALL, sections=["performance"], output=5)
    # the aux head has 3 outputs for labels up to 9: it cannot be the classifier
    with pytest.raises(ShapeError, match="labels go up to 9 but the model has 3 outputs"):
        audit(TupleCNN().eval(), digits, limits=SMALL, sections=["performance"], output=1)
    assert parse_output("1") == 1 and parse_output("logits") == "logits" and parse_output(None) is None
    assert select_logits([torch.ones(2)], None).shape == (2,)


def test_class_count_mismatch_and_raw_pixels_are_flagged(digits, tmp_path):
    res = audit(PlainCNN(classes=100).eval(), "digits", limits=SMALL, sections=["performance"])
    assert any("100 outputs but the data declares 10 classes" in f for f in res.flags), res.flags
    assert res.to_dict()["flags"] == res.flags
    assert "flags" in res.report_tables()
    assert "warning: class count" in res.summary()
    # a custom loader of uint8 0-255 pixels
    x, y = digits["test"]
    loader = DataLoader(TensorDataset((x * 255).to(torch.uint8), y), batch_size=16)
    res = audit(PlainCNN().eval(), loader, limits=SMALL, sections=["performance"])
    assert any("uint8" in f and "[0, 1] or normalized" in f for f in res.flags), res.flags
    res = audit(PlainCNN().eval(), (x * 255, y), limits=SMALL, sections=["performance"])
    assert any("float values in [0, 255]" in f for f in res.flags), res.flags
    assert audit(PlainCNN().eval(), digits, limits=SMALL, sections=["performance"]).flags == []


def test_vit_scale_symmetries_flag_partial_coverage_and_hessian_does_not_crash(digits):
    res = audit(TinyViT().eval(), digits, "c4", limits=SMALL, sections=["scale_symmetries", "hessian", "ntk"])
    sym = res["scale_symmetries"]
    assert sym.status == "ok"
    assert sym.coverage is not None and 0 < sym.coverage < 1
    assert any(f.startswith("partial: analysed") for f in sym.flags), sym.flags
    assert res.to_dict()["sections"]["scale_symmetries"]["coverage"] == sym.coverage
    assert any("scale_symmetries: partial" in f["flag"] for f in res.report_tables()["flags"])
    # the Hessian on SDPA attention: measured, or reported as failed with its reason; never a crash
    hess = res["hessian"]
    assert hess.status == "ok" or (hess.status == "failed" and hess.skipped), (hess.status, hess.skipped)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    full = audit(cnn.eval(), digits, limits=SMALL, sections=["scale_symmetries"])["scale_symmetries"]
    assert full.coverage == 1.0 and full.flags == []


def test_cli_output_option_and_warnings(tmp_path, capsys):
    (tmp_path / "user_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.head = nn.Linear(64, 100)\n"
        "        self.aux = nn.Linear(64, 2)\n"
        "    def forward(self, x):\n"
        "        h = x.flatten(1)\n"
        "        return self.aux(h), self.head(h)\n\n"
        "def make():\n    return Net()\n"
    )
    base = ["audit", "--model", f"{tmp_path / 'user_models.py'}:make", "--data", "digits"]
    base += ["--out", str(tmp_path / "runs"), "--set", "eval_num_data=40", "--set", "test_num_data=40"]
    # the rule takes the first tensor: the 2-output aux head cannot classify 10 digits: exit 2, one line
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "labels go up to 9 but the model has 2 outputs" in err and "--output" in err
    code = main([*base, "--output", "1", "--json", "--collective-timeout", "30"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["output"] == 1
    assert any("100 outputs" in f for f in data["flags"])
    assert main([*base, "--output", "1"]) == 0
    assert "warning: class count" in capsys.readouterr().out
    assert main([*base, "--collective-timeout", "0"]) == 2
