"""Two builds of moe, the same layer calls, interleaved: is a change faster, slower, or the same?

    python benchmarks/bench_ab.py A_ROOT B_ROOT [--tokens 1 64 512] [--rounds 9]

A_ROOT / B_ROOT are directories holding a built moe/ (a checkout after
`python setup.py build_ext --inplace`, or a site-packages).  Each round starts one fresh
process per build in alternating order (the first build of a round alternates too), and
each process times every shape of shapes.json at every token count (median of its calls,
after a warm-up).  Printed: per shape and token count, the median over rounds of each
build's time and of the per-round ratio B / A, with the ratio's spread (min..max).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import moe
shapes, tokens, calls = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
out = {"file": moe.__file__, "isa": moe._C.build_info()["isa"]}
for name, cfg in shapes.items():
    layer = moe.SparseMoE(seed=0, **cfg)
    for T in tokens:
        x = np.random.default_rng(1).standard_normal((T, layer.d_model)).astype(np.float32)
        layer(x)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
        out[f"{name}/T={T}"] = statistics.median(times)
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="root holding the first build's moe/ (the baseline)")
    ap.add_argument("b", help="root holding the second build's moe/")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512],
                    help="token counts per call (default 1 64 512)")
    ap.add_argument("--rounds", type=int, default=9, help="process pairs (default 9)")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per process")
    args = ap.parse_args()
    from moe.__main__ import CONFIGS  # the shapes of shared/bench/shapes.json

    shapes = json.dumps(CONFIGS)
    runs = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("ab" if r % 2 == 0 else "ba"):
            root = getattr(args, side)
            env = dict(os.environ, PYTHONPATH=root, PYTHONSAFEPATH="1")
            proc = subprocess.run([sys.executable, "-c", CHILD, shapes, json.dumps(args.tokens),
                                   str(args.calls)], env=env, capture_output=True, text=True,
                                  cwd=HERE, check=True)
            runs[side].append(json.loads(proc.stdout))
    for side in "ab":
        print(f"{side}: {runs[side][0]['file']} ({runs[side][0]['isa']})")
    print(f"load average: {os.getloadavg()}")
    print(f"{'case':<28}{'A ms':>9}{'B ms':>9}{'B/A':>7}  spread of B/A")
    for key in runs["a"][0]:
        if "/T=" not in key:
            continue
        ratios = [b[key] / a[key] for a, b in zip(runs["a"], runs["b"])]
        print(f"{key:<28}{statistics.median(a[key] for a in runs['a']) * 1e3:9.3f}"
              f"{statistics.median(b[key] for b in runs['b']) * 1e3:9.3f}"
              f"{statistics.median(ratios):7.3f}  {min(ratios):.3f}..{max(ratios):.3f}")


if __name__ == "__main__":
    main()
