"""Time moe.SparseMoE against a NumPy per-expert loop on the same inputs, same run.

The NumPy baseline is the usual eager loop (argsort by expert, one matmul per expert,
np.add.at to combine) in float32 through NumPy's BLAS.  Both are checked against the
float64 reference before timing.  For a fair comparison run with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset; the BLAS kernel in use is printed (threadpoolctl, if installed).

    python benchmarks/bench_layer.py [--config mixtral-small] [--tokens 64 512] [--repeat 5]
"""
import argparse
import os
import statistics
import time

import numpy as np

import moe
from moe.__main__ import CONFIGS


def numpy_layer(layer, x):
    """The eager NumPy loop a user would write (float32)."""
    logits = x @ layer.router_weight.T
    r = moe.reference.route(logits, layer.top_k, scoring=layer.scoring,
                            renormalize=layer.renormalize, routed_scaling=layer.routed_scaling,
                            expert_bias=layer.expert_bias, n_groups=layer.n_groups,
                            topk_groups=layer.topk_groups)
    ids, w = r["expert_ids"], r["weights"].astype(np.float32)
    out = np.zeros_like(x)
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(layer.n_experts + 1))
    for e in range(layer.n_experts):
        sel = order[bounds[e]:bounds[e + 1]]
        if sel.size == 0:
            continue
        tok = sel // layer.top_k
        xe = x[tok]
        g = xe @ layer.w_gate[e].T
        h = g / (1 + np.exp(-g)) * (xe @ layer.w_up[e].T)
        np.add.at(out, tok, (h @ layer.w_down[e].T) * w.reshape(-1)[sel, None])
    return out


def timeit(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mixtral-small", choices=["mixtral-small", "qwen3-small"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    try:
        from threadpoolctl import threadpool_info
        blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads"))
                for i in threadpool_info()]
    except ImportError:
        blas = "threadpoolctl not installed"
    print(f"# {args.config}; BLAS: {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    moe.show_config()
    layer = moe.SparseMoE(**CONFIGS[args.config])
    rng = np.random.default_rng(1)
    print("| tokens | moe ms (min-max) | moe GFLOP/s | numpy ms (min-max) | numpy GFLOP/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T in args.tokens:
        x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
        ref, _ = moe.reference.layer_forward(layer, x)
        scale = np.abs(ref).max()
        assert np.abs(layer(x) - ref).max() <= 1e-5 * scale, "moe does not match the reference"
        assert np.abs(numpy_layer(layer, x) - ref).max() <= 1e-4 * scale, "numpy loop is wrong"
        flops = layer.flops(T)
        m = timeit(lambda: layer(x), args.repeat)
        n = timeit(lambda: numpy_layer(layer, x), args.repeat)
        print(f"| {T} | {m[0]*1e3:.1f} ({m[1]*1e3:.1f}-{m[2]*1e3:.1f}) | {flops/m[0]/1e9:.1f} "
              f"| {n[0]*1e3:.1f} ({n[1]*1e3:.1f}-{n[2]*1e3:.1f}) | {flops/n[0]/1e9:.1f} "
              f"| {n[0]/m[0]:.2f}x |")


if __name__ == "__main__":
    main()
