"""The CPU backend of issue 3: every kernel ISA this CPU runs (MOE_ISA children) against
moe.reference, bitwise results for any thread count, bf16 / fp16 weights (conversions, the
2x-naive error rule, bitwise equality with float32 weights holding the same values), packed
experts, Ctrl-C, fork(), concurrent callers and the few-token (decode) path.
"""
import json
import os
import signal
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import pytest

import moe
import childproc
from childproc import child_env
from moe import reference
from tolerances import assert_close, assert_ids_equal, assert_within_naive

from moe._C import ACTIVATIONS, GATED_ACTIVATIONS as GATED  # noqa: E402
DTYPES = ("float32", "bfloat16", "float16")
FFN_WEIGHTS = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")
ALL_WEIGHTS = ("router_weight", "expert_bias", "shared_gate_weight") + FFN_WEIGHTS

DEEPSEEK = dict(scoring="sigmoid", renormalize=True, expert_bias=True, n_groups=8,
                topk_groups=4, routed_scaling=2.5, n_shared_experts=1)
QWEN2 = dict(scoring="softmax", renormalize=False, n_shared_experts=1, shared_expert_gate=True)


# ---- helpers ------------------------------------------------------------------------------

def run_child(code, *args, env, timeout=120, cwd=None):
    proc = childproc.python(code, *args, env=env, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stderr}"
    return proc


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11 "
                    "(older ones get a working directory of their own instead)")
def test_children_import_the_tested_moe_from_any_directory(tmp_path):
    # A non-editable install tested from the source tree: the unbuilt moe/ in the working
    # directory must not shadow the installed one in the children.
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "__init__.py").write_text("raise ImportError('the shadowing moe/')\n")
    for cwd in (tmp_path, None):
        proc = childproc.python("import moe; print(moe.__file__)", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == moe.__file__


def available_isas():
    """The kernel sets this CPU runs, by the rule of csrc/cpu/ffn.c."""
    feats = set(moe._C.build_info()["cpu_features"].split())
    isas = ["scalar"]
    if {"avx2", "fma", "f16c"} <= feats:
        isas.append("avx2")
    if {"avx512f", "fma", "f16c"} <= feats:
        isas.append("avx512")
    if {"avx512f", "avx512bf16", "fma", "f16c"} <= feats:
        isas.append("avx512bf16")
    if {"avx2", "fma", "f16c"} <= feats:
        isas.append("avx512sim")  # the AVX-512 tiles and layouts, built for AVX2
    if {"amx-bf16", "amx-tile", "avx512bf16"} <= feats and moe._C.build_info()["isa"] == "amx":
        isas.append("amx")  # (cpuid and the Linux permission: ffn.c asks at import)
    return isas


def decoded(a, dtype):
    """Stored expert weights (float32, bfloat16 bits, float16) as the float32 values they hold."""
    if a is None:
        return None
    if dtype == "bfloat16":
        return moe.bfloat16_to_float32(a)
    return np.asarray(a).astype(np.float32)


def float32_twin(layer):
    """A float32 layer whose FFN weights are the decoded values of `layer`'s."""
    twin = moe.SparseMoE(layer.d_model, layer.d_ff, layer.n_experts, layer.top_k,
                         **layer_options(layer, dtype="float32"))
    for name in ALL_WEIGHTS:
        value = getattr(layer, name)
        if value is not None:
            setattr(twin, name, decoded(value, layer.dtype) if name in FFN_WEIGHTS else value)
    return twin


def layer_options(layer, **override):
    opts = dict(activation=layer.activation, scoring=layer.scoring,
                renormalize=layer.renormalize, routed_scaling=layer.routed_scaling,
                n_groups=layer.n_groups, topk_groups=layer.topk_groups,
                expert_bias=layer.use_expert_bias, n_shared_experts=layer.n_shared_experts,
                shared_d_ff=layer.shared_d_ff, shared_expert_gate=layer.shared_expert_gate,
                capacity_factor=layer.capacity_factor, dtype=layer.dtype)
    opts.update(override)
    return opts


def sprinkle_subnormals(layer, rng):
    """Put a few subnormal values (of the storage type) into w_up, so that the kernels'
    bf16 / fp16 decoding of subnormals is exercised (layer not packed yet)."""
    flat = layer.w_up.reshape(-1)
    idx = rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)
    if layer.dtype == "bfloat16":
        flat[idx] = rng.integers(1, 0x80, size=idx.size).astype(np.uint16)  # 0x0001..0x007f
    elif layer.dtype == "float16":
        flat[idx] = (rng.integers(1, 1024, size=idx.size) * 2.0 ** -24).astype(np.float16)


# The "naive computation at the working precision" of the bf16/fp16 rule (tolerances.py):
# the weights rounded exactly as stored (their decoded values), and every matmul the
# schoolbook loop in float32 -- acc = fl(acc + fl(x_k * w_k)) for k in order, vectorised
# over the outputs with NumPy -- the activation rounded once to float32, gate weights
# applied and slots summed in float32, routing decisions taken from the reference.  Not
# NumPy's matmul: OpenBLAS splits k into several partial sums, which for one token is 2-5x
# more accurate than any single in-order chain, and one in-order chain per element is what
# makes our results batch- and thread-invariant.  Ours and the naive computation are both
# compared with the float64 reference on the same decoded weights.

def naive_matmul32(x, w):
    """x (n, K) @ w (m, K).T, the schoolbook loop in float32."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        acc += x[:, k, None] * w[None, :, k]
    return acc


def naive_ffn32(x, w_gate, w_up, w_down, activation):
    gate = naive_matmul32(x, w_gate) if activation in GATED else None
    h = reference.activate(activation, gate, naive_matmul32(x, w_up)).astype(np.float32)
    return naive_matmul32(h, w_down)


def naive_expert_ffn32(x, offsets, w_gate, w_up, w_down, activation):
    out = np.zeros((x.shape[0], w_down.shape[1]), np.float32)
    for e in range(len(offsets) - 1):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            g = w_gate[e] if activation in GATED else None
            out[lo:hi] = naive_ffn32(x[lo:hi], g, w_up[e], w_down[e], activation)
    return out


def naive_layer32(layer, x, ref_routing):
    x = np.asarray(x, np.float32).reshape(-1, layer.d_model)
    act, dt = layer.activation, layer.dtype
    wg, wu, wd = (decoded(getattr(layer, n), dt) for n in ("w_gate", "w_up", "w_down"))
    ids, w = ref_routing["expert_ids"], ref_routing["weights"].astype(np.float32)
    ys = np.zeros(ids.shape + (layer.d_model,), np.float32)  # (T, k, d)
    for e in np.unique(ids[ids >= 0]):
        rows, slots = np.nonzero(ids == e)
        ys[rows, slots] = naive_ffn32(x[rows], wg[e] if act in GATED else None, wu[e], wd[e],
                                      act)
    out = np.zeros_like(x)
    for j in range(ids.shape[1]):  # slots in order, as the combine does
        out += w[:, j, None] * ys[:, j]
    if layer.n_shared_experts:
        sg, su, sd = (decoded(getattr(layer, n), dt)
                      for n in ("shared_w_gate", "shared_w_up", "shared_w_down"))
        shared = naive_ffn32(x, sg, su, sd, act)
        if layer.shared_expert_gate:
            z = naive_matmul32(x, layer.shared_gate_weight)[:, 0]
            shared = shared * (np.float32(1) / (np.float32(1) + np.exp(-z)))[:, None]
        out += shared
    return out


def check_layer_output(layer, out, x, what, pool=None):
    """A bf16/fp16 (or float32) layer's output vs the reference on its decoded weights:
    rtol 1e-5, and for bf16/fp16 the 2x-naive rule -- at once, or later over the whole
    `pool` (a list collecting (ours, naive, ref)) when the arrays are small."""
    ref, ref_routing = reference.layer_forward(layer, x)
    assert_close(out, ref, what=what)
    if layer.dtype != "float32":
        item = (out, naive_layer32(layer, x, ref_routing), ref)
        if pool is None:
            assert_within_naive(*item, what=what)
        else:
            pool.append(item)
    return ref, ref_routing


def check_pool(pool, what):
    """The 2x-naive rule over everything collected in pool."""
    assert pool, f"{what}: nothing collected"
    assert_within_naive(*(list(col) for col in zip(*pool)), what=what)


# ---- 1. every ISA variant against the reference -------------------------------------------

_ISA_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import moe
    want, cases_path, data_path, out_path = sys.argv[1:5]
    isa = moe._C.build_info()["isa"]
    if isa != want:
        sys.exit(f"MOE_ISA={want} but moe._C.build_info()['isa'] is {isa!r}")
    FFN = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")
    def dec(a, dtype):
        return moe.bfloat16_to_float32(a) if dtype == "bfloat16" else a.astype(np.float32)
    cases = json.load(open(cases_path))
    data = np.load(data_path)
    out = {}
    for i, case in enumerate(cases):
        p = f"c{i}_"
        dtype = case["dtype"]
        if case["kind"] == "layer":
            layers = {}
            for storage in {dtype, "float32"}:
                layer = moe.SparseMoE(*case["sizes"], **dict(case["options"], dtype=storage))
                for name in case["weights"]:
                    a = data[p + name]
                    setattr(layer, name, dec(a, dtype) if storage != dtype and name in FFN
                            else a)
                layers[storage] = layer
            y, r = layers[dtype](data[p + "x"], return_routing=True)
            out[p + "out"], out[p + "ids"] = y, r.expert_ids
            out[p + "twin"] = layers["float32"](data[p + "x"])
        else:
            ws = [data[p + n] if p + n in data else None for n in ("w_gate", "w_up", "w_down")]
            args = (data[p + "x"], data[p + "offsets"])
            out[p + "out"] = moe.expert_ffn(*args, *ws, activation=case["activation"],
                                            dtype=dtype)
            out[p + "twin"] = moe.expert_ffn(*args, *[None if w is None else dec(w, dtype)
                                                      for w in ws],
                                             activation=case["activation"], dtype="float32")
    np.savez(out_path, **out)
    print(json.dumps({"isa": isa, "n_cases": len(cases)}))
""")


def _isa_cases(make):
    """(description, case json, arrays, layer-or-None, x) for the per-ISA check."""
    cases = []

    def layer_case(what, d, F, E, k, T, x=None, tweak=None, **options):
        layer = make.layer(d, F, E, k, **options)
        sprinkle_subnormals(layer, make.rng)
        x = make.normal(T, d) if x is None else x
        if tweak is not None:
            tweak(layer, x)
        names = [n for n in ALL_WEIGHTS if getattr(layer, n) is not None]
        arrays = {n: getattr(layer, n) for n in names}
        arrays["x"] = x
        opts = {k_: v for k_, v in options.items() if k_ != "dtype"}
        spec = dict(kind="layer", sizes=[d, F, E, k], options=opts, weights=names,
                    dtype=layer.dtype)
        cases.append((f"{what} [{layer.dtype}]", spec, arrays, layer, x))

    def ffn_case(what, d, F, counts, activation, dtype):
        E = len(counts)
        g, u, dn = make.expert_weights(E, F, d, activation)
        conv = {"float32": lambda a: a, "float16": lambda a: a.astype(np.float16),
                "bfloat16": moe.float32_to_bfloat16}[dtype]
        arrays = {"x": make.normal(sum(counts), d), "offsets": make.offsets(counts),
                  "w_up": conv(u), "w_down": conv(dn)}
        if g is not None:
            arrays["w_gate"] = conv(g)
        spec = dict(kind="ffn", activation=activation, dtype=dtype)
        cases.append((f"{what} [{dtype}]", spec, arrays, None, arrays["x"]))

    for dtype in DTYPES:
        for act in ACTIVATIONS:  # d, F not multiples of any vector width (4, 8, 16)
            layer_case(f"d=37 F=23 E=8 k=2 {act}", 37, 23, 8, 2, 24, activation=act,
                       dtype=dtype)
        for T in (1, 8, 100):
            layer_case(f"d=130 F=70 E=8 k=2 T={T} shared expert", 130, 70, 8, 2, T,
                       dtype=dtype, **DEEPSEEK)
        layer_case("d=130 F=70 qwen2 shared gate", 130, 70, 8, 2, 20, dtype=dtype, **QWEN2)

        def skew(layer, x):
            # ~95% of the tokens put expert 0 first by far: it gets > 200 rows (more than
            # one 192-row task block), the other experts a few rows each or none
            boost = make.rng.random(x.shape[0]) < 0.95
            x[boost, 0] = np.abs(x[boost, 0]) + 3.0
            layer.router_weight[0, 0] = 20.0
            layer.router_weight[1:, 0] *= 0.01  # the boost must not favour a second expert
        layer_case("skewed routing d=48 F=40 E=64 k=2 T=300", 48, 40, 64, 2, 300, tweak=skew,
                   scoring="sigmoid", dtype=dtype)
        ffn_case("expert_ffn d=37 F=23 zero-size groups", 37, 23, [5, 0, 17, 1, 0, 9],
                 "swiglu", dtype)
        ffn_case("expert_ffn d=130 F=70 one big group", 130, 70, [250, 3, 0, 1], "gelu", dtype)
        ffn_case("expert_ffn one row", 130, 70, [0, 1, 0], "geglu", dtype)
    layer_case("E=256 k=8 softmax", 24, 20, 256, 8, 64)
    layer_case("E=256 k=8 deepseek-v3 groups", 24, 20, 256, 8, 64, dtype="bfloat16",
               **dict(DEEPSEEK, n_groups=8, topk_groups=4))
    layer_case("E=256 k=8 one token", 24, 20, 256, 8, 1, dtype="float16")
    return cases


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16", "avx512sim", "amx"])
def test_isa_variant_matches_reference(make, tmp_path, isa):
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels "
                    f"(cpu_features: {moe._C.build_info()['cpu_features']})")
    cases = _isa_cases(make)
    flat = {f"c{i}_{n}": a for i, (_, _, arrays, _, _) in enumerate(cases)
            for n, a in arrays.items()}
    np.savez(tmp_path / "in.npz", **flat)
    (tmp_path / "cases.json").write_text(json.dumps([spec for _, spec, _, _, _ in cases]))
    proc = run_child(_ISA_CHILD, isa, tmp_path / "cases.json", tmp_path / "in.npz",
                     tmp_path / "out.npz", env=child_env(MOE_ISA=isa), cwd=tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"isa": isa, "n_cases": len(cases)}
    got = np.load(tmp_path / "out.npz")

    failures = []
    pools = {"bfloat16": [], "float16": []}  # the 2x-naive rule, over all cases of a dtype
    for i, (what, spec, arrays, layer, x) in enumerate(cases):
        label = f"MOE_ISA={isa}: {what}"
        out = got[f"c{i}_out"]
        try:
            if spec["dtype"] != "float32":  # bitwise the float32 result on decoded weights
                assert np.array_equal(out, got[f"c{i}_twin"]), \
                    "differs from the float32 weights holding the same values"
            if layer is not None:
                ref, ref_routing = check_layer_output(layer, out, x, label,
                                                    pools.get(spec["dtype"]))
                assert_ids_equal(got[f"c{i}_ids"], ref_routing["expert_ids"])
                if "skewed" in what:
                    counts = ref_routing["counts"]
                    assert counts[0] > 200 and counts[1:].max() < counts[0] / 4, counts
            else:
                w = [decoded(arrays.get(n), spec["dtype"]) for n in ("w_gate", "w_up", "w_down")]
                ref = reference.expert_ffn(x, arrays["offsets"], *w, spec["activation"])
                assert_close(out, ref, what=label)
                if spec["dtype"] != "float32":
                    naive = naive_expert_ffn32(x, arrays["offsets"], *w, spec["activation"])
                    pools[spec["dtype"]].append((out, naive, ref))
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    for dtype, pool in pools.items():
        try:
            check_pool(pool, f"MOE_ISA={isa}: all {dtype} cases")
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(cases)} cases fail:\n" + "\n".join(failures)


_ISA_PROBE = "import moe; print(moe._C.build_info()['isa'])"


def test_default_isa_is_the_best_this_cpu_runs():
    real = [isa for isa in available_isas() if isa != "avx512sim"]
    best = real[-1]
    got = run_child(_ISA_PROBE, env=child_env(MOE_ISA=None)).stdout.strip()
    assert got == best
    # MOE_ISA only lowers the choice: asking for more than the CPU has gives the best
    got = run_child(_ISA_PROBE, env=child_env(MOE_ISA="avx512")).stdout.strip()
    assert got == ("avx512" if "avx512" in real else best)
    got = run_child(_ISA_PROBE, env=child_env(MOE_ISA="avx2")).stdout.strip()
    assert got == ("avx2" if "avx2" in real else best)
    # the test set: the AVX-512 tiles on any AVX2 CPU
    got = run_child(_ISA_PROBE, env=child_env(MOE_ISA="avx512sim")).stdout.strip()
    assert got == ("avx512sim" if "avx2" in real else best)


# ---- 2. bitwise the same for any thread count -----------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_thread_count_does_not_change_bits(make, threads, dtype, T):
    layer = make.layer(64, 200, 8, 2, dtype=dtype, **DEEPSEEK)
    x = make.normal(T, 64)
    counts = np.bincount(make.rng.integers(0, 6, size=T), minlength=6)
    xs = make.normal(T, 64)
    g, u, dn = make.expert_weights(6, 200, 64)
    if dtype == "bfloat16":
        g, u, dn = map(moe.float32_to_bfloat16, (g, u, dn))
    results = {}
    for n in (1, 2, 3):
        threads(n)
        assert moe.get_num_threads() == n
        layer.pack()  # packing runs on the pool too
        results[n] = (layer(x), moe.expert_ffn(xs, make.offsets(counts), g, u, dn, "swiglu",
                                               dtype=dtype))
    for n in (2, 3):
        assert np.array_equal(results[n][0], results[1][0]), f"layer: {n} threads vs 1"
        assert np.array_equal(results[n][1], results[1][1]), f"expert_ffn: {n} threads vs 1"
    assert_close(results[1][1], reference.expert_ffn(
        xs, make.offsets(counts), *(decoded(w, dtype) for w in (g, u, dn)), "swiglu"))


_THREADS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import moe
    data = np.load(sys.argv[1])
    layer = moe.SparseMoE(64, 200, 8, 2, dtype="bfloat16")
    for name in ("router_weight", "w_gate", "w_up", "w_down"):
        setattr(layer, name, data[name])
    y = layer(data["x"])
    f = moe.expert_ffn(data["x"], data["offsets"], data["w_gate"], data["w_up"],
                       data["w_down"], "swiglu", dtype="bfloat16")
    np.savez(sys.argv[2], layer=y, ffn=f)
    print(json.dumps({"threads": moe.get_num_threads()}))
""")


def test_moe_num_threads_env(make, threads, tmp_path):
    layer = make.layer(64, 200, 8, 2, dtype="bfloat16")
    x = make.normal(300, 64)
    offsets = make.offsets([100, 0, 150, 50, 0, 0, 0, 0])
    threads(2)
    want = layer(x), moe.expert_ffn(x, offsets, layer.w_gate, layer.w_up, layer.w_down,
                                    "swiglu", dtype="bfloat16")
    np.savez(tmp_path / "in.npz", x=x, offsets=offsets, router_weight=layer.router_weight,
             w_gate=layer.w_gate, w_up=layer.w_up, w_down=layer.w_down)
    proc = run_child(_THREADS_CHILD, tmp_path / "in.npz", tmp_path / "out.npz",
                     env=child_env(MOE_NUM_THREADS="1"), cwd=tmp_path)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"threads": 1}
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["layer"], want[0]), "layer: MOE_NUM_THREADS=1 vs 2 threads"
    assert np.array_equal(got["ffn"], want[1]), "expert_ffn: MOE_NUM_THREADS=1 vs 2 threads"


# ---- 3. bf16 / fp16 weights: same bits as float32 weights of the same values --------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("style", ["mixtral", "deepseek", "qwen2"])
def test_lowp_layer_equals_float32_layer_on_decoded_weights(make, dtype, style):
    options = {"mixtral": {}, "deepseek": DEEPSEEK, "qwen2": QWEN2}[style]
    layer = make.layer(96, 80, 8, 2, dtype=dtype, **options)
    sprinkle_subnormals(layer, make.rng)
    stored = layer.w_up.dtype
    assert stored == (np.uint16 if dtype == "bfloat16" else np.float16)
    x = make.normal(150, 96)
    out = layer(x)
    assert np.array_equal(out, float32_twin(layer)(x)), \
        f"{dtype} layer differs from the float32 layer on its decoded weights"
    check_layer_output(layer, out, x, f"{style} {dtype} layer")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu-tanh"])
def test_lowp_expert_ffn(make, dtype, activation):
    counts = [40, 0, 3, 77, 1]
    x = make.normal(sum(counts), 72)
    offsets = make.offsets(counts)
    ws = make.expert_weights(len(counts), 56, 72, activation)
    conv = moe.float32_to_bfloat16 if dtype == "bfloat16" else (lambda a: a.astype(np.float16))
    stored = [None if w is None else conv(w) for w in ws]
    dec = [decoded(w, dtype) for w in stored]
    out = moe.expert_ffn(x, offsets, *stored, activation, dtype=dtype)
    assert np.array_equal(out, moe.expert_ffn(x, offsets, *dec, activation, dtype="float32"))
    ref = reference.expert_ffn(x, offsets, *dec, activation)
    assert_close(out, ref, what=f"{dtype} expert_ffn vs reference on decoded weights")
    assert_within_naive(out, naive_expert_ffn32(x, offsets, *dec, activation), ref,
                        what=f"{dtype} expert_ffn")
    # and the rounding error of the weights themselves is what a bf16 / fp16 model has
    full = reference.expert_ffn(x, offsets, *ws, activation)
    rel = np.max(np.abs(out - full)) / np.max(np.abs(full))
    assert rel < (2e-2 if dtype == "bfloat16" else 3e-3), rel


# ---- 4. float32 <-> bfloat16 conversions --------------------------------------------------

# (float32 bits, bfloat16 bits under IEEE round-to-nearest-even)
RNE_CASES = [
    (0x3F800000, 0x3F80),  # 1.0, exact
    (0x3F808000, 0x3F80),  # tie, even is below
    (0x3F818000, 0x3F82),  # tie, even is above
    (0x3F808001, 0x3F81),  # just above half
    (0x3F817FFF, 0x3F81),  # just below half
    (0xBF808000, 0xBF80),  # negative ties
    (0xBF818000, 0xBF82),
    (0x3FFF8000, 0x4000),  # tie rounding up into the next binade (-> 2.0)
    (0x3FFFFFFF, 0x4000),
    (0x7F7F7FFF, 0x7F7F),  # below the overflow threshold: largest bf16
    (0x7F7F8000, 0x7F80),  # tie at the threshold: even is 2^128 -> +inf
    (0x7F7FFFFF, 0x7F80),  # FLT_MAX 3.4028235e38 -> +inf
    (0xFF7FFFFF, 0xFF80),  # -FLT_MAX -> -inf
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80),
    (0x00000000, 0x0000),
    (0x80000000, 0x8000),  # -0 keeps its sign
    (0x00000001, 0x0000),  # smallest subnormal -> +0
    (0x80000001, 0x8000),  # -> -0
    (0x00008000, 0x0000),  # subnormal ties
    (0x00018000, 0x0002),
    (0x0000C000, 0x0001),
    (0x007FFFFF, 0x0080),  # largest subnormal rounds up to the smallest normal
    (0x807F8000, 0x8080),  # tie, 0x807F is odd
    (0x00800000, 0x0080),
]
NAN_BITS = [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FBFFFFF]


def _is_bf16_nan(bits):
    bits = np.asarray(bits, np.uint16)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)


def test_float32_to_bfloat16_rounds_to_nearest_even():
    src = np.array([c[0] for c in RNE_CASES], np.uint32).view(np.float32)
    got = moe.float32_to_bfloat16(src)
    assert got.dtype == np.uint16
    for (f, want), g in zip(RNE_CASES, got):
        assert g == want, f"0x{f:08X} -> 0x{int(g):04X}, want 0x{want:04X}"
    nans = moe.float32_to_bfloat16(np.array(NAN_BITS, np.uint32).view(np.float32))
    assert _is_bf16_nan(nans).all(), [hex(int(b)) for b in nans]


def test_float32_to_bfloat16_matches_torch(rng):
    torch = pytest.importorskip("torch")
    bits = rng.integers(0, 2**32, size=100_000, dtype=np.uint64).astype(np.uint32)
    special = np.concatenate([
        rng.integers(1, 0x800000, size=2000).astype(np.uint32),                # subnormals
        rng.integers(1, 0x800000, size=2000).astype(np.uint32) | 0x80000000,
        (rng.integers(0, 2**16, size=2000).astype(np.uint32) << 16) | 0x8000,  # exact ties
        np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0, 0x80000000], np.uint32),
    ])
    f = np.concatenate([bits, special]).view(np.float32)
    got = moe.float32_to_bfloat16(f)
    want = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(f)
    assert nan.any() and np.isinf(f).any()
    assert _is_bf16_nan(got[nan]).all(), "NaN must stay NaN"
    src, got, want = f[~nan].view(np.uint32), got[~nan], want[~nan]
    diff = np.nonzero(got != want)[0]
    assert diff.size == 0, (f"{diff.size} values differ from torch; first: "
                            f"0x{int(src[diff[0]]):08X} -> 0x{int(got[diff[0]]):04X}, "
                            f"torch 0x{int(want[diff[0]]):04X}")


def test_bfloat16_to_float32_is_exact_on_all_patterns():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = moe.bfloat16_to_float32(bits)
    assert f.dtype == np.float32
    assert np.array_equal(f.view(np.uint32), bits.astype(np.uint32) << 16)
    nan = _is_bf16_nan(bits)
    assert np.array_equal(np.isnan(f), nan)
    back = moe.float32_to_bfloat16(f)
    assert np.array_equal(back[~nan], bits[~nan]), "round trip of a non-NaN must be exact"
    assert _is_bf16_nan(back[nan]).all()
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(t.view(np.uint32)[~nan], f.view(np.uint32)[~nan])


# ---- 5. torch bf16 tensors, float16 arrays ------------------------------------------------

def test_torch_bfloat16_weights(make):
    torch = pytest.importorskip("torch")
    layer = make.layer(40, 24, 6, 2, dtype="bfloat16", n_shared_experts=1)
    bits = {n: getattr(layer, n).copy() for n in FFN_WEIGHTS if getattr(layer, n) is not None}
    x = make.normal(30, 40)
    want = layer(x)
    for name, b in bits.items():
        t = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
        assert t.dtype == torch.bfloat16
        setattr(layer, name, t)
        assert getattr(layer, name).dtype == np.uint16
        assert np.array_equal(getattr(layer, name), b)
    assert np.array_equal(layer(x), want)
    # a float32 tensor rounded by torch: the same bits as our rounding
    w32 = make.normal(6, 24, 40, scale=0.1)
    layer.w_up = torch.from_numpy(w32).to(torch.bfloat16)
    assert np.array_equal(layer.w_up, moe.float32_to_bfloat16(w32))

    offsets = make.offsets([10, 0, 5, 15, 0, 0])
    g, u, d = (torch.from_numpy(bits[n].view(np.int16)).view(torch.bfloat16)
               for n in ("w_gate", "w_up", "w_down"))
    want = moe.expert_ffn(x, offsets, bits["w_gate"], bits["w_up"], bits["w_down"], "swiglu",
                          dtype="bfloat16")
    assert np.array_equal(moe.expert_ffn(x, offsets, g, u, d, "swiglu", dtype="bfloat16"), want)
    assert np.array_equal(moe.expert_ffn(x, offsets, g, u, d, "swiglu"), want)  # guessed
    assert moe.pack_experts(g, u, d).dtype == "bfloat16"


def test_float16_arrays_select_float16_storage(make):
    counts = [9, 0, 14]
    x = make.normal(sum(counts), 33)
    offsets = make.offsets(counts)
    ws = [w.astype(np.float16) for w in make.expert_weights(3, 21, 33)]
    packed = moe.pack_experts(*ws)
    assert packed.dtype == "float16"
    assert packed.nbytes < moe.pack_experts(*ws, dtype="float32").nbytes * 0.6
    out = moe.expert_ffn(x, offsets, *ws, "swiglu")
    assert np.array_equal(out, moe.expert_ffn(x, offsets, *ws, "swiglu", dtype="float16"))
    assert_close(out, reference.expert_ffn(x, offsets, *ws, "swiglu"))


# ---- 6. PackedExperts and layer.pack() --------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_packed_experts_equal_unpacked(make, dtype, activation):
    counts = [20, 0, 7, 33]
    x = make.normal(sum(counts), 45)
    offsets = make.offsets(counts)
    ws = list(make.expert_weights(4, 27, 45, activation))
    packed = moe.pack_experts(*ws, activation=activation, dtype=dtype)
    assert isinstance(packed, moe.PackedExperts)
    assert (packed.n_experts, packed.d_model, packed.d_ff, packed.dtype) == (4, 45, 27, dtype)
    assert packed.gated == (activation in GATED)
    want = moe.expert_ffn(x, offsets, *ws, activation, dtype=dtype)
    got = moe.expert_ffn(x, offsets, packed, activation=activation)
    assert np.array_equal(got, want)
    # the pack holds a copy: editing the sources changes nothing
    for w in ws:
        if w is not None:
            w *= 3.0
    assert np.array_equal(moe.expert_ffn(x, offsets, packed, activation=activation), want)


def test_packed_experts_mismatches_raise(make):
    x = make.normal(10, 16)
    offsets = make.offsets([4, 6, 0])
    gated = moe.pack_experts(*make.expert_weights(3, 8, 16, "swiglu"), activation="swiglu")
    plain = moe.pack_experts(*make.expert_weights(3, 8, 16, "gelu"), activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        moe.expert_ffn(x, offsets, gated, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        moe.expert_ffn(x, offsets, plain, activation="swiglu")
    with pytest.raises(ValueError, match="n_experts"):
        moe.expert_ffn(x, make.offsets([4, 6]), gated, activation="swiglu")
    with pytest.raises(ValueError, match="d_model"):
        moe.expert_ffn(make.normal(10, 17), offsets, gated, activation="swiglu")
    with pytest.raises(ValueError):
        moe.expert_ffn(x, offsets, gated, *make.expert_weights(3, 8, 16)[1:], "swiglu")
    # the process survives and the packs still work
    assert moe.expert_ffn(x, offsets, gated, activation="swiglu").shape == (10, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_pack_semantics(make, dtype):
    layer = make.layer(40, 24, 6, 2, dtype=dtype, n_shared_experts=1)
    x = make.normal(50, 40)
    out0 = layer(x)
    # in-place edits of FFN weights reach the kernels only through pack()
    layer.w_up[...] = layer.w_down.reshape(-1)[:layer.w_up.size].reshape(layer.w_up.shape)
    layer.shared_w_down[...] = layer.shared_w_down[::-1]
    assert np.array_equal(layer(x), out0), "in-place edit took effect without pack()"
    assert layer.pack() is layer
    out1 = layer(x)
    assert not np.array_equal(out1, out0)
    assert np.array_equal(out1, float32_twin(layer)(x))
    check_layer_output(layer, out1, x, "after pack()")
    # assignment repacks by itself
    w_down = make.normal(6, 40, 24, scale=0.2)
    layer.w_down = w_down if dtype != "bfloat16" else moe.float32_to_bfloat16(w_down)
    out2 = layer(x)
    assert not np.array_equal(out2, out1)
    check_layer_output(layer, out2, x, "after assigning w_down")
    # the router weights are read on every call
    layer.router_weight[...] = layer.router_weight[::-1]
    out3, r = layer(x, return_routing=True)
    ref, ref_routing = check_layer_output(layer, out3, x, "after editing router_weight")
    assert_ids_equal(r.expert_ids, ref_routing["expert_ids"])


# ---- 7. Ctrl-C ----------------------------------------------------------------------------

_SIGINT_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np
    import moe
    from moe.__main__ import CONFIGS
    layer = moe.SparseMoE(**CONFIGS["mixtral-small"], seed=0)
    x = np.random.default_rng(1).standard_normal((2048, layer.d_model)).astype(np.float32)
    small = moe.SparseMoE(64, 96, 8, 2, seed=2)
    xs = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)
    small_want = small(xs)
    layer.pack()
    while True:  # a call must take >= 0.5 s to tell "stopped" from "finished" (below)
        t0 = time.perf_counter()
        layer(x)
        t_call = time.perf_counter() - t0
        if t_call >= 0.5 or len(x) >= 16384:
            break
        x = np.concatenate([x, x])
    print(json.dumps({"ready": t_call, "tokens": len(x)}), flush=True)
    start = time.perf_counter()
    try:
        for i in range(20):
            layer(x)
    except KeyboardInterrupt:
        report = {"in_call_s": time.perf_counter() - start, "calls": i}
        # after the interrupt every thread can compute again
        res = {}
        def other_thread():
            try:
                res["same"] = bool(np.array_equal(small(xs), small_want))
            except BaseException as exc:
                res["error"] = repr(exc)
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
        report["other_thread"] = res
        try:
            report["main_thread_same"] = bool(np.array_equal(small(xs), small_want))
        except BaseException as exc:
            report["main_thread_error"] = repr(exc)
        print(json.dumps(report), flush=True)
        raise
    print(json.dumps({"not_interrupted": True}), flush=True)
""")


@pytest.fixture(scope="module")
def sigint_run():
    """Run the Ctrl-C child once: SIGINT 0.1 s into a call of >= 0.5 s; what happened."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Ctrl-C handling is Linux-only")
    proc = childproc.python(_SIGINT_CHILD, popen=True)
    try:
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the child died before it was ready:\n{err}")
        t_call = json.loads(line)["ready"]
        time.sleep(0.1)  # the child is now inside a call of ~t_call seconds
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        t_exit = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return dict(t_call=t_call, t_exit=t_exit, rc=proc.returncode, stderr=err, report=report)


def test_ctrl_c_interrupts_a_long_call(sigint_run):
    r = sigint_run
    assert r["rc"] != 0 and "KeyboardInterrupt" in r["stderr"], r
    assert "not_interrupted" not in r["report"], r
    assert r["t_exit"] < 5.0, f"{r['t_exit']:.2f} s from SIGINT to exit"
    # stopped inside the call it was sent in, not after finishing it (~t_call)
    rep = r["report"]
    assert rep["calls"] == 0 and rep["in_call_s"] < 0.5 * r["t_call"], \
        f"interrupted after {rep['in_call_s']:.2f} s in a call that takes {r['t_call']:.2f} s"


def test_calls_after_ctrl_c_work_in_every_thread(sigint_run):
    rep = sigint_run["report"]
    assert rep.get("main_thread_same") is True, rep
    assert rep.get("other_thread") == {"same": True}, \
        f"a call from another thread after Ctrl-C in the main thread: {rep.get('other_thread')}"


# ---- 8. fork ------------------------------------------------------------------------------

def in_forked_child(check, timeout=60):
    """Run check() in a fork of this process; returns the child's exit code (0: passed)."""
    pid = os.fork()
    if pid == 0:  # never return into pytest from here
        code = 3
        try:
            code = 0 if check() else 1
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child hung for {timeout} s")
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_pool_survives_fork(make, threads):
    threads(2)
    layer = make.layer(64, 160, 8, 2, dtype="bfloat16")
    x = make.normal(300, 64)
    want = layer(x)  # the pool is running in this process now

    def child():
        same = np.array_equal(layer(x), want) and moe.get_num_threads() == 2
        moe.set_num_threads(3)
        layer.pack()
        return same and np.array_equal(layer(x), want)

    assert in_forked_child(child) == 0
    assert np.array_equal(layer(x), want), "the parent's pool after fork()"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_fork_while_another_thread_computes(make, threads):
    threads(2)
    layer = make.layer(64, 160, 8, 2)
    x = make.normal(400, 64)
    want = layer(x)
    stop = threading.Event()
    bad = []

    def busy():
        while not stop.is_set():
            if not np.array_equal(layer(x), want):
                bad.append("busy thread")

    th = threading.Thread(target=busy)
    th.start()
    try:
        codes = []
        for _ in range(5):
            time.sleep(0.02)
            codes.append(in_forked_child(lambda: np.array_equal(layer(x), want), timeout=30))
    finally:
        stop.set()
        th.join()
    assert codes == [0] * 5
    assert not bad


# ---- 9. concurrent callers ------------------------------------------------------------------

@pytest.mark.parametrize("change_threads", [False, True])
@pytest.mark.parametrize("prepacked", [True, False])
def test_concurrent_calls_match_serial(make, threads, change_threads, prepacked):
    layer = make.layer(48, 120, 8, 2, dtype="bfloat16", **DEEPSEEK)
    xs = [make.normal(T, 48) for T in (1, 5, 64, 200, 301)]
    serial = [layer(x) for x in xs]
    if not prepacked:
        layer.w_up = layer.w_up.copy()  # the next calls repack, concurrently
    errors = []
    barrier = threading.Barrier(4 + change_threads)

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(xs) * 4) % len(xs)
        barrier.wait()
        for i in order:
            try:
                if not np.array_equal(layer(xs[i]), serial[i]):
                    errors.append(f"thread {seed}: input {i} differs")
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(f"thread {seed}: {exc!r}")

    def changer():
        barrier.wait()
        for i in range(200):
            threads(1 + i % 3)
            time.sleep(0.001)

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    if change_threads:
        pool.append(threading.Thread(target=changer))
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in pool), "a thread hung"
    assert not errors, errors[:5]


# ---- 10. few tokens (the decode path) ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_tokens_match_reference_and_big_batch(make, dtype):
    d, F = 128, 448  # mixtral's d_ff / d_model = 3.5
    layer = make.layer(d, F, 8, 2, dtype=dtype)
    tokens = make.normal(8, d)
    others = make.normal(250, d)
    big = layer(np.concatenate([others[:120], tokens, others[120:]]))[120:128]
    pool = []
    for n in range(1, 9):
        out = layer(tokens[:n])
        check_layer_output(layer, out, tokens[:n], f"{n} tokens [{dtype}]", pool)
        assert np.array_equal(out, big[:n]), f"{n} tokens vs the same rows of a big batch"
        for i in range(n):
            assert np.array_equal(layer(tokens[i:i + 1]), big[i:i + 1]), f"token {i} alone"
    if dtype != "float32":
        check_pool(pool, f"1..8 tokens [{dtype}]")


def _router_tree(x, w):
    """The router kernel's float64 logits, bit for bit: element i of x[t] * w[e] summed
    in order into lane i % 8 (products of floats are exact in float64, so FMA or not is
    the same), then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    lanes = np.zeros((x.shape[0], w.shape[0], 8))
    for i in range(x.shape[1]):
        lanes[:, :, i % 8] += np.outer(x[:, i], w[:, i])
    a = lanes
    return ((a[..., 0] + a[..., 1]) + (a[..., 2] + a[..., 3])) + \
           ((a[..., 4] + a[..., 5]) + (a[..., 6] + a[..., 7]))


@pytest.mark.parametrize("T,d,E", [(1, 1024, 64), (7, 37, 5), (130, 131, 9), (4, 8, 3),
                                   (3, 5, 2), (1, 19, 7), (2, 16, 3), (6, 9, 1)])
def test_router_logits_bitwise(make, T, d, E):
    # the kernel widens float32 x and w as it loads them (no float64 copies): the logits
    # are its fixed lane tree exactly, for d not a multiple of the vector width, token
    # counts that leave short blocks, and a strided x
    x = make.normal(T, 2 * d)[:, ::2]
    w = make.normal(E, d)
    got = moe._C.router_logits(np.ascontiguousarray(x), w)
    want = _router_tree(x, w)
    assert got.dtype == np.float64 and got.shape == (T, E)
    assert np.array_equal(got, want), np.max(np.abs(got - want))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-12, atol=1e-12)
    # a token's logits do not depend on where it sits in the batch (blocks of 2 tokens x
    # 2 experts, an odd last token x 4 experts), nor on the other experts
    for r in {0, T - 1, T // 2}:
        one = moe._C.router_logits(np.ascontiguousarray(x[r:r + 1]), w)
        assert np.array_equal(one[0], got[r])
    assert np.array_equal(moe._C.router_logits(np.ascontiguousarray(x), w[-1:])[:, 0],
                          got[:, -1])


_LATE_WORKERS = textwrap.dedent("""
    import sys, time
    import numpy as np
    import moe
    rng = np.random.default_rng(int(sys.argv[1]))
    layer = moe.SparseMoE(d_model=40, d_ff=24, n_experts=16, top_k=2)
    xs = [rng.standard_normal((T, 40)).astype(np.float32) for T in (1, 3, 9, 40, 2, 130)]
    moe.set_num_threads(1)
    want = [layer(x) for x in xs]
    moe.set_num_threads(4)
    for i in range(300):
        j = i % len(xs)
        if i % 7 == 0:
            time.sleep(0.001)  # the workers fall asleep: the next jobs may end before they wake
        got = layer(xs[j])
        assert np.array_equal(got, want[j]), (i, j)
    print("ok")
""")


def test_pool_jobs_do_not_wait_for_sleeping_workers(make):
    # a job closes once its caller has run out of tasks and waits only for the workers
    # that joined it: workers that wake later find it closed (or join a newer job).  No
    # spinning (every worker sleeps between jobs) and more threads than cores make late
    # joiners common; every result must still be the one-thread result bit for bit
    seed = int(make.rng.integers(1 << 30))
    proc = run_child(_LATE_WORKERS, seed, env=child_env(MOE_POOL_SPIN="0"))
    assert proc.stdout.strip() == "ok"
