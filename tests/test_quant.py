"""Quantized expert weights (moe.quant; issue 23): int8, int4 and mxfp4 layers.

Every format against moe.reference.layer_forward of the same (quantized) layer, and bitwise
against its float32 twin (a float32 SparseMoE of the same config on the dequantized weights:
dequantization is exact, so the kernels give the fp32 kernel's bits) for several batch
sizes, both thread counts and forced kernel sets; odd sizes, tail groups, heterogeneous,
shared and empty experts, NaN input; batch / thread invariance; the exact dequantization
of every nibble and scale; round-to-nearest and calibrated quantization; save / load; bad
input; repr, config and copies.
"""
import copy
import json
import pickle
import textwrap

import childproc
import numpy as np
import pytest

import moe
from moe import reference
from moe._C import ACTIVATIONS
from moe._C import GATED_ACTIVATIONS as GATED
from moe.quant import quantize_weight

# (dtype, group_size): the formats of the acceptance matrix (group_size 0: one scale per row)
FORMATS = [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 0),
           ("mxfp4", 32)]
FORMAT_IDS = [f"{dt}-g{g or 'row'}" for dt, g in FORMATS]

# The e2m1 numbers of the OCP microscaling spec, by nibble (sign bit 3, exponent bits 2-1,
# mantissa bit 0) -- written out here, not taken from moe.quant.
OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def activation_param(act):
    return act


def quant_layer(make, d, F, E, k, dtype, group_size, activation="swiglu", **options):
    """A quantized SparseMoE from the test's rng; gpt-oss style (expert biases) for
    swiglu-oai; random (not zero) expert biases when there are any."""
    if activation == "swiglu-oai":
        options.setdefault("expert_biases", True)
    layer = make.layer(d, F, E, k, activation=activation, dtype=dtype, group_size=group_size,
                       **options)
    if layer.use_expert_biases:
        for name in ("b_gate", "b_up", "b_down"):
            setattr(layer, name, make.normal(*getattr(layer, name).shape, scale=0.1))
    if layer.use_router_bias:
        layer.router_bias = make.normal(layer.n_router, scale=0.1)
    return layer


def float_twin(layer):
    """A float32 SparseMoE with `layer`'s config and its weights dequantized."""
    cfg = dict(layer.config(), dtype="float32", shared_dtype="float32", group_size=None)
    twin = moe.SparseMoE(**cfg, init=False)
    for name in layer._weight_names():
        value = getattr(layer, name)
        if value is None:
            continue
        if isinstance(value, moe.QuantizedWeight):
            value = value.dequantize()
        elif value.dtype == np.uint16:  # bfloat16 bits (shared_dtype="bfloat16")
            value = moe.bfloat16_to_float32(value)
        setattr(twin, name, np.asarray(value, np.float32))
    return twin


def assert_ref_close(y, ref, what=""):
    ref = np.asarray(ref, np.float64)
    assert y.shape == ref.shape and y.dtype == np.float32
    atol = 1e-5 * float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=atol, err_msg=what)


def assert_same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32, what
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), (
        f"{what}: {int((a.view(np.uint32) != b.view(np.uint32)).sum())} of {a.size} "
        f"elements differ, max abs diff {np.nanmax(np.abs(a - b)):.3g}")


def check_layer(layer, x, twin=None, what=""):
    """layer(x) against the reference (rtol 1e-5) and bitwise against the float twin."""
    y = layer(x)
    ref, _ = reference.layer_forward(layer, np.asarray(x, np.float32))
    assert_ref_close(y, ref, what)
    twin = float_twin(layer) if twin is None else twin
    assert_same_bits(y, twin(x), f"{what} vs float32 twin")
    return y


# ---- 1. every format x activation x tokens x threads ------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("activation", [activation_param(a) for a in ACTIVATIONS])
def test_formats_activations(make, threads, fmt, activation):
    dtype, g = fmt
    # d 48 and F 40: with g 32 a full group and a tail group along both k's; g 64: one
    # partial group
    layer = quant_layer(make, 48, 40, 6, 2, dtype, g, activation)
    assert isinstance(layer.w_up, moe.QuantizedWeight) and layer.w_up.dtype == dtype
    assert layer.w_up.group_size == g
    twin = float_twin(layer)
    for T in (1, 8, 64):
        x = make.normal(T, 48)
        for n in (1, 2):
            moe.set_num_threads(n)
            check_layer(layer, x, twin, f"{dtype} g{g} {activation} T={T} threads={n}")


@pytest.mark.parametrize("fmt", [("int4", 32), ("mxfp4", 32), ("int8", 0)],
                         ids=["int4-g32", "mxfp4", "int8-row"])
def test_512_tokens(make, threads, fmt):
    dtype, g = fmt
    layer = quant_layer(make, 32, 16, 8, 2, dtype, g, "swiglu", n_shared_experts=1)
    twin = float_twin(layer)
    x = make.normal(512, 32)
    outs = []
    for n in (1, 2):
        moe.set_num_threads(n)
        outs.append(check_layer(layer, x, twin, f"{dtype} T=512 threads={n}"))
    assert_same_bits(outs[0], outs[1], "1 vs 2 threads")


# ---- 2. odd sizes, tail groups, heterogeneous / shared / empty experts, NaN --------------

@pytest.mark.parametrize("fmt", [("int4", 32), ("int4", 0), ("int4", 16), ("mxfp4", 32),
                                 ("int8", 32)],
                         ids=["int4-g32", "int4-row", "int4-g16", "mxfp4", "int8-g32"])
def test_odd_sizes_and_tail_groups(make, threads, fmt):
    dtype, g = fmt
    d, F = 37, 45  # odd k for gate / up (37) and down (45); 37 % 32, 45 % 32 and 45 % 16 tails
    layer = quant_layer(make, d, F, 5, 2, dtype, g, "swiglu")
    for name, k in (("w_gate", d), ("w_up", d), ("w_down", F)):
        w = getattr(layer, name)
        ngroups = 1 if g == 0 else -(-k // g)
        assert w.scales.shape[-1] == ngroups, name
        if dtype != "int8":
            assert w.values.shape[-1] == (k + 1) // 2, name
            assert not np.any(w.values[..., -1] >> 4), f"{name}: last byte's high nibble"
        else:
            assert w.values.shape[-1] == k
    twin = float_twin(layer)
    for T in (1, 13, 64):
        check_layer(layer, make.normal(T, d), twin, f"{dtype} g{g} d=37 F=45 T={T}")


@pytest.mark.parametrize("fmt", [("int4", 32), ("mxfp4", 32), ("int8", 0)],
                         ids=["int4-g32", "mxfp4", "int8-row"])
def test_heterogeneous_experts(make, fmt):
    dtype, g = fmt
    sizes = [45, 13, 0, 30, 1, 45]
    layer = quant_layer(make, 37, sizes, 6, 3, dtype, g, "swiglu")
    assert layer.expert_d_ff == tuple(sizes) and layer.w_up.shape == (6, 45, 37)
    twin = float_twin(layer)
    assert twin.expert_d_ff == tuple(sizes)
    x = make.normal(64, 37)
    check_layer(layer, x, twin, f"{dtype} d_ff={sizes}")
    # rows past an expert's size are ignored: changing them changes nothing
    w = layer.w_up.dequantize()
    w[1, 13:] = make.normal(32, 37)
    before = layer(x)
    layer.w_up = w
    assert_same_bits(layer(x), before, "rows past d_ff[e] edited")


@pytest.mark.parametrize("dtype", ["int4", "mxfp4"])
@pytest.mark.parametrize("shared_dtype", ["bfloat16", "int8", "float32", "float16", "int4"])
def test_shared_experts_shared_dtype(make, dtype, shared_dtype):
    layer = quant_layer(make, 40, 24, 4, 2, dtype, 32, "swiglu", n_shared_experts=2,
                        shared_d_ff=20, shared_expert_gate=True, shared_dtype=shared_dtype)
    assert layer.shared_dtype == shared_dtype
    if shared_dtype in moe.QUANT_DTYPES:
        assert isinstance(layer.shared_w_up, moe.QuantizedWeight)
        assert layer.shared_w_up.dtype == shared_dtype and layer.shared_w_up.shape == (40, 40)
    else:
        assert not isinstance(layer.shared_w_up, moe.QuantizedWeight)
    for T in (1, 8, 64):
        check_layer(layer, make.normal(T, 40), what=f"{dtype} shared {shared_dtype} T={T}")


@pytest.mark.parametrize("fmt", FORMATS[::2], ids=FORMAT_IDS[::2])
def test_empty_experts(make, fmt):
    dtype, g = fmt
    layer = quant_layer(make, 32, 24, 6, 2, dtype, g, "swiglu", router_bias=True)
    layer.router_bias = np.array([30.0, 30.0, -30.0, -30.0, -30.0, -30.0], np.float32)
    x = make.normal(40, 32)
    _, r = layer(x, return_routing=True)
    assert list(r.counts) == [40, 40, 0, 0, 0, 0]
    check_layer(layer, x, what=f"{dtype} experts 2..5 empty")
    check_layer(layer, x[:1], what=f"{dtype} one token")


@pytest.mark.parametrize("fmt", FORMATS[::2], ids=FORMAT_IDS[::2])
def test_nan_input(make, fmt):
    # NaN in x makes its router logits NaN: the layer refuses it, as the float32 twin does,
    # with the same message (naming the token), and the other tokens run as before
    dtype, g = fmt
    layer = quant_layer(make, 32, 24, 6, 2, dtype, g, "swiglu", n_shared_experts=1)
    twin = float_twin(layer)
    x = make.normal(16, 32)
    clean = layer(x)
    x[9, 5] = np.nan
    errors = []
    for which in (layer, twin):
        with pytest.raises(ValueError, match="token 9") as info:
            which(x)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    rest = [i for i in range(16) if i != 9]
    assert_same_bits(layer(x[rest]), clean[rest], "the finite tokens")


# ---- 3. determinism: batch composition, threads, kernel sets -----------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_token_alone_equals_token_in_batch(make, threads, fmt):
    dtype, g = fmt
    layer = quant_layer(make, 40, 36, 8, 2, dtype, g, "swiglu", n_shared_experts=1)
    assert_batch_invariant(layer, make.normal(64, 40), make.rng)


def assert_batch_invariant(layer, x, rng):
    """The same bits on 1 and 2 threads, for a token alone, the first 5 tokens and a
    permuted batch as in the whole batch x (64 tokens)."""
    moe.set_num_threads(1)
    full1 = layer(x)
    moe.set_num_threads(2)
    full2 = layer(x)
    assert_same_bits(full1, full2, "1 vs 2 threads")
    for i in (0, 17, 63):
        assert_same_bits(layer(x[i]), full2[i], f"token {i} alone vs in a batch of 64")
    assert_same_bits(layer(x[:5]), full2[:5], "the first 5 tokens as a batch")
    perm = rng.permutation(64)
    assert_same_bits(layer(x[perm]), full2[perm], "a permuted batch")


_ISA_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import moe
    data = np.load(sys.argv[1])
    x, ok = data["x"], True
    for dtype, g in json.loads(sys.argv[2]):
        q = moe.SparseMoE(37, 29, 6, 2, dtype=dtype, group_size=g, n_shared_experts=1,
                          seed=7)
        cfg = dict(q.config(), dtype="float32", shared_dtype="float32", group_size=None)
        f = moe.SparseMoE(**cfg, init=False)
        for n in q._weight_names():
            v = getattr(q, n)
            if v is not None:
                setattr(f, n, v.dequantize() if hasattr(v, "dequantize") else v)
        y = q(x)
        ok = ok and np.array_equal(y.view(np.uint32), f(x).view(np.uint32))
        ok = ok and all(np.array_equal(q(x[i]), y[i]) for i in (0, 5, len(x) - 1))
        np.save(sys.argv[3] + f"_{dtype}_{g}.npy", y)
    print(json.dumps({"isa": moe._C.build_info()["isa"], "ok": bool(ok)}))
""")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512sim", "avx512"])
def test_forced_kernel_set(make, tmp_path, isa):
    need = {"scalar": [], "avx2": ["avx2", "fma"], "avx512sim": ["avx2", "fma"],
            "avx512": ["avx512f", "avx512bw", "avx512vl"]}[isa]
    features = moe._C.build_info()["cpu_features"].split()
    if any(f not in features for f in need):
        pytest.skip(f"this CPU has no {isa}")
    x = make.normal(70, 37)
    np.savez(tmp_path / "in.npz", x=x)
    formats = [("int8", 0), ("int4", 32), ("mxfp4", 32)]
    proc = childproc.python(_ISA_CHILD, tmp_path / "in.npz", json.dumps(formats),
                            tmp_path / "out", env=childproc.child_env(MOE_ISA=isa),
                            cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    assert report["ok"], f"MOE_ISA={isa}: not the float twin's bits or not batch invariant"
    for dtype, g in formats:
        q = moe.SparseMoE(37, 29, 6, 2, dtype=dtype, group_size=g, n_shared_experts=1, seed=7)
        ref, _ = reference.layer_forward(q, x)
        assert_ref_close(np.load(tmp_path / f"out_{dtype}_{g}.npy"), ref, f"{dtype} {isa}")


# ---- 4. dequantization --------------------------------------------------------------------

def random_quantized(rng, dtype, shape, group_size, mx_scales=(0, 250)):
    """Random values (every nibble / byte) and finite scales of a weight of `shape`."""
    *lead, k = shape
    nbytes = k if dtype == "int8" else (k + 1) // 2
    values = rng.integers(0, 256, size=(*lead, nbytes)).astype(np.uint8)
    if dtype == "int8":
        values = values.view(np.int8)
    elif k % 2:
        values[..., -1] &= 0x0F
    ng = 1 if group_size == 0 else -(-k // group_size)
    if dtype == "mxfp4":
        scales = rng.integers(*mx_scales, size=(*lead, ng), endpoint=True).astype(np.uint8)
    else:  # float16 scales of either sign over a wide range, subnormal ones included
        mag = 2.0 ** rng.uniform(-20, 8, size=(*lead, ng))
        scales = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        scales.flat[0] = np.float16(2.0 ** -24)  # the smallest subnormal
    return values, scales


@pytest.mark.parametrize("fmt", FORMATS + [("int4", 16)], ids=FORMAT_IDS + ["int4-g16"])
@pytest.mark.parametrize("k", [33, 64, 7])
def test_dequantize_exact(rng, fmt, k):
    dtype, g = fmt
    values, scales = random_quantized(rng, dtype, (3, 5, k), g)
    w = moe.QuantizedWeight(values, scales, dtype, (3, 5, k), g)
    ours = w.dequantize()
    ref = reference.dequantize(values, scales, dtype, k, g)
    assert ours.dtype == np.float32 and ours.shape == (3, 5, k) and ref.shape == (3, 5, k)
    assert np.isfinite(ref).all()
    assert np.array_equal(ours.astype(np.float64), ref)
    assert np.array_equal(np.signbit(ours), np.signbit(ref))
    for e in (0, 2):  # indexing an expert gives that expert's weight
        assert np.array_equal(w[e].dequantize(), ours[e])


def test_nibble_decoding():
    # every byte: low nibble is element 0, high nibble element 1
    values = np.arange(256, dtype=np.uint8).reshape(256, 1)
    ones = np.ones((256, 1), np.float16)
    lo, hi = np.arange(256) & 15, np.arange(256) >> 4
    int4 = reference.dequantize(values, ones, "int4", 2, 0)
    assert np.array_equal(int4[:, 0], lo - 8) and np.array_equal(int4[:, 1], hi - 8)
    assert np.array_equal(moe.QuantizedWeight(values, ones, "int4", (256, 2), 0).dequantize(),
                          int4)
    unit = np.full((256, 1), 127, np.uint8)  # e8m0 127 = 2^0
    table = np.array(OCP_E2M1)
    fp4 = reference.dequantize(values, unit, "mxfp4", 2, 32)
    assert np.array_equal(fp4[:, 0], table[lo]) and np.array_equal(fp4[:, 1], table[hi])
    assert np.array_equal(np.signbit(fp4[:, 0]), np.signbit(table[lo]))
    ours = moe.QuantizedWeight(values, unit, "mxfp4", (256, 2), 32).dequantize()
    assert np.array_equal(ours, fp4) and np.array_equal(np.signbit(ours), np.signbit(fp4))
    assert np.array_equal(moe.quant.E2M1_VALUES, np.array(OCP_E2M1, np.float32))
    # e8m0: 2^(e - 127), e = 0 the subnormal 2^-127
    one = np.full((254, 1), 0x02, np.uint8)  # nibble 2 = 1.0, the high nibble 0 (k = 1)
    e = np.arange(254, dtype=np.uint8).reshape(254, 1)
    got = moe.QuantizedWeight(one, e, "mxfp4", (254, 1), 32).dequantize()[:, 0]
    assert np.array_equal(got.astype(np.float64), 2.0 ** (np.arange(254) - 127.0))
    assert got[0] == np.float32(2.0 ** -127) and got[0] > 0
    int8 = reference.dequantize(np.arange(-128, 128, dtype=np.int8)[None], np.ones((1, 1),
                                np.float16), "int8", 256, 0)
    assert np.array_equal(int8[0], np.arange(-128, 128))


@pytest.mark.parametrize("dtype", moe.QUANT_DTYPES)
def test_raw_values_every_nibble_in_the_kernels(make, dtype):
    # assigned (values, scales) taken as they are: random bytes cover every nibble / int8
    # value, the scales every sign and a wide range (not just what rounding produces)
    layer = quant_layer(make, 37, 33, 4, 2, dtype, None, "swiglu")
    g = layer.group_size
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(layer, name)
        values, scales = random_quantized(make.rng, dtype, w.shape, g, mx_scales=(120, 126))
        if dtype != "mxfp4":  # keep the outputs O(1): |q| up to 127 needs small scales
            scales = (np.sign(scales.astype(np.float32)) * make.rng.uniform(
                0.001, 0.02, size=scales.shape)).astype(np.float16)
        setattr(layer, name, (values, scales))
        assert np.array_equal(getattr(layer, name).values, values)
        assert np.array_equal(getattr(layer, name).scales, scales)
    for T in (1, 64):
        check_layer(layer, make.normal(T, 37), what=f"{dtype} raw values T={T}")


def test_mxfp4_scale_zero_is_subnormal(make):
    # e8m0 0 is 2^-127, a float32 subnormal: every w_up weight of this layer is a multiple
    # of it, so the hidden activations and outputs are tiny and would flush to zero under
    # FTZ / DAZ
    layer = quant_layer(make, 32, 16, 4, 2, "mxfp4", 32, "swiglu")
    values = layer.w_up.values.copy()
    values[..., 0] = 0x77  # +6, +6: no expert's w_up row is all zeros
    layer.w_up = (values, np.zeros_like(layer.w_up.scales))
    w = layer.w_up.dequantize()
    assert np.all(np.abs(w[w != 0]) < 2.0 ** -120) and np.all(w[..., 0] == 6 * 2.0 ** -127)
    assert np.array_equal(w.astype(np.float64), reference.dequantize(
        values, layer.w_up.scales, "mxfp4", 32, 32))
    x = make.normal(24, 32)
    y = layer(x)
    ref, _ = reference.layer_forward(layer, x)
    assert np.abs(ref).max() > 0 and np.abs(ref).max() < 1e-30
    assert (y != 0).any(), "subnormal weights were flushed to zero"
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert_same_bits(y, float_twin(layer)(x), "vs float32 twin")


def test_mxfp4_nan_scale_refused_when_packing(make):
    layer = quant_layer(make, 32, 16, 4, 2, "mxfp4", 32, "swiglu")
    scales = layer.w_down.scales.copy()
    scales[2, 7, 0] = 255  # NaN in e8m0
    layer.w_down = (layer.w_down.values, scales)
    assert np.isnan(reference.dequantize(layer.w_down.values, scales, "mxfp4", 16, 32)).any()
    with np.errstate(over="ignore", invalid="ignore"):  # (the message dequantizes it)
        with pytest.raises(ValueError, match="w_down"):
            layer.pack()
        with pytest.raises(ValueError, match="w_down"):
            layer(make.normal(2, 32))


def test_mxfp4_past_float32_range_refused_when_packing(make):
    # scale 2^127 times 6 is past the float32 range: refused, not packed as inf
    layer = quant_layer(make, 32, 16, 4, 2, "mxfp4", 32, "swiglu")
    values, scales = layer.w_gate.values.copy(), layer.w_gate.scales.copy()
    values[1, 3, 0], scales[1, 3, 0] = 0x07, 254
    assert reference.dequantize(values, scales, "mxfp4", 32, 32)[1, 3, 0] == 6 * 2.0 ** 127
    layer.w_gate = (values, scales)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(ValueError,
                                                                     match="w_gate"):
        layer(make.normal(2, 32))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float16_nonfinite_scale_refused(make, dtype, bad):
    layer = quant_layer(make, 32, 16, 4, 2, dtype, 32, "swiglu", n_shared_experts=1)
    scales = layer.shared_w_up.scales.copy()
    scales[3, 0] = bad
    layer.shared_w_up = (layer.shared_w_up.values, scales)
    with np.errstate(invalid="ignore"), pytest.raises(ValueError, match="shared_w_up"):
        layer(make.normal(2, 32))


# ---- 5. quantize_weight and moe.quantize ---------------------------------------------------

@pytest.mark.parametrize("g", [0, 32, 16])
def test_int8_round_to_nearest(rng, g):
    w = rng.standard_normal((6, 70)) * np.exp(rng.standard_normal((6, 1)))
    q = quantize_weight(w, "int8", g)
    assert q.values.dtype == np.int8 and q.scales.dtype == np.float16
    gs = g or 70
    s = np.repeat(q.scales.astype(np.float64), gs, axis=-1)[:, :70]
    amax = np.max(np.abs(np.pad(w, ((0, 0), (0, -70 % gs)))).reshape(6, -1, gs), axis=-1)
    assert np.array_equal(q.scales, (amax / 127).astype(np.float16))
    wq = q.dequantize().astype(np.float64)
    assert np.all(np.abs(w - wq) <= s / 2 * (1 + 1e-12))
    assert np.array_equal(q.values.astype(np.float64), np.clip(np.rint(w / s), -127, 127))


@pytest.mark.parametrize("g", [0, 32, 16])
def test_int4_round_to_nearest(rng, g):
    w = rng.standard_normal((6, 70)) * np.exp(rng.standard_normal((6, 1)))
    q = quantize_weight(w, "int4", g)
    assert q.values.dtype == np.uint8 and q.values.shape == (6, 35)
    gs = g or 70
    s = np.repeat(q.scales.astype(np.float64), gs, axis=-1)[:, :70]
    n = np.stack([q.values & 15, q.values >> 4], -1).reshape(6, 70).astype(np.float64) - 8
    assert np.array_equal(n, np.clip(np.rint(w / s), -8, 7))
    wq = q.dequantize().astype(np.float64)
    assert np.array_equal(wq, n * s)
    # each group's largest magnitude takes the value -8 (the scale's sign follows it)
    grouped = np.pad(w, ((0, 0), (0, -70 % gs))).reshape(6, -1, gs)
    extreme = np.take_along_axis(grouped, np.argmax(np.abs(grouped), -1)[..., None], -1)[..., 0]
    assert np.array_equal(q.scales, (extreme / -8).astype(np.float16))
    # round to nearest: within half a step, except values past 7 steps (the range is -8..7)
    inside = np.abs(w / s) <= 7.5
    assert np.all(np.abs(w - wq)[inside] <= np.abs(s)[inside] / 2 * (1 + 1e-12))
    assert np.all(np.abs(w - wq) <= np.abs(s) * (1 + 1e-12) + 0.0)


def test_mxfp4_ocp_rule(rng):
    w = rng.standard_normal((5, 80)) * np.exp(2 * rng.standard_normal((5, 1)))
    w[0, :32] = 0.0  # an all-zero group: scale 2^-127 (e8m0 0), values 0
    # a group of e2m1 values times 2^-3, its largest 6 * 2^-3: scale 2^-3, kept exactly
    w[1, :32] = rng.choice(OCP_E2M1, 32) * 2.0 ** -3
    w[1, 0] = -6.0 * 2.0 ** -3
    q = quantize_weight(w, "mxfp4")
    assert q.group_size == 32 and q.scales.dtype == np.uint8 and q.scales.shape == (5, 3)
    grouped = np.pad(w, ((0, 0), (0, 16))).reshape(5, 3, 32)
    amax = np.abs(grouped).max(-1)
    with np.errstate(divide="ignore"):
        expect = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0)
    assert np.array_equal(q.scales, expect.astype(np.uint8))
    s = np.repeat(2.0 ** (q.scales.astype(np.float64) - 127), 32, axis=-1)[:, :80]
    wq = q.dequantize().astype(np.float64)
    codes = np.stack([q.values & 15, q.values >> 4], -1).reshape(5, 80)
    assert np.array_equal(wq, np.array(OCP_E2M1)[codes] * s)
    # the nearest e2m1 value (saturating at 6)
    grid = np.abs(np.clip(w / s, -6, 6)[..., None] - np.array(OCP_E2M1))
    assert np.all(np.abs(np.clip(w / s, -6, 6) - wq / s) <= grid.min(-1) * (1 + 1e-12))
    assert q.scales[1, 0] == 127 - 3 and np.array_equal(wq[1, :32], w[1, :32])
    assert np.all(wq[0, :32] == 0) and q.scales[0, 0] == 0


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_importance_weighted_error_not_above_round_to_nearest(rng, dtype):
    w = rng.standard_normal((8, 64))
    imp = np.exp(2 * rng.standard_normal(64))
    rtn = quantize_weight(w, dtype, 32).dequantize().astype(np.float64)
    cal = quantize_weight(w, dtype, 32, importance=imp).dequantize().astype(np.float64)
    err_rtn = (imp * (w - rtn) ** 2).reshape(8, 2, 32).sum(-1)
    err_cal = (imp * (w - cal) ** 2).reshape(8, 2, 32).sum(-1)
    assert np.all(err_cal <= err_rtn * (1 + 1e-6)), "a group got worse than round to nearest"
    if dtype == "int4":
        assert err_cal.sum() < err_rtn.sum()
    with pytest.raises(ValueError, match="importance"):
        quantize_weight(w, dtype, 32, importance=-imp)
    with pytest.raises(ValueError, match="importance"):
        quantize_weight(w, dtype, 32, importance=imp[:10])


@pytest.mark.parametrize("g", [32, 0])
def test_calibration_not_worse_than_round_to_nearest(make, g):
    for _ in range(3):
        f = make.layer(48, 40, 4, 2, n_shared_experts=1)
        # inputs with a few loud features, as real activations have
        x = (make.normal(128, 48) * np.exp(make.rng.standard_normal(48))).astype(np.float32)
        y = f(x).astype(np.float64)
        rtn = moe.quantize(f, "int4", g)
        cal = moe.quantize(f, "int4", g, calibration=x)
        err_rtn = np.sum((rtn(x) - y) ** 2)
        err_cal = np.sum((cal(x) - y) ** 2)
        assert err_cal <= err_rtn, f"calibrated error {err_cal:.4g} > RTN {err_rtn:.4g}"
        check_layer(cal, x[:16], what="calibrated layer")


def test_quantize_keeps_the_layer(make):
    f = make.layer(32, 24, 6, 2, scoring="sigmoid", expert_bias=True, n_shared_experts=1,
                   router_bias=True, expert_biases=True, shared_expert_gate=True)
    f.router_bias = make.normal(6, scale=0.1)
    f.b_up = make.normal(6, 24, scale=0.1)
    q = moe.quantize(f, "int4", shared_dtype="bfloat16")
    assert (q.dtype, q.group_size, q.shared_dtype) == ("int4", 32, "bfloat16")
    cfg, qcfg = f.config(), q.config()
    for key in set(cfg) - {"dtype", "group_size", "shared_dtype"}:
        assert qcfg[key] == cfg[key], key
    for name in ("router_weight", "expert_bias", "router_bias", "b_gate", "b_up", "b_down",
                 "shared_gate_weight"):
        assert np.array_equal(getattr(q, name), getattr(f, name)), name
    for e in (0, 5):
        assert np.array_equal(q.w_down[e].values, quantize_weight(f.w_down[e], "int4").values)
    x = make.normal(20, 32)
    _, rq = q(x, return_routing=True)
    _, rf = f(x, return_routing=True)
    assert np.array_equal(rq.expert_ids, rf.expert_ids)
    check_layer(q, x, what="quantized copy")
    assert f.dtype == "float32" and not isinstance(f.w_up, moe.QuantizedWeight)


def test_quantize_bad_arguments(make):
    f = make.layer(32, 24, 4, 2)
    with pytest.raises(ValueError, match="calibration"):
        moe.quantize(f, "mxfp4", calibration=make.normal(8, 32))
    with pytest.raises(ValueError, match="dtype"):
        moe.quantize(f, "int2")
    with pytest.raises(ValueError, match="dtype"):
        moe.quantize(f, "bfloat16")
    with pytest.raises(TypeError, match="layer"):
        moe.quantize(f.w_up, "int4")
    with pytest.raises(ValueError, match="calibration"):
        moe.quantize(f, "int4", calibration=make.normal(8, 31))
    with pytest.raises(ValueError, match="w"):
        quantize_weight(np.full((2, 4), np.nan), "int4")
    with pytest.raises(ValueError, match="w"):
        quantize_weight(np.ones(4), "int4")


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantize_weight_past_float16_scale_range(dtype):
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="w_big"):
        quantize_weight(np.full((2, 4), 1e7), dtype, name="w_big")


# ---- 6. save / load -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,shared_dtype", [
    (("int8", 0), None), (("int8", 32), "float32"), (("int4", 32), "bfloat16"),
    (("int4", 64), "int8"), (("int4", 0), None), (("mxfp4", 32), "int4"),
    (("mxfp4", 32), "float16")])
def test_save_load_bitwise(make, tmp_path, fmt, shared_dtype):
    dtype, g = fmt
    layer = quant_layer(make, 37, 21, 4, 2, dtype, g, "swiglu", n_shared_experts=1,
                        shared_dtype=shared_dtype)
    path = tmp_path / "q.safetensors"
    moe.save(layer, path)
    back = moe.load(path)
    assert back.config() == layer.config()
    for name in layer._weight_names():
        a, b = getattr(layer, name), getattr(back, name)
        assert (a is None) == (b is None), name
        if isinstance(a, moe.QuantizedWeight):
            assert isinstance(b, moe.QuantizedWeight), name
            assert (b.dtype, b.group_size, b.shape) == (a.dtype, a.group_size, a.shape)
            for part in ("values", "scales"):
                pa, pb = getattr(a, part), getattr(b, part)
                assert pa.dtype == pb.dtype and np.array_equal(pa.view(np.uint8),
                                                               pb.view(np.uint8)), name
        elif a is not None:
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    x = make.normal(16, 37)
    assert_same_bits(back(x), layer(x), "loaded layer")


def test_load_scales_without_weight(make, tmp_path):
    layer = quant_layer(make, 32, 16, 4, 2, "int4", 32, "swiglu")
    path = tmp_path / "q.safetensors"
    moe.save(layer, path)
    with moe.safetensors.safe_open(path) as f:
        meta = f.metadata()
        tensors = {k: np.array(f.get(k)) for k in f.keys()}  # noqa: SIM118 (a SafeOpen)
    assert "w_up.scales" in tensors
    del tensors["w_up"]
    bad = tmp_path / "orphan.safetensors"
    moe.safetensors.save_file(tensors, bad, metadata=meta)
    with pytest.raises(ValueError, match="w_up.scales"):
        moe.load(bad)


# ---- 7. bad input ---------------------------------------------------------------------------

def test_bad_group_size():
    with pytest.raises(ValueError, match="group_size.*32"):
        moe.SparseMoE(32, 16, 4, 2, dtype="mxfp4", group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        moe.SparseMoE(32, 16, 4, 2, dtype="int4", group_size=-1)
    with pytest.raises(TypeError, match="group_size"):
        moe.SparseMoE(32, 16, 4, 2, dtype="int4", group_size=32.0)
    with pytest.raises(TypeError, match="group_size"):
        moe.SparseMoE(32, 16, 4, 2, dtype="int8", group_size=True)
    with pytest.raises(ValueError, match="group_size"):
        moe.SparseMoE(32, 16, 4, 2, dtype="float32", group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        moe.SparseMoE(32, 16, 4, 2, dtype="bfloat16", group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(np.ones((2, 64)), "mxfp4", 16)
    with pytest.raises(ValueError, match="dtype"):
        quantize_weight(np.ones((2, 64)), "float16")
    with pytest.raises(ValueError, match="dtype"):
        moe.SparseMoE(32, 16, 4, 2, dtype="int2")


def test_bad_assigned_weights(make):
    layer = quant_layer(make, 33, 16, 4, 2, "int4", 32, "swiglu")
    v, s = layer.w_up.values, layer.w_up.scales
    assert v.shape == (4, 16, 17) and s.shape == (4, 16, 2)
    with pytest.raises(ValueError, match=r"w_up: scales.*\(4, 16, 2\)"):
        layer.w_up = (v, s[..., :1])
    with pytest.raises(ValueError, match=r"w_up: values.*\(4, 16, 17\)"):
        layer.w_up = (v[..., :16], s)
    with pytest.raises(TypeError, match="w_up: values.*uint8"):
        layer.w_up = (v.view(np.int8), s)
    with pytest.raises(TypeError, match="w_up: scales.*float16"):
        layer.w_up = (v, s.astype(np.float32))
    with pytest.raises(ValueError, match="w_up.*tuple of 3"):
        layer.w_up = (v, s, s)
    odd = v.copy()
    odd[0, 0, -1] |= 0xF0  # k = 33 is odd: the last byte's high nibble must be 0
    with pytest.raises(ValueError, match="w_up.*high nibble"):
        layer.w_up = (odd, s)
    i8 = moe.SparseMoE(32, 16, 4, 2, dtype="int8")
    with pytest.raises(TypeError, match="w_down: values.*int8"):
        i8.w_down = (i8.w_down.values.view(np.uint8), i8.w_down.scales)
    mx = moe.SparseMoE(32, 16, 4, 2, dtype="mxfp4")
    with pytest.raises(TypeError, match="w_gate: scales.*uint8"):
        mx.w_gate = (mx.w_gate.values, mx.w_gate.scales.astype(np.float16))
    # a QuantizedWeight of another group size, format or shape
    with pytest.raises(ValueError, match="w_up.*group_size"):
        layer.w_up = quantize_weight(layer.w_up.dequantize(), "int4", 64)
    with pytest.raises(ValueError, match="w_up.*int8"):
        layer.w_up = quantize_weight(layer.w_up.dequantize(), "int8", 32)
    with pytest.raises(ValueError, match="w_down"):
        layer.w_down = layer.w_up
    # the layer is unchanged by the refused assignments
    assert layer.w_up.values is v and layer.w_up.scales is s


def test_quantized_weight_checks():
    v = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="scales"):
        moe.QuantizedWeight(v, np.ones((3, 2), np.float16), "int4", (3, 8), 32)
    with pytest.raises(ValueError, match="values"):
        moe.QuantizedWeight(v, np.ones((3, 1), np.float16), "int4", (3, 9), 32)
    with pytest.raises(TypeError, match="values"):
        moe.QuantizedWeight(v, np.ones((3, 1), np.float16), "int8", (3, 4), 32)
    with pytest.raises(ValueError, match="group_size"):
        moe.QuantizedWeight(v, np.ones((3, 1), np.uint8), "mxfp4", (3, 8), 16)
    w = moe.QuantizedWeight(v, np.ones((3, 1), np.float16), "int4", (3, 8), 32)
    with pytest.raises(AttributeError):
        w.group_size = 0
    with pytest.raises(TypeError):
        w[0]  # a 2-D weight has no expert axis


def test_pack_experts_missing_scales(make):
    layer = quant_layer(make, 32, 16, 4, 2, "int4", 32, "swiglu")
    code = moe.quant.dtype_code("int4")
    g, u, d = layer.w_gate, layer.w_up, layer.w_down
    bits = {n: getattr(layer, n).scales.view(np.uint16) for n in ("w_gate", "w_up", "w_down")}
    with pytest.raises(ValueError, match="w_gate_scales"):
        moe._C.pack_experts(g.values, u.values, d.values, code, group_size=32)
    with pytest.raises(ValueError, match="w_down_scales"):
        moe._C.pack_experts(g.values, u.values, d.values, code, group_size=32,
                            w_gate_scales=bits["w_gate"], w_up_scales=bits["w_up"])
    with pytest.raises(ValueError, match="group_size"):
        moe._C.pack_experts(g.values, u.values, d.values, moe.quant.dtype_code("mxfp4"),
                            group_size=64, w_gate_scales=g.scales.view(np.uint8)[..., :1],
                            w_up_scales=u.scales.view(np.uint8)[..., :1],
                            w_down_scales=d.scales.view(np.uint8)[..., :1])
    with pytest.raises(ValueError, match="scales"):
        moe._C.pack_experts(layer.w_gate.dequantize(), layer.w_up.dequantize(),
                            layer.w_down.dequantize(), moe.quant.dtype_code("float32"),
                            w_up_scales=bits["w_up"])
    # with everything given it packs
    moe._C.pack_experts(g.values, u.values, d.values, code, group_size=32,
                        w_gate_scales=bits["w_gate"], w_up_scales=bits["w_up"],
                        w_down_scales=bits["w_down"])


@pytest.mark.parametrize("dtype,shared_dtype", [("int4", None), ("mxfp4", "bfloat16"),
                                                ("float32", "int8")])
def test_no_backward_for_quantized_layers(make, dtype, shared_dtype):
    layer = moe.SparseMoE(32, 16, 4, 2, dtype=dtype, shared_dtype=shared_dtype,
                          n_shared_experts=1)
    bad = dtype if dtype in moe.QUANT_DTYPES else shared_dtype
    name = "dtype" if dtype in moe.QUANT_DTYPES else "shared_dtype"
    with pytest.raises(NotImplementedError, match=f"{name}='{bad}'"):
        layer.forward_train(make.normal(4, 32))
    # quantized storage of shared experts the layer does not have does not block training
    plain = moe.SparseMoE(32, 16, 4, 2, shared_dtype="int8")
    y, ctx = plain.forward_train(make.normal(4, 32))
    assert "w_up" in plain.backward(ctx, np.ones_like(y))


# ---- 8. repr, config, copies ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_repr_config_copies(make, fmt):
    dtype, g = fmt
    layer = quant_layer(make, 33, 20, 4, 2, dtype, g, "swiglu", n_shared_experts=1,
                        shared_dtype="bfloat16")
    r = repr(layer)
    assert f"dtype='{dtype}'" in r and "shared_dtype='bfloat16'" in r
    assert f"group_size={g or 'per row'}" in r
    wr = repr(layer.w_up)
    assert dtype in wr and str((4, 20, 33)) in wr and str(g or "per row") in wr
    cfg = layer.config()
    assert (cfg["dtype"], cfg["group_size"], cfg["shared_dtype"]) == (dtype, g, "bfloat16")
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = moe.SparseMoE(**cfg, init=False)
    assert rebuilt.config() == cfg and rebuilt.w_up is None
    x = make.normal(9, 33)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.config() == cfg
        assert isinstance(clone.w_up, moe.QuantizedWeight)
        assert clone.w_up.values is not layer.w_up.values
        assert_same_bits(clone(x), y, "a copy")
    w = copy.deepcopy(layer.w_down)
    assert np.array_equal(w.dequantize(), layer.w_down.dequantize())
    assert w.nbytes == layer.w_down.values.nbytes + layer.w_down.scales.nbytes


# ---- 9. pack_experts / expert_ffn with quantized weights ------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_pack_experts_and_expert_ffn(rng, fmt):
    dtype, g = fmt
    E, F, d = 4, 40, 33
    w = [rng.standard_normal(s).astype(np.float32) for s in ((E, F, d), (E, F, d), (E, d, F))]
    q = [quantize_weight(a, dtype, g) for a in w]
    x = rng.standard_normal((10, d)).astype(np.float32)
    off = np.array([0, 3, 3, 7, 10])
    packed = moe.pack_experts(*q)
    assert (packed.dtype, packed.group_size) == (dtype, g)
    y = moe.expert_ffn(x, off, packed)
    deq = [a.dequantize() for a in q]
    assert_same_bits(moe.expert_ffn(x, off, *deq), y, "the float32 experts")
    assert_same_bits(moe.expert_ffn(x, off, *q), y, "packing on the call")
    # float weights with a quantized dtype are rounded to nearest, as quantize_weight does
    assert_same_bits(moe.expert_ffn(x, off, moe.pack_experts(*w, dtype=dtype, group_size=g)),
                     y, "float weights quantized by pack_experts")
    ref = reference.expert_ffn(x, off, *[reference.dequantize(a.values, a.scales, dtype,
                                                               a.shape[-1], g) for a in q])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_pack_experts_quantized_errors(rng):
    E, F, d = 2, 8, 16
    w = [rng.standard_normal(s).astype(np.float32) for s in ((E, F, d), (E, F, d), (E, d, F))]
    q = [quantize_weight(a, "int4", 16) for a in w]
    with pytest.raises(TypeError, match="QuantizedWeight"):
        moe.pack_experts(q[0], w[1], q[2])
    with pytest.raises(ValueError, match="dtype='int8'"):
        moe.pack_experts(*q, dtype="int8")
    with pytest.raises(ValueError, match="w_down.*group_size"):
        moe.pack_experts(q[0], q[1], quantize_weight(w[2], "int4", 8))
    with pytest.raises(ValueError, match="w_down must have shape"):
        moe.pack_experts(q[0], q[1], quantize_weight(w[2][:, :, :4], "int4", 16))
    with pytest.raises(ValueError, match="group_size"):
        moe.pack_experts(*w, dtype="float32", group_size=32)
    with pytest.raises(ValueError, match="compute_dtype"):
        moe.pack_experts(*q, compute_dtype="bfloat16")
