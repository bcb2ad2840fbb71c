"""Multi-head MoE (MH-MoE): every token is projected, split into n_heads sub-tokens that
are routed independently through one sparse MoE layer, merged back and projected.

    h = x @ w_in.T                       (T, d)
    sub = h.reshape(T * n_heads, d / n_heads)
    y_sub = SparseMoE(sub)               experts of width d / n_heads
    y = y_sub.reshape(T, d) @ w_merge.T  (T, d)

The two projections run on the packed GEMM of the C core (moe._C.linear_grouped) and the
sub-tokens through the whole-layer C call, so nothing loops over tokens in Python.
"""
from __future__ import annotations

import numpy as np

from . import _C
from ._api import (WEIGHT_DTYPES, check_int, naming_nonfinite, refuse_resize, stored_weight,
                   token_rows, weight_bits)
from .layer import SparseMoE
from .train import TrainContext, check_backward_args

__all__ = ["MultiHeadMoE"]


class MultiHeadMoE:
    """Multi-head MoE over (..., d_model) tokens: n_heads sub-tokens of d_model / n_heads
    each, routed top_k among n_experts experts of hidden size d_ff.

    Weights: w_in, w_merge (d_model, d_model) in `dtype` (nn.Linear layout) and the inner
    layer `moe` (a moe.SparseMoE of d_model / n_heads; every routing option of SparseMoE
    is accepted as a keyword and passed to it).  Assign w_in / w_merge to replace them; the
    projections are repacked on the next call (after in-place edits call pack()).
    """

    def __init__(self, d_model, n_heads, d_ff, n_experts, top_k, *, dtype="float32", seed=0,
                 init=True, **moe_options):
        self.d_model = check_int(d_model, "d_model", 1)
        self.n_heads = check_int(n_heads, "n_heads", 1)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}, got {n_heads}")
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.d_head = self.d_model // self.n_heads
        self.moe = SparseMoE(self.d_head, d_ff, n_experts, top_k, dtype=dtype, seed=seed,
                             init=init, **moe_options)
        self._packed = None
        self.w_in = self.w_merge = None
        if init:
            rng = np.random.default_rng(seed + 1)
            d = self.d_model
            self.w_in = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
            self.w_merge = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)

    def __setattr__(self, name, value):
        refuse_resize(self, name, ("d_model", "n_heads", "d_head", "dtype", "moe"))
        if name in ("w_in", "w_merge"):
            if value is not None:
                d = self.d_model
                value = stored_weight(value, name, (("d_model", d), ("d_model", d)),
                                      self.dtype)
            object.__setattr__(self, "_packed", None)
        object.__setattr__(self, name, value)

    def pack(self):
        """Pack the two projections now (after editing w_in / w_merge in place)."""
        if self.w_in is None or self.w_merge is None:
            raise ValueError("w_in and w_merge must be set (the layer was made with init=False)")
        code = WEIGHT_DTYPES.index(self.dtype)
        with naming_nonfinite(self.dtype, w_in=self.w_in, w_merge=self.w_merge):
            packed = (_C.pack_linear(weight_bits(self.w_in)[None], dtype=code),
                      _C.pack_linear(weight_bits(self.w_merge)[None], dtype=code))
        object.__setattr__(self, "_packed", packed)
        return self

    def __call__(self, x, return_routing=False):
        """x: (..., d_model) float.  Returns (..., d_model) float32; with return_routing=True
        also the inner layer's routing over the (T * n_heads) sub-tokens."""
        y, routing, _ = self._forward(x, False)
        return (y, routing) if return_routing else y

    def _forward(self, x, train):
        """(y, the inner routing, what the backward needs or None)."""
        lead, x2 = token_rows(x, self.d_model)
        if self._packed is None:
            self.pack()
        w_in, w_merge = self._packed
        offsets = np.array([0, x2.shape[0]], np.int64)
        h = _C.linear_grouped(x2, token_index=None, offsets=offsets, weights=w_in)
        sub = h.reshape(-1, self.d_head)
        if train:
            y_sub, inner = self.moe.forward_train(sub)
            routing = inner.routing
        else:
            y_sub, routing = self.moe(sub, return_routing=True)
        merged = np.ascontiguousarray(y_sub.reshape(-1, self.d_model))
        y = _C.linear_grouped(merged, token_index=None, offsets=offsets, weights=w_merge)
        y = y.reshape(lead + (self.d_model,))
        return y, routing, ((lead, x2, merged, inner, self._packed) if train else None)

    # ---- training ---------------------------------------------------------------------

    def trainable_weights(self):
        """Names of the gradients backward returns: w_in, w_merge and the inner layer's as
        "moe.<name>"."""
        return ("w_in", "w_merge") + tuple(f"moe.{n}" for n in self.moe.trainable_weights())

    def forward_train(self, x):
        """The forward keeping what backward needs: (y, ctx); ctx.routing is the inner
        layer's routing over the sub-tokens."""
        y, routing, saved = self._forward(x, True)
        return y, TrainContext(self, saved[0], saved[1], routing, saved, None, None)

    def backward(self, ctx, dy, *, aux_coef=0.0, z_coef=0.0, retain=False):
        """Gradients of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  (the inner
        layer's losses) for the forward that made ctx: {"x", "w_in", "w_merge",
        "moe.<name>" for the inner layer's trainable weights}, float32."""
        dy32, aux, z = check_backward_args(self, ctx, dy, aux_coef, z_coef)
        lead, x2, merged, inner, packed = ctx.saved
        if packed is not self._packed:
            raise RuntimeError("w_in / w_merge changed since forward_train: the backward "
                               "needs the weights the forward ran with")
        code = WEIGHT_DTYPES.index(self.dtype)
        d_merged, g_merge = _C.linear_backward(merged, weight_bits(self.w_merge), dy32, code)
        g = self.moe.backward(inner, d_merged.reshape(-1, self.d_head), aux_coef=aux,
                              z_coef=z, retain=retain)
        dx, g_in = _C.linear_backward(x2, weight_bits(self.w_in),
                                      np.ascontiguousarray(g.pop("x").reshape(x2.shape)), code)
        if not retain:
            ctx.released = True
            ctx.saved = None
        out = {"x": dx.reshape(lead + (self.d_model,)), "w_in": g_in, "w_merge": g_merge}
        out.update((f"moe.{n}", v) for n, v in g.items())
        return out

    def __repr__(self):
        return (f"MultiHeadMoE(d_model={self.d_model}, n_heads={self.n_heads}, "
                f"moe={self.moe!r})")
