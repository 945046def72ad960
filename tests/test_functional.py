"""The functional core against plain module calls, explicit loops and dense autograd."""

import pytest
import torch
from torch import nn

from symgen import functional as F
from symgen import rng
from symgen.curvature.products import hvp_function
from symgen.errors import ShapeError


def _mlp(bn: bool = False) -> nn.Module:
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def test_call_matches_module():
    m = _mlp()
    x = torch.randn(5, 4, dtype=torch.float64)
    p, b = F.state_of(m)
    assert torch.allclose(F.call(m, p, b, x), m(x))
    p2 = F.tree_map(lambda t: t + 1.0, p)
    with torch.no_grad():
        for _name, t in m.named_parameters():
            t.add_(1.0)
    assert torch.allclose(F.call(m, p2, b, x), m(x))


def test_stacked_init_equals_loop_and_ensemble_call():
    base, P, B = F.stacked_init(lambda: _mlp(bn=True), 4, generator=7)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = F.ensemble_call(base, P, B, x)
    assert out.shape == (4, 8, 3)
    for m in range(4):
        torch.manual_seed(7 + m)
        ref = _mlp(bn=True)
        assert torch.allclose(out[m], ref(x), atol=1e-12)
        # BatchNorm running statistics were updated per member, as the module's own were.
        assert torch.allclose(B["1.running_mean"][m], ref[1].running_mean, atol=1e-12)


def test_ensemble_call_per_member_inputs():
    base, P, B = F.stacked_init(_mlp, 3, generator=0)
    xs = torch.randn(3, 5, 4, dtype=torch.float64)
    out = F.ensemble_call(base, P, B, xs, shared_input=False)
    for m in range(3):
        assert torch.allclose(out[m], F.call(base, F.unstack(P, m), None, xs[m]))


def test_flatten_roundtrip_and_errors():
    p = F.params_of(_mlp())
    v = F.flatten(p)
    assert v.numel() == F.num_params(p)
    back = F.unflatten(v, p)
    assert all(torch.equal(back[k], p[k]) for k in p)
    with pytest.raises(ShapeError):
        F.unflatten(v[:-1], p)
    with pytest.raises(ShapeError):
        F.stack([p, {"other": v}])


def test_hvp_matches_dense_hessian():
    m = _mlp()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    p = F.params_of(m)
    f = F.loss_function(m, nn.functional.mse_loss)
    v = rng.randn_like(p, torch.Generator().manual_seed(1))
    hv = F.flatten(F.hvp(lambda q: f(q, x, y), p, v))
    flat = F.flatten(p)
    H = torch.func.hessian(lambda w: f(F.unflatten(w, p), x, y))(flat)
    assert torch.allclose(hv, H @ F.flatten(v), atol=1e-10)


def test_rademacher_and_tree_ops():
    p = F.params_of(_mlp())
    r = rng.rademacher_like(p, torch.Generator().manual_seed(0), num=3)
    assert all(set(t.unique().tolist()) <= {-1.0, 1.0} and t.shape[0] == 3 for t in r.values())
    assert torch.isclose(F.tree_norm(p) ** 2, (F.flatten(p) ** 2).sum())


def _dense_jacobian(module, params, x):
    """Full Jacobian d vec(module(x)) / d flat(params) by a loop of autograd.grad over outputs."""
    flat = F.flatten(params).clone().requires_grad_(True)
    out = F.call(module, F.unflatten(flat, params), None, x).reshape(-1)
    rows = [torch.autograd.grad(out[k], flat, retain_graph=True)[0] for k in range(out.numel())]
    return torch.stack(rows)


def test_per_sample_jacobian_jvp_vjp_match_dense_jacobian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    p = F.params_of(net)
    x = torch.randn(4, 3, dtype=torch.float64)
    dense = _dense_jacobian(net, p, x)  # (4*2, P)
    jac = F.per_sample_jacobian(net, p, None, x, chunk_size=3)
    assert jac["0.weight"].shape == (4, 2, 5, 3)
    flat = torch.cat([j.reshape(4, 2, -1) for j in jac.values()], dim=-1).reshape(8, -1)
    torch.testing.assert_close(flat, dense)
    v = rng.randn_like(p, torch.Generator().manual_seed(1))
    out, tangent = F.jvp_outputs(net, p, None, x, v)
    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(tangent.reshape(-1), dense @ F.flatten(v))
    u = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(F.flatten(F.vjp_outputs(net, p, None, x, u)), dense.T @ u.reshape(-1))
    # a subset of parameters, the rest held fixed at values passed alongside the buffers
    sub = {"2.weight": p["2.weight"]}
    fixed = {k: v for k, v in p.items() if k != "2.weight"}
    jsub = F.per_sample_jacobian(net, sub, fixed, x)
    torch.testing.assert_close(jsub["2.weight"], jac["2.weight"])
    jslice = F.per_sample_jacobian(net, p, None, x, outputs=slice(1, 2))
    torch.testing.assert_close(jslice["0.bias"], jac["0.bias"][:, 1:2])


# --- curvature and perturbed copies (issue 4) ---


def test_hvp_function_reuses_graph_and_matches_dense_hessian():
    from torch.autograd.functional import hessian

    from symgen.errors import ConfigError

    torch.manual_seed(0)
    net = _mlp(bn=True).eval()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    p, b = F.state_of(net)
    f = F.loss_function(net, nn.functional.cross_entropy, b)
    dense = hessian(lambda v: f(F.unflatten(v, p), x, y), F.flatten(p))
    for mode in ("reverse", "forward"):
        hv = hvp_function(lambda q: f(q, x, y), p, mode=mode)
        for seed in range(3):  # the same function, several vectors
            v = rng.randn_like(p, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(F.flatten(hv(v)), dense @ F.flatten(v))
    with pytest.raises(ConfigError, match="mode"):
        hvp_function(lambda q: f(q, x, y), p, mode="sideways")


def test_ensemble_value_and_grad_matches_loop_with_per_member_bn_buffers():
    torch.manual_seed(0)
    net = _mlp(bn=True).train()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    p, b = F.state_of(net)
    members = [F.tree_add(p, rng.randn_like(p, torch.Generator().manual_seed(s)), 0.1) for s in range(3)]
    stacked = F.stack(members)
    bufs = {k: v.unsqueeze(0).expand((3,) + tuple(v.shape)).clone() for k, v in b.items()}

    def loss(q, bb, xx, yy):
        return nn.functional.cross_entropy(F.call(net, q, bb, xx), yy)

    values, grads = F.ensemble_value_and_grad(loss, stacked, bufs, x, y, in_dims=(0, None, None), chunk_size=2)
    for m, q in enumerate(members):
        qq = {k: v.clone().requires_grad_(True) for k, v in q.items()}
        out = loss(qq, {k: v.clone() for k, v in b.items()}, x, y)
        g = torch.autograd.grad(out, list(qq.values()))
        torch.testing.assert_close(values[m], out.detach())
        for k, gk in zip(qq, g, strict=True):
            torch.testing.assert_close(grads[k][m], gk)
    # each member's running statistics were updated in its own copy
    assert not torch.equal(bufs["1.running_mean"][0], bufs["1.running_mean"][1])
    with pytest.raises(ShapeError, match="in_dims"):
        F.ensemble_value_and_grad(loss, stacked, bufs, x, y, in_dims=(0,))


def test_math_attention_twice_differentiable_and_restores_fastpath():
    q = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):  # the fused CPU kernel: no double backward
        g = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
        torch.autograd.grad(g[0].pow(2).sum(), q)
    with F.math_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
        g = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
        torch.autograd.grad(g[0].pow(2).sum(), q)
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(ValueError), F.math_attention():
        raise ValueError
    assert torch.backends.mha.get_fastpath_enabled()
