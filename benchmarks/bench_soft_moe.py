"""CPU benchmark: moe.SoftMoE against the same Soft MoE forward written in PyTorch.

Shape (default): B=8 groups of m=512 tokens, d_model=1024, d_ff=1024, 16 experts with 4 slots
each (64 slots per group), SwiGLU experts, float32 weights.  PyTorch runs the paper's math
with its own kernels under torch.inference_mode(): einsum logits, two softmaxes, einsum
slot mixing, the expert FFNs as three batched matmuls over (E, B*s, d), and a bmm combine;
same thread count as moe.  Both are checked against moe.reference.soft_moe (float64) before
they are timed (max-abs-normalised error < 1e-4).  Times are medians over repeats after
warm-up, (min-max) beside; moe and torch are timed in separate phases with a pause between
(torch's OpenMP threads spin-wait after each call, and moe's pool spins ~0.1 ms).  GFLOP/s
count the logit, slot and combine GEMMs and the FFN on every slot (SoftMoE.flops); the FMA
peak and read bandwidth of this machine come from benchmarks/ceilings.c in the same run.

    python benchmarks/bench_soft_moe.py [--batch 8] [--tokens 512] [--d-model 1024]
        [--d-ff 1024] [--experts 16] [--slots 4] [--repeats 15] [--no-torch]
"""
import argparse
import os
import platform
import time

import numpy as np

import moe
from _common import ceilings, check, cpu_model, optional_torch, timeit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-4


def ms(t):
    return f"{t[0] * 1e3:.2f} ({t[1] * 1e3:.2f}-{t[2] * 1e3:.2f})"


def torch_soft_moe(layer):
    """The Soft MoE forward in PyTorch over the layer's (float32) weights."""
    import torch
    import torch.nn.functional as F

    E, s, d = layer.n_experts, layer.slots_per_expert, layer.d_model
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    phi = t(layer.phi)
    # (E, d, F) / (E, F, d): x @ w for batched matmuls
    wg = t(layer.w_gate).transpose(1, 2).contiguous()
    wu = t(layer.w_up).transpose(1, 2).contiguous()
    wd = t(layer.w_down).transpose(1, 2).contiguous()

    @torch.inference_mode()
    def forward(x):                                       # (B, m, d)
        B = x.shape[0]
        logits = torch.einsum("bmd,dn->bmn", x, phi)      # (B, m, E*s)
        D = torch.softmax(logits, dim=1)                  # over tokens
        C = torch.softmax(logits, dim=2)                  # over slots
        slots = torch.einsum("bmn,bmd->bnd", D, x)        # (B, E*s, d)
        xs = slots.reshape(B, E, s, d).transpose(0, 1).reshape(E, B * s, d)
        h = F.silu(torch.bmm(xs, wg)) * torch.bmm(xs, wu)
        ys = torch.bmm(h, wd).reshape(E, B, s, d).transpose(0, 1).reshape(B, E * s, d)
        return torch.bmm(C, ys)                           # (B, m, d)

    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    B, m, d, F, E, s = (args.batch, args.tokens, args.d_model, args.d_ff, args.experts,
                        args.slots)

    load = os.getloadavg()[0]
    threads = moe.get_num_threads()
    fma, fma_isa, read = ceilings(threads)
    torch = optional_torch(threads, args.no_torch)

    rng = np.random.default_rng(0)
    layer = moe.SoftMoE(d, F, E, s, seed=0)
    bf16 = moe.SoftMoE(d, F, E, s, dtype="bfloat16", seed=0)
    x = rng.standard_normal((B, m, d)).astype(np.float32)
    flops = layer.flops(B, m)

    # correctness first (float64 reference; groups are independent, so it runs per group)
    ref = moe.reference.soft_moe(x, layer.phi, layer.w_gate, layer.w_up, layer.w_down,
                                 slots_per_expert=s)["out"]
    notes = [f"moe {check('moe SoftMoE', layer(x), ref):.1e}"]
    tfwd = torch_soft_moe(layer) if torch else None
    if tfwd:
        xt = torch.from_numpy(x)
        notes.append(f"torch {check('torch', tfwd(xt).numpy(), ref):.1e}")

    info = moe._C.build_info()
    print(f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, cpu "
          f"features: {info['cpu_features']}")
    print(f"moe {info['version']}: kernels {info['isa']}, {threads} threads; numpy "
          f"{np.__version__}; torch {torch.__version__ if torch else '(not run)'}"
          f"{f' ({torch.get_num_threads()} threads)' if torch else ''}")
    print(f"Ceilings (same run): FMA peak {fma:.0f} GFLOP/s ({fma_isa}, {threads} threads), "
          f"read bandwidth {read:.1f} GB/s; load average at start {load:.2f}")
    print(f"Shape: B={B} groups x m={m} tokens, d_model={d}, d_ff={F}, {E} experts x {s} "
          f"slots, swiglu; {flops / 1e9:.2f} GFLOP per call; max-abs-normalised error vs "
          f"the float64 reference: {', '.join(notes)}")
    print("")
    print("| implementation | ms, median (min-max) | GFLOP/s | % peak | vs torch |")
    print("| --- | --- | --- | --- | --- |")

    time.sleep(0.3)
    rows = [("moe SoftMoE fp32", timeit(lambda: layer(x), args.repeats)),
            ("moe SoftMoE bf16 weights", timeit(lambda: bf16(x), args.repeats))]
    n = moe.get_num_threads()
    try:
        moe.set_num_threads(1)
        rows.append(("moe SoftMoE fp32, 1 thread", timeit(lambda: layer(x), args.repeats)))
    finally:
        moe.set_num_threads(n)
    t_torch = None
    if tfwd:
        time.sleep(0.3)
        t_torch = timeit(lambda: tfwd(xt), args.repeats)
        rows.append(("torch fp32 (einsum + bmm)", t_torch))
    for name, t in rows:
        gf = flops / t[0] / 1e9
        vs = f"{t_torch[0] / t[0]:.2f}x" if t_torch else "-"
        print(f"| {name} | {ms(t)} | {gf:.1f} | {100 * gf / fma:.0f}% | {vs} |")


if __name__ == "__main__":
    main()
