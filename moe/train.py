"""Training: a forward that keeps what the backward needs, and the backward.

    y, ctx = layer.forward_train(x)             # ctx: a TrainContext
    grads = layer.backward(ctx, dy, aux_coef=0.01, z_coef=0.001)
    grads["x"], grads["router_weight"], grads["w_gate"], ...

The gradients are those of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  with the
routing decision held fixed (the selection is piecewise constant; gradients flow through
the selected gate weights and the losses, as in every peer).  expert_bias gets none.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _C
from ._api import (_as_ndarray, _shape_str, check_choice, check_float, expert_ffn_args,
                   float_array, int_array, route_args)


class SparseRows(NamedTuple):
    """A gradient that touches only some rows of a (n_rows, width) weight (PEER's u and v:
    the experts a batch used): ``indices`` (U,) int64 ascending, ``values`` (U, width)
    float32, row i of values the gradient of row indices[i]; every other row's gradient is
    0.  SGD: ``w[g.indices] -= lr * g.values``; ``g.to_dense()`` forms the full array
    (for small layers and tests only)."""

    indices: np.ndarray
    values: np.ndarray
    n_rows: int

    def to_dense(self):
        out = np.zeros((self.n_rows,) + self.values.shape[1:], np.float32)
        out[self.indices] = self.values
        return out


class TrainContext:
    """What a SparseMoE forward kept for its backward (layer.forward_train).

    routing: the RoutingResult of the forward.  The context holds the input (a float32
    (T, d) view), the float64 router logits, the routing and the experts' outputs (O(T k d)
    floats, never the (T k, d_ff) hidden activations: the backward recomputes them).
    A context is consumed by one backward unless that backward passes retain=True.
    """

    __slots__ = ("layer", "lead", "x", "routing", "saved", "released", "allowed", "groups")

    def __init__(self, layer, lead, x, routing, saved, allowed, groups):
        self.layer, self.lead, self.x, self.routing = layer, lead, x, routing
        self.saved, self.allowed, self.groups = saved, allowed, groups
        self.released = False

    def __repr__(self):
        state = "released" if self.released else "live"
        return f"TrainContext(n_tokens={self.x.shape[0]}, {state})"


def check_backward_args(layer, ctx, dy, aux_coef, z_coef, d_out=None):
    """The checks of a layer's backward; returns (dy as float32 (T, d_out), aux, z).  d_out
    defaults to the input's width."""
    if not isinstance(ctx, TrainContext):
        raise TypeError(f"ctx must be the TrainContext that layer.forward_train returned, got "
                        f"{type(ctx).__name__}")
    if ctx.layer is not layer:
        raise ValueError("ctx comes from another layer's forward_train")
    if ctx.released:
        raise RuntimeError("this TrainContext was already used by a backward (pass "
                           "retain=True to the first backward to run it again)")
    T, d = ctx.x.shape
    d = d if d_out is None else d_out
    want = ctx.lead + (d,)
    arr = np.asarray(dy)
    if arr.shape != want and arr.shape != (T, d):
        raise ValueError(f"dy must have the output's shape {_shape_str(want)}, got "
                         f"{_shape_str(arr.shape)}")
    if arr.dtype.kind != "f":
        raise TypeError(f"dy must be a float array, got dtype {arr.dtype}")
    dy32 = np.ascontiguousarray(arr.reshape(T, d), dtype=np.float32)
    aux = check_float(aux_coef, "aux_coef")
    z = check_float(z_coef, "z_coef")
    return dy32, aux, z


# --------------------------------------------------------------------------- #
# The staged ops' backward, for users who compose route -> dispatch -> expert_ffn ->
# combine themselves.  Each takes its forward's arguments plus the output gradient.
# --------------------------------------------------------------------------- #

def route_backward(logits, expert_ids, d_weights, top_k, *, aux_coef=0.0, z_coef=0.0,
                   router_grad="default", **options):
    """d logits of  sum(d_weights * weights) + aux_coef * aux_loss + z_coef * z_loss  for
    moe.route(logits, top_k, **options) (the same options: scoring, renormalize,
    routed_scaling, expert_bias, n_groups, topk_groups, capacity_factor, allowed,
    groups), the selection held fixed.

    expert_ids: the forward's (T, top_k) ids (-1 where capacity dropped a slot: that slot
    passes no gradient); d_weights: (T, top_k).  router_grad: "default" or
    "straight-through" (also through the top-k mask, see moe.SparseMoE).  Returns (T, E)
    float64.
    """
    args, kw = route_args(logits, top_k, **options)
    T = args[0].shape[0]
    ids = int_array(expert_ids, "expert_ids", (("n_tokens", T), ("top_k", kw["top_k"])),
                    np.int32, low=-1, high=args[0].shape[1],
                    what=f"[0, n_experts={args[0].shape[1]}) or -1")
    dw = float_array(d_weights, "d_weights", (("n_tokens", T), ("top_k", kw["top_k"])))
    return _C.route_backward(args, kw, ids, dw, aux_coef=check_float(aux_coef, "aux_coef"),
                             z_coef=check_float(z_coef, "z_coef"),
                             router_grad=check_choice(router_grad, "router_grad",
                                                      _C.ROUTER_GRADS))


def combine_backward(y_sorted, position, weights, d_out):
    """Gradients of moe.combine(y_sorted, position, weights) for d_out (T, d): returns
    (d_y_sorted (N, d), d_weights (T, k)), float32; rows and slots no slot reads get 0."""
    y = float_array(y_sorted, "y_sorted", (("n_rows", None), ("d_model", None)))
    pos = int_array(position, "position", (("n_tokens", None), ("top_k", None)), low=-1,
                    high=y.shape[0], what=f"[0, n_rows={y.shape[0]}) or -1")
    w = float_array(weights, "weights", (("n_tokens", pos.shape[0]), ("top_k", pos.shape[1])))
    g = float_array(d_out, "d_out", (("n_tokens", pos.shape[0]), ("d_model", y.shape[1])))
    return _C.combine_backward(y, pos, w, g)


def dispatch_backward(dx_sorted, position):
    """Gradient of moe.dispatch's gather: dx[t] = the sum of the rows that copied token t
    (position: the Dispatch's (T, k) rows, -1 = none), slots in order.  Returns (T, d)."""
    d = float_array(dx_sorted, "dx_sorted", (("n_rows", None), ("d_model", None)))
    pos = int_array(position, "position", (("n_tokens", None), ("top_k", None)), low=-1,
                    high=d.shape[0], what=f"[0, n_rows={d.shape[0]}) or -1")
    return _C.dispatch_backward(d, pos)


def expert_ffn_backward(x_sorted, offsets, w_gate, w_up, w_down, dy_sorted,
                        activation="swiglu", dtype=None, *, b_gate=None, b_up=None,
                        b_down=None, swiglu_alpha=1.702, swiglu_limit=7.0):
    """Gradients of moe.expert_ffn (the same arguments, weights unpacked; b_* its optional
    biases) for dy_sorted (N, d): a dict of float32 arrays "x_sorted", "w_gate" (None if
    ungated), "w_up", "w_down" and, when biases are given, "b_gate", "b_up", "b_down".
    Experts without rows get zero gradients.  Gate and up are recomputed, not kept."""
    kept = {}
    args, kw = expert_ffn_args(x_sorted, offsets, w_gate, w_up, w_down, activation, dtype,
                               swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
                               b_gate=b_gate, b_up=b_up, b_down=b_down, keep=kept)
    x = args[0]
    dy = float_array(dy_sorted, "dy_sorted", (("n_rows", x.shape[0]), ("d_model", x.shape[1])))
    biases = any(b is not None for b in (b_gate, b_up, b_down))
    dx, dg, du, dd, dbg, dbu, dbd = _C.ffn_grouped_backward(args, kw, dy, biases=biases,
                                                            **kept)
    out = {"x_sorted": dx, "w_gate": dg, "w_up": du, "w_down": dd}
    if biases:
        out.update(b_gate=dbg, b_up=dbu, b_down=dbd)
    return out


def ffn_backward(x, w_gate, w_up, w_down, dy, activation="swiglu", dtype=None):
    """Gradients of moe.ffn (one expert on every row) for dy (T, d): a dict "x", "w_gate"
    (None if ungated), "w_up", "w_down", float32."""
    x = float_array(x, "x", (("n_tokens", None), ("d_model", None)))
    lift = (lambda w: None if w is None else _as_ndarray(w, "weight")[None])
    g = expert_ffn_backward(x, np.array([0, x.shape[0]]), lift(w_gate), lift(w_up),
                            lift(w_down), dy, activation, dtype)
    return {"x": g["x_sorted"], "w_gate": None if g["w_gate"] is None else g["w_gate"][0],
            "w_up": g["w_up"][0], "w_down": g["w_down"][0]}
