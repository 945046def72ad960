"""models.PaperMaskedCNN against a plain-torch transcription of Nordenfors & Flinth's omegaCNN forward pass."""

import pytest
import torch
import torch.nn.functional as F

from symgen.errors import ShapeError, SymgenError
from symgen.models import PaperMaskedCNN
from symgen.nn.masked import support_mask


@pytest.mark.parametrize("support", ["symmetric", "asymmetric"])
def test_paper_masked_cnn_matches_plain_torch(support):
    torch.manual_seed(0)
    model = PaperMaskedCNN((1, 8, 8), 10, channels=3, support=support).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    mask = support_mask(support).double()
    h = x
    for i, conv in enumerate(model.convs):
        h = F.conv2d(h, conv.weight * mask, None, padding=1)
        if i < 2:
            h = F.avg_pool2d(h, 2)
        h = torch.tanh(h)
        mu = h.mean(dim=(-2, -1), keepdim=True)
        var = h.var(dim=(-2, -1), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5)
    expected = h.flatten(1) @ model.head.weight.T
    torch.testing.assert_close(model(x), expected)
    assert model.head.bias is None and all(c.bias is None for c in model.convs)
    w = model.convs[0].weight.detach()
    assert float((w * (1 - mask)).abs().max()) == 0.0  # filters live on the support


def test_paper_masked_cnn_rejects_bad_shapes():
    with pytest.raises(ShapeError, match="divisible by 4") as e:
        PaperMaskedCNN((1, 10, 10))
    assert isinstance(e.value, SymgenError)
