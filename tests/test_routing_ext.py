"""Expert-choice, top-p / threshold (dynamic k) routing and expert skipping against
moe.reference: random inputs, ties (lower index wins), zero and one token, E not a power of
two, capacity 0 and capacity >= T, p = 1, k clamps, the dispatch/combine hand-off, and bad
arguments raising ValueError / TypeError that name the argument.
"""
import math

import numpy as np
import pytest

import moe
from moe import reference
from tolerances import assert_close, assert_int_equal


# ---- expert choice ----------------------------------------------------------------------

def check_expert_choice(logits, **options):
    res = moe.route_expert_choice(logits, **options)
    values = np.asarray(logits, dtype=np.float64)
    T, E = values.shape
    ref = reference.route_expert_choice(values, res.capacity, options.get("scoring", "softmax"))
    C = res.capacity
    assert res.token_ids.dtype == np.int64 and res.token_ids.shape == (E, C)
    assert res.gates.dtype == np.float32 and res.gates.shape == (E, C)
    W = max(1, int(res.n_experts_per_token.max()) if T else 1)
    assert res.expert_ids.dtype == np.int32 and res.expert_ids.shape == (T, W)
    assert res.weights.dtype == np.float32 and res.weights.shape == (T, W)
    assert_int_equal(res.token_ids, ref["token_ids"], what="token_ids")
    assert_close(res.gates, ref["gates"], what="gates")
    assert_int_equal(res.n_experts_per_token, ref["n_experts_per_token"],
                     what="n_experts_per_token")
    assert_int_equal(res.expert_ids, ref["expert_ids"], what="expert_ids")
    assert_close(res.weights, ref["weights"], what="weights")
    return res


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("T,E,cf", [(200, 8, 1.0), (130, 6, 2.0), (300, 12, 0.5),
                                    (257, 64, 1.25), (70, 7, 3.0)])
def test_expert_choice_matches_reference(make, scoring, T, E, cf):
    res = check_expert_choice(make.logits(T, E), capacity_factor=cf, scoring=scoring)
    assert res.capacity == min(T, math.ceil(cf * T / E))
    # Every expert is full: capacity <= T.
    assert res.n_experts_per_token.sum() == E * res.capacity


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_expert_choice_large_capacity(make, scoring):
    # Many heap replacements per expert, and scores drawn from few values (ties).
    # The core keeps a streaming heap when 32 * C <= T and uses quickselect otherwise:
    # both paths, each with ties.
    check_expert_choice(make.logits(1500, 12), capacity_factor=5.0, scoring=scoring)
    check_expert_choice(make.logits(1000, 40), capacity_factor=1.0, scoring=scoring)
    coarse = make.rng.integers(0, 3, size=(700, 9)).astype(np.float64)
    for capacity in (200, 21, 22, 10):
        check_expert_choice(coarse, capacity=capacity, scoring=scoring)


@pytest.mark.parametrize("capacity", [0, 1, 5, 40, 41, 1000])
def test_expert_choice_capacity(make, capacity):
    res = check_expert_choice(make.logits(40, 5), capacity=capacity)
    assert res.capacity == min(capacity, 40)
    if capacity >= 40:
        # Every expert takes every token.
        assert (res.n_experts_per_token == 5).all()
    if capacity == 0:
        assert (res.expert_ids == -1).all() and (res.n_experts_per_token == 0).all()


def test_expert_choice_ties_go_to_lower_token(make):
    row = make.logits(1, 6)[0]
    logits = np.tile(row, (10, 1))  # identical tokens: every score ties
    res = check_expert_choice(logits, capacity=3)
    assert (res.token_ids == [0, 1, 2]).all()
    res = check_expert_choice(np.zeros((9, 3)), capacity=4, scoring="sigmoid")
    assert (res.token_ids == [0, 1, 2, 3]).all()


@pytest.mark.parametrize("T", [0, 1])
def test_expert_choice_zero_and_one_token(make, T):
    res = check_expert_choice(make.logits(T, 5), capacity_factor=2.0)
    assert res.capacity == T


def test_expert_choice_one_expert(make):
    res = check_expert_choice(make.logits(17, 1), capacity_factor=0.5)
    assert res.capacity == 9


def test_expert_choice_feeds_dispatch_and_combine(make):
    T, E, d = 60, 5, 8
    logits = make.logits(T, E)
    x = make.normal(T, d)
    res = moe.route_expert_choice(logits, capacity_factor=1.5)
    disp = moe.dispatch(x, res.expert_ids, E)
    assert_int_equal(disp.counts, np.full(E, res.capacity, dtype=np.int64), what="counts")
    y = disp.x_sorted * 2.0  # a stand-in expert
    out = moe.combine(y, disp.position, res.weights)
    want = np.zeros((T, d))
    for e in range(E):
        for j in range(res.capacity):
            t = res.token_ids[e, j]
            want[t] += float(res.gates[e, j]) * 2.0 * x[t].astype(np.float64)
    assert_close(out, want, what="combined")


def test_expert_choice_bad_input(make):
    logits = make.logits(10, 4)
    with pytest.raises(ValueError, match="scoring"):
        moe.route_expert_choice(logits, scoring="softmax-after-topk")
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.route_expert_choice(logits, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.route_expert_choice(logits, capacity_factor=float("inf"))
    with pytest.raises(ValueError, match="capacity"):
        moe.route_expert_choice(logits, capacity=-1)
    with pytest.raises(ValueError, match="not both"):
        moe.route_expert_choice(logits, 1.0, capacity=2)
    with pytest.raises(TypeError, match="capacity"):
        moe.route_expert_choice(logits, capacity=2.5)
    with pytest.raises(TypeError, match="logits"):
        moe.route_expert_choice(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="logits"):
        moe.route_expert_choice(np.ones(4))
    with pytest.raises(ValueError, match="logits"):
        moe.route_expert_choice(np.ones((3, 0)))
    bad = logits.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="logits must be finite"):
        moe.route_expert_choice(bad)


def test_expert_choice_layouts(make):
    logits = make.logits(50, 6)
    a = moe.route_expert_choice(logits)
    b = moe.route_expert_choice(np.asfortranarray(logits).astype(np.float32).astype(np.float64))
    c = moe.route_expert_choice(np.repeat(logits, 2, axis=1)[:, ::2])
    for r in (b, c):
        assert_int_equal(r.token_ids, a.token_ids, what="token_ids")
        assert np.array_equal(r.gates, a.gates) or np.allclose(r.gates, a.gates, rtol=1e-6)


# ---- dynamic k: top-p and threshold --------------------------------------------------

def check_dynamic(kind, logits, value, **options):
    fn = moe.route_top_p if kind == "top_p" else moe.route_threshold
    ref_fn = reference.route_top_p if kind == "top_p" else reference.route_threshold
    res = fn(logits, value, **options)
    values = np.asarray(logits, dtype=np.float64)
    T, E = values.shape
    ref = ref_fn(values, value, **options)
    k_max = options.get("k_max") or E
    assert res.expert_ids.dtype == np.int32 and res.expert_ids.shape == (T, k_max)
    assert res.weights.dtype == np.float32 and res.weights.shape == (T, k_max)
    assert res.n_selected.dtype == np.int32 and res.n_selected.shape == (T,)
    assert_int_equal(res.expert_ids, ref["expert_ids"], what="expert_ids")
    assert_close(res.weights, ref["weights"], what="weights")
    assert_int_equal(res.n_selected, ref["n_selected"], what="n_selected")
    k_min = options.get("k_min", 1)
    assert ((res.n_selected >= k_min) & (res.n_selected <= k_max)).all()
    for t in range(T):
        n = res.n_selected[t]
        assert (res.expert_ids[t, n:] == -1).all() and (res.weights[t, n:] == 0).all()
    return res


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k_min,k_max", [(8, 1, None), (6, 2, 4), (12, 1, 3),
                                           (64, 1, 20), (128, 2, 8), (7, 7, 7)])
@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_top_p_matches_reference(make, renormalize, E, k_min, k_max, p):
    # Scaled logits: peaked enough that k_t varies over the whole range.
    check_dynamic("top_p", make.logits(150, E) * 2.0, p, k_min=k_min, k_max=k_max,
                  renormalize=renormalize)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k_min,k_max", [(8, 1, None), (6, 2, 4), (12, 1, 3),
                                           (64, 1, 20), (128, 1, 8), (5, 5, None)])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.2, 1.0])
def test_threshold_matches_reference(make, renormalize, E, k_min, k_max, threshold):
    check_dynamic("threshold", make.logits(150, E) * 2.0, threshold, k_min=k_min,
                  k_max=k_max, renormalize=renormalize)


def test_top_p_one_takes_k_max(make):
    res = check_dynamic("top_p", make.logits(30, 9), 1.0, k_max=5)
    assert (res.n_selected == 5).all()
    res = check_dynamic("top_p", make.logits(30, 9), 1.0)
    assert (res.n_selected == 9).all()
    assert_close(res.weights.sum(axis=1), np.ones(30), what="weight sums")


def test_dynamic_k_counts_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    assert moe.route_top_p(logits, 0.7).n_selected.tolist() == [2, 3]
    assert moe.route_top_p(logits, 0.85).n_selected.tolist() == [3, 4]
    assert moe.route_threshold(logits, 0.2).n_selected.tolist() == [2, 4]
    assert moe.route_threshold(logits, 0.31).n_selected.tolist() == [1, 1]
    assert moe.route_threshold(logits, 0.31, k_min=2).n_selected.tolist() == [2, 2]


def test_dynamic_k_ties_go_to_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    res = check_dynamic("top_p", logits, 0.5)
    assert res.expert_ids[0, :2].tolist() == [1, 2]
    assert res.expert_ids[1, :3].tolist() == [0, 1, 2]
    res = check_dynamic("threshold", logits, 0.3, k_max=2)
    assert res.expert_ids.tolist() == [[1, 2], [0, -1]]


@pytest.mark.parametrize("kind", ["top_p", "threshold"])
@pytest.mark.parametrize("k_max", [None, 17, 16, 5])  # heap path (k_max > 16) and insertion
def test_dynamic_k_ties_both_paths(make, kind, k_max):
    # Logits drawn from a few values: many exact ties in every row.
    logits = make.rng.integers(0, 4, size=(60, 40)).astype(np.float64)
    value = 0.6 if kind == "top_p" else 0.03
    res = check_dynamic(kind, logits, value, k_max=k_max)
    for t in range(60):
        n = res.n_selected[t]
        ids = res.expert_ids[t, :n]
        v = logits[t, ids]
        # Best first, equal logits in ascending expert order.
        assert all((v[i] > v[i + 1]) or (v[i] == v[i + 1] and ids[i] < ids[i + 1])
                   for i in range(n - 1))


@pytest.mark.parametrize("kind", ["top_p", "threshold"])
@pytest.mark.parametrize("T", [0, 1])
def test_dynamic_k_zero_and_one_token(make, kind, T):
    check_dynamic(kind, make.logits(T, 5), 0.5, k_max=3)


@pytest.mark.parametrize("kind", ["top_p", "threshold"])
def test_dynamic_k_one_expert(make, kind):
    res = check_dynamic(kind, make.logits(9, 1), 0.5)
    assert (res.expert_ids == 0).all() and (res.weights == 1).all()


@pytest.mark.parametrize("kind", ["top_p", "threshold"])
def test_dynamic_k_feeds_dispatch_and_combine(make, kind):
    T, E, d = 80, 6, 8
    logits = make.logits(T, E) * 2.0
    x = make.normal(T, d)
    fn = moe.route_top_p if kind == "top_p" else moe.route_threshold
    res = fn(logits, 0.5 if kind == "top_p" else 0.2, k_max=4)
    disp = moe.dispatch(x, res.expert_ids, E)
    assert disp.x_sorted.shape[0] == res.n_selected.sum()
    out = moe.combine(disp.x_sorted, disp.position, res.weights)
    want = res.weights.sum(axis=1, dtype=np.float64)[:, None] * x
    assert_close(out, want, what="combined")


def test_dynamic_k_bad_input(make):
    logits = make.logits(10, 4)
    for p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must"):
            moe.route_top_p(logits, p)
    for thr in (-0.1, 1.01, float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            moe.route_threshold(logits, thr)
    with pytest.raises(TypeError, match="p must"):
        moe.route_top_p(logits, "0.5")
    with pytest.raises(ValueError, match="k_min"):
        moe.route_top_p(logits, 0.5, k_min=0)
    with pytest.raises(ValueError, match="k_max"):
        moe.route_top_p(logits, 0.5, k_max=5)
    with pytest.raises(ValueError, match="k_max"):
        moe.route_threshold(logits, 0.5, k_min=3, k_max=2)
    with pytest.raises(TypeError, match="k_max"):
        moe.route_threshold(logits, 0.5, k_max=2.0)
    with pytest.raises(TypeError, match="logits"):
        moe.route_top_p(np.ones((3, 4), dtype=np.int32), 0.5)
    bad = logits.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="logits must be finite"):
        moe.route_threshold(bad, 0.1)


# ---- dynamic expert skipping --------------------------------------------------------

def check_skip(ids, weights, threshold, renormalize):
    ids0, w0 = ids.copy(), weights.copy()
    res = moe.skip_experts(ids, weights, threshold, renormalize=renormalize)
    ref = reference.skip_experts(ids, weights, threshold, renormalize=renormalize)
    assert np.array_equal(ids, ids0) and np.array_equal(weights, w0), "inputs modified"
    assert res.expert_ids.dtype == np.int32 and res.weights.dtype == np.float32
    assert_int_equal(res.expert_ids, ref["expert_ids"], what="expert_ids")
    assert_close(res.weights, ref["weights"], what="weights")
    assert res.n_skipped == ref["n_skipped"]
    return res


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 2.0])
def test_skip_matches_reference(make, renormalize, threshold):
    r = moe.route(make.logits(120, 10), 4)
    res = check_skip(r.expert_ids, r.weights, threshold, renormalize)
    if threshold == 0.0:
        assert res.n_skipped == 0
    if threshold == 2.0:
        assert res.n_skipped == 120 * 4 and (res.expert_ids == -1).all()


def test_skip_after_capacity_drops_and_ties(make):
    r = moe.route(make.logits(100, 6), 3, capacity_factor=0.5)
    assert r.n_dropped > 0
    res = check_skip(r.expert_ids, r.weights, 0.2, True)
    # A weight equal to the threshold is kept; already-empty slots are not counted.
    ids = np.array([[0, 1, -1]], dtype=np.int32)
    w = np.array([[0.25, 0.5, 0.0]], dtype=np.float32)
    res = check_skip(ids, w, 0.25, True)
    assert res.n_skipped == 0 and res.expert_ids.tolist() == [[0, 1, -1]]
    res = check_skip(ids, w, 0.3, False)
    assert res.n_skipped == 1 and res.expert_ids.tolist() == [[-1, 1, -1]]


@pytest.mark.parametrize("T", [0, 1])
def test_skip_zero_and_one_token(make, T):
    r = moe.route(make.logits(T, 5), 2)
    check_skip(r.expert_ids, r.weights, 0.4, True)


def test_skip_bad_input(make):
    r = moe.route(make.logits(10, 4), 2)
    with pytest.raises(ValueError, match="weights"):
        moe.skip_experts(r.expert_ids, r.weights[:, :1], 0.1)
    with pytest.raises(ValueError, match="expert_ids"):
        moe.skip_experts(r.expert_ids - 2, r.weights, 0.1)
    with pytest.raises(TypeError, match="expert_ids"):
        moe.skip_experts(r.expert_ids.astype(np.float32), r.weights, 0.1)
    with pytest.raises(TypeError, match="threshold"):
        moe.skip_experts(r.expert_ids, r.weights, None)
    with pytest.raises(ValueError, match="threshold"):
        moe.skip_experts(r.expert_ids, r.weights, float("nan"))
    w = r.weights.copy()
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="weights must be finite"):
        moe.skip_experts(r.expert_ids, w, 0.1)


# ---- per-token expert mask for moe.route ----------------------------------------------

def check_masked_route(logits, top_k, allowed, **options):
    res = moe.route(logits, top_k, allowed=allowed, **options)
    ref = reference.route(logits, top_k, allowed=allowed, **options)
    assert_int_equal(res.expert_ids, ref["expert_ids"], what="expert_ids")
    assert_close(res.weights, ref["weights"], what="weights")
    assert_int_equal(res.counts, ref["counts"], what="counts")
    assert res.n_dropped == ref["n_dropped"]
    kept = res.expert_ids >= 0
    rows = np.nonzero(kept)[0]
    assert allowed[rows, res.expert_ids[kept]].all(), "a masked expert was selected"
    return res


@pytest.mark.parametrize("scoring", ["softmax", "softmax-after-topk", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k", [(8, 2), (6, 3), (12, 4), (7, 1)])
def test_route_mask_matches_reference(make, scoring, renormalize, E, k):
    T = 150
    logits = make.logits(T, E)
    allowed = make.rng.random((T, E)) < 0.6
    # Every row needs k allowed experts: open the first k of short rows.
    short = allowed.sum(axis=1) < k
    allowed[short, :k] = True
    check_masked_route(logits, k, allowed, scoring=scoring, renormalize=renormalize)


def test_route_mask_with_bias_capacity_and_ties(make):
    logits = np.zeros((40, 6))  # all tied: the lowest allowed indices win
    allowed = np.ones((40, 6), dtype=bool)
    allowed[:, 0] = False
    allowed[::2, 2] = False
    res = check_masked_route(logits, 2, allowed)
    assert res.expert_ids[0].tolist() == [1, 3] and res.expert_ids[1].tolist() == [1, 2]
    check_masked_route(make.logits(40, 6), 2, allowed,
                       expert_bias=make.normal(6), capacity_factor=0.8)


def test_route_mask_all_allowed_is_plain_route(make):
    logits = make.logits(50, 9)
    a = moe.route(logits, 3)
    b = moe.route(logits, 3, allowed=np.ones((50, 9), dtype=bool))
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.weights, b.weights)
    assert a.aux_loss == b.aux_loss and a.z_loss == b.z_loss


@pytest.mark.parametrize("T", [0, 1])
def test_route_mask_zero_and_one_token(make, T):
    allowed = np.zeros((T, 5), dtype=bool)
    allowed[:, [1, 4]] = True
    check_masked_route(make.logits(T, 5), 2, allowed)


def test_route_mask_bad_input(make):
    logits = make.logits(10, 5)
    allowed = np.ones((10, 5), dtype=bool)
    allowed[7, 1:] = False
    with pytest.raises(ValueError, match="token 7"):
        moe.route(logits, 2, allowed=allowed)
    moe.route(logits, 1, allowed=allowed)  # one allowed expert is enough for k = 1
    with pytest.raises(TypeError, match="allowed"):
        moe.route(logits, 2, allowed=np.ones((10, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="allowed"):
        moe.route(logits, 2, allowed=np.ones((10, 4), dtype=bool))
    with pytest.raises(ValueError, match="n_groups"):
        moe.route(make.logits(10, 4), 1, allowed=np.ones((10, 4), dtype=bool), n_groups=2,
                  topk_groups=1)
    # Non-contiguous masks are accepted (copied).
    big = np.ones((10, 10), dtype=bool)
    check_masked_route(logits, 2, big[:, ::2])


def test_results_do_not_depend_on_threads(make):
    logits = make.logits(700, 20) * 2.0
    allowed = make.rng.random((700, 20)) < 0.7
    allowed[:, :3] = True
    calls = [lambda: moe.route_expert_choice(logits, 2.0),
             lambda: moe.route_top_p(logits, 0.7),
             lambda: moe.route_threshold(logits, 0.05, k_max=6),
             lambda: moe.route(logits, 3, allowed=allowed)]
    n = moe.get_num_threads()
    try:
        moe.set_num_threads(1)
        one = [c() for c in calls]
        moe.set_num_threads(3)
        many = [c() for c in calls]
    finally:
        moe.set_num_threads(n)
    for a, b in zip(one, many):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
