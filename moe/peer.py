"""moe.PEER: product-key expert retrieval over up to millions of single-neuron experts.

PEER (parameter efficient expert retrieval; He 2024, "Mixture of A Million Experts") keeps
N = n^2 experts, each one hidden neuron: expert e has an input row ``u[e] (d_model,)`` and
an output row ``v[e] (d_out,)``.  Per token x and head h:

- query ``q = w_query[h] @ x`` (d_key), split in halves q1, q2 (a plain linear: the paper's
  query BatchNorm is left out);
- sub-key scores ``s1 = K1 q1``, ``s2 = K2 q2`` (n each; K1, K2 per head, or shared);
- top-k of s1 and of s2 (ties to the lower index); of the k^2 sums s1[i] + s2[j] the best k,
  ties to the lower expert id ``e = i * n + j``; gates = softmax of those k scores;
- ``y += sum_j g_j * act(u[e_j] . x) * v[e_j]``, summed over heads.

The product-key search finds the exact top-k of all N scores s1[i] + s2[j] (the reference
checks it by brute force) while scoring only 2n sub-keys; the C core (csrc/cpu/peer.c)
never forms anything of size N besides the weights, so a million experts at d_model = 256
need the 2 GiB of u and v and little more.  A token's output depends only on its own row
(bitwise: batch composition and thread count change nothing).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _C
from ._api import (_shape_str, check_choice, check_int, float_array, refuse_resize,
                   remember_config, saveable)
from .train import SparseRows, TrainContext, check_backward_args

__all__ = ["PEER", "PEERRouting", "PEER_ACTIVATIONS"]

# Codes of moe_peer_activation (csrc/moe.h).  "gelu" is the exact erf form.
PEER_ACTIVATIONS = _C.PEER_ACTIVATIONS

# Expert ids i * n + j are int32 in the core.
_MAX_SUB_KEYS = 46340


class PEERRouting(NamedTuple):
    """The experts a PEER call retrieved.

    expert_ids: (..., n_heads, top_k) int32, best first; expert e = i * n_sub_keys + j.
    gates:      (..., n_heads, top_k) float32, softmax over each head's k scores.
    """

    expert_ids: np.ndarray
    gates: np.ndarray


@saveable
class PEER:
    """A PEER layer: ``y = sum_h sum_{j in top-k} g_hj * act(u_e . x) * v_e``.

    Parameters: d_model; n_sub_keys n (N = n^2 experts, n <= 46340); n_heads retrieval
    heads; top_k experts per head (1..n; the product-key search keeps top_k sub-keys per
    half); d_key, the query width (even; default d_model // 2 rounded down to even, at least
    2); activation in "relu" (default) | "gelu" | "silu" | "identity"; d_out (default
    d_model); per_head_keys: each head has its own sub-keys (the paper's choice, default)
    or all heads share one pair; seed for the seeded normal initialisation; init=False
    leaves the weights None, to be assigned.

    The activation of the single-neuron experts is sigma in the paper, which leaves it
    open; ReLU is the default here (lucidrains' PEER-pytorch uses GELU: pass
    activation="gelu").

    Weights (float32, checked and stored C-contiguous when assigned; read on every call,
    so in-place edits need nothing):
      w_query (n_heads, d_key, d_model); sub_keys_1, sub_keys_2 (n_heads, n, d_key / 2), or
      (n, d_key / 2) with per_head_keys=False; u (N, d_model); v (N, d_out).
    Initialisation: w_query ~ N(0, 1/d_model), sub-keys ~ N(0, 2/d_key), u ~ N(0, 1/d_model),
    v ~ N(0, 1/(n_heads * top_k)), drawn directly in float32 (no float64 copy of u or v).
    """

    @remember_config
    def __init__(self, d_model, n_sub_keys, n_heads=8, top_k=16, d_key=None,
                 activation="relu", seed=0, *, d_out=None, per_head_keys=True, init=True):
        self.d_model = check_int(d_model, "d_model", 1)
        self.n_sub_keys = check_int(n_sub_keys, "n_sub_keys", 1, _MAX_SUB_KEYS)
        self.n_heads = check_int(n_heads, "n_heads", 1, 2**31 - 1)
        self.top_k = check_int(top_k, "top_k", 1, self.n_sub_keys)
        if d_key is None:
            d_key = 2 * max(1, self.d_model // 4)
        self.d_key = check_int(d_key, "d_key", 2, 2**31 - 2)
        if self.d_key % 2:
            raise ValueError(f"d_key must be even (two halves), got {self.d_key}")
        check_choice(activation, "activation", PEER_ACTIVATIONS)
        self.activation = activation
        self.d_out = self.d_model if d_out is None else check_int(d_out, "d_out", 1)
        self.per_head_keys = bool(per_head_keys)
        for name in self._weight_shapes():
            object.__setattr__(self, name, None)
        if not init:
            return
        rng = np.random.default_rng(seed)

        def normal(shape, std):
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= np.float32(std)
            return a

        H, n, d, dk = self.n_heads, self.n_sub_keys, self.d_model, self.d_key
        keys = (H, n, dk // 2) if self.per_head_keys else (n, dk // 2)
        self.w_query = normal((H, dk, d), d ** -0.5)
        self.sub_keys_1 = normal(keys, (dk / 2) ** -0.5)
        self.sub_keys_2 = normal(keys, (dk / 2) ** -0.5)
        self.u = normal((self.n_experts, d), d ** -0.5)
        self.v = normal((self.n_experts, self.d_out), (H * self.top_k) ** -0.5)

    @property
    def n_experts(self):
        """N = n_sub_keys ** 2."""
        return self.n_sub_keys ** 2

    def config(self):
        """The constructor arguments of this layer (JSON-friendly), without weights or seed."""
        return dict(self._init_config)

    def save(self, path):
        """Write the layer to one safetensors file; moe.load(path) gives it back bit for bit."""
        from .io import save
        save(self, path)

    def _weight_names(self):
        return tuple(self._weight_shapes())

    def _weight_shapes(self):
        """attribute -> ((label, size), ...) of its shape."""
        half = ("d_key/2", self.d_key // 2)
        keys = ((("n_heads", self.n_heads),) if self.per_head_keys else ()) + \
            (("n_sub_keys", self.n_sub_keys), half)
        return {
            "w_query": (("n_heads", self.n_heads), ("d_key", self.d_key),
                        ("d_model", self.d_model)),
            "sub_keys_1": keys,
            "sub_keys_2": keys,
            "u": (("n_experts", self.n_experts), ("d_model", self.d_model)),
            "v": (("n_experts", self.n_experts), ("d_out", self.d_out)),
        }

    # Weight attributes are checked and converted when assigned.
    def __setattr__(self, name, value):
        refuse_resize(self, name, ("d_model", "n_sub_keys", "n_heads", "d_key", "d_out",
                                   "per_head_keys"))
        if value is not None and name in ("w_query", "sub_keys_1", "sub_keys_2", "u", "v"):
            value = float_array(value, name, self._weight_shapes()[name])
        object.__setattr__(self, name, value)

    @property
    def nbytes(self):
        """Bytes held by the weights."""
        return sum(getattr(self, name).nbytes for name in self._weight_shapes()
                   if getattr(self, name) is not None)

    def __call__(self, x, return_routing=False):
        """x: (..., d_model) float -> (..., d_out) float32; with return_routing also a
        PEERRouting with ids and gates of shape (..., n_heads, top_k)."""
        return self._call(x, return_routing)

    def _call(self, x, return_routing, keep=None):
        for name in self._weight_shapes():
            if getattr(self, name) is None:
                raise ValueError(f"{name} is not set (the layer was made with init=False)")
        x = float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), got "
                             f"{_shape_str(x.shape)}")
        lead = x.shape[:-1]
        k1, k2 = self.sub_keys_1, self.sub_keys_2
        if not self.per_head_keys:
            k1, k2 = k1[None], k2[None]
        args = (x.reshape(-1, self.d_model), self.w_query, k1, k2, self.u, self.v, self.top_k,
                PEER_ACTIVATIONS.index(self.activation))
        routing = bool(return_routing) or keep is not None
        out, ids, gates = _C.peer_forward(*args, return_routing=routing)
        if keep is not None:
            keep.update(args=args, ids=ids)
        out = out.reshape(lead + (self.d_out,))
        if not return_routing:
            return out
        shape = lead + (self.n_heads, self.top_k)
        return out, PEERRouting(ids.reshape(shape), gates.reshape(shape))

    # ---- training ---------------------------------------------------------------------

    def trainable_weights(self):
        """Names of the weights backward returns a gradient for (all of them)."""
        return ("w_query", "sub_keys_1", "sub_keys_2", "u", "v")

    def forward_train(self, x):
        """The forward of __call__ keeping what backward needs: returns (y, ctx).  ctx
        (moe.train.TrainContext) holds the input and the retrieved expert ids
        (ctx.routing, a PEERRouting); queries, scores and gates are recomputed by the
        backward.  The weights must not change before it (they are read, not copied)."""
        keep = {}
        out, routing = self._call(x, True, keep)
        ctx = TrainContext(self, out.shape[:-1], keep["args"][0], routing, keep, None, None)
        return out, ctx

    def backward(self, ctx, dy, *, retain=False):
        """Gradients of sum(dy * y) for the forward that made ctx, the retrieval held fixed.

        Returns a dict: "x" (the input's shape), "w_query", "sub_keys_1", "sub_keys_2"
        (float32, their weights' shapes), and "u", "v" as moe.SparseRows: only the rows of
        the experts the batch retrieved (ascending ids, one row each), never a dense
        (N, d) array -- memory O(rows used).  Each sum runs in (token, head, slot) order:
        bitwise the same for any thread count, and a token's dx depends on its row only.
        """
        dy32, _, _ = check_backward_args(self, ctx, dy, 0.0, 0.0, self.d_out)
        keep = ctx.saved
        dx, dq, dk1, dk2, used, du, dv = _C.peer_backward(keep["args"], {}, keep["ids"], dy32)
        if not self.per_head_keys:
            dk1, dk2 = dk1[0], dk2[0]
        if not retain:
            ctx.released = True
        N = self.n_experts
        return {"x": dx.reshape(ctx.lead + (self.d_model,)), "w_query": dq,
                "sub_keys_1": dk1, "sub_keys_2": dk2, "u": SparseRows(used, du, N),
                "v": SparseRows(used, dv, N)}

    def flops(self, n_tokens):
        """Multiply-add FLOPs (x2) of a call on n_tokens: queries, sub-key scores, experts."""
        H, k = self.n_heads, self.top_k
        return 2 * n_tokens * H * (self.d_key * self.d_model + self.n_sub_keys * self.d_key +
                                   k * (self.d_model + self.d_out))

    def __repr__(self):
        return (f"PEER(d_model={self.d_model}, n_sub_keys={self.n_sub_keys} "
                f"({self.n_experts} experts), n_heads={self.n_heads}, top_k={self.top_k}, "
                f"d_key={self.d_key}, activation={self.activation!r}, d_out={self.d_out}, "
                f"per_head_keys={self.per_head_keys})")
