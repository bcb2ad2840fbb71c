"""moe.torch.PEER: gradients bit for bit the NumPy layer's backward, and against torch
autograd of an independent pure-torch PEER (He 2024, "Mixture of A Million Experts",
Algorithm 1) written here; u / v gradients sparse (COO, only the rows used); training with
SparseAdam + Adam; a million-expert layer stepping without a dense gradient; no_grad,
routing, frozen weights, state_dict / from_layer / deepcopy.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

import moe
import moe.torch as mt

D, N_SUB, H, K, DK, D_OUT = 12, 7, 3, 4, 8, 10

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda a: a}


def _module(rng, **opts):
    """A PEER module, every parameter redrawn and written in place through torch."""
    opts = {**dict(n_heads=H, top_k=K, d_key=DK, d_out=D_OUT, seed=1), **opts}
    m = mt.PEER(D, N_SUB, **opts)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape) * (1.5 / np.sqrt(p.shape[-1]))))
    return m


def _numpy_twin(m):
    layer = m.to_layer()
    twin = moe.PEER(**layer.config(), init=False)
    for n in layer._weight_names():
        setattr(twin, n, np.array(getattr(layer, n)))
    return twin


def _x(rng, shape=(2, 5, D)):
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).requires_grad_()


def _grads(m):
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy()
            for n, p in m.named_parameters()}


def torch_peer(x, w_query, k1, k2, u, v, top_k, act):
    """PEER (He 2024, Algorithm 1) in plain torch: per token and head the query, the two
    sub-key halves' top-k, the top-k of the k^2 sums, softmax gates, sum_j g_j act(u_e.x) v_e.
    Returns (y (T, d_out), expert ids (T, H, k))."""
    n_heads, dk, _ = w_query.shape
    half = dk // 2
    n = k1.shape[-2]
    if k1.dim() == 2:  # shared by the heads
        k1, k2 = k1.expand(n_heads, -1, -1), k2.expand(n_heads, -1, -1)
    q = torch.einsum("hkd,td->thk", w_query, x)
    s1 = torch.einsum("thc,hnc->thn", q[..., :half], k1)
    s2 = torch.einsum("thc,hnc->thn", q[..., half:], k2)
    v1, i1 = s1.topk(top_k, dim=-1)
    v2, i2 = s2.topk(top_k, dim=-1)
    sums = (v1[..., :, None] + v2[..., None, :]).flatten(-2)
    scores, flat = sums.topk(top_k, dim=-1)
    e = i1.gather(-1, flat // top_k) * n + i2.gather(-1, flat % top_k)
    gates = scores.softmax(-1)
    a = torch.einsum("thkd,td->thk", u[e], x)
    return torch.einsum("thk,thko->to", gates * act(a), v[e]), e


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("per_head_keys", [True, False])
def test_gradients_match_numpy_backward_bitwise(rng, activation, per_head_keys):
    m = _module(rng, activation=activation, per_head_keys=per_head_keys)
    twin = _numpy_twin(m)
    x = _x(rng)
    y, r = m(x, return_routing=True)
    dy = torch.from_numpy(rng.standard_normal(y.shape, dtype=np.float32))
    y.backward(dy)
    y2, ctx = twin.forward_train(x.detach().numpy())
    np.testing.assert_array_equal(y.detach().numpy(), y2)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ctx.routing.expert_ids)
    np.testing.assert_array_equal(r.gates.numpy(), ctx.routing.gates)
    g = twin.backward(ctx, dy.numpy())
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    for name in ("w_query", "sub_keys_1", "sub_keys_2"):
        grad = getattr(m, name).grad
        assert not grad.is_sparse
        np.testing.assert_array_equal(grad.numpy(), g[name])
    n_slots = x.shape[0] * x.shape[1] * H * K
    for name in ("u", "v"):
        grad = getattr(m, name).grad
        assert grad.is_sparse and grad.shape == getattr(m, name).shape
        grad = grad.coalesce()
        assert grad._nnz() <= n_slots
        np.testing.assert_array_equal(grad.indices()[0].numpy(), g[name].indices)
        np.testing.assert_array_equal(grad.values().numpy(), g[name].values)
        np.testing.assert_array_equal(grad.to_dense().numpy(), g[name].to_dense())


@pytest.mark.parametrize("activation,per_head_keys", [("relu", True), ("gelu", False),
                                                      ("silu", True), ("identity", True)])
def test_gradients_match_pure_torch_peer(rng, activation, per_head_keys):
    m = _module(rng, activation=activation, per_head_keys=per_head_keys)
    x = _x(rng, (9, D))
    y, r = m(x, return_routing=True)
    dy = rng.standard_normal(y.shape)
    y.backward(torch.from_numpy(dy.astype(np.float32)))
    # the reference, in float64 on copies of the weights
    leaves = {n: p.detach().double().clone().requires_grad_() for n, p in m.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y64, ids = torch_peer(x64, leaves["w_query"], leaves["sub_keys_1"], leaves["sub_keys_2"],
                          leaves["u"], leaves["v"], K, ACTS[activation])
    np.testing.assert_array_equal(ids.numpy(), r.expert_ids.numpy())  # the same selection
    np.testing.assert_allclose(y.detach().numpy(), y64.detach().numpy(), rtol=1e-5, atol=1e-5)
    (y64 * torch.from_numpy(dy)).sum().backward()
    ours = {**_grads(m), "x": x.grad.numpy()}
    ref = {**{n: t.grad.numpy() for n, t in leaves.items()}, "x": x64.grad.numpy()}
    for name, want in ref.items():
        err = np.linalg.norm(ours[name] - want)
        assert err <= 1e-4 * np.linalg.norm(want), (name, err, np.linalg.norm(want))


def test_training_lowers_the_loss(rng):
    torch.manual_seed(0)
    m = _module(rng)
    x = torch.from_numpy(rng.standard_normal((32, D), dtype=np.float32))
    target = torch.from_numpy(rng.standard_normal((32, D_OUT), dtype=np.float32))
    sparse = [m.u, m.v]
    dense = [p for n, p in m.named_parameters() if n not in ("u", "v")]
    opts = [torch.optim.SparseAdam(sparse, lr=1e-2), torch.optim.Adam(dense, lr=1e-2)]
    losses = []
    for _ in range(30):
        loss = F.mse_loss(m(x), target)
        loss.backward()
        assert m.u.grad.is_sparse and m.v.grad.is_sparse
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # the NumPy layer sees the trained weights (shared memory)
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), _numpy_twin(m)(x.numpy()))


def test_million_experts_step_without_a_dense_gradient(rng):
    m = mt.PEER(8, 1000, n_heads=2, top_k=4, d_key=8, seed=0)
    assert m.u.shape == (10**6, 8)
    x = _x(rng, (6, 8))
    before_u, before_v = m.u.detach().clone(), m.v.detach().clone()
    opt = torch.optim.SGD([m.u, m.v], lr=0.1)
    m(x).square().sum().backward()
    for p in (m.u, m.v):
        assert p.grad.is_sparse and p.grad._nnz() <= 6 * 2 * 4
        assert p.grad._values().shape == (p.grad._nnz(), 8)
    rows = m.u.grad.coalesce().indices()[0]
    opt.step()
    changed = (m.u.detach() != before_u).any(1).nonzero()[:, 0]
    assert set(changed.tolist()) <= set(rows.tolist()) and changed.numel() > 0
    assert (m.v.detach() != before_v).any(1).sum() <= rows.numel()
    assert m.w_query.grad.shape == m.w_query.shape and x.grad.shape == x.shape


def test_no_grad_routing_and_dtypes(rng):
    m = _module(rng)
    x = _x(rng)
    before = len(mt._CONTEXTS)
    with torch.no_grad():
        y, r = m(x, return_routing=True)
    assert not y.requires_grad and len(mt._CONTEXTS) == before
    twin = _numpy_twin(m)
    y2, r2 = twin(x.detach().numpy(), return_routing=True)
    np.testing.assert_array_equal(y.numpy(), y2)
    assert isinstance(r, mt.PEERRouting) and r.expert_ids.dtype == torch.int32
    assert r.expert_ids.shape == (2, 5, H, K) and r.gates.dtype == torch.float32
    np.testing.assert_array_equal(r.expert_ids.numpy(), r2.expert_ids)
    np.testing.assert_array_equal(r.gates.numpy(), r2.gates)
    y = m(x)
    assert len(mt._CONTEXTS) == before + 1
    del y  # nothing kept without a backward
    assert len(mt._CONTEXTS) == before
    with torch.no_grad():  # float64 in, float64 out, computed in float32
        y64 = m(x.detach().double())
    assert y64.dtype == torch.float64 and y64.shape == (2, 5, D_OUT)
    np.testing.assert_array_equal(y64.float().numpy(), y2)
    torch.library.opcheck(torch.ops.moe.peer_forward.default,
                          (x.detach().reshape(-1, D), [t.detach() for t in m._weights()],
                           m._layer_id, False))


def test_frozen_weights_get_no_gradient(rng):
    m = _module(rng)
    m.u.requires_grad_(False)
    m.w_query.requires_grad_(False)
    x = torch.from_numpy(rng.standard_normal((4, D), dtype=np.float32))  # no grad
    m(x).sum().backward()
    assert m.u.grad is None and m.w_query.grad is None
    assert m.v.grad.is_sparse and m.sub_keys_1.grad is not None


def test_state_dict_from_layer_and_copies(rng):
    m = _module(rng)
    sd = m.state_dict()
    assert list(sd) == ["w_query", "sub_keys_1", "sub_keys_2", "u", "v"]
    other = mt.PEER(D, N_SUB, n_heads=H, top_k=K, d_key=DK, d_out=D_OUT, seed=5)
    x = torch.from_numpy(rng.standard_normal((3, D), dtype=np.float32))
    with torch.no_grad():
        assert not torch.equal(other(x), m(x))
        other.load_state_dict(sd)
        np.testing.assert_array_equal(other(x).numpy(), m(x).numpy())
        np.testing.assert_array_equal(other.to_layer().u, m.to_layer().u)
    # from_layer: the NumPy layer's own memory
    layer = moe.PEER(D, N_SUB, n_heads=2, top_k=3, seed=2, per_head_keys=False)
    w = mt.from_layer(layer)
    assert isinstance(w, mt.PEER) and w.to_layer() is layer
    assert w.u.data_ptr() == layer.u.ctypes.data and w.sub_keys_1.shape == (N_SUB, 3)  # d_key 6
    with torch.no_grad():
        np.testing.assert_array_equal(w(x).numpy(), layer(x.numpy()))
        w.v.mul_(2)  # in place through torch: the layer sees it
    np.testing.assert_array_equal(layer.v, w.v.detach().numpy())
    c = copy.deepcopy(m)
    with torch.no_grad():
        np.testing.assert_array_equal(c(x).numpy(), m(x).numpy())
    assert c.u.data_ptr() != m.u.data_ptr()
    with pytest.raises(ValueError, match="not set"):
        mt.from_layer(moe.PEER(D, N_SUB, top_k=3, init=False))
