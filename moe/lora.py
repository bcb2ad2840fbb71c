"""Mixtures of LoRA experts over a frozen base linear, on the C grouped engine.

Every layer here computes ``y = x @ W0.T + b0 + sum_slots c * (low-rank term)`` with
``W0 (d_out, d_in)`` frozen (float32, bfloat16 or float16 storage) and the adapters in
float32.  The C core computes the shrink ``z = A x`` only for the routed (token, adapter)
pairs, grouped by adapter, and adds the expand ``B z`` inside the base GEMM's output
tiles: ``W0 + B A`` is never formed and no per-adapter output is written.  A token's
result depends only on its own row (batch composition and thread count change no bits).

Layers (the papers' forward passes; ``s = alpha / rank``):

- :class:`TopKLoRA` (MixLoRA / MoLA): router, softmax, top-k, renormalised;
  ``y = W0 x + s * sum_{j in top-k} g_j B_j A_j x``.
- :class:`SoftLoRA` (MoLoRA / LoRAMoE): every adapter weighted by ``softmax(W_r x)``
  (optionally a top-k mask without renormalisation).
- :class:`GatedLoRA` (X-LoRA): per-token adapter scalings given by the caller.
- :class:`HydraLoRA`: one shared ``A``, heads ``B_e``; soft or top-k routing, ``A x`` once.
- :class:`FlyLoRA`: frozen sparse random ``A``; the top-k ranks of ``|A x|`` are active.
- :class:`SMoRA`: every rank an expert, sigmoid gates with a selection bias.
- :class:`MultiLoRA` (Punica / S-LoRA serving): each token names its adapter.

Weights are nn.Linear / PEFT layout: ``lora_a (E, r, d_in)`` (PEFT's ``lora_A.weight`` per
adapter), ``lora_b (E, d_out, r)`` (``lora_B.weight``).  They are checked and converted when
assigned, and packed for the kernels on the next call; after editing one *in place*, call
``layer.pack()``.  Router weights and biases are read on every call.
"""
from __future__ import annotations

import numpy as np

from . import _C
from ._api import (SCORINGS, WEIGHT_DTYPES, RoutingResult, _shape_str, check_choice,
                   check_finite, check_float, check_int, float_array, int_array,
                   naming_nonfinite, refuse_resize, remember_config, route_args, saveable,
                   stored_weight, weight_bits)
from .train import TrainContext, check_backward_args

__all__ = ["TopKLoRA", "SoftLoRA", "GatedLoRA", "HydraLoRA", "FlyLoRA", "SMoRA", "MultiLoRA",
           "sparse_projection"]

# moe_lora_kind
_ADAPTERS, _SHARED_A, _RANKS = 0, 1, 2


def sparse_projection(rank, d_in, density, seed=0):
    """FlyLoRA's frozen A: (rank, d_in) float32 with round(density * d_in) (at least 1)
    non-zeros per row at random columns, each drawn from N(0, 1/rank^2); seeded.

    density must be in (0, 1].
    """
    rank = check_int(rank, "rank", 1)
    d_in = check_int(d_in, "d_in", 1)
    density = check_float(density, "density")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = np.random.default_rng(seed)
    nnz = max(1, int(round(density * d_in)))
    a = np.zeros((rank, d_in), np.float32)
    for i in range(rank):
        cols = rng.choice(d_in, size=nnz, replace=False)
        a[i, cols] = rng.standard_normal(nnz) / rank
    return a


def _segments_to_ids(seq_lens, n_tokens):
    """seq_lens (n_seq,) positive ints summing to n_tokens -> (n_tokens,) sequence ids."""
    lens = int_array(seq_lens, "seq_lens", low=1, what="[1, inf)")
    if lens.ndim != 1 or int(lens.sum()) != n_tokens:
        raise ValueError(f"seq_lens must be 1-D and sum to n_tokens={n_tokens}, got "
                         f"{_shape_str(lens.shape)} summing to {int(lens.sum())}")
    return np.repeat(np.arange(lens.shape[0]), lens)


class _LoRALayer:
    """Shared machinery: weight attributes, packing, the base linear and the call."""

    # attribute -> shape template (names resolved by _sizes); overridden per layer
    _WEIGHTS: dict = {}
    _KIND = _ADAPTERS

    def _init_common(self, d_in, d_out, rank, alpha, dtype, bias):
        self.d_in = check_int(d_in, "d_in", 1)
        self.d_out = check_int(d_out, "d_out", 1)
        self.rank = check_int(rank, "rank", 1)
        self.alpha = float(self.rank) if alpha is None else check_float(alpha, "alpha", float32=True)
        check_choice(dtype, "dtype", WEIGHT_DTYPES)
        self.dtype = dtype
        self.use_bias = bool(bias)
        object.__setattr__(self, "_packed", None)
        for name in self._all_weights():
            object.__setattr__(self, name, None)

    @property
    def scaling(self):
        """The LoRA scaling s = alpha / rank."""
        return self.alpha / self.rank

    def _all_weights(self):
        return {"base_weight": ("d_out", "d_in"), "base_bias": ("d_out",), **self._WEIGHTS}

    def _sizes(self):
        return {"d_in": self.d_in, "d_out": self.d_out, "rank": self.rank, "one": 1,
                "n_experts": getattr(self, "n_experts", 1),
                "n_router": getattr(self, "n_router", 1)}

    def _init_weights(self, seed, router=True):
        rng = np.random.default_rng(seed)

        def normal(shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

        self.base_weight = normal((self.d_out, self.d_in), self.d_in)
        self.base_bias = np.zeros(self.d_out, np.float32) if self.use_bias else None
        return normal

    def __setattr__(self, name, value):
        refuse_resize(self, name, ("d_in", "d_out", "rank", "dtype", "use_bias", "n_experts",
                                   "n_router", "rank_partition"))
        weights = self._all_weights()
        if name in weights and value is not None:
            sizes = self._sizes()
            shape = tuple((s, sizes[s]) for s in weights[name])
            if name == "base_weight":
                value = stored_weight(value, name, shape, self.dtype)
            else:
                value = float_array(value, name, shape)
        if name in weights and name not in self._READ_EACH_CALL:
            object.__setattr__(self, "_packed", None)
        object.__setattr__(self, name, value)

    _READ_EACH_CALL: tuple = ("router_weight", "rank_bias")

    def __getstate__(self):
        """Pickle / deepcopy without the packed copies (repacked on the next call)."""
        state = dict(self.__dict__, _packed=None)
        state.pop("_base_t", None)
        state.pop("_base_pack", None)
        return state

    # ---- packing ----------------------------------------------------------------------

    def _a_for_pack(self):
        """lora_a as (groups, rank, d_in) float32."""
        return self.lora_a if self.lora_a.ndim == 3 else self.lora_a[None]

    def _bank(self):
        """The expand's columns [B_0 | B_1 | ...] (d_out, n * rank), packed."""
        b = self.lora_b if self.lora_b.ndim == 3 else self.lora_b[None]
        u = np.ascontiguousarray(b.transpose(1, 0, 2)).reshape(self.d_out, -1)
        return _C.pack_linear(u[None], dtype=0)

    _BASE = ("base_weight", "base_bias")

    def pack(self, changed=None):
        """Pack the base weight and the adapters for the kernels now (call after in-place
        edits).  Done automatically on the first call and after a weight is assigned.

        changed: the names of the weights edited in place since the last pack, or None
        (all).  The frozen base's packed copy (and the backward's transposed one) is kept
        unless a base weight is named or was assigned: a training step that moves only the
        adapters repacks only them."""
        for name in self._all_weights():
            if name in ("base_bias",) + self._OPTIONAL:
                continue
            if getattr(self, name) is None:
                raise ValueError(f"{name} is not set (the layer was made with init=False)")
        if self.use_bias and self.base_bias is None:
            raise ValueError("base_bias is None but the layer was built with bias=True")
        isa = _C.build_info()["isa"]
        key = (self.base_weight, self.base_bias, isa)
        kept = self.__dict__.get("_base_pack")
        if changed is None or set(changed) & set(self._BASE) or kept is None or \
                kept[0][0] is not key[0] or kept[0][1] is not key[1] or kept[0][2] != isa:
            kept = None
            self.__dict__.pop("_base_t", None)
        with naming_nonfinite(self.dtype, base_weight=self.base_weight, lora_a=self.lora_a,
                              lora_b=self.lora_b):
            if kept is None:
                kept = (key, _C.pack_linear(
                    weight_bits(self.base_weight)[None], dtype=WEIGHT_DTYPES.index(self.dtype),
                    bias=self.base_bias[None] if self.use_bias else None))
            lora_a = _C.pack_linear(self._a_for_pack(), dtype=0)
            bank = self._bank()
        object.__setattr__(self, "_base_pack", kept)
        object.__setattr__(self, "_packed", (kept[1], lora_a, bank, isa))
        return self

    _OPTIONAL: tuple = ()

    def _packs(self):
        if self._packed is None or self._packed[3] != _C.build_info()["isa"]:
            self.pack(changed=())  # after an assignment: a new base is a new object
        return self._packed[:3]

    # ---- the call ---------------------------------------------------------------------

    def _tokens(self, x):
        x = float_array(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., d_in={self.d_in}), got "
                             f"{_shape_str(x.shape)}")
        return x.shape[:-1], x.reshape(-1, self.d_in)

    def _forward(self, x2, ids, weights, *, n_adapters, adapter_scaling=None, select_k=0,
                 signed=False, rank_bias=None, keep=None):
        base, lora_a, bank = self._packs()
        args = (x2, base, self._KIND, lora_a, bank, n_adapters, ids, weights,
                float(self.scaling))
        out, sel, counts, z = _C.lora_forward(*args, adapter_scaling=adapter_scaling,
                                              select_k=int(select_k),
                                              select_signed=int(bool(signed)),
                                              rank_bias=rank_bias, save_z=keep is not None)
        if keep is not None:
            # the backward's view: FlyLoRA's selected ranks become plain ids; z = A x of
            # the routed slots (O(T k r) floats), so the backward need not recompute it
            keep.update(args=args[:6] + ((sel,) if select_k else (ids,)) + args[7:],
                        kw=dict(adapter_scaling=adapter_scaling), packed=self._packed, z=z)
        return out, sel, counts

    def __call__(self, x, *args, return_routing=False, **kwargs):
        """x: (..., d_in) float (and the layer's per-call inputs, see the class).  Returns
        (..., d_out) float32 [, RoutingResult]."""
        out, lead, routing = self._call(x, *args, **kwargs)
        out = out.reshape(lead + (self.d_out,))
        return (out, routing) if return_routing else out

    # ---- training ---------------------------------------------------------------------

    _TRAINABLE: tuple = ("lora_a", "lora_b")

    def trainable_weights(self):
        """Names of the weights backward returns a gradient for.  The base weight and bias
        are frozen: no gradient is computed for them."""
        return self._TRAINABLE

    def forward_train(self, x, *args, **kwargs):
        """The forward of __call__ (same arguments) keeping what backward needs: returns
        (y, ctx).  ctx (moe.train.TrainContext) holds the input, the routing (ctx.routing)
        and the router's float64 logits: O(T * (d_in + n_experts)); the rank activations
        A x are recomputed by the backward.  The weights must not change before it."""
        keep = {}
        out, lead, routing = self._call(x, *args, keep=keep, **kwargs)
        ctx = TrainContext(self, lead, keep["args"][0], routing, keep, None, None)
        return out.reshape(lead + (self.d_out,)), ctx

    def backward(self, ctx, dy, *, aux_coef=0.0, z_coef=0.0, retain=False):
        """Gradients of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  for the forward
        that made ctx (layer.forward_train), the selection held fixed.

        dy: the output's shape (or (T, d_out)).  Returns a dict of float32 arrays: "x" (the
        input's shape), "scalings" for GatedLoRA (the scalings' shape), and one entry per
        name of trainable_weights() in its weight's shape.  The base weight (any storage
        dtype) is frozen; FlyLoRA's lora_a and the rank biases get none (update rank_bias
        with layer.update_bias).  ctx is used up unless retain=True.  Bitwise the same for
        any thread count; a token's gradients depend on its own row (and, with a router,
        on the batch only through the aux loss).
        """
        dy32, aux, z = check_backward_args(self, ctx, dy, aux_coef, z_coef, self.d_out)
        keep = ctx.saved
        if keep["packed"] is not self._packed:
            raise RuntimeError("the layer's weights changed since forward_train: the "
                               "backward needs the weights the forward ran with")
        train = self.trainable_weights()
        dx, da, db, dw = _C.lora_backward(
            keep["args"], keep["kw"], self._base_transposed(), self.lora_a, self.lora_b, dy32,
            z=keep["z"],
            d_lora_a="lora_a" in train, d_weights=self._GATE_GRAD)
        grads = {"lora_a": da, "lora_b": db}
        if self._GATE_GRAD:
            self._gate_backward(ctx, dw, dx, grads, aux, z)
        if not retain:
            ctx.released = True
        out = {"x": dx.reshape(ctx.lead + (self.d_in,))}
        if "scalings" in grads:
            out["scalings"] = grads["scalings"]
        out.update((name, grads[name]) for name in train)
        return out

    _GATE_GRAD = False  # whether the slots' gate weights take a gradient

    def _base_transposed(self):
        """The frozen base's transpose packed as a linear (d_in outputs) for the backward's
        dx; packed on first use and kept until base_weight is assigned."""
        cached = self.__dict__.get("_base_t")
        if cached is None or cached[0] is not self.base_weight or \
                cached[2] != _C.build_info()["isa"]:
            wt = np.ascontiguousarray(weight_bits(self.base_weight).T)
            cached = (self.base_weight, _C.pack_linear(wt[None], dtype=WEIGHT_DTYPES.index(
                self.dtype)), _C.build_info()["isa"])
            object.__setattr__(self, "_base_t", cached)
        return cached[1]

    def config(self):
        """The constructor arguments of this layer (JSON-friendly), without weights or seed."""
        return dict(self._init_config)

    def save(self, path):
        """Write the layer to one safetensors file; moe.load(path) gives it back bit for bit."""
        from .io import save
        save(self, path)

    def _weight_names(self):
        return tuple(self._all_weights())

    def base_forward(self, x):
        """The frozen base alone: x @ base_weight.T + base_bias (the same packed GEMM)."""
        lead, x2 = self._tokens(x)
        base = self._packs()[0]
        offsets = np.array([0, x2.shape[0]], np.int64)
        out = _C.linear_grouped(x2, token_index=None, offsets=offsets, weights=base)
        return out.reshape(lead + (self.d_out,))

    def flops(self, n_tokens):
        """Multiply-add FLOPs (x2) of the base GEMM alone over n_tokens."""
        return 2 * n_tokens * self.d_in * self.d_out


class _RoutedLoRA(_LoRALayer):
    """Layers with a router W_r (n_experts, d_in): per-token or per-sequence gates."""

    def _logits(self, x2, seq_lens):
        """(T, E) float64 router logits; per sequence: of the sequence's mean token."""
        if not self.per_sequence:
            return _C.router_logits(x2, router_weight=self.router_weight), None
        if seq_lens is None:
            raise ValueError("per_sequence=True needs seq_lens (or x of shape "
                             "(batch, seq, d_in))")
        seq = _segments_to_ids(seq_lens, x2.shape[0])
        n_seq = int(seq.max()) + 1 if seq.size else 0
        means = np.zeros((n_seq, self.d_in), np.float64)
        np.add.at(means, seq, x2)
        means /= np.bincount(seq, minlength=n_seq)[:, None]
        return _C.router_logits(means.astype(np.float32), router_weight=self.router_weight), seq

    _TRAINABLE = ("router_weight", "lora_a", "lora_b")
    _GATE_GRAD = True

    def _gate_backward(self, ctx, dw, dx, grads, aux, z):
        """The router's part: d gate weights -> d logits (with the losses) -> dx, dW_r."""
        rargs, rkw, ids, seq, w_r = ctx.saved["route"]
        if w_r is not self.router_weight:
            raise RuntimeError("router_weight was reassigned since forward_train")
        x2 = ctx.x
        if seq is not None:  # a sequence's gate serves all its tokens
            dws = np.zeros((ids.shape[0], dw.shape[1]), np.float64)
            np.add.at(dws, seq, dw)
            dw = dws.astype(np.float32)
            n = np.bincount(seq, minlength=ids.shape[0])
            means = np.zeros((ids.shape[0], self.d_in), np.float64)
            np.add.at(means, seq, x2)
            x2 = (means / n[:, None]).astype(np.float32)
        d_logits = _C.route_backward(rargs, rkw, ids, np.ascontiguousarray(dw),
                                     aux_coef=aux, z_coef=z)
        d_src, grads["router_weight"] = _C.router_backward(x2, w_r, d_logits)
        if seq is not None:
            d_src = d_src / n[:, None].astype(np.float32)
            d_src = d_src[seq]
        dx += d_src

    def _route(self, x, seq_lens, top_k, scoring, renormalize, keep=None):
        """Route tokens (or sequences, broadcast to their tokens) -> (lead, x2, routing)."""
        lead, x2 = self._tokens(x)
        self._packs()  # every weight is set (and packed) before the router runs
        if self.per_sequence and seq_lens is None and len(lead) == 2:
            seq_lens = np.full(lead[0], lead[1], np.int64)
        logits, seq = self._logits(x2, seq_lens)
        rargs, rkw = route_args(logits, top_k, scoring=scoring, renormalize=renormalize)
        ids, w, counts, n_dropped, aux, z = _C.route(*rargs, **rkw)
        if keep is not None:
            keep["route"] = (rargs, rkw, ids, seq, self.router_weight)
        if seq is not None:
            ids, w = ids[seq], w[seq]
            counts = np.bincount(ids.ravel(), minlength=self.n_experts).astype(np.int64)
        return lead, x2, RoutingResult(np.ascontiguousarray(ids), np.ascontiguousarray(w),
                                       counts, int(n_dropped), float(aux), float(z))


@saveable
class TopKLoRA(_RoutedLoRA):
    """Sparse top-k mixture of LoRA experts (MixLoRA / MoLA):
    ``y = x W0^T + b0 + s * sum_{j in top-k} g_j B_j A_j x``, s = alpha / rank.

    Parameters: d_in, d_out, n_experts, rank, top_k; alpha (default rank: s = 1);
    scoring "softmax" | "softmax-after-topk" | "sigmoid" and renormalize as in moe.route;
    per_sequence=True takes one gate per sequence from its mean token (pass seq_lens, or x
    of shape (batch, seq, d_in)); bias=True gives the base a bias; dtype of base_weight:
    "float32" | "bfloat16" | "float16".  init=False leaves the weights None.

    Weights: base_weight (d_out, d_in), base_bias (d_out,), router_weight (E, d_in),
    lora_a (E, r, d_in), lora_b (E, d_out, r).  Initialised like PEFT: lora_b zeros.
    """

    _WEIGHTS = {"router_weight": ("n_experts", "d_in"), "lora_a": ("n_experts", "rank", "d_in"),
                "lora_b": ("n_experts", "d_out", "rank")}

    @remember_config
    def __init__(self, d_in, d_out, n_experts, rank, top_k=2, *, alpha=None,
                 scoring="softmax", renormalize=True, per_sequence=False, bias=False,
                 dtype="float32", seed=0, init=True):
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self._init_common(d_in, d_out, rank, alpha, dtype, bias)
        self.top_k = check_int(top_k, "top_k", 1, self.n_experts)
        check_choice(scoring, "scoring", SCORINGS)
        self.scoring, self.renormalize = scoring, bool(renormalize)
        self.per_sequence = bool(per_sequence)
        if init:
            normal = self._init_weights(seed)
            self.router_weight = normal((self.n_experts, self.d_in), self.d_in)
            self.lora_a = normal((self.n_experts, self.rank, self.d_in), self.d_in)
            self.lora_b = np.zeros((self.n_experts, self.d_out, self.rank), np.float32)

    def _call(self, x, *, seq_lens=None, keep=None):
        lead, x2, r = self._route(x, seq_lens, self.top_k, self.scoring, self.renormalize,
                                  keep)
        out, _, _ = self._forward(x2, r.expert_ids, r.weights, n_adapters=self.n_experts,
                                  keep=keep)
        return out, lead, r

    def flops(self, n_tokens):
        lora = 2 * n_tokens * self.top_k * self.rank * (self.d_in + self.d_out)
        return super().flops(n_tokens) + lora + 2 * n_tokens * self.n_experts * self.d_in


@saveable
class SoftLoRA(TopKLoRA):
    """Dense soft mixture of LoRA experts (MoLoRA / LoRAMoE):
    ``y = x W0^T + b0 + s * sum_e softmax(W_r x)_e B_e A_e x`` over all experts.

    top_k=None (default) uses every expert; an int keeps the top_k probabilities without
    renormalising them (MoLoRA's optional mask).  per_sequence as in TopKLoRA.  Weights as
    in TopKLoRA.
    """

    @remember_config
    def __init__(self, d_in, d_out, n_experts, rank, top_k=None, *, alpha=None,
                 per_sequence=False, bias=False, dtype="float32", seed=0, init=True):
        super().__init__(d_in, d_out, n_experts, rank, n_experts if top_k is None else top_k,
                         alpha=alpha, scoring="softmax", renormalize=False,
                         per_sequence=per_sequence, bias=bias, dtype=dtype, seed=seed,
                         init=init)


@saveable
class HydraLoRA(_RoutedLoRA):
    """HydraLoRA: one shared A (r, d_in), n_experts heads B_e (d_out, r), a router:
    ``y = x W0^T + b0 + s * sum_e g_e B_e (A x)``, with A x computed once per token.

    top_k=None: dense softmax over all heads (HydraLoRA's default); top_k=k: softmax, top-k,
    renormalised when renormalize (k=1 is MLLM-HydraLoRA's hard routing, gate 1).
    Weights: base_weight, base_bias, router_weight (E, d_in), lora_a (r, d_in),
    lora_b (E, d_out, r).
    """

    _KIND = _SHARED_A
    _WEIGHTS = {"router_weight": ("n_experts", "d_in"), "lora_a": ("rank", "d_in"),
                "lora_b": ("n_experts", "d_out", "rank")}

    @remember_config
    def __init__(self, d_in, d_out, n_experts, rank, top_k=None, *, alpha=None,
                 renormalize=True, per_sequence=False, bias=False, dtype="float32", seed=0,
                 init=True):
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self._init_common(d_in, d_out, rank, alpha, dtype, bias)
        self.top_k = None if top_k is None else check_int(top_k, "top_k", 1, self.n_experts)
        self.renormalize = bool(renormalize) and top_k is not None
        self.per_sequence = bool(per_sequence)
        if init:
            normal = self._init_weights(seed)
            self.router_weight = normal((self.n_experts, self.d_in), self.d_in)
            self.lora_a = normal((self.rank, self.d_in), self.d_in)
            self.lora_b = np.zeros((self.n_experts, self.d_out, self.rank), np.float32)

    def _call(self, x, *, seq_lens=None, keep=None):
        k = self.n_experts if self.top_k is None else self.top_k
        lead, x2, r = self._route(x, seq_lens, k, "softmax", self.renormalize, keep)
        out, _, _ = self._forward(x2, r.expert_ids, r.weights, n_adapters=self.n_experts,
                                  keep=keep)
        return out, lead, r


@saveable
class GatedLoRA(_LoRALayer):
    """Externally gated LoRA mixture (X-LoRA): the caller passes per-token scalings.

    ``y = x W0^T + b0 + s * sum_e c_e B_e A_e x`` with c = scalings (T, E).  X-LoRA applies
    the scaling to the input of A; for a linear adapter that is the same function.
    top_k=None uses every adapter; top_k=k keeps the k largest scalings per token (ties to
    the lower index) and, with softmax_topk=True, replaces them by their softmax (X-LoRA's
    enable_softmax_topk).  Weights: base_weight, base_bias, lora_a (E, r, d_in),
    lora_b (E, d_out, r).
    """

    _WEIGHTS = {"lora_a": ("n_experts", "rank", "d_in"), "lora_b": ("n_experts", "d_out", "rank")}

    @remember_config
    def __init__(self, d_in, d_out, n_experts, rank, *, top_k=None, softmax_topk=False,
                 alpha=None, bias=False, dtype="float32", seed=0, init=True):
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self._init_common(d_in, d_out, rank, alpha, dtype, bias)
        self.top_k = None if top_k is None else check_int(top_k, "top_k", 1, self.n_experts)
        self.softmax_topk = bool(softmax_topk)
        if init:
            normal = self._init_weights(seed)
            self.lora_a = normal((self.n_experts, self.rank, self.d_in), self.d_in)
            self.lora_b = np.zeros((self.n_experts, self.d_out, self.rank), np.float32)

    def __call__(self, x, scalings, *, return_routing=False):
        """x: (..., d_in); scalings: (..., n_experts) float, finite.  Returns (..., d_out)
        float32 [, RoutingResult (aux and z losses 0: there is no router)]."""
        return super().__call__(x, scalings, return_routing=return_routing)

    _GATE_GRAD = True

    def _gate_backward(self, ctx, dw, dx, grads, aux, z):
        """d gate weights -> d scalings: through the softmax of the kept ones (softmax_topk)
        and scattered back to the picked columns."""
        order, w, shape = ctx.saved["gate"]
        dw = dw.astype(np.float64)
        if self.softmax_topk and order is not None:
            w64 = w.astype(np.float64)
            dw = w64 * (dw - (dw * w64).sum(axis=1, keepdims=True))
        if order is None:
            dc = dw
        else:
            dc = np.zeros((dw.shape[0], self.n_experts), np.float64)
            np.put_along_axis(dc, order, dw, axis=1)
        grads["scalings"] = dc.astype(np.float32).reshape(shape)

    def _call(self, x, scalings, *, keep=None):
        lead, x2 = self._tokens(x)
        c = float_array(scalings, "scalings", tuple((f"dim{i}", n) for i, n in enumerate(lead))
                        + (("n_experts", self.n_experts),)).reshape(-1, self.n_experts)
        check_finite(c, "scalings")
        T, E = c.shape
        if self.top_k is None:
            ids = np.broadcast_to(np.arange(E, dtype=np.int32), (T, E)).copy()
            w = c.copy()
        else:
            # top-k of the scalings, ties to the lower index (a stable sort of -c)
            order = np.argsort(-c.astype(np.float64), axis=1, kind="stable")[:, :self.top_k]
            ids = order.astype(np.int32)
            w = np.take_along_axis(c, order, axis=1)
            if self.softmax_topk:
                w64 = w.astype(np.float64)
                w64 = np.exp(w64 - w64.max(axis=1, keepdims=True))
                w = (w64 / w64.sum(axis=1, keepdims=True)).astype(np.float32)
        w = np.ascontiguousarray(w, np.float32)
        out, _, counts = self._forward(x2, ids, w, n_adapters=self.n_experts, keep=keep)
        if keep is not None:
            keep["gate"] = (None if self.top_k is None else order, w, np.shape(scalings))
        return out, lead, RoutingResult(ids, w, counts, 0, 0.0, 0.0)


@saveable
class FlyLoRA(_LoRALayer):
    """FlyLoRA: A is a frozen sparse random projection; the rank activations z = A x route
    themselves.  ``y = x W0^T + b0 + s * B (mask * z)``, mask = the top_k ranks of
    |z| + rank_bias (signed=True: z + rank_bias), ties to the lower rank.  No router weights.

    The authors' two versions differ, and both are here:
    - selection: signed=False (default, the minimal ``flylora.py``: |z|) or signed=True
      (their PEFT fork: z, no abs);
    - balancing: rank_bias (r,) is selection-only.  bias_rate > 0 with
      update_bias="every-forward" applies ``rank_bias += bias_rate * sign(mean(c) - c)``
      (c = the counts of selected ranks) after every call, as the PEFT fork does (it has no
      training guard); update_bias="manual" (default, the minimal version's training-step
      update) leaves it to layer.update_bias(counts).
    density (default top_k / rank): non-zeros per row of A as a fraction of d_in; A is drawn
    by sparse_projection(rank, d_in, density, seed) and frozen.  alpha defaults to 2 * rank
    (FlyLoRA's default).  Weights: base_weight, base_bias, lora_a (r, d_in) (frozen, but
    assignable), lora_b (d_out, r), rank_bias (r,).
    """

    _KIND = _RANKS
    _WEIGHTS = {"lora_a": ("rank", "d_in"), "lora_b": ("d_out", "rank"), "rank_bias": ("rank",)}
    _OPTIONAL = ("rank_bias",)

    @remember_config
    def __init__(self, d_in, d_out, rank, top_k, *, alpha=None, density=None, signed=False,
                 bias_rate=0.0, update_bias="manual", bias=False, dtype="float32", seed=0,
                 init=True):
        self._init_common(d_in, d_out, rank, 2.0 * check_int(rank, "rank", 1)
                          if alpha is None else alpha, dtype, bias)
        self.top_k = check_int(top_k, "top_k", 1, self.rank)
        self.density = self.top_k / self.rank if density is None else check_float(
            density, "density")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        self.signed = bool(signed)
        self.bias_rate = check_float(bias_rate, "bias_rate")
        check_choice(update_bias, "update_bias", ("manual", "every-forward"))
        self.update_bias_mode = update_bias
        self.rank_bias = np.zeros(self.rank, np.float32)
        if init:
            self._init_weights(seed)
            self.lora_a = sparse_projection(self.rank, self.d_in, self.density, seed)
            self.lora_b = np.zeros((self.d_out, self.rank), np.float32)

    def update_bias(self, counts, rate=None):
        """rank_bias += rate * sign(mean(counts) - counts) (rate defaults to bias_rate)."""
        from ._api import update_expert_bias
        update_expert_bias(self.rank_bias, counts, self.bias_rate if rate is None else rate)
        return self.rank_bias

    def __call__(self, x, *, return_routing=False):
        """x: (..., d_in) float.  Returns (..., d_out) float32 [, RoutingResult: the
        selected ranks as expert_ids, weights 1, counts per rank]."""
        return super().__call__(x, return_routing=return_routing)

    _TRAINABLE = ("lora_b",)  # A is frozen: dx still flows through z = A x

    def _call(self, x, *, keep=None):
        lead, x2 = self._tokens(x)
        if self.rank_bias is not None:
            check_finite(self.rank_bias, "rank_bias")
        out, sel, counts = self._forward(x2, None, None, n_adapters=1, select_k=self.top_k,
                                         signed=self.signed, rank_bias=self.rank_bias,
                                         keep=keep)
        if self.update_bias_mode == "every-forward" and self.bias_rate != 0.0:
            self.update_bias(counts)
        routing = RoutingResult(sel, np.ones(sel.shape, np.float32), counts, 0, 0.0, 0.0)
        return out, lead, routing


@saveable
class SMoRA(_LoRALayer):
    """SMoRA ("Each Rank Could be an Expert"): one LoRA whose ranks are the experts.

    gates = sigmoid(W_r x) (W_r: (rank / rank_partition, d_in)), each gate shared by
    rank_partition consecutive ranks (tile=True: the gate vector repeated whole instead);
    the top_k ranks of gates + rank_bias are active (selection only), with weights
    g_j / sum(g_kept) * top_k; ``y = x W0^T + b0 + s * sum_{j in S} g_j B[:, j] (A[j] . x)``,
    s = alpha / top_k (SMoRA's scaling; alpha defaults to top_k).  rank_bias is updated by
    layer.update_bias(counts, rate) (aux-loss-free, rate 1e-5 in the paper's code).
    Weights: base_weight, base_bias, router_weight (rank / rank_partition, d_in),
    lora_a (r, d_in), lora_b (d_out, r), rank_bias (r,).
    """

    _KIND = _RANKS
    _WEIGHTS = {"router_weight": ("n_router", "d_in"), "lora_a": ("rank", "d_in"),
                "lora_b": ("d_out", "rank"), "rank_bias": ("rank",)}
    _OPTIONAL = ("rank_bias",)

    @remember_config
    def __init__(self, d_in, d_out, rank, top_k, *, rank_partition=1, tile=False, alpha=None,
                 bias=False, dtype="float32", seed=0, init=True):
        rank = check_int(rank, "rank", 1)
        self.rank_partition = check_int(rank_partition, "rank_partition", 1)
        if rank % self.rank_partition:
            raise ValueError(f"rank_partition must divide rank={rank}, got {rank_partition}")
        self.n_router = rank // self.rank_partition
        self.top_k = check_int(top_k, "top_k", 1, rank)
        self._init_common(d_in, d_out, rank, float(self.top_k) if alpha is None else alpha,
                          dtype, bias)
        self.tile = bool(tile)
        self.rank_bias = np.zeros(self.rank, np.float32)
        if init:
            normal = self._init_weights(seed)
            self.router_weight = normal((self.n_router, self.d_in), self.d_in)
            self.lora_a = normal((self.rank, self.d_in), self.d_in)
            self.lora_b = np.zeros((self.d_out, self.rank), np.float32)

    @property
    def scaling(self):
        """SMoRA's scaling alpha / top_k."""
        return self.alpha / self.top_k

    def update_bias(self, counts, rate=1e-5):
        """rank_bias += rate * sign(mean(counts) - counts)."""
        from ._api import update_expert_bias
        return update_expert_bias(self.rank_bias, counts, rate)

    def __call__(self, x, *, return_routing=False):
        """x: (..., d_in) float.  Returns (..., d_out) float32 [, RoutingResult: the active
        ranks as expert_ids, their weights, counts per rank]."""
        return super().__call__(x, return_routing=return_routing)

    _TRAINABLE = ("router_weight", "lora_a", "lora_b")
    _GATE_GRAD = True

    def _gate_backward(self, ctx, dw, dx, grads, aux, z):
        """d gate weights -> d (rank-expanded) logits -> the router's columns -> dx, dW_r."""
        rargs, rkw, ids, w_r = ctx.saved["route"]
        if w_r is not self.router_weight:
            raise RuntimeError("router_weight was reassigned since forward_train")
        d = _C.route_backward(rargs, rkw, ids, np.ascontiguousarray(dw), aux_coef=aux,
                              z_coef=z)
        T, P = d.shape[0], self.rank_partition
        d = d.reshape(T, P, self.n_router).sum(axis=1) if self.tile else \
            d.reshape(T, self.n_router, P).sum(axis=2)
        d_src, grads["router_weight"] = _C.router_backward(ctx.x, w_r, d)
        dx += d_src

    def _call(self, x, *, keep=None):
        lead, x2 = self._tokens(x)
        self._packs()
        logits = _C.router_logits(x2, router_weight=self.router_weight)
        logits = np.tile(logits, (1, self.rank_partition)) if self.tile else \
            np.repeat(logits, self.rank_partition, axis=1)
        bias = None
        if self.rank_bias is not None:
            check_finite(self.rank_bias, "rank_bias")
            bias = self.rank_bias
        rargs, rkw = route_args(np.ascontiguousarray(logits), self.top_k, scoring="sigmoid",
                                renormalize=True, routed_scaling=float(self.top_k),
                                expert_bias=bias)
        ids, w, counts, _, aux, z = _C.route(*rargs, **rkw)
        if keep is not None:
            keep["route"] = (rargs, rkw, ids, self.router_weight)
        out, _, _ = self._forward(x2, ids, w, n_adapters=1, keep=keep)
        return out, lead, RoutingResult(ids, w, counts, 0, float(aux), float(z))


@saveable
class MultiLoRA(_LoRALayer):
    """Multi-adapter batches (Punica / S-LoRA serving): each token names its adapter.

    ``y_t = x_t W0^T + b0 + s_a B_a A_a x_t`` with a = adapter_ids[t] (-1: base only);
    one grouped shrink and one fused expand serve every adapter in the batch.  Adapters of
    smaller rank are zero-padded to `rank` (set_adapter does it).  scalings (n_adapters,):
    per-adapter alpha / r_a (default alpha / rank for all).
    Weights: base_weight, base_bias, lora_a (N, r, d_in), lora_b (N, d_out, r), scalings (N,).
    """

    _WEIGHTS = {"lora_a": ("n_experts", "rank", "d_in"), "lora_b": ("n_experts", "d_out", "rank"),
                "scalings": ("n_experts",)}
    _OPTIONAL = ("scalings",)
    _READ_EACH_CALL = ("scalings",)

    @remember_config
    def __init__(self, d_in, d_out, n_adapters, rank, *, alpha=None, bias=False,
                 dtype="float32", seed=0, init=True):
        self.n_experts = check_int(n_adapters, "n_adapters", 1, 2**31 - 1)
        self._init_common(d_in, d_out, rank, alpha, dtype, bias)
        self.scalings = np.full(self.n_experts, self.scaling, np.float32)
        if init:
            normal = self._init_weights(seed)
            self.lora_a = normal((self.n_experts, self.rank, self.d_in), self.d_in)
            self.lora_b = np.zeros((self.n_experts, self.d_out, self.rank), np.float32)

    @property
    def n_adapters(self):
        return self.n_experts

    def set_adapter(self, i, lora_a, lora_b, alpha=None):
        """Install adapter i: lora_a (r_i, d_in), lora_b (d_out, r_i) with r_i <= rank
        (zero-padded), scaling alpha / r_i (alpha defaults to r_i)."""
        i = check_int(i, "adapter index", 0, self.n_experts - 1)
        a = float_array(lora_a, "lora_a", (("r_i", None), ("d_in", self.d_in)))
        r_i = a.shape[0]
        if not 1 <= r_i <= self.rank:
            raise ValueError(f"lora_a must have 1..rank={self.rank} rows, got {r_i}")
        b = float_array(lora_b, "lora_b", (("d_out", self.d_out), ("r_i", r_i)))
        la, lb, sc = self.lora_a.copy(), self.lora_b.copy(), self.scalings.copy()
        la[i] = 0.0
        la[i, :r_i] = a
        lb[i] = 0.0
        lb[i, :, :r_i] = b
        sc[i] = (r_i if alpha is None else check_float(alpha, "alpha", float32=True)) / r_i
        self.lora_a, self.lora_b, self.scalings = la, lb, sc

    def __call__(self, x, adapter_ids, *, return_routing=False):
        """x: (..., d_in); adapter_ids: (...) ints in [-1, n_adapters) per token, or a
        scalar for the whole batch.  Returns (..., d_out) float32 [, RoutingResult]."""
        return super().__call__(x, adapter_ids, return_routing=return_routing)

    def _call(self, x, adapter_ids, *, keep=None):
        lead, x2 = self._tokens(x)
        a = np.asarray(adapter_ids)
        if a.ndim == 0:
            a = np.full(lead, int(a), np.int64)
        ids = int_array(a, "adapter_ids", tuple((f"dim{i}", n) for i, n in enumerate(lead)),
                        np.int32, -1, self.n_experts,
                        f"[-1, n_adapters={self.n_experts})").reshape(-1, 1)
        scalings = float_array(self.scalings, "scalings", (("n_adapters", self.n_experts),))
        check_finite(scalings, "scalings")
        out, _, counts = self._forward(x2, np.ascontiguousarray(ids), None,
                                       n_adapters=self.n_experts, adapter_scaling=scalings,
                                       keep=keep)
        w = (ids >= 0).astype(np.float32)
        return out, lead, RoutingResult(ids, w, counts, 0, 0.0, 0.0)
