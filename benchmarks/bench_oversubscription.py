"""Oversubscription: moe's pool (which spins ~0.1 ms before sleeping) when two processes
share the cores, against MOE_POOL_SPIN=0, on the mixtral-small layer.

    python benchmarks/bench_oversubscription.py [--tokens 8 64] [--seconds 8]

For each token count: one process alone, then two at once (each with moe's default thread
count), with the default spin and with MOE_POOL_SPIN=0; medians of per-call times.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

WORKER = """
import statistics, sys, time
import numpy as np
import moe
layer = moe.SparseMoE(1024, 3584, 8, 2, seed=0)
x = np.random.default_rng(0).standard_normal((int(sys.argv[1]), 1024)).astype(np.float32)
layer(x)
ts, end = [], time.time() + float(sys.argv[2])
while time.time() < end:
    t0 = time.perf_counter(); layer(x); ts.append(time.perf_counter() - t0)
print(statistics.median(ts) * 1e3)
"""


def run(n_procs, tokens, seconds, spin):
    env = dict(os.environ)
    if spin is not None:
        env["MOE_POOL_SPIN"] = spin
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tokens), str(seconds)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(n_procs)]
    return [float(p.communicate()[0]) for p in procs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    print("| tokens | spin | alone ms | two processes ms |")
    print("| --- | --- | --- | --- |")
    for T in args.tokens:
        for spin in (None, "0"):
            alone = run(1, T, args.seconds, spin)
            time.sleep(0.5)
            both = run(2, T, args.seconds, spin)
            time.sleep(0.5)
            print(f"| {T} | {'default' if spin is None else 'MOE_POOL_SPIN=0'} | "
                  f"{alone[0]:.2f} | {' / '.join(f'{v:.2f}' for v in both)} |", flush=True)


if __name__ == "__main__":
    main()
