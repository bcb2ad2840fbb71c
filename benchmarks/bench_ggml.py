"""moe's routed expert FFN against ggml's (llama.cpp's kernels) on the CPU, same process.

    python benchmarks/bench_ggml.py --ggml /path/to/ggml [--budget 6]

--ggml: a checkout of https://github.com/ggml-org/ggml built as shared libraries
(cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON;
ninja -C build ggml ggml-cpu ggml-base).  This script compiles benchmarks/ggml_ffn.c
against it and calls it with ctypes: a SwiGLU expert FFN as three MUL_MAT_IDs (gate, up,
down) and silu * up, on the tokens and expert ids of the layer's own routing.  moe's side
is the same work: moe._C.ffn_grouped on the layer's packed experts and the dispatched rows
(the 'FFN only' column of bench_quant.py).  Each (shape, tokens) row times every
implementation in rounds, one call each per round in rotating order, with the caches
flushed before every timed call (a read of twice the L3) for 1-8 tokens; medians
(min-max) over rounds.  Both sides use 2 threads (ggml: a persistent threadpool).  ggml's
f32 output is checked against float64 NumPy on the same weights first.
"""
import argparse
import ctypes
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

import moe
from _common import bf16_twin, cache_flusher, cpu_shape, interleaved, layer_args, spread

HERE = os.path.dirname(os.path.abspath(__file__))
# (label, moe dtype, group size, compute dtype)
OURS = (("fp32", "float32", None, "float32"), ("bf16", "bfloat16", None, "float32"),
        ("int8+i8", "int8", None, "int8"), ("int4+i8", "int4", 32, "int8"),
        ("mxfp4+i8", "mxfp4", 32, "int8"))
THEIRS = ("f32", "bf16", "q8_0", "q4_0", "q4_K", "mxfp4")


def build(ggml_dir):
    lib = os.path.join(ggml_dir, "build", "src")
    out = os.path.join(tempfile.mkdtemp(), "libggml_ffn.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-I", os.path.join(ggml_dir, "include"),
                    os.path.join(HERE, "ggml_ffn.c"), "-L", lib, "-lggml", "-lggml-base",
                    "-lggml-cpu", f"-Wl,-rpath,{lib}", "-lm", "-o", out], check=True)
    so = ctypes.CDLL(out)
    so.gf_new.restype = ctypes.c_void_p
    so.gf_new.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_int, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 3
    so.gf_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    so.gf_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    so.gf_free.argtypes = [ctypes.c_void_p]
    so.gf_type.argtypes = [ctypes.c_char_p]
    return so


def ptr(a):
    return None if a is None else a.ctypes.data


def ggml_ffn(so, name, layer, T, threads, weights=False):
    """A ggml FFN of type `name` for the layer's shape (its weights when `weights`)."""
    t = so.gf_type(name.encode())
    if t < 0:
        return None
    w = [np.ascontiguousarray(getattr(layer, n), np.float32) for n in
         ("w_gate", "w_up", "w_down")] if weights else [None] * 3
    h = so.gf_new(t, layer.d_model, layer.d_ff, layer.n_experts, layer.top_k, T, threads,
                  *(ptr(a) for a in w))
    return h or None  # NULL: the shape does not fit the type's blocks (q4_K: 256)


def check_ggml(so, layer, x, ids, threads):
    """ggml f32 vs float64 NumPy: max |diff| / max |ref| over every (token, slot)."""
    h = ggml_ffn(so, "f32", layer, x.shape[0], threads, weights=True)
    y = np.empty((x.shape[0], layer.top_k, layer.d_model), np.float32)
    so.gf_set(h, ptr(x), ptr(ids))
    assert so.gf_run(h, ptr(y)) == 0
    so.gf_free(h)
    ref = np.empty(y.shape)
    x64 = x.astype(np.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            g = layer.w_gate[e].astype(np.float64) @ x64[t]
            u = layer.w_up[e].astype(np.float64) @ x64[t]
            ref[t, j] = layer.w_down[e].astype(np.float64) @ (g / (1 + np.exp(-g)) * u)
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    assert err < 1e-4, f"ggml f32 FFN differs from NumPy: {err:.3g}"
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ggml", required=True, help="a ggml checkout with build/src/*.so")
    args = layer_args(ap, "results_ggml.md", budget=6.0).parse_args()
    so = build(args.ggml)
    threads = moe.get_num_threads()
    rev = subprocess.run(["git", "-C", args.ggml, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    info = moe._C.build_info()
    head = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"cpu features: {info['cpu_features']}",
            f"moe {info['version']}: kernels {info['isa']}, {threads} threads; ggml {rev} "
            f"(CPU backend, GGML_NATIVE, {threads} threads)", "",
            "| shape | tokens | " + " | ".join(f"moe {lab} ms" for lab, *_ in OURS) + " | " +
            " | ".join(f"ggml {n} ms" for n in THEIRS) + " |",
            "|" + " --- |" * (2 + len(OURS) + len(THEIRS))]
    print("\n".join(head), flush=True)
    rows, checks = [], []
    flush = cache_flusher(threads)
    rng = np.random.default_rng(0)
    for name in args.configs:
        layer = moe.SparseMoE(**cpu_shape(name))
        ours = {}
        for lab, dt, g, c in OURS:
            q = layer if dt == "float32" else bf16_twin(layer) if dt == "bfloat16" else \
                moe.quantize(layer, dt, g, compute_dtype=c)
            q.pack()
            ours[lab] = q
        act = moe.ACTIVATIONS.index(layer.activation)
        for T in args.tokens:
            x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
            _, r = layer(x, return_routing=True)
            ids = np.ascontiguousarray(r.expert_ids, np.int32)
            if T <= 8:
                checks.append(f"{name} T={T}: {check_ggml(so, layer, x, ids, threads):.1e}")
            d = moe.dispatch(x, r.expert_ids, layer.n_experts)
            fns = [((lambda q=q: moe._C.ffn_grouped(d.x_sorted, None, d.offsets,
                                                     q._packed[0], act)),
                    flush if T <= 8 else None) for q in ours.values()]
            handles = []
            for n in THEIRS:
                h = ggml_ffn(so, n, layer, T, threads)
                handles.append(h)
                if h is not None:
                    so.gf_set(h, ptr(x), ptr(ids))
                    fns.append(((lambda h=h: so.gf_run(h, None)), flush if T <= 8 else None))
            times = iter(interleaved(fns, budget=args.budget))
            cells = []
            for _ in OURS:
                cells.append("%.3f (%.3f-%.3f)" % tuple(v * 1e3 for v in spread(next(times))))
            for h in handles:
                cells.append("-" if h is None else "%.3f (%.3f-%.3f)" % tuple(
                    v * 1e3 for v in spread(next(times))))
                if h is not None:
                    so.gf_free(h)
            row = f"| {name} | {T} | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)
    note = [
        "",
        "Both sides compute the routed experts' SwiGLU FFN alone (no router, combine or "
        "shared expert) for the layer's own routing: moe._C.ffn_grouped on the packed "
        "experts (int8+i8 / int4+i8 / mxfp4+i8: compute_dtype='int8', activations quantized "
        "to int8 per row and block; bf16: bf16 weights, float32 compute), ggml: gate, up "
        "and down MUL_MAT_IDs and silu * up (benchmarks/ggml_ffn.c; ggml quantizes the "
        "activations to q8_0 / q8_K for its quantized types; no repacked buffer type).  "
        "Times in ms, median (min-max) over interleaved rounds; caches flushed before each "
        "timed call for 1-8 tokens.  '-': the type's block does not divide the shape "
        "(q4_K: 256).",
        "ggml f32 vs float64 NumPy (max |diff| / max |ref|): " + "; ".join(checks),
    ]
    print("\n".join(note))
    with open(args.out, "w") as f:
        f.write("\n".join(head + rows + note) + "\n")
    print("written to", args.out)


if __name__ == "__main__":
    sys.exit(main())
