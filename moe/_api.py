"""The functional API: argument checking and conversion, then one call into the C core.

Every public function here accepts NumPy arrays, array-likes, or any CPU object with
``__dlpack__`` (torch CPU tensors, ...), converts it without a copy when its dtype and
layout allow, checks shapes and ranges with messages that name the argument, and calls
``moe._C``.  Outputs are NumPy arrays.

The checks here are the user-facing ones (types, ranges, option names): the binding below
checks only what memory safety needs and the core its own invariants
(csrc/binding/binding.h says who owns what).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
from typing import NamedTuple

import numpy as np

from . import _C

# The option sets, from the core's one list of each (csrc/moe_options.h): a name's
# index is its C enum value.
SCORINGS = _C.SCORINGS
ACTIVATIONS = _C.ACTIVATIONS
GATED = _C.GATED_ACTIVATIONS


# ---- conversion helpers ---------------------------------------------------------------

def _as_ndarray(obj, name):
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__dlpack__") and not isinstance(obj, (list, tuple)):
        try:
            return np.from_dlpack(obj)
        except (TypeError, ValueError, RuntimeError, BufferError) as exc:
            raise TypeError(
                f"{name}: cannot read this {type(obj).__name__} on the CPU through DLPack "
                f"({exc}); pass a NumPy array or a CPU tensor (detach() it if it requires grad)"
            ) from exc
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array, got {type(obj).__name__}: {exc}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(obj).__name__}")
    return arr


def _shape_str(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_shape(arr, name, shape):
    """shape: tuple of ints or (label, int) pairs; None entries match anything."""
    want = tuple(s[1] if isinstance(s, tuple) else s for s in shape)
    ok = arr.ndim == len(want) and all(w is None or w == g for w, g in zip(want, arr.shape))
    if not ok:
        parts = []
        for s in shape:
            if isinstance(s, tuple):
                parts.append(f"{s[0]}" if s[1] is None else f"{s[0]}={s[1]}")
            else:
                parts.append("?" if s is None else str(s))
        raise ValueError(
            f"{name} must have shape ({', '.join(parts)}{',' if len(parts) == 1 else ''}), "
            f"got {_shape_str(arr.shape)}"
        )


def float_array(obj, name, shape=None, dtype=np.float32):
    """obj as a C-contiguous array of `dtype` (float inputs only), shape-checked."""
    arr = _as_ndarray(obj, name)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {arr.dtype}")
    if shape is not None:
        _check_shape(arr, name, shape)
    return _c_layout(arr, dtype)


def _c_layout(arr, dtype):
    """arr as an aligned, C-contiguous array of dtype: no copy when it already is one."""
    flags = arr.flags
    if flags.c_contiguous and flags.aligned and arr.dtype == dtype:
        return arr  # (np.require's own checks cost ~15 us with cold caches: decode)
    return np.require(arr, dtype=dtype, requirements=("C", "A"))


def int_array(obj, name, shape=None, dtype=np.int64, low=None, high=None, what=None):
    """obj as a C-contiguous integer array with every value in [low, high)."""
    arr = _as_ndarray(obj, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if shape is not None:
        _check_shape(arr, name, shape)
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if (low is not None and lo < low) or (high is not None and hi >= high):
            bad = lo if (low is not None and lo < low) else hi
            raise ValueError(f"{name} values must be in {what or f'[{low}, {high})'}, got {bad}")
    return _c_layout(arr, dtype)


def check_int(value, name, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float(value, name, positive=False, float32=False):
    """A finite real option; float32=True for one the core applies in float32, which must
    be finite there too (a routed_scaling of 1e308 made every weight inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, "
                         f"got {value}")
    if float32 and abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number within float32's range "
                         f"(|{name}| <= 3.4e38), got {value}")
    return value


def available_memory():
    """Bytes of memory this machine can still give (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(n_bytes, what):
    """MemoryError naming `what` for a request the machine cannot meet: with overcommit the
    allocation itself succeeds and the process is killed when it is touched."""
    free = available_memory()
    if free is not None and n_bytes > free:
        raise MemoryError(f"{what} needs {n_bytes / 2**30:.1f} GiB, more than the "
                          f"{free / 2**30:.1f} GiB of memory available")


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return choices.index(value)


def check_routing_options(n_experts, top_k, scoring, n_groups, topk_groups, routed_scaling,
                          capacity_factor):
    """Validate the routing options against E; returns the C codes/values."""
    top_k = check_int(top_k, "top_k", 1, n_experts)
    code = check_choice(scoring, "scoring", SCORINGS)
    n_groups = check_int(n_groups, "n_groups", 1)
    if n_experts % n_groups:
        raise ValueError(f"n_groups must divide n_experts={n_experts}, got {n_groups}")
    topk_groups = check_int(topk_groups, "topk_groups", 1, n_groups)
    if topk_groups * (n_experts // n_groups) < top_k:
        raise ValueError(
            f"topk_groups * (n_experts / n_groups) must be >= top_k={top_k}, got "
            f"{topk_groups} * {n_experts // n_groups}"
        )
    routed_scaling = check_float(routed_scaling, "routed_scaling", float32=True)
    cf = 0.0 if capacity_factor is None else check_float(capacity_factor, "capacity_factor", True)
    return top_k, code, n_groups, topk_groups, routed_scaling, cf


# The layer classes moe.save / moe.load know, by class name (filled by @saveable as the
# layer modules are imported; moe/io.py reads it and imports no layer module).
LAYER_CLASSES: dict = {}


def saveable(cls):
    """Class decorator: moe.save / moe.load handle this layer class (it has config(),
    _weight_names() and an __init__ that takes config() plus init=False)."""
    LAYER_CLASSES[cls.__name__] = cls
    return cls


def remember_config(init):
    """Decorator for a layer's __init__: keeps its arguments (without seed and init) as
    layer._init_config, the config moe.save writes; the outermost __init__ wins."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_init_config" not in self.__dict__:
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            cfg = {k: v for k, v in bound.arguments.items() if k not in ("self", "seed", "init")}
            object.__setattr__(self, "_init_config", cfg)
        init(self, *args, **kwargs)
    return wrapper


def refuse_resize(layer, name, fixed):
    """A layer's __setattr__ calls this first: the attributes in `fixed` (the sizes and
    kinds its weights' shapes follow from) are set once, in __init__, and are read-only
    after; re-assigning one would leave weights and config out of step."""
    if name in fixed and name in layer.__dict__:
        raise AttributeError(f"{name} of a {type(layer).__name__} is fixed when the layer is "
                             f"built (its weights' shapes follow from it): build a new layer "
                             f"with the {name} you want")


def check_finite(arr, name):
    if arr.size and not np.isfinite(arr).all():
        idx = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite, got {arr[tuple(idx)]} at index {tuple(int(i) for i in idx)}")


# ---- results ------------------------------------------------------------------------

class RoutingResult(NamedTuple):
    """What routing decided for each token.

    expert_ids: (T, k) int32, the chosen experts, best first; -1 where capacity dropped the slot.
    weights:    (T, k) float32 gate weights (0 where dropped).
    counts:     (E,) int64 assignments each expert keeps.
    n_dropped:  assignments dropped by the capacity limit (0 when dropless).
    aux_loss:   Switch load-balancing loss E * sum_i f_i * P_i.
    z_loss:     router z-loss mean(logsumexp(logits)^2).
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    n_dropped: int
    aux_loss: float
    z_loss: float


class Dispatch(NamedTuple):
    """Tokens sorted by expert (a stable counting sort of the (token, slot) pairs).

    x_sorted:    (N, d) float32 rows grouped by expert, token order within an expert.
    offsets:     (E+1,) int64; expert e owns rows offsets[e]:offsets[e+1].
    token_index: (N,) int64 token of each sorted row.
    position:    (T, k) int64 sorted row of each (token, slot), -1 if not dispatched.
    counts:      (E,) int64 rows per expert.
    """

    x_sorted: np.ndarray
    offsets: np.ndarray
    token_index: np.ndarray
    position: np.ndarray
    counts: np.ndarray


# ---- ops ----------------------------------------------------------------------------

def route(logits, top_k, *, scoring="softmax", renormalize=True, routed_scaling=1.0,
          expert_bias=None, n_groups=1, topk_groups=1, capacity_factor=None,
          allowed=None, groups=None) -> RoutingResult:
    """Choose top_k experts per token from router logits.

    logits: (T, E) float.  scoring: "softmax" (softmax over E, then top-k),
    "softmax-after-topk" (top-k of the logits, softmax over the k) or "sigmoid".
    renormalize: make each token's selected weights sum to 1; routed_scaling multiplies
    the final weights.  expert_bias: (E,) added to the scores for selection only (the
    weights use the unbiased scores).  n_groups/topk_groups: group-limited top-k (groups
    scored by the sum of their top-2 biased scores).  capacity_factor: None = dropless;
    else each expert keeps its first ceil(capacity_factor * T * k / E) assignments in
    token order.  allowed: (T, E) bool, per-token mask for *selection only* (a masked
    expert is never chosen; scores, weights, and losses still see every expert, so with
    renormalize=False softmax weights are the full-E probabilities); needs n_groups == 1
    and at least top_k allowed experts per token, else ValueError naming the token.
    groups: (T,) ints, each token's group (task / modality / domain); allowed is then a
    (G, E) table and token t may choose the experts of row groups[t].
    Ties go to the lower expert index.  Non-finite logits raise ValueError.
    """
    args, kw = route_args(logits, top_k, scoring=scoring, renormalize=renormalize,
                          routed_scaling=routed_scaling, expert_bias=expert_bias,
                          n_groups=n_groups, topk_groups=topk_groups,
                          capacity_factor=capacity_factor, allowed=allowed, groups=groups)
    ids, w, counts, n_dropped, aux, z = _C.route(*args, **kw)
    return RoutingResult(ids, w, counts, int(n_dropped), float(aux), float(z))


def route_args(logits, top_k, *, scoring="softmax", renormalize=True, routed_scaling=1.0,
               expert_bias=None, n_groups=1, topk_groups=1, capacity_factor=None,
               allowed=None, groups=None):
    """route's arguments checked and converted for _C.route (and _C.route_backward):
    (args, kwargs)."""
    logits = float_array(logits, "logits", (("n_tokens", None), ("n_experts", None)), np.float64)
    E = logits.shape[1]
    if E < 1:
        raise ValueError("logits must have at least one expert (column), got shape "
                         f"{_shape_str(logits.shape)}")
    top_k, code, n_groups, topk_groups, routed_scaling, cf = check_routing_options(
        E, top_k, scoring, n_groups, topk_groups, routed_scaling, capacity_factor)
    bias = None
    if expert_bias is not None:
        bias = float_array(expert_bias, "expert_bias", (("n_experts", E),))
        check_finite(bias, "expert_bias")
    mask, rows = mask_args(allowed, groups, logits.shape[0], E, n_groups)
    return (logits,), dict(top_k=top_k, scoring=code, renormalize=bool(renormalize),
                           routed_scaling=routed_scaling, expert_bias=bias, n_groups=n_groups,
                           topk_groups=topk_groups, capacity_factor=cf, allowed=mask,
                           groups=rows)


def mask_args(allowed, groups, n_tokens, n_experts, n_groups=1):
    """Checked (allowed, groups) for the C core: a (T, E) bool mask, or a (G, E) table with
    (T,) int32 group ids in [0, G)."""
    if allowed is None:
        if groups is not None:
            raise ValueError("groups needs an allowed (G, n_experts) table")
        return None, None
    mask = _as_ndarray(allowed, "allowed")
    if mask.dtype != np.bool_:
        raise TypeError(f"allowed must be a bool array, got dtype {mask.dtype}")
    if n_groups != 1:
        raise ValueError(f"allowed needs n_groups == 1, got n_groups={n_groups}")
    rows = None
    if groups is None:
        _check_shape(mask, "allowed", (("n_tokens", n_tokens), ("n_experts", n_experts)))
    else:
        _check_shape(mask, "allowed", (("G", None), ("n_experts", n_experts)))
        rows = int_array(groups, "groups", (("n_tokens", n_tokens),), np.int32, 0,
                         mask.shape[0], f"[0, G={mask.shape[0]})")
    return _c_layout(mask, np.bool_), rows


def update_expert_bias(bias, counts, rate):
    """Auxiliary-loss-free balancing step, in place: bias += rate * sign(mean(counts) - counts).

    bias: (E,) float ndarray (updated in place and returned); counts: (E,) non-negative ints
    (e.g. RoutingResult.counts); rate: the step size.
    """
    if not isinstance(bias, np.ndarray) or bias.dtype.kind != "f":
        raise TypeError("bias must be a floating-point numpy.ndarray (it is updated in place)")
    if not bias.flags.writeable:
        raise ValueError("bias must be writable (it is updated in place)")
    _check_shape(bias, "bias", (("n_experts", None),))
    counts = int_array(counts, "counts", (("n_experts", bias.shape[0]),), low=0,
                       what="[0, inf)")
    rate = check_float(rate, "rate")
    # The step is taken in float64 and rounded once to the bias's own dtype.
    work = np.array(bias, dtype=np.float64, order="C")
    _C.update_expert_bias(work, counts=counts, rate=rate)
    with np.errstate(over="ignore"):
        new = work.astype(bias.dtype)
    if not np.isfinite(new).all():
        i = int(np.argmax(~np.isfinite(new)))
        raise ValueError(f"rate={rate} would make bias[{i}] non-finite ({bias[i]} -> "
                         f"{new[i]} in {bias.dtype}); bias is unchanged")
    bias[...] = new
    return bias


def token_rows(x, d_model):
    """x (..., d_model) float -> (its leading shape, the (T, d_model) float32 rows)."""
    x = float_array(x, "x")
    if x.ndim < 1 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (..., d_model={d_model}), got "
                         f"{_shape_str(x.shape)}")
    return x.shape[:-1], x.reshape(-1, d_model)


def require_ffn_weights(layer, names=("w_up", "w_down")):
    """Before packing: w_gate when the activation needs it, and the named weights set."""
    if layer.activation in GATED and layer.w_gate is None:
        raise ValueError(f"w_gate is required by activation {layer.activation!r}")
    for name in names:
        if getattr(layer, name) is None:
            raise ValueError(f"{name} is not set (the layer was made with init=False)")


def _tokens_2d(x, name="x", d=None):
    x = float_array(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n_tokens, d_model), got {_shape_str(x.shape)}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} must have shape (n_tokens, d_model={d}), got {_shape_str(x.shape)}")
    return x


def dispatch(x, expert_ids, n_experts) -> Dispatch:
    """Sort (token, slot) pairs by expert and gather their rows.

    x: (T, d) float; expert_ids: (T, k) ints in [0, n_experts) or -1 (not dispatched).
    Stable: an expert's rows keep token order, then slot order.
    """
    n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
    # offsets (E + 1,) int64 out, and the core's per-expert counts
    check_memory(16 * (n_experts + 1), f"n_experts={n_experts}")
    x = _tokens_2d(x)
    ids = int_array(expert_ids, "expert_ids", (("n_tokens", x.shape[0]), ("top_k", None)),
                    np.int32, low=-1, high=n_experts,
                    what=f"[0, n_experts={n_experts}) or -1")
    xs, offsets, token_index, position = _C.dispatch(x, expert_ids=ids, n_experts=n_experts)
    return Dispatch(xs, offsets, token_index, position, np.diff(offsets))


def combine(y_sorted, position, weights):
    """out[t] = sum_j weights[t, j] * y_sorted[position[t, j]], slots in order, -1 skipped.

    y_sorted: (N, d) float; position: (T, k) ints in [-1, N); weights: (T, k) float.
    Returns (T, d) float32.
    """
    y = _tokens_2d(y_sorted, "y_sorted")
    pos = int_array(position, "position", (("n_tokens", None), ("top_k", None)), low=-1,
                    high=y.shape[0], what=f"[0, n_rows={y.shape[0]}) or -1")
    w = float_array(weights, "weights", (("n_tokens", pos.shape[0]), ("top_k", pos.shape[1])))
    return _C.combine(y, position=pos, weights=w)


WEIGHT_DTYPES = _C.WEIGHT_DTYPES


def float32_to_bfloat16(a):
    """float array -> bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep it a (quiet) NaN
    return rounded


def bfloat16_to_float32(bits):
    """bfloat16 bits (uint16) -> float32, exactly."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_source(obj):
    """A torch / ml_dtypes / JAX bfloat16 array as its uint16 bits, else None."""
    dt = getattr(obj, "dtype", None)
    if dt is None or "bfloat16" not in str(dt):
        return None
    if hasattr(obj, "view") and type(obj).__module__.startswith("torch"):
        import torch
        return np.from_dlpack(obj.detach().cpu().contiguous().view(torch.int16)).view(np.uint16)
    return np.asarray(obj).view(np.uint16)


def _view_layout(arr, dtype):
    """arr itself when the core can read it in place as a strided expert weight: dtype
    already, aligned, 3-d, every stride a positive whole number of elements (a view that
    overlaps nothing: e.g. the gate or up half of a fused gate_up array, a transposed
    one); else an aligned C-contiguous copy."""
    if (arr.dtype == dtype and arr.ndim == 3 and arr.flags.aligned and
            all(n <= 1 or (s > 0 and s % arr.itemsize == 0)
                for n, s in zip(arr.shape, arr.strides))):
        return arr
    return _c_layout(arr, dtype)


def weight_array(obj, name, shape, dtype, strided=False):
    """Expert weights as a C-contiguous array for storage type `dtype` (strided: a view
    with positive strides already in that type is kept as it is, see _view_layout).

    dtype "float32": any float array, cast.  "float16": float16 arrays as they are, other
    floats rounded to half; uint16 arrays are taken as half bits.  "bfloat16": torch /
    ml_dtypes bfloat16 arrays and uint16 arrays are taken as bfloat16 bits, float arrays
    rounded to nearest even.  Returns float32 or uint16 arrays (the bits).
    """
    layout = _view_layout if strided else _c_layout
    check_choice(dtype, "dtype", WEIGHT_DTYPES)
    bf = _bf16_source(obj)
    arr = bf if bf is not None else _as_ndarray(obj, name)
    kind = "bf16" if bf is not None else arr.dtype.kind
    if kind not in ("f", "bf16") and not (arr.dtype == np.uint16 and dtype != "float32"):
        raise TypeError(f"{name} must be a floating-point array"
                        + (" (or uint16 bits for bfloat16/float16)" if dtype != "float32" else "")
                        + f", got dtype {arr.dtype if bf is None else 'bfloat16'}")
    _check_shape(arr, name, shape)
    if dtype == "float32":
        return layout(bfloat16_to_float32(arr) if kind == "bf16" else arr, np.float32)
    if dtype == "float16":
        if kind == "bf16":
            arr = bfloat16_to_float32(arr)
        if arr.dtype == np.uint16:
            return layout(arr, np.uint16)
        return layout(arr.astype(np.float16, copy=False), np.float16).view(np.uint16)
    if kind == "bf16" or arr.dtype == np.uint16:
        return layout(arr, np.uint16)
    return float32_to_bfloat16(arr)


def stored_weight(obj, name, shape, dtype, strided=False):
    """weight_array(...) as a layer stores it: float16 weights as np.float16, the others as
    float32 or bfloat16 uint16 bits."""
    value = weight_array(obj, name, shape, dtype, strided)
    return value.view(np.float16) if dtype == "float16" else value


def weight_bits(a):
    """A stored weight as the C core takes it (float16 as its uint16 bits); None stays."""
    return None if a is None else (a.view(np.uint16) if a.dtype == np.float16 else a)


@contextlib.contextmanager
def naming_nonfinite(dtype, **weights):
    """Around a packing call: the core refuses NaN / Inf weights as it copies them
    (MOE_STATUS_NONFINITE, without a name); this names the weight and its first bad
    index.  weights: name -> the array as the user sees it, stored in `dtype`."""
    try:
        yield
    except ValueError as exc:
        if "MOE_STATUS_NONFINITE" not in str(exc):
            raise
        for name, a in weights.items():
            if _any_quantized(a):
                a = a.dequantize()
            if a is not None and a.dtype == np.uint16:  # bit patterns
                a = bfloat16_to_float32(a) if dtype == "bfloat16" else a.view(np.float16)
            if a is not None:
                check_finite(a, name)
        raise


def expert_weights(w_gate, w_up, w_down, activation, d_model, n_experts=None, prefix="",
                   dtype="float32"):
    """Check and convert expert weights in the nn.Linear layout; returns (gate|None, up, down)."""
    lead = () if n_experts is False else (("n_experts", n_experts),)
    w_up = weight_array(w_up, prefix + "w_up", lead + (("d_ff", None), ("d_model", d_model)),
                        dtype)
    E = w_up.shape[0] if lead else None
    F = w_up.shape[-2]
    lead = () if n_experts is False else (("n_experts", E),)
    if activation in GATED:
        if w_gate is None:
            raise ValueError(f"{prefix}w_gate is required by activation {activation!r}")
        w_gate = weight_array(w_gate, prefix + "w_gate",
                              lead + (("d_ff", F), ("d_model", d_model)), dtype)
    else:
        w_gate = None
    w_down = weight_array(w_down, prefix + "w_down", lead + (("d_model", d_model), ("d_ff", F)),
                          dtype)
    return w_gate, w_up, w_down


def _guess_dtype(*weights):
    """The storage type implied by the given weights: float16 / bfloat16 arrays keep theirs."""
    for w in weights:
        if w is None:
            continue
        if _bf16_source(w) is not None:
            return "bfloat16"
        if getattr(w, "dtype", None) == np.float16:
            return "float16"
    return "float32"


class PackedExperts:
    """Expert weights packed once for the CPU kernels (see moe.pack_experts).

    Holds a copy: later changes to the source arrays do not reach it.  Pass it to
    moe.expert_ffn in place of (w_gate, w_up, w_down) to skip packing on every call.
    """

    __slots__ = ("capsule", "n_experts", "d_model", "d_ff", "gated", "dtype",
                 "compute_dtype", "nbytes", "activation", "isa", "group_size")

    def __init__(self, capsule, activation):
        info = _C.experts_info(capsule)
        self.capsule = capsule
        self.n_experts, self.d_model, self.d_ff = info["n_experts"], info["d_model"], info["d_ff"]
        self.gated, self.nbytes = bool(info["gated"]), info["nbytes"]
        self.dtype = (WEIGHT_DTYPES + _C.QUANT_DTYPES)[info["dtype"]]
        # quantized: weights per scale along k (0: one per row); None for float weights
        self.group_size = info["group_size"] if self.dtype in _C.QUANT_DTYPES else None
        self.compute_dtype = _C.COMPUTE_DTYPES[info["compute"]]
        self.activation = activation
        self.isa = _C.build_info()["isa"]

    def __repr__(self):
        return (f"PackedExperts(n_experts={self.n_experts}, d_model={self.d_model}, "
                f"d_ff={self.d_ff}, dtype={self.dtype!r}, compute_dtype="
                f"{self.compute_dtype!r}, gated={self.gated}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


def pack_experts(w_gate, w_up, w_down, activation="swiglu", dtype=None, *, b_gate=None,
                 b_up=None, b_down=None, compute_dtype="float32",
                 group_size=None) -> PackedExperts:
    """Pack expert weights once for the CPU kernels.

    w_gate, w_up: (E, F, d); w_down: (E, d, F) (nn.Linear layout; w_gate None for
    non-gated activations).  dtype: the storage type, "float32", "bfloat16" or
    "float16" (default: float16 / bfloat16 inputs keep theirs, anything else float32);
    compute is float32 with float32 accumulation.  Quantized experts: moe.QuantizedWeight
    weights (one format and group size), or float weights with dtype "int8" / "int4" /
    "mxfp4" and group_size (rounded to nearest; see moe.quant).  b_gate, b_up: (E, F) and
    b_down: (E, d) optional float32 biases (gpt-oss).  compute_dtype (moe.COMPUTE_DTYPES):
    "bfloat16" (bfloat16 weights, even d and F): the FFN rounds its inputs and hidden
    activations to bfloat16; "int8" (quantized weights): it quantizes them to int8 per row
    and block and multiplies integers (see SparseMoE).
    """
    compute = check_choice(compute_dtype, "compute_dtype", _C.COMPUTE_DTYPES)
    check_choice(activation, "activation", ACTIVATIONS)
    if dtype in _C.QUANT_DTYPES or _any_quantized(w_gate, w_up, w_down):
        if compute_dtype == "bfloat16":
            raise ValueError("compute_dtype='bfloat16' needs bfloat16 weights, not quantized "
                             "ones")
        return _pack_quantized(w_gate, w_up, w_down, activation, dtype, group_size,
                               (b_gate, b_up, b_down), compute)
    if compute_dtype == "int8":
        raise ValueError(f"compute_dtype='int8' needs quantized weights (dtype one of "
                         f"{', '.join(_C.QUANT_DTYPES)}), got dtype={dtype!r}")
    if group_size is not None:
        raise ValueError(f"group_size is an option of the quantized dtypes "
                         f"({', '.join(_C.QUANT_DTYPES)}), not of dtype={dtype!r}")
    dtype = _guess_dtype(w_gate, w_up, w_down) if dtype is None else dtype
    code = check_choice(dtype, "dtype", WEIGHT_DTYPES)
    up_probe = _as_ndarray(w_up, "w_up") if _bf16_source(w_up) is None else _bf16_source(w_up)
    if up_probe.ndim != 3:
        raise ValueError(f"w_up must have shape (n_experts, d_ff, d_model), got "
                         f"{_shape_str(up_probe.shape)}")
    g, u, dn = expert_weights(w_gate, w_up, w_down, activation, up_probe.shape[2], None,
                              dtype=dtype)
    E, F, d = u.shape
    biases = [None if b is None else float_array(b, name, shape) for b, name, shape in
              ((b_gate, "b_gate", (("n_experts", E), ("d_ff", F))),
               (b_up, "b_up", (("n_experts", E), ("d_ff", F))),
               (b_down, "b_down", (("n_experts", E), ("d_model", d))))]
    if biases[0] is not None and g is None:
        raise ValueError(f"b_gate is given but activation {activation!r} has no gate")
    if compute_dtype == "bfloat16" and (dtype != "bfloat16" or d % 2 or F % 2):
        raise ValueError("compute_dtype='bfloat16' needs dtype='bfloat16' and even d_model "
                         f"and d_ff, got dtype={dtype!r}, d_model={d}, d_ff={F}")
    with naming_nonfinite(dtype, w_gate=g, w_up=u, w_down=dn):
        capsule = _C.pack_experts(w_gate=g, w_up=u, w_down=dn, dtype=code, b_gate=biases[0],
                                  b_up=biases[1], b_down=biases[2],
                                  compute=compute)
    return PackedExperts(capsule, activation)


def _any_quantized(*weights):
    """Whether any of weights is a moe.QuantizedWeight (torch tensors have a dequantize()
    method too: the type decides)."""
    from .quant import QuantizedWeight
    return any(isinstance(w, QuantizedWeight) for w in weights)


def _pack_quantized(w_gate, w_up, w_down, activation, dtype, group_size, biases, compute):
    """pack_experts for quantized experts: QuantizedWeights, or float weights quantized to
    `dtype` (round to nearest)."""
    from .quant import QuantizedWeight, check_group_size, pack_weight_args, quantize_weight
    names = ("w_gate", "w_up", "w_down")
    if activation in GATED and w_gate is None:
        raise ValueError(f"w_gate is required by activation {activation!r}")
    for name, w in (("w_up", w_up), ("w_down", w_down)):
        if w is None:
            raise ValueError(f"{name} is required (a QuantizedWeight or a float array)")
    ws = [w_gate if activation in GATED else None, w_up, w_down]
    given = [w for w in ws if w is not None]
    if all(isinstance(w, QuantizedWeight) for w in given):
        fmt, g = given[0].dtype, given[0].group_size
        if dtype is not None and dtype != fmt:
            raise ValueError(f"dtype={dtype!r} but the weights are {fmt} QuantizedWeights")
        if group_size is not None and check_group_size(fmt, group_size) != g:
            raise ValueError(f"group_size={group_size} but the weights have group_size={g}")
        for name, w in zip(names, ws):
            if w is not None and (w.dtype, w.group_size) != (fmt, g):
                raise ValueError(f"{name} is a {w.dtype} weight with group_size "
                                 f"{w.group_size}; the others are {fmt} with {g}")
    elif any(isinstance(w, QuantizedWeight) for w in given):
        raise TypeError("pass all expert weights as moe.QuantizedWeight or all as float "
                        "arrays (quantized with dtype= and group_size=)")
    else:
        fmt = dtype
        g = check_group_size(fmt, group_size)
        ws = [None if w is None else quantize_weight(float_array(w, name), fmt, g, name=name)
              for name, w in zip(names, ws)]
    for name, w in zip(names, ws):
        if w is not None and w.ndim != 3:
            raise ValueError(f"{name} must have shape (n_experts, rows, k), got "
                             f"{_shape_str(w.shape)}")
    E, F, d = ws[1].shape
    want = {"w_gate": (E, F, d), "w_down": (E, d, F)}
    for name, w in zip(names, ws):
        if w is not None and name in want and w.shape != want[name]:
            raise ValueError(f"{name} must have shape {_shape_str(want[name])} (w_up is "
                             f"{_shape_str(ws[1].shape)}), got {_shape_str(w.shape)}")
    b = [None if v is None else float_array(v, name, shape) for v, name, shape in
         ((biases[0], "b_gate", (("n_experts", E), ("d_ff", F))),
          (biases[1], "b_up", (("n_experts", E), ("d_ff", F))),
          (biases[2], "b_down", (("n_experts", E), ("d_model", d))))]
    if b[0] is not None and ws[0] is None:
        raise ValueError(f"b_gate is given but activation {activation!r} has no gate")
    with naming_nonfinite(fmt, w_gate=ws[0], w_up=ws[1], w_down=ws[2]):
        capsule = _C.pack_experts(**pack_weight_args(*ws, fmt, g), b_gate=b[0], b_up=b[1],
                                  b_down=b[2], compute=compute)
    return PackedExperts(capsule, activation)


def expert_ffn(x_sorted, offsets, w_gate, w_up=None, w_down=None, activation="swiglu",
               dtype=None, *, swiglu_alpha=1.702, swiglu_limit=7.0):
    """Grouped expert FFN: rows offsets[e]:offsets[e+1] of x_sorted go through expert e.

    x_sorted: (N, d) float; offsets: (E+1,) ints, 0 .. N non-decreasing;
    w_gate, w_up: (E, F, d); w_down: (E, d, F) (nn.Linear layout; w_gate may be None for
    non-gated activations) -- or a PackedExperts from moe.pack_experts in place of w_gate
    (then w_up and w_down are None).  y = act(x W_gate^T, x W_up^T) W_down^T.
    Returns (N, d) float32.  Without a PackedExperts the weights are packed on each call.
    swiglu_alpha / swiglu_limit: the constants of activation "swiglu-oai" (gpt-oss:
    g = min(g, limit), u = clip(u, -limit, limit), (u + 1) * g * sigmoid(alpha * g)).
    """
    args, kw = expert_ffn_args(x_sorted, offsets, w_gate, w_up, w_down, activation, dtype,
                               swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    return _C.ffn_grouped(*args, **kw)


def expert_ffn_args(x_sorted, offsets, w_gate, w_up=None, w_down=None, activation="swiglu",
                    dtype=None, *, swiglu_alpha=1.702, swiglu_limit=7.0, b_gate=None,
                    b_up=None, b_down=None, keep=None):
    """expert_ffn's arguments checked, the weights packed: (args, kwargs) for
    _C.ffn_grouped (and _C.ffn_grouped_backward).  keep: a dict that receives the
    converted weights ("w_gate", "w_up", "w_down") as the core stores them."""
    act = check_choice(activation, "activation", ACTIVATIONS)
    x = _tokens_2d(x_sorted, "x_sorted")
    offsets = int_array(offsets, "offsets", (("n_experts + 1", None),))
    if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != x.shape[0] or \
            (np.diff(offsets) < 0).any():
        raise ValueError(f"offsets must be non-decreasing from 0 to n_rows={x.shape[0]} "
                         f"with shape (n_experts + 1,), got {offsets.tolist()[:8]}")
    E = offsets.shape[0] - 1
    if isinstance(w_gate, PackedExperts):
        packed = w_gate
        if w_up is not None or w_down is not None:
            raise ValueError("pass either a PackedExperts or (w_gate, w_up, w_down), not both")
    elif dtype in _C.QUANT_DTYPES or _any_quantized(w_gate, w_up, w_down):
        if keep is not None:
            raise ValueError("quantized experts have no backward (train float weights, "
                             "then quantize)")
        packed = pack_experts(w_gate, w_up, w_down, activation, dtype, b_gate=b_gate,
                              b_up=b_up, b_down=b_down)
    else:
        dtype = _guess_dtype(w_gate, w_up, w_down) if dtype is None else dtype
        code = check_choice(dtype, "dtype", WEIGHT_DTYPES)
        g, u, dn = expert_weights(w_gate, w_up, w_down, activation, x.shape[1], E, dtype=dtype)
        F = u.shape[1]
        biases = [None if b is None else float_array(b, name, shape) for b, name, shape in
                  ((b_gate if g is not None else None, "b_gate", (("n_experts", E), ("d_ff", F))),
                   (b_up, "b_up", (("n_experts", E), ("d_ff", F))),
                   (b_down, "b_down", (("n_experts", E), ("d_model", x.shape[1]))))]
        if keep is not None:
            keep.update(w_gate=weight_bits(g), w_up=weight_bits(u), w_down=weight_bits(dn))
        with naming_nonfinite(dtype, w_gate=g, w_up=u, w_down=dn):
            packed = PackedExperts(_C.pack_experts(w_gate=g, w_up=u, w_down=dn, dtype=code,
                                                   b_gate=biases[0], b_up=biases[1],
                                                   b_down=biases[2]),
                                   activation)
    if packed.n_experts != E or packed.d_model != x.shape[1]:
        raise ValueError(f"the packed experts have n_experts={packed.n_experts}, d_model="
                         f"{packed.d_model}; x_sorted and offsets give {E} and {x.shape[1]}")
    if packed.gated != (activation in GATED):
        raise ValueError(f"activation {activation!r} does not match experts packed "
                         f"{'with' if packed.gated else 'without'} w_gate")
    return (x, None, offsets, packed.capsule, act), dict(
        alpha=check_float(swiglu_alpha, "swiglu_alpha", float32=True),
        limit=check_float(swiglu_limit, "swiglu_limit", True, float32=True))


def ffn(x, w_gate, w_up, w_down, activation="swiglu", dtype=None):
    """A dense FFN (one expert) on every row: x (T, d); w_gate, w_up (F, d); w_down (d, F)."""
    x = _tokens_2d(x)
    dtype = _guess_dtype(w_gate, w_up, w_down) if dtype is None else dtype
    w_gate, w_up, w_down = expert_weights(w_gate, w_up, w_down, activation, x.shape[1], False,
                                          dtype=dtype)
    offsets = np.array([0, x.shape[0]], dtype=np.int64)
    code = check_choice(dtype, "dtype", WEIGHT_DTYPES)
    with naming_nonfinite(dtype, w_gate=w_gate, w_up=w_up, w_down=w_down):
        packed = _C.pack_experts(w_gate=None if w_gate is None else w_gate[None],
                                 w_up=w_up[None], w_down=w_down[None], dtype=code)
    return _C.ffn_grouped(x, token_index=None, offsets=offsets, experts=packed,
                          activation=check_choice(activation, "activation", ACTIVATIONS))


def set_num_threads(n: int) -> None:
    """Use n threads for the CPU kernels (default: MOE_NUM_THREADS, or the CPUs this
    process may use).  Results are bitwise the same for any n."""
    _C.set_num_threads(check_int(n, "n", 1, 4096))


def get_num_threads() -> int:
    """The number of threads the CPU kernels use."""
    return _C.get_num_threads()


_BF16_DOT = {
    "amx": "AMX tiles (TDPBF16PS)",
    "vdpbf16ps": "VDPBF16PS",
    "fma": "bf16 values widened to float32, two FMAs a pair",
}

_INT8_DOT = {
    "amx": "AMX-INT8 tiles (TDPBSUD) from 4 rows an expert (int8 weights) or 16 "
           "(4-bit), VPDPBUSD below",
    "vpdpbusd": "VPDPBUSD",
    "vpmaddubsw": "VPMADDUBSW for 4-bit weights, portable C for int8",
    "portable": "portable C",
}


def show_config(file=None):
    """Print the version, compiler, CPU features, kernel ISA, thread count and CUDA support."""
    info = _C.build_info()
    lines = [
        f"moe {info['version']}",
        f"  compiler:     {info['compiler']}",
        f"  cpu features: {info['cpu_features'] or '(none detected)'}",
        f"  cpu kernels:  {info['isa']} (MOE_ISA=scalar|avx2|avx512|avx512bf16 lowers the choice; avx512sim: the AVX-512 tiles on AVX2, for tests)",
        f"  bf16 compute: {_BF16_DOT[info['bf16_dot']]}",
        f"  int8 compute: {_INT8_DOT[info['int8_dot']]}",
        f"  threads:      {info['threads']} (MOE_NUM_THREADS / moe.set_num_threads)",
        f"  cuda:         {_cuda_line()}",
        f"  numpy:        {np.__version__}",
    ]
    print("\n".join(lines), file=file)


def _cuda_line():
    info = _C.cuda_info()
    if not info["built"]:
        return f"not built ({info['reason']})"
    return f"built, {info['devices']} device(s) (never run on a GPU yet: unverified)"


def cuda_available() -> bool:
    """Whether a CUDA device can be used: the CUDA library was built (nvcc present at
    install time) and a driver and a GPU are there.  Never raises."""
    try:
        return _C.cuda_info()["devices"] > 0
    except Exception:  # noqa: BLE001 -- a broken driver means no CUDA, not an error
        return False


__all__ = ["route", "update_expert_bias", "dispatch", "combine", "expert_ffn", "ffn",
           "pack_experts", "PackedExperts", "set_num_threads", "get_num_threads",
           "float32_to_bfloat16", "bfloat16_to_float32", "RoutingResult", "Dispatch",
           "show_config", "cuda_available", "SCORINGS", "ACTIVATIONS", "WEIGHT_DTYPES"]
