"""moe.PEER (product-key expert retrieval) against moe.reference.peer_forward, which scores
all N = n^2 experts by brute force: outputs and gates to the fp32 tolerance, expert ids
exactly (so the product-key search must find the exact top-k).  Shapes off the kernels'
widths, k = 1 and k = n, one and zero tokens, tied scores (integer weights, exact in
float64), non-contiguous and float64 input, shared vs per-head keys, a million experts,
bitwise batch and thread invariance, bad input raising errors that name the argument, and
memory and reference counts flat over repeated calls (tests/test_leaks.py's checks).
"""
import sys

import numpy as np
import pytest

import moe
from conftest import skip_under_asan
from moe import _C, reference
from test_leaks import assert_flat, needs_statm, raises
from tolerances import assert_close, assert_int_equal


def randomize(layer, make):
    """The layer's weights redrawn from the test's generator (never exact zeros)."""
    for name in ("w_query", "sub_keys_1", "sub_keys_2", "u", "v"):
        a = getattr(layer, name)
        setattr(layer, name, make.normal(*a.shape))
    return layer


def check(layer, x):
    """layer(x) against the brute-force reference; returns (out, routing)."""
    out, routing = layer(x, return_routing=True)
    x2 = np.asarray(x, np.float32).reshape(-1, layer.d_model)
    ref = reference.peer_forward(x2, layer.w_query, layer.sub_keys_1, layer.sub_keys_2,
                                 layer.u, layer.v, layer.top_k, layer.activation)
    lead = np.shape(x)[:-1]
    H, k = layer.n_heads, layer.top_k
    assert out.dtype == np.float32 and out.shape == lead + (layer.d_out,)
    assert routing.expert_ids.dtype == np.int32 and routing.expert_ids.shape == lead + (H, k)
    assert routing.gates.dtype == np.float32 and routing.gates.shape == lead + (H, k)
    assert_int_equal(routing.expert_ids.reshape(-1, H, k), ref["expert_ids"],
                     what="expert_ids")
    assert_close(routing.gates.reshape(-1, H, k), ref["gates"], what="gates")
    assert_close(out.reshape(-1, layer.d_out), ref["out"], what="out")
    return out, routing


# ---- against the reference --------------------------------------------------------------

@pytest.mark.parametrize("T,d,n,H,k,d_key,d_out", [
    (30, 16, 8, 2, 4, 8, None),     # two blocks of tokens
    (53, 13, 11, 3, 5, 6, 7),       # nothing a multiple of the kernels' widths
    (7, 40, 20, 1, 8, 2, 33),       # d_key = 2: one-element halves
    (25, 9, 17, 4, 3, 10, None),
])
@pytest.mark.parametrize("per_head_keys", [True, False])
def test_matches_reference(make, T, d, n, H, k, d_key, d_out, per_head_keys):
    layer = randomize(moe.PEER(d, n, H, k, d_key, d_out=d_out,
                               per_head_keys=per_head_keys), make)
    check(layer, make.normal(T, d))


@pytest.mark.parametrize("activation", moe.peer.PEER_ACTIVATIONS)
def test_activations(make, activation):
    layer = randomize(moe.PEER(12, 9, 2, 3, 4, activation), make)
    check(layer, make.normal(31, 12))


@pytest.mark.parametrize("k", [1, 2, 9])
def test_top_k_edges(make, k):
    # k = 1 and k = n (every sub-key kept, all n^2 candidates summed)
    layer = randomize(moe.PEER(10, 9, 3, k, 4), make)
    _, routing = check(layer, make.normal(29, 10))
    if k == 9:
        assert (np.sort(routing.expert_ids, axis=-1) < 81).all()


def test_one_and_zero_tokens(make):
    layer = randomize(moe.PEER(8, 6, 2, 3, 4), make)
    check(layer, make.normal(1, 8))
    check(layer, make.normal(8))  # a single token without a batch axis
    out, routing = layer(np.zeros((0, 8), np.float32), return_routing=True)
    assert out.shape == (0, 8) and routing.expert_ids.shape == (0, 2, 3)
    assert layer(np.zeros((4, 0, 8))).shape == (4, 0, 8)


def test_leading_axes(make):
    layer = randomize(moe.PEER(8, 5, 2, 2, 4), make)
    out, routing = check(layer, make.normal(3, 4, 8))
    assert out.shape == (3, 4, 8) and routing.gates.shape == (3, 4, 2, 2)


def test_million_experts(make):
    # n = 1024: N = 1,048,576 experts; the reference scores all of them (few tokens).
    layer = moe.PEER(4, 1024, 2, 4, 4, seed=3)
    x = make.normal(3, 4)
    check(layer, x)


# ---- ties ----------------------------------------------------------------------------

def integer_layer(make, n, H, k, d, per_head_keys=True, low=-1, high=2):
    """Weights of small integers: every query and score is an exact integer in float64, so
    ties are exact in the core and the reference alike."""
    layer = randomize(moe.PEER(d, n, H, k, 4, per_head_keys=per_head_keys), make)
    for name in ("w_query", "sub_keys_1", "sub_keys_2"):
        shape = getattr(layer, name).shape
        setattr(layer, name, make.rng.integers(low, high, size=shape).astype(np.float32))
    return layer


@pytest.mark.parametrize("per_head_keys", [True, False])
def test_tied_scores_go_to_lower_ids(make, per_head_keys):
    layer = integer_layer(make, 12, 3, 5, 6, per_head_keys)
    x = make.rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    check(layer, x)


def test_all_scores_tied(make):
    layer = integer_layer(make, 7, 2, 4, 5, low=1, high=2)  # every key row is all ones
    layer.w_query = np.ones_like(layer.w_query)
    x = np.ones((3, 5), np.float32)
    _, routing = check(layer, x)
    # every expert scores the same: the lowest ids e = 0 * n + j, j = 0..k-1
    assert (routing.expert_ids == np.arange(4)).all()
    assert_close(routing.gates, np.full((3, 2, 4), 0.25))


def test_duplicate_sub_keys(make):
    layer = integer_layer(make, 9, 2, 3, 6)
    layer.sub_keys_1[:, 5] = layer.sub_keys_1[:, 2]  # rows 2 and 5 tie for every query
    layer.sub_keys_2[:, 8] = layer.sub_keys_2[:, 0]
    check(layer, make.rng.integers(-2, 3, size=(30, 6)).astype(np.float32))


# ---- layouts and invariance ------------------------------------------------------------------

def test_non_contiguous_and_float64_x(make):
    layer = randomize(moe.PEER(10, 7, 2, 3, 4), make)
    wide = make.normal(25, 20)
    want = check(layer, np.ascontiguousarray(wide[:, ::2]))[0]
    assert np.array_equal(layer(wide[:, ::2]), want)
    assert np.array_equal(layer(np.asfortranarray(wide[:, ::2])), want)
    assert np.array_equal(layer(wide[:, ::2].astype(np.float64)), want)
    assert np.array_equal(layer(make.DLPackOnly(np.ascontiguousarray(wide[:, ::2]))), want)


def test_shared_keys_equal_tiled_per_head_keys(make):
    shared = randomize(moe.PEER(12, 8, 3, 4, 6, per_head_keys=False), make)
    per_head = moe.PEER(12, 8, 3, 4, 6, init=False)
    per_head.w_query, per_head.u, per_head.v = shared.w_query, shared.u, shared.v
    per_head.sub_keys_1 = np.tile(shared.sub_keys_1, (3, 1, 1))
    per_head.sub_keys_2 = np.tile(shared.sub_keys_2, (3, 1, 1))
    x = make.normal(20, 12)
    a, ra = shared(x, return_routing=True)
    b, rb = per_head(x, return_routing=True)
    assert np.array_equal(a, b) and np.array_equal(ra.expert_ids, rb.expert_ids)


@pytest.fixture
def keep_threads():
    before = moe.get_num_threads()
    yield
    moe.set_num_threads(before)


def test_batch_and_thread_invariance(make, keep_threads):
    # A token's output is bitwise the same alone, anywhere in a batch (across blocks of
    # tokens), and on one or two threads.
    layer = randomize(moe.PEER(24, 16, 4, 4, 8), make)
    x = make.normal(60, 24)
    moe.set_num_threads(2)
    out, routing = layer(x, return_routing=True)
    for t in (0, 1, 23, 24, 30, 59):
        alone, r = layer(x[t:t + 1], return_routing=True)
        assert np.array_equal(alone[0], out[t]), f"token {t}"
        assert np.array_equal(r.gates[0], routing.gates[t])
    perm = make.rng.permutation(60)
    assert np.array_equal(layer(x[perm]), out[perm])
    moe.set_num_threads(1)
    assert np.array_equal(layer(x), out)


def test_weights_read_each_call(make):
    layer = randomize(moe.PEER(8, 5, 2, 2, 4), make)
    x = make.normal(6, 8)
    before = layer(x)
    layer.v *= 2  # in place: no repacking step to forget
    assert_close(layer(x), 2 * before.astype(np.float64))


# ---- bad input -------------------------------------------------------------------------

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="top_k"):
        moe.PEER(8, 4, 2, 5)
    with pytest.raises(ValueError, match="top_k"):
        moe.PEER(8, 4, 2, 0)
    with pytest.raises(ValueError, match="d_key must be even"):
        moe.PEER(8, 4, 2, 2, 5)
    with pytest.raises(ValueError, match="n_sub_keys"):
        moe.PEER(8, 46341, 1, 1, init=False)
    with pytest.raises(ValueError, match="activation"):
        moe.PEER(8, 4, activation="swiglu", top_k=2)
    with pytest.raises(TypeError, match="n_heads"):
        moe.PEER(8, 4, 2.0, 2)


def test_bad_weight_shapes(make):
    layer = moe.PEER(8, 5, 2, 3, 4)
    with pytest.raises(ValueError, match=r"u must have shape \(n_experts=25, d_model=8\)"):
        layer.u = make.normal(24, 8)
    with pytest.raises(ValueError, match=r"sub_keys_1 must have shape \(n_heads=2"):
        layer.sub_keys_1 = make.normal(5, 2)
    with pytest.raises(ValueError, match="w_query"):
        layer.w_query = make.normal(2, 4, 7)
    with pytest.raises(TypeError, match="v"):
        layer.v = np.ones((25, 8), np.int32)
    shared = moe.PEER(8, 5, 2, 3, 4, per_head_keys=False)
    with pytest.raises(ValueError, match=r"sub_keys_2 must have shape \(n_sub_keys=5"):
        shared.sub_keys_2 = make.normal(2, 5, 2)
    with pytest.raises(ValueError, match="w_query is not set"):
        moe.PEER(8, 5, 2, 3, 4, init=False)(make.normal(1, 8))


def test_bad_call_arguments(make):
    layer = randomize(moe.PEER(8, 5, 2, 3, 4), make)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(make.normal(3, 7))
    with pytest.raises(TypeError, match="x"):
        layer(np.ones((3, 8), np.int64))
    x = make.normal(30, 8)
    x[27, 3] = np.nan
    with pytest.raises(ValueError, match="x must be finite.*token 27"):
        layer(x)
    layer.sub_keys_2[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="sub_keys_2 must be finite"):
        layer(make.normal(3, 8))
    layer.sub_keys_2[1, 2, 0] = 1.0
    layer.w_query[1, 0, 0] = -np.nan
    with pytest.raises(ValueError, match="w_query must be finite"):
        layer(make.normal(3, 8))


@pytest.mark.parametrize("where", [(0, 0, 0), (2, 13, 1), (2, 13, 4), (2, 16, 3)])
def test_non_finite_weights_found_anywhere(make, where):
    # a full panel of 8 sub-keys (4 dimensions at a time, then the 5th) and a partial one
    layer = randomize(moe.PEER(8, 17, 3, 2, 10), make)
    layer.sub_keys_1[where] = np.inf
    flat = np.ravel_multi_index(where, layer.sub_keys_1.shape)
    with pytest.raises(ValueError, match=f"sub_keys_1 must be finite.*index {flat}"):
        layer(make.normal(2, 8))


def test_binding_checks(make):
    x, wq = make.normal(4, 8), make.normal(2, 4, 8)
    k = make.normal(2, 5, 2)
    u, v = make.normal(25, 8), make.normal(25, 6)

    def peer(**change):
        kw = dict(x=x, w_query=wq, sub_keys_1=k, sub_keys_2=k, u=u, v=v, top_k=3,
                  activation=0, return_routing=False)
        return _C.peer_forward(**{**kw, **change})

    assert peer()[0].shape == (4, 6)
    with pytest.raises(ValueError, match="top_k must be in 1..n_sub_keys=5"):
        peer(top_k=6)
    with pytest.raises(ValueError, match="sub_keys_1 must have 1 .* key sets, got 3"):
        peer(sub_keys_1=make.normal(3, 5, 2))
    with pytest.raises(ValueError, match="sub_keys_2 must have shape"):
        peer(sub_keys_2=make.normal(2, 4, 2))
    with pytest.raises(ValueError, match="w_query must have shape .*d_key even"):
        peer(w_query=make.normal(2, 3, 8))
    with pytest.raises(ValueError, match="u must have shape"):
        peer(u=u[:24])
    with pytest.raises(ValueError, match="v must have shape"):
        peer(v=v[:24])
    with pytest.raises(ValueError, match="activation code"):
        peer(activation=4)
    with pytest.raises(ValueError, match="x must be a C-contiguous"):
        peer(x=np.asfortranarray(x))


# ---- leaks -------------------------------------------------------------------------------

@needs_statm
@skip_under_asan
def test_calls_keep_memory_flat(make):
    # tests/test_leaks.py's bounds: every array a call makes is >= 8 KiB
    layer = randomize(moe.PEER(64, 16, 4, 8, 8), make)
    x = make.normal(64, 64)
    assert_flat(lambda: layer(x, return_routing=True), "PEER(x, return_routing=True)")
    bad = x.copy()
    bad[40, 3] = np.nan
    assert_flat(raises(lambda: layer(bad, return_routing=True), ValueError), "PEER(NaN x)")


def test_binding_keeps_reference_counts(make):
    layer = randomize(moe.PEER(16, 6, 2, 3, 4), make)
    args = [make.normal(5, 16), layer.w_query, layer.sub_keys_1, layer.sub_keys_2, layer.u,
            layer.v]
    names = ("x", "w_query", "sub_keys_1", "sub_keys_2", "u", "v")
    before = [sys.getrefcount(a) for a in args]
    for routing in (False, True):
        for _ in range(20):
            result = _C.peer_forward(**dict(zip(names, args)), top_k=3, activation=0,
                                     return_routing=routing)
            for r in result:
                if r is not None:
                    assert sys.getrefcount(r) == 3  # result, r and the call's argument
            del result, r
    bad = args[0].copy()
    bad[1, 1] = np.inf
    for _ in range(20):
        with pytest.raises(ValueError):
            _C.peer_forward(**dict(zip(names, [bad] + args[1:])), top_k=3, activation=0,
                            return_routing=True)
    assert [sys.getrefcount(a) for a in args] == before
