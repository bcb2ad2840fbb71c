"""The float64 reference's backward (moe/reference.py, "Backward") against central finite
differences of its own forward: activations, the expert FFN, combine, dispatch, the router
linear, routing with every option and its losses, the whole top-k layer in the
Mixtral, Qwen2-MoE and DeepSeek-V3 configurations, and the LoRA mixtures (moe.lora)."""
import numpy as np
import pytest

from moe import reference as ref

EPS = 1e-6


def fd_check(loss, params, grads, rng, n_probe=12):
    """Compare grads[name] with central differences of loss() at n_probe random entries
    of each params[name] (perturbed in place and restored)."""
    for name, a in params.items():
        g = grads[name]
        assert g is not None and g.shape == a.shape, name
        flat = a.reshape(-1)
        idx = rng.choice(flat.size, size=min(n_probe, flat.size), replace=False)
        scale = max(1.0, float(np.abs(g).max()))
        for i in idx:
            keep = flat[i]
            flat[i] = keep + EPS
            up = loss()
            flat[i] = keep - EPS
            down = loss()
            flat[i] = keep
            num = (up - down) / (2 * EPS)
            assert abs(num - g.reshape(-1)[i]) <= 1e-6 * scale, (
                f"{name}[{np.unravel_index(i, a.shape)}]: analytic {g.reshape(-1)[i]!r}, "
                f"finite difference {num!r}")


@pytest.mark.parametrize("name", ref.ACTIVATIONS)
def test_activation_grads(name):
    rng = np.random.default_rng(len(name))
    gate, up = rng.standard_normal((2, 40)) * 1.5
    limit = 1.0  # swiglu-oai: some entries clamp, and pass no gradient there
    dg, du = ref._activation_grads(name, gate, up, limit=limit)
    h = lambda g, u: ref.activate(name, g, u, limit=limit)  # noqa: E731
    num_du = (h(gate, up + EPS) - h(gate, up - EPS)) / (2 * EPS)
    np.testing.assert_allclose(du, num_du, rtol=1e-6, atol=1e-8)
    if name in ref.GATED:
        num_dg = (h(gate + EPS, up) - h(gate - EPS, up)) / (2 * EPS)
        np.testing.assert_allclose(dg, num_dg, rtol=1e-6, atol=1e-8)
    else:
        assert dg is None


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("biases", [False, True])
def test_ffn_backward(activation, biases):
    rng = np.random.default_rng(7)
    T, d, F = 5, 6, 7
    gated = activation in ref.GATED
    p = {"x": rng.standard_normal((T, d)), "w_up": rng.standard_normal((F, d)) * 0.4,
         "w_down": rng.standard_normal((d, F)) * 0.4}
    if gated:
        p["w_gate"] = rng.standard_normal((F, d)) * 0.4
    if biases:
        p.update(b_up=rng.standard_normal(F) * 0.1, b_down=rng.standard_normal(d) * 0.1)
        if gated:
            p["b_gate"] = rng.standard_normal(F) * 0.1
    dy = rng.standard_normal((T, d))
    kw = dict(activation=activation, limit=2.0)

    def loss():
        return float(np.sum(dy * ref.ffn(p["x"], p.get("w_gate"), p["w_up"], p["w_down"],
                                         b_gate=p.get("b_gate"), b_up=p.get("b_up"),
                                         b_down=p.get("b_down"), **kw)))

    r = ref.ffn_backward(p["x"], p.get("w_gate"), p["w_up"], p["w_down"], dy,
                         b_gate=p.get("b_gate"), b_up=p.get("b_up"), b_down=p.get("b_down"),
                         **kw)
    grads = {"x": r["dx"], "w_up": r["dw_up"], "w_down": r["dw_down"], "w_gate": r["dw_gate"],
             "b_gate": r["db_gate"], "b_up": r["db_up"], "b_down": r["db_down"]}
    fd_check(loss, p, grads, rng)


def test_expert_ffn_backward_empty_experts_and_sizes():
    rng = np.random.default_rng(11)
    E, F, d = 4, 6, 5
    offsets = np.array([0, 3, 3, 7, 8])  # expert 1 empty
    p = {"x": rng.standard_normal((8, d)), "w_gate": rng.standard_normal((E, F, d)) * 0.4,
         "w_up": rng.standard_normal((E, F, d)) * 0.4,
         "w_down": rng.standard_normal((E, d, F)) * 0.4}
    sizes = np.array([6, 2, 4, 1])
    dy = rng.standard_normal((8, d))

    def loss():
        return float(np.sum(dy * ref.expert_ffn(p["x"], offsets, p["w_gate"], p["w_up"],
                                                p["w_down"], expert_d_ff=sizes)))

    r = ref.expert_ffn_backward(p["x"], offsets, p["w_gate"], p["w_up"], p["w_down"], dy,
                                expert_d_ff=sizes)
    fd_check(loss, p, {"x": r["dx_sorted"], "w_gate": r["dw_gate"], "w_up": r["dw_up"],
                       "w_down": r["dw_down"]}, rng, n_probe=40)
    assert not r["dw_up"][1].any() and not r["dw_up"][3, 1:].any()  # no rows / past d_ff


def test_combine_and_dispatch_backward():
    rng = np.random.default_rng(3)
    T, k, E, d = 6, 2, 4, 5
    ids = np.array([[0, 1], [1, -1], [3, 0], [2, 2], [-1, -1], [0, 3]], np.int32)
    p = {"x": rng.standard_normal((T, d)), "w": rng.standard_normal((T, k))}
    disp = ref.dispatch(p["x"], ids, E)
    p["y"] = rng.standard_normal(disp["x_sorted"].shape)
    d_out = rng.standard_normal((T, d))

    def loss():
        return float(np.sum(d_out * ref.combine(p["y"], disp["position"], p["w"])))

    cb = ref.combine_backward(p["y"], disp["position"], p["w"], d_out)
    fd_check(loss, {"y": p["y"], "w": p["w"]}, {"y": cb["dy_sorted"], "w": cb["d_weights"]},
             rng, n_probe=30)
    assert not cb["d_weights"][ids < 0].any()
    g = rng.standard_normal(disp["x_sorted"].shape)
    dx = ref.dispatch_backward(g, disp["token_index"], T)
    fd_check(lambda: float(np.sum(g * ref.dispatch(p["x"], ids, E)["x_sorted"])),
             {"x": p["x"]}, {"x": dx}, rng, n_probe=30)


@pytest.mark.parametrize("opts", [
    dict(scoring="softmax"), dict(scoring="softmax", renormalize=False, routed_scaling=2.5),
    dict(scoring="softmax-after-topk"), dict(scoring="sigmoid"),
    dict(scoring="sigmoid", renormalize=False),
    dict(scoring="sigmoid", expert_bias=True, n_groups=4, topk_groups=2, routed_scaling=2.5),
    dict(scoring="softmax", capacity_factor=0.6),
    dict(scoring="sigmoid", capacity_factor=0.6, aux_coef=0.3, z_coef=0.2),
    dict(scoring="softmax", aux_coef=1.0, z_coef=1e-2),
    dict(scoring="softmax-after-topk", aux_coef=0.5, z_coef=0.5),
])
def test_route_backward(opts):
    rng = np.random.default_rng(len(str(opts)))
    T, E, k = 9, 8, 3
    opts = dict(opts)
    if opts.pop("expert_bias", False):
        opts["expert_bias"] = rng.standard_normal(E) * 0.3
    aux, zc = opts.pop("aux_coef", 0.0), opts.pop("z_coef", 0.0)
    p = {"logits": rng.standard_normal((T, E))}
    dw = rng.standard_normal((T, k))

    def loss():
        r = ref.route(p["logits"], k, **opts)
        return float(np.sum(dw * r["weights"]) + aux * r["aux_loss"] + zc * r["z_loss"])

    dl = ref.route_backward(p["logits"], dw, k, aux_coef=aux, z_coef=zc, **opts)
    fd_check(loss, p, {"logits": dl}, rng, n_probe=T * E)


CONFIGS = {
    "mixtral": dict(scoring="softmax", renormalize=True),
    "qwen2_moe": dict(scoring="softmax", renormalize=False, shared=True, shared_gate=True),
    "deepseek_v3": dict(scoring="sigmoid", renormalize=True, routed_scaling=2.5,
                        n_groups=4, topk_groups=2, expert_bias=True, shared=True),
    "biases_capacity": dict(scoring="softmax", router_bias=True, expert_biases=True,
                            capacity_factor=0.8, activation="gelu"),
    "gpt_oss": dict(scoring="softmax-after-topk", activation="swiglu-oai",
                    expert_biases=True, router_bias=True),
    "null_experts": dict(scoring="softmax", null=("zero", "copy", "constant", "copy"),
                         capacity_factor=1.5, shared=True),
    "skipping": dict(scoring="sigmoid", renormalize=False, skip_threshold=0.62),
    "skipping_renormalized": dict(scoring="softmax", skip_threshold=0.46,
                                  skip_renormalize=True, capacity_factor=1.2),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.5, routed_scaling=1.5),
    "expert_choice_sigmoid": dict(router="expert_choice", scoring="sigmoid",
                                  capacity_factor=2.0, null=("copy", "constant")),
    "top_p": dict(router="top_p", router_p=0.4, shared=True),
    "threshold_skipping": dict(router="threshold", router_threshold=0.09, renormalize=False,
                               routed_scaling=2.0, skip_threshold=0.3,
                               skip_renormalize=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sparse_moe_backward(name):
    cfg = dict(CONFIGS[name])
    rng = np.random.default_rng(len(name))
    T, d, F, E, k = 7, 6, 5, 8, cfg.pop("top_k", 2)
    act = cfg.pop("activation", "swiglu")
    gated = act in ref.GATED
    w = lambda *s: rng.standard_normal(s) * 0.5  # noqa: E731
    p = {"x": w(T, d), "router_weight": w(E, d), "w_up": w(E, F, d), "w_down": w(E, d, F)}
    if gated:
        p["w_gate"] = w(E, F, d)
    if cfg.pop("router_bias", False):
        p["router_bias"] = w(E) * 0.2
    if cfg.pop("expert_biases", False):
        p.update(b_up=w(E, F) * 0.2, b_down=w(E, d) * 0.2)
        if gated:
            p["b_gate"] = w(E, F) * 0.2
    if cfg.pop("shared", False):
        p.update(shared_w_up=w(4, d), shared_w_down=w(d, 4))
        if gated:
            p["shared_w_gate"] = w(4, d)
    if cfg.pop("shared_gate", False):
        p["shared_gate_weight"] = w(1, d)
    if cfg.pop("expert_bias", False):
        cfg["expert_bias"] = w(E) * 0.2
    nulls = cfg.pop("null", ())
    if nulls:  # router outputs E.. E+n_null-1, never dispatched
        p.update(router_weight=np.concatenate([w(E, d), 2 * w(len(nulls), d)]),
                 null_values=w(len(nulls), d))
        cfg["null_experts"] = nulls
    dy = rng.standard_normal((T, d))
    aux, zc = 0.1, 0.05

    def call(fn, *extra, **kw):
        return fn(p["x"], p["router_weight"], p.get("w_gate"), p["w_up"], p["w_down"], *extra,
                  top_k=k, activation=act, **{n: p.get(n) for n in p if n.startswith(
                      ("b_", "shared_", "router_bias", "null_values"))}, **cfg, **kw)

    def loss():
        y, r = call(ref.sparse_moe)
        return float(np.sum(dy * y) + aux * r["aux_loss"] + zc * r["z_loss"])

    if nulls:  # every kind of null expert is chosen somewhere, so each is checked
        ids = call(ref.sparse_moe)[1]["expert_ids"]
        assert {nulls[e - E] for e in ids.ravel() if e >= E} == set(nulls), ids
    if cfg.get("skip_threshold"):  # some slots skipped, some kept
        ids = call(ref.sparse_moe)[1]["expert_ids"]
        assert 0 < int((ids < 0).sum()) < ids.size, ids
    g = call(ref.sparse_moe_backward, dy, aux_coef=aux, z_coef=zc)
    g = dict(g, x=g["dx"])
    fd_check(loss, p, g, rng)


def test_multi_head_moe_backward():
    """The composition (projections, split into sub-tokens, merge) against finite
    differences of multi_head_moe; the inner layer's own backward is checked above.  The
    forward rounds the sub-tokens to float32 as the kernels see them, so the differences
    take a larger step."""
    import moe
    rng = np.random.default_rng(4)
    mh = moe.MultiHeadMoE(8, 2, 6, 4, 2, seed=1)
    x = rng.standard_normal((5, 8))
    dy = rng.standard_normal((5, 8))
    g = ref.multi_head_moe_backward(mh, x, dy)
    eps = 1e-3
    for name, arr in (("w_in", mh.w_in), ("w_merge", mh.w_merge)):
        for i in rng.choice(arr.size, 6, replace=False):
            idx = np.unravel_index(i, arr.shape)
            vals = []
            for s in (eps, -eps):
                w = arr.copy()
                w[idx] += s
                setattr(mh, name, w)
                vals.append(float(np.sum(dy * ref.multi_head_moe(mh, x)[0])))
            setattr(mh, name, arr)
            num = (vals[0] - vals[1]) / (2 * eps)
            assert abs(num - g[name][idx]) <= 2e-3 * max(1.0, abs(num)), (name, idx)


# --------------------------------------------------------------------------- #
# LoRA mixtures (moe.lora): lora_mixture_backward and lora_backward
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("kind", ["adapters", "shared_a", "ranks"])
def test_lora_mixture_backward(kind):
    rng = np.random.default_rng(len(kind))
    T, d_in, d_out, r, E, S = 6, 7, 5, 3, 4, 2
    n = r if kind == "ranks" else E  # what ids index
    p = {"x": rng.standard_normal((T, d_in)),
         "a": rng.standard_normal((E, r, d_in) if kind == "adapters" else (r, d_in)),
         "b": rng.standard_normal((d_out, r) if kind == "ranks" else (E, d_out, r)),
         "weights": rng.standard_normal((T, S))}
    w0 = rng.standard_normal((d_out, d_in))
    bias = rng.standard_normal(d_out)
    ids = rng.integers(0, n, (T, S))
    ids[1, 1] = ids[4, 0] = -1  # empty slots
    scaling = rng.uniform(0.5, 2.0, n)  # per adapter (per rank for "ranks")
    dy = rng.standard_normal((T, d_out))

    def loss():
        return float(np.sum(dy * ref.lora_mixture(p["x"], w0, p["a"], p["b"], ids,
                                                  p["weights"], scaling, bias, kind)))

    g = ref.lora_mixture_backward(p["x"], w0, p["a"], p["b"], ids, p["weights"], scaling, dy,
                                  kind)
    assert set(g) == {"dx", "a", "b", "weights"}
    assert not g["weights"][ids < 0].any()
    fd_check(loss, p, dict(g, x=g["dx"]), rng, n_probe=30)
    # a float scaling and weights None (all 1) agree with the same call spelled out
    g1 = ref.lora_mixture_backward(p["x"], w0, p["a"], p["b"], ids, None, 0.7, dy, kind)
    g2 = ref.lora_mixture_backward(p["x"], w0, p["a"], p["b"], ids, np.ones((T, S)),
                                   np.full(n, 0.7), dy, kind)
    for key in g1:
        np.testing.assert_allclose(g1[key], g2[key], rtol=1e-13, atol=1e-13)


def _lora_loss(layer, p, dy, aux=0.0, zc=0.0, seq_lens=None, adapter_ids=None):
    """sum(dy * y) + aux * aux_loss + zc * z_loss for a moe.lora layer, in float64 from the
    parameters in p (x, router_weight, lora_a, lora_b, scalings: whichever the layer has)
    and the layer's other weights and options: lora_forward spelled out from lora_mixture
    and route without its rounding of x to float32, so that x can be perturbed."""
    name = type(layer).__name__
    x = p["x"]
    T = x.shape[0]
    w0 = ref._decode_weight(layer, layer.base_weight)
    bias = layer.base_bias if layer.use_bias else None
    a = p.get("lora_a", layer.lora_a)
    b = p.get("lora_b", layer.lora_b)
    s = layer.scaling
    losses = 0.0
    if name in ("TopKLoRA", "SoftLoRA", "HydraLoRA"):
        src = x
        if layer.per_sequence:
            seq = np.repeat(np.arange(len(seq_lens)), seq_lens)
            src = np.stack([x[seq == i].mean(axis=0) for i in range(len(seq_lens))])
        k = layer.top_k if layer.top_k is not None else layer.n_experts
        r = ref.route(src @ p["router_weight"].T, k, scoring=getattr(layer, "scoring",
                                                                    "softmax"),
                      renormalize=layer.renormalize)
        ids, w = r["expert_ids"], r["weights"]
        if layer.per_sequence:
            ids, w = ids[seq], w[seq]
        losses = aux * r["aux_loss"] + zc * r["z_loss"]
        y = ref.lora_mixture(x, w0, a, b, ids, w, s, bias,
                             "shared_a" if name == "HydraLoRA" else "adapters")
    elif name == "GatedLoRA":
        c = p["scalings"]
        if layer.top_k is None:
            ids, w = np.tile(np.arange(layer.n_experts), (T, 1)), c
        else:
            ids = np.stack([np.argsort(-row, kind="stable")[:layer.top_k] for row in c])
            w = np.take_along_axis(c, ids, axis=1)
            if layer.softmax_topk:
                w = ref.softmax(w, axis=1)
        y = ref.lora_mixture(x, w0, a, b, ids, w, s, bias)
    elif name == "FlyLoRA":
        ids = ref.flylora_select(x @ np.asarray(a, np.float64).T, layer.top_k,
                                 layer.rank_bias, layer.signed)
        y = ref.lora_mixture(x, w0, a, b, ids, None, s, bias, "ranks")
    elif name == "SMoRA":
        logits = x @ p["router_weight"].T
        logits = np.tile(logits, (1, layer.rank_partition)) if layer.tile else \
            np.repeat(logits, layer.rank_partition, axis=1)
        r = ref.route(logits, layer.top_k, scoring="sigmoid", renormalize=True,
                      routed_scaling=layer.top_k, expert_bias=layer.rank_bias)
        losses = aux * r["aux_loss"] + zc * r["z_loss"]
        y = ref.lora_mixture(x, w0, a, b, r["expert_ids"], r["weights"], s, bias, "ranks")
    else:  # MultiLoRA
        y = ref.lora_mixture(x, w0, a, b, np.asarray(adapter_ids).reshape(T, 1), None,
                             layer.scalings, bias)
    return float(np.sum(dy * y) + losses)


LORA_KEYS = {"TopKLoRA": {"x", "router_weight", "lora_a", "lora_b"},
             "SoftLoRA": {"x", "router_weight", "lora_a", "lora_b"},
             "HydraLoRA": {"x", "router_weight", "lora_a", "lora_b"},
             "GatedLoRA": {"x", "scalings", "lora_a", "lora_b"},
             "FlyLoRA": {"x", "lora_b"},
             "SMoRA": {"x", "router_weight", "lora_a", "lora_b"},
             "MultiLoRA": {"x", "lora_a", "lora_b"}}

LORA_CASES = {
    "topk_softmax_losses": ("TopKLoRA", dict(top_k=2, bias=True), dict(aux=0.3, zc=0.1)),
    "topk_softmax_after_topk": ("TopKLoRA", dict(top_k=2, scoring="softmax-after-topk",
                                                 dtype="bfloat16"), dict(aux=0.5, zc=0.2)),
    # 3 slots of 5 adapters: the C backward's dense layout; 1 or 2 slots: its sparse one
    "topk_sigmoid": ("TopKLoRA", dict(top_k=3, scoring="sigmoid", dtype="float16"),
                     dict(aux=0.4, zc=0.05)),
    "topk_sigmoid_plain": ("TopKLoRA", dict(top_k=2, scoring="sigmoid", renormalize=False),
                           dict()),
    "topk_per_sequence": ("TopKLoRA", dict(top_k=2, per_sequence=True),
                          dict(aux=0.3, zc=0.1, seq_lens=[2, 5])),
    "soft": ("SoftLoRA", dict(), dict(aux=0.3, zc=0.1)),
    "soft_topk_per_sequence": ("SoftLoRA", dict(top_k=2, per_sequence=True),
                               dict(aux=0.2, zc=0.1, seq_lens=[3, 1, 3])),
    "hydra_dense": ("HydraLoRA", dict(bias=True), dict(zc=0.1)),
    "hydra_top2": ("HydraLoRA", dict(top_k=2, dtype="bfloat16"), dict(aux=0.3, zc=0.1)),
    "hydra_top1": ("HydraLoRA", dict(top_k=1), dict(aux=0.2, zc=0.1)),
    "topk_top1": ("TopKLoRA", dict(top_k=1, scoring="sigmoid"), dict(aux=0.2, zc=0.1)),
    "gated_dense": ("GatedLoRA", dict(), dict()),
    "gated_top2": ("GatedLoRA", dict(top_k=2, dtype="float16"), dict()),
    "gated_top2_softmax": ("GatedLoRA", dict(top_k=2, softmax_topk=True), dict()),
    "fly": ("FlyLoRA", dict(top_k=2, bias=True), dict()),
    "fly_signed": ("FlyLoRA", dict(top_k=2, signed=True), dict()),
    "smora_repeat": ("SMoRA", dict(top_k=3, rank_partition=2), dict(aux=0.3, zc=0.1)),
    "smora_tile": ("SMoRA", dict(top_k=3, rank_partition=2, tile=True, dtype="bfloat16"),
                   dict(aux=0.3, zc=0.1)),
    "multi": ("MultiLoRA", dict(bias=True), dict(adapter_ids=[0, -1, 2, 3, 1, 2, -1])),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_backward(case):
    """lora_backward for every moe.lora layer against finite differences of the forward
    (lora_forward spelled out in float64, _lora_loss) w.r.t. x and every trained weight;
    the base weight (float32, bf16 or fp16 storage) is frozen."""
    import moe
    cls_name, opts, call = LORA_CASES[case]
    call = dict(call)
    aux, zc = call.pop("aux", 0.0), call.pop("zc", 0.0)
    rng = np.random.default_rng(len(case))
    T, d_in, d_out, E = 7, 7, 5, 4  # T * top_k not a multiple of E: the aux loss moves
    cls = getattr(moe, cls_name)
    if cls_name in ("FlyLoRA", "SMoRA"):  # rank 6, top_k ranks
        layer = cls(d_in, d_out, 6, seed=2, **opts)
    else:  # E adapters of rank 3
        layer = cls(d_in, d_out, E, 3, seed=2, **opts)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    layer.lora_b = f32(*layer.lora_b.shape)
    if layer.use_bias:
        layer.base_bias = f32(d_out)
    if cls_name in ("TopKLoRA", "SoftLoRA", "HydraLoRA", "SMoRA"):
        layer.router_weight = f32(*layer.router_weight.shape)
    if cls_name in ("FlyLoRA", "SMoRA"):
        layer.rank_bias = f32(layer.rank) * np.float32(0.2)
    if cls_name == "MultiLoRA":
        layer.scalings = rng.uniform(0.5, 2.0, E).astype(np.float32)
    x = f32(T, d_in)
    p = {"x": x.astype(np.float64)}
    for key in sorted(LORA_KEYS[cls_name] - {"x", "scalings"}):
        p[key] = np.asarray(getattr(layer, key), np.float64).copy()
    if cls_name == "GatedLoRA":
        call["scalings"] = f32(T, E)
        p["scalings"] = call["scalings"].astype(np.float64)
    dy = rng.standard_normal((T, d_out))

    # _lora_loss is lora_forward, at a point where x is float32 already
    y_ref = ref.lora_forward(layer, x, **call)[0]
    fwd = {k: v for k, v in call.items() if k != "scalings"}
    np.testing.assert_allclose(_lora_loss(layer, p, dy, **fwd), float(np.sum(dy * y_ref)),
                               rtol=1e-12)

    g = ref.lora_backward(layer, p["x"], dy, aux_coef=aux, z_coef=zc, **call)
    assert set(g) == LORA_KEYS[cls_name], sorted(g)
    assert all(v.dtype == np.float64 for v in g.values())
    fd_check(lambda: _lora_loss(layer, p, dy, aux, zc, **fwd), p, g, rng, n_probe=20)


# --------------------------------------------------------------------------- #
# Soft MoE and Mixture of Tokens: soft_moe_backward and mixture_of_tokens_backward
# --------------------------------------------------------------------------- #

SOFT_CASES = {
    "swiglu": dict(),
    "gelu_normalize": dict(activation="gelu", normalize=True, scale=1.7),
    "two_slots": dict(slots_per_expert=2),
    "one_group_2d": dict(one_group=True),
    "temperature": dict(temperature=0.7),
    "normalize_two_slots_temperature": dict(normalize=True, scale=0.8, slots_per_expert=2,
                                            temperature=0.7),
}


def _soft_params(rng, B, m, d, F, E, s, gated, normalize, scale):
    w = lambda *shape: rng.standard_normal(shape) * 0.5  # noqa: E731
    p = {"x": w(B, m, d) if B else w(m, d), "phi": w(d, E * s), "w_up": w(E, F, d),
         "w_down": w(E, d, F)}
    if gated:
        p["w_gate"] = w(E, F, d)
    if normalize:
        p["scale"] = np.array(float(scale))  # 0-d, so fd_check perturbs it in place
    return p


def _soft_grads(g, p):
    assert all(v is None or np.asarray(v).dtype == np.float64 for v in g.values())
    return {k: (g["dx"] if k == "x" else np.asarray(g[k])) for k in p}


@pytest.mark.parametrize("case", sorted(SOFT_CASES))
def test_soft_moe_backward(case):
    cfg = dict(SOFT_CASES[case])
    rng = np.random.default_rng(len(case))
    one_group = cfg.pop("one_group", False)
    B, m, d, F, E = (None if one_group else 2), 4, 6, 5, 3
    s = cfg.pop("slots_per_expert", 1)
    act = cfg.pop("activation", "swiglu")
    normalize = cfg.get("normalize", False)
    p = _soft_params(rng, B, m, d, F, E, s, act in ref.GATED, normalize,
                     cfg.pop("scale", 1.0))
    dy = rng.standard_normal(p["x"].shape)

    def call(fn, *extra):
        kw = dict(cfg, scale=float(p["scale"])) if normalize else cfg
        return fn(p["x"], p["phi"], p.get("w_gate"), p["w_up"], p["w_down"], *extra,
                  slots_per_expert=s, activation=act, **kw)

    def loss():
        return float(np.sum(dy * call(ref.soft_moe)["out"]))

    g = call(ref.soft_moe_backward, dy)
    assert set(g) == {"dx", "phi", "w_gate", "w_up", "w_down", "scale"}
    assert g["dx"].shape == p["x"].shape and g["phi"].shape == (d, E * s)
    assert (g["w_gate"] is None) == (act not in ref.GATED)
    assert isinstance(g["scale"], float)
    if not normalize:
        assert g["scale"] == 0.0
    fd_check(loss, p, _soft_grads(g, p), rng, n_probe=16)


MOT_CASES = {
    "mixing_all": dict(mixing=True, group_size=None),
    "mixing_groups_of_2": dict(mixing=True, group_size=2),
    "no_mixing": dict(mixing=False),
    "mixing_2d_normalize_gelu": dict(mixing=True, group_size=2, two_d=True, normalize=True,
                                     scale=1.3, activation="gelu", temperature=0.7),
    "no_mixing_two_slots_normalize": dict(mixing=False, slots_per_expert=2, normalize=True,
                                          scale=1.3),
}


@pytest.mark.parametrize("case", sorted(MOT_CASES))
def test_mixture_of_tokens_backward(case):
    cfg = dict(MOT_CASES[case])
    rng = np.random.default_rng(len(case) + 100)
    B, m, d, F, E = 4, 3, 6, 5, 3
    two_d = cfg.pop("two_d", False)
    s = cfg.pop("slots_per_expert", 1)
    act = cfg.pop("activation", "swiglu")
    normalize = cfg.get("normalize", False)
    p = _soft_params(rng, B, m, d, F, E, s, act in ref.GATED, normalize,
                     cfg.pop("scale", 1.0))
    if two_d:
        p["x"] = p["x"][:, 0].copy()
    dy = rng.standard_normal(p["x"].shape)

    def call(fn, *extra):
        kw = dict(cfg, scale=float(p["scale"])) if normalize else cfg
        return fn(p["x"], p["phi"], p.get("w_gate"), p["w_up"], p["w_down"], *extra,
                  slots_per_expert=s, activation=act, **kw)

    def loss():
        return float(np.sum(dy * call(ref.mixture_of_tokens)["out"]))

    g = call(ref.mixture_of_tokens_backward, dy)
    assert set(g) == {"dx", "phi", "w_gate", "w_up", "w_down", "scale"}
    assert g["dx"].shape == p["x"].shape
    fd_check(loss, p, _soft_grads(g, p), rng, n_probe=16)


def _peer_params(rng, per_head_keys, T=5, d=6, n=4, H=2, dk=4, d_out=5):
    keys = (H, n, dk // 2) if per_head_keys else (n, dk // 2)
    return {"x": rng.standard_normal((T, d)),
            "w_query": rng.standard_normal((H, dk, d)) * 0.6,
            "sub_keys_1": rng.standard_normal(keys), "sub_keys_2": rng.standard_normal(keys),
            "u": rng.standard_normal((n * n, d)) * 0.5,
            "v": rng.standard_normal((n * n, d_out)) * 0.5}


def _peer_margins(p, top_k):
    """(smallest gap between the k-th and (k+1)-th score, smallest |u_e . x| of a selected
    expert) over every token and head."""
    k1, k2 = p["sub_keys_1"], p["sub_keys_2"]
    if k1.ndim == 2:
        k1, k2 = k1[None], k2[None]
    half = p["w_query"].shape[1] // 2
    gap, ux = np.inf, np.inf
    for t, xt in enumerate(p["x"]):
        for h, wq in enumerate(p["w_query"]):
            key = 0 if k1.shape[0] == 1 else h
            q = wq @ xt
            every = np.sort((k1[key] @ q[:half])[:, None] + (k2[key] @ q[half:])[None, :],
                            axis=None)[::-1]
            gap = min(gap, every[top_k - 1] - every[top_k])
            order = ref.peer_forward(xt[None], p["w_query"], p["sub_keys_1"],
                                     p["sub_keys_2"], p["u"], p["v"], top_k)["expert_ids"]
            ux = min(ux, float(np.abs(p["u"][order[0, h]] @ xt).min()))
    return gap, ux


@pytest.mark.parametrize("per_head_keys", [True, False])
@pytest.mark.parametrize("activation", ref.PEER_ACTIVATIONS)
def test_peer_backward(activation, per_head_keys):
    top_k = 3
    rng = np.random.default_rng(2024 + 10 * per_head_keys + len(activation))
    for _ in range(200):  # draw until the selection has no near-ties and relu no kinks
        p = _peer_params(rng, per_head_keys)
        gap, ux = _peer_margins(p, top_k)
        if gap > 1e-3 and ux > 1e-3:
            break
    else:
        pytest.fail("no draw without near-ties")
    dy = rng.standard_normal((5, 5))
    args = lambda: (p["x"], p["w_query"], p["sub_keys_1"], p["sub_keys_2"],  # noqa: E731
                    p["u"], p["v"])

    def loss():
        return float(np.sum(dy * ref.peer_forward(*args(), top_k, activation)["out"]))

    g = ref.peer_backward(*args(), dy, top_k, activation=activation)
    assert set(g) == {"dx", "w_query", "sub_keys_1", "sub_keys_2", "u", "v"}
    grads = {("x" if k == "dx" else k): a for k, a in g.items()}
    for name, a in grads.items():
        assert a.dtype == np.float64 and a.shape == p[name].shape, name
        assert np.abs(a).max() > 1e-3, name  # every path carries gradient here
    # rows of u, v of experts no token chose get none
    chosen = np.unique(ref.peer_forward(*args(), top_k, activation)["expert_ids"])
    idle = np.setdiff1d(np.arange(p["u"].shape[0]), chosen)
    assert not grads["u"][idle].any() and not grads["v"][idle].any()
    fd_check(loss, p, grads, rng, n_probe=1000)  # every entry


# --------------------------------------------------------------------------- #
# LoRA on the experts of a SparseMoE (lora_rank > 0): ffn_backward's and
# layer_backward's adapter gradients
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("activation,targets", [
    ("swiglu", ("w_gate", "w_up", "w_down")), ("gelu", ("w_up", "w_down"))])
def test_ffn_backward_lora(activation, targets):
    rng = np.random.default_rng(len(targets) + len(activation))
    T, d, F, r, s = 5, 6, 7, 3, 1.7
    gated = activation in ref.GATED
    p = {"x": rng.standard_normal((T, d)), "w_up": rng.standard_normal((F, d)) * 0.4,
         "w_down": rng.standard_normal((d, F)) * 0.4}
    if gated:
        p["w_gate"] = rng.standard_normal((F, d)) * 0.4
    for t in targets:
        fan_in, out = (F, d) if t == "w_down" else (d, F)
        p[f"a_{t}"] = rng.standard_normal((r, fan_in)) * 0.5
        p[f"b_{t}"] = rng.standard_normal((out, r)) * 0.5
    dy = rng.standard_normal((T, d))
    kw = dict(activation=activation, lora_scaling=s)

    def lora():
        return {t: (p[f"a_{t}"], p[f"b_{t}"]) for t in targets}

    def loss():
        return float(np.sum(dy * ref.ffn(p["x"], p.get("w_gate"), p["w_up"], p["w_down"],
                                         lora=lora(), **kw)))

    g = ref.ffn_backward(p["x"], p.get("w_gate"), p["w_up"], p["w_down"], dy, lora=lora(),
                         **kw)
    assert set(g["lora"]) == set(targets)
    grads = {"x": g["dx"], "w_up": g["dw_up"], "w_down": g["dw_down"], "w_gate": g["dw_gate"]}
    for t in targets:
        grads[f"a_{t}"], grads[f"b_{t}"] = g["lora"][t]
    fd_check(loss, p, grads, rng, n_probe=20)
    # the adapters reach dx: without them the gradient differs
    plain = ref.ffn_backward(p["x"], p.get("w_gate"), p["w_up"], p["w_down"], dy, **kw)
    assert "lora" not in plain and not np.allclose(plain["dx"], g["dx"])


class _Float64View:
    """A layer seen through float64 copies of some of its weights (overrides), so that
    layer_forward / layer_backward can be differenced in float64."""

    def __init__(self, layer, overrides):
        self._layer, self._over = layer, overrides

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(self._layer, name)


@pytest.mark.parametrize("targets", [None, ("w_down",)])
def test_layer_backward_expert_lora(targets):
    import moe
    rng = np.random.default_rng(5 if targets is None else 6)
    T, d, F, E, k = 7, 6, 5, 4, 2
    layer = moe.SparseMoE(d, F, E, k, lora_rank=2, lora_alpha=3.0, lora_targets=targets,
                          seed=3)
    assert layer.lora_scaling == 1.5
    names = [f"lora_{m}_{t[2:]}" for t in layer.lora_targets for m in "ab"]
    for n in names:  # B starts at zero: give every adapter a path
        if n.startswith("lora_b"):
            setattr(layer, n, rng.standard_normal(getattr(layer, n).shape) * 0.5)
    p = {n: np.asarray(getattr(layer, n), dtype=np.float64).copy() for n in names}
    p["x"] = rng.standard_normal((T, d))
    view = _Float64View(layer, p)
    dy = rng.standard_normal((T, d))

    def loss():
        return float(np.sum(dy * ref.layer_forward(view, p["x"])[0]))

    ids = ref.layer_forward(view, p["x"])[1]["expert_ids"]
    assert len(set(ids.ravel())) == E, ids  # every expert's adapters get rows
    g = ref.layer_backward(view, p["x"], dy)
    for t in ("w_gate", "w_up", "w_down"):
        for m in "ab":
            assert (g[f"lora_{m}_{t[2:]}"] is None) == (t not in layer.lora_targets)
    fd_check(loss, p, dict(g, x=g["dx"]), rng, n_probe=24)
    # the same layer without its adapters has another dx
    plain = ref.sparse_moe_backward(
        p["x"], layer.router_weight, layer.w_gate, layer.w_up, layer.w_down, dy, top_k=k)
    assert not np.allclose(plain["dx"], g["dx"])


@pytest.mark.parametrize("scoring", ["softmax", "softmax-after-topk", "sigmoid"])
def test_route_backward_straight_through(scoring):
    """The straight-through estimator is the exact gradient of a surrogate: the top-k mask
    m_e = 1 replaced by 1 + q_e(l) - q_e(l0) (value 1 at l0, the derivative of the scores q
    it was cut from), the selection held fixed; checked by finite differences of it."""
    rng = np.random.default_rng(len(scoring))
    T, E, k = 5, 6, 2
    l0 = rng.standard_normal((T, E))
    dw = rng.standard_normal((T, k))
    ids = ref.route(l0, k, scoring=scoring)["expert_ids"]

    def scores(l):
        return ref.sigmoid(l) if scoring == "sigmoid" else ref.softmax(l)

    def loss(l):
        w = ref.route(l, k, scoring=scoring)["weights"]  # (selection fixed for small steps)
        m = 1.0 + np.take_along_axis(scores(l) - scores(l0), ids, 1)
        return float(np.sum(m * w * dw))
    g = ref.route_backward(l0, dw, k, scoring=scoring, router_grad="straight-through")
    p = {"l": l0.copy()}
    fd_check(lambda: loss(p["l"]), p, {"l": g}, rng, n_probe=T * E)
