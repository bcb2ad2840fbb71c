"""Oversubscription, on the mixtral-small layer:
1. two processes sharing the cores: moe's pool (which spins ~0.1 ms before sleeping)
   against MOE_POOL_SPIN=0; one process alone, then two at once (each with moe's default
   thread count);
2. other pools in the same process: each moe call right after an OpenBLAS matmul
   (NumPy, its threads) or a PyTorch matmul (its OpenMP threads), against moe calls alone;
   by default, and with those pools' spin-waits cut short (QUIET_POOLS).

    python benchmarks/bench_oversubscription.py [--tokens 8 64] [--seconds 8]

Medians of per-call times of the moe call only.
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


IN_PROCESS = """
import statistics, sys, time
import numpy as np
import moe
layer = moe.SparseMoE(1024, 3584, 8, 2, seed=0)
x = np.random.default_rng(0).standard_normal((int(sys.argv[1]), 1024)).astype(np.float32)
a = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)
b = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
other = {"alone": lambda: None, "numpy": lambda: a @ b}
try:
    import torch
    torch.set_num_threads(moe.get_num_threads())
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    other["torch"] = lambda: at @ bt
except ImportError:
    pass
layer(x)
out = {}
for _ in range(2):  # rounds, interleaved
    for name, fn in other.items():
        ts, end = out.setdefault(name, []), time.time() + float(sys.argv[2]) / 2
        while time.time() < end:
            fn()  # its pool is awake when moe starts
            t0 = time.perf_counter(); layer(x); ts.append(time.perf_counter() - t0)
print(" ".join(f"{k}={statistics.median(v) * 1e3:.2f}" for k, v in out.items()))
"""


# The other pools' spin-waits after a call, cut short: OpenBLAS's (2^4 cycles instead of
# its default 2^28) and the OpenMP runtime's that torch uses.
QUIET_POOLS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}


def in_process(tokens, seconds, env=None):
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, str(tokens), str(seconds)],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, **(env or {})))
    return dict(kv.split("=") for kv in proc.stdout.split())


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
    print()
    print("| tokens | other pools | moe alone ms | moe right after a NumPy matmul ms | "
          "moe right after a torch matmul ms |")
    print("| --- | --- | --- | --- | --- |")
    for T in args.tokens:
        for label, env in (("default", None),
                           (" ".join(f"{k}={v}" for k, v in QUIET_POOLS.items()),
                            QUIET_POOLS)):
            r = in_process(T, args.seconds, env)
            print(f"| {T} | {label} | {r['alone']} | {r['numpy']} | {r.get('torch', '-')} |",
                  flush=True)


if __name__ == "__main__":
    main()
