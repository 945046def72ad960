"""The fast paths are taken where they should be, and a fallback says so.

symgen's reference models (symgen.models: the BN CNN, ResNet-20, the ViT, the BN MLP), in float32 on CPU, take
Taylor-mode quadratic forms and the fast double backward: no FallbackWarning, ``op.taylor`` and
``op.fast_double_backward`` True, no ``fallback_reasons``. Both paths give the products' numbers (the Taylor
forms equal ``v . (H v)`` from the retained-graph products)."""

import warnings

import pytest
import torch
import torch.nn.functional as TF

from symgen import models
from symgen.curvature import GGNOperator, HessianOperator
from symgen.curvature.checks import FallbackWarning
from symgen.rng import isolated_seed

REFERENCE = {
    "bn_cnn": (lambda: models.bn_cnn((3, 8, 8), 3, width=4), (3, 8, 8)),
    "resnet20": (lambda: models.resnet20(num_classes=3), (3, 8, 8)),
    "vit": (lambda: models.vit(image_size=8, patch_size=4, num_classes=3, dim=16, depth=1, heads=2), (3, 8, 8)),
    "bn_mlp": (lambda: models.build_model("mlp", (1, 6, 6), width=8, num_classes=3), (1, 6, 6)),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_models_take_the_fast_paths(name):
    build, shape = REFERENCE[name]
    with isolated_seed(0):
        model = build().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g)
    y = torch.randint(0, 3, (3,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        H = HessianOperator(model, TF.cross_entropy, (x, y))
        V = torch.randn(H.dim, 2, generator=g)
        forms = H.quadratic_forms(V)
        products = H.matmat(V)
        G = GGNOperator(model, TF.cross_entropy, (x, y))
        G.matmat(V[:, :1])
    assert [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)] == []
    assert H.taylor and H.fast_double_backward and H.fallback_reasons == {}
    assert G.fast_double_backward and "fast_double_backward" not in G.fallback_reasons
    want = (V.double() * products.double()).sum(0)
    torch.testing.assert_close(forms.double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_a_fallback_is_visible_once_and_the_numbers_stay_right():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Softplus(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    H = HessianOperator(model, TF.cross_entropy, (x, y))
    assert H.taylor and "taylor" not in H.fallback_reasons  # not tried yet
    V = torch.randn(H.dim, 3, generator=g, dtype=torch.float64)
    with pytest.warns(FallbackWarning, match="softplus") as caught:
        got = H.quadratic_forms(V)
        H.quadratic_forms(V)
    assert sum(issubclass(w.category, FallbackWarning) for w in caught) == 1
    assert not H.taylor and "softplus" in H.fallback_reasons["taylor"]
    # against the dense float64 Hessian of the same loss
    params = dict(model.named_parameters())
    names = list(params)

    def loss(flat):
        ps, i = {}, 0
        for k in names:
            n = params[k].numel()
            ps[k] = flat[i : i + n].reshape(params[k].shape)
            i += n
        return TF.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    dense = torch.autograd.functional.hessian(loss, flat)
    torch.testing.assert_close(got, torch.einsum("ik,ij,jk->k", V, dense, V), rtol=1e-10, atol=1e-12)
    # a path switched off by the user is not a fallback: no warning, the reason recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H2 = HessianOperator(model, TF.cross_entropy, (x, y), taylor=False)
        H2.quadratic_forms(V)
    assert H2.fallback_reasons["taylor"] == "taylor=False"
