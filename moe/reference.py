"""Pure NumPy float64 reference implementation of the sparse Mixture-of-Experts layer.

This module is the test oracle for the C core: every routine here is written for
clarity rather than speed (plain loops over tokens where that makes the semantics
obvious) and computes everything in float64. It depends only on ``numpy`` and
``math`` and deliberately imports nothing from the rest of the ``moe`` package.
"""

import math

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "GATED",
    "activate",
    "combine",
    "dispatch",
    "expert_ffn",
    "ffn",
    "flylora_select",
    "layer_forward",
    "logsumexp",
    "lora_forward",
    "lora_linear",
    "lora_mixture",
    "multi_head_moe",
    "mixture_of_tokens",
    "peer_forward",
    "route",
    "route_expert_choice",
    "route_threshold",
    "route_top_p",
    "sigmoid",
    "skip_experts",
    "soft_moe",
    "softmax",
    "sparse_moe",
    "update_expert_bias",
]

# The names come from the core's lists; the formulas below are this file's own.
from ._C import ACTIVATIONS, PEER_ACTIVATIONS, QUANT_DTYPES, SCORINGS  # noqa: E402
from ._C import GATED_ACTIVATIONS as GATED  # noqa: E402


# --------------------------------------------------------------------------- #
# Numerically stable helpers
# --------------------------------------------------------------------------- #

def softmax(x, axis=-1):
    """Stable softmax of ``x`` (any shape, cast to float64) along ``axis``.

    Returns a float64 array of the same shape as ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x):
    """Stable logistic function 1 / (1 + exp(-x)), elementwise.

    ``x``: any shape, cast to float64. Returns a float64 array of the same shape
    (a 0-d array for scalar input).
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def logsumexp(x, axis=-1):
    """Stable log(sum(exp(x))) along ``axis``.

    ``x``: any shape, cast to float64. Returns a float64 array with ``axis`` removed.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(np.exp(x - m), axis=axis, keepdims=True)
    return np.squeeze(np.log(s) + m, axis=axis)


# --------------------------------------------------------------------------- #
# Routing
# --------------------------------------------------------------------------- #

def _stable_desc_order(values):
    """Indices that sort ``values`` descending, ties toward the lower index."""
    return np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")


def _count(expert_ids, n_experts):
    """(n_experts,) int64: how many slots chose each expert (-1 = none)."""
    ids = np.asarray(expert_ids).ravel()
    return np.bincount(ids[ids >= 0], minlength=n_experts).astype(np.int64)


def route(logits, top_k, *, scoring="softmax", renormalize=True, routed_scaling=1.0,
          expert_bias=None, n_groups=1, topk_groups=1, capacity_factor=None, allowed=None):
    """Top-k router: pick experts per token, compute weights, capacity and losses.

    Args:
      logits: (T, E) router logits (cast to float64; must be finite).
      top_k: int in 1..E, experts per token.
      scoring: "softmax", "softmax-after-topk" or "sigmoid".
      renormalize: divide the k weights by their sum (when the sum is > 0).
      routed_scaling: float multiplier applied to the weights last.
      expert_bias: (E,) float or None; added to the scores for *selection only*.
      n_groups, topk_groups: group-limited top-k (DeepSeek style) when n_groups > 1.
      capacity_factor: float or None; per-expert capacity
        ``ceil(capacity_factor * T * top_k / E)``, overflow assignments dropped.
      allowed: (T, E) bool or None; masked experts are never *selected* (scores, weights
        and losses still use all E); needs n_groups == 1 and >= top_k allowed per token.

    Returns a dict:
      "expert_ids": (T, top_k) int32, -1 for dropped assignments;
      "weights":    (T, top_k) float64, 0.0 for dropped assignments;
      "counts":     (E,) int64, kept assignments per expert;
      "n_dropped":  int;
      "aux_loss":   float, Switch load-balancing loss (counts before dropping);
      "z_loss":     float, mean over tokens of logsumexp(logits[t])**2;
      "probs":      (T, E) float64, per-token probabilities used by aux_loss.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (T, E), got shape {logits.shape}")
    T, E = logits.shape
    top_k = int(top_k)
    n_groups = int(n_groups)
    topk_groups = int(topk_groups)

    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if n_groups < 1 or E % n_groups != 0:
        raise ValueError(f"n_groups={n_groups} does not divide n_experts={E}")
    G = E // n_groups
    if n_groups > 1 and topk_groups * G < top_k:
        raise ValueError(
            f"topk_groups * (E // n_groups) = {topk_groups * G} < top_k = {top_k}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain non-finite values")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool).reshape(T, E)
        if n_groups != 1:
            raise ValueError("allowed needs n_groups == 1")
        for t in range(T):
            if allowed[t].sum() < top_k:
                raise ValueError(f"allowed lets token {t} choose {int(allowed[t].sum())} "
                                 f"expert(s), fewer than top_k={top_k}")

    if expert_bias is None:
        bias = np.zeros(E, dtype=np.float64)
    else:
        bias = np.asarray(expert_bias, dtype=np.float64).reshape(E)

    expert_ids = np.full((T, top_k), -1, dtype=np.int32)
    weights = np.zeros((T, top_k), dtype=np.float64)
    probs = np.zeros((T, E), dtype=np.float64)

    for t in range(T):
        row = logits[t]

        # 1. scores used for selection, and the source of the weights
        if scoring == "softmax":
            score = softmax(row)
            sel = score + bias
        elif scoring == "softmax-after-topk":
            score = None  # computed after selection
            sel = row + bias
        else:  # "sigmoid"
            score = sigmoid(row)
            sel = score + bias

        # 2. group-limited eligibility
        if n_groups > 1:
            m = min(2, G)
            group_scores = np.empty(n_groups, dtype=np.float64)
            for g in range(n_groups):
                vals = np.sort(sel[g * G:(g + 1) * G])[::-1]  # descending
                group_scores[g] = vals[:m].sum()
            best_groups = _stable_desc_order(group_scores)[:topk_groups]
            eligible = np.zeros(E, dtype=bool)
            for g in best_groups:
                eligible[g * G:(g + 1) * G] = True
        else:
            eligible = np.ones(E, dtype=bool)
        if allowed is not None:
            eligible &= allowed[t]

        # 3. top-k among the eligible experts, sel descending, ties -> lower index
        cand = np.flatnonzero(eligible)  # ascending expert index
        order = _stable_desc_order(sel[cand])
        ids = cand[order[:top_k]]

        # 4. weights
        if scoring == "softmax-after-topk":
            w = softmax(row[ids])
        else:
            w = score[ids].copy()
        if renormalize:
            total = w.sum()
            if total > 0:
                w = w / total
        w = w * routed_scaling

        expert_ids[t] = ids
        weights[t] = w

        # 6. probabilities for the aux loss (always unbiased)
        if scoring == "sigmoid":
            s = sigmoid(row)
            total = s.sum()
            probs[t] = s / total if total > 0 else 0.0
        else:
            probs[t] = softmax(row)

    # 7. losses (selection counts BEFORE capacity dropping)
    selected_counts = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for j in range(top_k):
            selected_counts[expert_ids[t, j]] += 1
    if T > 0:
        f = selected_counts.astype(np.float64) / (T * top_k)
        P = probs.mean(axis=0)
        aux_loss = float(E * np.sum(f * P))
        lse = logsumexp(logits, axis=-1)
        z_loss = float(np.mean(lse ** 2))
    else:
        aux_loss = 0.0
        z_loss = 0.0

    # 5. capacity dropping, walking (t, j) in order
    n_dropped = 0
    if capacity_factor is not None:
        limit = capacity_factor * T * top_k / E
        cap = math.ceil(limit) if math.isfinite(limit) else math.inf  # inf: drops nothing
        kept = np.zeros(E, dtype=np.int64)
        for t in range(T):
            for j in range(top_k):
                e = int(expert_ids[t, j])
                if kept[e] < cap:
                    kept[e] += 1
                else:
                    expert_ids[t, j] = -1
                    weights[t, j] = 0.0
                    n_dropped += 1

    counts = _count(expert_ids, E)

    return {
        "expert_ids": expert_ids,
        "weights": weights,
        "counts": counts,
        "n_dropped": int(n_dropped),
        "aux_loss": aux_loss,
        "z_loss": z_loss,
        "probs": probs,
    }


def update_expert_bias(bias, counts, rate):
    """Auxiliary-loss-free balancing step (DeepSeek-V3).

    Args:
      bias: (E,) float expert bias.
      counts: (E,) int assignments per expert in the last batch.
      rate: float update speed.

    Returns a new (E,) float64 array ``bias + rate * sign(mean(counts) - counts)``.
    """
    bias = np.asarray(bias, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    return bias + float(rate) * np.sign(counts.mean() - counts)


# --------------------------------------------------------------------------- #
# Dispatch / combine
# --------------------------------------------------------------------------- #

def dispatch(x, expert_ids, n_experts):
    """Group the (token, slot) pairs by expert with a stable counting sort.

    Args:
      x: (T, d) token activations (cast to float64).
      expert_ids: (T, k) ints in [0, n_experts), or -1 for "not dispatched".
      n_experts: int E.

    Returns a dict:
      "offsets":     (E+1,) int64, expert e owns sorted rows offsets[e]:offsets[e+1];
      "counts":      (E,) int64, rows per expert;
      "token_index": (N,) int64, source token of each sorted row (N = #ids != -1);
      "position":    (T, k) int64, sorted row of pair (t, j), -1 where the id is -1;
      "x_sorted":    (N, d) float64, x[token_index].
    Within an expert, rows are in (t, j) order.
    """
    x = np.asarray(x, dtype=np.float64)
    expert_ids = np.asarray(expert_ids)
    E = int(n_experts)
    T, k = expert_ids.shape
    if np.any((expert_ids < -1) | (expert_ids >= E)):
        raise ValueError(f"expert_ids must be in [-1, {E})")

    # count
    counts = _count(expert_ids, E)

    # exclusive prefix sum
    offsets = np.zeros(E + 1, dtype=np.int64)
    for e in range(E):
        offsets[e + 1] = offsets[e] + counts[e]
    N = int(offsets[E])

    # scatter in (t, j) order -> stable
    cursor = offsets[:E].copy()
    token_index = np.zeros(N, dtype=np.int64)
    position = np.full((T, k), -1, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            e = int(expert_ids[t, j])
            if e < 0:
                continue
            row = cursor[e]
            cursor[e] += 1
            token_index[row] = t
            position[t, j] = row

    x_sorted = x[token_index] if N > 0 else np.zeros((0,) + x.shape[1:], dtype=np.float64)
    return {
        "offsets": offsets,
        "counts": counts,
        "token_index": token_index,
        "position": position,
        "x_sorted": x_sorted,
    }


def combine(y_sorted, position, weights):
    """Weighted scatter-add of expert outputs back to token order.

    Args:
      y_sorted: (N, d) expert outputs in dispatch order (cast to float64).
      position: (T, k) ints, row of y_sorted for pair (t, j), or -1 to skip.
      weights: (T, k) routing weights (cast to float64).

    Returns (T, d) float64 with
    ``out[t] = sum_{j=0..k-1, position[t,j] != -1} weights[t, j] * y_sorted[position[t, j]]``
    accumulated in slot order; zeros for a token with no slots.
    """
    y_sorted = np.asarray(y_sorted, dtype=np.float64)
    position = np.asarray(position)
    weights = np.asarray(weights, dtype=np.float64)
    T, k = position.shape
    d = y_sorted.shape[1]
    out = np.zeros((T, d), dtype=np.float64)
    for t in range(T):
        for j in range(k):
            p = int(position[t, j])
            if p < 0:
                continue
            out[t] += weights[t, j] * y_sorted[p]
    return out


# --------------------------------------------------------------------------- #
# Activations and feed-forward networks
# --------------------------------------------------------------------------- #

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _silu(z):
    return z * sigmoid(z)


def _gelu(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def activate(name, gate, up, alpha=1.702, limit=7.0):
    """Apply the named (possibly gated) activation elementwise.

    Args:
      name: one of ACTIVATIONS.
      gate: array (any shape) for gated activations; ignored (may be None) otherwise.
      up: array of the same shape as ``gate``.

    Gated: "swiglu" silu(gate)*up, "geglu" gelu(gate)*up, "geglu-tanh"
    gelu_tanh(gate)*up, "swiglu-oai" (gpt-oss) with g = min(gate, limit) and
    u = clip(up, -limit, limit): (u + 1) * g * sigmoid(alpha * g). Non-gated (applied to
    ``up``): "gelu", "gelu-tanh", "relu", "silu". Returns float64 of the shape of ``up``.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    up = np.asarray(up, dtype=np.float64)
    if name in GATED:
        if gate is None:
            raise ValueError(f"gated activation {name!r} needs a gate input")
        gate = np.asarray(gate, dtype=np.float64)
        if name == "swiglu":
            return _silu(gate) * up
        if name == "geglu":
            return _gelu(gate) * up
        if name == "swiglu-oai":
            g = np.minimum(gate, limit)
            u = np.clip(up, -limit, limit)
            return (u + 1.0) * g * sigmoid(alpha * g)
        return _gelu_tanh(gate) * up  # "geglu-tanh"
    if name == "gelu":
        return _gelu(up)
    if name == "gelu-tanh":
        return _gelu_tanh(up)
    if name == "relu":
        return np.maximum(up, 0.0)
    return _silu(up)  # "silu"


def round_bfloat16(a):
    """float64 values rounded to float32, then to bfloat16 (nearest even), as float64."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint32) << 16
    return rounded.view(np.float32).astype(np.float64)


Q8_BLOCK = 256  # int8 compute: the most rows of one activation scale (cpu/kernels.h)


def quantize_activations(x, group_size=None):
    """int8 compute's rounding of activations x (T, K): q * s as float64, exactly the
    kernels' q and s.

    Per row, per block of group_size values along k (None / 0, or >= K: the whole row),
    each cut in sub-blocks of at most Q8_BLOCK: amax = max |v| (float32),
    q = round-half-even(v * min(127 / amax, FLT_MAX)) clipped to +-127 (0 when amax is 0),
    s = amax / 127, all in float32.  A NaN or Inf value makes its sub-block NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    T, K = x.shape
    g = K if not group_size or group_size >= K else int(group_size)
    out = np.empty((T, K), dtype=np.float64)
    big = np.float32(np.finfo(np.float32).max)
    for k0 in range(0, K, max(g, 1)):
        k1 = min(K, k0 + g)
        for s0 in range(k0, k1, Q8_BLOCK):
            v = x[:, s0:min(k1, s0 + Q8_BLOCK)]
            finite = np.isfinite(v)
            bad = ~finite.all(axis=1)
            amax = np.where(finite, np.abs(v), np.float32(0)).max(axis=1)
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                inv = np.where(amax > 0, np.minimum(np.float32(127) / amax, big),
                               np.float32(0)).astype(np.float32)
                q = np.clip(np.rint(v * inv[:, None]), -127, 127)
            s = (amax / np.float32(127)).astype(np.float32)
            blk = q.astype(np.float64) * s.astype(np.float64)[:, None]
            blk[bad] = np.nan
            out[:, s0:s0 + v.shape[1]] = blk
    return out


def ffn(x, w_gate, w_up, w_down, activation="swiglu", b_gate=None, b_up=None, b_down=None,
        alpha=1.702, limit=7.0, lora=None, lora_scaling=1.0, compute_dtype="float32",
        group_size=None):
    """Dense feed-forward block in the nn.Linear weight layout.

    Args:
      x: (T, d).
      w_gate: (F, d), or None for non-gated activations (ignored if non-gated).
      w_up: (F, d).
      w_down: (d, F).
      activation: one of ACTIVATIONS.

    Returns (T, d) float64: activate(activation, x @ w_gate.T + b_gate, x @ w_up.T + b_up)
    @ w_down.T + b_down (biases (F,), (F,), (d,) optional; alpha/limit: "swiglu-oai").
    lora: {"w_gate" | "w_up" | "w_down": (a (r, in), b (out, r))} adds
    lora_scaling * (v @ a.T) @ b.T to that projection of its input v (x, or h for w_down).
    compute_dtype "bfloat16": x and h are rounded to bfloat16 (round_bfloat16) before the
    matmuls that read them (the layers' bf16 compute); the sums stay exact.
    compute_dtype "int8": x and h (as float32) go through quantize_activations with the
    weights' group_size (the layers' int8 compute); the sums stay exact.
    """
    x = np.asarray(x, dtype=np.float64)
    bf16 = compute_dtype == "bfloat16"
    q8 = compute_dtype == "int8"
    if bf16:
        x = round_bfloat16(x)
    if q8:
        x = quantize_activations(x, group_size)
    w_up = np.asarray(w_up, dtype=np.float64)
    w_down = np.asarray(w_down, dtype=np.float64)

    def bias(b):
        return 0.0 if b is None else np.asarray(b, dtype=np.float64)

    lora = lora or {}

    def delta(name, v):
        if name not in lora:
            return 0.0
        a, b = (np.asarray(m, dtype=np.float64) for m in lora[name])
        return lora_scaling * ((v @ a.T) @ b.T)

    if activation in GATED and w_gate is not None:
        gate = x @ np.asarray(w_gate, dtype=np.float64).T + bias(b_gate) + delta("w_gate", x)
    else:
        gate = None
    h = activate(activation, gate, x @ w_up.T + bias(b_up) + delta("w_up", x), alpha, limit)
    if bf16:
        h = round_bfloat16(h)
    if q8:
        h = quantize_activations(h, group_size)
    return h @ w_down.T + bias(b_down) + delta("w_down", h)


def expert_ffn(x_sorted, offsets, w_gate, w_up, w_down, activation="swiglu", b_gate=None,
               b_up=None, b_down=None, alpha=1.702, limit=7.0, lora=None, lora_scaling=1.0,
               expert_d_ff=None, compute_dtype="float32", group_size=None):
    """Run each expert's FFN on its contiguous block of dispatched rows.

    Args:
      x_sorted: (N, d) rows grouped by expert (output of dispatch).
      offsets: (E+1,) ints, expert e owns rows offsets[e]:offsets[e+1].
      w_gate: (E, F, d), or None for non-gated activations.
      w_up: (E, F, d).
      w_down: (E, d, F).
      activation: one of ACTIVATIONS.

    lora: {target: (a (E, r, in), b (E, out, r))} per-expert adapters (see ffn).
    expert_d_ff: (E,) sizes; expert e uses its first expert_d_ff[e] hidden units.
    compute_dtype, group_size: see ffn.

    Returns (N, d) float64.
    """
    x_sorted = np.asarray(x_sorted, dtype=np.float64)
    offsets = np.asarray(offsets)
    w_up = np.asarray(w_up, dtype=np.float64)
    w_down = np.asarray(w_down, dtype=np.float64)
    if w_gate is not None:
        w_gate = np.asarray(w_gate, dtype=np.float64)
    E = w_up.shape[0]
    N = x_sorted.shape[0]
    d_out = w_down.shape[1]
    out = np.zeros((N, d_out), dtype=np.float64)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi <= lo:
            continue
        f = w_up.shape[1] if expert_d_ff is None else int(expert_d_ff[e])
        g = w_gate[e][:f] if w_gate is not None else None
        pick = lambda b: None if b is None else np.asarray(b)[e]  # noqa: E731
        cut = lambda b: None if b is None else np.asarray(b)[e][:f]  # noqa: E731
        lora_e = {t: (a[e], b[e]) for t, (a, b) in (lora or {}).items()}
        out[lo:hi] = ffn(x_sorted[lo:hi], g, w_up[e][:f], w_down[e][:, :f], activation,
                         cut(b_gate), cut(b_up), pick(b_down), alpha, limit, lora_e,
                         lora_scaling, compute_dtype, group_size)
    return out


# --------------------------------------------------------------------------- #
# The whole layer
# --------------------------------------------------------------------------- #

def _route_other(logits, router, top_k, scoring, renormalize, routed_scaling,
                 capacity_factor, router_p, router_threshold, k_min):
    """A layer's routing with router expert_choice / top_p / threshold: the dict of route()
    (ids and weights token-major, -1 / 0 padding; routed_scaling applied) with the losses
    over the assignments this router made, from the same logits: Switch's
    E * sum_e f_e P_e (f: share of the kept assignments, P: mean softmax probability)
    and the z-loss mean(logsumexp^2)."""
    T, n_all = logits.shape
    k_max = min(top_k, n_all)
    if router == "expert_choice":
        cf = 1.0 if capacity_factor is None else capacity_factor
        cap = min(int(math.ceil(cf * T / n_all)), T)
        r = route_expert_choice(logits, cap, scoring)
    elif router == "top_p":
        r = route_top_p(logits, router_p, min(k_min, k_max), k_max, renormalize)
    else:
        r = route_threshold(logits, router_threshold, min(k_min, k_max), k_max,
                            renormalize)
    ids = r["expert_ids"]
    if ids.shape[1] == 0:
        ids = np.full((T, 1), -1, np.int32)
        r["weights"] = np.zeros((T, 1))
    kept = ids[ids >= 0]
    routing = {"expert_ids": ids, "weights": r["weights"] * routed_scaling,
               "counts": np.bincount(kept, minlength=n_all)}
    f = routing["counts"] / kept.size if kept.size else np.zeros(n_all)
    routing["aux_loss"] = float(n_all * np.sum(f * softmax(logits, axis=1).mean(axis=0))) \
        if T and kept.size else 0.0
    routing["z_loss"] = float(np.mean(logsumexp(logits, axis=1) ** 2)) if T else 0.0
    return routing


def _route_other_backward(logits, full_ids, kept, d_weights, router, scoring, renormalize,
                          routed_scaling, aux_coef, z_coef):
    """d logits of  sum(d_weights * weights) + aux_coef * aux + z_coef * z  for
    _route_other, the selection (full_ids, before any skipping) held fixed; slots not
    kept (skipped) pass nothing.  Expert choice: w = c * score (softmax or sigmoid);
    top_p / threshold: w = c * p / sum(p) over the selected with renormalize, else c * p
    (p the softmax); the losses' f is constant (the router's share per expert)."""
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    dw = np.where(kept, np.asarray(d_weights, dtype=np.float64), 0.0) * routed_scaling
    dl = np.zeros((T, E))
    n_kept = int((full_ids >= 0).sum())
    f = np.bincount(full_ids[full_ids >= 0], minlength=E) / n_kept if n_kept else np.zeros(E)
    for t in range(T):
        row, live = logits[t], full_ids[t] >= 0
        sel, g = full_ids[t][live], dw[t][live]
        p = softmax(row)
        ds = np.zeros(E)
        if router == "expert_choice":
            ds[sel] = g
            if scoring == "sigmoid":
                s = sigmoid(row)
                dl[t] += ds * s * (1.0 - s)
            else:
                dl[t] += p * (ds - ds @ p)
        else:
            q = p[sel]
            if renormalize and q.sum() > 0:
                S = q.sum()
                ds[sel] = g / S - (g @ q) / (S * S)
            else:
                ds[sel] = g
            dl[t] += p * (ds - ds @ p)
        if aux_coef and n_kept:
            dP = aux_coef * E * f / T
            dl[t] += p * (dP - dP @ p)
        if z_coef:
            dl[t] += z_coef * 2.0 * logsumexp(row) * p / T
    return dl


def sparse_moe(x, router_weight, w_gate, w_up, w_down, *, top_k, activation="swiglu",
               scoring="softmax", renormalize=True, routed_scaling=1.0, n_groups=1,
               topk_groups=1, expert_bias=None, capacity_factor=None,
               shared_w_gate=None, shared_w_up=None, shared_w_down=None,
               shared_gate_weight=None, router_bias=None, b_gate=None, b_up=None,
               b_down=None, swiglu_alpha=1.702, swiglu_limit=7.0, lora=None,
               lora_scaling=1.0, null_experts=(), null_values=None, allowed=None,
               expert_d_ff=None, router="top_k", router_p=0.5, router_threshold=0.01,
               k_min=1, skip_threshold=0.0, skip_renormalize=False, compute_dtype="float32",
               group_size=None, shared_compute_dtype=None):
    """Full sparse MoE forward: route, dispatch, expert FFNs, combine, shared experts.

    Args:
      x: (..., d) input; flattened to (T, d) internally.
      router_weight: (E, d); logits = x @ router_weight.T.
      w_gate: (E, F, d) or None (ignored for non-gated activations).
      w_up: (E, F, d).  w_down: (E, d, F).
      top_k, scoring, renormalize, routed_scaling, n_groups, topk_groups,
        expert_bias, capacity_factor: passed to route().
      shared_w_gate: (H, d) or None; shared_w_up: (H, d) or None (None = no shared
        experts); shared_w_down: (d, H).
      shared_gate_weight: (1, d) or (d,) or None; scales the shared output per token
        by sigmoid(x @ shared_gate_weight).

      null_experts: kinds ("zero" | "copy" | "constant") of null experts, router outputs
        E..E+n_null-1 (router_weight has E + n_null rows): never dispatched; zero adds 0,
        copy adds w * x, constant adds w * null_values[i]; routing["n_real"] counts each
        token's real experts.

      compute_dtype, group_size: the routed experts' (see ffn); shared_compute_dtype
        the shared experts' (default compute_dtype).

    Returns (out, routing): out is float64 with the shape of ``x``; routing is the
    dict from route() plus key "dispatch" holding the dict from dispatch().
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    xf = x.reshape(-1, d)
    router_weight = np.asarray(router_weight, dtype=np.float64)
    n_null = len(null_experts)
    E = router_weight.shape[0] - n_null  # real experts

    logits = xf @ router_weight.T
    if router_bias is not None:
        logits = logits + np.asarray(router_bias, dtype=np.float64)
    if router == "top_k":
        routing = route(logits, top_k, scoring=scoring, renormalize=renormalize,
                        routed_scaling=routed_scaling, expert_bias=expert_bias,
                        n_groups=n_groups, topk_groups=topk_groups,
                        capacity_factor=capacity_factor, allowed=allowed)
    else:
        routing = _route_other(logits, router, top_k, scoring, renormalize, routed_scaling,
                               capacity_factor, router_p, router_threshold, k_min)
    if skip_threshold > 0:
        sk = skip_experts(routing["expert_ids"], routing["weights"], skip_threshold,
                          skip_renormalize)
        routing = dict(routing, expert_ids=sk["expert_ids"], weights=sk["weights"])
        ids_k = sk["expert_ids"]
        routing["counts"] = np.bincount(ids_k[ids_k >= 0], minlength=logits.shape[1])
    ids_all = routing["expert_ids"]
    real = np.where(ids_all < E, ids_all, -1)  # null experts are never dispatched
    disp = dispatch(xf, real, E)
    gate_w = w_gate if activation in GATED else None
    y_sorted = expert_ffn(disp["x_sorted"], disp["offsets"], gate_w, w_up, w_down,
                          activation, b_gate if activation in GATED else None, b_up, b_down,
                          swiglu_alpha, swiglu_limit, lora, lora_scaling, expert_d_ff,
                          compute_dtype, group_size)
    out = combine(y_sorted, disp["position"], routing["weights"])
    for t in range(xf.shape[0]):
        for j, e in enumerate(ids_all[t]):
            if e >= E and null_experts[e - E] != "zero":
                v = xf[t] if null_experts[e - E] == "copy" else \
                    np.asarray(null_values[e - E], dtype=np.float64)
                out[t] += routing["weights"][t, j] * v

    if shared_w_up is not None:
        sg = shared_w_gate if activation in GATED else None
        shared = ffn(xf, sg, shared_w_up, shared_w_down, activation, alpha=swiglu_alpha,
                     limit=swiglu_limit,
                     compute_dtype=compute_dtype if shared_compute_dtype is None
                     else shared_compute_dtype, group_size=group_size)
        if shared_gate_weight is not None:
            gw = np.asarray(shared_gate_weight, dtype=np.float64).reshape(d)
            shared = shared * sigmoid(xf @ gw)[:, None]
        out = out + shared

    routing = dict(routing)
    routing["dispatch"] = disp
    routing["n_real"] = ((ids_all >= 0) & (ids_all < E)).sum(axis=1)
    # the pruning statistic: per expert, sum of gate * ||expert output||
    out_norm = np.zeros(E)
    for t in range(xf.shape[0]):
        for j, e in enumerate(ids_all[t]):
            if 0 <= e < E:
                r = disp["position"][t, j]
                out_norm[e] += routing["weights"][t, j] * np.linalg.norm(y_sorted[r])
    routing["out_norm"] = out_norm
    return out.reshape(x.shape), routing


def _is_false(flag):
    """True only for an explicit boolean False (a missing flag or an array is not)."""
    return isinstance(flag, (bool, np.bool_)) and not flag


def dequantize(values, scales, dtype, k, group_size):
    """The float64 weights (..., k) of a quantized weight (moe.quant's formats), exactly.

    int8: q = values; int4: nibble n (byte k // 2, low nibble for even k) is q = n - 8;
    mxfp4: nibble n is the e2m1 number (-1)^s 2^(e - 1) (1 + m / 2) (e > 0) or
    (-1)^s m / 2 (e = 0), for sign s = bit 3, exponent e = bits 2-1, mantissa m = bit 0.
    Scales: float16 (int8, int4) or e8m0 2^(e - 127) (mxfp4; 255 is NaN), one per
    group_size weights along k (0: one per row).  w = q * scale."""
    values = np.asarray(values)
    scales = np.asarray(scales)
    if dtype == "int8":
        q = values.astype(np.float64)
    else:
        b = values.astype(np.int64)
        n = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,))[..., :k]
        if dtype == "int4":
            q = n - 8.0
        elif dtype == "mxfp4":
            sign = np.where(n & 8, -1.0, 1.0)
            e, m = (n >> 1) & 3, n & 1
            q = sign * np.where(e == 0, m / 2.0, 2.0 ** (e - 1.0) * (1.0 + m / 2.0))
        else:
            raise ValueError(f"unknown quantized dtype {dtype!r}")
    if dtype == "mxfp4":
        s = np.where(scales == 255, np.nan, 2.0 ** (scales.astype(np.float64) - 127.0))
    else:
        s = scales.astype(np.float64)
    g = min(group_size, k) if group_size and k else max(k, 1)
    return q * np.repeat(s, g, axis=-1)[..., :k]


def _decode_stored(a):
    """An expert weight as a layer stores it -> float64: quantized weights (moe.quant's
    QuantizedWeight) dequantized, uint16 arrays as bfloat16 bits (the top half of a
    float32), anything else as it is."""
    if a is None:
        return None
    if type(a).__name__ == "QuantizedWeight":  # moe.quant's (this module imports no moe)
        return dequantize(a.values, a.scales, a.dtype, a.shape[-1], a.group_size)
    if np.asarray(a).dtype == np.uint16:
        bits = np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return a


def layer_forward(layer, x, allowed=None):
    """Run sparse_moe() with the parameters and options of a SparseMoE-like object.

    Args:
      layer: object with attributes router_weight (E, d), w_gate (E, F, d), w_up
        (E, F, d), w_down (E, d, F), top_k, activation, scoring, renormalize,
        routed_scaling, n_groups, topk_groups, capacity_factor, expert_bias (E,),
        shared_w_gate (H, d), shared_w_up (H, d), shared_w_down (d, H),
        shared_gate_weight (1, d); flags use_expert_bias, n_shared_experts and
        shared_expert_gate switch the optional parts off. Missing attributes read
        as None / the sparse_moe defaults.
      x: (..., d) input.

    Returns the (out, routing) pair of sparse_moe().
    """
    def get(name, default=None):
        value = getattr(layer, name, None)
        return default if value is None else value

    activation = get("activation", "swiglu")

    expert_bias = get("expert_bias")
    if _is_false(getattr(layer, "use_expert_bias", None)):
        expert_bias = None

    shared_w_gate = get("shared_w_gate")
    shared_w_up = get("shared_w_up")
    shared_w_down = get("shared_w_down")
    n_shared = getattr(layer, "n_shared_experts", None)
    if n_shared is not None and int(n_shared) == 0:
        shared_w_gate = shared_w_up = shared_w_down = None

    shared_gate_weight = get("shared_gate_weight")
    if _is_false(getattr(layer, "shared_expert_gate", None)) or shared_w_up is None:
        shared_gate_weight = None

    w_gate = get("w_gate") if activation in GATED else None
    if activation not in GATED:
        shared_w_gate = None

    decode = _decode_stored
    w_gate, shared_w_gate = decode(w_gate), decode(shared_w_gate)
    shared_w_up, shared_w_down = decode(shared_w_up), decode(shared_w_down)

    return sparse_moe(
        x, get("router_weight"), w_gate, decode(get("w_up")), decode(get("w_down")),
        top_k=get("top_k"),
        activation=activation,
        scoring=get("scoring", "softmax"),
        renormalize=get("renormalize", True),
        routed_scaling=get("routed_scaling", 1.0),
        n_groups=get("n_groups", 1),
        topk_groups=get("topk_groups", 1),
        expert_bias=expert_bias,
        capacity_factor=get("capacity_factor"),
        shared_w_gate=shared_w_gate,
        shared_w_up=shared_w_up,
        shared_w_down=shared_w_down,
        shared_gate_weight=shared_gate_weight,
        router_bias=get("router_bias") if getattr(layer, "use_router_bias", True) else None,
        b_gate=get("b_gate") if getattr(layer, "use_expert_biases", True) else None,
        b_up=get("b_up") if getattr(layer, "use_expert_biases", True) else None,
        b_down=get("b_down") if getattr(layer, "use_expert_biases", True) else None,
        swiglu_alpha=get("swiglu_alpha", 1.702),
        swiglu_limit=get("swiglu_limit", 7.0),
        lora={t: (getattr(layer, f"lora_a_{t[2:]}"), getattr(layer, f"lora_b_{t[2:]}"))
              for t in getattr(layer, "lora_targets", ()) if getattr(layer, "lora_rank", 0)},
        lora_scaling=getattr(layer, "lora_scaling", 1.0),
        null_experts=tuple(getattr(layer, "null_experts", ())),
        null_values=getattr(layer, "null_values", None),
        allowed=allowed,
        expert_d_ff=getattr(layer, "expert_d_ff", None),
        router=getattr(layer, "router", "top_k"),
        router_p=getattr(layer, "router_p", 0.5),
        router_threshold=getattr(layer, "router_threshold", 0.01),
        k_min=getattr(layer, "k_min", 1),
        skip_threshold=getattr(layer, "skip_threshold", 0.0),
        skip_renormalize=getattr(layer, "skip_renormalize", False),
        compute_dtype=getattr(layer, "compute_dtype", "float32"),
        group_size=getattr(layer, "group_size", None),
        shared_compute_dtype=_shared_compute(layer),
    )


def _shared_compute(layer):
    """The shared experts' compute: int8 only when they are stored quantized."""
    c = getattr(layer, "compute_dtype", "float32")
    if c == "int8" and getattr(layer, "shared_dtype", None) not in QUANT_DTYPES:
        return "float32"
    return c


# --------------------------------------------------------------------------- #
# Routing beyond top-k: expert choice, dynamic k, expert skipping
# --------------------------------------------------------------------------- #

def _softmax_in_order(row):
    """Softmax of one row with its sum taken in index order (as the C core does)."""
    ex = np.exp(row - row.max())
    total = 0.0
    for v in ex:
        total += v
    return ex / total


def route_expert_choice(logits, capacity, scoring="softmax"):
    """Expert-choice routing: each expert takes its top-``capacity`` tokens.

    Args:
      logits: (T, E) router logits (float64).
      capacity: int C in 0..T, tokens per expert.
      scoring: "softmax" (over experts, per token) or "sigmoid".

    Returns a dict:
      "token_ids":  (E, C) int64, best score first, ties to the lower token index;
      "gates":      (E, C) float64 scores of those tokens;
      "n_experts_per_token": (T,) int32;
      "expert_ids": (T, W) int32, experts that took each token, ascending, -1 padding,
                    W = max(1, max(n_experts_per_token));
      "weights":    (T, W) float64, matching gates, 0 padding.
    """
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    C = int(capacity)
    if scoring == "softmax":
        # Each row's sum is taken in expert order, as the core takes it: tokens whose
        # scores tie in exact arithmetic (rows that are permutations of each other) then
        # round alike in both, and the tie rule decides; pairwise summation would not.
        scores = np.empty_like(logits)
        for t in range(T):
            scores[t] = _softmax_in_order(logits[t])
    elif scoring == "sigmoid":
        scores = sigmoid(logits)
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    token_ids = np.zeros((E, C), dtype=np.int64)
    gates = np.zeros((E, C), dtype=np.float64)
    for e in range(E):
        order = _stable_desc_order(scores[:, e])[:C]
        token_ids[e] = order
        gates[e] = scores[order, e]
    n = np.zeros(T, dtype=np.int32)
    for e in range(E):
        for j in range(C):
            n[token_ids[e, j]] += 1
    W = max(1, int(n.max()) if T else 1)
    n[:] = 0
    expert_ids = np.full((T, W), -1, dtype=np.int32)
    weights = np.zeros((T, W), dtype=np.float64)
    for e in range(E):
        for j in range(C):
            t = token_ids[e, j]
            expert_ids[t, n[t]] = e
            weights[t, n[t]] = gates[e, j]
            n[t] += 1
    return {"token_ids": token_ids, "gates": gates, "n_experts_per_token": n,
            "expert_ids": expert_ids, "weights": weights}


def _route_dynamic(logits, count, k_min, k_max, renormalize):
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    k_max = E if k_max is None else int(k_max)
    ids = np.full((T, k_max), -1, dtype=np.int32)
    weights = np.zeros((T, k_max), dtype=np.float64)
    n_selected = np.zeros(T, dtype=np.int32)
    for t in range(T):
        probs = _softmax_in_order(logits[t])  # cumulative sums compare like the core's
        order = _stable_desc_order(probs)
        k = min(max(count(probs[order]), k_min), k_max)
        w = probs[order[:k]]
        if renormalize:
            s = 0.0
            for v in w:  # sequential, as the running sums of the definition
                s += v
            w = w / s
        ids[t, :k] = order[:k]
        weights[t, :k] = w
        n_selected[t] = k
    return {"expert_ids": ids, "weights": weights, "n_selected": n_selected}


def route_top_p(logits, p, k_min=1, k_max=None, renormalize=True):
    """Top-p routing: k_t = fewest experts (by softmax probability, descending, ties to
    the lower index) whose cumulative probability is >= p, clamped to [k_min, k_max]
    (k_max defaults to E); p >= 1 selects k_max.  Returns a dict with "expert_ids"
    (T, k_max) int32 (-1 padding), "weights" (T, k_max) float64 (0 padding, renormalised
    to sum 1 when ``renormalize``) and "n_selected" (T,) int32.
    """
    def count(sorted_probs):
        if p >= 1.0:
            return len(sorted_probs)
        cum = 0.0
        for i, v in enumerate(sorted_probs):
            cum += v
            if cum >= p:
                return i + 1
        return len(sorted_probs)

    return _route_dynamic(logits, count, k_min, k_max, renormalize)


def route_threshold(logits, threshold, k_min=1, k_max=None, renormalize=True):
    """Threshold routing: every expert with softmax probability >= threshold, the count
    clamped to [k_min, k_max] (best first).  Outputs as in route_top_p."""
    return _route_dynamic(logits, lambda sp: int(np.sum(sp >= threshold)), k_min, k_max,
                          renormalize)


def skip_experts(expert_ids, weights, threshold, renormalize=False):
    """Dynamic expert skipping: slots with weight < threshold become id -1, weight 0;
    with ``renormalize`` each token's kept weights are divided by their sum.  Slots
    already -1 are untouched and not counted.  Returns a dict with "expert_ids" (T, k)
    int32, "weights" (T, k) float64 and "n_skipped" int.
    """
    ids = np.array(expert_ids, dtype=np.int32)
    w = np.array(weights, dtype=np.float64)
    skip = (ids >= 0) & (w < threshold)
    ids[skip] = -1
    w[skip] = 0.0
    if renormalize:
        for t in range(ids.shape[0]):
            kept = ids[t] >= 0
            s = w[t, kept].sum()
            if s > 0:
                w[t, kept] /= s
    return {"expert_ids": ids, "weights": w, "n_skipped": int(skip.sum())}


# --------------------------------------------------------------------------- #
# LoRA experts: mixtures of low-rank adapters over a frozen base linear
# --------------------------------------------------------------------------- #

def lora_linear(x, w0, a, b, scaling, bias=None):
    """One LoRA adapter on a linear (PEFT's ``lora.Linear``):
    ``y = x @ w0.T + bias + scaling * (x @ a.T) @ b.T``.

    x: (T, d_in); w0: (d_out, d_in); a: (r, d_in); b: (d_out, r).  Returns (T, d_out)
    float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = x @ np.asarray(w0, dtype=np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    z = x @ np.asarray(a, dtype=np.float64).T
    return y + scaling * (z @ np.asarray(b, dtype=np.float64).T)


def lora_mixture(x, w0, a, b, ids, weights, scaling, bias=None, kind="adapters"):
    """A mixture of LoRA terms per token, slot by slot:
    ``y_t = w0 x_t + bias + sum_s scaling_e * weights[t, s] * term(e = ids[t, s])``.

    kind "adapters": term = B_e A_e x (a: (E, r, d_in), b: (E, d_out, r));
    "shared_a": term = B_e A x (a: (r, d_in), b: (E, d_out, r));
    "ranks": term = B[:, j] (A[j] . x), j = ids[t, s] (a: (r, d_in), b: (d_out, r)).
    ids: (T, S) ints, -1 = empty slot; weights: (T, S) or None (all 1); scaling: a float, or
    (E,) per adapter ("adapters" only).  Returns (T, d_out) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ids = np.asarray(ids)
    T, S = ids.shape
    w = np.ones((T, S)) if weights is None else np.asarray(weights, dtype=np.float64)
    scale = np.asarray(scaling, dtype=np.float64)
    y = x @ np.asarray(w0, dtype=np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    for t in range(T):
        for s in range(S):
            e = int(ids[t, s])
            if e < 0:
                continue
            c = (scale[e] if scale.ndim else float(scale)) * w[t, s]
            if kind == "adapters":
                term = b[e] @ (a[e] @ x[t])
            elif kind == "shared_a":
                term = b[e] @ (a @ x[t])
            elif kind == "ranks":
                term = b[:, e] * (a[e] @ x[t])
            else:
                raise ValueError(f"unknown kind {kind!r}")
            y[t] += c * term
    return y


def flylora_select(z, top_k, rank_bias=None, signed=False):
    """FlyLoRA's rank selection: per row, the top_k ranks of |z| + rank_bias (z + rank_bias
    when signed), ties toward the lower rank, NaN keys last.  Returns (T, top_k) int."""
    z = np.asarray(z, dtype=np.float64)
    key = z if signed else np.abs(z)
    if rank_bias is not None:
        key = key + np.asarray(rank_bias, dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf, key)
    return np.stack([_stable_desc_order(row)[:top_k] for row in key]) if len(key) else \
        np.zeros((0, top_k), np.int64)


def _decode_weight(layer, w):
    """A layer's base weight as float64 (bfloat16 layers store uint16 bits)."""
    if getattr(layer, "dtype", "float32") == "bfloat16":
        return (np.asarray(w, dtype=np.uint16).astype(np.uint32) << 16).view(
            np.float32).astype(np.float64)
    return np.asarray(w, dtype=np.float64)


def _gated_lora_slots(layer, c):
    """GatedLoRA's slots from its scalings c (T, E): every adapter with weight c, or the
    top_k of c (ties to the lower index), their softmax with softmax_topk: (ids, w)."""
    if layer.top_k is None:
        return np.tile(np.arange(layer.n_experts), (c.shape[0], 1)), c
    ids = np.array([_stable_desc_order(row)[:layer.top_k] for row in c],
                   dtype=np.int64).reshape(-1, layer.top_k)
    w = np.take_along_axis(c, ids, axis=1)
    return ids, softmax(w, axis=1) if layer.softmax_topk else w


def lora_forward(layer, x, scalings=None, adapter_ids=None, seq_lens=None):
    """The forward pass of a moe.lora layer, from its weights and options, in float64.

    x: (T, d_in).  scalings: GatedLoRA's (T, E); adapter_ids: MultiLoRA's (T,);
    seq_lens: per-sequence gating's sequence lengths.  Returns (y (T, d_out) float64,
    ids (T, S), weights (T, S)).
    """
    name = type(layer).__name__
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    T = x.shape[0]
    w0 = _decode_weight(layer, layer.base_weight)
    bias = layer.base_bias if getattr(layer, "use_bias", False) else None
    s = layer.scaling
    if name in ("TopKLoRA", "SoftLoRA", "HydraLoRA"):
        src = x
        if layer.per_sequence:
            seq = np.repeat(np.arange(len(seq_lens)), seq_lens)
            src = np.stack([x[seq == i].mean(axis=0) for i in range(len(seq_lens))])
        k = layer.top_k if layer.top_k is not None else layer.n_experts
        scoring = getattr(layer, "scoring", "softmax")
        r = route(src @ np.asarray(layer.router_weight, np.float64).T, k, scoring=scoring,
                  renormalize=layer.renormalize)
        ids, w = r["expert_ids"], r["weights"]
        if layer.per_sequence:
            ids, w = ids[seq], w[seq]
        kind = "shared_a" if name == "HydraLoRA" else "adapters"
        return lora_mixture(x, w0, layer.lora_a, layer.lora_b, ids, w, s, bias, kind), ids, w
    if name == "GatedLoRA":
        ids, w = _gated_lora_slots(layer, np.asarray(scalings, dtype=np.float32)
                                   .astype(np.float64))
        return lora_mixture(x, w0, layer.lora_a, layer.lora_b, ids, w, s, bias), ids, w
    if name == "FlyLoRA":
        z = x @ np.asarray(layer.lora_a, np.float64).T
        ids = flylora_select(z, layer.top_k, layer.rank_bias, layer.signed)
        return (lora_mixture(x, w0, layer.lora_a, layer.lora_b, ids, None, s, bias, "ranks"),
                ids, np.ones(ids.shape))
    if name == "SMoRA":
        logits = x @ np.asarray(layer.router_weight, np.float64).T
        logits = np.tile(logits, (1, layer.rank_partition)) if layer.tile else \
            np.repeat(logits, layer.rank_partition, axis=1)
        r = route(logits, layer.top_k, scoring="sigmoid", renormalize=True,
                  routed_scaling=layer.top_k, expert_bias=layer.rank_bias)
        ids, w = r["expert_ids"], r["weights"]
        return (lora_mixture(x, w0, layer.lora_a, layer.lora_b, ids, w, s, bias, "ranks"),
                ids, w)
    if name == "MultiLoRA":
        ids = np.asarray(adapter_ids).reshape(T, 1)
        return (lora_mixture(x, w0, layer.lora_a, layer.lora_b, ids, None, layer.scalings,
                             bias), ids, (ids >= 0).astype(np.float64))
    raise TypeError(f"not a moe.lora layer: {name}")


# --------------------------------------------------------------------------- #
# Product-key expert retrieval (PEER)
# --------------------------------------------------------------------------- #


def peer_forward(x, w_query, sub_keys_1, sub_keys_2, u, v, top_k, activation="relu"):
    """PEER ("Mixture of A Million Experts"), by brute force over all N = n^2 experts.

    x: (T, d); w_query: (H, d_key, d); sub_keys_1, sub_keys_2: (n, d_key/2) shared by the
    heads or (H, n, d_key/2) per head; u: (n^2, d); v: (n^2, d_out); activation one of
    PEER_ACTIVATIONS ("gelu" is the exact erf form).  Per token and head: q = w_query[h] x,
    halves q1, q2; the score of expert e = i * n + j is K1[i] . q1 + K2[j] . q2; the top_k
    experts by score (ties toward the lower e) get softmax gates over their k scores, and
    out = sum_h sum_j g_j act(u_e . x) v_e.  Scoring every expert here (rather than the
    product-key search of the core) also checks that the search finds the exact top-k.
    Returns a dict with "out" (T, d_out) float64, "expert_ids" (T, H, k) int64 best first,
    "gates" (T, H, k) and "scores" (T, H, k) float64.
    """
    if activation not in PEER_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{PEER_ACTIVATIONS}")
    x = np.asarray(x, dtype=np.float64)
    wq = np.asarray(w_query, dtype=np.float64)
    k1 = np.asarray(sub_keys_1, dtype=np.float64)
    k2 = np.asarray(sub_keys_2, dtype=np.float64)
    k1, k2 = (k1[None], k2[None]) if k1.ndim == 2 else (k1, k2)
    u, v = np.asarray(u), np.asarray(v)  # rows widened as gathered: N may be 2^20
    T = x.shape[0]
    H, dk = wq.shape[:2]
    half = dk // 2
    act = {"relu": lambda z: np.maximum(z, 0.0), "gelu": _gelu, "silu": _silu,
           "identity": lambda z: z}[activation]
    out = np.zeros((T, v.shape[1]))
    ids = np.zeros((T, H, top_k), dtype=np.int64)
    gates = np.zeros((T, H, top_k))
    scores = np.zeros((T, H, top_k))
    for t in range(T):
        for h in range(H):
            key = 0 if k1.shape[0] == 1 else h
            q = wq[h] @ x[t]
            s1 = k1[key] @ q[:half]
            s2 = k2[key] @ q[half:]
            every = (s1[:, None] + s2[None, :]).ravel()  # expert e = i * n + j
            order = _stable_desc_order(every)[:top_k]
            g = softmax(every[order])
            ue, ve = u[order].astype(np.float64), v[order].astype(np.float64)
            out[t] += (g * act(ue @ x[t])) @ ve
            ids[t, h], gates[t, h], scores[t, h] = order, g, every[order]
    return {"out": out, "expert_ids": ids, "gates": gates, "scores": scores}


# --------------------------------------------------------------------------- #
# Soft MoE and Mixture of Tokens: experts see softmax mixes of tokens (slots)
# --------------------------------------------------------------------------- #

SOFT_MOE_NORM_EPS = 1e-6  # the Soft MoE authors' l2 normalisation: v / sqrt(|v|^2 + eps)


def _l2_normalize(v, axis):
    return v / np.sqrt(np.sum(v * v, axis=axis, keepdims=True) + SOFT_MOE_NORM_EPS)


def _soft_moe_args(x, phi, w_gate, w_up, w_down, slots_per_expert, activation):
    """soft_moe's inputs in float64, x as groups (B, m, d): (x, phi, w_gate (None unless
    gated), w_up, w_down, xg, s, S = E * s, gated); phi's shape checked."""
    x = np.asarray(x, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    xg = x[None] if x.ndim == 2 else x
    s = int(slots_per_expert)
    w_up = np.asarray(w_up, dtype=np.float64)
    w_down = np.asarray(w_down, dtype=np.float64)
    S = w_up.shape[0] * s
    if phi.shape != (xg.shape[2], S):
        raise ValueError(f"phi must have shape (d_model={xg.shape[2]}, n_experts * "
                         f"slots_per_expert={S}), got {phi.shape}")
    gated = activation in GATED
    w_gate = np.asarray(w_gate, dtype=np.float64) if gated else None
    return x, phi, w_gate, w_up, w_down, xg, s, S, gated


def soft_moe(x, phi, w_gate, w_up, w_down, *, slots_per_expert, activation="swiglu",
             normalize=False, scale=1.0, temperature=1.0, alpha=1.702, limit=7.0):
    """Soft MoE [Puigcerver et al. 2023], group by group, in float64.

    Args:
      x: (B, m, d), B groups of m tokens; (m, d) is one group.
      phi: (d, E * s) slot parameters; column e * s + i is slot i of expert e.
      w_gate: (E, F, d) or None (non-gated activations); w_up: (E, F, d); w_down: (E, d, F).
      normalize: l2-normalise the rows of X and the columns of phi (eps 1e-6 under the
        square root) and multiply the logits by ``scale``; the slots still mix the raw X.
      temperature: divides the logits (Mixture of Tokens); 1 for Soft MoE.

    Per group X (m, d):
      L = X phi / temperature                       (m, E*s)
      D = softmax of L over the m tokens (axis 0);  slots = D^T X          (E*s, d)
      Y_slots[e*s:(e+1)*s] = ffn(slots[e*s:(e+1)*s], expert e's weights)
      C = softmax of L over the E*s slots (axis 1); Y = C Y_slots           (m, d)

    Returns a dict of float64 arrays: "out" (shape of x), "dispatch" D and "combine" C
    (x.shape[:-1] + (E*s,)), "logits" L (same shape).
    """
    x, phi, w_gate, w_up, w_down, xg, s, S, gated = _soft_moe_args(
        x, phi, w_gate, w_up, w_down, slots_per_expert, activation)
    one_group = x.ndim == 2
    B, m, d = xg.shape
    E = w_up.shape[0]
    out = np.zeros((B, m, d))
    D = np.zeros((B, m, S))
    C = np.zeros((B, m, S))
    L = np.zeros((B, m, S))
    for b in range(B):
        X = xg[b]
        if normalize:
            L[b] = float(scale) * (_l2_normalize(X, 1) @ _l2_normalize(phi, 0))
        else:
            L[b] = X @ phi
        L[b] = L[b] / float(temperature)
        D[b] = softmax(L[b], axis=0)
        C[b] = softmax(L[b], axis=1)
        slots = D[b].T @ X
        y_slots = np.zeros((S, d))
        for e in range(E):
            rows = slice(e * s, (e + 1) * s)
            y_slots[rows] = ffn(slots[rows], w_gate[e] if gated else None, w_up[e], w_down[e],
                                activation, alpha=alpha, limit=limit)
        out[b] = C[b] @ y_slots
    if one_group:
        out, D, C, L = out[0], D[0], C[0], L[0]
    return {"out": out, "dispatch": D, "combine": C, "logits": L}


def mixture_of_tokens(x, phi, w_gate, w_up, w_down, *, slots_per_expert=1,
                      activation="swiglu", temperature=1.0, mixing=True, group_size=None,
                      normalize=False, scale=1.0, alpha=1.702, limit=7.0):
    """Mixture of Tokens [Antoniak et al. 2023]: soft_moe() with groups across the batch.

    x: (B, m, d) B sequences of m tokens ((B, d): one position).  With mixing, a group is
    the tokens at one position of group_size consecutive sequences (None: all B), so
    sequences are mixed, never positions; without mixing (inference), every token is its
    own group: D is 1 and the token goes through every expert, weighted by its softmax C
    over the E*s slots.  Returns soft_moe()'s dict with every array in x's layout
    (B, m, ...); D sums to 1 over each group's sequences.
    """
    x = np.asarray(x, dtype=np.float64)
    x3 = x[:, None] if x.ndim == 2 else x
    B, m, d = x3.shape
    kw = dict(slots_per_expert=slots_per_expert, activation=activation, normalize=normalize,
              scale=scale, temperature=temperature, alpha=alpha, limit=limit)
    if not mixing:
        r = soft_moe(x3.reshape(B * m, 1, d), phi, w_gate, w_up, w_down, **kw)
        res = {k: v.reshape(B, m, -1) for k, v in r.items()}
    else:
        g = B if group_size is None else int(group_size)
        if g < 1 or B % g:
            raise ValueError(f"group_size must divide the batch B={B}, got {group_size}")
        parts = []
        for c in range(B // g):
            # (g, m, d) -> (m, g, d): group p holds position p of the chunk's sequences
            r = soft_moe(x3[c * g:(c + 1) * g].transpose(1, 0, 2), phi, w_gate, w_up,
                         w_down, **kw)
            parts.append({k: v.transpose(1, 0, 2) for k, v in r.items()})
        res = {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    if x.ndim == 2:
        res = {k: v[:, 0] for k, v in res.items()}
    return res


# --------------------------------------------------------------------------- #
# Multi-head MoE
# --------------------------------------------------------------------------- #

def multi_head_moe(layer, x):
    """MultiHeadMoE's forward in float64: project, split into n_heads sub-tokens, route
    them through the inner SparseMoE (layer_forward), merge and project.  Returns (y,
    routing of the sub-tokens)."""
    def dec(w):
        return _decode_weight(layer, w)
    x = np.asarray(x, dtype=np.float32).astype(np.float64).reshape(-1, layer.d_model)
    h = x @ dec(layer.w_in).T
    # the kernels see h rounded to float32 (the inner layer's input), as a user would
    sub = h.astype(np.float32).reshape(-1, layer.d_head)
    y_sub, routing = layer_forward(layer.moe, sub)
    y = y_sub.reshape(-1, layer.d_model).astype(np.float32).astype(np.float64)
    return y @ dec(layer.w_merge).T, routing


# --------------------------------------------------------------------------- #
# Backward: the gradients of the ops above, derived from their math.
#
# The selection (top-k, groups, capacity) is piecewise constant: gradients flow through
# the selected weights and the losses only, as in every peer; expert_bias moves the
# selection and gets no gradient.  Each *_backward takes what its forward took plus the
# output gradient(s) and returns float64 gradients.  tests/test_reference_backward.py
# checks every one against central finite differences.
# --------------------------------------------------------------------------- #

def _activation_grads(name, gate, up, alpha=1.702, limit=7.0):
    """(d h / d gate or None, d h / d up) of activate(name, gate, up), elementwise."""
    up = np.asarray(up, dtype=np.float64)
    c = math.sqrt(2.0 / math.pi)

    def d_silu(z):
        s = sigmoid(z)
        return s * (1.0 + z * (1.0 - s))

    def d_gelu(z):
        return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / \
            math.sqrt(2.0 * math.pi)

    def d_gelu_tanh(z):
        th = np.tanh(c * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * z * z)

    if name in GATED:
        gate = np.asarray(gate, dtype=np.float64)
        if name == "swiglu":
            return d_silu(gate) * up, _silu(gate)
        if name == "geglu":
            return d_gelu(gate) * up, _gelu(gate)
        if name == "geglu-tanh":
            return d_gelu_tanh(gate) * up, _gelu_tanh(gate)
        # swiglu-oai: g = min(gate, limit), u = clip(up, -limit, limit); the clamps pass
        # no gradient where they bind
        g = np.minimum(gate, limit)
        u = np.clip(up, -limit, limit)
        s = sigmoid(alpha * g)
        dg = (u + 1.0) * (s + alpha * g * s * (1.0 - s)) * (gate < limit)
        du = g * s * ((up > -limit) & (up < limit))
        return dg, du
    if name == "gelu":
        return None, d_gelu(up)
    if name == "gelu-tanh":
        return None, d_gelu_tanh(up)
    if name == "relu":
        return None, (up > 0).astype(np.float64)
    return None, d_silu(up)  # "silu"


def ffn_backward(x, w_gate, w_up, w_down, dy, activation="swiglu", b_gate=None, b_up=None,
                 b_down=None, alpha=1.702, limit=7.0, lora=None, lora_scaling=1.0,
                 compute_dtype="float32"):
    """Gradients of ffn (one expert, float64) for output gradient dy (T, d_out).

    g = x W_g^T + b_g, u = x W_u^T + b_u, h = act(g, u), y = h W_d^T + b_d.
    Returns {"dx", "dw_gate" (None if ungated), "dw_up", "dw_down", "db_gate", "db_up",
    "db_down"} (bias gradients always given: they are the column sums).

    lora: {"w_gate" | "w_up" | "w_down": (a (r, in), b (out, r))} as in ffn: each adds
    s * (v a^T) b^T to its projection of v (x, or h for w_down; s = lora_scaling).  The
    result then also holds "lora": {target: (d_a (r, in), d_b (out, r))}: with z = v a^T
    and dp the projection's output gradient, d_b = s dp^T z, d_a = s (dp b)^T v, and v's
    gradient gains s (dp b) a.

    compute_dtype "bfloat16" (ffn's bf16 compute, bf16 weights): the forward's x and h are
    rounded (round_bfloat16) as in ffn, and every product of the backward reads its two
    operands rounded to bfloat16 -- dy, dg and du (the activation's backward stays exact),
    and x, h and the weights -- with exact sums: dh = r(dy) W_d, dW_d = r(dy)^T r(h),
    dW_g = r(dg)^T r(x), dW_u = r(du)^T r(x), dx = r(dg) W_g + r(du) W_u.  The bias
    gradients are sums of the unrounded dg, du, dy (mixed-precision training's rule).
    """
    bf16 = compute_dtype == "bfloat16"
    rb = round_bfloat16 if bf16 else (lambda a: a)  # noqa: E731
    x = rb(np.asarray(x, dtype=np.float64))
    dy = np.asarray(dy, dtype=np.float64)
    w_up = np.asarray(w_up, dtype=np.float64)
    w_down = np.asarray(w_down, dtype=np.float64)
    gated = activation in GATED
    ab = {t: tuple(np.asarray(m, dtype=np.float64) for m in pair)
          for t, pair in (lora or {}).items() if t != "w_gate" or gated}

    def delta(name, v):
        if name not in ab:
            return 0.0
        a, b = ab[name]
        return lora_scaling * ((v @ a.T) @ b.T)

    def lora_grads(name, v, dp):
        """(d_a, d_b, d v) of  sum(dp * s (v a^T) b^T)."""
        a, b = ab[name]
        dz = lora_scaling * (dp @ b)
        return dz.T @ v, lora_scaling * (dp.T @ (v @ a.T)), dz @ a

    u = x @ w_up.T + (0.0 if b_up is None else np.asarray(b_up, dtype=np.float64)) + \
        delta("w_up", x)
    g = None
    if gated:
        w_gate = np.asarray(w_gate, dtype=np.float64)
        g = x @ w_gate.T + (0.0 if b_gate is None else np.asarray(b_gate, dtype=np.float64)) \
            + delta("w_gate", x)
    h = activate(activation, g, u, alpha, limit)
    dh = rb(dy) @ w_down
    lg = {}
    if "w_down" in ab:
        da, db, dv = lora_grads("w_down", h, dy)
        lg["w_down"] = (da, db)
        dh = dh + dv
    dgate, dup = _activation_grads(activation, g, u, alpha, limit)
    du = dh * dup
    out = {"dw_down": rb(dy).T @ rb(h), "db_down": dy.sum(axis=0), "dw_up": rb(du).T @ x,
           "db_up": du.sum(axis=0), "dx": rb(du) @ w_up, "dw_gate": None, "db_gate": None}
    if "w_up" in ab:
        da, db, dv = lora_grads("w_up", x, du)
        lg["w_up"] = (da, db)
        out["dx"] = out["dx"] + dv
    if gated:
        dg = dh * dgate
        out.update(dw_gate=rb(dg).T @ x, db_gate=dg.sum(axis=0))
        out["dx"] = out["dx"] + rb(dg) @ w_gate
        if "w_gate" in ab:
            da, db, dv = lora_grads("w_gate", x, dg)
            lg["w_gate"] = (da, db)
            out["dx"] = out["dx"] + dv
    if lora is not None:
        out["lora"] = lg
    return out


def expert_ffn_backward(x_sorted, offsets, w_gate, w_up, w_down, dy_sorted,
                        activation="swiglu", b_gate=None, b_up=None, b_down=None, alpha=1.702,
                        limit=7.0, expert_d_ff=None, lora=None, lora_scaling=1.0,
                        compute_dtype="float32"):
    """Gradients of expert_ffn: {"dx_sorted" (N, d), "dw_gate", "dw_up", "dw_down" and
    "db_*" (per expert, zero for experts with no rows and for hidden units past
    expert_d_ff[e])}.  lora: {target: (a (E, r, in), b (E, out, r))} as in expert_ffn
    (each expert's adapters passed whole, as the forward does); the result also holds
    "lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down"
    (E-stacked like a and b, zero for experts with no rows; None for targets without
    adapters).  compute_dtype: see ffn_backward."""
    x_sorted = np.asarray(x_sorted, dtype=np.float64)
    w_up = np.asarray(w_up, dtype=np.float64)
    E, F, d = w_up.shape
    d_out = np.asarray(w_down).shape[1]
    gated = activation in GATED
    lora = {t: tuple(np.asarray(m, dtype=np.float64) for m in pair)
            for t, pair in (lora or {}).items()}
    out = {"dx_sorted": np.zeros_like(x_sorted), "dw_up": np.zeros((E, F, d)),
           "dw_down": np.zeros((E, d_out, F)), "db_up": np.zeros((E, F)),
           "db_down": np.zeros((E, d_out)),
           "dw_gate": np.zeros((E, F, d)) if gated else None,
           "db_gate": np.zeros((E, F)) if gated else None}
    for t in ("w_gate", "w_up", "w_down"):
        a, b = lora.get(t, (None, None))
        out[f"lora_a_{t[2:]}"] = None if a is None else np.zeros(a.shape)
        out[f"lora_b_{t[2:]}"] = None if b is None else np.zeros(b.shape)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi <= lo:
            continue
        f = F if expert_d_ff is None else int(expert_d_ff[e])
        cut = lambda b: None if b is None else np.asarray(b)[e][:f]  # noqa: E731
        lora_e = {t: (a[e], b[e]) for t, (a, b) in lora.items()} if lora else None
        r = ffn_backward(x_sorted[lo:hi], np.asarray(w_gate)[e][:f] if gated else None,
                         w_up[e][:f], np.asarray(w_down)[e][:, :f], dy_sorted[lo:hi],
                         activation, cut(b_gate), cut(b_up),
                         None if b_down is None else np.asarray(b_down)[e], alpha, limit,
                         lora_e, lora_scaling, compute_dtype)
        out["dx_sorted"][lo:hi] = r["dx"]
        out["dw_up"][e, :f], out["db_up"][e, :f] = r["dw_up"], r["db_up"]
        out["dw_down"][e][:, :f], out["db_down"][e] = r["dw_down"], r["db_down"]
        if gated:
            out["dw_gate"][e, :f], out["db_gate"][e, :f] = r["dw_gate"], r["db_gate"]
        for t, (da, db) in r.get("lora", {}).items():
            out[f"lora_a_{t[2:]}"][e], out[f"lora_b_{t[2:]}"][e] = da, db
    return out


def combine_backward(y_sorted, position, weights, d_out):
    """Gradients of combine: {"dy_sorted" (N, d), "d_weights" (T, k)}; slots with
    position -1 get none."""
    y_sorted = np.asarray(y_sorted, dtype=np.float64)
    position = np.asarray(position)
    weights = np.asarray(weights, dtype=np.float64)
    d_out = np.asarray(d_out, dtype=np.float64)
    dy = np.zeros_like(y_sorted)
    dw = np.zeros(weights.shape)
    for t in range(position.shape[0]):
        for j in range(position.shape[1]):
            r = int(position[t, j])
            if r >= 0:
                dy[r] += weights[t, j] * d_out[t]
                dw[t, j] = d_out[t] @ y_sorted[r]
    return {"dy_sorted": dy, "d_weights": dw}


def dispatch_backward(dx_sorted, token_index, n_tokens):
    """Gradient of dispatch's gather: dx[t] = the sum of the rows that copied token t."""
    dx_sorted = np.asarray(dx_sorted, dtype=np.float64)
    dx = np.zeros((n_tokens, dx_sorted.shape[1]))
    for r, t in enumerate(np.asarray(token_index)):
        dx[int(t)] += dx_sorted[r]
    return dx


def router_backward(x, router_weight, d_logits):
    """Gradients of logits = x W^T (+ b): {"dx", "d_router_weight", "d_router_bias"}."""
    x = np.asarray(x, dtype=np.float64)
    d_logits = np.asarray(d_logits, dtype=np.float64)
    return {"dx": d_logits @ np.asarray(router_weight, dtype=np.float64),
            "d_router_weight": d_logits.T @ x, "d_router_bias": d_logits.sum(axis=0)}


def route_backward(logits, d_weights, top_k, *, scoring="softmax", renormalize=True,
                   routed_scaling=1.0, expert_bias=None, n_groups=1, topk_groups=1,
                   capacity_factor=None, allowed=None, aux_coef=0.0, z_coef=0.0,
                   router_grad="default"):
    """d logits of  sum(d_weights * weights) + aux_coef * aux_loss + z_coef * z_loss  for
    route(logits, top_k, ...) (the same options).

    router_grad="straight-through" adds a gradient through the selection: the output is
    sum_j m_j w_j f_j with the top-k mask m = 1 on the selected experts; m takes the
    derivative of the scores it was cut from (softmax over all E, or sigmoid), and
    dL/dm_e = w_j d_weights_j for the expert of slot j, 0 for the unselected (their
    outputs f were never computed): d logits += (dq/dlogits)^T g with g = that vector.

    Per token, with the selection fixed: q = the selected scores (softmax or sigmoid of
    the logits; softmax-after-topk: the softmax of the selected logits), w = c q / sum(q)
    with renormalize, else c q (c = routed_scaling).  A dropped slot's weight is the
    constant 0, but its score still counts in the renormalising sum.  aux_loss =
    E sum_e f_e P_e with f fixed (the selection counts) and P_e the mean over tokens of
    the probabilities (softmax, or sigmoid / its sum); z_loss = mean lse^2, whose
    gradient is 2 lse softmax / T.
    """
    logits = np.asarray(logits, dtype=np.float64)
    T, E = logits.shape
    r = route(logits, top_k, scoring=scoring, renormalize=renormalize,
              routed_scaling=routed_scaling, expert_bias=expert_bias, n_groups=n_groups,
              topk_groups=topk_groups, capacity_factor=None, allowed=allowed)
    kept = route(logits, top_k, scoring=scoring, renormalize=renormalize,
                 routed_scaling=routed_scaling, expert_bias=expert_bias, n_groups=n_groups,
                 topk_groups=topk_groups, capacity_factor=capacity_factor,
                 allowed=allowed)["expert_ids"] >= 0
    ids = r["expert_ids"]
    dw = np.where(kept, np.asarray(d_weights, dtype=np.float64), 0.0) * routed_scaling
    dl = np.zeros((T, E))
    counts = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
    f = counts / (T * top_k) if T else counts
    for t in range(T):
        row, sel = logits[t], ids[t]
        if scoring == "softmax-after-topk":
            w = softmax(row[sel])  # already sums to 1: renormalize changes nothing
            dl[t, sel] += w * (dw[t] - np.dot(dw[t], w))
        else:
            s = softmax(row) if scoring == "softmax" else sigmoid(row)
            q = s[sel]
            if renormalize and q.sum() > 0:
                S = q.sum()
                dq = dw[t] / S - np.dot(dw[t], q) / (S * S)
            else:
                dq = dw[t]
            ds = np.zeros(E)
            ds[sel] = dq
            if scoring == "softmax":
                dl[t] += s * (ds - np.dot(ds, s))
            else:
                dl[t] += ds * s * (1.0 - s)
        if router_grad == "straight-through":
            if scoring == "softmax-after-topk":
                w = softmax(row[sel])
            else:
                q = (softmax(row) if scoring == "softmax" else sigmoid(row))[sel]
                w = q / q.sum() if renormalize and q.sum() > 0 else q
            g = np.zeros(E)
            np.add.at(g, sel, w * dw[t])
            if scoring == "sigmoid":
                s = sigmoid(row)
                dl[t] += g * s * (1.0 - s)
            else:
                p = softmax(row)
                dl[t] += p * (g - np.dot(g, p))
        if aux_coef:
            dP = aux_coef * E * f / T  # d aux / d probs[t]
            if scoring == "sigmoid":
                s = sigmoid(row)
                S = s.sum()
                if S > 0:  # probs = s / S
                    dl[t] += (dP / S - np.dot(dP, s) / (S * S)) * s * (1.0 - s)
            else:
                p = softmax(row)
                dl[t] += p * (dP - np.dot(dP, p))
        if z_coef:
            dl[t] += z_coef * 2.0 * logsumexp(row) * softmax(row) / T
    return dl


def sparse_moe_backward(x, router_weight, w_gate, w_up, w_down, dy, *, top_k,
                        activation="swiglu", scoring="softmax", renormalize=True,
                        routed_scaling=1.0, n_groups=1, topk_groups=1, expert_bias=None,
                        capacity_factor=None, shared_w_gate=None, shared_w_up=None,
                        shared_w_down=None, shared_gate_weight=None, router_bias=None,
                        b_gate=None, b_up=None, b_down=None, swiglu_alpha=1.702,
                        swiglu_limit=7.0, aux_coef=0.0, z_coef=0.0, expert_d_ff=None,
                        null_experts=(), null_values=None, skip_threshold=0.0,
                        skip_renormalize=False, router="top_k", router_p=0.5,
                        router_threshold=0.01, k_min=1, lora=None, lora_scaling=1.0,
                        router_grad="default", compute_dtype="float32"):
    """Gradients of  sum(dy * sparse_moe(x, ...)) + aux_coef * aux + z_coef * z  for the
    layer (the options of sparse_moe above, every router, null experts and the experts'
    LoRA included).  Returns {"dx", "router_weight", "router_bias", "w_gate", "w_up",
    "w_down", "b_gate", "b_up", "b_down", "shared_w_gate", "shared_w_up", "shared_w_down",
    "shared_gate_weight", "null_values", "lora_a_gate", "lora_b_gate", "lora_a_up",
    "lora_b_up", "lora_a_down", "lora_b_down"}: None for what the layer does not have.
    lora: {target: (a (E, r, in), b (E, out, r))} (see expert_ffn_backward).
    compute_dtype: the routed and shared experts' (see ffn_backward).

    A null expert's slot adds w * v with v = x (copy), null_values[i] (constant) or 0
    (zero): its weight's gradient is <dy, v>, and copy adds w * dy to dx, constant
    w * dy to its row of null_values.  Skipping (skip_threshold > 0): a skipped slot
    passes no gradient; with skip_renormalize the kept weights w / S (S their sum) pass
    dw_i / S - sum_j dw_j w_j / S^2 to the routed weights."""
    xf = np.asarray(x, dtype=np.float64).reshape(-1, np.asarray(router_weight).shape[1])
    dy = np.asarray(dy, dtype=np.float64).reshape(xf.shape)
    T, d = xf.shape
    E = np.asarray(w_up).shape[0]
    n_null = len(null_experts)
    logits = xf @ np.asarray(router_weight, dtype=np.float64).T
    if router_bias is not None:
        logits = logits + np.asarray(router_bias, dtype=np.float64)
    opts = dict(scoring=scoring, renormalize=renormalize, routed_scaling=routed_scaling,
                expert_bias=expert_bias, n_groups=n_groups, topk_groups=topk_groups,
                capacity_factor=capacity_factor)
    if router == "top_k":
        routing = route(logits, top_k, **opts)
    else:
        routing = _route_other(logits, router, top_k, scoring, renormalize, routed_scaling,
                               capacity_factor, router_p, router_threshold, k_min)
    w_routed, full_ids = routing["weights"], routing["expert_ids"]
    if skip_threshold > 0:
        sk = skip_experts(routing["expert_ids"], w_routed, skip_threshold, skip_renormalize)
        routing = dict(routing, expert_ids=sk["expert_ids"], weights=sk["weights"])
    ids = routing["expert_ids"]
    disp = dispatch(xf, np.where(ids < E, ids, -1), E)
    gated = activation in GATED
    ffn_args = (w_gate if gated else None, w_up, w_down)
    ffn_opts = dict(activation=activation, b_gate=b_gate if gated else None, b_up=b_up,
                    b_down=b_down, alpha=swiglu_alpha, limit=swiglu_limit,
                    expert_d_ff=expert_d_ff, lora=lora, lora_scaling=lora_scaling)
    y_sorted = expert_ffn(disp["x_sorted"], disp["offsets"], *ffn_args, **ffn_opts,
                          compute_dtype=compute_dtype)
    cb = combine_backward(y_sorted, disp["position"], routing["weights"], dy)
    fb = expert_ffn_backward(disp["x_sorted"], disp["offsets"], *ffn_args, cb["dy_sorted"],
                             **ffn_opts, compute_dtype=compute_dtype)
    dx = dispatch_backward(fb["dx_sorted"], disp["token_index"], T)
    d_weights = cb["d_weights"]
    dv = None if null_values is None else np.zeros(np.shape(null_values))
    for t, j in zip(*np.nonzero(ids >= E)):
        kind, w = null_experts[ids[t, j] - E], routing["weights"][t, j]
        if kind == "copy":
            d_weights[t, j] = dy[t] @ xf[t]
            dx[t] += w * dy[t]
        elif kind == "constant":
            v = np.asarray(null_values[ids[t, j] - E], dtype=np.float64)
            d_weights[t, j] = dy[t] @ v
            dv[ids[t, j] - E] += w * dy[t]
    if skip_threshold > 0:  # back through the skip: kept slots only
        kept = ids >= 0
        d_weights = np.where(kept, d_weights, 0.0)
        if skip_renormalize:
            S = np.where(kept, w_routed, 0.0).sum(axis=1, keepdims=True)
            dot = (d_weights * w_routed).sum(axis=1, keepdims=True)
            safe = np.where(S > 0, S, 1.0)
            d_weights = np.where(kept & (S > 0), d_weights / safe - dot / safe ** 2, 0.0)
    if router == "top_k":
        dl = route_backward(logits, d_weights, top_k, aux_coef=aux_coef, z_coef=z_coef,
                            router_grad=router_grad, **opts)
    else:
        dl = _route_other_backward(logits, full_ids, ids >= 0, d_weights, router, scoring,
                                   renormalize, routed_scaling, aux_coef, z_coef)
    rb = router_backward(xf, router_weight, dl)
    dx = dx + rb["dx"]
    grads = {"router_weight": rb["d_router_weight"],
             "router_bias": rb["d_router_bias"] if router_bias is not None else None,
             "w_gate": fb["dw_gate"], "w_up": fb["dw_up"], "w_down": fb["dw_down"],
             "b_gate": fb["db_gate"] if b_gate is not None else None,
             "b_up": fb["db_up"] if b_up is not None else None,
             "b_down": fb["db_down"] if b_down is not None else None,
             "shared_w_gate": None, "shared_w_up": None, "shared_w_down": None,
             "shared_gate_weight": None, "null_values": dv if n_null else None}
    grads.update({n: fb[n] for n in fb if n.startswith("lora_")})
    if shared_w_up is not None:
        sg_w = shared_w_gate if gated else None
        shared = ffn(xf, sg_w, shared_w_up, shared_w_down, activation, alpha=swiglu_alpha,
                     limit=swiglu_limit, compute_dtype=compute_dtype)
        d_shared = dy
        if shared_gate_weight is not None:
            gw = np.asarray(shared_gate_weight, dtype=np.float64).reshape(d)
            s = sigmoid(xf @ gw)
            ds = np.einsum("td,td->t", dy, shared) * s * (1.0 - s)
            grads["shared_gate_weight"] = (ds @ xf).reshape(1, d)
            dx = dx + ds[:, None] * gw[None, :]
            d_shared = dy * s[:, None]
        sb = ffn_backward(xf, sg_w, shared_w_up, shared_w_down, d_shared, activation,
                          alpha=swiglu_alpha, limit=swiglu_limit, compute_dtype=compute_dtype)
        dx = dx + sb["dx"]
        grads.update(shared_w_gate=sb["dw_gate"], shared_w_up=sb["dw_up"],
                     shared_w_down=sb["dw_down"])
    grads["dx"] = dx.reshape(np.shape(x))
    return grads


def layer_backward(layer, x, dy, aux_coef=0.0, z_coef=0.0):
    """sparse_moe_backward for a moe.SparseMoE's weights and options (as layer_forward is
    sparse_moe for them); weights in bf16 / fp16 storage are decoded first."""
    gated = layer.activation in GATED

    def dec(w):
        return None if w is None else _decode_weight(layer, w)
    return sparse_moe_backward(
        x, layer.router_weight, dec(layer.w_gate) if gated else None, dec(layer.w_up),
        dec(layer.w_down), dy, top_k=layer.top_k, activation=layer.activation,
        scoring=layer.scoring, renormalize=layer.renormalize,
        routed_scaling=layer.routed_scaling, n_groups=layer.n_groups,
        topk_groups=layer.topk_groups,
        expert_bias=layer.expert_bias if layer.use_expert_bias else None,
        capacity_factor=layer.capacity_factor, shared_w_gate=dec(layer.shared_w_gate),
        shared_w_up=dec(layer.shared_w_up), shared_w_down=dec(layer.shared_w_down),
        shared_gate_weight=layer.shared_gate_weight if layer.shared_expert_gate else None,
        router_bias=layer.router_bias if layer.use_router_bias else None,
        b_gate=layer.b_gate if layer.use_expert_biases and gated else None,
        b_up=layer.b_up if layer.use_expert_biases else None,
        b_down=layer.b_down if layer.use_expert_biases else None,
        swiglu_alpha=layer.swiglu_alpha, swiglu_limit=layer.swiglu_limit,
        aux_coef=aux_coef, z_coef=z_coef, expert_d_ff=layer.expert_d_ff,
        null_experts=layer.null_experts, null_values=layer.null_values,
        skip_threshold=layer.skip_threshold, skip_renormalize=layer.skip_renormalize,
        router=layer.router, router_p=layer.router_p,
        router_threshold=layer.router_threshold, k_min=layer.k_min,
        lora={t: (getattr(layer, f"lora_a_{t[2:]}"), getattr(layer, f"lora_b_{t[2:]}"))
              for t in getattr(layer, "lora_targets", ()) if getattr(layer, "lora_rank", 0)},
        lora_scaling=getattr(layer, "lora_scaling", 1.0),
        router_grad=getattr(layer, "router_grad", "default"),
        compute_dtype=getattr(layer, "compute_dtype", "float32"))


def multi_head_moe_backward(layer, x, dy, aux_coef=0.0, z_coef=0.0):
    """Gradients of  sum(dy * multi_head_moe(layer, x)) + aux_coef * aux + z_coef * z, in
    float64 from the float32 sub-tokens the inner layer sees (as multi_head_moe): h =
    x W_in^T, the inner layer on h's n_heads sub-tokens, y = merged W_merge^T.  Returns
    {"dx", "w_in", "w_merge", "moe": the inner layer's layer_backward}."""
    def dec(w):
        return _decode_weight(layer, w)
    x = np.asarray(x, dtype=np.float32).astype(np.float64).reshape(-1, layer.d_model)
    dy = np.asarray(dy, dtype=np.float64).reshape(x.shape)
    w_in, w_merge = dec(layer.w_in), dec(layer.w_merge)
    sub = (x @ w_in.T).astype(np.float32).reshape(-1, layer.d_head)
    y_sub, _ = layer_forward(layer.moe, sub)
    merged = y_sub.reshape(-1, layer.d_model).astype(np.float32).astype(np.float64)
    d_merged = dy @ w_merge
    inner = layer_backward(layer.moe, sub, d_merged.reshape(-1, layer.d_head), aux_coef,
                           z_coef)
    dh = inner["dx"].reshape(-1, layer.d_model)
    return {"dx": dh @ w_in, "w_in": dh.T @ x, "w_merge": dy.T @ merged, "moe": inner}


def lora_mixture_backward(x, w0, a, b, ids, weights, scaling, dy, kind="adapters"):
    """Gradients of  sum(dy * lora_mixture(x, w0, a, b, ids, weights, scaling, kind=kind)).

    Per slot (t, s) with e = ids[t, s] >= 0 and c = scaling_e * weights[t, s]:
    "adapters": z = A_e x_t, term = B_e z; "shared_a": z = A x_t, term = B_e z; "ranks":
    z = A[e] . x_t (a scalar), term = B[:, e] z.  Then d weights[t, s] = scaling_e
    <dy_t, term>, dB (the head's block) += c dy_t z^T, dz = c B^T dy_t, dA (the block z came
    from) += dz x_t^T, dx_t += A^T dz; the frozen base adds dy w0 to dx and gets no
    gradient (nor does the bias).  weights None means all 1 (its gradient is still given).
    Returns {"dx" (T, d_in), "a" (a's shape), "b" (b's shape), "weights" (T, S), 0 for
    empty slots (id -1)}, float64.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    ids = np.asarray(ids)
    T, S = ids.shape
    w = np.ones((T, S)) if weights is None else np.asarray(weights, dtype=np.float64)
    scale = np.asarray(scaling, dtype=np.float64)
    if kind not in ("adapters", "shared_a", "ranks"):
        raise ValueError(f"unknown kind {kind!r}")
    dx = dy @ np.asarray(w0, dtype=np.float64)
    da, db, dw = np.zeros(a.shape), np.zeros(b.shape), np.zeros((T, S))
    for t in range(T):
        for s in range(S):
            e = int(ids[t, s])
            if e < 0:
                continue
            se = scale[e] if scale.ndim else float(scale)
            c = se * w[t, s]
            if kind == "ranks":
                z = a[e] @ x[t]
                dw[t, s] = se * z * (b[:, e] @ dy[t])
                db[:, e] += c * z * dy[t]
                dz = c * (b[:, e] @ dy[t])
                da[e] += dz * x[t]
                dx[t] += dz * a[e]
                continue
            ae = a[e] if kind == "adapters" else a
            z = ae @ x[t]
            dw[t, s] = se * (dy[t] @ (b[e] @ z))
            db[e] += c * np.outer(dy[t], z)
            dz = c * (b[e].T @ dy[t])
            if kind == "adapters":
                da[e] += np.outer(dz, x[t])
            else:
                da += np.outer(dz, x[t])
            dx[t] += ae.T @ dz
    return {"dx": dx, "a": da, "b": db, "weights": dw}


def lora_backward(layer, x, dy, *, aux_coef=0.0, z_coef=0.0, scalings=None,
                  adapter_ids=None, seq_lens=None):
    """Gradients of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  for a moe.lora
    layer (y = lora_forward(layer, x, ...); the losses those of its router's route, 0 for
    the layers without one), with the selection held fixed.  x is taken as float64 as
    given (not rounded to float32 as lora_forward rounds it), and the gradient is at that
    point.  The base weight (decoded from bf16 / fp16 storage) adds dy W0 to dx and, like
    the base bias, gets no gradient.

    TopKLoRA / SoftLoRA / HydraLoRA: logits = x W_r^T, route(logits, k, scoring,
    renormalize), d_weights from lora_mixture_backward, then route_backward (with the
    losses) and router_backward.  per_sequence: the logits are of the sequence's mean m_i;
    the sequence's d_weights is the sum over its tokens', and d m_i reaches each of its
    tokens divided by the length.  Keys "x", "router_weight", "lora_a", "lora_b".
    GatedLoRA: w = c (top_k None), c[picked] (top_k), softmax(c[picked]) (softmax_topk),
    d c[picked] = dw (softmax: w (dw - <dw, w>)), 0 elsewhere.  Keys "x", "scalings",
    "lora_a", "lora_b".
    FlyLoRA: y = W0 x + s sum_{j in picked} B[:, j] z_j, z = A x; A frozen, but dz reaches
    x through A^T; rank_bias selects only.  Keys "x", "lora_b".
    SMoRA: logits = x W_r^T expanded to the rank columns (np.repeat by rank_partition, or
    np.tile), route(sigmoid, renormalize, routed_scaling=top_k, expert_bias=rank_bias
    (selection only)); the expanded columns' d logits sum back into their router row.
    Keys "x", "router_weight", "lora_a", "lora_b".
    MultiLoRA: one slot per token, adapter_ids (-1: base only), per-adapter constant
    scalings.  Keys "x", "lora_a", "lora_b".
    Gradients float64, each in its weight's shape ("x" in x's, "scalings" in scalings').
    """
    name = type(layer).__name__
    x_in = np.asarray(x, dtype=np.float64)
    x = x_in.reshape(-1, layer.d_in)
    T = x.shape[0]
    dy = np.asarray(dy, dtype=np.float64).reshape(T, layer.d_out)
    w0 = _decode_weight(layer, layer.base_weight)
    s = layer.scaling

    def out(mix, **extra):
        return {"x": mix["dx"].reshape(x_in.shape), **extra}

    if name in ("TopKLoRA", "SoftLoRA", "HydraLoRA"):
        wr = np.asarray(layer.router_weight, dtype=np.float64)
        src, seq, lens = x, None, None
        if layer.per_sequence:
            if seq_lens is None and x_in.ndim == 3:
                seq_lens = [x_in.shape[1]] * x_in.shape[0]
            lens = np.asarray(seq_lens, dtype=np.int64)
            seq = np.repeat(np.arange(len(lens)), lens)
            src = np.stack([x[seq == i].mean(axis=0) for i in range(len(lens))])
        k = layer.top_k if layer.top_k is not None else layer.n_experts
        opts = dict(scoring=getattr(layer, "scoring", "softmax"),
                    renormalize=layer.renormalize)
        logits = src @ wr.T
        r = route(logits, k, **opts)
        ids, w = r["expert_ids"], r["weights"]
        if seq is not None:
            ids, w = ids[seq], w[seq]
        kind = "shared_a" if name == "HydraLoRA" else "adapters"
        mix = lora_mixture_backward(x, w0, layer.lora_a, layer.lora_b, ids, w, s, dy, kind)
        dw = mix["weights"]
        if seq is not None:
            dw_seq = np.zeros((len(lens), dw.shape[1]))
            np.add.at(dw_seq, seq, dw)
            dw = dw_seq
        dl = route_backward(logits, dw, k, aux_coef=aux_coef, z_coef=z_coef, **opts)
        rb = router_backward(src, wr, dl)
        d_src = rb["dx"]
        if seq is not None:
            d_src = d_src[seq] / lens[seq][:, None]
        mix["dx"] = mix["dx"] + d_src
        return out(mix, router_weight=rb["d_router_weight"], lora_a=mix["a"],
                   lora_b=mix["b"])
    if name == "GatedLoRA":
        c_in = np.asarray(scalings, dtype=np.float64)
        ids, w = _gated_lora_slots(layer, c_in.reshape(T, layer.n_experts))
        mix = lora_mixture_backward(x, w0, layer.lora_a, layer.lora_b, ids, w, s, dy)
        dw = mix["weights"]
        if layer.top_k is not None and layer.softmax_topk:
            dw = w * (dw - np.sum(dw * w, axis=1, keepdims=True))
        dc = np.zeros((T, layer.n_experts))
        np.put_along_axis(dc, ids, dw, axis=1)
        return out(mix, scalings=dc.reshape(c_in.shape), lora_a=mix["a"], lora_b=mix["b"])
    if name == "FlyLoRA":
        z = x @ np.asarray(layer.lora_a, np.float64).T
        ids = flylora_select(z, layer.top_k, layer.rank_bias, layer.signed)
        mix = lora_mixture_backward(x, w0, layer.lora_a, layer.lora_b, ids, None, s, dy,
                                    "ranks")
        return out(mix, lora_b=mix["b"])
    if name == "SMoRA":
        wr = np.asarray(layer.router_weight, dtype=np.float64)
        base_logits = x @ wr.T
        rp, n = layer.rank_partition, wr.shape[0]
        logits = np.tile(base_logits, (1, rp)) if layer.tile else \
            np.repeat(base_logits, rp, axis=1)
        opts = dict(scoring="sigmoid", renormalize=True, routed_scaling=layer.top_k,
                    expert_bias=layer.rank_bias)
        r = route(logits, layer.top_k, **opts)
        mix = lora_mixture_backward(x, w0, layer.lora_a, layer.lora_b, r["expert_ids"],
                                    r["weights"], s, dy, "ranks")
        dl = route_backward(logits, mix["weights"], layer.top_k, aux_coef=aux_coef,
                            z_coef=z_coef, **opts)
        dl = dl.reshape(T, rp, n).sum(axis=1) if layer.tile else \
            dl.reshape(T, n, rp).sum(axis=2)
        rb = router_backward(x, wr, dl)
        mix["dx"] = mix["dx"] + rb["dx"]
        return out(mix, router_weight=rb["d_router_weight"], lora_a=mix["a"],
                   lora_b=mix["b"])
    if name == "MultiLoRA":
        a_ids = np.asarray(adapter_ids)
        ids = (np.full(T, int(a_ids)) if a_ids.ndim == 0 else a_ids).reshape(T, 1)
        mix = lora_mixture_backward(x, w0, layer.lora_a, layer.lora_b, ids, None,
                                    layer.scalings, dy)
        return out(mix, lora_a=mix["a"], lora_b=mix["b"])
    raise TypeError(f"not a moe.lora layer: {name}")


def _l2_normalize_backward(v, dn, axis):
    """d/dv of sum(dn * _l2_normalize(v, axis)): with r = sqrt(sum v^2 + eps) along axis,
    dv = dn / r - v * sum(dn * v) / r^3."""
    r = np.sqrt(np.sum(v * v, axis=axis, keepdims=True) + SOFT_MOE_NORM_EPS)
    return dn / r - v * np.sum(dn * v, axis=axis, keepdims=True) / r ** 3


def soft_moe_backward(x, phi, w_gate, w_up, w_down, dy, *, slots_per_expert,
                      activation="swiglu", normalize=False, scale=1.0, temperature=1.0,
                      alpha=1.702, limit=7.0):
    """Gradients of sum(dy * soft_moe(...)["out"]), group by group, in float64.

    Per group X (m, d), with soft_moe's L, D, C, slots = D^T X and Y_slots:
      dC = dY Y_slots^T, dY_slots = C^T dY; ffn_backward per expert -> d_slots and dW;
      dD = X d_slots^T, dX = D d_slots; dL = D * (dD - colsum(dD * D))
      + C * (dC - rowsum(dC * C)); then through the logits: L = X phi / T, or with
      normalize L = scale * Xn phin / T (Xn, phin l2-normalised rows / columns), the
      chain rule running through the norms into dX and dphi, and into scale.
    Returns {"dx" (x's shape), "phi" (d, E*s), "w_gate" ((E, F, d) or None if not gated),
    "w_up" (E, F, d), "w_down" (E, d, F), "scale" (float; 0.0 without normalize)}.
    """
    x, phi, w_gate, w_up, w_down, xg, s, S, gated = _soft_moe_args(
        x, phi, w_gate, w_up, w_down, slots_per_expert, activation)
    one_group = x.ndim == 2
    dyg = np.asarray(dy, dtype=np.float64).reshape(xg.shape)
    B, m, d = xg.shape
    E = w_up.shape[0]
    T = float(temperature)
    sc = float(scale)
    phin = _l2_normalize(phi, 0) if normalize else None
    dx = np.zeros((B, m, d))
    dphi = np.zeros_like(phi)
    dphin = np.zeros_like(phi)
    dwg = np.zeros_like(w_gate) if gated else None
    dwu = np.zeros_like(w_up)
    dwd = np.zeros_like(w_down)
    dscale = 0.0
    for b in range(B):
        X, dY = xg[b], dyg[b]
        Xn = _l2_normalize(X, 1) if normalize else None
        L = (sc * (Xn @ phin) if normalize else X @ phi) / T
        D = softmax(L, axis=0)
        C = softmax(L, axis=1)
        slots = D.T @ X
        y_slots = np.zeros((S, d))
        d_slots = np.zeros((S, d))
        dY_slots = C.T @ dY
        for e in range(E):
            rows = slice(e * s, (e + 1) * s)
            wg = w_gate[e] if gated else None
            y_slots[rows] = ffn(slots[rows], wg, w_up[e], w_down[e], activation,
                                alpha=alpha, limit=limit)
            fb = ffn_backward(slots[rows], wg, w_up[e], w_down[e], dY_slots[rows],
                              activation, alpha=alpha, limit=limit)
            d_slots[rows] = fb["dx"]
            dwu[e] += fb["dw_up"]
            dwd[e] += fb["dw_down"]
            if gated:
                dwg[e] += fb["dw_gate"]
        dC = dY @ y_slots.T
        dD = X @ d_slots.T
        dX = D @ d_slots
        dL = D * (dD - np.sum(dD * D, axis=0, keepdims=True)) + \
            C * (dC - np.sum(dC * C, axis=1, keepdims=True))
        G = dL / T  # gradient w.r.t. the logits before the temperature
        if normalize:
            dscale += float(np.sum(G * (Xn @ phin)))
            dX = dX + _l2_normalize_backward(X, sc * (G @ phin.T), 1)
            dphin += sc * (Xn.T @ G)
        else:
            dX = dX + G @ phi.T
            dphi += X.T @ G
        dx[b] = dX
    if normalize:
        dphi = _l2_normalize_backward(phi, dphin, 0)
    return {"dx": dx[0] if one_group else dx, "phi": dphi, "w_gate": dwg, "w_up": dwu,
            "w_down": dwd, "scale": dscale}


def mixture_of_tokens_backward(x, phi, w_gate, w_up, w_down, dy, *, slots_per_expert=1,
                               activation="swiglu", temperature=1.0, mixing=True,
                               group_size=None, normalize=False, scale=1.0, alpha=1.702,
                               limit=7.0):
    """Gradients of sum(dy * mixture_of_tokens(...)["out"]): soft_moe_backward over the
    same groups as mixture_of_tokens (mixing: position p of group_size consecutive
    sequences; no mixing: every token alone, D = 1 constant), parameter gradients summed
    over the chunks.  Returns soft_moe_backward's keys, "dx" in x's shape."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    x3 = x[:, None] if x.ndim == 2 else x
    B, m, d = x3.shape
    dy3 = dy.reshape(x3.shape)
    kw = dict(slots_per_expert=slots_per_expert, activation=activation, normalize=normalize,
              scale=scale, temperature=temperature, alpha=alpha, limit=limit)
    if not mixing:
        r = soft_moe_backward(x3.reshape(B * m, 1, d), phi, w_gate, w_up, w_down,
                              dy3.reshape(B * m, 1, d), **kw)
        r["dx"] = r["dx"].reshape(x.shape)
        return r
    g = B if group_size is None else int(group_size)
    if g < 1 or B % g:
        raise ValueError(f"group_size must divide the batch B={B}, got {group_size}")
    dx = np.zeros((B, m, d))
    total = None
    for c in range(B // g):
        chunk = slice(c * g, (c + 1) * g)
        r = soft_moe_backward(x3[chunk].transpose(1, 0, 2), phi, w_gate, w_up, w_down,
                              dy3[chunk].transpose(1, 0, 2), **kw)
        dx[chunk] = r["dx"].transpose(1, 0, 2)
        if total is None:
            total = r
        else:
            for k in ("phi", "w_gate", "w_up", "w_down", "scale"):
                if total[k] is not None:
                    total[k] = total[k] + r[k]
    total["dx"] = dx.reshape(x.shape)
    return total


def peer_backward(x, w_query, sub_keys_1, sub_keys_2, u, v, dy, top_k, activation="relu"):
    """Gradients of sum(dy * peer_forward(...)["out"]) with the top-k selection fixed.

    Per token t and head h, with peer_forward's q = Wq[h] x, s1 = K1 q1, s2 = K2 q2, the
    selected experts e_j = i_j * n + j_j, a_j = u_e . x, z_j = act(a_j), g = softmax(s):
      dv[e_j] += g_j z_j dy, dz_j = v_e . dy; dg_j = z_j dz_j; da_j = g_j dz_j act'(a_j);
      du[e_j] += da_j x, dx += da_j u_e; ds = g * (dg - sum(g dg)); ds1[i_j] += ds_j,
      ds2[j_j] += ds_j; dK1 += ds1 q1^T, dK2 += ds2 q2^T (the head's keys, or the shared
      ones); dq = (K1^T ds1, K2^T ds2); dWq[h] += dq x^T, dx += Wq[h]^T dq.
    act' is relu: 1 above 0 (0 at 0 and below), gelu: the exact erf form, silu, identity: 1.
    Returns float64 {"dx" (T, d), "w_query" (H, d_key, d), "sub_keys_1", "sub_keys_2" (their
    shapes as passed: (n, d_key/2) shared or (H, n, d_key/2) per head), "u" (N, d) and
    "v" (N, d_out), dense}.
    """
    if activation not in PEER_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{PEER_ACTIVATIONS}")
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    wq = np.asarray(w_query, dtype=np.float64)
    k1_in = np.asarray(sub_keys_1, dtype=np.float64)
    k2_in = np.asarray(sub_keys_2, dtype=np.float64)
    shared = k1_in.ndim == 2
    k1, k2 = (k1_in[None], k2_in[None]) if shared else (k1_in, k2_in)
    u, v = np.asarray(u), np.asarray(v)
    T = x.shape[0]
    H, dk = wq.shape[:2]
    half = dk // 2
    n = k1.shape[1]
    act = {"relu": lambda z: np.maximum(z, 0.0), "gelu": _gelu, "silu": _silu,
           "identity": lambda z: z}[activation]
    if activation == "identity":
        d_act = np.ones_like
    else:
        d_act = lambda a: _activation_grads(activation, None, a)[1]  # noqa: E731
    dx = np.zeros_like(x)
    dwq = np.zeros_like(wq)
    dk1 = np.zeros_like(k1)
    dk2 = np.zeros_like(k2)
    du = np.zeros(u.shape)
    dv = np.zeros(v.shape)
    for t in range(T):
        for h in range(H):
            key = 0 if shared or k1.shape[0] == 1 else h
            q = wq[h] @ x[t]
            s1 = k1[key] @ q[:half]
            s2 = k2[key] @ q[half:]
            every = (s1[:, None] + s2[None, :]).ravel()
            order = _stable_desc_order(every)[:top_k]
            g = softmax(every[order])
            ue, ve = u[order].astype(np.float64), v[order].astype(np.float64)
            a = ue @ x[t]
            z = act(a)
            dv[order] += np.outer(g * z, dy[t])  # the k experts of one head are distinct
            dz = ve @ dy[t]
            dg = z * dz
            da = g * dz * d_act(a)
            du[order] += np.outer(da, x[t])
            dx[t] += da @ ue
            ds = g * (dg - np.dot(g, dg))
            ds1 = np.zeros(n)
            ds2 = np.zeros(n)
            np.add.at(ds1, order // n, ds)
            np.add.at(ds2, order % n, ds)
            dk1[key] += np.outer(ds1, q[:half])
            dk2[key] += np.outer(ds2, q[half:])
            dq = np.concatenate([k1[key].T @ ds1, k2[key].T @ ds2])
            dwq[h] += np.outer(dq, x[t])
            dx[t] += wq[h].T @ dq
    if shared:
        dk1, dk2 = dk1[0], dk2[0]
    return {"dx": dx, "w_query": dwq, "sub_keys_1": dk1, "sub_keys_2": dk2, "u": du,
            "v": dv}
