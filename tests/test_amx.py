"""The kernel-set rule for bf16 compute (issue 22): the amx set where cpuid has AMX-BF16 and
Linux grants the tile state, the avx512bf16 set's bf16 kernel by vendor (VDPBF16PS on AMD,
the FMA emulation on Intel, where VDPBF16PS runs at half the FMA rate), MOE_ISA lowering
(and then no tile request at all), and the tiles living beside another library's (torch's
oneDNN configures and releases them in the same threads).  Correctness of the amx kernel
against the reference: test_bf16_compute (run on every set this CPU has).  int8 compute on
AMX-INT8 tiles: bitwise the avx512bf16 set's VPDPBUSD kernel (both sum integers exactly and
scale in the same order), on every format, odd sizes and groups, part tiles, NaN rows;
against the reference: test_quant_int8."""
import json
import platform

import numpy as np
import pytest

import moe
import childproc
from childproc import child_env

_XTILEDATA = 1 << 18


def _features():
    return set(moe._C.build_info()["cpu_features"].split())


def _vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":")[1].strip()
    except OSError:
        pass
    return ""


# A child's view: the set, its bf16 kernel, and whether this process holds the tile grant
# (arch_prctl(ARCH_GET_XCOMP_PERM): the bit of XTILEDATA).
_CHILD = r"""
import ctypes, json, moe
info = moe._C.build_info()
mask = ctypes.c_uint64(0)
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0
print(json.dumps({"isa": info["isa"], "bf16_dot": info["bf16_dot"],
                  "perm": int(mask.value) if ok else None}))
"""


def _child(**env):
    proc = childproc.python(_CHILD, env=child_env(**env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bf16_set_cpu():
    f = _features()
    return platform.machine() == "x86_64" and {"avx512f", "avx512bw", "avx512vnni",
                                                "avx512bf16", "fma", "f16c"} <= f


def test_bf16_dot_is_named_and_consistent():
    info = moe._C.build_info()
    assert info["bf16_dot"] in ("amx", "vdpbf16ps", "fma")
    assert (info["isa"] == "amx") == (info["bf16_dot"] == "amx")
    if info["isa"] in ("scalar", "avx2", "avx512", "avx512sim"):
        assert info["bf16_dot"] == "fma"


def test_int8_dot_is_named_and_consistent():
    info = moe._C.build_info()
    assert info["int8_dot"] in ("amx", "vpdpbusd", "vpmaddubsw", "portable")
    if info["int8_dot"] == "amx":
        assert info["isa"] == "amx" and "amx-int8" in _features()
    if info["isa"] == "amx" and "amx-int8" in _features():
        assert info["int8_dot"] == "amx"
    if info["isa"] == "avx512bf16":
        assert info["int8_dot"] == "vpdpbusd"


# Outputs of int8-compute layers, one line of hex digests a case: formats x groups (per
# row, 32, an odd 40, one longer than a sub-block) x sizes (k tails of 1-3 values, part
# 16-quad steps, panels of fewer than 16 rows), activations, heterogeneous and empty
# experts, zero / subnormal / tiny / NaN / Inf rows; enough rows for the tiles (4 an expert for
# int8 weights, 16 for 4-bit) and a decode batch (fewer:
# VPDPBUSD on both sets).
_INT8_CASES = r"""
import hashlib, numpy as np, moe
rng = np.random.default_rng(7)
def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
cases = [("int8", 0, 64, 96, 300), ("int8", 32, 100, 70, 257), ("int8", 40, 130, 90, 200),
         ("int8", 300, 1000, 64, 150), ("int4", 32, 64, 96, 300), ("int4", 64, 130, 70, 90),
         ("int4", 0, 258, 110, 170), ("mxfp4", 32, 96, 64, 300), ("mxfp4", 32, 160, 288, 41)]
for i, (dt, g, d, F, T) in enumerate(cases):
    act = ("swiglu", "gelu", "relu")[i % 3]
    sizes = [F, F // 2, 0, F - 6] if i == 4 else F
    layer = moe.SparseMoE(d, sizes, 4, 2, dtype="float32", activation=act, seed=i,
                          router_bias=True)
    if i == 6:
        layer.router_bias = np.array([30, 30, 30, -30], np.float32)  # expert 3 empty
    q = moe.quantize(layer, dt, group_size=g or None, compute_dtype="int8")
    x = rng.standard_normal((T, d)).astype(np.float32)
    x[T // 3] = 0.0
    x[T // 4] = np.float32(3e-41)
    x[T // 5] *= np.float32(2e-38)
    print(dt, g, d, F, T, digest(q(x)), digest(q(x[:5])))
# NaN and Inf rows (expert_ffn: the layer refuses them in its router)
w = [rng.standard_normal(s).astype(np.float32) for s in ((2, 24, 40), (2, 24, 40), (2, 40, 24))]
packed = moe.pack_experts(*w, dtype="int4", group_size=16, compute_dtype="int8")
x = rng.standard_normal((90, 40)).astype(np.float32)
x[1, 20] = np.nan
x[50, 3] = np.inf
y = moe.expert_ffn(x, [0, 40, 90], packed)
print("nan", np.isnan(y).all(axis=1).nonzero()[0].tolist(), digest(y))
"""


def test_int8_compute_tiles_equal_vpdpbusd_bits():
    if moe._C.build_info()["int8_dot"] != "amx":
        pytest.skip("int8 compute does not run on AMX-INT8 tiles here")
    tiles = childproc.python(_INT8_CASES, env=child_env(MOE_ISA=None))
    vnni = childproc.python(_INT8_CASES, env=child_env(MOE_ISA="avx512bf16"))
    assert tiles.returncode == 0, tiles.stderr
    assert vnni.returncode == 0, vnni.stderr
    assert tiles.stdout.splitlines() == vnni.stdout.splitlines()
    assert len(tiles.stdout.splitlines()) == 10
    assert tiles.stdout.splitlines()[-1].startswith("nan [1, 50] ")


def test_default_set_follows_the_rule():
    if not _bf16_set_cpu():
        pytest.skip("no AVX512-BF16 on this CPU: the rule has one outcome")
    got = _child(MOE_ISA=None)
    amx = {"amx-bf16", "amx-tile"} <= _features()
    if amx and got["perm"] is not None and got["perm"] & _XTILEDATA:
        assert got == dict(got, isa="amx", bf16_dot="amx")
    else:
        # no AMX, or Linux refused the tile state: the avx512bf16 set
        assert got["isa"] == "avx512bf16"
        want = "fma" if _vendor() == "GenuineIntel" else "vdpbf16ps"
        assert got["bf16_dot"] == want


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512"])
def test_lowered_set_asks_for_no_tiles(isa):
    if not _bf16_set_cpu():
        pytest.skip("no AVX512-BF16 on this CPU")
    got = _child(MOE_ISA=isa)
    assert got["isa"] == isa
    if got["perm"] is not None:
        assert not got["perm"] & _XTILEDATA, "MOE_ISA ruled amx out: no tile request"
    if isa == "avx512":
        assert got["bf16_dot"] == "fma"
    else:
        assert got["bf16_dot"] == ("fma" if _vendor() == "GenuineIntel" else "vdpbf16ps")


def test_moe_isa_cannot_raise_to_amx():
    if not _bf16_set_cpu() or {"amx-bf16", "amx-tile"} <= _features():
        pytest.skip("needs an AVX512-BF16 CPU without AMX")
    assert _child(MOE_ISA="amx")["isa"] == "avx512bf16"


def test_tiles_beside_torch_onednn():
    """torch's bf16 matmuls (oneDNN's AMX kernels, which load their own tile configuration
    and release the tiles) run in between moe's calls on the same threads: moe's results
    keep their bits."""
    if moe._C.build_info()["isa"] != "amx":
        pytest.skip("the amx set is not in use")
    torch = pytest.importorskip("torch")
    layer = moe.SparseMoE(64, 96, 8, 2, dtype="bfloat16", compute_dtype="bfloat16", seed=4)
    x = np.random.default_rng(0).standard_normal((150, 64)).astype(np.float32)
    want = layer(x)
    a = torch.randn(256, 512, dtype=torch.bfloat16)
    b = torch.randn(512, 384, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(moe.get_num_threads())
    try:
        for _ in range(3):
            ab = a @ b
            np.testing.assert_array_equal(layer(x), want)
            assert torch.isfinite(ab.float()).all()
    finally:
        torch.set_num_threads(threads)
