"""Concurrency and sizes (issue 7): 8 Python threads sharing one layer (and moe.route,
moe.expert_ffn) get the serial results bit for bit; the GIL is really released (two threads
finish independent calls faster than one thread does them in turn); fork() after use leaves a
working library; index arithmetic past 2^31 (elements and bytes) is right; absurd shapes and
failed allocations end in MemoryError / ValueError, never a crash -- those run in a child
process, so that a crash fails the test instead of killing pytest.
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import pytest

import moe
import childproc
from conftest import skip_under_asan

DEEPSEEK = dict(scoring="sigmoid", renormalize=True, expert_bias=True, n_groups=4,
                topk_groups=2, routed_scaling=2.5, n_shared_experts=1)


def run_child(code, *args, timeout=180):
    """Run code in a fresh Python that imports this moe; (returncode, stdout, stderr)."""
    try:
        proc = childproc.python(textwrap.dedent(code), *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # (run() has killed it)
        so_far = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the child was still running after {timeout} s; its output so far:\n"
                    f"{so_far}")
    return proc.returncode, proc.stdout, proc.stderr


def died(rc):
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


# ---- 1. eight threads, one layer -------------------------------------------------------------

@pytest.mark.parametrize("n_threads", [1, 2])
def test_eight_threads_match_serial_bitwise(make, threads, n_threads):
    threads(n_threads)
    layer = make.layer(48, 96, 16, 2, dtype="bfloat16", **DEEPSEEK)
    capped = make.layer(32, 64, 8, 2, capacity_factor=1.0)
    xs = [make.normal(T, 48) for T in (1, 3, 64, 129, 300)]
    logits = [make.logits(T, 16) for T in (1, 70, 257)]
    w = make.expert_weights(8, 40, 32)
    packed = moe.pack_experts(*w)
    counts = [np.array([0, 3, 0, 40, 1, 0, 66, 2]), np.array([1, 0, 0, 0, 0, 0, 0, 0])]
    rows = [make.normal(int(c.sum()), 32) for c in counts]
    x_cap = make.normal(200, 32)

    tasks = []  # (name, fn): each is a pure function of its inputs
    for i, x in enumerate(xs):
        tasks.append((f"layer[{i}]", lambda x=x: layer(x)))
        tasks.append((f"layer[{i}] routing", lambda x=x: layer(x, return_routing=True)[1]))
    for i, lg in enumerate(logits):
        tasks.append((f"route[{i}]", lambda lg=lg: moe.route(lg, 4, n_groups=4, topk_groups=2,
                                                            capacity_factor=1.25)))
    for i, (c, r) in enumerate(zip(counts, rows)):
        off = make.offsets(c)
        tasks.append((f"expert_ffn[{i}] packed",
                      lambda r=r, off=off: moe.expert_ffn(r, off, packed)))
        tasks.append((f"expert_ffn[{i}] weights",
                      lambda r=r, off=off: moe.expert_ffn(r, off, *w, dtype="float16")))
    tasks.append(("capacity layer", lambda: capped(x_cap, return_routing=True)))

    def flat(result):
        if isinstance(result, tuple):
            return [a for part in result for a in flat(part)]
        return [np.asarray(result)]

    serial = [flat(fn()) for _, fn in tasks]
    errors = []
    barrier = threading.Barrier(8)

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(tasks) * 3) % len(tasks)
        barrier.wait()
        for i in order:
            name, fn = tasks[i]
            try:
                got = flat(fn())
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(f"thread {seed}, {name}: {exc!r}")
                continue
            if len(got) != len(serial[i]) or not all(
                    a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, serial[i])):
                errors.append(f"thread {seed}, {name}: differs from the serial call")

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in pool), "a thread hung"
    assert not errors, errors[:8]


# ---- 2. the GIL is released ------------------------------------------------------------------

def test_gil_is_released_during_layer_calls(make, threads):
    # While one thread is inside a long layer call, this thread must keep running Python:
    # it stamps the clock every millisecond, and stamps must fall in the middle of the call.
    # With the GIL held there would be none (this thread could not run at all), however busy
    # or quiet the machine; nothing here compares durations.
    threads(1)  # the call runs on its caller's thread only
    layer = make.layer(256, 512, 8, 2)
    probe = make.normal(128, 256)
    layer(probe)  # packed, workspaces grown
    t0 = time.perf_counter()
    layer(probe)
    per_token = (time.perf_counter() - t0) / 128
    x = make.normal(int(min(max(0.3 / max(per_token, 1e-9), 128), 200_000)), 256)
    span = []

    def call():
        span.append(time.perf_counter())
        layer(x)
        span.append(time.perf_counter())

    worker = threading.Thread(target=call)
    stamps = []
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    t_in, t_out = span
    quarter = (t_out - t_in) / 4
    inside = [t for t in stamps if t_in + quarter < t < t_out - quarter]
    assert len(inside) >= 5, (
        f"this thread ran {len(inside)} times in the middle half of a {t_out - t_in:.3f} s "
        f"layer call on another thread ({len(stamps)} stamps in all): the GIL is held "
        "during the call")


# ---- 3. fork after use -----------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_fork_after_use(make, threads):
    threads(2)
    layer = make.layer(32, 64, 8, 2)
    big, one = make.normal(500, 32), make.normal(1, 32)
    want_big, want_one = layer(big), layer(one)  # the pool's workers are running now
    logits = make.logits(300, 8)
    want_ids = moe.route(logits, 2).expert_ids

    def child():
        ok = np.array_equal(layer(big), want_big)          # pool path: new workers
        ok &= np.array_equal(layer(one), want_one)         # one task: the caller's thread
        moe.set_num_threads(1)                             # no pool at all
        ok &= np.array_equal(layer(big), want_big)
        ok &= np.array_equal(moe.route(logits, 2).expert_ids, want_ids)
        return bool(ok)

    pid = os.fork()
    if pid == 0:  # never return into pytest from the child
        code = 3
        try:
            code = 0 if child() else 1
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0, \
        f"forked child: {os.waitstatus_to_exitcode(status)} (1: wrong results, 2: raised)"
    assert np.array_equal(layer(big), want_big), "the parent after fork()"


# ---- 4. 64-bit index arithmetic --------------------------------------------------------------

# Offsets past 2^31 elements and past 2^31 bytes, on arrays that are mostly never touched:
# np.empty maps the pages lazily, so only the rows written here become resident (a few MB).
_BIG_INDEX_CHILD = """
    import sys
    import numpy as np
    import moe

    n_rows, d = int(sys.argv[1]), int(sys.argv[2])
    try:
        y = np.empty((n_rows, d), np.float32)
    except MemoryError:
        print("SKIP cannot map", n_rows * d * 4, "bytes")
        sys.exit(0)
    rng = np.random.default_rng(0)
    picked = [n_rows - 1, 0, n_rows // 2 + 1, n_rows - 2]
    for r in picked:
        y[r] = rng.standard_normal(d)
    last = n_rows - 1
    assert last * d >= 2**31 or last * d * 4 >= 2**31

    # combine: rows far beyond 2^31 elements / bytes
    position = np.array([[last, 0], [picked[2], -1], [-1, -1], [last, picked[3]]])
    weights = rng.standard_normal((4, 2)).astype(np.float32)
    out = moe.combine(y, position, weights)
    y64 = {r: y[r].astype(np.float64) for r in picked}
    for t in range(4):
        want = sum(weights[t, j] * y64[int(p)] for j, p in enumerate(position[t]) if p >= 0)
        want = np.zeros(d) if isinstance(want, int) else want
        err = np.abs(out[t] - want).max()
        assert err <= 1e-5 * (1 + np.abs(want).max()), ("combine", t, err)

    # dispatch: the same array as the tokens, a few of them routed
    ids = np.full((n_rows, 1), -1, np.int32)
    ids[last, 0] = 2
    ids[0, 0] = 1
    ids[picked[2], 0] = 2
    res = moe.dispatch(y, ids, 3)
    assert res.offsets.tolist() == [0, 0, 1, 3], res.offsets
    assert res.token_index.tolist() == [0, picked[2], last], res.token_index
    for row, t in enumerate(res.token_index):
        assert np.array_equal(res.x_sorted[row].view(np.uint32), y[t].view(np.uint32)), row
    print("OK", n_rows, d, n_rows * d, "elements")
"""


@pytest.mark.parametrize("what,n_rows,d", [
    ("bytes > 2^31", 2**13 + 3, 2**16),           # 2 GiB + 192 KiB mapped
    ("elements > 2^31", 2**15 + 3, 2**16),        # 8 GiB + 192 KiB mapped
])
def test_index_arithmetic_past_2_31(what, n_rows, d):
    rc, out, err = run_child(_BIG_INDEX_CHILD, n_rows, d)
    assert rc == 0, f"{what}: child {died(rc)}\n{err[-3000:]}"
    if out.startswith("SKIP"):
        pytest.skip(out.strip())
    assert out.startswith("OK"), out


# Absurd sizes, under an address-space limit a little above what the child uses, so that
# whatever is asked for fails fast instead of swapping the machine.
_ABSURD_CHILD = """
    import resource, sys
    import numpy as np
    import moe

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    layer = moe.SparseMoE(16, 8, 4, 2)
    layer(np.ones((3, 16), np.float32))
    extra = int(float(sys.argv[1]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + extra, resource.RLIM_INFINITY))
    huge = lambda *shape: np.broadcast_to(np.float32(1.0), shape)  # noqa: E731
    f32 = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731

    cases = {
        "route(logits (2^40, 8) zero-stride)": lambda: moe.route(
            np.broadcast_to(0.0, (2**40, 8)), 2),
        "route(logits (0, 2^31 - 1))": lambda: moe.route(np.zeros((0, 2**31 - 1)), 1),
        "route(logits (0, 2^31))": lambda: moe.route(np.zeros((0, 2**31)), 1),
        "dispatch(x (2^40, 2^10) zero-stride)": lambda: moe.dispatch(
            huge(2**40, 2**10), np.zeros((1, 1), np.int32), 4),  # x is converted first
        "dispatch(n_experts 2^31 - 1)": lambda: moe.dispatch(
            zeros(3, 4), np.zeros((3, 2), np.int32), 2**31 - 1),
        "combine(y (2^40, 64) zero-stride)": lambda: moe.combine(
            huge(2**40, 64), np.zeros((1, 1)), f32(1, 1)),
        "combine(y (0, 2^40) -> out (4, 2^40))": lambda: moe.combine(
            zeros(0, 2**40), np.full((4, 2), -1), f32(4, 2)),
        "combine(position (0, 2^31) slots)": lambda: moe.combine(
            zeros(0, 4), np.zeros((0, 2**31), np.int64), zeros(0, 2**31)),
        "expert_ffn(x (2^40, 16) zero-stride)": lambda: moe.expert_ffn(
            huge(2**40, 16), np.array([0, 2**40]), *[f32(*s) for s in ((1, 8, 16),) * 2],
            f32(1, 16, 8)),
        "expert_ffn(weights (2^10, 2^20, 2^20) zero-stride)": lambda: moe.expert_ffn(
            zeros(1, 2**20), np.array([0] * 2**10 + [1]), huge(2**10, 2**20, 2**20),
            huge(2**10, 2**20, 2**20), huge(2**10, 2**20, 2**20)),
        "ffn(w_up (2^30, 2^20) zero-stride)": lambda: moe.ffn(
            zeros(2, 2**20), None, huge(2**30, 2**20), huge(2**20, 2**30), activation="relu"),
        "pack_experts((2^20, 2^20, 2^10) zero-stride)": lambda: moe.pack_experts(
            None, huge(2**20, 2**20, 2**10), huge(2**20, 2**10, 2**20), activation="gelu"),
        "SparseMoE(d_model=2^40)": lambda: moe.SparseMoE(2**40, 8, 4, 2),
        "SparseMoE(n_experts=2^31 - 1, d_ff=2^20)": lambda: moe.SparseMoE(4, 2**20, 2**31 - 1, 1),
        "layer(x (2^40, 16) zero-stride)": lambda: layer(huge(2**40, 16)),
        "layer(x (2^20, 2^20, 16) zero-stride)": lambda: layer(huge(2**20, 2**20, 16)),
    }
    for name, fn in cases.items():
        try:
            fn()
            print(f"{name}: ok", flush=True)
        except (MemoryError, ValueError, TypeError, OverflowError) as exc:
            print(f"{name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    print("DONE")
"""

ABSURD_EXPECTED = {
    "route(logits (2^40, 8) zero-stride)": (MemoryError, ValueError),
    "route(logits (0, 2^31 - 1))": (MemoryError,),   # counts (E,) int64: 16 GiB
    "route(logits (0, 2^31))": (ValueError,),        # E must fit int32
    "dispatch(x (2^40, 2^10) zero-stride)": (MemoryError, ValueError),
    "dispatch(n_experts 2^31 - 1)": (MemoryError,),  # offsets (E + 1,) int64: 16 GiB
    "combine(y (2^40, 64) zero-stride)": (MemoryError, ValueError),
    "combine(y (0, 2^40) -> out (4, 2^40))": (MemoryError,),
    "combine(position (0, 2^31) slots)": (ValueError,),  # top_k must fit int32
    "expert_ffn(x (2^40, 16) zero-stride)": (MemoryError, ValueError),
    "expert_ffn(weights (2^10, 2^20, 2^20) zero-stride)": (MemoryError, ValueError),
    "ffn(w_up (2^30, 2^20) zero-stride)": (MemoryError, ValueError),
    "pack_experts((2^20, 2^20, 2^10) zero-stride)": (MemoryError, ValueError),
    "SparseMoE(d_model=2^40)": (MemoryError, ValueError),
    "SparseMoE(n_experts=2^31 - 1, d_ff=2^20)": (MemoryError, ValueError),
    "layer(x (2^40, 16) zero-stride)": (MemoryError, ValueError),
    "layer(x (2^20, 2^20, 16) zero-stride)": (MemoryError, ValueError),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc (Linux)")
@skip_under_asan
def test_absurd_shapes_raise_instead_of_crashing():
    rc, out, err = run_child(_ABSURD_CHILD, 2.0)
    assert rc == 0 and "DONE" in out, f"child {died(rc)} after:\n{out}\n{err[-3000:]}"
    got = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    problems = []
    for name, allowed in ABSURD_EXPECTED.items():
        result = got.get(name, "missing")
        if result.split(":")[0] not in {e.__name__ for e in allowed}:
            problems.append(f"{name}: {result} (expected {'/'.join(e.__name__ for e in allowed)})")
    assert not problems, "\n".join(problems)


_SLOTS_CHILD = """
    # expert_ids with 2^31 slots per token: 8 GiB of zeros that are never written (calloc),
    # under an address-space limit that keeps a full answer (another 32 GiB) out of reach.
    import resource
    import numpy as np
    import moe

    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 26 * 2**30, resource.RLIM_INFINITY))
    try:
        ids = np.zeros((1, 2**31), np.int32)  # every slot goes to expert 0
    except MemoryError:
        print("SKIP cannot map 8 GiB")
        raise SystemExit(0)
    try:
        res = moe.dispatch(np.zeros((1, 0), np.float32), ids, 1)
    except (MemoryError, ValueError) as exc:
        print("RAISED", type(exc).__name__, exc)
    else:
        print("RESULT", res.offsets.tolist(), res.token_index.shape, res.position.shape)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc (Linux)")
def test_dispatch_with_2_31_slots_per_token():
    # top_k is int32 in the core: 2^31 slots must be refused (as combine refuses them) or
    # dispatched in full -- offsets [0, 2^31] -- never truncated.
    rc, out, err = run_child(_SLOTS_CHILD)
    assert rc == 0, f"child {died(rc)}\n{err[-3000:]}"
    if out.startswith("SKIP"):
        pytest.skip(out.strip())
    assert out.startswith("RAISED") or out.startswith(f"RESULT [0, {2**31}]"), (
        "moe.dispatch(np.zeros((1, 0), np.float32), np.zeros((1, 2**31), np.int32), 1): "
        f"expected ValueError / MemoryError or offsets [0, 2147483648], got {out.strip()}")


_EMPTY_PANELS_CHILD = """
    import sys, time
    import numpy as np
    import moe
    big = 2**40
    t0 = time.monotonic()
    for w_up, w_down in (((1, 0, big), (1, big, 0)), ((1, big, 0), (1, 0, big))):
        packed = moe.pack_experts(None, np.empty(w_up, np.float32), np.empty(w_down, np.float32),
                                  activation="relu")
        x = np.empty((0, packed.d_model), np.float32)
        out = moe.expert_ffn(x, np.array([0, 0]), packed, activation="relu")
        assert out.shape == (0, packed.d_model)
        print("packed", w_up, "in", round(time.monotonic() - t0, 2), "s", flush=True)
    print("DONE")
"""


def test_zero_size_weights_with_a_huge_dimension_are_prompt():
    # (1, 0, 2^40) / (1, 2^40, 0) weights hold nothing: packing them must not take one task
    # per (empty) panel -- 2^36 of them, half an hour of work on this machine.
    rc, out, err = run_child(_EMPTY_PANELS_CHILD, timeout=20)
    assert rc == 0 and "DONE" in out, f"child {died(rc)}:\n{out}\n{err[-3000:]}"


# ---- 5. allocation failure is a MemoryError --------------------------------------------------

_ALLOC_CHILD = """
    # Each case: build the inputs, then cap the address space a little above what the process
    # maps now, call, and expect MemoryError from the core (its message names the status);
    # then lift the cap and check the library still gives the same answers as before.
    import resource, sys
    import numpy as np
    import moe

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    def capped(fn, extra):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + extra, hard))
        try:
            fn()
        except MemoryError as exc:
            return str(exc)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return None

    rng = np.random.default_rng(0)
    moe.set_num_threads(2)
    small = rng.standard_normal((64, 64)).astype(np.float32)

    # route first, while the heap holds no freed space that the scratch could reuse: 30 MB
    # of per-task scratch for 650 MB of logits (calloc'd zeros, never written: not resident)
    logits = np.zeros((20_000, 4096))
    want_ids = moe.route(logits[:100], 2).expert_ids
    msg = capped(lambda: moe.route(logits, 2), 8 * 2**20)
    print("route:", msg, flush=True)
    assert msg is not None and "MOE_STATUS_ALLOC" in msg, msg
    assert np.array_equal(moe.route(logits[:100], 2).expert_ids, want_ids), "route after"
    del logits

    # layer: the hidden panels of 100k routed rows need 800 MB
    layer = moe.SparseMoE(64, 2048, 8, 2, seed=1)
    want = layer(small)                                  # packed, pool started
    x = rng.standard_normal((50_000, 64)).astype(np.float32)
    msg = capped(lambda: layer(x), 256 * 2**20)
    print("layer:", msg, flush=True)
    assert msg is not None and "MOE_STATUS_ALLOC" in msg, msg
    assert np.array_equal(layer(small), want), "layer after the failure"

    # pack_experts: a 192 MB copy of the weights
    w = [rng.standard_normal(s).astype(np.float32) * 0.05
         for s in ((64, 1024, 256), (64, 1024, 256), (64, 256, 1024))]
    msg = capped(lambda: moe.pack_experts(*w), 64 * 2**20)
    print("pack_experts:", msg, flush=True)
    assert msg is not None and "MOE_STATUS_ALLOC" in msg, msg

    # expert_ffn with the weights packed on the way (pack, then the panels)
    rows = rng.standard_normal((40_000, 256)).astype(np.float32)
    offsets = np.linspace(0, 40_000, 65).astype(np.int64)
    msg = capped(lambda: moe.expert_ffn(rows, offsets, *w), 160 * 2**20)
    print("expert_ffn:", msg, flush=True)
    assert msg is not None and "MOE_STATUS_ALLOC" in msg, msg
    assert np.array_equal(layer(small), want), "layer at the end"
    print("ALLOC-OK")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc (Linux)")
@skip_under_asan
def test_allocation_failure_is_memory_error():
    rc, out, err = run_child(_ALLOC_CHILD)
    assert rc == 0 and "ALLOC-OK" in out, f"child {died(rc)} after:\n{out}\n{err[-3000:]}"
