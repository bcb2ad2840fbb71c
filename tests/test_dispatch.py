"""moe.dispatch and moe.combine against moe.reference.

Dispatch's integer outputs (offsets, token_index, position, counts) and its gather
(x_sorted) must match exactly; combine within the fp32 tolerance.  Cases: empty experts,
all tokens on one expert, -1 slots, repeated experts, one and zero tokens, odd layouts.
"""
import numpy as np
import pytest

import moe
from moe import reference
from tolerances import assert_close, assert_int_equal


def check_dispatch(x, ids, E):
    res = moe.dispatch(x, ids, E)
    ref = reference.dispatch(np.asarray(x, np.float64), np.asarray(ids), E)
    T, k = np.shape(ids)
    N = int(ref["offsets"][-1])
    assert_int_equal(res.offsets, ref["offsets"], "offsets")
    assert_int_equal(res.counts, ref["counts"], "counts")
    assert_int_equal(res.token_index, ref["token_index"], "token_index")
    assert_int_equal(res.position, ref["position"], "position")
    assert res.offsets.shape == (E + 1,) and res.position.shape == (T, k)
    assert res.x_sorted.dtype == np.float32 and res.x_sorted.shape == (N, np.shape(x)[1])
    # a gather: exact copies of the float32 rows
    assert np.array_equal(res.x_sorted, np.asarray(x, np.float32)[ref["token_index"]])
    return res, ref


@pytest.mark.parametrize("T,k,E", [(200, 2, 8), (150, 3, 6), (97, 4, 12), (64, 1, 5)])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_dispatch_matches_reference(make, T, k, E, drop):
    x = make.normal(T, 40)
    ids = make.expert_ids(T, k, E, drop=drop)
    res, ref = check_dispatch(x, ids, E)
    assert res.offsets[-1] == (ids >= 0).sum()
    # stable: within an expert, rows are in token order
    for e in range(E):
        rows = res.token_index[res.offsets[e]:res.offsets[e + 1]]
        assert (np.diff(rows) >= 0).all()


def test_dispatch_repeated_experts_in_a_row(make):
    # the same expert twice for one token: slot order decides the row order
    x = make.normal(60, 16)
    ids = make.expert_ids(60, 4, 3, distinct=False)
    res, ref = check_dispatch(x, ids, 3)
    assert (ids[:, 0] == ids[:, 1]).any()


def test_empty_experts(make):
    T, E = 100, 6
    ids = make.rng.choice([0, 3], size=(T, 2)).astype(np.int32)
    res, _ = check_dispatch(make.normal(T, 24), ids, E)
    assert (res.counts[[1, 2, 4, 5]] == 0).all()
    assert res.offsets[1] == res.offsets[2] == res.offsets[3]


def test_all_tokens_on_one_expert(make):
    T, E = 120, 8
    ids = np.full((T, 1), 5, np.int32)
    res, _ = check_dispatch(make.normal(T, 33), ids, E)
    assert_int_equal(res.offsets, [0, 0, 0, 0, 0, 0, T, T, T])
    assert_int_equal(res.token_index, np.arange(T))
    assert_int_equal(res.position[:, 0], np.arange(T))


def test_minus_one_slots(make):
    T, k, E = 50, 3, 4
    ids = make.expert_ids(T, k, E)
    ids[::3, 1] = -1
    ids[7] = -1  # a token that goes nowhere
    res, _ = check_dispatch(make.normal(T, 8), ids, E)
    assert (res.position[ids == -1] == -1).all()
    assert (res.position[ids != -1] >= 0).all()
    assert 7 not in res.token_index
    # nothing dispatched at all
    res, _ = check_dispatch(make.normal(T, 8), np.full((T, k), -1, np.int32), E)
    assert res.x_sorted.shape == (0, 8) and (res.offsets == 0).all()


def test_one_token(make):
    res, _ = check_dispatch(make.normal(1, 19), np.array([[4, 0, 2]], np.int32), 6)
    assert_int_equal(res.position, [[2, 0, 1]])


@pytest.mark.parametrize("k", [1, 3])
def test_zero_tokens(k):
    res = moe.dispatch(np.empty((0, 16), np.float32), np.empty((0, k), np.int32), 5)
    assert_int_equal(res.offsets, np.zeros(6, np.int64))
    assert_int_equal(res.counts, np.zeros(5, np.int64))
    assert res.token_index.shape == (0,) and res.token_index.dtype.kind == "i"
    assert res.position.shape == (0, k)
    assert res.x_sorted.shape == (0, 16) and res.x_sorted.dtype == np.float32
    out = moe.combine(res.x_sorted, res.position, np.empty((0, k), np.float32))
    assert out.shape == (0, 16) and out.dtype == np.float32


@pytest.mark.parametrize("ids_dtype", [np.int8, np.int32, np.int64, np.uint16])
def test_dispatch_id_dtypes(make, ids_dtype):
    x = make.normal(40, 12)
    check_dispatch(x, make.expert_ids(40, 2, 7).astype(ids_dtype), 7)


def test_dispatch_odd_layouts(make):
    T, k, E, d = 80, 2, 6, 20
    big = make.normal(2 * T, 3 * d)
    x = big[::2, ::3]
    ids = np.asfortranarray(make.expert_ids(T, k, E, drop=0.1))
    res, _ = check_dispatch(x, ids, E)
    want = moe.dispatch(np.ascontiguousarray(x), np.ascontiguousarray(ids), E)
    for a, b in zip(res, want):
        assert np.array_equal(a, b)
    res64, _ = check_dispatch(x.astype(np.float64), ids.astype(np.int64), E)
    assert np.array_equal(res64.x_sorted, res.x_sorted)
    dl = moe.dispatch(make.DLPackOnly(np.ascontiguousarray(x)), ids, E)
    assert np.array_equal(dl.x_sorted, res.x_sorted)


def test_dispatch_combine_torch_tensors(make):
    torch = pytest.importorskip("torch")
    x = make.normal(30, 12)
    ids = make.expert_ids(30, 2, 5, drop=0.1).astype(np.int64)
    want = moe.dispatch(x, ids, 5)
    got = moe.dispatch(torch.from_numpy(x), torch.from_numpy(ids), 5)
    for a, b in zip(got, want):
        assert isinstance(a, np.ndarray) and np.array_equal(a, b)
    w = make.normal(30, 2)
    assert np.array_equal(moe.combine(torch.from_numpy(want.x_sorted),
                                      torch.from_numpy(want.position), torch.from_numpy(w)),
                          moe.combine(want.x_sorted, want.position, w))


def test_dispatch_unaligned(make):
    T, k, E = 30, 2, 4
    x = make.normal(T, 10)
    ids = make.expert_ids(T, k, E)
    want = moe.dispatch(x, ids, E)
    got = moe.dispatch(make.unaligned(x), make.unaligned(ids), E)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


# ---- combine -----------------------------------------------------------------------------

def check_combine(y, position, weights):
    out = moe.combine(y, position, weights)
    ref = reference.combine(np.asarray(y, np.float64), np.asarray(position),
                            np.asarray(weights, np.float64))
    assert out.dtype == np.float32
    assert_close(out, ref, what="combine")
    return out, ref


@pytest.mark.parametrize("T,k,E,d", [(200, 2, 8, 64), (77, 3, 6, 37), (1, 4, 4, 5)])
def test_combine_matches_reference(make, T, k, E, d):
    ids = make.expert_ids(T, k, E, drop=0.2)
    disp = moe.dispatch(make.normal(T, d), ids, E)
    y = make.normal(disp.x_sorted.shape[0], d)
    w = make.normal(T, k)
    check_combine(y, disp.position, w)


def test_combine_skips_minus_one(make):
    T, k, N, d = 20, 3, 25, 16
    pos = make.rng.permutation(N)[: T * k // 2]
    position = np.full(T * k, -1, np.int64)
    position[make.rng.choice(T * k, size=len(pos), replace=False)] = pos
    position = position.reshape(T, k)
    position[4] = -1
    out, _ = check_combine(make.normal(N, d), position, make.normal(T, k))
    assert (out[4] == 0).all()
    # the weight of a skipped slot is never read, even if it is not finite
    w = make.normal(T, k)
    w[position == -1] = np.nan
    assert np.isfinite(moe.combine(make.normal(N, d), position, w)).all()


def test_combine_reads_any_row_order(make):
    # positions need not come from dispatch: any rows, repeated or not, in any order
    N, d, T, k = 10, 12, 30, 2
    position = make.rng.integers(0, N, size=(T, k))
    check_combine(make.normal(N, d), position, make.normal(T, k))


def test_combine_odd_layouts(make):
    T, k, N, d = 40, 2, 60, 24
    y = make.normal(N, 2 * d)[:, ::2]
    position = np.asfortranarray(make.rng.integers(-1, N, size=(T, k)))
    w = make.normal(k, T, dtype=np.float64).T
    out, _ = check_combine(y, position, w)
    same = moe.combine(np.ascontiguousarray(y), np.ascontiguousarray(position),
                       np.ascontiguousarray(w, dtype=np.float32))
    assert np.array_equal(out, same)


def test_combine_unaligned(make):
    T, k, N, d = 20, 2, 30, 8
    y, w = make.normal(N, d), make.normal(T, k)
    position = make.rng.integers(0, N, size=(T, k))
    want = moe.combine(y, position, w)
    got = moe.combine(make.unaligned(y), make.unaligned(position), make.unaligned(w))
    assert np.array_equal(got, want)


# ---- round trip --------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax-after-topk"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_dispatch_combine_round_trip(make, scoring, k):
    # identity experts and weights that sum to 1 give the input back
    T, E, d = 150, 8, 48
    x = make.normal(T, d)
    r = moe.route(make.logits(T, E), k, scoring=scoring, renormalize=True)
    disp = moe.dispatch(x, r.expert_ids, E)
    out = moe.combine(disp.x_sorted, disp.position, r.weights)
    assert_close(out, x, what="round trip")
    if k == 1:  # a single weight of exactly 1: bit for bit
        assert (r.weights == 1).all()
        assert np.array_equal(out, x)
