"""Curvature, GGN and NTK of models built on torch's own attention (nn.TransformerEncoderLayer,
nn.MultiheadAttention, so F.scaled_dot_product_attention), with and without masks, against dense float64
references computed here with torch.autograd.functional under the math SDPA backend."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from symgen.curvature import GGNOperator, HessianOperator
from symgen.curvature.checks import FallbackWarning
from symgen.ntk import empirical_ntk

D, HEADS, SEQ, CLASSES, N = 8, 2, 5, 3, 4
CAUSAL = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True: may not attend


def _padding(x: torch.Tensor) -> torch.Tensor:
    """key_padding_mask (True: padded) from the data: padded positions are all zeros."""
    return (x == 0).all(-1)


class EncoderClassifier(nn.Module):
    """A user's model: one nn.TransformerEncoderLayer (LayerNorm, GELU or ReLU), mean pool, linear head."""

    def __init__(self, masked: bool, activation: str = "gelu"):
        super().__init__()
        self.masked = masked
        self.layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=16, activation=activation, batch_first=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        if self.masked:
            h = self.layer(x, src_mask=CAUSAL, src_key_padding_mask=_padding(x))
        else:
            h = self.layer(x)
        return self.head(h.mean(1))


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention used directly (need_weights=False: SDPA; True: torch's explicit softmax path)."""

    def __init__(self, masked: bool, need_weights: bool = False):
        super().__init__()
        self.masked, self.need_weights = masked, need_weights
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        masks = {"attn_mask": CAUSAL, "key_padding_mask": _padding(x)} if self.masked else {}
        h, _ = self.attn(x, x, x, need_weights=self.need_weights, **masks)
        return self.head((x + h).mean(1))


def _model(kind: str, masked: bool, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    if kind == "encoder":
        model = EncoderClassifier(masked)
    elif kind == "encoder_relu":
        model = EncoderClassifier(masked, activation="relu")
    else:
        model = AttentionClassifier(masked, need_weights=kind == "mha_weights")
    return model.to(dtype).eval()


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, SEQ, D, generator=g, dtype=dtype)
    for i in range(N):  # sample i padded at its last i % 3 positions (position 0 never is)
        x[i, SEQ - i % 3 :] = 0
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return x, y


def _flat(model):
    names = [k for k, p in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(w):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            n = s.numel()
            out[k] = w[i : i + n].reshape(s)
            i += n
        return out

    return theta, unflat


@functools.cache
def _dense_hessian_of(kind, masked):
    model, (x, y) = _model(kind, masked), _data()
    theta, unflat = _flat(model)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(
            lambda w: TF.cross_entropy(functional_call(model, unflat(w), (x,)), y), theta
        )


def _dense_jacobian(model, x):
    """(N * C, P): d vec(model(x)) / d theta."""
    theta, unflat = _flat(model)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.jacobian(lambda w: functional_call(model, unflat(w), (x,)).reshape(-1), theta)


KINDS = ["encoder", "encoder_relu", "mha", "mha_weights"]
CASES = [(k, m) for k in KINDS for m in (False, True)]


@pytest.mark.parametrize(("kind", "masked"), CASES)
def test_hessian_products_and_taylor_forms_match_dense_hessian(kind, masked):
    model, (x, y) = _model(kind, masked), _data()
    Hd = _dense_hessian_of(kind, masked)
    V = torch.randn(Hd.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scale = Hd.abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # Taylor mode must not fall back
        H = HessianOperator(model, TF.cross_entropy, (x, y))
        torch.testing.assert_close(H.matmat(V), Hd @ V, atol=1e-10 * scale, rtol=1e-8)
        forms = H.quadratic_forms(V)
    assert H.taylor, H.fallback_reasons
    exact = ((Hd @ V) * V).sum(0)
    torch.testing.assert_close(forms, exact, atol=1e-10 * scale, rtol=1e-8)
    plain = HessianOperator(model, TF.cross_entropy, (x, y), taylor=False).quadratic_forms(V)
    torch.testing.assert_close(plain, exact, atol=1e-10 * scale, rtol=1e-8)
    fwd = HessianOperator(model, TF.cross_entropy, (x, y), hvp_mode="forward", taylor=False)
    torch.testing.assert_close(fwd.matmat(V), Hd @ V, atol=1e-10 * scale, rtol=1e-8)


@pytest.mark.parametrize(("kind", "masked"), [("encoder", True), ("mha", False)])
def test_eigenvalues_match_eigvalsh_of_dense_hessian(kind, masked):
    model, (x, y) = _model(kind, masked), _data()
    exact = torch.linalg.eigvalsh(_dense_hessian_of(kind, masked))
    H = HessianOperator(model, TF.cross_entropy, (x, y))
    top = H.eigenvalues(2, tol=1e-8, generator=0)
    torch.testing.assert_close(top, exact.flip(0)[:2], rtol=1e-6, atol=1e-9)
    bottom = H.eigenvalues(1, "smallest", tol=1e-8, generator=0)
    torch.testing.assert_close(bottom, exact[:1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("kind", "masked"), CASES)
def test_ggn_matches_dense_jacobian_gauss_newton(kind, masked):
    model, (x, y) = _model(kind, masked), _data()
    J = _dense_jacobian(model, x)
    out = model(x).detach()
    H_out = torch.autograd.functional.hessian(lambda o: TF.cross_entropy(o.reshape(N, CLASSES), y), out.reshape(-1))
    G = J.T @ H_out @ J
    V = torch.randn(G.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    op = GGNOperator(model, TF.cross_entropy, (x, y))
    torch.testing.assert_close(op.matmat(V), G @ V, atol=1e-10 * G.abs().max(), rtol=1e-8)


@pytest.mark.parametrize(("kind", "masked"), CASES)
def test_empirical_ntk_matches_explicit_jacobian(kind, masked):
    model, (x, _) = _model(kind, masked), _data()
    J = _dense_jacobian(model, x).reshape(N, CLASSES, -1)
    exact = torch.einsum("iap,jbp->ijab", J, J)
    for method in ("jacobian", "ntvp", "structured", "auto"):
        theta = empirical_ntk(model, x, output="full", method=method)
        torch.testing.assert_close(theta, exact, atol=1e-10 * exact.abs().max(), rtol=1e-8, msg=method)


@pytest.mark.parametrize(("kind", "masked"), [("encoder", True), ("encoder", False), ("mha", True)])
def test_float32_fast_double_backward_agrees_with_float64(kind, masked):
    x64, y = _data()
    m64, m32 = _model(kind, masked), _model(kind, masked, torch.float32)
    V = torch.randn(sum(p.numel() for p in m64.parameters()), 2, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        H32 = HessianOperator(m32, TF.cross_entropy, (x64.float(), y))
        prod32, forms32 = H32.matmat(V), H32.quadratic_forms(V)
        G32 = GGNOperator(m32, TF.cross_entropy, (x64.float(), y)).matmat(V)
    assert H32.fast_double_backward and H32.taylor, H32.fallback_reasons
    H64 = HessianOperator(m64, TF.cross_entropy, (x64, y))
    prod64, forms64 = H64.matmat(V.double()), H64.quadratic_forms(V.double())
    G64 = GGNOperator(m64, TF.cross_entropy, (x64, y)).matmat(V.double())
    for a, b in ((prod32, prod64), (forms32, forms64), (G32, G64)):
        torch.testing.assert_close(a.double(), b, atol=1e-4 * b.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("method", ["jacobian", "ntvp"])
def test_differentiable_ntk_input_gradient_matches_finite_differences(method):
    # nn.MultiheadAttention alone: the input gradient of a torch.func Jacobian through LayerNorm is off
    # in torch 2.13 (plain torch.autograd agrees with finite differences), with or without attention
    model, (x, _) = _model("mha", True), _data()
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    d[x == 0] = 0  # keep the padding
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(empirical_ntk(model, xr, method=method, differentiable=True).sum(), xr)[0]
    eps = 1e-5
    fd = (empirical_ntk(model, x + eps * d).sum() - empirical_ntk(model, x - eps * d).sum()) / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-6, atol=1e-8)
