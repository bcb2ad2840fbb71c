"""moe.SoftMoE and moe.MixtureOfTokens against moe.reference.soft_moe / mixture_of_tokens.

Output, dispatch weights D and combine weights C for every activation, normalisation on
and off, Mixture of Tokens with and without mixing, group sizes and temperature; edge cases
(one token per group, one slot, one expert, one group, an empty batch, non-contiguous and
float64 input); bf16 / fp16 weights bitwise equal to a float32 layer on the decoded
weights; group and thread-count invariance; bad input naming the argument and the shape.
"""
import numpy as np
import pytest

import moe
from moe import reference
from tolerances import assert_close

ACTIVATIONS = ("swiglu", "geglu", "geglu-tanh", "gelu", "gelu-tanh", "relu", "silu",
               "swiglu-oai")


def weights(layer):
    """The layer's FFN weights as float64 (bf16 layers store uint16 bits)."""
    def dec(a):
        if a is None:
            return None
        if layer.dtype == "bfloat16":
            return moe.bfloat16_to_float32(a).astype(np.float64)
        return np.asarray(a, np.float64)
    return dec(layer.w_gate), dec(layer.w_up), dec(layer.w_down)


def ref_soft(layer, x):
    g, u, d = weights(layer)
    return reference.soft_moe(np.asarray(x, np.float32), layer.phi, g, u, d,
                              slots_per_expert=layer.slots_per_expert,
                              activation=layer.activation, normalize=layer.normalize,
                              scale=layer.scale, alpha=layer.swiglu_alpha,
                              limit=layer.swiglu_limit)


def ref_mot(layer, x):
    g, u, d = weights(layer)
    return reference.mixture_of_tokens(
        np.asarray(x, np.float32), layer.phi, g, u, d, slots_per_expert=layer.slots_per_expert,
        activation=layer.activation, temperature=layer.temperature, mixing=layer.mixing,
        group_size=layer.group_size, normalize=layer.normalize, scale=layer.scale,
        alpha=layer.swiglu_alpha, limit=layer.swiglu_limit)


def check(layer, x, ref_fn=ref_soft):
    out, D, C = layer(x, return_weights=True)
    ref = ref_fn(layer, x)
    xs = np.shape(x)
    assert out.dtype == np.float32 and out.shape == xs
    assert D.shape == C.shape == xs[:-1] + (layer.n_slots,)
    assert_close(D, ref["dispatch"], what="dispatch")
    assert_close(C, ref["combine"], what="combine")
    assert_close(out, ref["out"], what="out")
    assert np.array_equal(layer(x), out)  # without the weights: the same bits
    return out, D, C


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_soft_moe_matches_reference(activation):
    layer = moe.SoftMoE(24, 16, 4, 2, activation=activation, seed=1)
    check(layer, rand(np.random.default_rng(0), 3, 9, 24))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dims", [(2, 70, 40, 24, 3, 3), (1, 5, 17, 9, 5, 1),
                                  (4, 1, 16, 8, 3, 2), (3, 6, 8, 8, 1, 1)],
                         ids=["multi-block", "one-group", "one-token", "one-slot"])
def test_soft_moe_shapes(dims, normalize):
    B, m, d, F, E, s = dims
    layer = moe.SoftMoE(d, F, E, s, normalize=normalize, scale=3.0 if normalize else 1.0,
                        seed=2)
    check(layer, rand(np.random.default_rng(1), B, m, d))


def test_normalize_changes_logits_only():
    x = rand(np.random.default_rng(3), 2, 6, 16) * 5.0
    plain = moe.SoftMoE(16, 8, 3, 2, seed=4)
    norm = moe.SoftMoE(16, 8, 3, 2, normalize=True, scale=0.5, seed=4)
    out_p, _, C_p = check(plain, x)
    out_n, _, C_n = check(norm, x)
    assert not np.allclose(C_p, C_n)
    # the normalised logits are bounded by |scale|: C is near uniform at scale 0.5
    assert np.abs(C_n * norm.n_slots - 1.0).max() < np.exp(1.0) - 1.0


def test_one_group_2d_input():
    layer = moe.SoftMoE(16, 8, 3, 2, seed=5)
    x = rand(np.random.default_rng(4), 7, 16)
    out, D, C = check(layer, x)
    out3, D3, C3 = layer(x[None], return_weights=True)
    assert np.array_equal(out, out3[0]) and np.array_equal(D, D3[0])
    assert np.array_equal(C, C3[0])


def test_weights_sum_to_one():
    layer = moe.SoftMoE(32, 16, 4, 3, seed=6)
    _, D, C = layer(rand(np.random.default_rng(5), 3, 11, 32), return_weights=True)
    assert (D >= 0).all() and (C >= 0).all()
    assert_close(D.sum(axis=1), np.ones((3, layer.n_slots)), what="D over tokens")
    assert_close(C.sum(axis=2), np.ones((3, 11)), what="C over slots")


def test_one_token_per_group_dispatch_is_one():
    layer = moe.SoftMoE(16, 8, 3, 2, seed=7)
    out, D, _ = check(layer, rand(np.random.default_rng(6), 5, 1, 16))
    assert (D == 1.0).all()


def test_groups_are_independent():
    """A group's output is the same bits alone or in any batch (no cross-group state)."""
    layer = moe.SoftMoE(24, 16, 4, 2, seed=8)
    x = rand(np.random.default_rng(7), 5, 13, 24)
    out = layer(x)
    for b in range(5):
        assert np.array_equal(layer(x[b]), out[b])
    assert np.array_equal(layer(x[1:4]), out[1:4])


def test_thread_count_invariance():
    layer = moe.SoftMoE(40, 24, 4, 3, normalize=True, seed=9)
    x = rand(np.random.default_rng(8), 4, 90, 40)
    n = moe.get_num_threads()
    try:
        moe.set_num_threads(1)
        one = layer(x, return_weights=True)
        moe.set_num_threads(max(2, n))
        many = layer(x, return_weights=True)
    finally:
        moe.set_num_threads(n)
    for a, b in zip(one, many):
        assert np.array_equal(a, b)


def test_noncontiguous_and_float64_input():
    layer = moe.SoftMoE(16, 8, 3, 2, seed=10)
    big = rand(np.random.default_rng(9), 3, 20, 32)
    x = big[:, ::2, ::2]                        # strided view
    assert not x.flags.c_contiguous
    want = layer(np.ascontiguousarray(x))
    assert np.array_equal(layer(x), want)
    assert np.array_equal(layer(np.asfortranarray(x)), want)
    assert np.array_equal(layer(x.astype(np.float64)), want)


def test_empty_batch():
    layer = moe.SoftMoE(16, 8, 3, 2, seed=11)
    out, D, C = layer(np.zeros((0, 5, 16), np.float32), return_weights=True)
    assert out.shape == (0, 5, 16) and D.shape == C.shape == (0, 5, 6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_bitwise(dtype):
    """Compute is float32 either way: a bf16/fp16 layer equals a float32 layer holding the
    decoded weights, bit for bit."""
    low = moe.SoftMoE(32, 24, 3, 2, dtype=dtype, seed=12)
    f32 = moe.SoftMoE(32, 24, 3, 2, seed=12)
    f32.phi = low.phi
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(low, name)
        setattr(f32, name, moe.bfloat16_to_float32(w) if dtype == "bfloat16"
                else w.astype(np.float32))
    x = rand(np.random.default_rng(10), 2, 9, 32)
    for a, b in zip(low(x, return_weights=True), f32(x, return_weights=True)):
        assert np.array_equal(a, b)
    check(low, x)


def test_weight_assignment_repacks():
    layer = moe.SoftMoE(16, 8, 2, 2, seed=13)
    x = rand(np.random.default_rng(11), 2, 5, 16)
    before = layer(x)
    layer.w_up = layer.w_up * 2.0
    after = check(layer, x)[0]
    assert not np.array_equal(before, after)
    layer.w_down[...] = 0.0                     # in place: needs pack()
    assert np.array_equal(layer(x), after)
    assert not layer.pack()(x).any()


# ---- Mixture of Tokens ------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(group_size=2),
                                dict(slots_per_expert=2, normalize=True, scale=2.0),
                                dict(mixing=False), dict(mixing=False, temperature=3.0)],
                         ids=["whole-batch", "temperature", "group-size", "slots-norm",
                              "no-mixing", "no-mixing-temp"])
def test_mixture_of_tokens_matches_reference(kw):
    s = kw.pop("slots_per_expert", 1)
    layer = moe.MixtureOfTokens(24, 16, 4, s, seed=14, **kw)
    check(layer, rand(np.random.default_rng(12), 6, 7, 24), ref_mot)


def test_mixture_of_tokens_many_positions():
    """More tokens than one task block, several blocks per group size."""
    layer = moe.MixtureOfTokens(24, 16, 3, 2, group_size=3, seed=22)
    check(layer, rand(np.random.default_rng(18), 6, 50, 24), ref_mot)


def test_mixture_of_tokens_groups_are_positions():
    """Mixing happens across sequences at one position, never across positions: changing
    one position of every sequence leaves the other positions' outputs unchanged."""
    layer = moe.MixtureOfTokens(16, 8, 3, seed=15)
    x = rand(np.random.default_rng(13), 4, 6, 16)
    out, D, _ = layer(x, return_weights=True)
    assert_close(D.sum(axis=0), np.ones((6, layer.n_slots)), what="D over the batch")
    y = x.copy()
    y[:, 2] += 1.0
    out2 = layer(y)
    keep = [p for p in range(6) if p != 2]
    assert np.array_equal(out2[:, keep], out[:, keep])
    assert not np.array_equal(out2[:, 2], out[:, 2])


def test_mixture_of_tokens_no_mixing_is_per_token():
    layer = moe.MixtureOfTokens(16, 8, 3, 2, mixing=False, seed=16)
    x = rand(np.random.default_rng(14), 3, 5, 16)
    out, D, C = check(layer, x, ref_mot)
    assert (D == 1.0).all()
    assert np.array_equal(layer(x[1:2, 3:4]), out[1:2, 3:4])  # batch-independent
    # the same as a SoftMoE with the same weights on one-token groups
    soft = moe.SoftMoE(16, 8, 3, 2, seed=16)
    soft.phi = layer.phi
    assert np.array_equal(out, soft(x.reshape(15, 1, 16)).reshape(3, 5, 16))


def test_mixture_of_tokens_2d_is_one_position():
    layer = moe.MixtureOfTokens(16, 8, 3, seed=17)
    x = rand(np.random.default_rng(15), 5, 16)
    out, D, C = check(layer, x, ref_mot)
    assert np.array_equal(out, layer(x[:, None])[:, 0])


def test_mixture_of_tokens_one_sequence():
    layer = moe.MixtureOfTokens(16, 8, 2, 2, seed=18)
    out, D, _ = check(layer, rand(np.random.default_rng(16), 1, 4, 16), ref_mot)
    assert (D == 1.0).all()                    # each group holds one token


# ---- bad input ----------------------------------------------------------------------------

def test_bad_input():
    layer = moe.SoftMoE(16, 8, 3, 2, seed=19)
    with pytest.raises(ValueError, match=r"x must have shape .*d_model=16, got \(2, 5, 8\)"):
        layer(np.zeros((2, 5, 8), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape .* got \(16,\)"):
        layer(np.zeros(16, np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        layer(np.zeros((2, 5, 16), np.int32))
    with pytest.raises(ValueError, match=r"phi must have shape \(d_model=16, n_slots=6\), "
                                         r"got \(16, 5\)"):
        layer.phi = np.zeros((16, 5), np.float32)
    with pytest.raises(ValueError, match=r"w_up must have shape \(n_experts=3, d_ff=8, "
                                         r"d_model=16\)"):
        layer.w_up = np.zeros((3, 16, 8), np.float32)
    with pytest.raises(ValueError, match="scale must be a finite"):
        layer.scale = float("inf")
    x = rand(np.random.default_rng(17), 2, 5, 16)
    x[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite logit at token 8.*NaN or Inf in x"):
        layer(x)
    assert np.isfinite(layer(np.nan_to_num(x))).all()   # and the process survives


def test_bad_options():
    with pytest.raises(ValueError, match="slots_per_expert must be in 1"):
        moe.SoftMoE(16, 8, 3, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        moe.SoftMoE(16, 8, 3, 1, activation="tanh")
    with pytest.raises(ValueError, match="temperature must be a finite positive"):
        moe.MixtureOfTokens(16, 8, 3, temperature=0.0)
    with pytest.raises(ValueError, match="group_size must be in"):
        moe.MixtureOfTokens(16, 8, 3, group_size=0)
    layer = moe.MixtureOfTokens(16, 8, 3, group_size=4, seed=20)
    with pytest.raises(ValueError, match=r"x.shape\[0\]=6\) must be a multiple of "
                                         r"group_size=4"):
        layer(np.zeros((6, 2, 16), np.float32))
    empty = moe.SoftMoE(16, 8, 3, 1, init=False)
    with pytest.raises(ValueError, match="not set"):
        empty(np.zeros((1, 2, 16), np.float32))


def test_core_checks():
    """The binding checks what Python would not: shapes and the packed experts."""
    layer = moe.SoftMoE(16, 8, 3, 2, seed=21).pack()
    x = np.zeros((1, 2, 16), np.float32)

    def call(**change):
        kw = dict(phi=layer.phi, experts=layer._packed, slots_per_expert=2, activation=0,
                  normalize=False, scale=1.0, temperature=1.0, across=False,
                  return_weights=False)
        return moe._C.soft_moe_forward(x, **{**kw, **change})

    with pytest.raises(ValueError, match=r"phi must have shape \(16, 6\)"):
        call(phi=np.zeros((16, 4), np.float32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        call(temperature=-1.0)
    with pytest.raises(ValueError, match="activation is not gated"):
        call(activation=5)
    with pytest.raises(TypeError, match="experts must be packed experts"):
        call(experts=None)
