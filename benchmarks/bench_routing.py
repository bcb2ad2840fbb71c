"""Routing benchmark: each router beyond top-k against plain top-k (moe.route), one run.

Issue 8's target: every new router at most 1.5x the time of moe.route for 4096 tokens,
E = 128.  Each router is checked against moe.reference on a slice first, warmed up, then
timed over repeats (routers interleaved, so machine noise hits all alike); the table gives
the median, (min-max), and the ratio of medians to moe.route with the same top-k width.

    python benchmarks/bench_routing.py [--tokens 4096] [--experts 128] [--top-k 8]
        [--repeats 30]
"""
import argparse
import statistics
import time

import numpy as np

import moe
from moe import reference


def routers(logits, k, weights_ids):
    T, E = logits.shape
    ids, w = weights_ids
    allowed = np.random.default_rng(1).random((T, E)) < 0.5
    allowed[:, :k] = True
    return {
        f"route top-{k} (baseline)": lambda: moe.route(logits, k),
        f"route top-{k}, allowed mask (T, E)": lambda: moe.route(logits, k, allowed=allowed),
        "expert choice, cf=1": lambda: moe.route_expert_choice(logits, 1.0),
        "expert choice, cf=2": lambda: moe.route_expert_choice(logits, 2.0),
        f"expert choice, cf={k} (T*k slots)": lambda: moe.route_expert_choice(logits, float(k)),
        f"top-p 0.5, k_max={k}": lambda: moe.route_top_p(logits, 0.5, k_max=k),
        f"top-p 0.5, k_max=E": lambda: moe.route_top_p(logits, 0.5),
        f"threshold 0.01, k_max={k}": lambda: moe.route_threshold(logits, 0.01, k_max=k),
        f"skip_experts on top-{k} (alone)": lambda: moe.skip_experts(ids, w, 0.1,
                                                                     renormalize=True),
    }


def check(logits, k):
    """Each router against the float64 reference on the first 256 tokens."""
    x = logits[:256]
    r = moe.route_expert_choice(x, 1.0)
    ref = reference.route_expert_choice(x, r.capacity)
    assert np.array_equal(r.token_ids, ref["token_ids"]), "expert choice"
    r = moe.route_top_p(x, 0.5, k_max=k)
    assert np.array_equal(r.expert_ids, reference.route_top_p(x, 0.5, k_max=k)["expert_ids"])
    r = moe.route_threshold(x, 0.01, k_max=k)
    assert np.array_equal(r.expert_ids,
                          reference.route_threshold(x, 0.01, k_max=k)["expert_ids"])
    t = moe.route(x, k)
    s = moe.skip_experts(t.expert_ids, t.weights, 0.1)
    assert np.array_equal(s.expert_ids,
                          reference.skip_experts(t.expert_ids, t.weights, 0.1)["expert_ids"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((args.tokens, args.experts)) * 2.0
    check(logits, args.top_k)
    base = moe.route(logits, args.top_k)
    fns = routers(logits, args.top_k, (base.expert_ids, base.weights))
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    print(f"# routing, T={args.tokens}, E={args.experts}, k={args.top_k}, "
          f"{moe.get_num_threads()} threads, median of {args.repeats}")
    print("| router | median ms | (min-max) | / route |")
    print("|---|---:|---:|---:|")
    med0 = statistics.median(times[next(iter(fns))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.3f} | ({min(ts) * 1e3:.3f}-{max(ts) * 1e3:.3f}) | "
              f"{med / med0:.2f}x |")


if __name__ == "__main__":
    main()
