"""moe.route and moe.update_expert_bias against moe.reference, option by option.

Covers every scoring, renormalisation, routed scaling, the selection-only expert bias,
group-limited top-k, capacity dropping, the two losses, ties, top_k == E, odd E, one and
zero tokens, input dtypes and layouts (Fortran, strided, DLPack, torch).
"""
import math

import numpy as np
import pytest

import moe
from moe import reference
from tolerances import (FP64_RTOL, assert_close, assert_ids_equal, assert_int_equal,
                        assert_scalar_close, assert_topk_sets)

SCORINGS = ("softmax", "softmax-after-topk", "sigmoid")


def check_route(logits, top_k, values=None, **options):
    """Run moe.route on logits and the reference on the same values (given separately
    when logits is not an array) and compare every field."""
    res = moe.route(logits, top_k, **options)
    values = np.asarray(logits if values is None else values, dtype=np.float64)
    ref = reference.route(values, top_k, **options)
    T, E = values.shape
    assert res.expert_ids.dtype == np.int32 and res.expert_ids.shape == (T, top_k)
    assert res.weights.dtype == np.float32 and res.weights.shape == (T, top_k)
    assert res.counts.dtype == np.int64 and res.counts.shape == (E,)
    assert_ids_equal(res.expert_ids, ref["expert_ids"])
    assert_close(res.weights, ref["weights"], what="weights")
    assert_int_equal(res.counts, ref["counts"], what="counts")
    assert res.n_dropped == ref["n_dropped"]
    assert_scalar_close(res.aux_loss, ref["aux_loss"], what="aux_loss")
    assert_scalar_close(res.z_loss, ref["z_loss"], what="z_loss")
    return res, ref


def selection_scores(logits, scoring, bias=None):
    """The scores top-k selects on (independent of the reference's code path)."""
    logits = np.asarray(logits, dtype=np.float64)
    if scoring == "softmax":
        s = reference.softmax(logits)
    elif scoring == "sigmoid":
        s = reference.sigmoid(logits)
    else:
        s = logits.copy()
    return s if bias is None else s + np.asarray(bias, dtype=np.float64)


# ---- scoring, renormalisation, scaling -------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("routed_scaling", [1.0, 2.5])
@pytest.mark.parametrize("E,k", [(8, 2), (6, 3), (12, 4), (64, 6)])
def test_route_matches_reference(make, scoring, renormalize, routed_scaling, E, k):
    logits = make.logits(200, E)
    res, ref = check_route(logits, k, scoring=scoring, renormalize=renormalize,
                           routed_scaling=routed_scaling)
    assert res.n_dropped == 0
    assert res.counts.sum() == 200 * k
    # each row: k distinct experts, best first (by the selection score)
    sel = selection_scores(logits, scoring)
    picked = np.take_along_axis(sel, res.expert_ids.astype(np.int64), axis=1)
    assert (np.diff(picked, axis=1) <= 0).all()
    if renormalize or scoring == "softmax-after-topk":
        assert_close(res.weights.sum(axis=1), np.full(200, routed_scaling), what="weight sums")


def test_weights_without_renormalize_are_the_scores(make):
    logits = make.logits(100, 12)
    for scoring, score in [("softmax", reference.softmax(logits)),
                           ("sigmoid", reference.sigmoid(logits))]:
        res = moe.route(logits, 3, scoring=scoring, renormalize=False, routed_scaling=1.5)
        want = 1.5 * np.take_along_axis(score, res.expert_ids.astype(np.int64), axis=1)
        assert_close(res.weights, want, what=scoring)


# ---- expert bias: selection only ----------------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_expert_bias_changes_selection_not_weights(make, scoring, renormalize):
    T, E, k = 200, 16, 4
    logits = make.logits(T, E)
    scale = 1.0 if scoring == "softmax-after-topk" else 0.1
    bias = make.normal(E, scale=scale)
    res, ref = check_route(logits, k, scoring=scoring, renormalize=renormalize,
                           expert_bias=bias, routed_scaling=2.0)
    plain = moe.route(logits, k, scoring=scoring, renormalize=renormalize, routed_scaling=2.0)
    # the bias must matter for this test to mean anything
    assert (np.sort(res.expert_ids, 1) != np.sort(plain.expert_ids, 1)).any(axis=1).sum() > 10
    # the ids are the top-k of the *biased* scores
    sel = selection_scores(logits, scoring, bias.astype(np.float64))
    picked = np.take_along_axis(sel, res.expert_ids.astype(np.int64), axis=1)
    others = sel.copy()
    np.put_along_axis(others, res.expert_ids.astype(np.int64), -np.inf, axis=1)
    assert (picked.min(axis=1) >= others.max(axis=1)).all()
    # ... but the weights come from the unbiased scores
    ids = res.expert_ids.astype(np.int64)
    if scoring == "softmax-after-topk":
        w = reference.softmax(np.take_along_axis(logits, ids, axis=1))
    else:
        w = np.take_along_axis(selection_scores(logits, scoring), ids, axis=1)
        if renormalize:
            w = w / w.sum(axis=1, keepdims=True)
    assert_close(res.weights, 2.0 * w, what="weights from unbiased scores")


def test_expert_bias_accepts_float64_and_lists(make):
    logits = make.logits(50, 8)
    bias = make.normal(8, scale=0.2, dtype=np.float64)
    a = moe.route(logits, 2, expert_bias=bias)
    b = moe.route(logits, 2, expert_bias=bias.tolist())
    c = moe.route(logits, 2, expert_bias=bias.astype(np.float32))
    for r in (b, c):
        assert np.array_equal(a.expert_ids, r.expert_ids)
        assert np.array_equal(a.weights, r.weights)


# ---- group-limited top-k ----------------------------------------------------------------

@pytest.mark.parametrize("E,n_groups,topk_groups,k,scoring,T", [
    (64, 8, 4, 6, "sigmoid", 200),    # DeepSeek-V3-like layout, scaled down to E=64
    (256, 8, 4, 8, "sigmoid", 80),    # DeepSeek-V3 routing shape
    (12, 4, 2, 3, "softmax", 200),    # E not a power of two
    (6, 3, 1, 2, "softmax-after-topk", 200),
    (8, 8, 3, 3, "sigmoid", 200),     # groups of one expert: scored by that expert alone
    (16, 4, 4, 4, "softmax", 200),    # every group eligible: plain top-k
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited(make, E, n_groups, topk_groups, k, scoring, T, with_bias):
    logits = make.logits(T, E)
    bias = make.normal(E, scale=0.05) if with_bias else None
    opts = dict(scoring=scoring, n_groups=n_groups, topk_groups=topk_groups,
                expert_bias=bias, routed_scaling=2.5)
    res, ref = check_route(logits, k, **opts)
    # every chosen expert lies in one of the topk_groups best groups (independent check)
    G = E // n_groups
    sel = selection_scores(logits, scoring, None if bias is None else bias.astype(np.float64))
    top2 = -np.sort(-sel.reshape(T, n_groups, G), axis=2)[:, :, :min(2, G)].sum(axis=2)
    best = np.argsort(-top2, axis=1, kind="stable")[:, :topk_groups]
    groups = res.expert_ids // G
    assert all(set(groups[t]) <= set(best[t]) for t in range(T))
    if topk_groups < n_groups and G > 1:
        # the limit must change some selection, or the test would not test it
        flat = reference.route(logits, k, scoring=scoring, expert_bias=bias)
        assert (np.sort(flat["expert_ids"], 1) != np.sort(res.expert_ids, 1)).any()
    else:  # all groups eligible, or groups of one expert with topk_groups >= k: plain top-k
        flat = moe.route(logits, k, scoring=scoring, expert_bias=bias, routed_scaling=2.5)
        assert np.array_equal(flat.expert_ids, res.expert_ids)


def test_group_ties_go_to_the_lower_group():
    # all groups tie: the first topk_groups groups are eligible, then the lowest experts
    logits = np.full((3, 8), 0.3)
    res = moe.route(logits, 3, scoring="sigmoid", n_groups=4, topk_groups=2)
    assert_int_equal(res.expert_ids, np.tile([0, 1, 2], (3, 1)))
    # groups 1 and 3 tie on their top-2 sum; topk_groups=1 must pick group 1
    row = np.array([0.0, 0.1, 2.0, 1.0, 0.5, 0.4, 1.0, 2.0]) + 0.25
    res = moe.route(row[None], 2, scoring="softmax-after-topk", n_groups=4, topk_groups=1)
    assert_int_equal(res.expert_ids, [[2, 3]])


# ---- capacity ----------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25, 8.0])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_capacity_factor(make, capacity_factor, scoring):
    T, E, k = 200, 8, 2
    logits = make.logits(T, E)
    logits[:, 0] += 0.8  # an over-subscribed expert
    res, ref = check_route(logits, k, scoring=scoring, capacity_factor=capacity_factor)
    cap = math.ceil(capacity_factor * T * k / E)
    assert res.counts.max() <= cap
    assert res.n_dropped == T * k - res.counts.sum()
    dropped = res.expert_ids == -1
    assert dropped.sum() == res.n_dropped
    assert (res.weights[dropped] == 0).all()
    if capacity_factor <= 1.0:
        assert res.n_dropped > 0 and res.counts.max() == cap
    # kept slots keep their dropless weights (no renormalisation after dropping)
    free = moe.route(logits, k, scoring=scoring)
    assert np.array_equal(res.weights[~dropped], free.weights[~dropped])
    assert np.array_equal(res.expert_ids[~dropped], free.expert_ids[~dropped])
    # the loss counts selections before dropping
    assert res.aux_loss == free.aux_loss
    if capacity_factor == 8.0:
        assert res.n_dropped == 0 and np.array_equal(res.expert_ids, free.expert_ids)


def test_capacity_all_tokens_on_one_expert(make):
    T, E = 100, 8
    logits = make.logits(T, E)
    logits[:, 3] += 20.0
    res, ref = check_route(logits, 1, capacity_factor=1.0)
    cap = math.ceil(T / E)
    want = np.full((T, 1), -1, np.int32)
    want[:cap] = 3
    assert_int_equal(res.expert_ids, want)
    assert (res.weights[cap:] == 0).all() and (res.weights[:cap] > 0).all()
    assert res.n_dropped == T - cap
    assert_int_equal(res.counts, np.eye(E, dtype=np.int64)[3] * cap)
    # top-2: the first slot always picks expert 3, which fills up with the first tokens
    res2, _ = check_route(logits, 2, capacity_factor=1.0)
    assert (res2.expert_ids[: math.ceil(T * 2 / E), 0] == 3).all()


# ---- losses ------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS)
def test_losses_on_uniform_logits(scoring):
    # every probability is 1/E: aux = E * sum_i f_i / E = 1; z = (c + log E)^2
    T, E, k, c = 7, 12, 3, 0.7
    res = moe.route(np.full((T, E), c), k, scoring=scoring)
    assert_scalar_close(res.aux_loss, 1.0, what="aux_loss")
    assert_scalar_close(res.z_loss, (c + math.log(E)) ** 2, what="z_loss")


def test_losses_match_the_formulas(make):
    T, E, k = 150, 10, 2
    logits = make.logits(T, E, dtype=np.float64) * 2.0
    res = moe.route(logits, k)
    f = np.bincount(res.expert_ids.ravel(), minlength=E) / (T * k)
    P = reference.softmax(logits).mean(axis=0)
    assert_scalar_close(res.aux_loss, E * np.sum(f * P), what="aux_loss")
    lse = np.log(np.exp(logits).sum(axis=1))
    assert_scalar_close(res.z_loss, np.mean(lse ** 2), what="z_loss")


@pytest.mark.parametrize("scoring", SCORINGS)
def test_extreme_logits(make, scoring):
    # every sigmoid score underflows to 0 below about -745: weights 0, losses still finite
    T, E, k = 40, 8, 3
    logits = make.logits(T, E) * 5.0
    logits[:10] = -800.0 + make.logits(10, E)
    logits[10:20] = -800.0
    logits[20:30] *= 100.0  # softmax over a +-1500 spread
    res, ref = check_route(logits, k, scoring=scoring)
    assert np.isfinite(res.weights).all() and np.isfinite(res.aux_loss)
    if scoring == "sigmoid":
        assert (res.weights[:20] == 0).all()
        assert_int_equal(res.expert_ids[10:20], np.tile(np.arange(k), (10, 1)))


# ---- ties --------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("E,k", [(8, 2), (6, 6), (12, 5)])
def test_all_equal_logits_pick_the_lowest_ids(scoring, E, k):
    res = moe.route(np.full((5, E), -1.25), k, scoring=scoring)
    assert_int_equal(res.expert_ids, np.tile(np.arange(k, dtype=np.int32), (5, 1)))
    assert_close(res.weights, np.full((5, k), 1.0 / k), what="tied weights")


@pytest.mark.parametrize("scoring", SCORINGS)
def test_duplicate_values_lower_index_first(scoring):
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0],
                       [5.0, 1.0, 5.0, 5.0, 0.5],
                       [0.0, 2.0, 1.0, 2.0, 2.0]])
    res = moe.route(logits, 2, scoring=scoring)
    assert_int_equal(res.expert_ids, [[1, 2], [0, 2], [1, 3]])
    res = moe.route(logits, 4, scoring=scoring)
    assert_int_equal(res.expert_ids, [[1, 2, 4, 3], [0, 2, 3, 1], [1, 3, 4, 2]])


@pytest.mark.parametrize("scoring", SCORINGS)
def test_random_ties(rng, scoring):
    # values from a small set: most rows have ties across the top-k boundary
    T, E, k = 300, 12, 4
    logits = rng.integers(-2, 3, size=(T, E)).astype(np.float64)
    res, ref = check_route(logits, k, scoring=scoring)
    sel = selection_scores(logits, scoring)
    assert_topk_sets(res.expert_ids, ref["expert_ids"], sel, what="tied top-k")
    # a valid top-k: nothing left out scores above anything taken
    ids = res.expert_ids.astype(np.int64)
    picked = np.take_along_axis(sel, ids, axis=1)
    rest = sel.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    assert (picked.min(axis=1) >= rest.max(axis=1)).all()


def test_topk_sets_helper_catches_a_wrong_choice():
    # the tie-aware comparison still fails on a non-tied substitution
    scores = np.array([[0.5, 0.5, 0.2, 0.1]])
    assert_topk_sets([[1, 0]], [[0, 1]], scores)
    assert_topk_sets([[0, 1]], [[1, 0]], scores)
    with pytest.raises(AssertionError):
        assert_topk_sets([[0, 2]], [[0, 1]], scores)
    scores = np.array([[0.5, 0.2, 0.2, 0.1]])
    assert_topk_sets([[0, 2]], [[0, 1]], scores)


# ---- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("E", [1, 5, 6, 12])
def test_top_k_equals_n_experts(make, scoring, E):
    logits = make.logits(60, E)
    res, ref = check_route(logits, E, scoring=scoring)
    assert (np.sort(res.expert_ids, axis=1) == np.arange(E)).all()
    assert_int_equal(res.counts, np.full(E, 60))


@pytest.mark.parametrize("scoring", SCORINGS)
def test_one_token(make, scoring):
    res, ref = check_route(make.logits(1, 12), 3, scoring=scoring, capacity_factor=1.0)
    assert res.n_dropped == 0 and res.counts.sum() == 3


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_zero_tokens(scoring, capacity_factor):
    res = moe.route(np.empty((0, 6), np.float32), 2, scoring=scoring,
                    capacity_factor=capacity_factor, expert_bias=np.ones(6, np.float32))
    assert res.expert_ids.shape == (0, 2) and res.expert_ids.dtype == np.int32
    assert res.weights.shape == (0, 2) and res.weights.dtype == np.float32
    assert_int_equal(res.counts, np.zeros(6, np.int64))
    assert res.n_dropped == 0
    assert res.aux_loss == 0.0 and res.z_loss == 0.0
    res = moe.route(np.empty((0, 8)), 3, n_groups=4, topk_groups=2)
    assert res.expert_ids.shape == (0, 3)


# ---- dtypes and layouts ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f8", ">f4"])
def test_input_dtypes(make, dtype):
    logits = make.logits(100, 12).astype(dtype)
    res, ref = check_route(logits, 3, scoring="sigmoid")
    # the same values as float64 give the same answer, bit for bit
    same = moe.route(logits.astype(np.float64), 3, scoring="sigmoid")
    assert np.array_equal(res.expert_ids, same.expert_ids)
    assert np.array_equal(res.weights, same.weights)


def _same_route(a, b):
    for name in ("expert_ids", "weights", "counts"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.n_dropped, a.aux_loss, a.z_loss) == (b.n_dropped, b.aux_loss, b.z_loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fortran_and_strided_logits(make, dtype):
    T, E = 120, 12
    base = make.logits(2 * T, 3 * E, dtype=dtype)
    opts = dict(scoring="softmax", capacity_factor=1.0, expert_bias=make.normal(E, scale=0.02))
    for view in (base[::2, 1::3],                               # strided slice
                 np.asfortranarray(base[:T, :E]),               # Fortran order
                 base[:T, :E].T.copy().T,                       # Fortran via transpose
                 base[::-2, ::-3][:T, :E]):                     # negative strides
        assert not view.flags.c_contiguous
        res, ref = check_route(view, 3, **opts)
        _same_route(res, moe.route(np.ascontiguousarray(view), 3, **opts))


def test_listed_logits(make):
    logits = make.logits(40, 8, dtype=np.float64)
    _same_route(moe.route(logits.tolist(), 2), moe.route(logits, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_logits(make, dtype):
    # e.g. np.frombuffer at an odd offset: C-contiguous but not aligned
    logits = make.logits(40, 8, dtype=dtype)
    bias = make.normal(8, scale=0.05)
    want = moe.route(logits, 2, expert_bias=bias)
    _same_route(moe.route(make.unaligned(logits), 2, expert_bias=make.unaligned(bias)), want)


def test_dlpack_object(make):
    logits = make.logits(64, 8, dtype=np.float32)
    res, _ = check_route(make.DLPackOnly(logits), 2, logits, scoring="sigmoid")
    _same_route(res, moe.route(logits, 2, scoring="sigmoid"))


def test_torch_cpu_tensors(make):
    torch = pytest.importorskip("torch")
    logits = make.logits(64, 8, dtype=np.float32)
    bias = make.normal(8, scale=0.05)
    t_logits, t_bias = torch.from_numpy(logits), torch.from_numpy(bias)
    want = moe.route(logits, 2, expert_bias=bias)
    _same_route(moe.route(t_logits, 2, expert_bias=t_bias), want)
    _same_route(moe.route(t_logits.double(), 2, expert_bias=t_bias), want)
    # a non-contiguous tensor view (transpose of a transpose copy)
    _same_route(moe.route(t_logits.t().contiguous().t(), 2, expert_bias=t_bias), want)
    res = moe.route(torch.from_numpy(logits).requires_grad_(True).detach(), 2)
    assert isinstance(res.expert_ids, np.ndarray)
    # a tensor that requires grad cannot be exported: a TypeError that says what to do
    with pytest.raises(TypeError, match=r"^logits: cannot read this Tensor.*detach"):
        moe.route(torch.from_numpy(logits.copy()).requires_grad_(True), 2)


# ---- update_expert_bias ------------------------------------------------------------------

def test_update_expert_bias_float32(make):
    E = 16
    bias = make.normal(E, scale=0.1)
    counts = make.rng.integers(0, 50, size=E)
    ref = reference.update_expert_bias(bias, counts, 1e-3)
    out = moe.update_expert_bias(bias, counts, 1e-3)
    assert out is bias and bias.dtype == np.float32
    # float32 storage: the float64 update rounded once, exactly as the reference rounds
    assert np.array_equal(bias, ref.astype(np.float32))


def test_update_expert_bias_float64_keeps_float64(make):
    E = 16
    bias = make.normal(E, scale=0.1, dtype=np.float64)
    counts = make.rng.integers(0, 50, size=E)
    ref = reference.update_expert_bias(bias, counts, 1e-3)
    out = moe.update_expert_bias(bias, counts, 1e-3)
    assert out is bias and bias.dtype == np.float64
    assert_close(bias, ref, rtol=FP64_RTOL, atol_scale=0.0, what="float64 bias")


def test_update_expert_bias_zero_step_leaves_bias_unchanged(make):
    # balanced counts: sign(mean - counts) = 0, so no entry may change, whatever the dtype
    for dtype in (np.float32, np.float64):
        bias = make.normal(8, scale=0.1, dtype=dtype)
        before = bias.copy()
        moe.update_expert_bias(bias, np.full(8, 5), 0.01)
        assert np.array_equal(bias, before), f"{np.dtype(dtype).name} bias changed"


def test_update_expert_bias_in_place_on_views(make):
    parent = make.normal(20, scale=0.1)
    before = parent.copy()
    view = parent[::2]
    counts = np.arange(10)
    ref = reference.update_expert_bias(view, counts, 0.5)
    assert moe.update_expert_bias(view, counts, 0.5) is view
    assert_close(parent[::2], ref, what="strided bias")
    assert np.array_equal(parent[1::2], before[1::2])


def test_update_expert_bias_unaligned(make):
    bias = make.unaligned(make.normal(8, scale=0.1))
    ref = reference.update_expert_bias(bias, np.arange(8), 0.5).astype(np.float32)
    assert moe.update_expert_bias(bias, np.arange(8), 0.5) is bias
    assert np.array_equal(bias, ref)


def test_update_expert_bias_with_route_counts(make):
    E = 12
    bias = np.zeros(E, np.float32)
    logits = make.logits(300, E)
    logits[:, 0] += 1.0
    for _ in range(3):
        res = moe.route(logits, 2, scoring="sigmoid", expert_bias=bias)
        ref = reference.update_expert_bias(bias, res.counts, 1e-2).astype(np.float32)
        moe.update_expert_bias(bias, res.counts, 1e-2)
        assert np.array_equal(bias, ref)
    assert bias[0] < 0  # the over-used expert is pushed down
    for counts in (np.arange(E, dtype=np.int32), list(range(E)), np.arange(E, dtype=np.uint8)):
        b1, b2 = bias.copy(), bias.copy()
        moe.update_expert_bias(b1, counts, 0.1)
        moe.update_expert_bias(b2, np.arange(E), 0.1)
        assert np.array_equal(b1, b2)
