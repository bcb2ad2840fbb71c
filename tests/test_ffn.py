"""moe.expert_ffn (grouped) and moe.ffn (dense) against moe.reference.

All seven activations; zero-size groups, one expert, no rows; d and F not multiples of
the vector width; an exact integer-valued case compared bit for bit; row independence
(a row's output does not depend on its neighbours); dtypes and layouts of the weights.
"""
import numpy as np
import pytest

import moe
from moe import reference
from tolerances import assert_close

from moe._C import ACTIVATIONS, GATED_ACTIVATIONS as GATED  # noqa: E402


def check_expert_ffn(x, offsets, w_gate, w_up, w_down, activation):
    out = moe.expert_ffn(x, offsets, w_gate, w_up, w_down, activation)
    ref = reference.expert_ffn(x, offsets, w_gate if activation in GATED else None, w_up,
                               w_down, activation)
    assert out.dtype == np.float32 and out.shape == np.shape(x)
    assert_close(out, ref, what=f"expert_ffn {activation}")
    return out, ref


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d,F,counts", [
    (48, 40, [30, 7, 45, 12]),         # one group spans two 32-row blocks
    (37, 23, [5, 0, 17, 1, 0, 9]),     # odd sizes, zero-size groups
    (128, 96, [70, 0, 33]),
    (5, 3, [2, 1]),
    (1, 1, [3, 4]),
])
def test_expert_ffn_matches_reference(make, activation, d, F, counts):
    E = len(counts)
    x = make.normal(sum(counts), d)
    check_expert_ffn(x, make.offsets(counts), *make.expert_weights(E, F, d, activation),
                     activation)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert(make, activation):
    x = make.normal(75, 40)
    check_expert_ffn(x, [0, 75], *make.expert_weights(1, 24, 40, activation), activation)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_all_rows_on_one_expert_among_many(make, activation):
    counts = [0, 0, 50, 0]
    x = make.normal(50, 20)
    check_expert_ffn(x, make.offsets(counts), *make.expert_weights(4, 12, 20, activation),
                     activation)


@pytest.mark.parametrize("activation", ["swiglu", "silu"])
def test_no_rows(make, activation):
    out = moe.expert_ffn(np.empty((0, 16), np.float32), np.zeros(4, np.int64),
                         *make.expert_weights(3, 8, 16, activation), activation)
    assert out.shape == (0, 16) and out.dtype == np.float32


def test_zero_width_experts(make):
    # d_ff = 0: the hidden layer is empty and every output row is zero
    x = make.normal(9, 6)
    w = np.empty((2, 0, 6), np.float32)
    out = moe.expert_ffn(x, [0, 4, 9], w, w, np.empty((2, 6, 0), np.float32), "swiglu")
    assert out.shape == (9, 6) and (out == 0).all()


@pytest.mark.parametrize("d,F", [(37, 23), (16, 32), (3, 70)])
def test_exact_integer_valued(rng, d, F):
    # small integers: every product and partial sum is an integer below 2**24, so fp32
    # arithmetic is exact in any summation order and relu adds no rounding
    counts = [6, 0, 40, 3]
    E = len(counts)
    vals = np.array([-2, -1, 1, 2], np.float32)
    x = rng.choice(vals, size=(sum(counts), d))
    w_up = rng.choice(vals, size=(E, F, d))
    w_down = rng.choice(vals, size=(E, d, F))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = moe.expert_ffn(x, offsets, None, w_up, w_down, "relu")
    ref = reference.expert_ffn(x, offsets, None, w_up, w_down, "relu")
    assert np.abs(ref).max() < 2**24 and (ref != 0).any()
    assert np.array_equal(out, ref)
    dense = moe.ffn(x, None, w_up[2], w_down[2], "relu")
    assert np.array_equal(dense, reference.ffn(x, None, w_up[2], w_down[2], "relu"))


@pytest.mark.parametrize("activation", ["swiglu", "geglu-tanh", "gelu", "relu"])
def test_rows_are_independent(make, activation):
    # a row's output is the same bits however many rows share its group, and wherever
    # it sits in the group (edge tiles repeat a valid row instead of padding)
    N, d, F = 45, 37, 23
    x = make.normal(N, d)
    w = make.expert_weights(1, F, d, activation)
    full = moe.expert_ffn(x, [0, N], *w, activation)
    for n in range(1, N + 1):
        assert np.array_equal(moe.expert_ffn(x[:n], [0, n], *w, activation), full[:n]), n
    perm = make.rng.permutation(N)
    assert np.array_equal(moe.expert_ffn(x[perm], [0, N], *w, activation), full[perm])
    # the same rows split over two experts with identical weights
    w2 = tuple(None if a is None else np.concatenate([a, a]) for a in w)
    assert np.array_equal(moe.expert_ffn(x, [0, 17, N], *w2, activation), full)


def test_non_gated_ignores_w_gate(make):
    x = make.normal(20, 16)
    w_gate, w_up, w_down = make.expert_weights(2, 8, 16, "swiglu")
    offsets = [0, 12, 20]
    for act in ("gelu", "gelu-tanh", "relu", "silu"):
        a = moe.expert_ffn(x, offsets, w_gate, w_up, w_down, act)
        b = moe.expert_ffn(x, offsets, None, w_up, w_down, act)
        assert np.array_equal(a, b), act


def test_weight_dtypes_and_layouts(make):
    counts = [10, 0, 13]
    x = make.normal(23, 20)
    offsets = make.offsets(counts)
    w_gate, w_up, w_down = make.expert_weights(3, 12, 20, "swiglu")
    want, _ = check_expert_ffn(x, offsets, w_gate, w_up, w_down, "swiglu")
    strided = make.normal(23, 40)
    strided[:, ::2] = x
    variants = [
        (x.astype(np.float64), offsets.astype(np.int32), w_gate.astype(np.float64),
         w_up.astype(np.float64), w_down.astype(np.float64)),
        (np.asfortranarray(x), offsets.tolist(), np.asfortranarray(w_gate),
         np.asfortranarray(w_up), np.asfortranarray(w_down)),
        (strided[:, ::2], offsets, w_gate[::-1].copy()[::-1],  # negative strides
         w_up.transpose(0, 2, 1).copy().transpose(0, 2, 1), w_down),
        (make.DLPackOnly(x), make.DLPackOnly(offsets), make.DLPackOnly(w_gate),
         make.DLPackOnly(w_up), make.DLPackOnly(w_down)),
    ]
    for args in variants:
        got = moe.expert_ffn(*args, "swiglu")
        assert np.array_equal(got, want)


def test_expert_ffn_unaligned(make):
    counts = [10, 5]
    x = make.normal(15, 12)
    w = make.expert_weights(2, 8, 12, "swiglu")
    want = moe.expert_ffn(x, [0, 10, 15], *w)
    got = moe.expert_ffn(make.unaligned(x), make.unaligned(np.array([0, 10, 15])),
                         *[make.unaligned(a) for a in w])
    assert np.array_equal(got, want)


# ---- dense ffn -----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("T,d,F", [(100, 64, 96), (33, 37, 23), (1, 8, 5)])
def test_dense_ffn_matches_reference(make, activation, T, d, F):
    x = make.normal(T, d)
    w_gate, w_up, w_down = make.dense_weights(F, d, activation)
    out = moe.ffn(x, w_gate, w_up, w_down, activation)
    ref = reference.ffn(x, w_gate, w_up, w_down, activation)
    assert out.dtype == np.float32 and out.shape == (T, d)
    assert_close(out, ref, what=f"ffn {activation}")
    # the dense FFN is the grouped FFN with one expert
    grouped = moe.expert_ffn(x, [0, T], None if w_gate is None else w_gate[None],
                             w_up[None], w_down[None], activation)
    assert np.array_equal(out, grouped)


def test_dense_ffn_zero_tokens(make):
    w_gate, w_up, w_down = make.dense_weights(8, 16, "swiglu")
    out = moe.ffn(np.empty((0, 16), np.float32), w_gate, w_up, w_down)
    assert out.shape == (0, 16) and out.dtype == np.float32
