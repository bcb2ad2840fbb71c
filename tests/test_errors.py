"""Bad input: every documented error is raised with the documented type, and its message
names the argument (and the expected shape, for shape errors).  Then the same for moe._C,
the memory-safety net under the API, called directly with wrong types, dtypes, layouts and
shapes; and a child process fed random garbage must survive it.
"""
import inspect
import re
import textwrap

import numpy as np
import pytest

import moe
import childproc
from moe import _C

NAN, INF = float("nan"), float("inf")


# ---- route ---------------------------------------------------------------------------------

@pytest.fixture
def logits(make):
    return make.logits(10, 8)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_route_logits_wrong_ndim(shape):
    got = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
    with pytest.raises(ValueError, match=r"^logits must have shape \(n_tokens, n_experts\), "
                                         rf"got {re.escape(got)}$"):
        moe.route(np.ones(shape), 1)


def test_route_no_experts():
    with pytest.raises(ValueError, match=r"^logits must have at least one expert"):
        moe.route(np.ones((3, 0)), 1)


@pytest.mark.parametrize("bad", [np.ones((4, 6), np.int64), np.ones((4, 6), np.int32),
                                 np.ones((4, 6), np.complex128), np.ones((4, 6), bool),
                                 np.full((4, 6), "a")], ids=["int64", "int32", "complex",
                                                             "bool", "str"])
def test_route_logits_wrong_dtype(bad):
    with pytest.raises(TypeError, match=rf"^logits must be a floating-point array.*{bad.dtype}"):
        moe.route(bad, 2)


def test_route_logits_not_an_array():
    with pytest.raises(TypeError, match=r"^logits must be"):
        moe.route([[1.0, 2.0], [3.0]], 1)
    with pytest.raises(TypeError, match=r"^logits must be"):
        moe.route(object(), 1)


@pytest.mark.parametrize("top_k", [0, -1, 9, 100])
def test_route_top_k_out_of_range(logits, top_k):
    with pytest.raises(ValueError, match=rf"^top_k must be in 1\.\.8, got {top_k}$"):
        moe.route(logits, top_k)


@pytest.mark.parametrize("top_k", [2.0, True, "2", None, np.float32(2)])
def test_route_top_k_not_an_int(logits, top_k):
    with pytest.raises(TypeError, match=r"^top_k must be an int"):
        moe.route(logits, top_k)


def test_route_top_k_numpy_int_is_fine(logits):
    assert moe.route(logits, np.int64(2)).expert_ids.shape == (10, 2)


@pytest.mark.parametrize("n_groups", [3, 5, 16])
def test_route_n_groups_not_dividing(logits, n_groups):
    with pytest.raises(ValueError, match=rf"^n_groups must divide n_experts=8, got {n_groups}"):
        moe.route(logits, 2, n_groups=n_groups)


def test_route_n_groups_bad_values(logits):
    with pytest.raises(ValueError, match=r"^n_groups"):
        moe.route(logits, 2, n_groups=0)
    with pytest.raises(TypeError, match=r"^n_groups"):
        moe.route(logits, 2, n_groups=2.0)


def test_route_topk_groups_too_few_experts(logits):
    # 4 groups of 2: one group holds 2 experts, fewer than top_k = 3
    with pytest.raises(ValueError, match=r"^topk_groups \* \(n_experts / n_groups\) must be "
                                         r">= top_k=3, got 1 \* 2"):
        moe.route(logits, 3, n_groups=4, topk_groups=1)
    assert moe.route(logits, 3, n_groups=4, topk_groups=2).expert_ids.shape == (10, 3)


@pytest.mark.parametrize("topk_groups", [0, 5, -1])
def test_route_topk_groups_out_of_range(logits, topk_groups):
    with pytest.raises(ValueError, match=r"^topk_groups must be in 1\.\.4"):
        moe.route(logits, 2, n_groups=4, topk_groups=topk_groups)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_route_non_finite_logits(logits, value, dtype):
    bad = logits.astype(dtype)
    bad[3, 5] = value
    with pytest.raises(ValueError, match=r"logits must be finite.*token 3, expert 5"):
        moe.route(bad, 2)
    with pytest.raises(ValueError, match=r"logits must be finite"):
        moe.route(bad, 2, scoring="sigmoid", n_groups=2, capacity_factor=1.0)


@pytest.mark.parametrize("value", [NAN, INF])
def test_route_non_finite_expert_bias(logits, value):
    bias = np.zeros(8, np.float32) + 0.1
    bias[2] = value
    with pytest.raises(ValueError, match=r"^expert_bias must be finite"):
        moe.route(logits, 2, expert_bias=bias)


def test_route_expert_bias_wrong_shape_or_dtype(logits):
    with pytest.raises(ValueError, match=r"^expert_bias must have shape \(n_experts=8,\), "
                                         r"got \(7,\)$"):
        moe.route(logits, 2, expert_bias=np.ones(7))
    with pytest.raises(ValueError, match=r"^expert_bias must have shape \(n_experts=8,\), "
                                         r"got \(1, 8\)$"):
        moe.route(logits, 2, expert_bias=np.ones((1, 8)))
    with pytest.raises(TypeError, match=r"^expert_bias must be a floating-point array"):
        moe.route(logits, 2, expert_bias=np.ones(8, np.int64))


@pytest.mark.parametrize("scoring", ["softmax2", "Softmax", "", None, 0])
def test_route_unknown_scoring(logits, scoring):
    with pytest.raises(ValueError, match=r"^scoring must be one of 'softmax', "
                                         r"'softmax-after-topk', 'sigmoid'"):
        moe.route(logits, 2, scoring=scoring)


@pytest.mark.parametrize("cf", [0, 0.0, -1.0, NAN, INF])
def test_route_bad_capacity_factor(logits, cf):
    with pytest.raises(ValueError, match=r"^capacity_factor must be a finite positive number"):
        moe.route(logits, 2, capacity_factor=cf)


@pytest.mark.parametrize("cf", ["1.0", [1.0], True])
def test_route_capacity_factor_not_a_number(logits, cf):
    with pytest.raises(TypeError, match=r"^capacity_factor must be a real number"):
        moe.route(logits, 2, capacity_factor=cf)


def test_route_bad_routed_scaling(logits):
    with pytest.raises(ValueError, match=r"^routed_scaling must be a finite number"):
        moe.route(logits, 2, routed_scaling=NAN)
    with pytest.raises(TypeError, match=r"^routed_scaling must be a real number"):
        moe.route(logits, 2, routed_scaling="2.5")


# ---- update_expert_bias --------------------------------------------------------------------

def test_update_expert_bias_bad_input(make):
    bias = make.normal(8, scale=0.1)
    before = bias.copy()
    counts = np.arange(8)
    with pytest.raises(TypeError, match=r"^bias must be a floating-point numpy\.ndarray"):
        moe.update_expert_bias(bias.tolist(), counts, 0.1)
    with pytest.raises(TypeError, match=r"^bias must be a floating-point numpy\.ndarray"):
        moe.update_expert_bias(np.zeros(8, np.int64), counts, 0.1)
    ro = bias.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^bias must be writable"):
        moe.update_expert_bias(ro, counts, 0.1)
    with pytest.raises(ValueError, match=r"^bias must have shape \(n_experts,\), got \(2, 4\)"):
        moe.update_expert_bias(bias.reshape(2, 4), counts, 0.1)
    with pytest.raises(ValueError, match=r"^counts must have shape \(n_experts=8,\), got \(7,\)"):
        moe.update_expert_bias(bias, counts[:7], 0.1)
    with pytest.raises(ValueError, match=r"^counts values must be in \[0, inf\), got -3"):
        moe.update_expert_bias(bias, counts - 3, 0.1)
    with pytest.raises(TypeError, match=r"^counts must be an integer array"):
        moe.update_expert_bias(bias, counts.astype(np.float64), 0.1)
    with pytest.raises(ValueError, match=r"^rate must be a finite number"):
        moe.update_expert_bias(bias, counts, NAN)
    with pytest.raises(TypeError, match=r"^rate must be a real number"):
        moe.update_expert_bias(bias, counts, None)
    assert np.array_equal(bias, before)  # no failed call touched it


# ---- dispatch / combine --------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [6, 7, -2, -100, 2**31 - 1])
def test_dispatch_out_of_range_ids(make, bad_id):
    x = make.normal(10, 4)
    ids = make.expert_ids(10, 2, 6)
    ids[4, 1] = bad_id
    with pytest.raises(ValueError, match=rf"^expert_ids values must be in \[0, n_experts=6\) "
                                         rf"or -1, got {bad_id}$"):
        moe.dispatch(x, ids, 6)


def test_dispatch_bad_shapes_and_types(make):
    x = make.normal(10, 4)
    ids = make.expert_ids(10, 2, 6)
    with pytest.raises(ValueError, match=r"^expert_ids must have shape \(n_tokens=10, top_k\), "
                                         r"got \(9, 2\)$"):
        moe.dispatch(x, ids[:9], 6)
    with pytest.raises(ValueError, match=r"^expert_ids must have shape \(n_tokens=10, top_k\), "
                                         r"got \(10,\)$"):
        moe.dispatch(x, ids[:, 0], 6)
    with pytest.raises(TypeError, match=r"^expert_ids must be an integer array, got dtype float"):
        moe.dispatch(x, ids.astype(np.float32), 6)
    with pytest.raises(ValueError, match=r"^x must have shape \(n_tokens, d_model\), got \(40,\)"):
        moe.dispatch(x.ravel(), ids, 6)
    with pytest.raises(ValueError, match=r"^x must have shape \(n_tokens, d_model\), got "
                                         r"\(1, 10, 4\)"):
        moe.dispatch(x[None], ids, 6)
    with pytest.raises(TypeError, match=r"^x must be a floating-point array"):
        moe.dispatch(x.astype(np.int32), ids, 6)
    with pytest.raises(ValueError, match=r"^n_experts must be in 1\.\."):
        moe.dispatch(x, ids, 0)
    with pytest.raises(TypeError, match=r"^n_experts must be an int"):
        moe.dispatch(x, ids, 6.0)


@pytest.mark.parametrize("bad_pos", [12, 13, -2])
def test_combine_out_of_range_positions(make, bad_pos):
    y = make.normal(12, 4)
    position = make.rng.integers(0, 12, size=(5, 2))
    position[2, 0] = bad_pos
    with pytest.raises(ValueError, match=rf"^position values must be in \[0, n_rows=12\) or -1, "
                                         rf"got {bad_pos}$"):
        moe.combine(y, position, make.normal(5, 2))


def test_combine_bad_shapes_and_types(make):
    y = make.normal(12, 4)
    position = make.rng.integers(0, 12, size=(5, 2))
    w = make.normal(5, 2)
    with pytest.raises(ValueError, match=r"^weights must have shape \(n_tokens=5, top_k=2\), "
                                         r"got \(5, 3\)$"):
        moe.combine(y, position, make.normal(5, 3))
    with pytest.raises(ValueError, match=r"^weights must have shape \(n_tokens=5, top_k=2\), "
                                         r"got \(10,\)$"):
        moe.combine(y, position, w.ravel())
    with pytest.raises(TypeError, match=r"^weights must be a floating-point array"):
        moe.combine(y, position, w.astype(np.int64))
    with pytest.raises(ValueError, match=r"^position must have shape \(n_tokens, top_k\), "
                                         r"got \(10,\)$"):
        moe.combine(y, position.ravel(), w)
    with pytest.raises(TypeError, match=r"^position must be an integer array"):
        moe.combine(y, position.astype(np.float64), w)
    with pytest.raises(ValueError, match=r"^y_sorted must have shape \(n_tokens, d_model\)"):
        moe.combine(y.ravel(), position, w)
    with pytest.raises(TypeError, match=r"^y_sorted must be a floating-point array"):
        moe.combine(y.astype(np.complex64), position, w)


# ---- expert_ffn / ffn ----------------------------------------------------------------------

@pytest.fixture
def ffn_args(make):
    """x (10, 8), offsets for 3 experts, swiglu weights with F = 5."""
    w_gate, w_up, w_down = make.expert_weights(3, 5, 8, "swiglu")
    return make.normal(10, 8), np.array([0, 4, 4, 10]), w_gate, w_up, w_down


@pytest.mark.parametrize("offsets", [[1, 4, 4, 10], [0, 6, 4, 10], [0, 4, 4, 9],
                                     [0, 4, 4, 11], [0, -1, 4, 10], [10], [0, 11, 12, 10]],
                         ids=["start", "decreasing", "short-end", "long-end", "negative",
                              "one-entry", "beyond-end"])
def test_expert_ffn_bad_offsets(ffn_args, offsets):
    x, _, w_gate, w_up, w_down = ffn_args
    with pytest.raises(ValueError, match=r"^offsets must be non-decreasing from 0 to "
                                         r"n_rows=10"):
        moe.expert_ffn(x, offsets, w_gate[: max(len(offsets) - 1, 1)],
                       w_up[: max(len(offsets) - 1, 1)], w_down[: max(len(offsets) - 1, 1)])


def test_expert_ffn_offsets_shape_and_type(ffn_args):
    x, offsets, w_gate, w_up, w_down = ffn_args
    with pytest.raises(ValueError, match=r"^offsets must have shape \(n_experts \+ 1,\), "
                                         r"got \(1, 4\)"):
        moe.expert_ffn(x, offsets[None], w_gate, w_up, w_down)
    with pytest.raises(TypeError, match=r"^offsets must be an integer array"):
        moe.expert_ffn(x, offsets.astype(np.float64), w_gate, w_up, w_down)


def test_expert_ffn_wrong_weight_shapes(ffn_args, make):
    x, offsets, w_gate, w_up, w_down = ffn_args
    cases = [
        ("w_up", r"^w_up must have shape \(n_experts=3, d_ff, d_model=8\), got \(2, 5, 8\)$",
         (w_gate, w_up[:2], w_down)),
        ("w_up", r"^w_up must have shape \(n_experts=3, d_ff, d_model=8\), got \(3, 5, 7\)$",
         (w_gate, w_up[:, :, :7], w_down)),
        ("w_up", r"^w_up must have shape \(n_experts=3, d_ff, d_model=8\), got \(5, 8\)$",
         (w_gate, w_up[0], w_down)),
        ("w_gate", r"^w_gate must have shape \(n_experts=3, d_ff=5, d_model=8\), "
                   r"got \(3, 4, 8\)$", (w_gate[:, :4], w_up, w_down)),
        ("w_down", r"^w_down must have shape \(n_experts=3, d_model=8, d_ff=5\), "
                   r"got \(3, 5, 8\)$", (w_gate, w_up, w_up)),
        ("w_down", r"^w_down must have shape \(n_experts=3, d_model=8, d_ff=5\), "
                   r"got \(3, 8, 4\)$", (w_gate, w_up, w_down[:, :, :4])),
    ]
    for name, pattern, weights in cases:
        with pytest.raises(ValueError, match=pattern):
            moe.expert_ffn(x, offsets, *weights)
    with pytest.raises(TypeError, match=r"^w_down must be a floating-point array"):
        moe.expert_ffn(x, offsets, w_gate, w_up, w_down.astype(np.int16))


@pytest.mark.parametrize("activation", ["swish", "GELU", "", None, 0])
def test_unknown_activation(ffn_args, activation):
    x, offsets, w_gate, w_up, w_down = ffn_args
    with pytest.raises(ValueError, match=r"^activation must be one of 'swiglu'"):
        moe.expert_ffn(x, offsets, w_gate, w_up, w_down, activation)
    with pytest.raises(ValueError, match=r"^activation must be one of 'swiglu'"):
        moe.ffn(x, w_gate[0], w_up[0], w_down[0], activation)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "geglu-tanh"])
def test_gated_activation_needs_w_gate(ffn_args, activation):
    x, offsets, _, w_up, w_down = ffn_args
    with pytest.raises(ValueError, match=rf"^w_gate is required by activation '{activation}'"):
        moe.expert_ffn(x, offsets, None, w_up, w_down, activation)
    with pytest.raises(ValueError, match=rf"^w_gate is required by activation '{activation}'"):
        moe.ffn(x, None, w_up[0], w_down[0], activation)


def test_ffn_bad_shapes(ffn_args):
    x, _, w_gate, w_up, w_down = ffn_args
    with pytest.raises(ValueError, match=r"^w_up must have shape \(d_ff, d_model=8\), "
                                         r"got \(3, 5, 8\)$"):
        moe.ffn(x, w_gate[0], w_up, w_down[0])
    with pytest.raises(ValueError, match=r"^w_down must have shape \(d_model=8, d_ff=5\), "
                                         r"got \(5, 8\)$"):
        moe.ffn(x, w_gate[0], w_up[0], w_up[0])
    with pytest.raises(ValueError, match=r"^w_up must have shape \(d_ff, d_model=7\)"):
        moe.ffn(x[:, :7], w_gate[0], w_up[0], w_down[0])
    with pytest.raises(ValueError, match=r"^x must have shape \(n_tokens, d_model\)"):
        moe.ffn(x[0], w_gate[0], w_up[0], w_down[0])
    with pytest.raises(ValueError, match=r"^x_sorted must have shape \(n_tokens, d_model\)"):
        moe.expert_ffn(x[0], [0, 8], w_gate[:1], w_up[:1], w_down[:1])


# ---- SparseMoE -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(top_k=0), ValueError, r"^top_k must be in 1\.\.8"),
    (dict(top_k=9), ValueError, r"^top_k must be in 1\.\.8"),
    (dict(top_k=1.5), TypeError, r"^top_k must be an int"),
    (dict(top_k=True), TypeError, r"^top_k must be an int"),
    (dict(n_groups=3), ValueError, r"^n_groups must divide n_experts=8"),
    (dict(n_groups=4, topk_groups=1, top_k=3), ValueError, r"^topk_groups \* \(n_experts"),
    (dict(n_groups=4, topk_groups=5), ValueError, r"^topk_groups must be in 1\.\.4"),
    (dict(activation="tanh"), ValueError, r"^activation must be one of"),
    (dict(scoring="softplus"), ValueError, r"^scoring must be one of"),
    (dict(capacity_factor=0.0), ValueError, r"^capacity_factor must be a finite positive"),
    (dict(capacity_factor=-1.0), ValueError, r"^capacity_factor must be a finite positive"),
    (dict(routed_scaling=INF), ValueError, r"^routed_scaling must be a finite"),
    (dict(d_model=0), ValueError, r"^d_model must be in >= 1"),
    (dict(d_ff=2.0), TypeError, r"^d_ff must be an int"),
    (dict(n_experts=0), ValueError, r"^n_experts must be in 1\.\."),
    (dict(n_shared_experts=-1), ValueError, r"^n_shared_experts"),
    (dict(n_shared_experts=1, shared_d_ff=0), ValueError, r"^shared_d_ff"),
])
def test_layer_bad_options(kwargs, exc, pattern):
    args = dict(d_model=16, d_ff=8, n_experts=8, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        moe.SparseMoE(args.pop("d_model"), args.pop("d_ff"), args.pop("n_experts"),
                      args.pop("top_k"), **args)


@pytest.fixture
def layer():
    return moe.SparseMoE(16, 8, 8, 2, expert_bias=True, n_shared_experts=1,
                         shared_expert_gate=True)


def test_layer_bad_x(layer, make):
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., d_model=16\), "
                                         r"got \(5, 15\)$"):
        layer(make.normal(5, 15))
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., d_model=16\)"):
        layer(make.normal(16, 5))
    with pytest.raises(TypeError, match=r"^x must be a floating-point array"):
        layer(np.ones((5, 16), np.int32))
    with pytest.raises(TypeError, match=r"^x must be a floating-point array"):
        layer(np.ones((5, 16), np.complex64))


def test_layer_rejects_0d_x():
    # a scalar has no d_model axis: it is not one token, even when d_model == 1
    layer = moe.SparseMoE(16, 8, 8, 2)
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., d_model=16\), got \(\)$"):
        layer(np.float32(1.0))
    layer = moe.SparseMoE(1, 4, 4, 2)
    with pytest.raises(ValueError, match=r"^x must have shape \(\.\.\., d_model=1\), got \(\)$"):
        layer(np.float32(2.0))


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_layer_non_finite_x(layer, make, value):
    x = make.normal(6, 16)
    x[2, 3] = value
    with pytest.raises(ValueError, match=r"finite"):
        layer(x)


def test_layer_missing_or_bad_weights_at_call(make):
    x = make.normal(4, 16)
    layer = moe.SparseMoE(16, 8, 8, 2, expert_bias=True, n_shared_experts=1,
                          shared_expert_gate=True)
    layer.w_gate = None
    with pytest.raises(ValueError, match=r"^w_gate is required by activation 'swiglu'"):
        layer(x)
    layer = moe.SparseMoE(16, 8, 8, 2, expert_bias=True)
    layer.expert_bias = None
    with pytest.raises(ValueError, match=r"^expert_bias is None"):
        layer(x)
    layer.expert_bias = np.zeros(8, np.float32)
    layer.expert_bias[5] = NAN
    with pytest.raises(ValueError, match=r"^expert_bias must be finite"):
        layer(x)
    layer = moe.SparseMoE(16, 8, 8, 2, n_shared_experts=1, shared_expert_gate=True)
    layer.shared_gate_weight = None
    with pytest.raises(ValueError, match=r"^shared_gate_weight is None"):
        layer(x)
    layer = moe.SparseMoE(16, 8, 8, 2, n_shared_experts=1)
    layer.shared_w_down = None
    with pytest.raises(ValueError, match=r"shared expert weights are missing"):
        layer(x)


def test_layer_bad_options_set_after_construction(make):
    x = make.normal(4, 16)
    layer = moe.SparseMoE(16, 8, 8, 2)
    layer.top_k = 9
    with pytest.raises(ValueError, match=r"^top_k must be in 1\.\.8"):
        layer(x)
    layer.top_k = 2
    layer.activation = "tanh"
    with pytest.raises(ValueError, match=r"^activation must be one of"):
        layer(x)


def test_shape_defining_attributes_are_read_only(make, tmp_path):
    # n_experts = 400 used to be accepted: the forward still ran, and save() then wrote a
    # file moe.load rejected; d_model = 32 gave "x must have shape (-1, 16)"
    layer = moe.SparseMoE(16, 8, 8, 2)
    for name, value in (("n_experts", 400), ("d_model", 32), ("d_ff", 4), ("dtype", "float16"),
                        ("n_shared_experts", 1), ("lora_rank", 2)):
        with pytest.raises(AttributeError, match=rf"^{name} of a SparseMoE is fixed when the "
                                                 "layer is built"):
            setattr(layer, name, value)
    layer.save(tmp_path / "l.safetensors")  # still consistent
    x = make.normal(3, 16)
    np.testing.assert_array_equal(moe.load(tmp_path / "l.safetensors")(x), layer(x))
    others = ((moe.SoftMoE(16, 8, 4), "n_experts"), (moe.PEER(16, 4, 2, 2), "n_sub_keys"),
              (moe.MultiHeadMoE(16, 2, 8, 4, 2), "d_model"),
              (moe.lora.MultiLoRA(16, 8, 2, 2), "rank"))
    for other, name in others:
        with pytest.raises(AttributeError, match=rf"^{name} of a {type(other).__name__} is "
                                                 "fixed"):
            setattr(other, name, 5)


@pytest.mark.parametrize("call", [
    lambda: moe.route(np.zeros((3, 4)), 2, routed_scaling=1e308),
    lambda: moe.SparseMoE(16, 8, 8, 2, routed_scaling=-1e39),
    lambda: moe.SparseMoE(16, 8, 8, 2, activation="swiglu-oai", swiglu_alpha=1e300),
])
def test_options_beyond_float32_are_rejected(call):
    # routed_scaling=1e308 is finite in float64 but made every weight inf
    with pytest.raises(ValueError, match=r"must be a finite number within float32's range"):
        call()


def test_update_expert_bias_refuses_to_overflow():
    bias = np.array([0.0, 3.0e38, -1.0, 0.5], np.float32)
    before = bias.copy()
    with pytest.raises(ValueError, match=r"^rate=3e\+38 would make bias\[1\] non-finite"):
        moe.update_expert_bias(bias, [0, 0, 9, 9], 3e38)  # bias[1] + 3e38 overflows float32
    np.testing.assert_array_equal(bias, before)  # untouched
    with pytest.raises(ValueError, match=r"^rate=1e\+308 would make bias\[0\] non-finite"):
        moe.update_expert_bias(bias, [0, 0, 9, 9], 1e308)  # the float64 step overflows float32
    np.testing.assert_array_equal(bias, before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_weights_are_named_when_packed(make, dtype, bad):
    # a NaN in w_down made every output row it touched NaN, silently
    x = make.normal(5, 16)
    layer = moe.SparseMoE(16, 8, 4, 2, dtype=dtype, n_shared_experts=1)
    w = moe.bfloat16_to_float32(layer.w_down) if dtype == "bfloat16" else \
        layer.w_down.astype(np.float32)
    w[2, 5, 3] = bad
    layer.w_down = w
    with pytest.raises(ValueError, match=r"^w_down must be finite, got (nan|inf) at index "
                                         r"\(2, 5, 3\)"):
        layer(x)
    layer.w_down = np.nan_to_num(w, nan=0.0, posinf=0.0)
    w = layer.shared_w_up.astype(np.float32) if dtype != "bfloat16" else \
        moe.bfloat16_to_float32(layer.shared_w_up)
    w[7, 1] = bad
    layer.shared_w_up = w
    with pytest.raises(ValueError, match=r"^shared_w_up must be finite, got .* at index "
                                         r"\(7, 1\)"):
        layer(x)
    g = make.normal(4, 8, 16)
    g[1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"^w_gate must be finite, got .* at index \(1, 0, 0\)"):
        moe.pack_experts(g, make.normal(4, 8, 16), make.normal(4, 16, 8), dtype=dtype)
    lora = moe.lora.MultiLoRA(16, 8, 2, 2)
    lora.lora_a = np.full((2, 2, 16), bad, np.float32)
    with pytest.raises(ValueError, match=r"^lora_a must be finite"):
        lora(x, np.zeros(5, np.int32))


def test_dispatch_refuses_a_request_the_machine_cannot_meet():
    # 2**31 - 1 experts with no tokens grew to 22 GB and was OOM-killed (offsets are
    # (n_experts + 1,) int64); now a MemoryError that names n_experts
    with pytest.raises(MemoryError, match=r"^n_experts=2147483647 needs 32\.0 GiB"):
        if moe._api.available_memory() is None or moe._api.available_memory() >= 2**35:
            pytest.skip("this machine has the memory for it")
        moe.dispatch(np.empty((0, 16), np.float32), np.empty((0, 2), np.int32), 2**31 - 1)


# ---- moe._C: the memory-safety net ---------------------------------------------------------

def _pack(w_gate, w_up, w_down):
    return _C.pack_experts(w_gate=w_gate, w_up=w_up, w_down=w_down, dtype=0)


def _c_calls(make):
    """Valid arguments for every _C function (keywords), and the names of its array
    arguments."""
    T, E, k, d, F, N = 6, 4, 2, 8, 5, 9
    f32 = lambda *s: make.normal(*s)  # noqa: E731
    ids = make.expert_ids(T, k, E)
    return {
        "router_logits": (dict(x=f32(T, d), router_weight=f32(E, d)), ["x", "router_weight"]),
        "route": (dict(logits=make.logits(T, E), top_k=k, scoring=0, renormalize=True,
                       routed_scaling=1.0, expert_bias=f32(E), n_groups=2, topk_groups=1,
                       capacity_factor=0.0), ["logits", "expert_bias"]),
        "update_expert_bias": (dict(bias=f32(E).astype(np.float64),
                                    counts=np.arange(E, dtype=np.int64), rate=0.1),
                               ["bias", "counts"]),
        "dispatch": (dict(x=f32(T, d), expert_ids=ids, n_experts=E), ["x", "expert_ids"]),
        "combine": (dict(y=f32(N, d), position=make.rng.integers(-1, N, size=(T, k)),
                         weights=f32(T, k)), ["y", "position", "weights"]),
        "pack_experts": (dict(w_gate=f32(E, F, d), w_up=f32(E, F, d), w_down=f32(E, d, F),
                              dtype=0), ["w_gate", "w_up", "w_down"]),
        "ffn_grouped": (dict(x=f32(N, d), token_index=None, offsets=np.array([0, 3, 3, 7, N]),
                             experts=_pack(f32(E, F, d), f32(E, F, d), f32(E, d, F)),
                             activation=0), ["x", "offsets"]),
        "layer_forward": (dict(x=f32(T, d), router_weight=f32(E, d),
                               experts=_pack(f32(E, F, d), f32(E, F, d), f32(E, d, F)),
                               top_k=k, activation=0, expert_bias=f32(E), scoring=2,
                               renormalize=True, routed_scaling=1.0, n_groups=2, topk_groups=1,
                               capacity_factor=0.0,
                               shared_experts=_pack(f32(1, F, d), f32(1, F, d), f32(1, d, F)),
                               shared_gate_weight=f32(d)),
                          ["x", "router_weight", "expert_bias", "shared_gate_weight"]),
    }


def _call(func, args):
    fn = getattr(_C, func)
    return fn(**args)


def _replaced(args, changes):
    """A copy of a _c_calls argument set (dict or list) with some arguments replaced."""
    out = dict(args)
    for key, value in changes.items():
        out[key] = value
    return out


def _required(func):
    """The arguments of a keyword _C function that have no default (from its signature)."""
    params = inspect.signature(getattr(_C, func)).parameters.values()
    return [p.name for p in params if p.default is p.empty]


def _other_dtype(a):
    return {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.float32,
            np.dtype(np.int64): np.int32, np.dtype(np.int32): np.int64}[a.dtype]


def _non_contiguous(a):
    if a.ndim >= 2:
        return np.asfortranarray(a)
    return np.repeat(a, 2)[::2]


C_FUNCS = sorted(["router_logits", "route", "update_expert_bias", "dispatch", "combine",
                  "pack_experts", "ffn_grouped", "layer_forward"])


# arguments read through their strides (views of any non-negative strides are fine)
_STRIDED_ARGS = {("pack_experts", "w_gate"), ("pack_experts", "w_up"),
                 ("pack_experts", "w_down")}


@pytest.mark.parametrize("func", C_FUNCS)
def test_c_functions_reject_bad_arrays(make, func):
    args, arrays = _c_calls(make)[func]
    fn = getattr(_C, func)
    copies = {i: a.copy() for i, a in args.items() if isinstance(a, np.ndarray)}
    _call(func, _replaced(args, copies))  # valid as given
    for i in arrays:
        a = args[i]
        if (func, i) in _STRIDED_ARGS:
            _call(func, _replaced(args, {i: _non_contiguous(a)}))  # a view: taken
            # (tests/test_backward.py::test_strided_expert_weights checks what it computes)
        bad_cases = [
            (TypeError, r"must be a numpy\.ndarray", a.tolist()),
            (TypeError, r"must be a numpy\.ndarray", "not an array"),
            (TypeError, r"must have dtype", a.astype(_other_dtype(a))),
            (TypeError, r"must have dtype", a.astype(np.complex64)),
        ] + ([] if (func, i) in _STRIDED_ARGS else [
            (ValueError, r"must be a C-contiguous, aligned", _non_contiguous(a))]) + [
            (ValueError, r"must be a C-contiguous, aligned", a.astype(a.dtype.newbyteorder())),
            (ValueError, r"must be a C-contiguous, aligned", make.unaligned(a)),
            (ValueError, r"must have \d dimensions", a[None]),
            (ValueError, r"must have \d dimensions", a.reshape(-1)[:1].reshape(())),
        ]
        for exc, pattern, bad in bad_cases:
            with pytest.raises(exc, match=pattern):
                _call(func, _replaced(args, {i: bad}))
    assert _required(func)
    for name in _required(func):  # each required argument left out
        with pytest.raises(TypeError, match=name):
            fn(**{key: v for key, v in args.items() if key != name})
    with pytest.raises(TypeError):
        fn(*args.values(), *([None] * 16))  # more arguments than the function takes
    with pytest.raises(TypeError, match="keyword argument"):
        fn(**args, not_an_argument=None)


def test_c_functions_reject_mismatched_shapes(make):
    calls = _c_calls(make)

    def bad(func, i, value, pattern, exc=ValueError):
        with pytest.raises(exc, match=pattern):
            _call(func, _replaced(calls[func][0], {i: value}))

    bad("router_logits", "router_weight", make.normal(4, 7),
        r"^router_weight must have shape \(-?\d+, 8\)")
    bad("route", "expert_bias", make.normal(5), r"^expert_bias must have shape \(4\), got \(5\)")
    bad("update_expert_bias", "counts", np.arange(5), r"^counts must have shape \(4\), got \(5\)")
    bad("dispatch", "expert_ids", make.expert_ids(5, 2, 4),
        r"^expert_ids must have shape \(6, -1\)")
    bad("combine", "weights", make.normal(6, 3),
        r"^weights must have shape \(6, 2\), got \(6, 3\)")
    bad("pack_experts", "w_gate", make.normal(4, 6, 8), r"^w_gate must have shape \(4, 5, 8\)")
    bad("pack_experts", "w_down", make.normal(4, 5, 8), r"^w_down must have shape \(4, 8, 5\)")
    bad("pack_experts", "w_up", make.normal(4, 5), r"^w_up must have 3 dimensions")
    bad("ffn_grouped", "x", make.normal(9, 7), r"^x must have shape \(-1, 8\), got \(9, 7\)")
    bad("ffn_grouped", "offsets", np.array([0, 9]), r"^offsets must have shape \(5\), got \(2\)")
    bad("ffn_grouped", "token_index", np.arange(3),
        r"^offsets must start at 0 and end at n_rows=3")
    bad("ffn_grouped", "experts", make.normal(4, 5, 8), r"^experts must be packed experts",
        TypeError)
    bad("layer_forward", "router_weight", make.normal(4, 7), r"^router_weight must have shape \(4, 8\)")
    bad("layer_forward", "router_weight", make.normal(3, 8), r"^router_weight must have shape \(4, 8\)")
    bad("layer_forward", "expert_bias", make.normal(3), r"^expert_bias must have shape \(4\)")
    bad("layer_forward", "shared_gate_weight", make.normal(7), r"^shared_gate_weight must have shape \(8\)")
    bad("layer_forward", "shared_experts", make.normal(8, 6), r"^shared_experts must be packed", TypeError)
    bad("layer_forward", "experts", None, r"^experts must be packed experts", TypeError)
    bad("layer_forward", "x", make.normal(6, 7), r"^x must have shape \(-1, 8\)")

def test_c_functions_reject_bad_values(make):
    calls = _c_calls(make)

    def bad(func, changes, pattern, exc=ValueError):
        with pytest.raises(exc, match=pattern):
            _call(func, _replaced(calls[func][0], changes))

    logits = calls["route"][0]["logits"]
    nan_logits = logits.copy()
    nan_logits[1, 1] = NAN
    bad("route", {"logits": nan_logits}, r"^logits must be finite")
    bad("route", {"top_k": 0}, r"^top_k must be in 1\.\.n_experts=4")
    bad("route", {"top_k": 5}, r"^top_k must be in 1\.\.n_experts=4")
    bad("route", {"top_k": 2**40}, r"integer", OverflowError)
    bad("route", {"top_k": 2.0}, r"integer", TypeError)
    bad("route", {"scoring": 3}, r"^scoring code must be in 0\.\.2")
    bad("route", {"scoring": -1}, r"^scoring code must be in 0\.\.2")
    bad("route", {"n_groups": 3}, r"^n_groups must divide n_experts=4")
    bad("route", {"n_groups": 0}, r"^n_groups must divide n_experts=4")
    bad("route", {"n_groups": -2}, r"^n_groups must divide n_experts=4")
    bad("route", {"topk_groups": 3}, r"^topk_groups must be in 1\.\.n_groups=2")
    bad("route", {"topk_groups": 0}, r"^topk_groups must be in 1\.\.n_groups=2")
    bad("route", {"top_k": 3, "n_groups": 2, "topk_groups": 1},
        r"^topk_groups must be in 1\.\.n_groups=2 .*top_k=3")
    bias = calls["route"][0]["expert_bias"].copy()
    bias[0] = INF
    bad("route", {"expert_bias": bias}, r"^expert_bias must be finite")
    bad("route", {"logits": np.ones((3, 0))}, r"^logits must have 1\.\.2\^31-1 experts")

    ids = calls["dispatch"][0]["expert_ids"].copy()
    for value in (4, -2, 2**31 - 1, -(2**31)):
        ids_bad = ids.copy()
        ids_bad[2, 1] = value
        bad("dispatch", {"expert_ids": ids_bad},
            rf"^expert_ids must be in \[0, n_experts=4\) or -1, got {value} at token 2, slot 1")
    bad("dispatch", {"n_experts": 0}, r"^n_experts must be >= 1")
    bad("dispatch", {"n_experts": -5}, r"^n_experts must be >= 1")

    pos = calls["combine"][0]["position"].copy()
    for value in (9, -2, 2**62, -(2**62)):
        pos_bad = pos.copy()
        pos_bad[3, 0] = value
        bad("combine", {"position": pos_bad}, rf"^position must be in \[0, n_rows=9\) or -1, "
                                              rf"got {value} at token 3, slot 0")

    for offsets in ([1, 3, 3, 7, 9], [0, 3, 3, 7, 8], [0, 3, 3, 7, 10], [0, 5, 3, 7, 9],
                    [0, -4, 3, 7, 9], [0, 2**62, 3, 7, 9]):
        bad("ffn_grouped", {"offsets": np.array(offsets, np.int64)}, r"^offsets must")
    bad("ffn_grouped", {"activation": 8}, r"^activation code must be in 0\.\.7")
    bad("ffn_grouped", {"activation": -1}, r"^activation code must be in 0\.\.7")
    bad("ffn_grouped", {"activation": 5},
        r"^activation is not gated but the experts were packed with")
    for ti in ([0, 1, 2, 3, 4, 5, 0, 1, 9], [0, 1, 2, 3, 4, 5, 0, 1, -1]):
        bad("ffn_grouped", {"token_index": np.array(ti, np.int64)},
            r"^token_index must be in \[0, n_tokens=9\)")
    bad("ffn_grouped", {"token_index": np.zeros(4, np.int64)},
        r"^offsets must start at 0 and end at n_rows=4")
    bad("pack_experts", {"dtype": 6}, r"^dtype code must be in 0\.\.5")
    bad("pack_experts", {"dtype": 3}, r"^w_up must have dtype int8", TypeError)
    bad("pack_experts", {"dtype": 5, "group_size": 64}, r"^group_size must be 32 for mxfp4")
    bad("pack_experts", {"w_gate": None, "dtype": 1}, r"^w_up must have dtype uint16", TypeError)

    ro = calls["update_expert_bias"][0]["bias"].copy()
    ro.flags.writeable = False
    bad("update_expert_bias", {"bias": ro}, r"^bias must be a C-contiguous, aligned, writable")

    x = calls["layer_forward"][0]["x"].copy()
    x[0, 0] = NAN
    bad("layer_forward", {"x": x}, r"^logits must be finite.*x @ router_weight")
    bad("layer_forward", {"top_k": 0}, r"^top_k must be in 1\.\.n_experts=4")
    bad("layer_forward", {"top_k": 5}, r"^top_k must be in 1\.\.n_experts=4")
    bad("layer_forward", {"activation": 8}, r"^activation code must be in 0\.\.7")
    bad("layer_forward", {"activation": 5}, r"^activation is not gated but the experts were packed")
    bad("layer_forward", {"scoring": 3}, r"^scoring code must be in 0\.\.2")
    bad("layer_forward", {"n_groups": 3}, r"^n_groups must divide n_experts=4")
    bad("layer_forward", {"topk_groups": 3}, r"^topk_groups must be in")
    other = _pack(make.normal(4, 5, 6), make.normal(4, 5, 6), make.normal(4, 6, 5))
    bad("layer_forward", {"experts": other}, r"^x must have shape \(-1, 6\)")
    bad("layer_forward", {"shared_experts": other}, r"^the packed experts do not match")

_FUZZ_CHILD = textwrap.dedent("""
    # Random garbage into every moe._C function: each call must either work or raise
    # TypeError / ValueError / OverflowError; anything else (or a crash) fails the test.
    import sys
    import numpy as np
    from moe import _C

    rng = np.random.default_rng(int(sys.argv[1]))
    # keyword names
    funcs = {"router_logits": ["x", "router_weight"],
             "route": ["logits", "top_k", "scoring", "renormalize", "routed_scaling",
                       "expert_bias", "n_groups", "topk_groups", "capacity_factor"],
             "update_expert_bias": ["bias", "counts", "rate"],
             "dispatch": ["x", "expert_ids", "n_experts"],
             "combine": ["y", "position", "weights"],
             "pack_experts": ["w_gate", "w_up", "w_down", "dtype"],
             "ffn_grouped": ["x", "token_index", "offsets", "experts", "activation"],
             "layer_forward": ["x", "router_weight", "experts", "top_k", "activation",
                               "expert_bias", "scoring", "renormalize", "routed_scaling",
                               "n_groups", "topk_groups", "capacity_factor",
                               "shared_experts", "shared_gate_weight"]}
    ints = [-(2**31), -2, -1, 0, 1, 2, 3, 4, 7, 2**31, 2**63]

    def array():
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(s) for s in rng.integers(0, 6, size=ndim))
        dtype = rng.choice(["float32", "float64", "int32", "int64", "int8", "bool"])
        if dtype in ("float32", "float64"):
            a = rng.standard_normal(shape).astype(dtype)
            if a.size and rng.random() < 0.2:
                a.flat[0] = rng.choice([np.nan, np.inf, -np.inf])
        else:
            a = rng.integers(-3, 10, size=shape).astype(dtype)
        r = rng.random()
        if r < 0.1 and a.ndim >= 2:
            a = np.asfortranarray(a)
        elif r < 0.2 and a.ndim >= 1:
            a = a[::-1]
        elif r < 0.25:
            a.flags.writeable = False
        return a

    def value():
        r = rng.random()
        if r < 0.6:
            return array()
        if r < 0.8:
            return ints[int(rng.integers(len(ints)))]
        return [None, 0.5, -1.0, float("nan"), "x", [1, 2], True][int(rng.integers(7))]

    raised = ok = 0
    for it in range(int(sys.argv[2])):
        name = list(funcs)[int(rng.integers(len(funcs)))]
        spec = funcs[name]
        # now and then one argument too few or too many
        more = int(rng.integers(-1, 2)) if rng.random() < 0.05 else 0
        names = spec[:more] if more < 0 else spec + ["extra"] * more
        kwargs = {key: value() for key in names}
        try:
            getattr(_C, name)(**kwargs)
            ok += 1
        except (TypeError, ValueError, OverflowError):
            raised += 1
    print("fuzz", ok, raised)
""")


def test_c_functions_survive_random_garbage(tmp_path):
    proc = childproc.python(_FUZZ_CHILD, "12345", "3000", cwd=tmp_path)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("fuzz")


def test_process_survives_and_still_works(make):
    # after all the bad calls above (same process), valid calls still give right answers
    from moe import reference
    from tolerances import assert_close
    logits = make.logits(20, 8)
    res = moe.route(logits, 2)
    assert np.array_equal(res.expert_ids, reference.route(logits, 2)["expert_ids"])
    layer = make.layer(16, 8, 8, 2)
    x = make.normal(5, 16)
    assert_close(layer(x), reference.layer_forward(layer, x)[0])
