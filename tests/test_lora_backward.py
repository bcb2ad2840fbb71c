"""The C backward of the mixture-of-LoRA layers (layer.forward_train / layer.backward over
moe_lora_backward) against the float64 reference lora_backward (itself checked against
finite differences in test_reference_backward.py, on the same case table): every layer and
option, frozen bf16 / fp16 bases, empty slots, one token, no tokens, bitwise determinism
across thread counts and batches, and the errors."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import moe
from moe import reference as ref
from test_properties import _settings  # fixed examples unless MOE_TEST_SEED
from test_backward import assert_grad, check_context_errors, grads_at_1_and_2_threads
from test_reference_backward import LORA_CASES, LORA_KEYS

RANKED = ("FlyLoRA", "SMoRA")
ROUTED = ("TopKLoRA", "SoftLoRA", "HydraLoRA", "SMoRA")


def build(case, rng, d_in=24, d_out=20, E=5, rank=4):
    """The layer of LORA_CASES[case] with random trained weights (lora_b non-zero)."""
    cls_name, opts, call = LORA_CASES[case]
    cls = getattr(moe, cls_name)
    seed = int(rng.integers(1 << 30))
    layer = cls(d_in, d_out, 2 * rank, seed=seed, **opts) if cls_name in RANKED else \
        cls(d_in, d_out, E, rank, seed=seed, **opts)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    layer.lora_b = f32(*layer.lora_b.shape)
    if layer.use_bias:
        layer.base_bias = f32(d_out)
    if cls_name in RANKED:
        layer.rank_bias = f32(layer.rank) * np.float32(0.2)
    if cls_name == "MultiLoRA":
        layer.scalings = rng.uniform(0.5, 2.0, E).astype(np.float32)
    return layer, dict(call)


def call_args(layer, call, rng, T):
    """The per-call inputs of the case for T tokens (seq_lens, scalings, adapter_ids)."""
    name = type(layer).__name__
    kw = {}
    if "seq_lens" in call:
        cut = np.sort(rng.choice(np.arange(1, T), size=min(2, T - 1), replace=False)) \
            if T > 1 else np.array([], int)
        kw["seq_lens"] = np.diff(np.concatenate([[0], cut, [T]])).astype(np.int64)
    if name == "GatedLoRA":
        kw["scalings"] = rng.standard_normal((T, layer.n_experts)).astype(np.float32)
    if name == "MultiLoRA":
        kw["adapter_ids"] = rng.integers(-1, layer.n_experts, T)
    return kw


def run(layer, x, dy, aux, z, kw):
    pos = [kw[k] for k in ("scalings", "adapter_ids") if k in kw]
    named = {k: v for k, v in kw.items() if k == "seq_lens"}
    y, ctx = layer.forward_train(x, *pos, **named)
    np.testing.assert_array_equal(y, layer(x, *pos, **named))  # the same forward's bits
    return y, layer.backward(ctx, dy, aux_coef=aux, z_coef=z)


def check(layer, x, rng, aux, z, kw, conditioned=False):
    """The layer's gradients against the reference; conditioned: allow, besides the
    relative tolerance, 10x the reference's own change when dy moves by an ulp, and 1e-9
    (O(1) inputs: a gradient that cancels to rounding noise, such as a softmax over tied
    scores, is zero to float32) (see
    test_backward.assert_grad)."""
    T = x.shape[0]
    dy = rng.standard_normal((T, layer.d_out)).astype(np.float32)
    _, g = run(layer, x, dy, aux, z, kw)
    name = type(layer).__name__
    assert set(g) == LORA_KEYS[name], sorted(g)
    assert set(g) - {"x", "scalings"} == set(layer.trainable_weights())
    r = ref.lora_backward(layer, x, dy, aux_coef=aux, z_coef=z, **kw)
    r2 = None
    if conditioned:
        away = np.where(rng.standard_normal(dy.shape) < 0, -np.inf, np.inf)
        r2 = ref.lora_backward(layer, x, np.nextafter(dy, away.astype(np.float32)),
                               aux_coef=aux, z_coef=z, **kw)
    for key in g:
        want = r[key]
        noise = 0.0 if r2 is None else 10 * np.linalg.norm(r2[key] - want) + 1e-9
        assert_grad(g[key], want, f"{name} {key}", noise)
    return g


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_backward_matches_reference(case):
    rng = np.random.default_rng(sum(map(ord, case)))
    layer, call = build(case, rng)
    aux, z = call.pop("aux", 0.0), call.pop("zc", 0.0)
    T = 37
    x = rng.standard_normal((T, layer.d_in)).astype(np.float32)
    check(layer, x, rng, aux, z, call_args(layer, call, rng, T))


@pytest.mark.parametrize("case", ["topk_softmax_losses", "hydra_top2", "gated_top2",
                                  "fly", "smora_repeat", "multi"])
def test_edge_sizes(case):
    """One token, no tokens, x of shape (batch, seq, d_in), a non-contiguous x."""
    rng = np.random.default_rng(5)
    layer, call = build(case, rng)
    aux, z = call.pop("aux", 0.0), call.pop("zc", 0.0)
    for T in (1, 0):
        x = rng.standard_normal((T, layer.d_in)).astype(np.float32)
        g = check(layer, x, rng, aux, z, call_args(layer, call, rng, T))
        if T == 0:
            assert all(not v.any() for k, v in g.items() if k not in ("x", "scalings"))
    wide = rng.standard_normal((9, 2 * layer.d_in)).astype(np.float32)
    x = wide[:, ::2]  # a strided view
    assert not x.flags.c_contiguous
    check(layer, x, rng, aux, z, call_args(layer, call, rng, 9))
    if type(layer).__name__ in ("TopKLoRA", "FlyLoRA"):
        x3 = rng.standard_normal((2, 3, layer.d_in)).astype(np.float32)
        y, ctx = layer.forward_train(x3)
        g = layer.backward(ctx, np.ones(y.shape, np.float32))
        assert g["x"].shape == x3.shape


def test_empty_adapters_and_slots():
    """MultiLoRA with adapters no token uses (zero gradients) and tokens on the base alone."""
    rng = np.random.default_rng(8)
    layer, _ = build("multi", rng)
    x = rng.standard_normal((6, layer.d_in)).astype(np.float32)
    ids = np.array([-1, 1, 1, -1, 3, 1])
    dy = rng.standard_normal((6, layer.d_out)).astype(np.float32)
    y, ctx = layer.forward_train(x, ids)
    g = layer.backward(ctx, dy)
    for e in (0, 2, 4):
        assert not g["lora_a"][e].any() and not g["lora_b"][e].any()
    base_only = dy @ layer.base_weight
    np.testing.assert_allclose(g["x"][[0, 3]], base_only[[0, 3]], rtol=1e-5, atol=1e-5)
    check(layer, x, rng, 0.0, 0.0, {"adapter_ids": ids})


@pytest.mark.parametrize("case", ["topk_softmax_losses", "hydra_dense", "gated_top2_softmax",
                                  "fly_signed", "smora_tile", "multi", "hydra_top1",
                                  "topk_top1"])
def test_bitwise_across_threads_and_batch(case):
    """The same bits for 1 and 2 threads; a token's dx (and the rows of the weight
    gradients it alone feeds) do not depend on the rest of the batch (no aux loss)."""
    rng = np.random.default_rng(11)
    layer, call = build(case, rng, d_in=48, d_out=40)
    T = 130
    x = rng.standard_normal((T, layer.d_in)).astype(np.float32)
    kw = call_args(layer, call, rng, T)
    dy = rng.standard_normal((T, layer.d_out)).astype(np.float32)
    pos = [kw[k] for k in ("scalings", "adapter_ids") if k in kw]
    grads_at_1_and_2_threads(layer, x, dy, *pos, aux_coef=0.2, z_coef=0.1)
    full = run(layer, x, dy, 0.0, 0.0, kw)[1]
    for t in (0, 64, T - 1):
        one = {k: v[t:t + 1] for k, v in kw.items()}
        g1 = run(layer, x[t:t + 1], dy[t:t + 1], 0.0, 0.0, one)[1]
        np.testing.assert_array_equal(g1["x"][0], full["x"][t])
        if "scalings" in g1:
            np.testing.assert_array_equal(g1["scalings"][0], full["scalings"][t])


@_settings(25)
@given(case=st.sampled_from(sorted(LORA_CASES)), T=st.integers(0, 30),
       d_in=st.integers(1, 19), d_out=st.integers(1, 19), data=st.data())
def test_property_shapes(case, T, d_in, d_out, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    cls_name = LORA_CASES[case][0]
    E = data.draw(st.integers(3, 6))
    rank = data.draw(st.integers(2, 5))
    layer, call = build(case, rng, d_in=d_in, d_out=d_out, E=E, rank=rank)
    aux, z = call.pop("aux", 0.0), call.pop("zc", 0.0)
    if cls_name in ROUTED and data.draw(st.booleans()):  # ties: equal logits
        layer.router_weight = np.zeros_like(layer.router_weight)
    assume(T > 0 or "seq_lens" not in call)  # per-sequence gating needs a sequence
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    check(layer, x, rng, aux, z, call_args(layer, call, rng, T), conditioned=True)


def test_errors():
    rng = np.random.default_rng(2)
    layer, _ = build("topk_softmax_losses", rng)
    x = rng.standard_normal((6, layer.d_in)).astype(np.float32)
    y, ctx = layer.forward_train(x)
    check_context_errors(layer, ctx, y, np.ones((6, layer.d_in), np.float32),
                         build("topk_softmax_losses", rng)[0], "lora_b")
    y, ctx = layer.forward_train(x)
    layer.lora_a = layer.lora_a * 2  # the adapters the forward ran with are gone
    with pytest.raises(RuntimeError, match="changed since forward_train"):
        layer.backward(ctx, y)
    y, ctx = layer.forward_train(x)
    layer.router_weight = layer.router_weight * 2
    with pytest.raises(RuntimeError, match="router_weight was reassigned"):
        layer.backward(ctx, y)
    gated, _ = build("gated_top2", rng)
    with pytest.raises(ValueError, match="scalings"):
        gated.forward_train(x, np.ones((6, 2), np.float32))


def test_pickle_and_deepcopy_after_training():
    """A layer that has run (its packed copies and the backward's transposed base are C
    handles) pickles and deep-copies, and the copy computes the same bits."""
    import copy
    import pickle
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    for layer in (build("hydra_top2", rng)[0], moe.SparseMoE(24, 16, 4, 2)):
        y, ctx = layer.forward_train(x)
        g = layer.backward(ctx, y)
        for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            y2, ctx2 = twin.forward_train(x)
            np.testing.assert_array_equal(y2, y)
            g2 = twin.backward(ctx2, y)
            for key in g:
                np.testing.assert_array_equal(g2[key], g[key], err_msg=key)


@pytest.mark.parametrize("case", ["topk_softmax_losses", "hydra_top1", "multi", "fly",
                                  "gated_top2"])
def test_recomputed_shrink(case):
    """The core's backward without the forward's saved z (a C caller that kept only the
    inputs) recomputes A x and gives the same gradients to float32 rounding."""
    rng = np.random.default_rng(13)
    layer, call = build(case, rng)
    T = 23
    x = rng.standard_normal((T, layer.d_in)).astype(np.float32)
    kw = call_args(layer, call, rng, T)
    pos = [kw[k] for k in ("scalings", "adapter_ids") if k in kw]
    y, ctx = layer.forward_train(x, *pos)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    keep = ctx.saved
    with_z = moe._C.lora_backward(keep["args"], keep["kw"], layer._base_transposed(),
                                  layer.lora_a, layer.lora_b, dy, z=keep["z"])
    without = moe._C.lora_backward(keep["args"], keep["kw"], layer._base_transposed(),
                                   layer.lora_a, layer.lora_b, dy)
    for a, b in zip(with_z, without):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
