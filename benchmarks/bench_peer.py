"""PEER benchmark: a million single-neuron experts (product-key retrieval) on the CPU, one run.

moe.PEER with n = 1024 sub-keys per half (N = 1,048,576 experts), d_model = 256, 8 heads,
top-16 per head, d_key = 128, per-head keys, 512 tokens (and 1, decode), all threads.
Beside it, the same forward written the way PyTorch PEER code does it (lucidrains'
PEER-pytorch, Algorithm 1 of the paper: einsum scores, topk, the k^2 candidate sums,
topk, embedding gathers of u and v, einsum), float32, same weights and threads.

Checked before timing: moe against moe.reference.peer_forward (brute force over all N
experts, float64) on a few tokens -- ids exactly, outputs to 1e-5 of max|ref| -- and the
PyTorch forward against moe (tokens whose ids agree: max-abs-normalised error < 1e-4; its
float32 scores may rank near-ties differently).  Medians over repeats after a warm-up,
(min-max) beside; moe and torch timed apart (torch's idle threads spin).

Memory: peak RSS (getrusage ru_maxrss) after moe's timing, before torch is imported, next to
the bytes of the weights (u, v dominate: 2 x N x d x 4 B = 2 GiB); target within 2x.
Ceilings (benchmarks/ceilings.c): the fp32 FMA peak (the scoring runs in float64, half of
it) and the read bandwidth; GB/s counts the expert rows gathered, T*H*k*(d + d_out)*4 B.

    python benchmarks/bench_peer.py [--tokens 1 512] [--sub-keys 1024] [--d-model 256]
        [--heads 8] [--top-k 16] [--d-key 128] [--repeats 10] [--no-torch]
"""
import argparse
import os
import resource
import statistics
import time

import numpy as np

import moe
from _common import ceilings, cpu_model  # noqa: E402
from _common import samples as timeit  # noqa: E402
from moe import reference

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 2.0 ** 30


def peak_rss():
    """Peak resident memory of this process so far, bytes (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def check_moe(layer, x):
    out, routing = layer(x, return_routing=True)
    ref = reference.peer_forward(x, layer.w_query, layer.sub_keys_1, layer.sub_keys_2,
                                 layer.u, layer.v, layer.top_k, layer.activation)
    assert np.array_equal(routing.expert_ids, ref["expert_ids"]), "moe ids vs reference"
    err = np.max(np.abs(out - ref["out"])) / np.max(np.abs(ref["out"]))
    assert err < 1e-5, f"moe vs reference: max-abs-normalised error {err:.3g}"
    return err


def torch_peer(layer):
    """PEER's forward as PyTorch code writes it (lucidrains' PEER-pytorch, Algorithm 1)."""
    import torch
    import torch.nn.functional as F

    H, n, k, dk = layer.n_heads, layer.n_sub_keys, layer.top_k, layer.d_key
    wq = torch.from_numpy(layer.w_query.reshape(H * dk, layer.d_model))
    keys = torch.stack([torch.from_numpy(layer.sub_keys_1),
                        torch.from_numpy(layer.sub_keys_2)])
    keys = keys.expand(2, H, n, dk // 2)                              # (2, H, n, dk/2)
    u, v = torch.from_numpy(layer.u), torch.from_numpy(layer.v)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
           "identity": lambda z: z}[layer.activation]

    @torch.inference_mode()
    def forward(x):
        x = torch.from_numpy(x)
        q = (x @ wq.T).view(-1, H, 2, dk // 2).permute(2, 0, 1, 3)  # (2, T, H, dk/2)
        sim = torch.einsum("pthd,phnd->pthn", q, keys)
        (sx, sy), (ix, iy) = sim.topk(k, dim=-1)
        scores = (sx[..., :, None] + sy[..., None, :]).flatten(-2)
        ids = (ix[..., :, None] * n + iy[..., None, :]).flatten(-2)
        scores, pos = scores.topk(k, dim=-1)
        ids = ids.gather(-1, pos)                                     # (T, H, k)
        h = torch.einsum("td,thkd->thk", x, F.embedding(ids, u))
        h = act(h) * scores.softmax(dim=-1)
        return torch.einsum("thk,thkd->td", h, F.embedding(ids, v)).numpy(), ids.numpy()

    return forward


def check_torch(forward, layer, x):
    y_t, ids_t = forward(x)
    y, routing = layer(x, return_routing=True)
    same = (ids_t == routing.expert_ids).all(axis=(1, 2))
    if same.any():
        err = np.max(np.abs(y_t[same] - y[same])) / np.max(np.abs(y[same]))
        assert err < 1e-4, f"torch vs moe: max-abs-normalised error {err:.3g}"
    return float(same.mean())


def ms(ts):
    return (f"{statistics.median(ts) * 1e3:.2f} "
            f"({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--sub-keys", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--d-key", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    threads = moe.get_num_threads()
    rss0 = peak_rss()
    t0 = time.perf_counter()
    layer = moe.PEER(args.d_model, args.sub_keys, args.heads, args.top_k, args.d_key, seed=0)
    t_init = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    xs = {T: rng.standard_normal((T, args.d_model)).astype(np.float32) for T in args.tokens}
    err = check_moe(layer, rng.standard_normal((2, args.d_model)).astype(np.float32))

    H, k, d = layer.n_heads, layer.top_k, layer.d_model
    rows = []
    for T, x in xs.items():
        ts = timeit(lambda: layer(x), max(args.repeats, 3))
        rows.append([T, ts])
    rss = peak_rss()

    torch_times, agree = {}, {}
    if not args.no_torch:
        import torch
        torch.set_num_threads(threads)
        forward = torch_peer(layer)
        for T, x in xs.items():
            agree[T] = check_torch(forward, layer, x)
            torch_times[T] = timeit(lambda: forward(x), max(args.repeats, 3))

    fma, isa, read = ceilings(threads)
    print(f"# PEER: N = {layer.n_experts:,} experts (n = {layer.n_sub_keys}), "
          f"d_model = {d}, d_out = {layer.d_out}, {H} heads, top-{k}, d_key = {layer.d_key}, "
          f"{'per-head' if layer.per_head_keys else 'shared'} keys, {layer.activation}; "
          f"{threads} threads, {cpu_model()}")
    print(f"# ceilings: fp32 FMA peak {fma:.0f} GFLOP/s ({isa}; float64 half that), "
          f"read bandwidth {read:.1f} GB/s")
    print(f"# checked: moe vs float64 brute-force reference over all N (2 tokens): ids equal, "
          f"max-abs-normalised error {err:.2g}")
    print(f"# weights {layer.nbytes / GiB:.3f} GiB; peak RSS {rss / GiB:.3f} GiB "
          f"({rss / layer.nbytes:.2f}x the weights; {rss0 / GiB:.3f} GiB before the layer); "
          f"init {t_init:.1f} s")
    print()
    print("| tokens | moe ms median (min-max) | tokens/s | GFLOP/s | expert rows GB/s "
          "| torch ms | torch tokens/s | moe vs torch | torch ids agree |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for T, ts in rows:
        med = statistics.median(ts)
        gbs = T * H * k * (d + layer.d_out) * 4 / med / 1e9
        line = (f"| {T} | {ms(ts)} | {T / med:,.0f} ({T / max(ts):,.0f}-{T / min(ts):,.0f}) "
                f"| {layer.flops(T) / med / 1e9:.1f} | {gbs:.1f} |")
        if T in torch_times:
            tm = statistics.median(torch_times[T])
            line += (f" {ms(torch_times[T])} | {T / tm:,.0f} | {tm / med:.2f}x | "
                     f"{agree[T]:.1%} |")
        else:
            line += " | | | |"
        print(line)


if __name__ == "__main__":
    main()
