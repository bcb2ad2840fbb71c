"""moe.SparseMoE against moe.reference.layer_forward: output and routing.

Mixtral-, DeepSeek-V3- and Qwen2-style layers, capacity, every activation, input shapes and
dtypes, zero tokens, weight assignment and in-place edits; and batch invariance: a token's
output is the same bits alone, in any batch, at any position (also with MOE_ISA=scalar).
"""
import json
import textwrap

import numpy as np
import pytest

import moe
import childproc
from moe import reference
from tolerances import assert_close, assert_ids_equal, assert_int_equal, assert_scalar_close

from moe._C import ACTIVATIONS  # noqa: E402

MIXTRAL = dict(scoring="softmax", renormalize=True)
DEEPSEEK = dict(scoring="sigmoid", renormalize=True, expert_bias=True, n_groups=8,
                topk_groups=4, routed_scaling=2.5, n_shared_experts=1)
QWEN2 = dict(scoring="softmax", renormalize=False, n_shared_experts=1,
             shared_expert_gate=True)


def check_layer(layer, x):
    """Run the layer and the reference on x; compare the output and every routing field."""
    out, r = layer(x, return_routing=True)
    # the layer rounds float64 input to float32 first (documented); so does the oracle here
    xr = np.asarray(x, dtype=np.float32)
    ref_out, ref = reference.layer_forward(layer, xr)
    T = int(np.prod(xr.shape[:-1]))
    assert out.dtype == np.float32 and out.shape == xr.shape
    assert r.expert_ids.shape == (T, layer.top_k) and r.weights.shape == (T, layer.top_k)
    assert_ids_equal(r.expert_ids, ref["expert_ids"])
    assert_close(r.weights, ref["weights"], what="weights")
    assert_int_equal(r.counts, ref["counts"], "counts")
    assert r.n_dropped == ref["n_dropped"]
    assert_scalar_close(r.aux_loss, ref["aux_loss"], what="aux_loss")
    assert_scalar_close(r.z_loss, ref["z_loss"], what="z_loss")
    assert_close(out, ref_out, what="layer output")
    return out, r, ref_out, ref


def test_mixtral_style(make):
    layer = make.layer(64, 96, 8, 2, **MIXTRAL)
    out, r, _, _ = check_layer(layer, make.normal(200, 64))
    assert_close(r.weights.sum(axis=1), np.ones(200), what="renormalised weights")
    plain = layer(make.normal(3, 64))  # without return_routing: just the array
    assert isinstance(plain, np.ndarray) and plain.shape == (3, 64)


def test_deepseek_v3_style(make):
    d, E = 64, 64
    layer = make.layer(d, 32, E, 6, shared_d_ff=48, **DEEPSEEK)
    assert layer.expert_bias is not None and (layer.expert_bias != 0).all()
    x = make.normal(200, d)
    out, r, _, ref = check_layer(layer, x)
    assert_close(r.weights.sum(axis=1), np.full(200, 2.5), what="scaled weights")
    # the bias, the groups and the shared expert each change the answer
    bias = layer.expert_bias.copy()
    layer.expert_bias[:] = 0
    unbiased, r0 = layer(x, return_routing=True)
    assert (np.sort(r0.expert_ids, 1) != np.sort(r.expert_ids, 1)).any()
    layer.expert_bias[:] = bias
    groups = (r.expert_ids // (E // 8))
    assert max(len(set(row)) for row in groups.tolist()) <= 4
    flat = moe.route(x.astype(np.float64) @ layer.router_weight.T.astype(np.float64), 6,
                     scoring="sigmoid", expert_bias=bias)
    assert (np.sort(flat.expert_ids, 1) != np.sort(r.expert_ids, 1)).any()
    shared = moe.ffn(x, layer.shared_w_gate, layer.shared_w_up, layer.shared_w_down)
    layer.shared_w_down = np.zeros_like(layer.shared_w_down)
    assert_close(out - layer(x), shared, what="shared expert contribution")


def test_deepseek_two_shared_experts(make):
    layer = make.layer(32, 24, 16, 4, shared_d_ff=20,
                       **{**DEEPSEEK, "n_shared_experts": 2, "n_groups": 4, "topk_groups": 2})
    assert layer.shared_w_up.shape == (40, 32)
    check_layer(layer, make.normal(100, 32))


def test_qwen2_style_shared_expert_gate(make):
    layer = make.layer(48, 40, 12, 4, shared_d_ff=64, **QWEN2)
    assert layer.shared_gate_weight.shape == (1, 48)
    x = make.normal(150, 48)
    out, _, _, _ = check_layer(layer, x)
    layer.shared_gate_weight = -layer.shared_gate_weight
    out2, _, _, _ = check_layer(layer, x)
    assert not np.allclose(out, out2)
    # gate g and 1 - g: the two shared parts sum to the ungated shared expert
    routed_only = moe.SparseMoE(48, 40, 12, 4, scoring="softmax", renormalize=False)
    for name in ("router_weight", "w_gate", "w_up", "w_down"):
        setattr(routed_only, name, getattr(layer, name))
    shared = moe.ffn(x, layer.shared_w_gate, layer.shared_w_up, layer.shared_w_down)
    assert_close(out + out2 - 2 * routed_only(x), shared, what="sigmoid(g) + sigmoid(-g) = 1")


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax-after-topk"])
def test_capacity_factor(make, scoring):
    # capacity T*k/E = 50: unless all 8 experts get exactly 50, some assignment drops
    layer = make.layer(32, 24, 8, 2, scoring=scoring, capacity_factor=1.0)
    out, r, _, _ = check_layer(layer, make.normal(200, 32))
    assert r.n_dropped > 0 and r.counts.max() == 50
    assert (r.weights[r.expert_ids == -1] == 0).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(make, activation):
    layer = make.layer(37, 23, 6, 2, activation=activation, n_shared_experts=1,
                       shared_d_ff=19)
    assert (layer.w_gate is None) == (activation not in moe._C.GATED_ACTIVATIONS)
    check_layer(layer, make.normal(60, 37))


@pytest.mark.parametrize("options", [MIXTRAL, DEEPSEEK, QWEN2], ids=["mixtral", "deepseek",
                                                                    "qwen2"])
def test_input_shapes(make, options):
    d = 16
    layer = make.layer(d, 12, 8, 2, **options)
    x = make.normal(2, 3, d)
    out, r, _, _ = check_layer(layer, x)
    assert out.shape == (2, 3, d) and r.expert_ids.shape == (6, 2)
    assert np.array_equal(out, layer(x.reshape(6, d)).reshape(2, 3, d))
    # a 1-D x is one token: (d,) in, (d,) out, routing for one token
    one, r1 = layer(x[1, 2], return_routing=True)
    assert one.shape == (d,) and r1.expert_ids.shape == (1, 2)
    assert np.array_equal(one, out[1, 2])
    check_layer(layer, x[0, 1])
    check_layer(layer, make.normal(2, 2, 2, d))


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 3, 16)])
def test_zero_tokens(make, shape):
    layer = make.layer(16, 8, 6, 2, **DEEPSEEK | {"n_groups": 3, "topk_groups": 2,
                                                  "capacity_factor": 1.0})
    out, r = layer(np.empty(shape, np.float32), return_routing=True)
    assert out.shape == shape and out.dtype == np.float32
    assert r.expert_ids.shape == (0, 2) and r.weights.shape == (0, 2)
    assert_int_equal(r.counts, np.zeros(6, np.int64))
    assert r.n_dropped == 0


def test_float64_input(make):
    layer = make.layer(40, 24, 8, 2, **DEEPSEEK | {"n_groups": 4, "topk_groups": 2})
    x = make.normal(80, 40, dtype=np.float64)
    out, _, _, _ = check_layer(layer, x)
    assert out.dtype == np.float32
    assert np.array_equal(out, layer(x.astype(np.float32)))


def test_input_layouts(make):
    d = 24
    layer = make.layer(d, 16, 6, 2, **MIXTRAL)
    x = make.normal(50, d)
    want = layer(x)
    big = make.normal(100, 2 * d)
    big[::2, ::2] = x
    for variant in (np.asfortranarray(x), big[::2, ::2], make.DLPackOnly(x), x.tolist()):
        assert np.array_equal(layer(variant), want)


def test_torch_input(make):
    torch = pytest.importorskip("torch")
    layer = make.layer(24, 16, 6, 2, **QWEN2)
    x = make.normal(2, 5, 24)
    out = layer(torch.from_numpy(x))
    assert isinstance(out, np.ndarray) and np.array_equal(out, layer(x))
    layer.w_up = torch.from_numpy(layer.w_up.copy())  # weights may be tensors too
    assert isinstance(layer.w_up, np.ndarray) and np.array_equal(layer(x), out)


def test_unaligned_input(make):
    layer = make.layer(24, 16, 6, 2, **MIXTRAL)
    x = make.normal(50, 24)
    assert np.array_equal(layer(make.unaligned(x)), layer(x))


def test_unaligned_weight_assignment(make):
    layer = make.layer(24, 16, 6, 2, **MIXTRAL)
    x = make.normal(50, 24)
    want = layer(x)
    layer.w_up = make.unaligned(layer.w_up)
    assert np.array_equal(layer(x), want)


# ---- weights: assignment and in-place edits ------------------------------------------------

def test_assigning_a_new_weight_takes_effect(make):
    d, F, E = 32, 24, 8
    layer = make.layer(d, F, E, 2, **QWEN2)
    x = make.normal(60, d)
    before = layer(x)
    for name in ("w_down", "w_up", "w_gate", "router_weight", "shared_w_up",
                 "shared_gate_weight"):
        old = getattr(layer, name)
        new = make.normal(*old.shape, scale=float(np.std(old)))
        setattr(layer, name, new)
        assert getattr(layer, name) is new  # float32 C-contiguous: stored without a copy
        after, _, _, _ = check_layer(layer, x)
        assert not np.array_equal(after, before), name
        before = after
    # float64 and Fortran-ordered arrays are stored as float32 C-contiguous copies
    layer.w_down = np.asfortranarray(make.normal(E, d, F, scale=0.2, dtype=np.float64))
    assert layer.w_down.dtype == np.float32 and layer.w_down.flags.c_contiguous
    check_layer(layer, x)


def test_in_place_edits_take_effect(make):
    d, E = 32, 8
    layer = make.layer(d, 24, E, 2, **DEEPSEEK | {"n_groups": 4, "topk_groups": 2})
    x = make.normal(60, d)
    out0, r0 = layer(x, return_routing=True)
    layer.router_weight[:] = make.normal(E, d, scale=d ** -0.5)
    out1, r1, _, _ = check_layer(layer, x)
    assert not np.array_equal(r0.expert_ids, r1.expert_ids)
    # the FFN weights run from a packed copy: in-place edits need layer.pack()
    layer.w_gate[1:3] *= -1.5
    layer.w_down[...] = make.normal(*layer.w_down.shape, scale=0.2)
    layer.shared_w_gate[0] += 1.0
    assert np.array_equal(layer(x), out1)  # still the packed weights
    layer.pack()
    out2, _, _, _ = check_layer(layer, x)
    assert not np.array_equal(out1, out2)
    layer.expert_bias[:] = make.normal(E, scale=0.2)
    _, r3, _, _ = check_layer(layer, x)
    assert not np.array_equal(r3.expert_ids, r1.expert_ids)
    # an array assigned earlier stays live: editing it edits the layer
    w = make.normal(E, 24, d, scale=0.2)
    layer.w_up = w
    w[0] *= 2
    layer.pack()
    check_layer(layer, x)
    assert layer.w_up is w



def test_changing_an_option_takes_effect(make):
    """A call keeps its checked options until an attribute is assigned: every assignment
    (and a repack) is seen by the next call, and a bad value still raises."""
    d, E = 32, 8
    layer = make.layer(d, 24, E, 2, **DEEPSEEK | {"n_groups": 4, "topk_groups": 2})
    x = make.normal(40, d)
    before, _, _, _ = check_layer(layer, x)
    for name, value in (("top_k", 3), ("routed_scaling", 1.0), ("renormalize", False),
                        ("scoring", "softmax"), ("capacity_factor", 0.5),
                        ("activation", "geglu"), ("topk_groups", 3)):
        setattr(layer, name, value)
        after, _, _, _ = check_layer(layer, x)
        assert not np.array_equal(after, before), name
        before = after
    layer.top_k = E + 1
    with pytest.raises(ValueError, match="top_k"):
        layer(x)
    layer.top_k = 2
    check_layer(layer, x)
    # in-place edits of an option array are seen; the core checks the values
    layer.expert_bias[3] = np.nan
    with pytest.raises(ValueError, match=r"^expert_bias must be finite"):
        layer(x)
    layer.expert_bias[3] = 0.0
    check_layer(layer, x)
    # a copy (pickle / deepcopy) calls the same
    import copy
    assert np.array_equal(copy.deepcopy(layer)(x), layer(x))


WEIGHT_NAMES = ("router_weight", "w_gate", "w_up", "w_down", "expert_bias", "shared_w_gate",
                "shared_w_up", "shared_w_down", "shared_gate_weight")


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_wrong_shape_weight_raises(make, name):
    layer = make.layer(16, 12, 8, 2, expert_bias=True, n_shared_experts=1, shared_d_ff=10,
                       shared_expert_gate=True)
    x = make.normal(5, 16)
    want = layer(x)
    old = getattr(layer, name)
    for bad in (make.normal(*old.shape[:-1], old.shape[-1] + 1),
                make.normal(*old.shape[::-1]) if old.ndim > 1 and len(set(old.shape)) > 1
                else make.normal(*old.shape, 2),
                make.normal(*old.shape)[None]):
        with pytest.raises(ValueError, match=rf"^{name} must have shape \(.*\), got \("):
            setattr(layer, name, bad)
    with pytest.raises(TypeError, match=rf"^{name}"):
        setattr(layer, name, np.ones(old.shape, np.int32))
    assert getattr(layer, name) is old  # the failed assignment left the weight alone
    assert np.array_equal(layer(x), want)


# ---- batch invariance ----------------------------------------------------------------------

INVARIANCE_CONFIGS = {
    "mixtral": (8, 2, MIXTRAL),
    "deepseek": (16, 4, DEEPSEEK | {"n_groups": 4, "topk_groups": 2}),
    "qwen2": (6, 3, QWEN2 | {"activation": "geglu"}),
    "relu-after-topk": (12, 3, {"activation": "relu", "scoring": "softmax-after-topk"}),
}


@pytest.mark.parametrize("config", sorted(INVARIANCE_CONFIGS))
def test_batch_invariance(make, config):
    E, k, options = INVARIANCE_CONFIGS[config]
    d, F, N = 37, 23, 40
    layer = make.layer(d, F, E, k, **options)
    x = make.normal(N, d)
    full, rf = layer(x, return_routing=True)
    for n in range(1, N + 1):  # every prefix
        part, rp = layer(x[:n], return_routing=True)
        assert np.array_equal(part, full[:n]), f"batch of {n}"
        assert np.array_equal(rp.expert_ids, rf.expert_ids[:n])
        assert np.array_equal(rp.weights, rf.weights[:n])
    for i in range(N):  # every token alone
        assert np.array_equal(layer(x[i]), full[i]), f"token {i} alone"
    perm = make.rng.permutation(N)
    assert np.array_equal(layer(x[perm]), full[perm])
    others = make.normal(3 * N, d)
    for pos in (0, 1, 7, 31, 32, 33, 3 * N - 1):  # among other tokens, at many positions
        batch = others.copy()
        batch[pos] = x[5]
        assert np.array_equal(layer(batch)[pos], full[5]), f"position {pos}"
    # the same token repeated fills whole tiles with itself
    assert np.array_equal(layer(np.repeat(x[:1], 70, axis=0)), np.repeat(full[:1], 70, axis=0))


_ISA_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import moe
    cfg = json.loads(sys.argv[1])
    data = np.load(sys.argv[2])
    layer = moe.SparseMoE(cfg["d"], cfg["F"], cfg["E"], cfg["k"], **cfg["options"])
    for name in cfg["weights"]:
        setattr(layer, name, data[name])
    x = data["x"]
    full = layer(x)
    same = all(np.array_equal(layer(x[:n]), full[:n]) for n in range(1, len(x) + 1))
    same = same and all(np.array_equal(layer(x[i]), full[i]) for i in range(len(x)))
    np.save(sys.argv[3], full)
    print(json.dumps({"isa": moe._C.build_info()["isa"], "invariant": bool(same)}))
""")


@pytest.mark.parametrize("isa", ["scalar"])
def test_batch_invariance_with_forced_isa(make, tmp_path, isa):
    # results may differ across ISAs in the last bits; within one ISA they must not
    # depend on the batch, and they must still match the reference
    d, F, E, k = 37, 23, 16, 4
    options = DEEPSEEK | {"n_groups": 4, "topk_groups": 2, "shared_d_ff": 17}
    layer = make.layer(d, F, E, k, **options)
    x = make.normal(30, d)
    weights = ["router_weight", "w_gate", "w_up", "w_down", "expert_bias", "shared_w_gate",
               "shared_w_up", "shared_w_down"]
    np.savez(tmp_path / "in.npz", x=x, **{n: getattr(layer, n) for n in weights})
    cfg = dict(d=d, F=F, E=E, k=k, options=options, weights=weights)
    proc = childproc.python(_ISA_CHILD, json.dumps(cfg), tmp_path / "in.npz",
                            tmp_path / "out.npy", env=childproc.child_env(MOE_ISA=isa),
                            cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    assert report["invariant"]
    ref_out, _ = reference.layer_forward(layer, x)
    assert_close(np.load(tmp_path / "out.npy"), ref_out, what=f"layer with MOE_ISA={isa}")
