"""Property tests (hypothesis) for issue 7: random shapes (0 and 1 tokens included), E up to
70, every top_k, input dtypes and strides, capacity and group settings, NaN / Inf / huge
values, and wrong Python types for every public function.  Each call either equals
moe.reference under the tolerance policy of tests/tolerances.py or raises the documented
exception (TypeError / ValueError / OverflowError, the one each case names) -- never a crash.
"""
import math
import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, event, given, seed, settings
from hypothesis import strategies as st

import moe
from moe import reference
from tolerances import assert_close, assert_ids_equal, assert_int_equal, assert_scalar_close

# Huge float64 inputs rounded to float32 by the API overflow to inf, as numpy says.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

from moe._C import SCORINGS  # noqa: E402
from moe._C import ACTIVATIONS  # noqa: E402
from moe._C import GATED_ACTIVATIONS as GATED  # noqa: E402
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# Input dtypes as drawn: mostly floats, now and then an integer array (TypeError).
INPUT_DTYPES = (np.float32, np.float64, np.float16, np.float32, np.float64, np.float32,
                np.float64, np.float16, np.int64, np.int32)
LAYOUTS = ("C", "F", "transposed", "sliced", "negative")
# Huge-but-finite values (float64; float16 / float32 inputs round them to inf).
HUGE = (1e30, -1e30, 3e38, -3e38, 1e200, -1e200)
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _settings(n):
    """Modest, deadline-free runs; the examples are fixed unless MOE_TEST_SEED asks for new
    ones (the same switch as the rng fixture), so CI never flakes on a new draw."""
    s = settings(max_examples=n, deadline=None, database=None,
                 phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                 derandomize="MOE_TEST_SEED" not in os.environ,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

    def wrap(f):
        f = s(f)
        value = os.environ.get("MOE_TEST_SEED")
        if value is not None:  # as tests/conftest.py reads it
            f = seed(int(value) if value.isdigit() else zlib.crc32(value.encode()))(f)
        return f
    return wrap


# ---- building inputs -------------------------------------------------------------------------

def laid_out(a, layout):
    """An array with a's values (and dtype) in the given memory layout."""
    if a.ndim < 2 and layout in ("F", "transposed"):
        layout = "negative"
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    if layout == "sliced":
        big = np.empty(tuple(2 * s + 1 for s in a.shape), a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative":
        flipped = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flipped])[flipped]
    return np.ascontiguousarray(a)


@st.composite
def float_values(draw, shape, grid_ok=True, specials=(), special_rate=0.0):
    """float64 values for a float input: standard normal (never 0), or a coarse grid (exact
    ties), with some entries replaced by specials.  Distinct values are far apart, so the core
    and the reference (which round differently in the last bits) never disagree on an order;
    exact ties stay exact ties in both."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal(shape)
    a[a == 0] = 0.5
    if grid_ok and draw(st.booleans()):
        a = rng.integers(-8, 9, size=shape) / 4.0
    if specials and a.size and draw(st.floats(0, 1)) < special_rate:
        n = draw(st.integers(1, max(1, min(4, a.size))))
        for _ in range(n):
            a.flat[int(rng.integers(a.size))] = draw(st.sampled_from(specials))
    return a


def cast(values, dtype):
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


def as64(a):
    return np.asarray(a, dtype=np.float64)


def call(fn, *args, **kwargs):
    """(result, None) or (None, exception) for the three documented exception types; anything
    else propagates and fails the test."""
    try:
        return fn(*args, **kwargs), None
    except (TypeError, ValueError, OverflowError) as exc:
        return None, exc


def expect_raises(exc, want, what):
    event(f"raises {want.__name__}: {what}")
    assert exc is not None, f"{what}: expected {want.__name__}, the call succeeded"
    assert isinstance(exc, want), f"{what}: expected {want.__name__}, got {exc!r}"


# ---- routing ---------------------------------------------------------------------------------

def route_errors(E, top_k, scoring, n_groups, topk_groups, routed_scaling, capacity_factor):
    """The documented ValueError conditions of moe.route's options (None: valid)."""
    if not 1 <= top_k <= E:
        return "top_k"
    if scoring not in SCORINGS:
        return "scoring"
    if n_groups < 1 or E % n_groups:
        return "n_groups"
    if not 1 <= topk_groups <= n_groups or topk_groups * (E // n_groups) < top_k:
        return "topk_groups"
    if not math.isfinite(routed_scaling):
        return "routed_scaling"
    if capacity_factor is not None and not (math.isfinite(capacity_factor)
                                            and capacity_factor > 0):
        return "capacity_factor"
    return None


def check_route_result(res, logits64, top_k, options):
    """res (a RoutingResult) against reference.route on the same float64 values."""
    with np.errstate(all="ignore"):
        ref = reference.route(logits64, top_k, **options)
    T, E = logits64.shape
    assert res.expert_ids.shape == (T, top_k) and res.expert_ids.dtype == np.int32
    assert res.weights.shape == (T, top_k) and res.weights.dtype == np.float32
    assert res.counts.shape == (E,) and res.counts.dtype == np.int64
    # Values are either exact ties or far apart (see float_values): ids match exactly,
    # tie order included (both break ties toward the lower index).
    assert_ids_equal(res.expert_ids, ref["expert_ids"])
    assert np.isfinite(res.weights).all(), "weights must stay finite for finite logits"
    assert (res.weights[res.expert_ids < 0] == 0).all(), "a dropped slot has a nonzero weight"
    assert_close(res.weights, ref["weights"], what="weights")
    assert_int_equal(res.counts, ref["counts"], what="counts")
    assert res.n_dropped == ref["n_dropped"], (res.n_dropped, ref["n_dropped"])
    assert_scalar_close(res.aux_loss, ref["aux_loss"], what="aux_loss")
    # Huge logits: z_loss = mean(lse^2) overflows float64 once |lse| > ~1.3e154; the
    # reference then says inf, and so must we.  The weights above stay finite regardless.
    if math.isinf(ref["z_loss"]):
        assert res.z_loss == ref["z_loss"], f"z_loss {res.z_loss}, reference {ref['z_loss']}"
    else:
        assert_scalar_close(res.z_loss, ref["z_loss"], what="z_loss")
    return ref


@st.composite
def capacity_factors(draw, low, high, invalid):
    """None (dropless) or a small positive factor; an invalid one now and then."""
    kind = draw(st.sampled_from(["none", "none", "small", "small", "small", "invalid"]))
    if kind == "none":
        return None
    if kind == "small":
        return draw(st.floats(low, high))
    return draw(st.sampled_from(invalid))


@st.composite
def route_cases(draw):
    T = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 17, 64, 65, 130]))
    E = draw(st.integers(1, 70))
    top_k = draw(st.integers(1, E))
    divisors = [g for g in range(1, E + 1) if E % g == 0]
    if draw(st.sampled_from([False] * 9 + [True])):  # invalid group settings now and then
        n_groups = draw(st.integers(-1, E + 2))
        topk_groups = draw(st.integers(-1, max(1, n_groups) + 1))
    else:
        n_groups = draw(st.sampled_from(divisors))
        G = E // n_groups
        topk_groups = draw(st.integers(min(n_groups, -(-top_k // G)), n_groups))
    options = dict(
        scoring=draw(st.sampled_from(SCORINGS)),
        renormalize=draw(st.booleans()),
        routed_scaling=draw(st.sampled_from([1.0, 1.0, 2.5, 0.5, -1.0, 1.0, 3.0, 1.0, 1.0,
                                             float("nan")])),
        n_groups=n_groups, topk_groups=topk_groups,
        capacity_factor=draw(capacity_factors(0.05, 3.0, (0.0, -1.0, float("inf")))),
    )
    values = draw(float_values((T, E), specials=HUGE + NONFINITE, special_rate=0.4))
    dtype = draw(st.sampled_from(INPUT_DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    bias = draw(st.sampled_from([None, None, "normal", "nan"]))
    return T, E, top_k, options, values, dtype, layout, bias


@_settings(800)
@given(route_cases())
def test_route_property(case):
    T, E, top_k, options, values, dtype, layout, bias_kind = case
    logits = laid_out(cast(values, dtype), layout)
    bias = None
    if bias_kind is not None:
        bias = np.random.default_rng(T * 71 + E).standard_normal(E).astype(np.float32) * 0.05
        if bias_kind == "nan":
            bias[E // 2] = np.nan
    res, exc = call(moe.route, logits, top_k, expert_bias=bias, **options)

    if np.dtype(dtype).kind != "f":
        return expect_raises(exc, TypeError, f"{dtype.__name__} logits")
    bad = route_errors(E, top_k, **{k: v for k, v in options.items() if k != "renormalize"})
    values64 = as64(cast(values, dtype))
    if bad is None and not np.isfinite(values64).all():
        bad = "non-finite logits"
    if bad is None and bias_kind == "nan":
        bad = "non-finite expert_bias"
    if bad is not None:
        return expect_raises(exc, ValueError, bad)
    assert exc is None, f"valid call raised {exc!r}"
    event("valid" + (" with huge values" if np.abs(values64).max(initial=0) > 1e20 else ""))
    check_route_result(res, values64, top_k, dict(options, expert_bias=bias))


@pytest.mark.parametrize("scoring", SCORINGS)
def test_route_huge_logits_decided_from_the_reference(scoring):
    # Every token has a huge logit; the reference says: weights finite (0 / 1 / 1/k after
    # the saturated softmax / sigmoid), z_loss = mean(lse^2) finite up to |lse| ~ 1.3e154 and
    # inf beyond -- and the core agrees.
    logits = np.array([[1e30, 0.5, -1e30, 1.0],
                       [3e38, 3e38, -3e38, 0.0],
                       [-1e30, -1e30, -1e30, -1e30],
                       [1e200, -1e200, 2.0, 1e200],
                       [1.7e308, -1.7e308, 0.0, 1.0]])
    for rows, z_inf in ((slice(0, 3), False), (slice(0, 5), True)):
        for k in (1, 2, 4):
            res = moe.route(logits[rows], k, scoring=scoring)
            ref = check_route_result(res, logits[rows], k, dict(scoring=scoring))
            assert math.isinf(ref["z_loss"]) == z_inf and math.isinf(res.z_loss) == z_inf


@pytest.mark.parametrize("cf,T,E,k", [(1e17, 8, 4, 2), (1e19, 8, 4, 2), (1e300, 100, 7, 3),
                                      (1.7e308, 1, 1, 1)])
def test_route_huge_capacity_factor_is_dropless(make, T, E, k, cf):
    # capacity = ceil(cf * T * k / E) is beyond any count: nothing may be dropped.  Compared
    # with the dropless reference, which any capacity >= T * k equals (reference.route itself
    # raises OverflowError from math.ceil once cf * T * k / E is inf, as for 1.7e308 * 100).
    logits = make.logits(T, E)
    res = moe.route(logits, k, capacity_factor=cf)
    assert res.n_dropped == 0, (
        f"capacity_factor={cf:g}, T={T}, k={k}, E={E}: {res.n_dropped} of {T * k} assignments "
        f"dropped (the reference drops none)")
    check_route_result(res, logits, k, {})


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_sigmoid_of_very_negative_logits(renormalize):
    # Below -709.78, exp(-x) overflows; the reference's stable sigmoid still gives the
    # (subnormal) exp(x), so it orders such experts and renormalises their weights to 1.
    # Unnormalised, those weights (~1e-311) are below float32's range: the float32 result is
    # the reference rounded to float32, i.e. exactly 0.
    logits = np.array([[-730.0, -720.0, -740.0], [-720.0, -1e30, -715.0]])
    res = moe.route(logits, 2, scoring="sigmoid", renormalize=renormalize)
    ref = moe.reference.route(logits, 2, scoring="sigmoid", renormalize=renormalize)
    assert np.array_equal(res.expert_ids, ref["expert_ids"])
    if renormalize:
        check_route_result(res, logits, 2, dict(scoring="sigmoid", renormalize=renormalize))
    else:
        assert np.array_equal(res.weights, ref["weights"].astype(np.float32))


# ---- update_expert_bias ----------------------------------------------------------------------

@_settings(100)
@given(E=st.integers(1, 70), dtype=st.sampled_from(FLOAT_DTYPES), layout=st.sampled_from(LAYOUTS),
       rate=st.sampled_from([0.001, 0.5, -1.0, 0.0, float("nan"), float("inf")]),
       counts_dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.float64]),
       data=st.data())
def test_update_expert_bias_property(E, dtype, layout, rate, counts_dtype, data):
    values = data.draw(float_values((E,)))
    bias = laid_out(cast(values, dtype), layout)
    counts = data.draw(st.lists(st.integers(0, 200), min_size=E, max_size=E))
    counts = np.array(counts).astype(counts_dtype)
    before = bias.copy()
    out, exc = call(moe.update_expert_bias, bias, counts, rate)
    if np.dtype(counts_dtype).kind not in "iu":
        return expect_raises(exc, TypeError, "float counts")
    if not math.isfinite(rate):
        return expect_raises(exc, ValueError, "non-finite rate")
    assert exc is None, exc
    assert out is bias, "updated in place and returned"
    want = reference.update_expert_bias(before, counts, rate).astype(dtype)
    assert np.array_equal(bias, want), (bias, want)


# ---- dispatch / combine ----------------------------------------------------------------------

@_settings(500)
@given(T=st.sampled_from([0, 1, 2, 7, 33, 100]), E=st.integers(1, 70), k=st.integers(1, 6),
       d=st.sampled_from([1, 3, 8, 17, 64]), drop=st.sampled_from([0.0, 0.3, 1.0]),
       dtype=st.sampled_from(INPUT_DTYPES[:-1]), layout=st.sampled_from(LAYOUTS),
       ids_layout=st.sampled_from(LAYOUTS),
       ids_dtype=st.sampled_from([np.int32, np.int64, np.int16, np.uint8, np.int32, np.int64,
                                  np.float32]),
       bad_id=st.sampled_from([None] * 6 + [-2, "E", 2**31]), data=st.data())
def test_dispatch_and_combine_property(T, E, k, d, drop, dtype, layout, ids_layout, ids_dtype,
                                       bad_id, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = data.draw(float_values((T, d), grid_ok=False, specials=HUGE + NONFINITE,
                                    special_rate=0.3))
    x = laid_out(cast(values, dtype), layout)
    ids = rng.integers(0, E, size=(T, k))  # repeats allowed: dispatch does not care
    ids[rng.random((T, k)) < drop] = -1
    if bad_id is not None and T:
        ids[rng.integers(T), rng.integers(k)] = E if bad_id == "E" else bad_id
    if ids_dtype == np.uint8 and (ids.min(initial=0) < 0 or ids.max(initial=0) > 255):
        ids_dtype = np.int32
    if bad_id == 2**31:
        ids_dtype = np.int64  # the value itself needs 64 bits
    ids_arr = laid_out(ids.astype(ids_dtype), ids_layout)

    res, exc = call(moe.dispatch, x, ids_arr, E)
    if np.dtype(dtype).kind != "f":
        return expect_raises(exc, TypeError, "int x")
    if np.dtype(ids_dtype).kind not in "iu":
        return expect_raises(exc, TypeError, "float expert_ids")
    if bad_id is not None and T:
        return expect_raises(exc, ValueError, f"expert id {bad_id}")
    assert exc is None, exc
    event("valid")
    x32 = cast(cast(values, dtype), np.float32)
    ref = reference.dispatch(x32, ids, E)
    for name in ("offsets", "token_index", "position", "counts"):
        assert_int_equal(getattr(res, name), ref[name], what=name)
    # a copy of the rows, bit for bit (NaN and Inf included)
    assert res.x_sorted.dtype == np.float32 and res.x_sorted.shape == (len(ref["token_index"]), d)
    assert np.array_equal(res.x_sorted.view(np.uint32), x32[ref["token_index"]].view(np.uint32))

    # combine the dispatched rows back, with random weights in some dtype and layout
    N = res.x_sorted.shape[0]
    y = laid_out(cast(as64(res.x_sorted) * 0.5 + rng.standard_normal((N, d)), dtype), layout)
    w_dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    weights = laid_out(rng.standard_normal((T, k)).astype(w_dtype),
                       data.draw(st.sampled_from(LAYOUTS)))
    pos = laid_out(res.position, data.draw(st.sampled_from(LAYOUTS)))
    out, exc = call(moe.combine, y, pos, weights)
    assert exc is None, exc
    y64, w64 = as64(np.asarray(y).astype(np.float32)), as64(np.asarray(weights).astype(np.float32))
    with np.errstate(all="ignore"):
        want = reference.combine(y64, res.position, w64)
        bound = reference.combine(np.abs(y64), res.position, np.abs(w64)).max(axis=1, initial=0)
    check_rows(out, want, (T, d), bound, "combine")


def check_rows(out, want, shape, bound, what):
    """Row by row (rows are independent: specials in one row must not disturb another).

    bound: per row, an upper bound of every magnitude the float32 computation passes through
    (|products|, partial sums, hidden units), from the float64 reference.  Rows with bound <
    1e6 are compared together under the tolerance policy; rows with a larger bound that still
    fits float32 (< 1e37) one by one, each with its own absolute scale -- float32 represents
    that computation, so the reference holds there too.  Beyond, float32 overflows on the way
    (the float64 reference does not): only no-crash.  Wherever the reference is NaN / Inf,
    ours must not be finite (NaN and Inf propagate)."""
    assert out.dtype == np.float32 and out.shape == shape, (out.dtype, out.shape, shape)
    out = np.asarray(out).reshape(-1, shape[-1])
    want = np.asarray(want, np.float64).reshape(out.shape)
    bound = np.asarray(bound, np.float64)
    ok = np.isfinite(want).all(axis=1) & np.isfinite(bound)
    plain = ok & (bound < 1e6)
    if plain.any():
        assert_close(out[plain], want[plain], what=f"{what} (rows of moderate values)")
    for r in np.flatnonzero(ok & ~plain & (bound < 1e37)):
        assert_close(out[r], want[r], what=f"{what} (row {r}, values up to {bound[r]:.3g})")
    nonfinite = ~np.isfinite(want)
    assert not np.isfinite(out[nonfinite]).any(), (
        f"{what}: the reference is NaN/Inf at {np.argwhere(nonfinite)[:4].tolist()} but ours "
        f"is finite there: {out[nonfinite][np.isfinite(out[nonfinite])][:4]}")


def ffn_bound(x, w_gate, w_up, w_down, activation):
    """Per row of x (N, d): the largest magnitude a dense FFN passes through in float32."""
    x = as64(x)
    with np.errstate(all="ignore"):
        sums = [np.abs(x) @ np.abs(as64(w)).T for w in (w_gate, w_up) if w is not None]
        h = np.abs(reference.activate(activation, None if w_gate is None else x @ as64(w_gate).T,
                                      x @ as64(w_up).T))
        parts = sums + [h, h @ np.abs(as64(w_down)).T]
        return np.max([p.max(axis=1, initial=0) for p in parts], axis=0)


# ---- expert FFN / dense FFN ------------------------------------------------------------------

@_settings(400)
@given(E=st.integers(1, 70), d=st.sampled_from([1, 2, 5, 16, 33]), F=st.sampled_from([1, 3, 8, 20]),
       activation=st.sampled_from(ACTIVATIONS), x_dtype=st.sampled_from(INPUT_DTYPES[:-1]),
       w_dtype=st.sampled_from(FLOAT_DTYPES), layout=st.sampled_from(LAYOUTS),
       special_rate=st.sampled_from([0.0, 0.0, 0.5]), data=st.data())
def test_expert_ffn_property(E, d, F, activation, x_dtype, w_dtype, layout, special_rate, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    counts = rng.integers(0, 4, size=E) * (rng.random(E) < 0.6)  # many experts without rows
    offsets = np.concatenate([[0], np.cumsum(counts)])
    N = int(offsets[-1])
    values = data.draw(float_values((N, d), grid_ok=False, specials=HUGE + NONFINITE,
                                    special_rate=special_rate))
    x = laid_out(cast(values, x_dtype), layout)
    scale = d ** -0.5
    w_gate = ((rng.standard_normal((E, F, d)) * scale).astype(w_dtype)
              if activation in GATED else None)
    w_up = laid_out((rng.standard_normal((E, F, d)) * scale).astype(w_dtype), layout)
    w_down = laid_out((rng.standard_normal((E, d, F)) * F ** -0.5).astype(w_dtype), layout)
    out, exc = call(moe.expert_ffn, x, laid_out(offsets, layout), w_gate, w_up, w_down,
                    activation=activation)
    if np.dtype(x_dtype).kind != "f":
        return expect_raises(exc, TypeError, "int x_sorted")
    assert exc is None, exc
    event("valid" + (" with specials" if special_rate and N else ""))
    x32 = cast(cast(values, x_dtype), np.float32)
    ws = [None if w is None else np.asarray(w).astype(np.float32) for w in (w_gate, w_up, w_down)]
    with np.errstate(all="ignore"):
        want = reference.expert_ffn(x32, offsets, *ws, activation=activation)
    bound = np.zeros(N)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            bound[lo:hi] = ffn_bound(x32[lo:hi], *[None if w is None else w[e] for w in ws],
                                     activation)
    check_rows(out, want, (N, d), bound, f"expert_ffn[{activation}]")

    # the dense FFN: expert 0's weights on every row
    dense = [None if w is None else w[0] for w in (w_gate, np.asarray(w_up), np.asarray(w_down))]
    out, exc = call(moe.ffn, x, *dense, activation=activation)
    assert exc is None, exc
    with np.errstate(all="ignore"):
        dense64 = [None if w is None else w[0] for w in ws]
        want = reference.ffn(x32, *dense64, activation=activation)
    check_rows(out, want, (N, d), ffn_bound(x32, *dense64, activation), f"ffn[{activation}]")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_ffn_non_finite_input_propagates(make, activation, bad):
    # A NaN / Inf in a row makes every reference output of that row NaN or Inf; ours must not
    # turn it into finite numbers, and the other rows stay exact.
    x = make.normal(3, 8)
    x[1, 3] = bad
    w = make.expert_weights(1, 16, 8, activation)
    ws = [None if a is None else a[0] for a in w]
    out = moe.ffn(x, *ws, activation=activation)
    with np.errstate(all="ignore"):
        want = reference.ffn(x, *ws, activation=activation)
    check_rows(out, want, (3, 8), ffn_bound(x, *ws, activation),
               f"ffn[{activation}] with {bad} in row 1")


@pytest.mark.parametrize("activation,side", [(a, "zero") for a in ACTIVATIONS]
                         + [(a, "linear") for a in ("relu", "gelu", "gelu-tanh")])
@pytest.mark.parametrize("huge", [1e30, -3e36])
def test_ffn_huge_inputs_that_float32_represents(make, activation, huge, side):
    # Row 1 holds one huge entry, and the weights that meet it are signed so that every
    # (gate, or ungated) pre-activation of that row lands on the activation's zero side
    # (relu / silu / gelu of -3e29 are 0 in any precision: exp(3e29) is inf) or, for the
    # ungated relu / gelu, on its linear side.  Every intermediate then fits float32 (the
    # bound is checked), so the float64 reference is what float32 arithmetic gives.
    x = make.normal(3, 8)
    x[1, 2] = huge
    w_gate, w_up, w_down = [None if a is None else a[0] for a in
                            make.expert_weights(1, 16, 8, activation)]
    first = w_gate if w_gate is not None else w_up
    first[:, 2] = np.abs(first[:, 2]) * (-np.sign(huge) if side == "zero" else np.sign(huge))
    ws = (w_gate, w_up, w_down)
    bound = ffn_bound(x, *ws, activation)
    assert bound[1] < 1e37, bound
    out = moe.ffn(x, *ws, activation=activation)
    with np.errstate(all="ignore"):
        want = reference.ffn(x, *ws, activation=activation)
    check_rows(out, want, (3, 8), bound, f"ffn[{activation}] with {huge:g} in row 1")


# ---- the layer -------------------------------------------------------------------------------

@st.composite
def layer_cases(draw):
    d = draw(st.integers(1, 24))
    F = draw(st.integers(1, 24))
    E = draw(st.integers(1, 70))
    top_k = draw(st.integers(1, min(E, 8)))
    divisors = [g for g in range(1, E + 1) if E % g == 0]
    if draw(st.sampled_from([False] * 9 + [True])):
        n_groups, topk_groups = draw(st.integers(0, E + 1)), draw(st.integers(0, 3))
    else:
        n_groups = draw(st.sampled_from(divisors))
        topk_groups = draw(st.integers(min(n_groups, -(-top_k // (E // n_groups))), n_groups))
    shared = draw(st.integers(0, 2))
    options = dict(
        activation=draw(st.sampled_from(ACTIVATIONS)),
        scoring=draw(st.sampled_from(SCORINGS)),
        renormalize=draw(st.booleans()),
        routed_scaling=draw(st.sampled_from([1.0, 2.5])),
        n_groups=n_groups, topk_groups=topk_groups,
        expert_bias=draw(st.booleans()),
        n_shared_experts=shared,
        shared_expert_gate=bool(shared) and draw(st.booleans()),
        capacity_factor=draw(capacity_factors(0.1, 2.0, (0.0, -0.5))),
    )
    T = draw(st.sampled_from([0, 1, 1, 2, 5, 13, 40]))
    lead = draw(st.sampled_from([(T,), (T,), (1, T)] + ([(T // 2, 2)] if T % 2 == 0 else [])
                                + ([()] if T == 1 else [])))
    values = draw(float_values(lead + (d,), grid_ok=False, specials=HUGE + NONFINITE,
                               special_rate=0.3))
    if T and draw(st.integers(0, 5)) == 0:
        values.reshape(-1, d)[0] = 0.0  # a zero token: all logits tie at 0
    dtype = draw(st.sampled_from(INPUT_DTYPES[:-1]))
    layout = draw(st.sampled_from(LAYOUTS))
    return d, F, E, top_k, options, values, dtype, layout, draw(st.integers(0, 2**31 - 1))


@_settings(500)
@given(layer_cases())
def test_layer_property(case):
    d, F, E, top_k, options, values, dtype, layout, layer_seed = case
    layer, exc = call(moe.SparseMoE, d, F, E, top_k, seed=layer_seed, **options)
    bad = route_errors(E, top_k, options["scoring"], options["n_groups"], options["topk_groups"],
                       options["routed_scaling"], options["capacity_factor"])
    if bad is not None:
        return expect_raises(exc, ValueError, f"SparseMoE with bad {bad}")
    assert exc is None, exc
    if layer.use_expert_bias:
        layer.expert_bias[:] = np.random.default_rng(layer_seed).standard_normal(E) * 0.05
    x = laid_out(cast(values, dtype), layout)
    result, exc = call(layer, x, return_routing=True)
    if np.dtype(dtype).kind != "f":
        return expect_raises(exc, TypeError, "int x")
    x32 = cast(cast(values, dtype), np.float32)  # what the layer computes on
    if not np.isfinite(x32).all():
        return expect_raises(exc, ValueError, "non-finite x (router logits)")
    assert exc is None, exc
    event("valid" + (" with huge tokens" if np.abs(x32).max(initial=0) > 1e6 else ""))
    out, routing = result
    assert out.shape == values.shape and out.dtype == np.float32
    with np.errstate(all="ignore"):
        want, ref = reference.layer_forward(layer, x32.astype(np.float64))
    T = int(np.prod(values.shape[:-1], dtype=np.int64))
    assert_ids_equal(routing.expert_ids, ref["expert_ids"].reshape(T, top_k))
    assert_close(routing.weights, ref["weights"].reshape(T, top_k), what="weights")
    assert_int_equal(routing.counts, ref["counts"], what="counts")
    assert routing.n_dropped == ref["n_dropped"]
    assert_scalar_close(routing.aux_loss, ref["aux_loss"], what="aux_loss")
    assert_scalar_close(routing.z_loss, ref["z_loss"], what="z_loss")
    # Tokens with huge entries overflow float32 in the FFN (their float64 reference does
    # not); the other tokens must equal the reference regardless of such neighbours.
    x2 = x32.reshape(T, d)
    plain = np.abs(x2).max(axis=1, initial=0) < 1e6
    if plain.any():
        assert_close(out.reshape(T, d)[plain], want.reshape(T, d)[plain], what="out (plain tokens)")


# ---- thread count ----------------------------------------------------------------------------

@_settings(15)
@given(n=st.integers(1, 8), data=st.data())
def test_set_num_threads_keeps_results(n, data):
    layer = moe.SparseMoE(16, 24, 8, 2, seed=3)
    rng = np.random.default_rng(data.draw(st.integers(0, 100)))
    x = rng.standard_normal((70, 16)).astype(np.float32)
    before = moe.get_num_threads()
    want = layer(x)
    try:
        moe.set_num_threads(n)
        assert moe.get_num_threads() == n
        assert np.array_equal(layer(x), want)
    finally:
        moe.set_num_threads(before)


# ---- wrong Python types for every public function --------------------------------------------

JUNK = {
    "None": None, "str": "junk", "bytes": b"junk", "float": 1.5, "bool": True, "int": 7,
    "bigint": 2**70, "negint": -3, "list": [1.0, 2.0], "ragged": [[1.0, 2.0], [3.0]],
    "dict": {"a": 1}, "object": object(), "complex": 1 + 2j, "np_float": np.float32(2.0),
    "str_array": np.array(["a", "b"]), "nan": float("nan"), "inf": float("inf"),
    "int_array": np.arange(6).reshape(2, 3), "float_array_3d": np.ones((2, 2, 2)),
}

T_, E_, K_, D_, F_ = 6, 4, 2, 8, 5
# What each kind of argument does with each junk value: an exception type, or "ok" (the
# value is valid for that kind, and the call must then equal the reference).  Names not
# listed for a kind raise TypeError.
KINDS = {
    # a required float array: non-numeric -> TypeError, numeric of the wrong shape -> ValueError
    "float_array": dict(float=ValueError, np_float=ValueError, nan=ValueError, inf=ValueError,
                        list=ValueError, float_array_3d=ValueError),
    # an integer array (ids, positions, offsets, counts)
    "int_array": dict(int=ValueError, negint=ValueError, int_array=ValueError),
    # an int option (top_k, n_experts, sizes, thread count): out of range -> ValueError
    "int": dict(int="range", bigint=ValueError, negint=ValueError),
    # a string option: anything else is not one of the choices -> ValueError
    "choice": {name: ValueError for name in JUNK},
    # a real-number option: non-finite -> ValueError
    "real": dict(int="ok", negint="ok", bigint="ok", float="ok", np_float="ok", nan=ValueError,
                 inf=ValueError),
    # a flag: bool(value), which only arrays of more than one element refuse (ValueError)
    "flag": {name: ("ok" if name not in ("str_array", "int_array", "float_array_3d")
                    else ValueError) for name in JUNK},
}


def _valid_args():
    rng = np.random.default_rng(7)
    f32 = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    ids = np.argsort(rng.random((T_, E_)), axis=1)[:, :K_].astype(np.int32)
    disp = moe.dispatch(f32(T_, D_), ids, E_)
    return {
        "logits": rng.standard_normal((T_, E_)), "x": f32(T_, D_), "expert_ids": ids,
        "y_sorted": f32(T_ * K_, D_), "position": disp.position, "weights": f32(T_, K_),
        "x_sorted": f32(9, D_), "offsets": np.array([0, 3, 3, 7, 9]),
        "w_gate": f32(E_, F_, D_), "w_up": f32(E_, F_, D_), "w_down": f32(E_, D_, F_),
        "dense": (f32(F_, D_), f32(F_, D_), f32(D_, F_)),
        "bias": f32(E_).astype(np.float64), "counts": np.array([3, 0, 5, 4]),
    }


V = _valid_args()

# function -> (callable(**kwargs), valid kwargs, {argument: kind}, overrides {(arg, junk): want})
PUBLIC = {
    "route": (moe.route, dict(logits=V["logits"], top_k=K_, scoring="softmax", renormalize=True,
                              routed_scaling=1.0, expert_bias=None, n_groups=1, topk_groups=1,
                              capacity_factor=None),
              dict(logits="float_array", top_k="int", scoring="choice", renormalize="flag",
                   routed_scaling="real", expert_bias="float_array", n_groups="int",
                   topk_groups="int", capacity_factor="real"),
              {("expert_bias", "None"): "ok", ("capacity_factor", "None"): "ok",
               ("capacity_factor", "negint"): ValueError, ("top_k", "int"): ValueError,
               ("n_groups", "int"): ValueError, ("topk_groups", "int"): ValueError,
               ("expert_bias", "list"): ValueError}),
    "dispatch": (moe.dispatch, dict(x=V["x"], expert_ids=V["expert_ids"], n_experts=E_),
                 dict(x="float_array", expert_ids="int_array", n_experts="int"),
                 {("n_experts", "int"): "ok", ("n_experts", "bigint"): ValueError}),
    "combine": (moe.combine, dict(y_sorted=V["y_sorted"], position=V["position"],
                                  weights=V["weights"]),
                dict(y_sorted="float_array", position="int_array", weights="float_array"), {}),
    "expert_ffn": (moe.expert_ffn, dict(x_sorted=V["x_sorted"], offsets=V["offsets"],
                                        w_gate=V["w_gate"], w_up=V["w_up"], w_down=V["w_down"],
                                        activation="swiglu", dtype=None),
                   dict(x_sorted="float_array", offsets="int_array", w_gate="float_array",
                        w_up="float_array", w_down="float_array", activation="choice",
                        dtype="choice"),
                   {("w_gate", "None"): ValueError, ("dtype", "None"): "ok"}),
    "ffn": (moe.ffn, dict(x=V["x"], w_gate=V["dense"][0], w_up=V["dense"][1],
                          w_down=V["dense"][2], activation="swiglu", dtype=None),
            dict(x="float_array", w_gate="float_array", w_up="float_array", w_down="float_array",
                 activation="choice", dtype="choice"),
            {("w_gate", "None"): ValueError, ("dtype", "None"): "ok"}),
    "pack_experts": (moe.pack_experts, dict(w_gate=V["w_gate"], w_up=V["w_up"],
                                            w_down=V["w_down"], activation="swiglu", dtype=None),
                     dict(w_gate="float_array", w_up="float_array", w_down="float_array",
                          activation="choice", dtype="choice"),
                     # w_up's rank is checked before its dtype: a scalar or a 1-D / 2-D
                     # array of any dtype is a ValueError here (TypeError elsewhere)
                     {("w_gate", "None"): ValueError, ("dtype", "None"): "ok",
                      **{("w_up", j): ValueError for j in ("str", "bytes", "bool", "int",
                                                           "negint", "complex", "str_array",
                                                           "int_array")}}),
    "update_expert_bias": (moe.update_expert_bias, dict(bias=V["bias"], counts=V["counts"],
                                                        rate=0.01),
                           dict(bias="float_array", counts="int_array", rate="real"),
                           # bias is updated in place: anything but a float ndarray is a
                           # TypeError, whatever its shape
                           {("bias", j): TypeError for j in ("float", "list", "np_float",
                                                             "nan", "inf")}),
    "SparseMoE": (moe.SparseMoE, dict(d_model=D_, d_ff=F_, n_experts=E_, top_k=K_,
                                      activation="swiglu", scoring="softmax", renormalize=True,
                                      routed_scaling=1.0, n_groups=1, topk_groups=1,
                                      expert_bias=False, n_shared_experts=0, shared_d_ff=None,
                                      shared_expert_gate=False, capacity_factor=None,
                                      dtype="float32"),
                  dict(d_model="int", d_ff="int", n_experts="int", top_k="int",
                       activation="choice", scoring="choice", renormalize="flag",
                       routed_scaling="real", n_groups="int", topk_groups="int",
                       expert_bias="flag", n_shared_experts="int", shared_d_ff="int",
                       shared_expert_gate="flag", capacity_factor="real", dtype="choice"),
                  {("shared_d_ff", "None"): "ok", ("capacity_factor", "None"): "ok",
                   ("capacity_factor", "negint"): ValueError, ("d_model", "int"): "ok",
                   ("d_ff", "int"): "ok", ("n_experts", "int"): "ok", ("top_k", "int"): ValueError,
                   ("n_groups", "int"): ValueError, ("topk_groups", "int"): ValueError,
                   ("n_shared_experts", "int"): "ok", ("shared_d_ff", "int"): "ok",
                   # sizes of 2**70: numpy refuses the weight arrays (ValueError, "too big")
                   ("d_model", "bigint"): (ValueError, MemoryError),
                   ("d_ff", "bigint"): (ValueError, MemoryError),
                   ("n_experts", "bigint"): ValueError,
                   ("n_shared_experts", "bigint"): (ValueError, MemoryError),
                   ("shared_d_ff", "bigint"): "ok"}),
    "layer_call": (None, dict(x=V["x"], return_routing=False),
                   dict(x="float_array", return_routing="flag"),
                   {("x", "float_array_3d"): ValueError}),
    "set_num_threads": (None, dict(n=2), dict(n="int"), {("n", "int"): "ok"}),
}


def _expected(func, arg, kind, junk):
    _, _, _, overrides = PUBLIC[func]
    if (arg, junk) in overrides:
        return overrides[(arg, junk)]
    want = KINDS[kind].get(junk, TypeError)
    return ValueError if want == "range" else want


def _run_public(func, kwargs):
    if func == "layer_call":
        layer = moe.SparseMoE(D_, F_, E_, K_, seed=1)
        return layer(**kwargs)
    if func == "set_num_threads":
        before = moe.get_num_threads()
        try:
            return moe.set_num_threads(**kwargs)
        finally:
            moe.set_num_threads(before)
    if func == "update_expert_bias":
        kwargs = dict(kwargs)
        if isinstance(kwargs["bias"], np.ndarray):
            kwargs["bias"] = kwargs["bias"].copy()
    return PUBLIC[func][0](**kwargs)


_JUNK_CASES = [(f, a) for f, (_, _, kinds, _) in PUBLIC.items() for a in kinds]


@pytest.mark.parametrize("func,arg", _JUNK_CASES, ids=[f"{f}-{a}" for f, a in _JUNK_CASES])
def test_wrong_types_raise_the_documented_exception(func, arg):
    """Every argument of every public function, given each junk value: the exception type
    the KINDS table (and the function's overrides) names, or a valid result."""
    _, valid, kinds, _ = PUBLIC[func]
    _run_public(func, dict(valid))  # valid as given
    problems = []
    for junk, value in JUNK.items():
        want = _expected(func, arg, kinds[arg], junk)
        kwargs = dict(valid, **{arg: value})
        try:
            _run_public(func, kwargs)
        except Exception as exc:  # noqa: BLE001 -- compared with the table below
            if want == "ok" or not isinstance(exc, want):
                problems.append(f"{arg}={junk}: {type(exc).__name__}: {exc}")
            continue
        if want != "ok":
            names = want.__name__ if isinstance(want, type) else "/".join(w.__name__ for w in want)
            problems.append(f"{arg}={junk}: no exception (expected {names})")
    assert not problems, f"{func}:\n  " + "\n  ".join(problems)


@_settings(300)
@given(func=st.sampled_from(sorted(PUBLIC)), data=st.data())
def test_wrong_types_in_any_combination_never_crash(func, data):
    """Several arguments wrong at once: a result or TypeError / ValueError / OverflowError."""
    _, valid, kinds, _ = PUBLIC[func]
    args = data.draw(st.lists(st.sampled_from(sorted(kinds)), min_size=1, max_size=len(kinds),
                              unique=True))
    kwargs = dict(valid)
    for arg in args:
        kwargs[arg] = JUNK[data.draw(st.sampled_from(sorted(JUNK)))]
    try:
        _run_public(func, kwargs)
    except (TypeError, ValueError, OverflowError):
        pass
    except MemoryError:
        # only sizes of 2**70 may ask numpy for impossible weight arrays
        assume(False)


def test_valid_junk_gives_the_reference_result():
    """Values of another type that are valid (numpy ints, ints for reals, array-likes)
    give the same result as the canonical arguments."""
    logits = V["logits"]
    want = moe.route(logits, 2, routed_scaling=3.0)
    for top_k, scaling, arr in ((np.int64(2), 3, logits.tolist()), (np.int8(2), np.float32(3.0),
                                                                     logits.T.copy().T)):
        got = moe.route(arr, top_k, routed_scaling=scaling)
        assert np.array_equal(got.expert_ids, want.expert_ids)
        assert np.array_equal(got.weights, want.weights)
    check_route_result(moe.route(logits, 2, routed_scaling=-3), logits, 2,
                       dict(routed_scaling=-3.0))
