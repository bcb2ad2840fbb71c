"""Quantized expert weights: int8, int4 and MXFP4.

A quantized weight (rows, k) -- or (E, rows, k) for routed experts -- is a QuantizedWeight:
values plus one scale per group of `group_size` weights along k (the input dimension),
w = value * scale:

  "int8"   values int8 (rows, k); scales float16 (rows, ceil(k / group_size)).
  "int4"   two values per byte (rows, ceil(k / 2)) uint8, element k in byte k // 2, the low
           nibble for even k; nibble n is the integer n - 8 (-8..7); scales float16.
  "mxfp4"  the OCP microscaling format as gpt-oss stores it: e2m1 nibbles laid out as int4
           (n: sign bit 3, exponent bits 2-1, mantissa bit 0), scales uint8 e8m0
           (2^(e - 127)), groups of 32.

group_size 0: one scale per row (per output channel; int8 and int4); None: the format's
default (int8: per row, int4 and mxfp4: 32).  Dequantizing is
exact in float32 (a value times a float16 or a power of two), and the CPU kernels
dequantize in registers: a quantized layer's output is bitwise the float32 layer's on the
dequantized weights.

moe.quantize(layer, "int4") quantizes a SparseMoE's expert weights (round to nearest, or
with calibration= the activation-aware clipping search described there).
"""
from __future__ import annotations

import numpy as np

from . import _C
from ._api import WEIGHT_DTYPES, _shape_str, weight_array, weight_bits

QUANT_DTYPES = _C.QUANT_DTYPES
# the group size each format takes by default (None: one scale per row)
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 32, "mxfp4": 32}
# e2m1 values by nibble (sign, exponent, mantissa)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def check_group_size(dtype, group_size, name="group_size"):
    """group_size for format `dtype` (None: the format's default) as an int, 0 meaning one
    scale per row; raises ValueError naming `name` otherwise."""
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, QUANT_DTYPES))} to take "
                         f"a {name}; got {dtype!r}")
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[dtype]
    if group_size is None:
        return 0
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size,
                                                                 (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {type(group_size).__name__}")
    group_size = int(group_size)
    if dtype == "mxfp4" and group_size != 32:
        raise ValueError(f"{name} must be 32 for mxfp4 (one e8m0 scale per 32 values), "
                         f"got {group_size}")
    if group_size < 0:
        raise ValueError(f"{name} must be >= 1, or 0 for one scale per row, got {group_size}")
    return group_size


def n_groups(k, group_size):
    """Scales per row of k weights (group_size 0: one per row)."""
    return (1 if k else 0) if group_size == 0 or group_size >= k else -(-k // group_size)


def value_shape(dtype, shape):
    """The shape of the values array of a weight of float shape `shape`."""
    return tuple(shape[:-1]) + ((shape[-1] if dtype == "int8" else (shape[-1] + 1) // 2),)


def scale_shape(dtype, shape, group_size):
    return tuple(shape[:-1]) + (n_groups(shape[-1], group_size),)


class QuantizedWeight:
    """A quantized weight: values, scales, the format (dtype) and group_size (0: one
    scale per row), and `shape`, the shape of the float weight it stands for.

    QuantizedWeight(values, scales, dtype, shape, group_size=None) checks the arrays
    against the format and shape (raising ValueError / TypeError naming them)."""

    __slots__ = ("values", "scales", "dtype", "group_size", "shape")

    def __init__(self, values, scales, dtype, shape, group_size=None):
        group_size = check_group_size(dtype, group_size)
        shape = _check_shape_arg(shape)
        vtype = np.int8 if dtype == "int8" else np.uint8
        stype = np.uint8 if dtype == "mxfp4" else np.float16
        values = _exact_array(values, "values", vtype, value_shape(dtype, shape), dtype)
        scales = _exact_array(scales, "scales", stype, scale_shape(dtype, shape, group_size),
                              dtype)
        if dtype != "int8" and shape[-1] % 2 and values.size and np.any(values[..., -1] >> 4):
            raise ValueError(f"values: the high nibble of each row's last byte must be 0 (k="
                             f"{shape[-1]} is odd)")
        for name, v in (("values", values), ("scales", scales), ("dtype", dtype),
                        ("group_size", group_size), ("shape", shape)):
            object.__setattr__(self, name, v)

    def __setattr__(self, name, value):
        raise AttributeError("a QuantizedWeight is read-only (make a new one)")

    def __getstate__(self):
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state):
        for s in self.__slots__:
            object.__setattr__(self, s, state[s])

    @property
    def nbytes(self):
        return self.values.nbytes + self.scales.nbytes

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, index):
        """An integer index into the leading dimension (an expert) as a QuantizedWeight."""
        if not isinstance(index, (int, np.integer)) or self.ndim < 3:
            raise TypeError("a QuantizedWeight takes one integer index (an expert) along "
                            "its first dimension")
        return QuantizedWeight(self.values[index], self.scales[index], self.dtype,
                               self.shape[1:], self.group_size)

    def dequantize(self):
        """The weight as float32: exact (mxfp4 weights past float32's range, which layers
        refuse, become inf; e8m0 scale 255 is NaN)."""
        return dequantize(self.values, self.scales, self.dtype, self.shape[-1],
                          self.group_size)

    def __repr__(self):
        g = self.group_size or "per row"
        return (f"QuantizedWeight({self.dtype}, shape={self.shape}, group_size={g}, "
                f"{self.nbytes / 2**20:.2f} MiB)")


def _check_shape_arg(shape):
    """shape: the float weight's shape, >= 2 sizes >= 0, as a tuple of ints."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of sizes, got {type(shape).__name__}") \
            from None
    if len(dims) < 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(
            s, (bool, np.bool_)) and s >= 0 for s in dims):
        raise ValueError(f"shape must be the float weight's shape, 2 or more sizes >= 0 "
                         f"(..., rows, k), got {shape!r}")
    return tuple(int(s) for s in dims)


def _exact_array(a, name, dtype, shape, fmt):
    try:
        arr = np.asarray(a)
    except Exception as exc:  # a tensor on another device, ...
        raise TypeError(f"{name} must be an array, got {type(a).__name__}: {exc}") from None
    if fmt != "mxfp4" and name == "scales" and arr.dtype == np.uint16:
        arr = arr.view(np.float16)  # float16 bits
    if arr.dtype != dtype:
        raise TypeError(f"{name} of a {fmt} weight must be {np.dtype(dtype).name}, got "
                        f"{arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} of a {fmt} weight of this shape must have shape "
                         f"{tuple(shape)}, got {arr.shape}")
    return np.require(arr, requirements=("C", "A"))


def _nibbles(values, k):
    """(.., ceil(k / 2)) uint8 -> (.., k) nibbles."""
    out = np.empty(values.shape[:-1] + (2 * values.shape[-1],), np.uint8)
    out[..., 0::2] = values & 0x0F
    out[..., 1::2] = values >> 4
    return out[..., :k]


def _pack_nibbles(n):
    """(.., k) nibbles -> (.., ceil(k / 2)) uint8, even k low."""
    k = n.shape[-1]
    if k % 2:
        n = np.concatenate([n, np.zeros(n.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (n[..., 0::2] | (n[..., 1::2] << 4)).astype(np.uint8)


def _per_element(scales, k, group_size):
    """(.., groups) scales -> (.., k), each weight's scale."""
    g = min(group_size, k) if group_size and k else max(k, 1)
    return np.repeat(scales, g, axis=-1)[..., :k]


def dequantize(values, scales, dtype, k, group_size):
    """values and scales of format `dtype` (rows of k weights) -> float32, exactly."""
    if dtype == "int8":
        q = values.astype(np.float32)
    elif dtype == "int4":
        q = _nibbles(values, k).astype(np.float32) - 8.0
    else:
        q = E2M1_VALUES[_nibbles(values, k)]
    if dtype == "mxfp4":  # e8m0 255 is NaN
        s = np.where(scales == 255, np.float32(np.nan),
                     np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)).astype(np.float32)
    else:
        s = scales.astype(np.float32)
    return q * _per_element(s, k, group_size)


def _group_view(w, group_size):
    """(.., k) float64 -> (.., groups, g) padded with zeros, and g."""
    k = w.shape[-1]
    # a group as long as the row or longer is the row (no padding past it)
    g = min(group_size, k) if group_size and k else max(k, 1)
    n = n_groups(k, group_size)
    pad = n * g - k
    if pad:
        w = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,))], axis=-1)
    return w.reshape(w.shape[:-1] + (n, g)), g


def _round_e2m1(v):
    """float64 v (already scaled) -> nearest e2m1 nibble, ties to the even mantissa, |v|
    past 6 saturating."""
    mag = E2M1_VALUES[:8].astype(np.float64)
    a = np.minimum(np.abs(v), 6.0)
    hi = np.clip(np.searchsorted(mag, a, side="left"), 1, 7)
    lo = hi - 1
    d_lo, d_hi = a - mag[lo], mag[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return code | (np.signbit(v) & (code != 0)).astype(np.uint8) << 3


def quantize_weight(w, dtype, group_size=None, *, importance=None, name="w"):
    """A float weight (.., rows, k) -> QuantizedWeight of format `dtype`, rounding to
    nearest.  int8 / int4: symmetric, scale = the group's largest magnitude over 127 (int4:
    its signed extreme over -8, so it takes the value -8), rounded to float16.  mxfp4: the
    OCP rule, scale = 2^(floor(log2(max |w|)) - 2), values rounded to nearest e2m1 (ties
    to even), saturating at 6.

    importance (k,) >= 0 (calibration: the mean square of each input feature): int8 / int4
    scales are then searched over clipping ratios 1.0 .. 0.5 per group to minimise
    sum_k importance_k (w - w_q)^2, the error in the layer's output for such inputs."""
    group_size = check_group_size(dtype, group_size)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (rows, k), got shape "
                         f"{w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} holds NaN or Inf values; they cannot be quantized")
    k = w.shape[-1]
    grouped, g = _group_view(w, group_size)
    if dtype == "mxfp4":
        amax = np.max(np.abs(grouped), axis=-1)
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2
        e = np.clip(np.where(amax > 0, e, -127), -127, 127).astype(np.int32)
        codes = _round_e2m1(grouped / np.ldexp(1.0, e)[..., None])
        codes = codes.reshape(codes.shape[:-2] + (-1,))[..., :k]
        return QuantizedWeight(_pack_nibbles(codes), (e + 127).astype(np.uint8), dtype,
                               w.shape, group_size)
    qmax, qmin = (127, -127) if dtype == "int8" else (7, -8)
    imp = None
    if importance is not None:
        imp = np.asarray(importance, np.float64)
        if imp.shape != (k,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
            raise ValueError(f"importance must be ({k},) finite values >= 0, got shape "
                             f"{imp.shape}")
        imp = _group_view(np.broadcast_to(imp, w.shape[-1:]), group_size)[0]
    best_s, best_q, best_err = None, None, None
    for ratio in ((1.0,) if imp is None else np.linspace(1.0, 0.5, 11)):
        s, q = _symmetric(grouped, ratio, qmax, qmin, dtype)
        if imp is None:
            best_s, best_q = s, q
            break
        err = np.sum(imp * (grouped - q * s.astype(np.float64)[..., None]) ** 2, axis=-1)
        if best_err is None:
            best_s, best_q, best_err = s, q, err
            continue
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_q = np.where(better[..., None], q, best_q)
        best_err = np.where(better, err, best_err)
    if not np.all(np.isfinite(best_s)):
        raise ValueError(f"{name}: a group's scale overflows float16 (|w| up to "
                         f"{float(np.max(np.abs(w))):.3g}; {dtype} reaches "
                         f"{65504.0 * -qmin:.3g}): scale the weights down first")
    q = best_q.reshape(best_q.shape[:-2] + (-1,))[..., :k]
    values = q.astype(np.int8) if dtype == "int8" else _pack_nibbles((q + 8).astype(np.uint8))
    return QuantizedWeight(values, best_s, dtype, w.shape, group_size)


def _symmetric(grouped, ratio, qmax, qmin, dtype):
    """Scales (float16) and integer values (float64) of each group at a clipping ratio."""
    if dtype == "int8":
        extreme = np.max(np.abs(grouped), axis=-1) / qmax
    else:
        idx = np.argmax(np.abs(grouped), axis=-1)[..., None]
        extreme = np.take_along_axis(grouped, idx, axis=-1)[..., 0] / qmin
        extreme = np.where(extreme == 0, 0.0, extreme)  # no -0 scales
        extreme = np.abs(extreme) if dtype == "int8" else extreme
    s = (extreme * ratio).astype(np.float16)
    s64 = s.astype(np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s64 != 0, np.rint(grouped / np.where(s64 != 0, s64, 1.0)), 0.0)
    return s, np.clip(q, qmin, qmax)


def dtype_code(dtype):
    """The core's code of a storage dtype (float or quantized)."""
    return (WEIGHT_DTYPES + QUANT_DTYPES).index(dtype)


def quantized_weight(value, name, shape, dtype, group_size):
    """A layer's expert weight of quantized `dtype` from what was assigned: a
    QuantizedWeight (checked against the layer), a (values, scales) pair in the format's
    layout, or a float array (quantized to nearest).  shape: ((size name, size), ...)."""
    dims = tuple(n for _, n in shape)
    if isinstance(value, QuantizedWeight):
        if value.dtype != dtype or value.group_size != group_size or value.shape != dims:
            raise ValueError(
                f"{name}: the layer takes {dtype} weights of shape {dims} with group_size="
                f"{group_size or 'per row'}, got a QuantizedWeight({value.dtype}, shape="
                f"{value.shape}, group_size={value.group_size or 'per row'})")
        return value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"{name}: a quantized weight is a QuantizedWeight, a (values, "
                             f"scales) pair or a float array; got a tuple of {len(value)}")
        try:
            return QuantizedWeight(value[0], value[1], dtype, dims, group_size)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
    return quantize_weight(weight_array(value, name, shape, "float32"), dtype, group_size,
                           name=name)


def pack_weight_args(w_gate, w_up, w_down, dtype, group_size, one=False):
    """The weight keywords of _C.pack_experts for weights stored in `dtype` (one: single
    matrices, given a leading expert axis of 1)."""
    lead = (lambda a: a[None]) if one else (lambda a: a)
    if dtype not in QUANT_DTYPES:
        return dict(w_gate=None if w_gate is None else weight_bits(lead(w_gate)),
                    w_up=weight_bits(lead(w_up)), w_down=weight_bits(lead(w_down)),
                    dtype=dtype_code(dtype))
    kw = dict(w_gate=None, dtype=dtype_code(dtype), group_size=group_size)
    for key, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w is None:
            continue
        kw[key] = lead(w.values)
        sc = lead(w.scales)
        kw[key + "_scales"] = sc.view(np.uint16) if sc.dtype == np.float16 else sc
    return kw


def _stack(parts, dtype, group_size):
    """QuantizedWeights of one shape -> one with a leading axis over them."""
    return QuantizedWeight(np.stack([p.values for p in parts]),
                           np.stack([p.scales for p in parts]), dtype,
                           (len(parts),) + parts[0].shape, group_size)


def _float_weight(w):
    return None if w is None else (w.dequantize() if isinstance(w, QuantizedWeight)
                                   else np.asarray(w))


def quantize(layer, dtype, group_size=None, *, shared_dtype=None, calibration=None,
             compute_dtype="float32"):
    """A copy of SparseMoE `layer` with its expert FFN weights quantized to `dtype`
    ("int8", "int4" or "mxfp4"; see moe.quant): the router, biases, LoRA adapters and
    every option are kept.  group_size: weights per scale along k (int8 default: one scale
    per row; int4: 32; mxfp4: 32 only).  shared_dtype: storage of the shared experts
    (default `dtype`; e.g. "bfloat16" or "int8" to keep them more precise than int4
    routed experts).

    Round to nearest by default.  calibration=x (tokens, d_model), int8 / int4 only: an
    activation-aware variant -- each group's scale is searched over clipping ratios 1.0 ..
    0.5 to minimise the error of the layer's outputs on these inputs, sum_k E[a_k^2]
    (w_k - w_q,k)^2 with a the inputs the weight sees: the tokens routed to the expert
    (gate / up) or their hidden activations (down), per expert.  Experts no token
    reaches are rounded to nearest.  compute_dtype: the new layer's ("float32": exact
    dequantization; "int8": activations quantized too, see SparseMoE).  The result saves
    and loads bitwise (moe.save)."""
    from .layer import SparseMoE
    from . import reference
    if not isinstance(layer, SparseMoE):
        raise TypeError(f"layer must be a moe.SparseMoE, got {type(layer).__name__}")
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, QUANT_DTYPES))}; got "
                         f"{dtype!r}")
    group_size = check_group_size(dtype, group_size)
    shared_dtype = dtype if shared_dtype is None else shared_dtype
    cfg = dict(layer.config(), dtype=dtype, group_size=group_size, shared_dtype=shared_dtype,
               compute_dtype=compute_dtype)
    out = SparseMoE(**cfg, init=False)
    names = [n for n in layer._weight_names() if getattr(layer, n) is not None]
    expert = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")
    for n in names:
        if n not in expert:
            setattr(out, n, getattr(layer, n))
    weights = {n: reference._decode_stored(getattr(layer, n)) for n in expert
               if n in names}
    imp = {}
    if calibration is not None:
        if dtype == "mxfp4":
            raise ValueError("calibration= searches int8 / int4 scales; mxfp4's scales are "
                             "fixed by the format's rule")
        imp = _importances(layer, weights, calibration)
    for n, w in weights.items():
        dt = shared_dtype if n.startswith("shared_") else dtype
        if dt not in QUANT_DTYPES:
            setattr(out, n, w.astype(np.float32))
            continue
        if n.startswith("shared_"):
            q = quantize_weight(w, dt, group_size, importance=imp.get(n), name=n)
        else:
            q = _stack([quantize_weight(w[e], dt, group_size, name=n,
                                        importance=imp.get(n, {}).get(e))
                        for e in range(w.shape[0])], dt, group_size)
        setattr(out, n, q)
    return out


def _importances(layer, weights, x):
    """E[a^2] of the inputs each expert weight sees on calibration batch x: {name:
    {expert: (k,)}} for routed weights, {name: (k,)} for shared ones."""
    from . import reference
    from ._api import GATED, float_array
    x = float_array(x, "calibration", (("tokens", None), ("d_model", layer.d_model)))
    _, routing = layer(x, return_routing=True)
    ids = np.asarray(routing.expert_ids)
    gated = layer.activation in GATED
    xd = x.astype(np.float64)

    def hidden(rows, wg, wu):
        g = rows @ wg.T if gated else None
        return reference.activate(layer.activation, g, rows @ wu.T, layer.swiglu_alpha,
                                  layer.swiglu_limit)

    imp = {n: {} for n in ("w_gate", "w_up", "w_down")}
    for e in range(layer.n_experts):
        rows = xd[np.any(ids == e, axis=-1)]
        if not len(rows):
            continue
        sq = np.mean(rows ** 2, axis=0)
        imp["w_gate"][e] = imp["w_up"][e] = sq
        h = hidden(rows, weights["w_gate"][e] if gated else None, weights["w_up"][e])
        imp["w_down"][e] = np.mean(h ** 2, axis=0)
    if layer.n_shared_experts and "shared_w_up" in weights:
        sq = np.mean(xd ** 2, axis=0)
        imp["shared_w_gate"] = imp["shared_w_up"] = sq
        h = hidden(xd, weights.get("shared_w_gate"), weights["shared_w_up"])
        imp["shared_w_down"] = np.mean(h ** 2, axis=0)
    return imp
