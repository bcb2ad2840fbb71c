"""The one tolerance table and comparison policy of the test suite.

Every float result of the C core is compared with the float64 oracle in moe/reference.py
through assert_close; integer results (ids, counts, offsets, positions, token_index) must
match exactly; top-k ids are compared exactly, or as sets per row with ties checked by score.
"""
import numpy as np

# fp32 results vs the float64 reference.  The elementwise term alone is not enough:
# FFN and layer outputs are sums of products with cancellation, so an output element
# near zero carries the rounding error of its (much larger) terms.  The absolute term
# scales that error with the largest reference value of the same array.
FP32_RTOL = 1e-5
FP32_ATOL_SCALE = 1e-5  # absolute tolerance = FP32_ATOL_SCALE * max|ref|

# Scalar losses (aux_loss, z_loss): computed in float64 by the core and the reference,
# so only summation order separates them.
LOSS_RTOL = 1e-6

# float64 results of float64 arithmetic (e.g. update_expert_bias on a float64 array).
FP64_RTOL = 1e-12

# bf16 / fp16 expert weights (compute and accumulation stay fp32): flash-attention's rule.
# The error against the float64 reference (on the decoded weights) may be at most this many
# times the error of the same computation done naively at that precision.  The error is the
# RMS over all elements of the arrays compared, not the max: when ours and the naive
# computation are both fp32, their errors are of the same size, and the max over a few
# dozen elements (one token) is a coin toss -- the ratio of two maxima exceeds 2 in about
# 1-3% of random draws with nothing wrong, while the RMS over a few hundred elements or more
# is stable.  A real loss of precision (an intermediate rounded to bf16) is 100-1000x.
LOWP_NAIVE_FACTOR = 2.0


def _fmt_index(idx):
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def assert_close(actual, ref, rtol=FP32_RTOL, atol_scale=FP32_ATOL_SCALE, what=""):
    """|actual - ref| <= rtol * |ref| + atol_scale * max|ref|, elementwise, same shape."""
    label = f"{what}: " if what else ""
    actual = np.asarray(actual)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{label}shape {actual.shape} != reference {ref.shape}"
    if ref.size == 0:
        return
    a = actual.astype(np.float64)
    assert np.isfinite(a).all(), f"{label}non-finite values in the result"
    atol = atol_scale * float(np.max(np.abs(ref)))
    err = np.abs(a - ref)
    bound = rtol * np.abs(ref) + atol
    bad = err > bound
    if bad.any():
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{label}{int(bad.sum())} of {ref.size} elements out of tolerance "
            f"(rtol={rtol:g}, atol={atol:.3g}); worst at {_fmt_index(worst)}: "
            f"got {a[worst]!r}, reference {ref[worst]!r}, max abs err {err.max():.3g}"
        )


def assert_within_naive(actual, naive, ref, factor=LOWP_NAIVE_FACTOR, what=""):
    """rms(actual - ref) <= factor * rms(naive - ref).

    Each argument is an array or a list of arrays (pooled: the RMS runs over all their
    elements; pool small cases so that there are a few hundred elements).  ref: the float64
    reference on the weights as stored (decoded bf16 / fp16 values); naive: the same
    computation at the working precision done plainly (the test says how).
    """
    label = f"{what}: " if what else ""

    def flat(arrays):
        if isinstance(arrays, (list, tuple)):
            return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
        return np.asarray(arrays, np.float64).ravel()

    actual, naive, ref = flat(actual), flat(naive), flat(ref)
    assert actual.shape == ref.shape == naive.shape, \
        f"{label}sizes {actual.shape}, naive {naive.shape}, reference {ref.shape}"
    if ref.size == 0:
        return
    assert np.isfinite(actual).all(), f"{label}non-finite values in the result"
    err = float(np.sqrt(np.mean((actual - ref) ** 2)))
    naive_err = float(np.sqrt(np.mean((naive - ref) ** 2)))
    assert err <= factor * naive_err, (
        f"{label}RMS error {err:.3g} > {factor:g} x the naive computation's {naive_err:.3g} "
        f"over {ref.size} elements (max abs error {float(np.max(np.abs(actual - ref))):.3g}, "
        f"max |ref| {float(np.max(np.abs(ref))):.3g})"
    )


def assert_scalar_close(actual, ref, rtol=LOSS_RTOL, what=""):
    """A float scalar (a loss) within rtol of the reference (absolute rtol near 0)."""
    actual, ref = float(actual), float(ref)
    assert np.isfinite(actual), f"{what}: got {actual}"
    assert abs(actual - ref) <= rtol * max(abs(ref), 1e-12), \
        f"{what}: got {actual!r}, reference {ref!r} (rtol {rtol:g})"


def assert_int_equal(actual, ref, what=""):
    """Integer outputs match exactly (values and shape; the dtype must be an integer one)."""
    label = f"{what}: " if what else ""
    actual = np.asarray(actual)
    ref = np.asarray(ref)
    assert actual.dtype.kind in "iu", f"{label}dtype {actual.dtype} is not an integer dtype"
    assert actual.shape == ref.shape, f"{label}shape {actual.shape} != reference {ref.shape}"
    if not np.array_equal(actual, ref):
        idx = np.argwhere(actual != ref)
        first = tuple(idx[0])
        raise AssertionError(
            f"{label}{len(idx)} of {ref.size} entries differ; first at {_fmt_index(first)}: "
            f"got {actual[first]}, reference {ref[first]}"
        )


def assert_topk_sets(ids, ref_ids, scores, what=""):
    """Top-k ids compared as sets per row; where the sets differ, only by tied entries.

    ids, ref_ids: (T, k) expert ids (no -1); scores: (T, E) the selection scores.  Each
    row of ids must hold k distinct experts, and the multiset of their scores must equal
    the reference's exactly: an expert may stand in for another only if they tie.
    """
    label = f"{what}: " if what else ""
    ids = np.asarray(ids)
    ref_ids = np.asarray(ref_ids)
    scores = np.asarray(scores, dtype=np.float64)
    assert ids.shape == ref_ids.shape, f"{label}shape {ids.shape} != {ref_ids.shape}"
    for t in range(ids.shape[0]):
        got, want = ids[t], ref_ids[t]
        assert len(set(got.tolist())) == len(got), f"{label}row {t} repeats an expert: {got}"
        if set(got.tolist()) == set(want.tolist()):
            continue
        g = np.sort(scores[t, got])
        w = np.sort(scores[t, want])
        assert np.array_equal(g, w), (
            f"{label}row {t}: experts {sorted(got.tolist())} vs reference "
            f"{sorted(want.tolist())} differ by more than ties (scores {g} vs {w})"
        )


def assert_ids_equal(ids, ref_ids, scores=None, what="expert_ids"):
    """Expert ids: exactly equal (order included) when scores is None, the no-tie case;
    with scores (T, E), compared as sets per row with ties checked by score."""
    if scores is None:
        assert_int_equal(ids, ref_ids, what)
    else:
        assert np.asarray(ids).dtype.kind in "iu", f"{what}: not an integer array"
        assert_topk_sets(ids, ref_ids, scores, what)
