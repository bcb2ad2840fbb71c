"""Helpers shared by the benchmark scripts: the machine's ceilings, its CPU model, timing
and the correctness check every implementation passes before it is timed.  The scripts
run as `python benchmarks/<script>.py`, so this directory is on sys.path."""
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "shapes.json")
LAYER_SHAPES = ["mixtral-small", "qwen3-small", "deepseek-small"]


def layer_args(ap, out, tokens=(1, 8, 512), budget=None):
    """The layer benchmarks' common options on the ArgumentParser ap: --configs (names in
    shapes.json's "cpu" table), --tokens, --budget (seconds per row; only when a default
    is given) and --out (default: benchmarks/<out>)."""
    ap.add_argument("--configs", nargs="+", default=list(LAYER_SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=None if tokens is None else list(tokens))
    if budget is not None:
        ap.add_argument("--budget", type=float, default=budget)
    ap.add_argument("--out", default=os.path.join(HERE, out))
    return ap


def cpu_shape(name):
    """The SparseMoE kwargs of shapes.json's "cpu" shape `name` (without n_tokens)."""
    import json
    with open(SHAPES) as f:
        shape = json.load(f)["cpu"][name]
    return {k: v for k, v in shape.items() if k != "n_tokens"}


def bf16_twin(layer, compute_dtype="float32"):
    """A bfloat16-weight SparseMoE holding `layer`'s weights (rounded to bf16); with
    compute_dtype="bfloat16" its shared experts are bf16 too (bf16 compute needs that)."""
    import moe
    cfg = dict(layer.config(), dtype="bfloat16", compute_dtype=compute_dtype)
    if compute_dtype == "bfloat16" and cfg.get("shared_dtype") is not None:
        cfg["shared_dtype"] = "bfloat16"
    twin = moe.SparseMoE(**cfg, init=False)
    for name in layer._weight_names():
        if getattr(layer, name) is not None:
            setattr(twin, name, getattr(layer, name))
    return twin


_EXE = []


def _ceilings_exe():
    """benchmarks/ceilings.c, built once per process."""
    if not _EXE:
        exe = os.path.join(tempfile.mkdtemp(), "ceilings")
        subprocess.run(["cc", "-O3", "-pthread", os.path.join(HERE, "ceilings.c"), "-o", exe],
                       check=True)
        _EXE.append(exe)
    return _EXE[0]


def fma_peak(threads, seconds=1.0):
    """(FMA GFLOP/s fp32, its ISA) from benchmarks/ceilings.c's register-only loop."""
    fma, isa = subprocess.run([_ceilings_exe(), "fma", str(threads), str(seconds)],
                              capture_output=True, text=True, check=True).stdout.split()
    return float(fma), isa


def read_bandwidth(threads, mib=1024):
    """GB/s of a streaming read of a `mib` MiB buffer (benchmarks/ceilings.c)."""
    return float(subprocess.run([_ceilings_exe(), "read", str(threads), str(mib)],
                                capture_output=True, text=True, check=True).stdout.split()[0])


def amx_peak(threads, seconds=1.0):
    """AMX-BF16 GFLOP/s of benchmarks/ceilings.c's tile loop (operands in tiles), or 0.0
    where the CPU has no AMX or Linux does not grant the tile state."""
    return float(subprocess.run([_ceilings_exe(), "amx", str(threads), str(seconds)],
                                capture_output=True, text=True, check=True).stdout.split()[0])


def ceilings(threads):
    """(FMA GFLOP/s fp32, its ISA, read GB/s) measured by benchmarks/ceilings.c."""
    fma, isa = fma_peak(threads)
    return fma, isa, read_bandwidth(threads)


def l3_bytes():
    """The largest cache's size in bytes (sysfs), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def cache_flusher(threads=1):
    """A callable that reads twice the last-level cache's size, so whatever a timed call
    read before (a layer's weights) comes from memory again in the next one.  With several
    threads each reads a part (NumPy's reductions release the GIL), so that every core has
    just been busy, as after a model's previous layer, when the timed call starts: a core
    left idle for long wakes slowly on a virtual machine."""
    buf = np.ones(2 * l3_bytes() // 4, np.float32)
    if threads <= 1:
        return lambda: float(buf.max())
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(threads)
    parts = np.array_split(buf, threads)
    return lambda: max(pool.map(lambda p: float(p.max()), parts))


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def samples(fn, repeats, warmup=3):
    """Wall times (s) of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns, budget=None, min_rounds=3, max_rounds=15, warmup=1, pre=0,
                each_round=None):
    """Wall times (s) of every fn of `fns` called in rounds, one call of each per round (the
    order rotating), so that all see the same drift of a shared machine: rounds go on until
    `budget` seconds have passed (at least min_rounds, at most max_rounds; no budget: exactly
    max_rounds).  An entry is fn or (fn, before[, after]): before and after (untimed: a
    cache flush, a pause that lets another library's threads stop spinning) go around each
    call.  pre: untimed calls of the same fn (each after its before) right before each
    timed one, so that its library's threads are awake and its data warm as in a run of
    consecutive calls.  each_round (e.g. measuring the ceilings) runs at the start of every
    round.  Returns one list of times per fn, in round order, so that ratios can be taken
    round by round."""
    calls = [(f + (None, None))[:3] if isinstance(f, tuple) else (f, None, None)
             for f in fns]
    for _ in range(warmup):
        for fn, _before, after in calls:
            fn()
            if after is not None:
                after()
    times = [[] for _ in calls]
    t_start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and budget is not None and time.perf_counter() - t_start > budget:
            break
        if each_round is not None:
            each_round()
        for j in range(len(calls)):
            i = (j + r) % len(calls)
            fn, before, after = calls[i]
            for n in range(pre + 1):
                if before is not None:
                    before()
                if n < pre:
                    fn()
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
            if after is not None:
                after()
    return times


def spread(times):
    """(median, min, max) of a list."""
    return statistics.median(times), min(times), max(times)


def per_round(num, den):
    """Median over rounds of num[i] / den[i]: a ratio of two timings taken in the same
    rounds (interleaved), so that the machine's drift cancels."""
    return statistics.median(a / b for a, b in zip(num, den))


def timeit(fn, repeats, warmup=3):
    """(median, min, max) seconds of fn over repeats."""
    return spread(samples(fn, repeats, warmup))


def rel_err(y, ref):
    """max |y - ref| / max |ref| (both as float64)."""
    y = np.asarray(y, np.float64)
    return float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def check(name, y, ref, rtol=1e-4):
    """Stop the benchmark unless y matches ref; returns the error."""
    err = rel_err(y, ref)
    if not err < rtol:
        raise SystemExit(f"{name} does not match the reference (max-abs-normalised error "
                         f"{err:.2e} >= {rtol:.0e})")
    return err


def optional_torch(threads, skip=False):
    """torch set to `threads` threads, or None (skip=True, or torch is not installed)."""
    if skip:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch
