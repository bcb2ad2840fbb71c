"""bf16 compute (issue 3, item 4): SparseMoE(dtype="bfloat16", compute_dtype="bfloat16")
rounds the expert FFNs' inputs -- the routed rows and the hidden activations -- to bfloat16
and multiplies bf16 pairs with float32 accumulation (VDPBF16PS on AVX512-BF16, two exact
FMAs elsewhere).  Checked on every kernel set this CPU runs (MOE_ISA children, including
avx512sim: the AVX-512 tiles built for AVX2) against moe.reference with the same roundings,
by the 2x-naive rule; bitwise for any thread count; bad configurations raise.
"""
import json
import os

import numpy as np
import pytest

import moe
from moe import reference
from childproc import child_env
from test_cpu_kernels import available_isas, decoded, naive_matmul32, run_child
from tolerances import assert_within_naive

from moe._C import GATED_ACTIVATIONS as GATED  # noqa: E402

# (name, d_model, d_ff, n_experts, top_k, n_tokens, options): small and odd-shaped cases --
# E = 1, top_k = E, one token, d_model = 2, a many-expert layer, shared experts, biases,
# expert groups of more than 32 rows.
CASES = [
    ("swiglu", 64, 96, 8, 2, 37, {}),
    ("one-token", 32, 48, 4, 2, 1, {}),
    ("one-expert", 18, 34, 1, 1, 20, {}),
    ("top-k-all", 16, 22, 3, 3, 11, {}),
    ("tiny", 2, 2, 2, 1, 5, {}),
    ("gelu", 40, 70, 6, 2, 30, {"activation": "gelu"}),
    ("relu", 24, 36, 5, 1, 19, {"activation": "relu"}),
    ("geglu-biases", 32, 40, 4, 2, 25, {"activation": "geglu", "expert_biases": True}),
    ("deepseek", 48, 64, 16, 3, 40, {"scoring": "sigmoid", "expert_bias": True,
                                     "n_groups": 4, "topk_groups": 2, "routed_scaling": 2.5,
                                     "n_shared_experts": 1, "shared_d_ff": 32}),
    ("many-experts", 16, 8, 256, 2, 64, {}),
    # ~100 rows an expert: whole 32-row AMX panels (tiles stored straight into the output),
    # a part one of more than 16 rows, and k in whole tiles
    ("tiles", 64, 128, 4, 2, 200, {}),
    ("tiles-tail", 80, 72, 3, 2, 150, {"activation": "geglu"}),
]

_CHILD = r"""
import json, sys
import numpy as np
import moe
sys.path.insert(0, sys.argv[3])
from test_bf16_compute import build
out = {}
for case in json.loads(sys.argv[1]):
    layer, x = build(*case)
    out[case[0]] = layer(x)
np.savez(sys.argv[2], **out)
print(moe._C.build_info()["isa"])
"""


def build(name, d, F, E, k, T, opts):
    """A case's layer and input, from fixed seeds (the children build the same ones)."""
    layer = moe.SparseMoE(d, F, E, k, dtype="bfloat16", compute_dtype="bfloat16", seed=7,
                          **opts)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((T, d)).astype(np.float32)
    if opts.get("expert_biases"):
        for n in ("b_gate", "b_up", "b_down"):
            setattr(layer, n, rng.standard_normal(getattr(layer, n).shape).astype(np.float32))
    return layer, x


def bf16_round32(a):
    return reference.round_bfloat16(a).astype(np.float32)


def naive_ffn_bf16(x, w_gate, w_up, w_down, activation, biases=(None, None, None)):
    """The naive computation at this precision: inputs rounded to bf16, schoolbook float32
    matmuls, the activation in float32, h rounded to bf16."""
    bg, bu, bd = biases
    x = bf16_round32(x)
    gate = naive_matmul32(x, w_gate) + (0 if bg is None else bg) if activation in GATED \
        else None
    up = naive_matmul32(x, w_up) + (0 if bu is None else bu)
    h = bf16_round32(reference.activate(activation, gate, up).astype(np.float32))
    return naive_matmul32(h, w_down) + (0 if bd is None else bd)


def naive_layer_bf16(layer, x, routing):
    act = layer.activation
    wg, wu, wd = (decoded(getattr(layer, n), "bfloat16") for n in ("w_gate", "w_up", "w_down"))
    ids, w = routing["expert_ids"], routing["weights"].astype(np.float32)
    ys = np.zeros(ids.shape + (layer.d_model,), np.float32)
    for e in np.unique(ids[ids >= 0]):
        rows, slots = np.nonzero(ids == e)
        biases = (None, None, None)
        if layer.use_expert_biases:
            biases = (layer.b_gate[e], layer.b_up[e], layer.b_down[e])
        ys[rows, slots] = naive_ffn_bf16(x[rows], wg[e] if act in GATED else None, wu[e],
                                         wd[e], act, biases)
    out = np.zeros_like(x)
    for j in range(ids.shape[1]):
        out += w[:, j, None] * ys[:, j]
    if layer.n_shared_experts:
        sg, su, sd = (decoded(getattr(layer, n), "bfloat16")
                      for n in ("shared_w_gate", "shared_w_up", "shared_w_down"))
        out += naive_ffn_bf16(x, sg, su, sd, act)
    return out


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16", "avx512sim", "amx"])
def test_bf16_compute_matches_reference(tmp_path, isa):
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    path = tmp_path / "out.npz"
    got_isa = run_child(_CHILD, json.dumps(CASES), path, os.path.dirname(__file__),
                        env=child_env(MOE_ISA=isa)).stdout.strip()
    assert got_isa == isa
    outs = np.load(path)
    pool = ([], [], [])
    for case in CASES:
        layer, x = build(*case)
        ref, routing = reference.layer_forward(layer, x)
        ours = outs[case[0]]
        assert ours.shape == x.shape and ours.dtype == np.float32
        # the same bf16 roundings as the reference: much closer to it than to float32 compute
        fp32_layer, _ = build(*case)
        object.__setattr__(fp32_layer, "compute_dtype", "float32")
        ref32, _ = reference.layer_forward(fp32_layer, x)
        err = np.sqrt(np.mean((ours - ref) ** 2))
        gap = np.sqrt(np.mean((ref32 - ref) ** 2))
        assert err < 0.1 * gap, f"{isa} {case[0]}: error {err:.3g} vs the fp32 gap {gap:.3g}"
        for p, a in zip(pool, (ours, naive_layer_bf16(layer, x, routing), ref)):
            p.append(a)
    assert_within_naive(*pool, what=f"MOE_ISA={isa} bf16 compute")


@pytest.mark.parametrize("T, d, F", [(1, 64, 96), (13, 64, 96), (300, 64, 96),
                                     (300, 288, 400)])
def test_bf16_compute_bitwise_for_any_thread_count(T, d, F):
    # (288, 400: the amx set's k blocks, several per panel)
    layer = moe.SparseMoE(d, F, 8, 2, dtype="bfloat16", compute_dtype="bfloat16", seed=3,
                          n_shared_experts=1)
    x = np.random.default_rng(T).standard_normal((T, d)).astype(np.float32)
    outs = []
    before = moe.get_num_threads()
    try:
        for n in (1, 2, 3):
            moe.set_num_threads(n)
            outs.append(layer(x))
    finally:
        moe.set_num_threads(before)
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    # batch invariance: a token's output does not depend on the others
    np.testing.assert_array_equal(layer(x[-1:]), outs[0][-1:])


def test_bf16_compute_nan_stays_in_its_row():
    # (a layer refuses NaN input at the router: the grouped FFN takes it)
    rng = np.random.default_rng(0)
    w = [moe.float32_to_bfloat16(rng.standard_normal(s).astype(np.float32))
         for s in ((3, 48, 32), (3, 48, 32), (3, 32, 48))]
    packed = moe.pack_experts(*w, dtype="bfloat16", compute_dtype="bfloat16")
    assert packed.compute_dtype == "bfloat16"
    x = rng.standard_normal((9, 32)).astype(np.float32)
    x[4, 7] = np.nan
    y = moe.expert_ffn(x, [0, 2, 6, 9], packed)
    assert np.isnan(y[4]).all()
    assert np.isfinite(np.delete(y, 4, axis=0)).all()
    ref = reference.expert_ffn(np.delete(x, 4, axis=0), [0, 2, 5, 8],
                               *(decoded(a, "bfloat16") for a in w),
                               compute_dtype="bfloat16")
    np.testing.assert_allclose(np.delete(y, 4, axis=0), ref, rtol=1e-4, atol=1e-4)


def test_bf16_compute_differs_from_fp32_activations():
    kw = dict(dtype="bfloat16", seed=5)
    a = moe.SparseMoE(64, 96, 8, 2, compute_dtype="bfloat16", **kw)
    b = moe.SparseMoE(64, 96, 8, 2, **kw)
    x = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    assert not np.array_equal(a(x), b(x))
    assert moe._C.experts_info(a.pack()._packed[0])["compute"] == moe.COMPUTE_DTYPES.index("bfloat16")
    assert moe._C.experts_info(b.pack()._packed[0])["compute"] == moe.COMPUTE_DTYPES.index("float32")


def test_bf16_compute_round_trips_through_save(tmp_path):
    layer = moe.SparseMoE(32, 48, 4, 2, dtype="bfloat16", compute_dtype="bfloat16", seed=2)
    moe.save(layer, tmp_path / "l.safetensors")
    back = moe.load(tmp_path / "l.safetensors")
    assert back.compute_dtype == "bfloat16"
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_array_equal(back(x), layer(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float32", compute_dtype="bfloat16"), "needs dtype='bfloat16'"),
    (dict(dtype="float16", compute_dtype="bfloat16"), "needs dtype='bfloat16'"),
    (dict(dtype="bfloat16", compute_dtype="float16"), "compute_dtype"),
    (dict(dtype="bfloat16", compute_dtype="bfloat16", lora_rank=4), "LoRA"),
])
def test_bf16_compute_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe.SparseMoE(32, 48, 4, 2, **kwargs)


@pytest.mark.parametrize("d, F, extra, match", [
    (33, 48, {}, "d_model"),
    (32, 47, {}, "d_ff"),
    (32, [48, 47, 48, 48], {}, "d_ff entries"),
    (32, 48, {"n_shared_experts": 1, "shared_d_ff": 17}, "shared_d_ff"),
])
def test_bf16_compute_needs_even_sizes(d, F, extra, match):
    with pytest.raises(ValueError, match=match):
        moe.SparseMoE(d, F, 4, 2, dtype="bfloat16", compute_dtype="bfloat16", **extra)


def test_pack_experts_checks_bf16_compute():
    g = np.zeros((2, 4, 6), np.float32)
    dn = np.zeros((2, 6, 4), np.float32)
    with pytest.raises(ValueError, match="bf16 compute needs bfloat16 weights"):
        moe._C.pack_experts(w_gate=g, w_up=g, w_down=dn, dtype=0,
                            compute=moe.COMPUTE_DTYPES.index("bfloat16"))
    gb = np.zeros((2, 4, 5), np.uint16)
    with pytest.raises(ValueError, match="even d_model"):
        moe._C.pack_experts(w_gate=gb, w_up=gb, w_down=np.zeros((2, 5, 4), np.uint16), dtype=1,
                            compute=moe.COMPUTE_DTYPES.index("bfloat16"))


def test_bf16_compute_exact_sums_are_bitwise():
    """Inputs whose products and sums are exact in float32 (small integers, halves): every
    kernel set's order of additions gives the same sums, so the output equals the reference
    bit for bit.  The shape runs the tile kernel's k blocks (d = 288: 128 + 16 pairs; d_ff =
    400: 128 + 72, a part step of 8 pairs) on whole and part 32-row panels, an empty expert
    and biases."""
    rng = np.random.default_rng(5)
    E, d, F = 3, 288, 400
    halves = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32)
    w_up = moe.float32_to_bfloat16(rng.choice(halves, (E, F, d)))
    w_down = moe.float32_to_bfloat16(rng.choice(halves, (E, d, F)))
    b_up = rng.integers(-8, 9, (E, F)).astype(np.float32) / 2
    b_down = rng.integers(-8, 9, (E, d)).astype(np.float32) / 2
    offsets = [0, 70, 70, 120]
    x = rng.integers(-2, 3, (120, d)).astype(np.float32)
    packed = moe.pack_experts(None, w_up, w_down, activation="relu", dtype="bfloat16",
                              compute_dtype="bfloat16", b_up=b_up, b_down=b_down)
    y = moe.expert_ffn(x, offsets, packed, activation="relu")
    ref = reference.expert_ffn(x, offsets, None, decoded(w_up, "bfloat16"),
                               decoded(w_down, "bfloat16"), activation="relu", b_up=b_up,
                               b_down=b_down, compute_dtype="bfloat16")
    assert np.abs(ref).max() > 256  # the hidden values needed rounding to bf16
    np.testing.assert_array_equal(y, ref.astype(np.float32))
