"""Expert parallelism (moe.distributed.ExpertParallelMoE) on local processes: where the
time goes (routing / exchange / compute), bytes moved per token, and the single-process
layer on the same tokens in the same run.

    python benchmarks/bench_ep.py [--worlds 2 4] [--tokens 512] [--rounds 5]
                                  [--shapes mixtral-small qwen3-small] [--out results_ep.md]

Launch: torch.multiprocessing spawn, gloo on loopback (GLOO_SOCKET_IFNAME=lo), a file://
store in a temporary directory.  Every process runs with MOE_NUM_THREADS=1 (and
torch.set_num_threads(1)): this machine may have only 2 cores, so 2 processes x 1 thread
fill it and 4 processes oversubscribe it 2x (the table says so per row).  Loopback gloo on
one host is not a network: the exchange numbers are memory copies through the kernel's
TCP stack plus the wait for the slowest peer, a lower bound on latency, not a model of a
25-100 Gb/s link.

Phases, per rank, the median over `rounds` forward calls (after one warm-up; a barrier
before every call so that the ranks start together):
- routing: router logits + top-k (``ep._route``) + the local dispatch (sort by expert);
- exchange: the time inside the transport's collectives -- the per-expert counts
  (alltoall_counts) and the two all-to-all-v (rows out, results back), measured by a
  Transport wrapper; it includes waiting for the slowest peer (skew, load imbalance);
- compute: the rest of the call -- the local grouped FFN on the rows that arrived (also
  shown alone, "ffn"), the arrival permutation, the combine on the home rank.
ExpertParallelMoE exposes no phase timers, so the benchmark wraps ``ep._route``,
``ep._local_ffn``, the module's ``dispatch`` and the transport in each process (the
library is not changed).  "layer" is the single-process ``layer(x_rank)`` on the same
rank's tokens, timed in the same processes right after (all ranks at once, so under the
same core sharing); each rank checks that ``ep(x_rank)`` equals it bitwise.

Bytes per token (per layer, forward): rows out + results back, float32:
measured = 2 * 4 * d * (slots routed to a remote rank) / tokens; the uniform-routing model is
2 * k * d * 4 * (1 - 1/world).  The counts exchange adds world * E * 8 bytes per call
(not per token).
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _cfg(name):
    with open(os.path.join(HERE, "shapes.json")) as f:
        shapes = json.load(f)
    shapes = shapes.get("cpu", shapes)
    cfg = dict(shapes[name])
    cfg.pop("n_tokens", None)
    return cfg


def _worker(rank, world, init_method, outdir, shapes, tokens, rounds):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MOE_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    import moe
    import moe.distributed as md
    torch.set_num_threads(1)
    moe.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    inner = md.TorchTransport()
    acc = {"exchange": 0.0, "routing": 0.0, "ffn": 0.0, "n_a2a": 0}

    class Timed(md.Transport):
        def __init__(self, t):
            self.t, self.rank, self.world, self.timeout = t, t.rank, t.world, t.timeout

        def _timed(self, fn, *a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                acc["exchange"] += time.perf_counter() - t0
                acc["n_a2a"] += 1

        def alltoall_counts(self, counts):
            return self._timed(self.t.alltoall_counts, counts)

        def alltoallv(self, send, recv_rows=None):
            return self._timed(self.t.alltoallv, send, recv_rows)

        def allreduce_sum(self, array):
            return self.t.allreduce_sum(array)

        def allgather_object(self, obj):
            return self.t.allgather_object(obj)

    orig_dispatch = md.dispatch

    def timed_dispatch(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_dispatch(*a, **kw)
        finally:
            acc["routing"] += time.perf_counter() - t0

    md.dispatch = timed_dispatch
    out = {"rank": rank, "world": world, "results": []}
    tr = Timed(inner)
    for name in shapes:
        cfg = _cfg(name)
        layer = moe.SparseMoE(**cfg, seed=0)
        ep = md.ExpertParallelMoE(layer, tr)
        orig_route, orig_ffn = ep._route, ep._local_ffn

        def route(x2, _f=orig_route):
            t0 = time.perf_counter()
            try:
                return _f(x2)
            finally:
                acc["routing"] += time.perf_counter() - t0

        def ffn(xa, recv, _f=orig_ffn):
            t0 = time.perf_counter()
            try:
                return _f(xa, recv)
            finally:
                acc["ffn"] += time.perf_counter() - t0

        ep._route, ep._local_ffn = route, ffn
        d, k = layer.d_model, layer.top_k
        X = np.random.default_rng(1).standard_normal((world * tokens, d)).astype(np.float32)
        x = np.ascontiguousarray(X[rank * tokens:(rank + 1) * tokens])
        y, routing = ep(x, return_routing=True)  # warm-up
        y1 = layer(x)
        bitwise = bool(np.array_equal(y, y1))
        owner = ep.expert_to_rank[np.asarray(routing.expert_ids).reshape(-1)]
        remote = float((owner != rank).mean())
        rows = {"routing": [], "exchange": [], "compute": [], "ffn": [], "total": [],
                "layer": []}
        for _ in range(rounds):
            dist.barrier()
            for key in ("exchange", "routing", "ffn"):
                acc[key] = 0.0
            t0 = time.perf_counter()
            ep(x)
            tot = time.perf_counter() - t0
            rows["total"].append(tot)
            rows["routing"].append(acc["routing"])
            rows["exchange"].append(acc["exchange"])
            rows["ffn"].append(acc["ffn"])
            rows["compute"].append(tot - acc["routing"] - acc["exchange"])
            dist.barrier()
            t0 = time.perf_counter()
            layer(x)
            rows["layer"].append(time.perf_counter() - t0)
        med = {key: statistics.median(v) * 1e3 for key, v in rows.items()}
        out["results"].append(dict(
            shape=name, d=d, k=k, E=layer.n_experts, F=layer.d_ff, tokens=tokens,
            local_experts=[int(e) for e in ep.local_experts], remote=remote,
            bytes_per_token=2 * 4 * d * k * remote,
            model_bytes_per_token=2 * k * d * 4 * (1 - 1 / world),
            counts_bytes=world * layer.n_experts * 8, bitwise=bitwise, ms=med))
        del ep, layer
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run(world, shapes, tokens, rounds, limit=600):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        ctx = mp.start_processes(_worker, args=(world, init, tmp, shapes, tokens, rounds),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + limit
        for p in ctx.processes:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        reps = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"world {world}: rank {r} wrote no result")
            with open(path) as f:
                reps.append(json.load(f))
        return reps


def table(all_reps, cores, rounds):
    lines = [
        "| shape | tokens/rank | world | procs/cores | rank | local experts | routing ms | "
        "exchange ms | compute ms (ffn) | EP total ms | layer(x_rank) ms | EP/layer | "
        "remote slots | bytes/token measured | model 2kd4(1-1/W) | bitwise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for reps in all_reps:
        world = reps[0]["world"]
        label = f"{world}/{cores}" + (" (oversubscribed)" if world > cores else "")
        for i in range(len(reps[0]["results"])):
            for rep in reps:
                r = rep["results"][i]
                ms = r["ms"]
                lines.append(
                    f"| {r['shape']} (d={r['d']}, F={r['F']}, E={r['E']}, k={r['k']}) | "
                    f"{r['tokens']} | {world} | {label} | {rep['rank']} | "
                    f"{r['local_experts'][0]}-{r['local_experts'][-1]} | "
                    f"{ms['routing']:.1f} | {ms['exchange']:.1f} | "
                    f"{ms['compute']:.1f} ({ms['ffn']:.1f}) | {ms['total']:.1f} | "
                    f"{ms['layer']:.1f} | {ms['total'] / ms['layer']:.2f} | "
                    f"{r['remote']:.3f} | {r['bytes_per_token']:.0f} | "
                    f"{r['model_bytes_per_token']:.0f} | {'yes' if r['bitwise'] else 'NO'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=["mixtral-small", "qwen3-small"])
    ap.add_argument("--out", default=os.path.join(HERE, "results_ep.md"))
    a = ap.parse_args()
    cores = os.cpu_count()
    os.environ["MOE_NUM_THREADS"] = "1"
    t0 = time.monotonic()
    all_reps = [run(w, a.shapes, a.tokens, a.rounds) for w in a.worlds]
    tab = table(all_reps, cores, a.rounds)
    import torch
    head = (
        "# Expert parallelism on local processes (benchmarks/bench_ep.py)\n\n"
        f"`python benchmarks/bench_ep.py --worlds {' '.join(map(str, a.worlds))} "
        f"--tokens {a.tokens} --rounds {a.rounds} --shapes {' '.join(a.shapes)}`; "
        f"{cores} CPU cores, torch {torch.__version__}, gloo on loopback, one thread per "
        "process (MOE_NUM_THREADS=1). Median of "
        f"{a.rounds} forward calls per rank after a warm-up. world > cores: the processes "
        "oversubscribe the cores (every time includes waiting for a core). Loopback gloo on "
        "one host is not a network: the exchange is kernel TCP copies plus the wait for the "
        "slowest peer. \"compute\" = the call minus routing and exchange (the local grouped "
        "FFN -- \"ffn\" -- plus the arrival permutation and the combine). \"layer(x_rank)\": "
        "the single-process SparseMoE on the same rank's tokens, same processes, same run "
        "(it computes all E experts on this rank's tokens; EP computes this rank's experts "
        "on every rank's rows sent to them -- the same FLOPs per rank when the routing is "
        "balanced). Bytes/token: rows out + results back, float32, per layer forward; "
        f"the counts add world*E*8 bytes per call. Wall time {time.monotonic() - t0:.0f} s.\n\n")
    with open(a.out, "w") as f:
        f.write(head + tab + "\n")
    print(head + tab)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
