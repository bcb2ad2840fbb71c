"""Fuzz target for moe's argument handling (atheris): random calls, random arguments.

Every public function gets arrays of random shapes, dtypes and layouts, random ints,
floats, None and junk.  A call may succeed or raise one of the documented exceptions
(TypeError, ValueError, OverflowError; MemoryError for absurd sizes); anything else,
or a crash, is a finding.  Run: python tests/fuzz/fuzz_api.py -max_total_time=60
Replay one input: python tests/fuzz/fuzz_api.py CRASH_FILE
"""
import sys

import atheris

with atheris.instrument_imports(include=["moe"]):
    import numpy as np
    import moe

ALLOWED = (TypeError, ValueError, OverflowError, MemoryError)
THREADS = moe.get_num_threads()
DTYPES = (np.float32, np.float64, np.float16, np.int32, np.int64, np.uint16, np.bool_,
          np.complex64)
SCALARS = (None, 0, 1, 2, 3, -1, 7, 64, 2**31, -2**31, 2**63, 0.5, -1.0, float("nan"),
           float("inf"), True, "x", "softmax", "sigmoid", "swiglu", "relu", "bfloat16",
           [1, 2], ())


def array(fdp):
    ndim = fdp.ConsumeIntInRange(0, 3)
    shape = tuple(fdp.ConsumeIntInRange(0, 9) for _ in range(ndim))
    dtype = DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)]
    n = int(np.prod(shape))
    vals = [fdp.ConsumeFloatInRange(-1e3, 1e3) if fdp.ConsumeBool() else
            fdp.PickValueInList([0.0, 1.0, -1.0, np.nan, np.inf, 1e30, 3e38])
            for _ in range(min(n, 64))]
    flat = np.resize(np.array(vals if vals else [0.0]), n)
    with np.errstate(all="ignore"):
        a = flat.astype(dtype).reshape(shape)
    layout = fdp.ConsumeIntInRange(0, 3)
    if layout == 1 and a.ndim >= 2:
        a = np.asfortranarray(a)
    elif layout == 2 and a.ndim >= 1:
        a = a[::-1]
    elif layout == 3:
        a.flags.writeable = False
    return a


def value(fdp):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind < 6:
        return array(fdp)
    return SCALARS[fdp.ConsumeIntInRange(0, len(SCALARS) - 1)]


def ids(fdp, T, k, E):
    return np.array([[fdp.ConsumeIntInRange(-2, E) for _ in range(k)] for _ in range(T)],
                    dtype=np.int64).reshape(T, k)


CALLS = [
    lambda f: moe.route(value(f), value(f)),
    lambda f: moe.route(array(f), f.ConsumeIntInRange(0, 9),
                        scoring=f.PickValueInList(["softmax", "softmax-after-topk", "sigmoid",
                                                   "x"]),
                        renormalize=f.ConsumeBool(), routed_scaling=value(f),
                        expert_bias=value(f) if f.ConsumeBool() else None,
                        n_groups=f.ConsumeIntInRange(-1, 9),
                        topk_groups=f.ConsumeIntInRange(-1, 9),
                        capacity_factor=value(f) if f.ConsumeBool() else None),
    lambda f: moe.dispatch(value(f), value(f), value(f)),
    lambda f: moe.dispatch(array(f), ids(f, f.ConsumeIntInRange(0, 5),
                                         f.ConsumeIntInRange(0, 3), 4), 4),
    lambda f: moe.combine(value(f), value(f), value(f)),
    lambda f: moe.expert_ffn(value(f), value(f), value(f), value(f), value(f),
                             activation=f.PickValueInList(list(moe.ACTIVATIONS) + ["x"])),
    lambda f: moe.ffn(value(f), value(f), value(f), value(f),
                      activation=f.PickValueInList(list(moe.ACTIVATIONS))),
    lambda f: moe.pack_experts(value(f), value(f), value(f),
                               dtype=f.PickValueInList([None, "float32", "bfloat16",
                                                        "float16", "int8", "int4", "mxfp4",
                                                        "int3"]),
                               group_size=value(f) if f.ConsumeBool() else None,
                               compute_dtype=f.PickValueInList(list(moe.COMPUTE_DTYPES) +
                                                               ["int4"])),
    lambda f: moe.QuantizedWeight(value(f), value(f), f.PickValueInList(
        ["int8", "int4", "mxfp4", "x"]), value(f), value(f) if f.ConsumeBool() else None),
    lambda f: moe.quant.quantize_weight(value(f), f.PickValueInList(["int8", "int4", "mxfp4"]),
                                        value(f) if f.ConsumeBool() else None),
    lambda f: moe.SparseMoE(f.ConsumeIntInRange(1, 12), f.ConsumeIntInRange(1, 12),
                            f.ConsumeIntInRange(1, 6), 1,
                            dtype=f.PickValueInList(["int8", "int4", "mxfp4"]),
                            group_size=value(f) if f.ConsumeBool() else None,
                            compute_dtype=f.PickValueInList(["float32", "int8"]))(value(f)),
    lambda f: moe.update_expert_bias(value(f), value(f), value(f)),
    lambda f: moe.SparseMoE(f.ConsumeIntInRange(-1, 12), f.ConsumeIntInRange(-1, 12),
                            f.ConsumeIntInRange(-1, 9), f.ConsumeIntInRange(-1, 9),
                            n_groups=f.ConsumeIntInRange(1, 3),
                            capacity_factor=value(f) if f.ConsumeBool() else None)(value(f)),
    lambda f: moe.set_num_threads(value(f)),
    lambda f: moe.route(array(f), f.ConsumeIntInRange(0, 4), allowed=value(f)),
    lambda f: moe.route_expert_choice(value(f), value(f) if f.ConsumeBool() else None,
                                      capacity=value(f) if f.ConsumeBool() else None,
                                      scoring=f.PickValueInList(["softmax", "sigmoid", "x"])),
    lambda f: moe.route_top_p(value(f), value(f), k_min=value(f),
                              k_max=value(f) if f.ConsumeBool() else None),
    lambda f: moe.route_threshold(array(f), value(f), k_max=value(f)),
    lambda f: moe.skip_experts(value(f), value(f), value(f),
                               renormalize=f.ConsumeBool()),
]


def test_one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    call = CALLS[fdp.ConsumeIntInRange(0, len(CALLS) - 1)]
    try:
        call(fdp)
    except ALLOWED:
        pass
    finally:
        moe.set_num_threads(THREADS)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
