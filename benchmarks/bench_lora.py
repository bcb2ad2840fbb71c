"""CPU benchmark: moe's LoRA-expert layers vs the base GEMM and a PEFT-style PyTorch loop.

For the lora-moe shape of benchmarks/shapes.json (d_in=1024, d_out=1024, 8 experts, rank 16,
top-2) and each token count: moe.TopKLoRA (random lora_b, all threads); the frozen base
alone from the same package (layer.base_forward: the same packed GEMM, no adapters);
PyTorch's F.linear(x, W0) (base alone, same threads); and the same top-k LoRA layer written
the way PEFT / MixLoRA-style code does it (router linear, softmax, topk, renormalise, base
linear, then a Python loop over experts with index_add_), under torch.inference_mode().
Then SoftLoRA, HydraLoRA (dense), FlyLoRA (rank 32, top 8), SMoRA (rank 32, top 8) and
MultiLoRA (8 adapters of rank 16, random adapter ids) at the same shape, each beside the
base time.  Ceilings from the same run: the FMA peak (benchmarks/ceilings.c, a
register-only FMA loop) and the read bandwidth.  GFLOP/s count the base GEMM only,
2 * T * d_in * d_out.  Every implementation is checked before it is timed: moe's layers
against a float64 NumPy y = x W0^T + s * sum_j g_j B_j A_j x over the routing moe returned,
the PyTorch loop against moe (max-abs-normalised error < 1e-4).  Medians over repeats
(after warm-up), (min-max) beside.

    python benchmarks/bench_lora.py [--tokens 1 64 512 2048] [--repeats N] [--no-torch]
        [--train-only] [--train-rounds N] [--out FILE.md]

Then the training step (forward_train + backward) of TopKLoRA and HydraLoRA (dense) against
PEFT-style PyTorch steps under autograd (x, router, A and B trained; W0 frozen), interleaved,
at the token counts >= 64, their gradients checked against each other first.
"""
import argparse
import contextlib
import functools
import io
import json
import os
import platform
import sys
import time

import numpy as np

import moe
from _common import (ceilings, check, cpu_model, interleaved, optional_torch,  # noqa: E402
                     per_round, rel_err, spread, timeit)

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "shapes.json")
RTOL = 1e-4


# ---- machine --------------------------------------------------------------------------


def moe_kernels():
    """The 'cpu kernels' line of moe.show_config() (the ISA the kernels run)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        moe.show_config()
    for line in buf.getvalue().splitlines():
        if line.strip().startswith("cpu kernels:"):
            return line.split(":", 1)[1].split("(")[0].strip()
    return moe._C.build_info()["isa"]


# ---- reference ----------------------------------------------------------------------------

def reference(layer, x, routing, base64):
    """float64 y = x W0^T (+ b0) + sum over the routed slots of c * s * (low-rank term),
    with the expert (or rank) ids and gate weights moe returned.  base64 = x @ W0^T in
    float64 (shared between the layers: they all hold the same W0)."""
    T = x.shape[0]
    x64 = x.astype(np.float64)
    y = base64.copy()
    if getattr(layer, "base_bias", None) is not None:
        y += layer.base_bias
    ids = np.asarray(routing.expert_ids).reshape(T, -1)
    w = np.asarray(routing.weights, np.float64).reshape(T, -1)
    a = layer.lora_a.astype(np.float64)
    b = layer.lora_b.astype(np.float64)
    n = b.shape[0] if b.ndim == 3 else b.shape[1]   # adapters / heads, or ranks
    coef = np.zeros((T, n))                           # summed gate per (token, id)
    rows = np.broadcast_to(np.arange(T)[:, None], ids.shape)
    keep = ids >= 0
    np.add.at(coef, (rows[keep], ids[keep]), w[keep])
    if a.ndim == 3:                                   # one (A_e, B_e) per adapter
        scal = getattr(layer, "scalings", None)
        scal = np.full(n, layer.scaling) if scal is None else scal.astype(np.float64)
        for e in range(n):
            y += (scal[e] * coef[:, e:e + 1]) * ((x64 @ a[e].T) @ b[e].T)
    elif b.ndim == 3:                                 # HydraLoRA: shared A, heads B_e
        z = x64 @ a.T
        for e in range(n):
            y += (layer.scaling * coef[:, e:e + 1]) * (z @ b[e].T)
    else:                                             # ranks as experts (FlyLoRA, SMoRA)
        y += layer.scaling * ((x64 @ a.T) * coef) @ b.T
    return y


# ---- PyTorch peers ---------------------------------------------------------------------------

def torch_peers(layer):
    """(base, route, topk_lora) in PyTorch over the layer's weights.

    topk_lora is the PEFT / MixLoRA-style forward: router linear, softmax, topk,
    renormalise, base linear, a Python loop over experts with index_add_."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    w0, wr = t(layer.base_weight), t(layer.router_weight)
    a, b = t(layer.lora_a), t(layer.lora_b)
    E, k, s = layer.n_experts, layer.top_k, layer.scaling

    @torch.inference_mode()
    def base(x):
        return F.linear(x, w0)

    @torch.inference_mode()
    def route(x):
        probs = F.linear(x, wr).softmax(dim=-1)
        wts, ids = probs.topk(k, dim=-1)
        return ids, wts / wts.sum(dim=-1, keepdim=True)

    @torch.inference_mode()
    def topk_lora(x):
        ids, wts = route(x)
        out = F.linear(x, w0)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            delta = (x[tok] @ a[e].T) @ b[e].T * (s * wts[tok, slot, None])
            out.index_add_(0, tok, delta)
        return out

    return base, route, topk_lora


def torch_train_steps(top, hydra):
    """PEFT-style training steps in PyTorch under autograd: {name: step(x, dy) -> grads}.

    The base W0 is frozen (requires_grad False), the router, A and B are trained and x
    requires grad (the layer sits inside a model).  TopKLoRA as MixLoRA-style code writes
    it (router, softmax, topk, renormalise, base, a Python loop over experts with
    index_add); HydraLoRA as its authors' code (router softmax over the heads, A x once,
    a loop over the heads B_e)."""
    import torch
    import torch.nn.functional as F

    def params(layer):
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
        return (t(layer.base_weight), t(layer.router_weight).requires_grad_(),
                t(layer.lora_a).requires_grad_(), t(layer.lora_b).requires_grad_())

    w0, wr, a, b = params(top)
    E, k, s = top.n_experts, top.top_k, top.scaling

    def topk_step(x, dy):
        for p in (x, wr, a, b):
            p.grad = None
        probs = F.linear(x, wr).softmax(dim=-1)
        wts, ids = probs.topk(k, dim=-1)
        wts = wts / wts.sum(dim=-1, keepdim=True)
        out = F.linear(x, w0)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            delta = (x[tok] @ a[e].T) @ b[e].T * (s * wts[tok, slot, None])
            out.index_add_(0, tok, delta)
        out.backward(dy)
        return {"x": x.grad, "router_weight": wr.grad, "lora_a": a.grad, "lora_b": b.grad}

    hw0, hwr, ha, hb = params(hydra)
    hs = hydra.scaling

    def hydra_step(x, dy):
        for p in (x, hwr, ha, hb):
            p.grad = None
        gate = F.linear(x, hwr).softmax(dim=-1)
        z = x @ ha.T
        out = F.linear(x, hw0)
        for e in range(hydra.n_experts):
            out = out + (z @ hb[e].T) * (hs * gate[:, e:e + 1])
        out.backward(dy)
        return {"x": x.grad, "router_weight": hwr.grad, "lora_a": ha.grad, "lora_b": hb.grad}

    return {"TopKLoRA": topk_step, "HydraLoRA": hydra_step}


def train_row(name, layer, torch_step, T, d_in, d_out, rounds, rng):
    """One training-step row: moe's forward_train + backward against the PyTorch step,
    interleaved; the gradients checked against each other first."""
    import torch
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    dy = rng.standard_normal((T, d_out)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def ours():
        y, ctx = layer.forward_train(x)
        return layer.backward(ctx, dy)

    g, gt = ours(), torch_step(xt, dyt)
    errs = [check(f"{name} d{key} vs torch", g[key], gt[key].numpy().astype(np.float64))
            for key in g]
    settle = lambda: time.sleep(0.1)  # noqa: E731 (torch's threads spin after a call)
    t_ours, t_torch = interleaved([(ours, None, settle),
                                   (lambda: torch_step(xt, dyt), None, settle)],
                                  min_rounds=rounds, max_rounds=rounds, warmup=2)
    sp = per_round(t_torch, t_ours)
    row = (f"| {name} | {T} | {ms(spread(t_ours))} | {ms(spread(t_torch))} | {sp:.2f}x | "
           f"{max(errs):.1e} |")
    return row, sp


def check_torch_loop(route, topk_lora, xt, y_moe, routing):
    """PyTorch loop vs moe.  Tokens whose top-k set differs (a float32 near-tie in the
    router, the two libraries' router GEMMs round differently) are left out and counted."""
    y_t = topk_lora(xt).numpy()
    ids_t = np.sort(route(xt)[0].numpy(), axis=1)
    same = np.all(ids_t == np.sort(routing.expert_ids, axis=1), axis=1)
    n_diff = int((~same).sum())
    if n_diff > max(1, same.size // 100):
        raise SystemExit(f"torch loop: {n_diff} of {same.size} tokens routed differently")
    err = rel_err(y_t[same], np.asarray(y_moe[same], np.float64)) if same.any() else 0.0
    if not err < RTOL:
        raise SystemExit(f"torch loop does not match moe (max-abs-normalised error "
                         f"{err:.2e} >= {RTOL:.0e})")
    return err, n_diff


# ---- timing --------------------------------------------------------------------------------


def timeit_pair(fn_a, fn_b, repeats, warmup=3):
    """Time two functions in alternation (a, b, b, a, ...) so that both see the same
    machine state; returns their (median, min, max)."""
    ta, tb = interleaved([fn_a, fn_b], max_rounds=repeats, warmup=warmup)
    return spread(ta), spread(tb)


def ms(t):
    return f"{t[0] * 1e3:.3f} ({t[1] * 1e3:.3f}-{t[2] * 1e3:.3f})"


# ---- main ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="token counts (default: the shape's n_tokens)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per measurement (default 20, 10 above 512 tokens)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--train-only", action="store_true",
                    help="only the training-step table (forward + backward vs PyTorch)")
    ap.add_argument("--train-rounds", type=int, default=9,
                    help="interleaved rounds per training-step row")
    ap.add_argument("--out", default=os.path.join(HERE, "results_lora.md"))
    args = ap.parse_args()

    with open(SHAPES) as f:
        shape = json.load(f)["cpu"]["lora-moe"]
    d_in, d_out, E, r, k = (shape[n] for n in ("d_in", "d_out", "n_experts", "rank", "top_k"))
    tokens = args.tokens or shape["n_tokens"]

    load = os.getloadavg()[0]
    threads = moe.get_num_threads()
    fma, fma_isa, read = ceilings(threads)
    torch = optional_torch(threads, args.no_torch)

    rng = np.random.default_rng(0)

    def randomise_b(layer):
        layer.lora_b = (rng.standard_normal(layer.lora_b.shape) * 0.02).astype(np.float32)
        return layer

    top = randomise_b(moe.TopKLoRA(d_in, d_out, E, r, k))
    w0 = top.base_weight
    others = [
        ("SoftLoRA", f"E={E} r={r} dense", moe.SoftLoRA(d_in, d_out, E, r)),
        ("HydraLoRA", f"E={E} r={r} dense", moe.HydraLoRA(d_in, d_out, E, r, top_k=None)),
        ("FlyLoRA", "r=32 top-8", moe.FlyLoRA(d_in, d_out, rank=32, top_k=8)),
        ("SMoRA", "r=32 top-8", moe.SMoRA(d_in, d_out, rank=32, top_k=8)),
        ("MultiLoRA", f"{E} adapters r={r}", moe.MultiLoRA(d_in, d_out, n_adapters=E, rank=r)),
    ]
    for _, _, layer in others:
        layer.base_weight = w0
        randomise_b(layer)
    tbase = troute = tloop = None
    if torch:
        tbase, troute, tloop = torch_peers(top)

    info = moe._C.build_info()
    head = [
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, "
        f"cpu features: {info['cpu_features']}",
        f"moe {info['version']}: kernels {moe_kernels()}, {threads} threads; numpy "
        f"{np.__version__}; torch {torch.__version__ if torch else '(not run)'}"
        f"{f' ({torch.get_num_threads()} threads)' if torch else ''}",
        f"Ceilings (same run): FMA peak {fma:.0f} GFLOP/s ({fma_isa}, {threads} threads), "
        f"read bandwidth {read:.1f} GB/s ({threads} threads); load average at start "
        f"{load:.2f} (other work on the cores skews every column)",
        f"Shape lora-moe: d_in={d_in}, d_out={d_out}, {E} experts, rank {r}, top-{k}; "
        f"float32 weights; times in ms, median (min-max)",
        "",
        "| tokens | moe base ms | GFLOP/s | % peak | moe TopKLoRA ms | TopKLoRA / base | "
        "torch base ms | torch GFLOP/s | torch PEFT-loop ms | TopKLoRA vs torch loop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if args.train_only:
        head = head[:-3]
    print("\n".join(head), flush=True)
    rows, other_rows, checks, targets = [], [], [], []
    for T in ([] if args.train_only else tokens):
        repeats = args.repeats or (20 if T <= 512 else 10)
        x = rng.standard_normal((T, d_in)).astype(np.float32)
        base64 = x.astype(np.float64) @ w0.astype(np.float64).T

        # correctness first
        y, routing = top(x, return_routing=True)
        e_top = check("moe TopKLoRA", y, reference(top, x, routing, base64))
        e_base = check("moe base", top.base_forward(x), base64)
        note = f"T={T}: TopKLoRA {e_top:.1e}, base {e_base:.1e}"
        adapter_ids = rng.integers(0, E, T)
        calls = {}
        for name, _, layer in others:
            extra = (adapter_ids,) if name == "MultiLoRA" else ()
            yo, ro = layer(x, *extra, return_routing=True)
            note += f", {name} {check(name, yo, reference(layer, x, ro, base64)):.1e}"
            calls[name] = (lambda layer=layer, extra=extra: layer(x, *extra))

        # timing: moe first, then torch (checked just before it is timed).  torch's OpenMP
        # threads spin-wait after each call, and moe's pool spins ~0.1 ms: a pause between
        # the two keeps either from timing the other's idle threads.
        time.sleep(0.3)
        base_call = functools.partial(top.base_forward, x)
        t_top, t_base = timeit_pair(lambda: top(x), base_call, repeats)
        t_tb = t_tl = None
        if torch:
            xt = torch.from_numpy(x)
            e_tb = check("torch base", tbase(xt).numpy(), base64)
            e_tl, n_diff = check_torch_loop(troute, tloop, xt, y, routing)
            note += f", torch base {e_tb:.1e}, torch loop vs moe {e_tl:.1e}"
            if n_diff:
                note += f" ({n_diff} near-tie tokens routed differently, left out)"
            t_tb = timeit(lambda: tbase(xt), repeats)
            t_tl = timeit(lambda: tloop(xt), repeats)
        checks.append(note)
        flops = 2 * T * d_in * d_out
        gf = flops / t_base[0] / 1e9
        ratio = t_top[0] / t_base[0]
        row = (f"| {T} | {ms(t_base)} | {gf:.1f} | {100 * gf / fma:.0f}% | {ms(t_top)} | "
               f"{ratio:.2f}x | {ms(t_tb) if t_tb else '-'} | "
               f"{f'{flops / t_tb[0] / 1e9:.1f}' if t_tb else '-'} | "
               f"{ms(t_tl) if t_tl else '-'} | "
               f"{f'{t_tl[0] / t_top[0]:.2f}x' if t_tl else '-'} |")
        rows.append(row)
        print(row, flush=True)
        if T == 512:
            targets.append(f"TopKLoRA / base at 512 tokens: {ratio:.2f}x (target <= 1.3x: "
                           f"{'met' if ratio <= 1.3 else 'MISSED'})")
            if t_tl:
                sp = t_tl[0] / t_top[0]
                targets.append(f"TopKLoRA vs torch PEFT loop at 512 tokens: {sp:.2f}x "
                               f"(target >= 2x: {'met' if sp >= 2 else 'MISSED'})")
        time.sleep(0.3)
        for name, cfg, _ in others:
            t, tb = timeit_pair(calls[name], base_call, repeats)
            other_rows.append(f"| {name} | {cfg} | {T} | {ms(t)} | {ms(tb)} | "
                              f"{t[0] / tb[0]:.2f}x |")

    other_head = [
        "",
        "Other layers at the same shape (same W0, random lora_b), each timed in "
        "alternation with the base GEMM:",
        "",
        "| layer | adapters | tokens | layer ms | moe base ms | layer / base |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if args.train_only:
        other_head = []
    print("\n".join(other_head + other_rows), flush=True)
    train_lines = []
    if torch:
        hydra = dict((name, layer) for name, _, layer in others)["HydraLoRA"]
        steps = torch_train_steps(top, hydra)
        train_lines = [
            "",
            "Training step (forward + backward; x, the router, A and B get gradients, W0 "
            "frozen), moe vs a PEFT-style PyTorch step under autograd, interleaved:",
            "",
            "| layer | tokens | moe fwd+bwd ms | torch fwd+bwd ms | moe vs torch | "
            "grads vs torch |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        print("\n".join(train_lines), flush=True)
        for T in [t for t in tokens if t >= 64]:
            for name, layer in (("TopKLoRA", top), ("HydraLoRA", hydra)):
                row, sp = train_row(name, layer, steps[name], T, d_in, d_out,
                                    args.train_rounds, rng)
                print(row, flush=True)
                train_lines.append(row)
                if T == 512:
                    targets.append(f"{name} training step vs torch at 512 tokens: "
                                   f"{sp:.2f}x (target >= 2x: "
                                   f"{'met' if sp >= 2 else 'MISSED'})")
        train_lines += [
            "",
            "moe: layer.forward_train(x) then layer.backward(ctx, dy) (dx, d router_weight, "
            "d lora_a, d lora_b; A x recomputed, dx through the base's cached transposed "
            "pack with the adapters fused).  torch TopKLoRA: router linear, softmax, topk, "
            "renormalise, F.linear base, per expert where / (x[tok] @ A_e.T) @ B_e.T * s * "
            "w / index_add_ (in place), then out.backward(dy); HydraLoRA (dense): softmax gate, A x once, "
            "per head (z @ B_e.T) * s * g_e.  A 0.1 s pause after each step (torch's threads "
            "spin); medians (min-max) over rounds; moe vs torch: the median of the per-round "
            "ratios.  grads vs torch: the largest max-abs-normalised difference over the four "
            "gradients.",
        ]
    notes = [
        "",
        "moe base: layer.base_forward(x), the packed base GEMM alone, timed in "
        "alternation with TopKLoRA (call by call).  GFLOP/s: "
        "2 * T * d_in * d_out over the base time (torch GFLOP/s: over F.linear's).  "
        "TopKLoRA / base: the adapters' and router's cost over the base GEMM.  torch "
        "PEFT-loop: router linear, softmax, topk, renormalise, F.linear base, then per "
        "expert where / (x[tok] @ A_e.T) @ B_e.T * s * w / index_add_, under "
        "inference_mode.  vs torch loop: its time over TopKLoRA's.",
        "Checks (max-abs-normalised error; moe and torch base vs float64 NumPy, torch loop "
        "vs moe): " + "; ".join(checks),
    ] + ([""] + targets if targets else [])
    print("\n".join(["", "Checks: " + "; ".join(checks)] + targets), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(head + rows + other_head + other_rows + train_lines + notes)
                + "\n")
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
