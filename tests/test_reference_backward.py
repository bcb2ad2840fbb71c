"""The float64 reference's backward (moe/reference.py, "Backward") against central finite
differences of its own forward: activations, the expert FFN, combine, dispatch, the router
linear, routing with every option and its losses, and the whole top-k layer in the
Mixtral, Qwen2-MoE and DeepSeek-V3 configurations."""
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
