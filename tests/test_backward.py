"""The C backward (moe.SparseMoE.backward and the staged ops' backward) against the float64
reference backward of moe/reference.py (itself checked against finite differences in
test_reference_backward.py): every option of the top-k layer, the edge cases, bitwise
determinism across thread counts and batches, and the errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import moe
from moe import reference as ref
from test_properties import _settings  # fixed examples unless MOE_TEST_SEED

# gradients are compared relative to their norm (the acceptance: rtol 1e-5)
GRAD_RTOL = 1e-5


def assert_grad(actual, expected, what, noise=0.0):
    """|actual - expected| <= GRAD_RTOL |expected| (2-norms) + noise, where noise (optional)
    is how far the reference itself moves when its float32 inputs move by an ulp: a gradient
    that is a small difference of large terms (cancellation, on tiny random shapes) cannot be
    more accurate than that from float32 inputs."""
    expected = np.asarray(expected, dtype=np.float64)
    assert actual is not None, what
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == np.float32, (what, actual.dtype)
    scale = np.linalg.norm(expected)
    err = np.linalg.norm(actual.astype(np.float64) - expected)
    assert err <= GRAD_RTOL * scale + noise + 1e-30, \
        f"{what}: |err| {err:.3g} vs |ref| {scale:.3g} (+ input noise {noise:.3g})"


def grads_at_1_and_2_threads(layer, x, dy, *args, **kw):
    """layer.backward of a fresh forward_train(x, *args) at 1 and at 2 threads (the pool
    size restored after), checked bitwise equal (SparseRows by indices and values); returns
    the 1-thread gradients.  kw goes to backward."""
    keep = moe.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            moe.set_num_threads(n)
            y, ctx = layer.forward_train(x, *args)
            res.append(layer.backward(ctx, dy, **kw))
    finally:
        moe.set_num_threads(keep)
    for name in res[0]:
        a, b = res[0][name], res[1][name]
        if isinstance(a, moe.SparseRows):
            np.testing.assert_array_equal(a.indices, b.indices, err_msg=name)
            a, b = a.values, b.values
        np.testing.assert_array_equal(a, b, err_msg=name)
    return res[0]


def check_context_errors(layer, ctx, y, bad_dy, other=None, key="x"):
    """The errors every layer.backward shares: a dy of the wrong shape, no TrainContext,
    (other given) another layer's context, and a context used twice (retain=True first:
    the same gradient, named key, twice)."""
    with pytest.raises(ValueError, match="dy must have the output's shape"):
        layer.backward(ctx, bad_dy)
    with pytest.raises(TypeError, match="TrainContext"):
        layer.backward(None, y)
    if other is not None:
        with pytest.raises(ValueError, match="another layer"):
            other.backward(ctx, y)
    g1 = layer.backward(ctx, y, retain=True)
    g2 = layer.backward(ctx, y)
    np.testing.assert_array_equal(g1[key], g2[key])
    with pytest.raises(RuntimeError, match="already used"):
        layer.backward(ctx, y)


def make_layer(rng, d=24, F=40, E=8, k=2, **cfg):
    layer = moe.SparseMoE(d, F, E, k, seed=int(rng.integers(1 << 30)), **cfg)
    if layer.use_expert_bias:
        layer.expert_bias = (rng.standard_normal(layer.n_router) * 0.1).astype(np.float32)
    if layer.use_router_bias:
        layer.router_bias = (rng.standard_normal(layer.n_router) * 0.1).astype(np.float32)
    if layer.use_expert_biases:
        for name in ("b_gate", "b_up", "b_down"):
            shape = getattr(layer, name).shape
            setattr(layer, name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    if layer.n_null:  # larger null rows: the null experts get chosen
        w = layer.router_weight.copy()
        w[layer.n_experts:] *= 3
        layer.router_weight = w
    return layer


def reference_grads(layer, x, dy, aux, z):
    return ref.layer_backward(layer, x, dy, aux, z)


def check_layer(layer, x, rng, aux=0.3, z=0.2, conditioned=False):
    """The layer's gradients against the reference; conditioned: allow, besides the
    relative tolerance, 10x the reference's own change when dy moves by an ulp (see
    assert_grad)."""
    y, ctx = layer.forward_train(x)
    np.testing.assert_array_equal(y, layer(x))  # the same forward, bit for bit
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g = layer.backward(ctx, dy, aux_coef=aux, z_coef=z)
    r = reference_grads(layer, x, dy, aux, z)
    r2 = None
    if conditioned:  # dy one ulp off, elementwise: the reference's sensitivity
        away = np.where(rng.standard_normal(dy.shape) < 0, -np.inf, np.inf)
        r2 = reference_grads(layer, x, np.nextafter(dy, away.astype(np.float32)), aux, z)
    assert set(g) == {"x"} | set(layer.trainable_weights())
    for name, value in g.items():
        key = "dx" if name == "x" else name
        noise = 0.0 if r2 is None else 10 * np.linalg.norm(np.asarray(r2[key]) - r[key])
        assert_grad(value, r[key], name, noise)
    return g


CONFIGS = {
    "mixtral": dict(),
    "qwen3": dict(E=16, k=4),
    "deepseek-v3": dict(scoring="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5,
                        expert_bias=True, n_shared_experts=1, k=3),
    "qwen2-shared-gate": dict(n_shared_experts=2, shared_d_ff=12, shared_expert_gate=True),
    "softmax-after-topk": dict(scoring="softmax-after-topk"),
    "no-renormalize-scaled": dict(renormalize=False, routed_scaling=1.7),
    "capacity": dict(capacity_factor=0.6, k=3),
    "capacity-sigmoid-groups": dict(capacity_factor=0.8, scoring="sigmoid", n_groups=2,
                                    topk_groups=1, expert_bias=True),
    "biases": dict(router_bias=True, expert_biases=True),
    "gpt-oss": dict(activation="swiglu-oai", expert_biases=True, router_bias=True,
                    scoring="softmax-after-topk", swiglu_limit=1.5),
    "bf16-weights": dict(dtype="bfloat16", n_shared_experts=1),
    "fp16-weights": dict(dtype="float16", expert_biases=True),
    "heterogeneous": dict(F=[10, 0, 33, 40, 5, 7, 40, 1]),
    "odd-sizes": dict(d=7, F=5, E=5, k=2),
    "null-experts": dict(null_experts=("zero", "copy", "constant", "constant"), k=3,
                         capacity_factor=1.2, n_shared_experts=1),
    "skipping": dict(k=3, skip_threshold=0.25),
    "skipping-renormalized": dict(k=3, skip_threshold=0.25, skip_renormalize=True,
                                  null_experts=("copy",), capacity_factor=1.3),
    "expert-choice": dict(router="expert_choice", capacity_factor=1.5, routed_scaling=1.5),
    "expert-choice-sigmoid": dict(router="expert_choice", scoring="sigmoid",
                                  capacity_factor=2.0, n_shared_experts=1,
                                  null_experts=("copy", "constant")),
    "top-p": dict(router="top_p", router_p=0.5, k=4, k_min=2),
    "threshold-skipping": dict(router="threshold", router_threshold=0.1, k=4,
                               renormalize=False, routed_scaling=2.0, skip_threshold=0.3,
                               skip_renormalize=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_backward_matches_reference(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    cfg = dict(CONFIGS[name])
    T = cfg.pop("T", 37)
    layer = make_layer(rng, **cfg)
    x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
    check_layer(layer, x, rng)
    if layer.skip_threshold:  # some slots skipped, some kept
        r = layer(x, return_routing=True)[1]
        assert r.n_dropped > 0 and (r.expert_ids >= 0).any(), r
    if layer.n_null:  # each kind of null expert was chosen, so each was checked
        ids = layer(x, return_routing=True)[1].expert_ids
        E = layer.n_experts
        assert {layer.null_experts[e - E] for e in ids.ravel() if e >= E} == \
            set(layer.null_experts), ids


@pytest.mark.parametrize("activation", moe.ACTIVATIONS)
def test_every_activation(activation):
    rng = np.random.default_rng(len(activation))
    layer = make_layer(rng, activation=activation, swiglu_limit=1.0)
    # a spread of pre-activations, so relu and the clamps see both sides
    x = (rng.standard_normal((29, layer.d_model)) * 2).astype(np.float32)
    check_layer(layer, x, rng)


def test_edge_cases():
    rng = np.random.default_rng(5)
    # one token; more experts than assignments (most experts empty)
    layer = make_layer(rng, E=32, k=2)
    check_layer(layer, rng.standard_normal((1, layer.d_model)).astype(np.float32), rng)
    # ties: a zero router gives equal logits everywhere (lower expert indices win)
    layer.router_weight = np.zeros_like(layer.router_weight)
    g = check_layer(layer, rng.standard_normal((9, layer.d_model)).astype(np.float32), rng)
    assert (g["w_up"][2:] == 0).all()  # only experts 0 and 1 were chosen
    # no tokens: zero gradients of the weights' shapes
    y, ctx = layer.forward_train(np.zeros((0, layer.d_model), np.float32))
    g = layer.backward(ctx, y)
    assert g["x"].shape == (0, layer.d_model) and not g["w_down"].any()
    # leading dimensions and a non-contiguous float64 input
    base = rng.standard_normal((3, 5, 2 * layer.d_model))
    x = base[:, :, ::2]
    y, ctx = layer.forward_train(x)
    g = layer.backward(ctx, np.ones_like(y))
    assert g["x"].shape == (3, 5, layer.d_model)


def test_staged_ops_backward():
    """route -> dispatch -> expert_ffn -> combine, each backward against the reference."""
    rng = np.random.default_rng(11)
    T, d, F, E, k = 23, 16, 12, 6, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    logits = rng.standard_normal((T, E))
    opts = dict(scoring="sigmoid", capacity_factor=0.9, routed_scaling=1.5)
    r = moe.route(logits, k, **opts)
    dw = rng.standard_normal((T, k)).astype(np.float32)
    assert_grad(moe.route_backward(logits, r.expert_ids, dw, k, aux_coef=0.5, z_coef=0.1,
                                   **opts).astype(np.float32),
                ref.route_backward(logits, dw, k, aux_coef=0.5, z_coef=0.1, **opts),
                "d_logits")
    disp = moe.dispatch(x, r.expert_ids, E)
    wg, wu = rng.standard_normal((2, E, F, d)).astype(np.float32) / 4
    wd = (rng.standard_normal((E, d, F)) / 4).astype(np.float32)
    bg, bu = rng.standard_normal((2, E, F)).astype(np.float32)
    bd = rng.standard_normal((E, d)).astype(np.float32)
    dys = rng.standard_normal(disp.x_sorted.shape).astype(np.float32)
    g = moe.expert_ffn_backward(disp.x_sorted, disp.offsets, wg, wu, wd, dys, b_gate=bg,
                                b_up=bu, b_down=bd)
    rg = ref.expert_ffn_backward(disp.x_sorted, disp.offsets, wg, wu, wd, dys, b_gate=bg,
                                 b_up=bu, b_down=bd)
    for name, want in (("x_sorted", "dx_sorted"), ("w_gate", "dw_gate"), ("w_up", "dw_up"),
                       ("w_down", "dw_down"), ("b_gate", "db_gate"), ("b_up", "db_up"),
                       ("b_down", "db_down")):
        assert_grad(g[name], rg[want], name)
    dx = moe.dispatch_backward(g["x_sorted"], disp.position)
    assert_grad(dx, ref.dispatch_backward(g["x_sorted"], disp.token_index, T), "dispatch")
    ys = moe.expert_ffn(disp.x_sorted, disp.offsets, wg, wu, wd)
    dout = rng.standard_normal((T, d)).astype(np.float32)
    d_ys, d_w = moe.combine_backward(ys, disp.position, r.weights, dout)
    rc = ref.combine_backward(ys, disp.position, r.weights, dout)
    assert_grad(d_ys, rc["dy_sorted"], "combine dy")
    assert_grad(d_w, rc["d_weights"], "combine d_weights")
    # the dense FFN, ungated, bf16 storage
    w1 = moe.float32_to_bfloat16(rng.standard_normal((F, d)).astype(np.float32) / 4)
    w2 = moe.float32_to_bfloat16(rng.standard_normal((d, F)).astype(np.float32) / 4)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    g = moe.ffn_backward(x, None, w1, w2, dy, "gelu", dtype="bfloat16")
    r = ref.ffn_backward(x, None, moe.bfloat16_to_float32(w1), moe.bfloat16_to_float32(w2),
                         dy, "gelu")
    assert g["w_gate"] is None
    for name in ("x", "w_up", "w_down"):
        assert_grad(g[name], r["dx" if name == "x" else "d" + name], name)


@pytest.mark.parametrize("cfg", [
    dict(n_shared_experts=1, shared_expert_gate=True, expert_biases=True),
    dict(router="expert_choice", null_experts=("copy", "constant"), skip_threshold=0.05,
         skip_renormalize=True),
], ids=["top_k", "expert_choice"])
def test_bitwise_across_threads_and_batch(cfg):
    """Gradients are the same bits for 1 and 2 threads; a token's dx does not depend on
    the rest of the batch (top-k: dropless, no batch losses)."""
    rng = np.random.default_rng(3)
    layer = make_layer(rng, d=40, F=72, E=6, k=2, **cfg)
    x = rng.standard_normal((150, layer.d_model)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    grads_at_1_and_2_threads(layer, x, dy, aux_coef=0.1, z_coef=0.01)
    if layer.router != "top_k":
        return  # expert choice routes each token against the batch
    y, ctx = layer.forward_train(x)
    full = layer.backward(ctx, dy)["x"]
    for t in (0, 77, 149):
        y1, c1 = layer.forward_train(x[t:t + 1])
        np.testing.assert_array_equal(layer.backward(c1, dy[t:t + 1])["x"][0], full[t])


@_settings(25)
@given(T=st.integers(0, 40), E=st.integers(1, 9), d=st.integers(1, 20),
       F=st.integers(1, 20), data=st.data())
def test_property_shapes(T, E, d, F, data):
    k = data.draw(st.integers(1, E))
    cf = data.draw(st.sampled_from([None, 0.5, 1.0]))
    scoring = data.draw(st.sampled_from(list(moe.SCORINGS)))
    ties = data.draw(st.booleans())
    nulls = data.draw(st.sampled_from([(), ("zero",), ("copy", "constant")]))
    skip = data.draw(st.sampled_from([0.0, 0.2]))
    router = data.draw(st.sampled_from(["top_k", "top_k", "expert_choice", "top_p",
                                        "threshold"]))
    if router != "top_k":
        cf = None if router != "expert_choice" else data.draw(st.sampled_from([None, 2.0]))
        scoring = scoring if scoring != "softmax-after-topk" else "softmax"
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    layer = make_layer(rng, d=d, F=F, E=E, k=k, scoring=scoring, capacity_factor=cf,
                       null_experts=nulls, skip_threshold=skip,
                       skip_renormalize=data.draw(st.booleans()), router=router,
                       router_p=0.6, router_threshold=0.2)
    if ties:  # whole rows of equal logits
        layer.router_weight = np.zeros_like(layer.router_weight)
    x = rng.standard_normal((T, d)).astype(np.float32)
    check_layer(layer, x, rng, aux=0.1, z=0.05, conditioned=True)


def test_errors():
    rng = np.random.default_rng(1)
    layer = make_layer(rng)
    x = rng.standard_normal((6, layer.d_model)).astype(np.float32)
    y, ctx = layer.forward_train(x)
    check_context_errors(layer, ctx, y, y[:, :-1], make_layer(rng), "w_up")
    y, ctx = layer.forward_train(x)
    layer.w_up = layer.w_up * 2  # the weights the forward ran with are gone
    with pytest.raises(RuntimeError, match="changed since forward_train"):
        layer.backward(ctx, y)
    with pytest.raises(NotImplementedError, match="compute_dtype='int8'"):
        moe.SparseMoE(layer.d_model, 16, 4, 2, dtype="int8", compute_dtype="int8",
                      seed=0).forward_train(x)
    lora = make_layer(rng, lora_rank=2)
    y, ctx = lora.forward_train(x)
    lora.lora_b_up = lora.lora_b_up + 1  # the adapters the forward ran with are gone
    with pytest.raises(RuntimeError, match="changed since forward_train"):
        lora.backward(ctx, y)
    with pytest.raises(ValueError, match="d_weights"):
        moe.route_backward(np.zeros((3, 4)), np.zeros((3, 2), np.int32),
                           np.zeros((3, 1), np.float32), 2)


def test_multi_head_moe_backward():
    """MultiHeadMoE: the projections' and the inner layer's gradients against the
    reference (the inner layer with a shared expert and null experts)."""
    rng = np.random.default_rng(21)
    mh = moe.MultiHeadMoE(32, 4, 24, 6, 2, seed=3, n_shared_experts=1,
                          null_experts=("copy",))
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    y, ctx = mh.forward_train(x)
    np.testing.assert_array_equal(y, mh(x))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g = mh.backward(ctx, dy, aux_coef=0.2, z_coef=0.1)
    r = ref.multi_head_moe_backward(mh, x, dy, 0.2, 0.1)
    assert set(g) == {"x"} | set(mh.trainable_weights())
    assert g["x"].shape == x.shape
    assert_grad(g["x"].reshape(-1, 32), r["dx"], "x")
    assert_grad(g["w_in"], r["w_in"], "w_in")
    assert_grad(g["w_merge"], r["w_merge"], "w_merge")
    for name in mh.moe.trainable_weights():
        assert_grad(g[f"moe.{name}"], r["moe"][name], f"moe.{name}")
    with pytest.raises(RuntimeError, match="already used"):
        mh.backward(ctx, dy)


def test_multi_head_moe_backward_large_projections(threads):
    """Projections big enough that their GEMMs pack A and B once for several row and
    column blocks (odd sizes: a partial row panel and a partial column panel): the
    reference's gradients, and the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(22)
    mh = moe.MultiHeadMoE(300, 4, 40, 4, 2, seed=5)
    x = rng.standard_normal((131, 300)).astype(np.float32)
    dy = rng.standard_normal((131, 300)).astype(np.float32)
    grads = []
    for n in (1, 2):
        threads(n)
        y, ctx = mh.forward_train(x)
        grads.append(mh.backward(ctx, dy))
    r = ref.multi_head_moe_backward(mh, x, dy, 0.0, 0.0)
    assert_grad(grads[1]["x"], r["dx"], "x")
    assert_grad(grads[1]["w_in"], r["w_in"], "w_in")
    assert_grad(grads[1]["w_merge"], r["w_merge"], "w_merge")
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name].view(np.uint32),
                                      grads[1][name].view(np.uint32), err_msg=name)


@pytest.mark.parametrize("cfg", [
    dict(lora_rank=3, lora_alpha=6.0),
    dict(lora_rank=2, lora_targets=("w_down",), n_shared_experts=1, shared_expert_gate=True),
    dict(lora_rank=4, lora_targets=("w_gate", "w_up"), dtype="bfloat16",
         null_experts=("copy",), expert_biases=True),
    dict(lora_rank=2, activation="gelu", capacity_factor=0.8, dtype="float16"),
], ids=["all-targets", "down-shared", "gate-up-bf16-null", "gelu-capacity-fp16"])
def test_expert_lora(cfg):
    """LoRA on the experts (SparseMoE(lora_rank=...)): the adapters' and the router's
    gradients and dx against the reference; the experts (routed and shared, any storage
    dtype) are frozen: no gradient is returned for them; bitwise across threads."""
    rng = np.random.default_rng(len(str(cfg)))
    layer = make_layer(rng, **cfg)
    for t in layer.lora_targets:  # B starts at zero (PEFT): give every adapter a value
        name = f"lora_b_{t[2:]}"
        setattr(layer, name, rng.standard_normal(getattr(layer, name).shape)
                .astype(np.float32))
    assert not {"w_gate", "w_up", "w_down", "b_up", "shared_w_up"} & \
        set(layer.trainable_weights())
    x = rng.standard_normal((40, layer.d_model)).astype(np.float32)
    g = check_layer(layer, x, rng)
    assert {f"lora_a_{t[2:]}" for t in layer.lora_targets} <= set(g)
    grads_at_1_and_2_threads(layer, x, rng.standard_normal(x.shape).astype(np.float32),
                             aux_coef=0.1)


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(scoring="sigmoid", n_groups=2, topk_groups=1, routed_scaling=2.0, expert_bias=True),
    dict(scoring="softmax-after-topk", capacity_factor=0.7),
    dict(renormalize=False, null_experts=("copy", "constant"), skip_threshold=0.2,
         skip_renormalize=True, n_shared_experts=1),
], ids=["softmax", "sigmoid-groups", "softmax-after-topk-capacity", "nulls-skipping"])
def test_straight_through_router_grad(cfg):
    """router_grad="straight-through" against the reference; only the router's gradient
    changes, and it reaches the unselected experts' logits (default: exactly 0 there with
    softmax and renormalize, no losses)."""
    rng = np.random.default_rng(len(str(cfg)) + 3)
    st_layer = make_layer(rng, E=6, router_grad="straight-through", **cfg)
    check_layer(st_layer, rng.standard_normal((30, st_layer.d_model)).astype(np.float32), rng)
    base = make_layer(rng, E=6, **cfg)
    for name in base._weight_names():  # the same weights, the default estimator
        if getattr(base, name) is not None:
            setattr(base, name, getattr(st_layer, name))
    x = rng.standard_normal((30, base.d_model)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g_st = st_layer.backward(st_layer.forward_train(x)[1], dy, aux_coef=0.1)
    g_df = base.backward(base.forward_train(x)[1], dy, aux_coef=0.1)
    for name in g_st:
        if name in ("x", "router_weight"):
            assert not np.array_equal(g_st[name], g_df[name]), name
        else:
            np.testing.assert_array_equal(g_st[name], g_df[name], err_msg=name)


def test_straight_through_staged_op():
    """moe.route_backward(router_grad="straight-through") = the default + (dp/dlogits)^T g
    with g the slots' w * d_weights; the unselected logits get -p_u <p, g> (default: 0)."""
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((7, 5))
    r = moe.route(logits, 2)
    dw = rng.standard_normal((7, 2)).astype(np.float32)
    d0 = moe.route_backward(logits, r.expert_ids, dw, 2)
    d1 = moe.route_backward(logits, r.expert_ids, dw, 2, router_grad="straight-through")
    p = ref.softmax(logits)
    g = np.zeros((7, 5))
    np.put_along_axis(g, r.expert_ids.astype(np.int64),
                      r.weights.astype(np.float64) * dw, axis=1)
    want = p * (g - (g * p).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(d1 - d0, want, rtol=1e-6, atol=1e-7)
    unselected = np.ones((7, 5), bool)
    np.put_along_axis(unselected, r.expert_ids.astype(np.int64), False, axis=1)
    # default: 0 for the unselected up to rounding (renormalised weights do not depend on
    # them); straight-through: -p_u <p, g>, nowhere near 0
    assert np.abs(d0[unselected]).max() < 1e-12
    assert np.abs(d1[unselected]).min() > 1e-6
    with pytest.raises(ValueError, match="router_grad"):
        moe.route_backward(logits, r.expert_ids, dw, 2, router_grad="sparsemixer")
    with pytest.raises(ValueError, match="top-k router"):
        moe.SparseMoE(8, 8, 4, 2, router="expert_choice", router_grad="straight-through")


def _fused_views(layer, mode):
    """layer's routed weights rearranged as transformers stores them, and views of that
    storage in the layer's layout: "halves" the gate and up halves of one (E, 2F, d) array;
    "interleaved" gpt-oss's (E, d, 2F) with gate / up on even / odd columns and a transposed
    (E, F, d) down."""
    gate, up, down = layer.w_gate, layer.w_up, layer.w_down
    F = up.shape[1]
    if mode == "halves":
        store = np.concatenate([gate if gate is not None else up, up], axis=1)
        views = {"w_up": store[:, F:], "w_down": down}
        if gate is not None:
            views["w_gate"] = store[:, :F]
        return store, views
    store = np.empty((up.shape[0], up.shape[2], 2 * F), up.dtype)
    store[:, :, 1::2] = up.transpose(0, 2, 1)
    if gate is not None:
        store[:, :, 0::2] = gate.transpose(0, 2, 1)
    down_t = np.ascontiguousarray(down.transpose(0, 2, 1))
    views = {"w_up": store[:, :, 1::2].transpose(0, 2, 1), "w_down": down_t.transpose(0, 2, 1)}
    if gate is not None:
        views["w_gate"] = store[:, :, 0::2].transpose(0, 2, 1)
    return store, views


@pytest.mark.parametrize("mode", ["halves", "interleaved"])
@pytest.mark.parametrize("dtype,kw", [
    ("float32", {}),
    ("float32", dict(expert_biases=True, n_shared_experts=1, shared_d_ff=16)),
    ("float32", dict(activation="gelu")),
    ("float32", dict(d_ff=[40, 0, 24, 40, 8, 40])),
    ("bfloat16", dict(expert_biases=True)),
    ("float16", {}),
])
def test_strided_expert_weights(mode, dtype, kw):
    """w_gate / w_up / w_down assigned as views of a fused store (transformers' gate_up_proj
    halves, gpt-oss's interleaved transposed tensors) are kept as views -- no copy -- and
    the forward and every gradient are the same bits as with contiguous copies."""
    rng = np.random.default_rng(7)
    E, d, T = 6, 24, 50
    kw = dict(kw)
    F = kw.pop("d_ff", 40)
    dense = moe.SparseMoE(d, F, E, 2, dtype=dtype, seed=3, **kw)
    store, views = _fused_views(dense, mode)
    strided = moe.SparseMoE(d, F, E, 2, dtype=dtype, seed=3, **kw)
    for name, v in views.items():
        setattr(strided, name, v)
        assert getattr(strided, name) is v or np.shares_memory(getattr(strided, name), v), name
        assert (getattr(strided, name).flags.c_contiguous ==
                (name == "w_down" and mode == "halves")), name
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    np.testing.assert_array_equal(strided(x), dense(x))
    y0, c0 = dense.forward_train(x)
    g0 = dense.backward(c0, dy, aux_coef=0.01)
    g1 = grads_at_1_and_2_threads(strided, x, dy, aux_coef=0.01)
    assert sorted(g0) == sorted(g1)
    for name in g0:
        np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)
    if mode == "halves" and "w_gate" in views:  # gradients laid out as the weights: one
        fused = g1["w_gate"].base                 # (E, 2F, d) array, gate then up
        assert fused is not None and fused is g1["w_up"].base
        assert fused.shape == store.shape and np.shares_memory(fused, g1["w_up"])
        np.testing.assert_array_equal(fused, np.concatenate([g0["w_gate"], g0["w_up"]], 1))
    # in-place edits of the store reach the layer (after pack(), as for any weight)
    view = views["w_up"]
    view[0, 0, 0] += 1
    strided.pack()
    dense.w_up = np.array(view)
    np.testing.assert_array_equal(strided(x), dense(x))


def test_strided_expert_weight_errors():
    """Views the core cannot read in place are copied (zero / negative strides) or
    refused by the binding with the argument's name."""
    layer = moe.SparseMoE(8, 6, 4, 2, seed=0)
    up = layer.w_up
    layer.w_up = np.broadcast_to(up[:1], up.shape)  # stride 0: a C-contiguous copy
    assert layer.w_up.flags.c_contiguous and layer.w_up.strides[0] > 0
    layer.w_up = up[::-1][::-1]
    layer.w_gate = layer.w_gate[::-1]  # negative strides: copied too
    assert layer.w_gate.flags.c_contiguous
    packed = dict(w_gate=None, w_up=up, w_down=layer.w_down, dtype=0)
    with pytest.raises(ValueError, match=r"^w_up must have non-negative strides"):
        moe._C.pack_experts(**dict(packed, w_up=up[::-1]))
    with pytest.raises(ValueError, match=r"^w_down must be a C-contiguous, aligned array"):
        moe._C.pack_experts(**dict(packed, w_down=layer.w_down.astype(">f4")))
    odd = np.lib.stride_tricks.as_strided(up, strides=(up.strides[0], up.strides[1], 6))
    with pytest.raises(ValueError, match=r"^w_up must be a C-contiguous, aligned array"):
        moe._C.pack_experts(**dict(packed, w_up=odd))  # not whole elements: unaligned


@pytest.mark.parametrize("kw", [
    {},
    dict(expert_biases=True, n_shared_experts=1, shared_d_ff=16, activation="swiglu-oai"),
    dict(activation="gelu"),
    dict(d_ff=[40, 0, 24, 40, 8, 40]),
    dict(dtype="bfloat16", capacity_factor=0.5),
    dict(null_experts=("zero", "copy"), scoring="sigmoid", n_groups=2, topk_groups=1),
    dict(lora_rank=4),
])
def test_recompute_hidden_off_keeps_the_gradients(kw):
    """recompute_hidden=False: the forward keeps the routed rows' gate / up pre-activations
    ((T k, 2 d_ff) float32) and the backward reads them instead of recomputing: the same
    gradients (the same bits; with expert LoRA the forward's own sums, which the
    recomputation reassociates: within 1e-6), at 1 and 2 threads."""
    rng = np.random.default_rng(11)
    kw = dict(kw)
    F = kw.pop("d_ff", 40)
    layer = moe.SparseMoE(24, F, 6, 2, seed=5, **kw)
    for t in ("gate", "up", "down") if layer.lora_rank else ():
        b = getattr(layer, f"lora_b_{t}")
        setattr(layer, f"lora_b_{t}", (0.1 * rng.standard_normal(b.shape)).astype(np.float32))
    x = rng.standard_normal((50, 24)).astype(np.float32)
    dy = rng.standard_normal((50, 24)).astype(np.float32)
    y0, c0 = layer.forward_train(x)
    assert c0.saved[2][3] is None
    g0 = layer.backward(c0, dy, aux_coef=0.01, z_coef=0.001)
    y1, c1 = layer.forward_train(x, recompute_hidden=False)
    hidden = c1.saved[2][3]
    gated = layer.activation in moe.layer.GATED
    assert hidden.shape == (50 * c1.routing.expert_ids.shape[1], (2 if gated else 1) * layer.d_ff)
    np.testing.assert_array_equal(y1, y0)
    layer.backward(c1, dy)  # consumed like any context
    layer.recompute_hidden = False  # the attribute is forward_train's default
    g1 = grads_at_1_and_2_threads(layer, x, dy, aux_coef=0.01, z_coef=0.001)
    assert sorted(g1) == sorted(g0)
    for name in g0:
        if layer.lora_rank:
            assert_grad(g1[name], g0[name], name, noise=1e-6 * np.linalg.norm(g0[name]))
        else:
            np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)


def test_kept_hidden_errors():
    layer = moe.SparseMoE(8, 6, 4, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    y, ctx = layer.forward_train(x, recompute_hidden=False)
    args, kw, (logits, ys, shared, hidden) = ctx.saved
    call = dict(w_gate=layer.w_gate, w_up=layer.w_up, w_down=layer.w_down)
    ids, w = ctx.routing.expert_ids, ctx.routing.weights
    with pytest.raises(ValueError, match=r"^hidden must have shape \(-1, 12\)"):
        moe._C.layer_backward(args, kw, ids, w, logits, ys, shared, y, **call,
                              hidden=hidden[:, :6].copy())
    with pytest.raises(ValueError, match=r"^hidden must have at least n_tokens \* width"):
        moe._C.layer_backward(args, kw, ids, w, logits, ys, shared, y, **call,
                              hidden=hidden[:4].copy())
    bf = moe.SparseMoE(8, 6, 4, 2, seed=0, dtype="int8", compute_dtype="int8")
    bargs, bkw = bf._forward_args(x, None, None, False)
    with pytest.raises(ValueError, match="save_gu needs a float32- or bfloat16-compute"):
        moe._C.layer_forward(*bargs, **bkw, save=True, save_hidden=True)
