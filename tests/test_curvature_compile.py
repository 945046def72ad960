"""HessianOperator(compile=...): the compiled forward-over-reverse product equals the eager retained-graph
product (aot_eager backend here: it traces the same graphs as inductor without generating code)."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd.functional import hessian

from symgen import functional as F
from symgen.curvature import HessianOperator
from symgen.errors import ConfigError


def test_compiled_product_equals_the_eager_and_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]  # two batch shapes
    params = F.params_of(model)
    dense = hessian(lambda v: TF.cross_entropy(F.call(model, F.unflatten(v, params), None, x), y), F.flatten(params))
    V = torch.randn(dense.shape[0], 3, dtype=torch.float64, generator=g)
    eager = HessianOperator(model, TF.cross_entropy, batches).matmat(V)
    compiled = HessianOperator(model, TF.cross_entropy, batches, compile="aot_eager")
    assert compiled.hvp_mode == "forward"
    out = compiled.matmat(V)
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, dense @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled.matvec(V[:, 1]), out[:, 1], rtol=1e-12, atol=1e-14)  # again: cached
    with pytest.raises(ConfigError, match="compile"):
        HessianOperator(model, TF.cross_entropy, batches, compile=3)
