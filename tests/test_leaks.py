"""Leaks (issue 7): every public call repeated many times keeps memory flat -- resident set size
(/proc/self/statm), tracemalloc (which sees NumPy's array buffers) and, with glibc, the bytes
malloc has handed out (mallinfo2, which sees the C core's buffers even where freed memory
would be reused without touching RSS) -- on success and on the error paths, where a missed
Py_DECREF or free() hides most often.  And sys.getrefcount of the arrays handed to moe._C is
unchanged afterwards, while each array it returns holds no extra reference (which catches a
leaked result however small it is).

Sizing: the arrays a call creates are >= 8 KiB (a layer's (E,) counts aside: the refcount
test covers those) and each check runs 400 calls, so one leaked array per call is >= 3.2 MB:
past the RSS bound (2 MB), 16x the tracemalloc bound (200 KB) and 6x the malloc bound
(512 KB).  After a warm-up, the noise measured here is below 100 KB for all three.
"""
import copy
import ctypes
import gc
import os
import sys
import tracemalloc

import numpy as np
import pytest

from conftest import skip_under_asan

pytestmark = skip_under_asan

import moe
from moe import _C

RSS_BOUND = 2 * 2**20
TRACE_BOUND = 200 * 2**10
HEAP_BOUND = 512 * 2**10
REPS = 400
WARMUP = 40

needs_statm = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                 reason="RSS is read from /proc/self/statm (Linux)")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use():
    """Bytes malloc has handed out and not got back (main arena + mmapped chunks), or 0."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def growth(fn, reps):
    """(RSS, malloc'd bytes, tracemalloc) growth over reps calls of fn after a warm-up; two
    separate runs, so that tracemalloc's own tables count in neither of the first two."""
    for _ in range(WARMUP):
        fn()
    gc.collect()
    before, heap_before = rss(), heap_in_use()
    for _ in range(reps):
        fn()
    gc.collect()
    rss_growth, heap_growth = rss() - before, heap_in_use() - heap_before
    tracemalloc.start()
    try:
        fn()
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(reps):
            fn()
        gc.collect()
        trace_growth = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    return rss_growth, heap_growth, trace_growth


def assert_flat(fn, what, reps=REPS):
    # A leak grows on every attempt; allocator noise (a new heap segment, a grown
    # per-thread workspace) does not repeat, so a second attempt absorbs it.
    for attempt in range(2):
        rss_growth, heap_growth, trace_growth = growth(fn, reps)
        if rss_growth < RSS_BOUND and heap_growth < HEAP_BOUND and trace_growth < TRACE_BOUND:
            return
    pytest.fail(f"{what}: after {reps} more calls (twice) RSS grew {rss_growth / 2**20:.2f} MB "
                f"(bound {RSS_BOUND / 2**20:.0f} MB), malloc'd bytes {heap_growth / 2**10:.0f} KB "
                f"(bound {HEAP_BOUND / 2**10:.0f} KB), tracemalloc {trace_growth / 2**10:.0f} KB "
                f"(bound {TRACE_BOUND / 2**10:.0f} KB)")


def raises(fn, exc):
    """fn, wrapped to expect exc (and nothing else) on every call."""
    def call():
        try:
            fn()
        except exc:
            return
        raise AssertionError(f"expected {exc.__name__}")
    return call


# ---- inputs ---------------------------------------------------------------------------------

T, E, K, D, F = 1024, 1024, 4, 64, 32
T_ROUTE, K_ROUTE = 256, 8  # routing costs T * E: fewer tokens, more slots (8 KiB ids)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    logits = rng.standard_normal((T_ROUTE, E))
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    disp = moe.dispatch(f32(T, D), ids, E)
    E_ffn = 8
    w = (f32(E_ffn, F, D) * 0.1, f32(E_ffn, F, D) * 0.1, f32(E_ffn, D, F) * 0.1)
    counts = rng.multinomial(T, np.ones(E_ffn) / E_ffn)
    layer = moe.SparseMoE(D, F, 16, 2, n_shared_experts=1, shared_expert_gate=True,
                          expert_bias=True, seed=5)
    lora = moe.TopKLoRA(D, 48, 4, 8, 2, bias=True, seed=3)
    lora.lora_b = f32(4, 48, 8)
    lora_ids = np.argsort(rng.random((T, 4)), axis=1)[:, :2].astype(np.int32)
    lora_moe = moe.SparseMoE(D, F, 16, 2, lora_rank=2, seed=6)
    fly, multi = moe.FlyLoRA(D, 40, 16, 4, seed=7), moe.MultiLoRA(D, 40, 4, 8, seed=8)
    nan_logits = logits.copy()
    nan_logits[T_ROUTE // 2, 3] = np.nan
    x_nan = f32(T, D)
    x_nan[T - 1, 0] = np.nan
    bad_ids = ids.copy()
    bad_ids[T - 1, 0] = E
    bad_pos = disp.position.copy()
    bad_pos[T - 1, 0] = T * K
    return dict(logits=logits, nan_logits=nan_logits, bias=f32(E) * 0.01, x=f32(T, D),
                x_nan=x_nan, ids=ids, bad_ids=bad_ids, disp=disp, bad_pos=bad_pos,
                y=f32(T * K, D), weights=f32(T, K), w=w,
                x_sorted=f32(T, D), offsets=np.concatenate([[0], np.cumsum(counts)]),
                packed=moe.pack_experts(*w), layer=layer, linear=_C.pack_linear(w[1], dtype=0),
                lora=lora, lora_ids=lora_ids, lora_w=f32(T, 2), lora_moe=lora_moe,
                lora_ab=[f32(16, 2, D), f32(16, F, 2), None, None, f32(16, 2, F), f32(16, D, 2)],
                fly=fly, multi=multi, mids=rng.integers(-1, 4, T),
                ebias=np.zeros(2048), ecounts=rng.integers(0, 50, 2048))


def public_calls(d):
    """name -> a call of the public API (successful ones first, then error paths)."""
    layer, w = d["layer"], d["w"]
    return {
        "route": lambda: moe.route(d["logits"], K_ROUTE, expert_bias=d["bias"],
                                   capacity_factor=1.0),
        "route(group-limited, sigmoid)": lambda: moe.route(d["logits"], K_ROUTE, scoring="sigmoid",
                                                           n_groups=8, topk_groups=2),
        "dispatch": lambda: moe.dispatch(d["x"], d["ids"], E),
        "combine": lambda: moe.combine(d["y"], d["disp"].position, d["weights"]),
        "expert_ffn(packed)": lambda: moe.expert_ffn(d["x_sorted"], d["offsets"], d["packed"]),
        "expert_ffn(weights)": lambda: moe.expert_ffn(d["x_sorted"], d["offsets"], *w),
        "expert_ffn(bfloat16)": lambda: moe.expert_ffn(d["x_sorted"], d["offsets"], *w,
                                                       dtype="bfloat16"),
        "ffn": lambda: moe.ffn(d["x"], w[0][0], w[1][0], w[2][0]),
        "pack_experts": lambda: moe.pack_experts(*w),
        "layer": lambda: layer(d["x"]),
        "layer(return_routing)": lambda: layer(d["x"], return_routing=True),
        "layer(float64 x, 3-D)": lambda: layer(d["x"].astype(np.float64).reshape(16, -1, D)),
        "update_expert_bias": lambda: moe.update_expert_bias(d["ebias"], d["ecounts"], 1e-9),
        "SparseMoE()": lambda: moe.SparseMoE(D, F, 16, 2, seed=1),
        "set_num_threads": lambda: (moe.set_num_threads(1), moe.set_num_threads(2)),
        "TopKLoRA": lambda: d["lora"](d["x"], return_routing=True),
        "FlyLoRA": lambda: d["fly"](d["x"]),
        "MultiLoRA": lambda: d["multi"](d["x"], d["mids"]),
        "SparseMoE(lora)": lambda: d["lora_moe"](d["x"]),
        "TopKLoRA.pack": lambda: d["lora"].pack(),
        "MultiLoRA(bad id)": raises(lambda: d["multi"](d["x"], d["mids"] + 4), ValueError),
        # error paths: ValueError / TypeError from moe/_api.py and from the C core
        "route(NaN logits) [C]": raises(lambda: moe.route(d["nan_logits"], K_ROUTE), ValueError),
        "route(top_k=0)": raises(lambda: moe.route(d["logits"], 0), ValueError),
        "route(int logits)": raises(lambda: moe.route(d["ids"], 2), TypeError),
        "dispatch(id out of range)": raises(lambda: moe.dispatch(d["x"], d["bad_ids"], E),
                                            ValueError),
        "combine(position out of range)": raises(
            lambda: moe.combine(d["y"], d["bad_pos"], d["weights"]), ValueError),
        "expert_ffn(activation mismatch)": raises(
            lambda: moe.expert_ffn(d["x_sorted"], d["offsets"], d["packed"], activation="relu"),
            ValueError),
        "expert_ffn(bad offsets)": raises(
            lambda: moe.expert_ffn(d["x_sorted"], d["offsets"][::-1], *w), ValueError),
        "layer(NaN x) [C]": raises(lambda: layer(d["x_nan"]), ValueError),
        "layer(wrong d_model)": raises(lambda: layer(d["y"][:, :D - 1]), ValueError),
        "SparseMoE(bad n_groups)": raises(lambda: moe.SparseMoE(D, F, 16, 2, n_groups=3),
                                          ValueError),
        "set_num_threads(0)": raises(lambda: moe.set_num_threads(0), ValueError),
    }


PUBLIC = list(public_calls({k: None for k in ("layer", "w", "lora", "fly", "multi", "lora_moe",
                                             "x", "mids")}).keys())


@pytest.fixture
def keep_threads():
    before = moe.get_num_threads()
    yield
    moe.set_num_threads(before)


@needs_statm
@pytest.mark.parametrize("name", PUBLIC)
def test_public_call_keeps_memory_flat(data, name, keep_threads):
    moe.set_num_threads(2)
    assert_flat(public_calls(data)[name], name)


def c_error_calls(d):
    """moe._C calls that fail in the core *after* the binding allocated its outputs."""
    packed = d["packed"].capsule
    bad_ti = np.arange(T, dtype=np.int64)
    bad_ti[-1] = T
    return {
        "_C.route(NaN)": (lambda: _C.route(d["nan_logits"], top_k=K_ROUTE, scoring=0,
                                           renormalize=True), ValueError),
        "_C.dispatch(bad id)": (
            lambda: _C.dispatch(d["x"], expert_ids=d["bad_ids"], n_experts=E), ValueError),
        "_C.combine(bad position)": (
            lambda: _C.combine(d["y"], position=d["bad_pos"], weights=d["weights"]), ValueError),
        "_C.ffn_grouped(bad token_index)": (
            lambda: _C.ffn_grouped(d["x_sorted"], token_index=bad_ti, offsets=d["offsets"],
                                   experts=packed, activation=0), ValueError),
        "_C.layer_forward(NaN)": (
            lambda: _C.layer_forward(d["x_nan"], d["layer"].router_weight,
                                     d["layer"].pack()._packed[0], top_k=2, activation=0),
            ValueError),
    }


@needs_statm
@pytest.mark.parametrize("name", ["_C.route(NaN)", "_C.dispatch(bad id)",
                                  "_C.combine(bad position)", "_C.ffn_grouped(bad token_index)",
                                  "_C.layer_forward(NaN)"])
def test_c_error_path_keeps_memory_flat(data, name):
    fn, exc = c_error_calls(data)[name]
    assert_flat(raises(fn, exc), name)


# ---- reference counts ------------------------------------------------------------------------

def c_calls(d):
    """name -> (moe._C function, valid arguments as keywords)."""
    layer = d["layer"].pack()
    routed, shared = layer._packed[:2]
    lora = d["lora"].pack()
    base, lora_a, bank = lora._packs()
    lmoe = d["lora_moe"].pack()
    return {
        "router_logits": (_C.router_logits, dict(x=d["x"], router_weight=layer.router_weight)),
        "route": (_C.route, dict(logits=d["logits"], top_k=K_ROUTE, scoring=0, renormalize=True,
                                 routed_scaling=1.0, expert_bias=d["bias"], n_groups=1,
                                 topk_groups=1, capacity_factor=1.0)),
        "update_expert_bias": (_C.update_expert_bias,
                               dict(bias=d["ebias"], counts=d["ecounts"], rate=1e-9)),
        "dispatch": (_C.dispatch, dict(x=d["x"], expert_ids=d["ids"], n_experts=E)),
        "combine": (_C.combine, dict(y=d["y"], position=d["disp"].position,
                                     weights=d["weights"])),
        "pack_experts": (_C.pack_experts, dict(zip(("w_gate", "w_up", "w_down"), d["w"]),
                                               dtype=0)),
        "ffn_grouped": (_C.ffn_grouped, dict(x=d["x_sorted"], token_index=None,
                                             offsets=d["offsets"],
                                             experts=d["packed"].capsule, activation=0)),
        "layer_forward": (_C.layer_forward,
                          dict(x=d["x"], router_weight=layer.router_weight, experts=routed,
                               top_k=2, activation=0, expert_bias=layer.expert_bias, scoring=0,
                               renormalize=True, routed_scaling=1.0, n_groups=1, topk_groups=1,
                               capacity_factor=0.0, shared_experts=shared,
                               shared_gate_weight=layer.shared_gate_weight.reshape(D))),
        "pack_linear": (_C.pack_linear, dict(w=d["w"][0], dtype=0,
                                             bias=d["w"][0][:, :, 0].copy())),
        "linear_grouped": (_C.linear_grouped, dict(x=d["x_sorted"], token_index=None,
                                                   offsets=d["offsets"], weights=d["linear"])),
        "lora_forward": (_C.lora_forward, dict(x=d["x"], base=base, kind=0, lora_a=lora_a,
                                               bank=bank, n_adapters=4, ids=d["lora_ids"],
                                               weights=d["lora_w"], scaling=0.5,
                                               adapter_scaling=None, select_k=0,
                                               select_signed=0, rank_bias=None)),
        "pack_expert_lora": (_C.pack_expert_lora,
                             dict(experts=lmoe._packed[0], rank=2, scaling=1.0,
                                  **dict(zip(("a_gate", "b_gate", "a_up", "b_up", "a_down",
                                              "b_down"), d["lora_ab"])))),
    }


def _breakers(d, name, args):
    """Variants of args that fail at different points: a TypeError on each argument in turn
    (after the ones before it were accepted) and the core's ValueErrors."""
    out = []
    for i in args:
        if isinstance(args[i], bool):  # a flag ("p" format): any object is accepted
            continue
        bad = copy.copy(args)
        bad[i] = "not an array or int"
        out.append((f"arg {i} a str", bad, TypeError))
    core = {
        "route": {"logits": d["nan_logits"]},
        "dispatch": {"expert_ids": d["bad_ids"]},
        "combine": {"position": d["bad_pos"]},
        "ffn_grouped": {"token_index": np.full(T, T, np.int64)},
        "layer_forward": {"x": d["x_nan"]},
        "pack_experts": {"w_gate": d["w"][0][:, :-1].copy()},
        "linear_grouped": {"token_index": np.full(T, T, np.int64)},
        "lora_forward": {"ids": d["lora_ids"] + 4},
    }.get(name, {})
    if core:
        bad = copy.copy(args)
        for i, v in core.items():
            bad[i] = v
        out.append(("fails in the core", bad, ValueError))
    return out


def call(fn, args):
    return fn(**args)


def refcounts(args):
    """Reference counts of the arrays, capsules and objects among args (a list, or a dict of
    keyword arguments) (small ints, floats, bools and None are shared by the whole
    interpreter: their counts move on their own)."""
    return [sys.getrefcount(a) for a in (args.values() if isinstance(args, dict) else args)
            if not isinstance(a, (int, float, bool, str, type(None)))]


@pytest.mark.parametrize("name", ["router_logits", "route", "update_expert_bias", "dispatch",
                                  "combine", "pack_experts", "ffn_grouped", "layer_forward",
                                  "pack_linear", "linear_grouped", "lora_forward",
                                  "pack_expert_lora"])
def test_c_calls_keep_reference_counts(data, name):
    fn, args = c_calls(data)[name]
    before = refcounts(args)
    for _ in range(20):
        result = call(fn, args)
    if name == "pack_expert_lora":
        # the result keeps the experts it was laid out for alive: one reference, until freed
        assert refcounts(args) == [before[0] + 1] + before[1:]
        result = None
    assert refcounts(args) == before, f"{name}: argument refcounts {before} -> {refcounts(args)}"
    # results: only our own reference (plus getrefcount's argument) -- no stray INCREF
    parts = result if isinstance(result, tuple) else (result,)
    del result
    for i in range(len(parts)):  # (enumerate would hold a reference of its own)
        part = parts[i]
        if isinstance(part, np.ndarray):  # referenced by parts, part and getrefcount's argument
            assert sys.getrefcount(part) == 3, \
                f"{name}: result {i} has {sys.getrefcount(part) - 3} references too many"
    for what, bad, exc in _breakers(data, name, args):
        before = refcounts(bad)
        for _ in range(20):
            with pytest.raises(exc):
                call(fn, bad)
        assert refcounts(bad) == before, \
            f"{name} ({what}): argument refcounts {before} -> {refcounts(bad)}"


def test_public_calls_keep_reference_counts(data):
    """The same through the public API, where arrays are passed on without a copy."""
    d = data
    checks = [
        (lambda: moe.route(d["logits"], K_ROUTE, expert_bias=d["bias"]),
         [d["logits"], d["bias"]]),
        (lambda: moe.dispatch(d["x"], d["ids"], E), [d["x"], d["ids"]]),
        (lambda: moe.combine(d["y"], d["disp"].position, d["weights"]),
         [d["y"], d["disp"].position, d["weights"]]),
        (lambda: moe.expert_ffn(d["x_sorted"], d["offsets"], d["packed"]),
         [d["x_sorted"], d["offsets"], d["packed"]]),
        (lambda: d["layer"](d["x"]), [d["x"], d["layer"]]),
        (raises(lambda: d["layer"](d["x_nan"]), ValueError), [d["x_nan"], d["layer"]]),
        (raises(lambda: moe.route(d["nan_logits"], K_ROUTE), ValueError), [d["nan_logits"]]),
        (raises(lambda: moe.combine(d["y"], d["bad_pos"], d["weights"]), ValueError),
         [d["y"], d["bad_pos"], d["weights"]]),
    ]
    for i, (fn, objs) in enumerate(checks):
        fn()
        gc.collect()
        before = refcounts(objs)
        for _ in range(20):
            fn()
        gc.collect()
        assert refcounts(objs) == before, f"check {i}: refcounts {before} -> {refcounts(objs)}"
