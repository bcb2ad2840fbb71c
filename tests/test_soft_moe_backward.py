"""The C backward of SoftMoE and MixtureOfTokens (layer.forward_train / layer.backward over
moe_soft_moe_backward) against the float64 reference (soft_moe_backward /
mixture_of_tokens_backward, checked against finite differences in
test_reference_backward.py): every grouping, normalize and scale, temperature, slots per
expert, activations, bf16 / fp16 expert weights, edge sizes, bitwise determinism across
thread counts, a group's independence from the other groups, and the errors."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import moe
from moe import reference as ref
from test_properties import _settings  # fixed examples unless MOE_TEST_SEED
from test_backward import assert_grad, check_context_errors, grads_at_1_and_2_threads


def decoded(layer, w):
    return None if w is None else ref._decode_weight(layer, w)


def reference(layer, x, dy):
    kw = dict(slots_per_expert=layer.slots_per_expert, activation=layer.activation,
              normalize=layer.normalize, scale=layer.scale, alpha=layer.swiglu_alpha,
              limit=layer.swiglu_limit)
    w = (decoded(layer, layer.w_gate), decoded(layer, layer.w_up), decoded(layer, layer.w_down))
    if isinstance(layer, moe.MixtureOfTokens):
        return ref.mixture_of_tokens_backward(x, layer.phi, *w, dy,
                                              temperature=layer.temperature,
                                              mixing=layer.mixing,
                                              group_size=layer.group_size, **kw)
    return ref.soft_moe_backward(x, layer.phi, *w, dy, **kw)


def check(layer, x, rng, conditioned=False):
    """The layer's gradients against the reference; conditioned: allow, besides the
    relative tolerance, 10x the reference's own change when dy, and when x, moves by an ulp
    (one token of d_model 1: dx cancels to ~100 float32 ulps, which an ulp of x moves by
    about half), and 1e-9
    (O(1) inputs: a gradient that cancels to rounding noise, such as a softmax over tied
    scores, is zero to float32) (a gradient
    that cancels -- the softmaxes' backward on tiny shapes -- is no more accurate than
    that from float32 intermediates; see test_backward.assert_grad)."""
    y, ctx = layer.forward_train(x)
    np.testing.assert_array_equal(y, layer(x))  # the same forward, bit for bit
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g = layer.backward(ctx, dy)
    assert set(g) == {"x"} | set(layer.trainable_weights())
    r = reference(layer, x, dy)
    moved = []
    if conditioned:
        away = np.where(rng.standard_normal(dy.shape) < 0, -np.inf, np.inf)
        moved.append(reference(layer, x, np.nextafter(dy, away.astype(np.float32))))
        away = np.where(rng.standard_normal(x.shape) < 0, -np.inf, np.inf)
        moved.append(reference(layer, np.nextafter(x, away.astype(np.float32)), dy))
    for key in g:
        name = "dx" if key == "x" else key
        want = r[name]
        noise = 0.0 if not moved else \
            10 * sum(np.linalg.norm(np.asarray(m[name]) - want) for m in moved) + 1e-9
        if key == "scale":
            assert isinstance(g[key], float)
            assert abs(g[key] - want) <= 1e-5 * max(1.0, abs(want)) + noise, (g[key], want)
            continue
        assert_grad(g[key], want, key, noise)
    return g


CASES = {
    "soft_swiglu": (moe.SoftMoE, dict(n_experts=4, slots_per_expert=2), (3, 6)),
    "soft_normalize_gelu": (moe.SoftMoE, dict(n_experts=3, slots_per_expert=1,
                                              activation="gelu", normalize=True, scale=1.7),
                            (2, 7)),
    "soft_one_group_2d": (moe.SoftMoE, dict(n_experts=5, slots_per_expert=2), (9,)),
    "soft_one_token_groups": (moe.SoftMoE, dict(n_experts=3, slots_per_expert=2), (4, 1)),
    "soft_bf16_oai": (moe.SoftMoE, dict(n_experts=4, activation="swiglu-oai",
                                        dtype="bfloat16", swiglu_limit=1.0), (2, 5)),
    "soft_fp16_normalize": (moe.SoftMoE, dict(n_experts=2, slots_per_expert=3,
                                              dtype="float16", normalize=True), (3, 4)),
    "mot_all": (moe.MixtureOfTokens, dict(n_experts=4, temperature=0.7), (4, 3)),
    "mot_group2_2d": (moe.MixtureOfTokens, dict(n_experts=3, group_size=2,
                                                activation="relu", normalize=True),
                      (6,)),
    "mot_group2": (moe.MixtureOfTokens, dict(n_experts=3, slots_per_expert=2,
                                             group_size=2), (4, 5)),
    "mot_no_mixing": (moe.MixtureOfTokens, dict(n_experts=4, mixing=False,
                                                temperature=1.3), (3, 4)),
}


def build(case, rng, d=20, F=16):
    cls, opts, lead = CASES[case]
    opts = dict(opts)
    E = opts.pop("n_experts")
    layer = cls(d, F, E, seed=int(rng.integers(1 << 30)), **opts)
    return layer, lead


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
    rng = np.random.default_rng(sum(map(ord, case)))
    layer, lead = build(case, rng)
    x = rng.standard_normal(lead + (layer.d_model,)).astype(np.float32)
    check(layer, x, rng)


def test_no_tokens_and_non_contiguous():
    rng = np.random.default_rng(1)
    layer, _ = build("soft_swiglu", rng)
    y, ctx = layer.forward_train(np.zeros((0, 5, layer.d_model), np.float32))
    g = layer.backward(ctx, y)
    assert g["x"].shape == (0, 5, layer.d_model)
    assert not g["phi"].any() and not g["w_up"].any()
    wide = rng.standard_normal((2, 6, 2 * layer.d_model)).astype(np.float32)
    check(layer, wide[..., ::2], rng)


@pytest.mark.parametrize("case", ["soft_normalize_gelu", "mot_group2", "mot_no_mixing"])
def test_bitwise_threads_and_groups(case):
    """The same bits for 1 and 2 threads; a group's dx does not depend on the other groups
    (Soft MoE: its own rows; Mixture of Tokens: its block of group_size sequences)."""
    rng = np.random.default_rng(7)
    layer, _ = build(case, rng, d=48, F=40)
    B = 8 if isinstance(layer, moe.MixtureOfTokens) else 6
    x = rng.standard_normal((B, 17, layer.d_model)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = grads_at_1_and_2_threads(layer, x, dy)
    block = 2 if case == "mot_group2" else 1
    part = slice(B - block, B)  # the last group (block of sequences) alone
    y, ctx = layer.forward_train(x[part])
    np.testing.assert_array_equal(layer.backward(ctx, dy[part])["x"], g["x"][part])


@_settings(20)
@given(case=st.sampled_from(sorted(CASES)), d=st.integers(1, 12), F=st.integers(1, 10),
       data=st.data())
def test_property_shapes(case, d, F, data):
    # d_model 1 with normalize: x / |x| is the sign, the logits do not depend on phi's
    # size and d phi is a cancellation of O(1) terms down to the eps under the norm's
    # root -- below float32 resolution by construction
    assume(d > 1 or not CASES[case][1].get("normalize"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    layer, lead = build(case, rng, d=d, F=F)
    if isinstance(layer, moe.MixtureOfTokens) and layer.group_size:
        lead = (layer.group_size * data.draw(st.integers(1, 3)),) + lead[1:]
    else:
        lead = tuple(data.draw(st.integers(1, 6)) for _ in lead)
    x = rng.standard_normal(lead + (d,)).astype(np.float32)
    check(layer, x, rng, conditioned=True)


def test_errors():
    rng = np.random.default_rng(3)
    layer, lead = build("soft_swiglu", rng)
    x = rng.standard_normal(lead + (layer.d_model,)).astype(np.float32)
    y, ctx = layer.forward_train(x)
    check_context_errors(layer, ctx, y, y[..., :-1], build("soft_swiglu", rng)[0], "phi")
    y, ctx = layer.forward_train(x)
    layer.w_up = layer.w_up * 2
    with pytest.raises(RuntimeError, match="changed since forward_train"):
        layer.backward(ctx, y)
