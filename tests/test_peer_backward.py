"""PEER's backward (layer.forward_train / layer.backward over moe_peer_backward) against the
float64 reference peer_backward (checked against finite differences in
test_reference_backward.py): every activation, per-head and shared sub-keys, d_out != d,
sparse expert-row gradients (only the rows used, never (N, d)), bitwise determinism across
thread counts and batches, edge sizes and errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import moe
from moe import reference as ref
from test_properties import _settings  # fixed examples unless MOE_TEST_SEED
from test_backward import assert_grad, check_context_errors, grads_at_1_and_2_threads


def check(layer, x, rng, conditioned=False):
    """The layer's gradients against the reference; conditioned: allow, besides the
    relative tolerance, 10x the reference's own change when dy moves by an ulp, and 1e-9
    (O(1) inputs: a gradient that cancels to rounding noise, such as a softmax over tied
    scores, is zero to float32) (see
    test_backward.assert_grad)."""
    y, ctx = layer.forward_train(x)
    np.testing.assert_array_equal(y, layer(x))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g = layer.backward(ctx, dy)
    assert set(g) == {"x"} | set(layer.trainable_weights())
    x2 = x.reshape(-1, layer.d_model)

    def reference(dy):
        return ref.peer_backward(x2, layer.w_query, layer.sub_keys_1, layer.sub_keys_2,
                                 layer.u, layer.v, dy.reshape(x2.shape[0], layer.d_out),
                                 layer.top_k, layer.activation)
    r = reference(dy)
    noise = dict.fromkeys(r, 0.0)
    if conditioned:
        away = np.where(rng.standard_normal(dy.shape) < 0, -np.inf, np.inf)
        r2 = reference(np.nextafter(dy, away.astype(np.float32)))
        noise = {key: 10 * np.linalg.norm(r2[key] - r[key]) + 1e-9 for key in r}
    ids = ctx.routing.expert_ids.reshape(-1)
    for name in ("u", "v"):
        rows = g[name]
        assert isinstance(rows, moe.SparseRows)
        np.testing.assert_array_equal(rows.indices, np.unique(ids))  # the rows used, once
        assert rows.values.shape == (rows.indices.size, getattr(layer, name).shape[1])
        dense = np.zeros(r[name].shape, np.float32)
        dense[rows.indices] = rows.values
        assert_grad(dense, r[name], name, noise[name])
        np.testing.assert_array_equal(rows.to_dense(), dense)
    for name in ("w_query", "sub_keys_1", "sub_keys_2"):
        assert_grad(g[name], r[name], name, noise[name])
    assert_grad(g["x"].reshape(x2.shape), r["dx"], "x", noise["dx"])
    return g


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("per_head_keys", [True, False])
def test_matches_reference(activation, per_head_keys):
    rng = np.random.default_rng(len(activation) + per_head_keys)
    layer = moe.PEER(20, 7, n_heads=3, top_k=4, d_key=8, activation=activation,
                     per_head_keys=per_head_keys, d_out=13, seed=3)
    check(layer, rng.standard_normal((2, 11, 20)).astype(np.float32), rng)


def test_sparse_rows_of_a_million_experts():
    """n = 1000 sub-keys: N = 10^6 experts; the gradient holds only the rows used."""
    rng = np.random.default_rng(2)
    layer = moe.PEER(8, 1000, n_heads=2, top_k=4, d_key=8, seed=0)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    y, ctx = layer.forward_train(x)
    g = layer.backward(ctx, np.ones(y.shape, np.float32))
    assert g["u"].n_rows == 10**6 and g["u"].indices.size <= 6 * 2 * 4
    assert g["u"].values.nbytes <= 6 * 2 * 4 * 8 * 4
    # SGD on the used rows only
    u = layer.u.copy()
    u[g["u"].indices] -= 0.1 * g["u"].values
    assert np.count_nonzero((u != layer.u).any(axis=1)) <= g["u"].indices.size


def test_edge_sizes():
    rng = np.random.default_rng(4)
    layer = moe.PEER(10, 3, n_heads=2, top_k=3, d_key=2, seed=1)  # top_k == n
    for T in (1, 0):
        x = rng.standard_normal((T, 10)).astype(np.float32)
        g = check(layer, x, rng)
        if T == 0:
            assert g["u"].indices.size == 0 and not g["w_query"].any()
    wide = rng.standard_normal((5, 20)).astype(np.float32)
    check(layer, wide[:, ::2], rng)  # a strided x


def test_bitwise_threads_and_batch():
    rng = np.random.default_rng(6)
    layer = moe.PEER(48, 16, n_heads=4, top_k=8, d_key=16, activation="gelu", seed=2)
    x = rng.standard_normal((100, 48)).astype(np.float32)
    dy = rng.standard_normal((100, 48)).astype(np.float32)
    g = grads_at_1_and_2_threads(layer, x, dy)
    for t in (0, 57, 99):
        y, ctx = layer.forward_train(x[t:t + 1])
        np.testing.assert_array_equal(layer.backward(ctx, dy[t:t + 1])["x"][0],
                                      g["x"][t])


@_settings(20)
@given(T=st.integers(0, 12), d=st.integers(1, 10), n=st.integers(1, 6), H=st.integers(1, 3),
       data=st.data())
def test_property_shapes(T, d, n, H, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    k = data.draw(st.integers(1, n))
    layer = moe.PEER(d, n, n_heads=H, top_k=k, d_key=2 * data.draw(st.integers(1, 3)),
                     activation=data.draw(st.sampled_from(["relu", "gelu", "silu",
                                                           "identity"])),
                     per_head_keys=data.draw(st.booleans()),
                     d_out=data.draw(st.integers(1, 8)), seed=1)
    check(layer, rng.standard_normal((T, d)).astype(np.float32), rng, conditioned=True)


def test_errors():
    rng = np.random.default_rng(1)
    layer = moe.PEER(10, 4, n_heads=2, top_k=2, seed=0)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    y, ctx = layer.forward_train(x)
    check_context_errors(layer, ctx, y, y[:, :-1], moe.PEER(10, 4, n_heads=2, top_k=2),
                         "w_query")
    bad = dict(ctx.saved)
    with pytest.raises(ValueError, match="not an expert id"):
        moe._C.peer_backward(bad["args"], {}, np.full_like(bad["ids"], 999), y)
