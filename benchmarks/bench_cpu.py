"""CPU benchmark: moe's layer against the machine's ceilings and its peers, in one run.

For each CPU shape of shared/bench/shapes.json and each token count: moe (fp32 and bf16
weights, bf16 weights with bf16 compute, all threads; fp32 on one thread too), a NumPy per-expert loop (OpenBLAS), and
PyTorch's HF-transformers-style expert loop in fp32 and bf16.  Ceilings from the same run:
the FMA peak (benchmarks/ceilings.c, a register-only FMA loop) and the read bandwidth.
GFLOP/s count multiply-adds as 2 over the routed (and shared) experts; for 1-8 tokens the
table also gives GB/s of the active experts' weights.  Every implementation is checked
against moe.reference before it is timed.  Medians over repeats, (min-max) beside.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_cpu.py
        [--configs mixtral-small ...] [--tokens 1 8 512] [--no-torch] [--out FILE.md]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import moe
from _common import (amx_peak, cache_flusher, ceilings, fma_peak, interleaved,  # noqa: E402
                     layer_args, optional_torch, per_round, read_bandwidth, spread)

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "shapes.json")


# ---- ceilings --------------------------------------------------------------------------


# ---- peers -------------------------------------------------------------------------------

def numpy_layer(layer, w, x):
    """The eager NumPy loop a user would write: argsort by expert, one matmul per expert."""
    r = moe.reference.route(x @ layer.router_weight.T, layer.top_k, scoring=layer.scoring,
                            renormalize=layer.renormalize, routed_scaling=layer.routed_scaling,
                            expert_bias=layer.expert_bias, n_groups=layer.n_groups,
                            topk_groups=layer.topk_groups)
    ids, gw = r["expert_ids"].reshape(-1), r["weights"].astype(np.float32).reshape(-1)
    out = np.zeros_like(x)
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(layer.n_experts + 1))
    for e in range(layer.n_experts):
        sel = order[bounds[e]:bounds[e + 1]]
        if sel.size == 0:
            continue
        tok = sel // layer.top_k
        xe = x[tok]
        g = xe @ w["w_gate"][e].T
        h = g / (1 + np.exp(-g)) * (xe @ w["w_up"][e].T)
        np.add.at(out, tok, (h @ w["w_down"][e].T) * gw[sel, None])
    if layer.n_shared_experts:
        g = x @ w["shared_w_gate"].T
        out += (g / (1 + np.exp(-g)) * (x @ w["shared_w_up"].T)) @ w["shared_w_down"].T
    return out


def torch_block(layer, dtype):
    """An HF-transformers-style sparse MoE block (Mixtral / DeepSeek modelling code shape)."""
    import torch

    E = layer.n_experts
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    router = t(layer.router_weight)
    bias = t(layer.expert_bias) if layer.use_expert_bias else None
    experts = [(t(layer.w_gate[e]), t(layer.w_up[e]), t(layer.w_down[e])) for e in range(E)]
    shared = None
    if layer.n_shared_experts:
        shared = (t(layer.shared_w_gate), t(layer.shared_w_up), t(layer.shared_w_down))

    def mlp(h, w):
        return torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(h, w[0]))
            * torch.nn.functional.linear(h, w[1]), w[2])

    @torch.inference_mode()
    def forward(x):
        logits = torch.nn.functional.linear(x, router).float()
        if layer.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        sel = scores if bias is None else scores + bias.float()
        if layer.n_groups > 1:
            g = sel.view(x.shape[0], layer.n_groups, -1).topk(2, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(g).scatter_(1, g.topk(layer.topk_groups, dim=-1)[1], 1)
            mask = keep.unsqueeze(-1).expand(-1, -1, E // layer.n_groups).reshape(x.shape[0], E)
            sel = sel.masked_fill(mask == 0, float("-inf"))
        ids = sel.topk(layer.top_k, dim=-1)[1]
        wts = scores.gather(1, ids)
        if layer.renormalize:
            wts = wts / wts.sum(-1, keepdim=True)
        wts = (wts * layer.routed_scaling).to(dtype)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(ids, num_classes=E).permute(2, 1, 0)
        for e in range(E):
            slot, tok = torch.where(mask[e])
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, mlp(x[tok], experts[e]) * wts[tok, slot, None])
        if shared is not None:
            out = out + mlp(x, shared)
        return out

    return forward


# ---- timing -------------------------------------------------------------------------------

def check(name, y, ref):
    err = float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
    if not err < 2e-2:
        raise SystemExit(f"{name} does not match the reference (max rel err {err:.2e})")
    return err


def active_bytes(layer, routing, bytes_per):
    """Weight bytes a forward must read: the distinct routed experts + shared + router."""
    used = np.unique(routing.expert_ids[routing.expert_ids >= 0]).size
    mats = 3
    b = used * mats * layer.d_ff * layer.d_model * bytes_per
    b += layer.n_shared_experts * mats * layer.shared_d_ff * layer.d_model * bytes_per
    return b + layer.n_experts * layer.d_model * 4


# ---- main ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    layer_args(ap, "results_cpu.md", tokens=None)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    with open(SHAPES) as f:
        shapes = json.load(f)["cpu"]
    threads = moe.get_num_threads()
    fma, fma_isa, read = ceilings(threads)
    fma1, _, _ = ceilings(1)
    amx = amx_peak(threads)  # 0.0: no AMX (then torch's bf16 loop is slow: timed alone)
    torch = optional_torch(threads, args.no_torch)
    try:
        from threadpoolctl import threadpool_info
        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} "
                         f"{i.get('architecture')} x{i.get('num_threads')}"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        blas = "threadpoolctl not installed"

    info = moe._C.build_info()
    head = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"cpu features: {info['cpu_features']}",
        f"moe {info['version']}: kernels {info['isa']}, {threads} threads; numpy "
        f"{np.__version__} ({blas}); OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; torch "
        f"{torch.__version__ if torch else '(not run)'}",
        f"Ceilings (same run): FMA peak {fma:.0f} GFLOP/s ({fma_isa}, {threads} threads; "
        f"{fma1:.0f} on 1 thread), read bandwidth {read:.1f} GB/s ({threads} threads)"
        + (f", AMX-BF16 tile peak {amx:.0f} GFLOP/s ({threads} threads)" if amx else ""),
        "",
        "| shape | tokens | moe fp32 ms | GFLOP/s | % peak | GB/s (% read) | moe bf16 ms | "
        "bf16/fp32 | moe bf16 compute ms | bf16c/fp32 | bf16c GFLOP/s (% AMX) | "
        "moe fp32 1 thread ms | numpy ms | torch fp32 ms | torch bf16 ms | vs numpy | "
        "vs torch fp32 | bf16c vs torch bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- | --- | --- |",
    ]
    print("\n".join(head), flush=True)
    rows = []
    rng = np.random.default_rng(0)
    flush = cache_flusher(threads)
    for name in args.configs:
        cfg = {k: v for k, v in shapes[name].items() if k != "n_tokens"}
        layer = moe.SparseMoE(**cfg)
        w = {k: getattr(layer, k) for k in ("w_gate", "w_up", "w_down", "shared_w_gate",
                                            "shared_w_up", "shared_w_down")}
        if layer.use_expert_bias:
            layer.expert_bias[:] = rng.standard_normal(layer.n_experts) * 0.01

        def twin(**options):
            """The layer with bf16 weights (rounded from its own) and these options."""
            other = moe.SparseMoE(**cfg, dtype="bfloat16", **options)
            for k, v in w.items():
                if v is not None:
                    setattr(other, k, v)
            if layer.use_expert_bias:
                other.expert_bias[:] = layer.expert_bias
            other.router_weight = layer.router_weight
            return other

        layer_bf16 = twin()
        layer_bf16c = twin(compute_dtype="bfloat16")
        tb32 = torch_block(layer, torch.float32) if torch else None
        tb16 = torch_block(layer, torch.bfloat16) if torch else None
        for T in args.tokens or shapes[name]["n_tokens"]:
            x = rng.standard_normal((T, layer.d_model)).astype(np.float32)
            y, routing = layer(x, return_routing=True)
            if T <= 64:  # correctness first (the float64 reference is slow at big T)
                ref, _ = moe.reference.layer_forward(layer, x)
                check("moe fp32", y, ref)
                check("moe bf16", layer_bf16(x), ref)
                check("moe bf16 compute", layer_bf16c(x), ref)
                check("numpy", numpy_layer(layer, w, x), ref)
                if torch:
                    check("torch fp32", tb32(torch.from_numpy(x)).numpy(), ref)
            flops = layer.flops(T)
            # torch (just called) leaves its OpenMP threads spin-waiting for a while: let
            # them go to sleep so they do not take the cores from moe's timed calls
            time.sleep(0.3)
            # 1-8 tokens read each active expert's weights once: every implementation's
            # timed calls start with them out of the caches, as in a model whose other
            # layers ran in between (the same x would otherwise find them in L3)
            cold = flush if T <= 8 else None

            def one_thread():
                moe.set_num_threads(1)
                try:
                    layer(x)
                finally:
                    moe.set_num_threads(threads)

            # NumPy's (OpenBLAS) and torch's (OpenMP) threads spin-wait for a while after a
            # call and would take the cores from the next call (README: oversubscription):
            # a pause after each lets them go to sleep
            fma_r, read_r = [], []
            settle = lambda: time.sleep(0.15)  # noqa: E731
            fns = [(lambda: layer(x), cold), (lambda: layer_bf16(x), cold),
                   (lambda: layer_bf16c(x), cold), (one_thread, cold),
                   (lambda: numpy_layer(layer, w, x), cold, settle)]

            # the ceilings are measured in every round too: on a shared machine they drift,
            # and each round's ratios are taken against that round's figures
            def ceilings_now():
                fma_r.append(fma_peak(threads, 0.1)[0])
                if T <= 8:
                    read_r.append(read_bandwidth(threads, 256))

            if torch:
                xt = torch.from_numpy(x)
                xb = xt.to(torch.bfloat16)
                fns.append((lambda: tb32(xt), cold, settle))
                if amx:  # oneDNN runs it on the tiles: fast enough for the rounds
                    fns.append((lambda: tb16(xb), cold, settle))
            times = interleaved(fns, budget=8.0, pre=1, each_round=ceilings_now)
            ours, ours16, ours16c, ours1, npy = times[:5]
            t32 = times[5] if torch else None
            t16 = times[6] if torch and amx else None
            if torch and not amx:
                # without AMX torch's bf16 loop is slow (seconds at 2048 tokens): alone
                t16 = interleaved([(lambda: tb16(xb), cold)], budget=1.0, min_rounds=2)[0]
            gf = [flops / t / 1e9 for t in ours]
            gflops = statistics.median(gf)
            peak = statistics.median(g / f for g, f in zip(gf, fma_r))
            gbs = ""
            if T <= 8:
                gb = [active_bytes(layer, routing, 4) / t / 1e9 for t in ours]
                frac = statistics.median(g / r for g, r in zip(gb, read_r))
                gbs = (f"{statistics.median(gb):.1f} ({100 * frac:.0f}% of "
                       f"{statistics.median(read_r):.1f})")
            ms = lambda t: "%.2f (%.2f-%.2f)" % tuple(v * 1e3 for v in spread(t))  # noqa: E731
            x_ = lambda num: f"{per_round(num, ours):.2f}x"  # noqa: E731
            gf16c = statistics.median(flops / t / 1e9 for t in ours16c)
            amx_col = f"{gf16c:.0f} ({100 * gf16c / amx:.0f}%)" if amx else f"{gf16c:.0f} (-)"
            if t16 is None:
                vs16 = "-"
            elif amx:
                vs16 = f"{per_round(t16, ours16c):.2f}x"
            else:  # timed apart: the ratio of medians
                vs16 = f"{statistics.median(t16) / statistics.median(ours16c):.2f}x"

            row = (f"| {name} | {T} | {ms(ours)} | {gflops:.1f} | "
                   f"{100 * peak:.0f}% of {statistics.median(fma_r):.0f} | "
                   f"{gbs} | {ms(ours16)} | {per_round(ours, ours16):.2f}x | "
                   f"{ms(ours16c)} | {per_round(ours, ours16c):.2f}x | {amx_col} | "
                   f"{statistics.median(ours1) * 1e3:.2f} ({x_(ours1)}) | {ms(npy)} | "
                   f"{ms(t32) if t32 else '-'} | {ms(t16) if t16 else '-'} | "
                   f"{x_(npy)} | {x_(t32) if t32 else '-'} | {vs16} |")
            rows.append(row)
            print(row, flush=True)
    notes = [
        "",
        "Every implementation of a row is timed in rounds, one call each per round in "
        "rotating order (each after an untimed call of its own; a 0.15 s pause after a NumPy "
        "or torch call), for 8 s (3-15 rounds; torch bf16 in the rounds where the CPU has "
        "AMX, else alone after them): times are "
        "medians (min-max) over rounds, and every ratio (% peak, % read, bf16/fp32, the 1 "
        "thread speed-up, vs numpy, vs torch) is the median over rounds of that round's "
        "ratio, so that the machine's drift (it is shared) cancels. % peak and % read: "
        "against the FMA peak and read bandwidth measured in every round too (their median "
        "after 'of'). moe fp32 1 thread: in brackets, how much faster the threaded run is. "
        "GB/s: bytes of the active experts' weights (fp32) per call; for 1-8 tokens every "
        "implementation's timed calls start with the caches flushed (a read of twice the L3), "
        "so the weights come from memory. bf16/fp32: our bf16-weight speed over our fp32 speed (activations "
        "fp32). moe bf16 compute: bf16 weights and compute_dtype='bfloat16' (inputs and "
        f"hidden activations rounded to bf16), kernel set {info['isa']}, bf16 products by "
        f"{info['bf16_dot']} (amx: TDPBF16PS tiles; vdpbf16ps; fma: two FMAs a pair); "
        "% AMX: of the tile loop's peak (benchmarks/ceilings.c amx, operands already in "
        "tiles). bf16c vs torch bf16: torch's bf16 loop time over ours (oneDNN picks its "
        "AMX kernels where there are tiles).",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(head + rows + notes) + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
