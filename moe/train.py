"""Training: a forward that keeps what the backward needs, and the backward.

    y, ctx = layer.forward_train(x)             # ctx: a TrainContext
    grads = layer.backward(ctx, dy, aux_coef=0.01, z_coef=0.001)
    grads["x"], grads["router_weight"], grads["w_gate"], ...

The gradients are those of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  with the
routing decision held fixed (the selection is piecewise constant; gradients flow through
the selected gate weights and the losses, as in every peer).  expert_bias gets none.
"""
from __future__ import annotations

import numpy as np

from ._api import _shape_str, check_float

# (SHIM while the C backward is written: the float64 reference computes the gradients.)


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


def check_backward_args(layer, ctx, dy, aux_coef, z_coef):
    """The checks of SparseMoE.backward; returns (dy as float32 (T, d), aux, z)."""
    if not isinstance(ctx, TrainContext):
        raise TypeError(f"ctx must be the TrainContext that layer.forward_train returned, got "
                        f"{type(ctx).__name__}")
    if ctx.layer is not layer:
        raise ValueError("ctx comes from another layer's forward_train")
    if ctx.released:
        raise RuntimeError("this TrainContext was already used by a backward (pass "
                           "retain=True to the first backward to run it again)")
    T, d = ctx.x.shape
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
