"""Command line: `python -m moe bench` (the main job) and `python -m moe config`.

`bench` runs a SparseMoE layer on a built-in config (default mixtral-small: d=1024,
F=3584, E=8, k=2, 512 tokens), checks it against the float64 reference, and prints time,
tokens/s, GFLOP/s and the expert load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

# The CPU shapes of shared/bench/shapes.json, built in so the job needs no files.
CONFIGS = {
    "mixtral-small": dict(d_model=1024, d_ff=3584, n_experts=8, top_k=2, scoring="softmax",
                          renormalize=True, activation="swiglu"),
    "qwen3-small": dict(d_model=1024, d_ff=384, n_experts=64, top_k=8, scoring="softmax",
                        renormalize=True, activation="swiglu"),
    "deepseek-small": dict(d_model=1024, d_ff=256, n_experts=64, top_k=6, scoring="sigmoid",
                           renormalize=True, activation="swiglu", n_groups=8, topk_groups=4,
                           routed_scaling=2.5, expert_bias=True, n_shared_experts=1,
                           shared_d_ff=256),
}


def bench(config="mixtral-small", n_tokens=512, repeat=5, check=True, seed=0, out=sys.stdout):
    """Time the layer; returns a dict of the measurements."""
    import moe

    layer = moe.SparseMoE(**CONFIGS[config], seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((n_tokens, layer.d_model)).astype(np.float32)
    y, routing = layer(x, return_routing=True)  # warm-up, and the output we check
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = layer.flops(n_tokens)
    result = dict(config=config, n_tokens=n_tokens, median_s=med, min_s=min(times),
                  max_s=max(times), tokens_per_s=n_tokens / med, gflops=flops / med / 1e9,
                  counts=routing.counts.tolist())
    print(f"moe bench: {config} {CONFIGS[config]}", file=out)
    print(f"  tokens:     {n_tokens}", file=out)
    print(f"  time:       median {med * 1e3:.2f} ms  (min {min(times) * 1e3:.2f}, max "
          f"{max(times) * 1e3:.2f}, {repeat} runs)", file=out)
    print(f"  tokens/s:   {n_tokens / med:,.0f}", file=out)
    print(f"  GFLOP/s:    {flops / med / 1e9:.1f}  ({flops / 1e9:.2f} GFLOP per call)", file=out)
    print(f"  expert load: {routing.counts.tolist()}  (aux loss {routing.aux_loss:.4f}, "
          f"z loss {routing.z_loss:.4f})", file=out)
    if check:
        ref, ref_routing = moe.reference.layer_forward(layer, x)
        err = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
        same_ids = bool(np.array_equal(routing.expert_ids, ref_routing["expert_ids"]))
        result.update(max_rel_err=err, ids_match=same_ids)
        print(f"  max error vs float64 reference: {err:.2e} (relative to max |y|); "
              f"expert ids {'identical' if same_ids else 'DIFFER'}", file=out)
    return result


def _positive_int(text):
    """argparse type: an int >= 1 (argparse turns the error into a usage message, exit 2)."""
    try:
        if int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    b = sub.add_parser("bench", help="time a layer on a built-in config",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    b.add_argument("--config", default="mixtral-small", choices=sorted(CONFIGS),
                   help="the layer's shapes and routing (default: %(default)s)")
    b.add_argument("--tokens", type=_positive_int, default=512, metavar="N",
                   help="tokens per call (default: %(default)s)")
    b.add_argument("--repeat", type=_positive_int, default=5, metavar="N",
                   help="timed calls after one warm-up call; the median is reported "
                        "(default: %(default)s)")
    b.add_argument("--no-check", action="store_true",
                   help="skip the check against the float64 reference")
    sub.add_parser("config", help="print the build and CPU configuration")
    args = parser.parse_args(argv)
    import moe

    if args.cmd == "bench":
        moe.show_config()
        bench(args.config, args.tokens, args.repeat, not args.no_check)
    elif args.cmd == "config":
        moe.show_config()
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
