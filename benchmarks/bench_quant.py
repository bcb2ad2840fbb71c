"""Quantized experts: decode and prefill speed of int8 / int4 / mxfp4 layers against our
fp32 and bf16 layers, the read bandwidth, and each format's error.

For each CPU shape of shared/bench/shapes.json: the fp32 layer, its bf16 twin and
moe.quantize(layer, fmt) for int8 (one scale per row), int4 (groups of 32) and mxfp4.
Every layer is first checked against moe.reference (its own dequantized weights, rtol
1e-5 of the largest output).  Then, per token count, all are timed in interleaved rounds
(benchmarks/_common.interleaved); for 1-8 tokens every timed call starts with the caches
flushed (a read of twice the L3, as bench_cpu.py does) and the read bandwidth is measured
in every round.  GB/s counts the bytes a call actually reads: the active experts' values
and scales, the shared experts and the router.  Ratios are medians of per-round ratios.
The error table gives each format's output error against the fp32 layer on 256 random
tokens (relative Frobenius norm), round to nearest and, for int8 / int4, with
calibration= (the activation-aware scale search) on another 256 tokens.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_quant.py
        [--configs mixtral-small ...] [--tokens 1 8 512] [--budget 8] [--out FILE.md]
"""
import argparse
import os
import platform
import statistics
import sys

import numpy as np

import moe
from _common import (bf16_twin, cache_flusher, check, cpu_shape,  # noqa: E402
                     interleaved, layer_args, per_round, read_bandwidth, spread)

# (label, format, group size, compute dtype): "+i8" rows quantize the activations too
# (compute_dtype="int8": integer dot products, reference.quantize_activations)
FORMATS = (("int8", "int8", None, "float32"), ("int4", "int4", 32, "float32"),
           ("mxfp4", "mxfp4", 32, "float32"), ("int8+i8", "int8", None, "int8"),
           ("int4+i8", "int4", 32, "int8"), ("mxfp4+i8", "mxfp4", 32, "int8"))


def expert_bytes(layer, name, e=None):
    """Bytes of weight `name` (of expert e) as the layer stores it."""
    w = getattr(layer, name)
    if w is None:
        return 0
    if isinstance(w, moe.QuantizedWeight):
        return (w.values[e].nbytes + w.scales[e].nbytes) if e is not None else w.nbytes
    return w[e].nbytes if e is not None else w.nbytes


def routed_bytes(layer, routing):
    """Bytes of the weights of the experts this routing uses."""
    used = np.unique(routing.expert_ids[routing.expert_ids >= 0])
    return sum(expert_bytes(layer, n, int(e)) for e in used
               for n in ("w_gate", "w_up", "w_down"))


def read_bytes(layer, routing):
    """Bytes a forward reads: the routed experts' weights, the shared experts', the router."""
    b = routed_bytes(layer, routing)
    b += sum(expert_bytes(layer, n) for n in ("shared_w_gate", "shared_w_up", "shared_w_down"))
    return b + layer.router_weight.nbytes


def rel_fro(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = layer_args(ap, "results_quant.md", budget=8.0).parse_args()
    threads = moe.get_num_threads()
    info = moe._C.build_info()
    head = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"cpu features: {info['cpu_features']}",
        f"moe {info['version']}: kernels {info['isa']}, {threads} threads",
        "",
        "| shape | tokens | fp32 ms | bf16 ms | bf16c ms | format | ms | vs fp32 | vs bf16 | "
        "vs bf16c | GB/s read (% of bandwidth) | FFN only: ms, vs fp32, vs bf16, GB/s (% of "
        "bandwidth) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(head), flush=True)
    rows, errors = [], []
    rng = np.random.default_rng(0)
    flush = cache_flusher(threads)
    for name in args.configs:
        layer = moe.SparseMoE(**cpu_shape(name))
        if layer.use_expert_bias:
            layer.expert_bias[:] = rng.standard_normal(layer.n_experts) * 0.01
        bf16 = bf16_twin(layer)
        bf16c = bf16_twin(layer, compute_dtype="bfloat16")
        quant = {lab: moe.quantize(layer, fmt, g, compute_dtype=c)
                 for lab, fmt, g, c in FORMATS}
        # correctness first: each quantized layer against the float64 reference
        x = rng.standard_normal((8, layer.d_model)).astype(np.float32)
        for lab, q in quant.items():
            ref, _ = moe.reference.layer_forward(q, x)
            # int8 compute: the reference quantizes the same activations; a hidden value
            # on a rounding boundary may land one quantum away, hence the looser bound
            check(f"{name} {lab}", q(x), ref, rtol=1e-5 if "+i8" not in lab else 1e-3)
        # each format's error against the fp32 layer (random weights and inputs)
        xe = rng.standard_normal((256, layer.d_model)).astype(np.float32)
        xc = rng.standard_normal((256, layer.d_model)).astype(np.float32)
        y32 = layer(xe)
        err = {"bf16": rel_fro(bf16(xe), y32)}
        for lab, fmt, g, c in FORMATS:
            err[lab] = rel_fro(quant[lab](xe), y32)
            if fmt != "mxfp4" and c == "float32":
                cal = moe.quantize(layer, fmt, g, calibration=xc)
                err[lab + " calibrated"] = rel_fro(cal(xe), y32)
        errors.append((name, err))
        for T in args.tokens:
            x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
            _, routing = layer(x, return_routing=True)
            cold = flush if T <= 8 else None
            impls = [("fp32", layer), ("bf16", bf16), ("bf16c", bf16c)] + list(quant.items())
            fns = [((lambda m=m: m(x)), cold) for _, m in impls]
            if T <= 8:
                # the routed experts' FFN alone (no router, dispatch, shared experts or
                # combine), on the rows this routing sends them: the kernels' own speed
                d = moe.dispatch(x, routing.expert_ids, layer.n_experts)
                act = moe.ACTIVATIONS.index(layer.activation)
                for _, m in impls:
                    m.pack()
                    fns.append(((lambda m=m: moe._C.ffn_grouped(
                        d.x_sorted, None, d.offsets, m._packed[0], act)), cold))
            bw = []
            times = interleaved(fns, budget=args.budget,
                                each_round=(lambda: bw.append(read_bandwidth(threads, 256)))
                                if T <= 8 else None)
            ffn = times[len(impls):]
            t32, t16, t16c = times[0], times[1], times[2]
            ms = lambda t: "%.2f (%.2f-%.2f)" % tuple(v * 1e3 for v in spread(t))  # noqa: E731
            def gbs(nb, t):
                gb = [nb / s / 1e9 for s in t]
                frac = statistics.median(g / r for g, r in zip(gb, bw))
                return (f"{statistics.median(gb):.1f} ({100 * frac:.0f}% of "
                        f"{statistics.median(bw):.1f})")

            for i, ((fmt, q), t) in enumerate(zip(impls[3:], times[3:len(impls)])):
                read, alone = "-", "-"
                if T <= 8:
                    read = gbs(read_bytes(q, routing), t)
                    f = ffn[3 + i]
                    alone = (f"{statistics.median(f) * 1e3:.2f}, "
                             f"{per_round(ffn[0], f):.2f}x, {per_round(ffn[1], f):.2f}x, "
                             f"{gbs(routed_bytes(q, routing), f)}")
                row = (f"| {name} | {T} | {ms(t32)} | {ms(t16)} | {ms(t16c)} | {fmt} | "
                       f"{ms(t)} | {per_round(t32, t):.2f}x | {per_round(t16, t):.2f}x | "
                       f"{per_round(t16c, t):.2f}x | {read} | {alone} |")
                rows.append(row)
                print(row, flush=True)
    err_head = ["", "Output error against the fp32 layer (relative Frobenius norm, 256 random "
                "tokens; random Gaussian weights, not a trained checkpoint's):", "",
                "| shape | " + " | ".join(errors[0][1]) + " |",
                "| --- " * (len(errors[0][1]) + 1) + "|"]
    err_rows = [f"| {n} | " + " | ".join(f"{v:.2e}" for v in e.values()) + " |"
                for n, e in errors]
    print("\n".join(err_head + err_rows), flush=True)
    notes = [
        "",
        "Every layer of a row is timed in rounds, one call each per round in rotating order "
        f"(each after an untimed call of its own), for {args.budget:.0f} s (3-15 rounds): "
        "times are medians (min-max) over rounds and the ratios medians of per-round "
        "ratios.  For 1-8 tokens every timed call starts with the caches flushed, and GB/s "
        "is the bytes the call reads (the active experts' values and scales, shared experts, "
        "router) over its time, against the read bandwidth measured in the same rounds; "
        "'FFN only' times the routed experts' grouped FFN alone (moe._C.ffn_grouped on the "
        "layer's packed experts and the rows this routing sends them, caches flushed), "
        "its ratios against the fp32 and bf16 FFNs and its GB/s over the routed experts' "
        "bytes.  "
        "bf16: bf16 weights, float32 compute; bf16c: bf16 weights and compute_dtype="
        "'bfloat16' (AMX tiles on the amx set).  "
        "int8: one float16 scale per row; int4: float16 scales per 32; mxfp4: e8m0 per 32.  "
        "The kernels dequantize exactly (a quantized layer's output is bitwise the fp32 "
        "layer's on the dequantized weights): in registers when a weight panel serves one "
        "activation panel (decode), widened once per task into an fp32 panel otherwise.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(head + rows + err_head + err_rows + notes) + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
