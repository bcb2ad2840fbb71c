"""moe.SparseMoE: a whole sparse Mixture-of-Experts layer on NumPy arrays.

The layer owns its weights as float32 NumPy attributes (nn.Linear layout) and runs
router -> top-k -> dispatch -> grouped expert FFN -> combine (+ shared experts) in one
call into the C core.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _C
from ._api import (ACTIVATIONS, GATED, WEIGHT_DTYPES, RoutingResult, _as_ndarray, _shape_str,
                   check_choice, check_finite, check_float, check_int, check_routing_options,
                   float_array, mask_args, naming_nonfinite, refuse_resize,
                   require_ffn_weights, saveable, stored_weight, token_rows, weight_bits)
from .quant import QUANT_DTYPES, check_group_size, pack_weight_args, quantized_weight
from .train import TrainContext, check_backward_args

# attribute -> shape template; names are resolved against the layer's sizes
_WEIGHTS = {
    "router_weight": ("n_router", "d_model"),
    "w_gate": ("n_experts", "d_ff", "d_model"),
    "w_up": ("n_experts", "d_ff", "d_model"),
    "w_down": ("n_experts", "d_model", "d_ff"),
    "expert_bias": ("n_router",),
    "shared_w_gate": ("shared_hidden", "d_model"),
    "shared_w_up": ("shared_hidden", "d_model"),
    "shared_w_down": ("d_model", "shared_hidden"),
    "shared_gate_weight": ("one", "d_model"),
    "router_bias": ("n_router",),
    "b_gate": ("n_experts", "d_ff"),
    "b_up": ("n_experts", "d_ff"),
    "b_down": ("n_experts", "d_model"),
    # LoRA adapters on the expert weights (lora_rank > 0), PEFT layout per expert
    "lora_a_gate": ("n_experts", "lora_rank", "d_model"),
    "lora_b_gate": ("n_experts", "d_ff", "lora_rank"),
    "lora_a_up": ("n_experts", "lora_rank", "d_model"),
    "lora_b_up": ("n_experts", "d_ff", "lora_rank"),
    "lora_a_down": ("n_experts", "lora_rank", "d_ff"),
    "lora_b_down": ("n_experts", "d_model", "lora_rank"),
    "null_values": ("n_null", "d_model"),  # the constants of "constant" null experts
}
# the weights a backward returns gradients for (expert_bias moves the selection only)
_TRAINABLE = ("router_weight", "router_bias", "w_gate", "w_up", "w_down", "b_gate", "b_up",
              "b_down", "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate_weight",
              "null_values")
# frozen by expert LoRA (lora_rank > 0): the experts, routed and shared
_FROZEN_BY_LORA = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down", "shared_w_gate",
                   "shared_w_up", "shared_w_down")
NULL_KINDS = _C.NULL_KINDS
ROUTERS = _C.ROUTERS
ROUTER_GRADS = _C.ROUTER_GRADS


class NullRoutingResult(NamedTuple):
    """RoutingResult of a layer with null experts: ids >= n_experts are null experts
    (id n_experts + i is null_experts[i]); counts cover all n_experts + n_null; n_real (T,)
    int32 is the number of real (dispatched) experts each token kept."""

    expert_ids: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    n_dropped: int
    aux_loss: float
    z_loss: float
    n_real: np.ndarray
# the routed experts' weights: what expert LoRA can target, and what the layer may keep
# as strided views
_ROUTED = LORA_TARGETS = ("w_gate", "w_up", "w_down")
_LORA_WEIGHTS = tuple(f"lora_{ab}_{t[2:]}" for t in LORA_TARGETS for ab in "ab")
# the FFN weights, stored in the layer's dtype and packed for the kernels
_EXPERT_WEIGHTS = _ROUTED + ("shared_w_gate", "shared_w_up", "shared_w_down")
# read-only after __init__: the weights' shapes and storage follow from them
_FIXED = ("d_model", "d_ff", "expert_d_ff", "n_experts", "null_experts", "n_null",
          "n_shared_experts", "shared_d_ff", "shared_expert_gate", "use_expert_bias",
          "use_router_bias", "use_expert_biases", "dtype", "compute_dtype", "lora_rank",
          "lora_targets", "group_size", "shared_dtype")


@saveable
class SparseMoE:
    """A sparse MoE layer: y = sum_{e in top-k(x)} g_e(x) FFN_e(x) [+ shared experts].

    Parameters: d_model, d_ff (per routed expert), n_experts, top_k; activation in
    "swiglu" | "geglu" | "geglu-tanh" | "gelu" | "gelu-tanh" | "relu" | "silu";
    routing options as in moe.route (scoring, renormalize, routed_scaling, n_groups,
    topk_groups, capacity_factor, and expert_bias=True for a selection-only bias);
    n_shared_experts shared experts of width shared_d_ff (default d_ff) on every token,
    optionally scaled by sigmoid(x @ shared_gate_weight.T) when shared_expert_gate=True
    (Qwen2-MoE).  router_bias=True adds a bias (E,) to the router logits and
    expert_biases=True biases b_gate, b_up (E, F) and b_down (E, d) to the experts;
    activation "swiglu-oai" is gpt-oss's clamped SwiGLU with swiglu_alpha / swiglu_limit
    (both as in gpt-oss).  d_ff may be a sequence of n_experts sizes (heterogeneous
    experts): the weights keep the largest size, each expert uses its first d_ff[e] hidden
    units (rows past it are ignored), and the kernels skip the rest.  seed: weights are drawn from a seeded normal distribution; init=False
    leaves them None, to be assigned (as moe.load and moe.from_hf do).

    LoRA on the experts (how MoE models are fine-tuned): lora_rank=r > 0 gives every routed
    expert its own adapters on lora_targets (any of "w_gate", "w_up", "w_down"; default all
    the activation has), applied to
    the routed rows only: g = W_gate,e x + s B A x (likewise up), y = W_down,e h + s B A h,
    s = lora_alpha / r (lora_alpha defaults to r).  Weights lora_a_<t> (E, r, in) and
    lora_b_<t> (E, out, r) per target (PEFT layout; B starts at zero).  The shrinks run on the
    FFN's packed activations and the expands are fused into its output tiles.

    Null experts (MoE++): null_experts=("zero", "copy", "constant", ...) adds that many
    router outputs after the real experts (router_weight, expert_bias and router_bias then
    have n_experts + n_null rows).  They compete in top-k like any expert but are never
    dispatched: "zero" adds nothing, "copy" adds w * x, "constant" adds w * v with v its row
    of null_values (n_null, d_model).  return_routing=True then gives a NullRoutingResult
    with n_real, the real experts each token kept (compute saved = top_k - n_real).

    router: "top_k" (token choice, the default), "expert_choice" (each expert takes its
    top ceil(capacity_factor * T / E) tokens, capacity_factor defaulting to 1.0; a token gets
    0..E experts and its output depends on the batch), "top_p" (the fewest experts whose
    probabilities reach router_p) or "threshold" (every expert with probability >=
    router_threshold), the dynamic ones clamped to [k_min, top_k] and renormalised when
    renormalize.  routed_scaling multiplies the weights of every router.
    router_grad (top-k router, backward only): "default" passes gradients through the
    selected weights and the losses, as every peer; "straight-through" also through the
    selection -- the top-k mask takes the derivative of the scores it was cut from (softmax
    over all experts, or sigmoid), with the unselected experts' outputs taken as 0 (they
    were never computed), so every expert's logit gets a gradient.
    skip_threshold > 0: dynamic expert skipping after any router -- slots whose weight is
    below it are emptied (their count goes into n_dropped); with skip_renormalize each
    token's kept weights are divided by their sum.  The losses of
    the non-top-k routers are computed from the same float64 logits (z-loss, and the
    aux loss over the assignments they made).

    dtype: storage of the expert FFN weights: "float32", "bfloat16" (NumPy has no
    bfloat16: stored as uint16 bits; torch / ml_dtypes bfloat16 arrays are accepted and
    float arrays are rounded to nearest even) or "float16".  Compute is float32 with float32
    accumulation either way; bfloat16 halves the memory the kernels stream.
    compute_dtype="bfloat16" (with dtype="bfloat16" and even d_model / d_ff): the expert
    FFNs also round their inputs -- the routed rows and the hidden activations -- to bfloat16
    (nearest even) and multiply bf16 pairs with float32 accumulation: AMX tiles on Xeons with
    AMX-BF16, VDPBF16PS on AMD CPUs with AVX512-BF16 (about twice the fp32 FMA rate), two
    exact FMAs per pair elsewhere (no faster than float32 there); moe.show_config() says
    which.  Routing, combine and the output stay float32.
    compute_dtype="int8" (with quantized weights, dtype "int8" / "int4" / "mxfp4"): the
    expert FFNs quantize their inputs -- the routed rows and the hidden activations -- to
    int8, symmetric, one float32 scale per row and block (the weights' group, cut in blocks
    of at most 256), and multiply integers with exact int32 sums per block (VPDPBUSD on
    AVX512-VNNI CPUs; VPMADDUBSW on AVX2 for the 4-bit formats; portable C elsewhere),
    then one float32 FMA per block with the two scales.  The activations' rounding makes it
    approximate (moe.reference.ffn(..., compute_dtype="int8") computes the same
    quantization); it is what llama.cpp does for its quantized formats, and much faster for
    decode.  Shared experts stored as float keep float32 compute.

    Weights (writable, nn.Linear layout [out, in]):
      router_weight (E, d); w_gate, w_up (E, F, d); w_down (E, d, F); expert_bias (E,) or
      None; shared_w_gate, shared_w_up (S*Fs, d); shared_w_down (d, S*Fs);
      shared_gate_weight (1, d) or None.  The FFN weights are in `dtype`, the rest float32.
    Assigning an array checks its shape and stores it C-contiguous (without a copy when it
    already is; w_gate, w_up and w_down also as any view with positive strides that is in
    the layer's dtype, e.g. the halves of a fused (E, 2F, d) gate_up array: the core reads
    them through their strides), and the next call repacks the experts.  The kernels run on a packed copy of
    the FFN weights: after editing them *in place*, call layer.pack() (router_weight,
    expert_bias and shared_gate_weight are read on every call, edits to them need nothing).
    """

    # training: forward_train's default (True: the backward recomputes the gate / up
    # pre-activations; False: the forward keeps them, more memory, a faster backward).  A
    # plain attribute, not saved with the layer.
    recompute_hidden = True

    def __init__(self, d_model, d_ff, n_experts, top_k, *, activation="swiglu",
                 scoring="softmax", renormalize=True, routed_scaling=1.0, n_groups=1,
                 topk_groups=1, expert_bias=False, n_shared_experts=0, shared_d_ff=None,
                 shared_expert_gate=False, capacity_factor=None, dtype="float32", seed=0,
                 init=True, router_bias=False, expert_biases=False, swiglu_alpha=1.702,
                 swiglu_limit=7.0, lora_rank=0, lora_alpha=None, lora_targets=None,
                 null_experts=(), router="top_k", router_p=0.5, router_threshold=0.01,
                 k_min=1, skip_threshold=0.0, skip_renormalize=False,
                 compute_dtype="float32", router_grad="default", group_size=None,
                 shared_dtype=None):
        self.d_model = check_int(d_model, "d_model", 1)
        if isinstance(d_ff, (list, tuple, np.ndarray)):
            sizes = tuple(check_int(int(f) if isinstance(f, np.integer) else f,
                                    "d_ff entry", 0) for f in d_ff)
            if len(sizes) != n_experts:
                raise ValueError(f"d_ff must be an int or n_experts={n_experts} sizes, got "
                                 f"{len(sizes)}")
            if max(sizes) < 1:
                raise ValueError("d_ff must have at least one expert with d_ff >= 1")
            self.expert_d_ff = sizes if len(set(sizes)) > 1 else None
            self.d_ff = max(sizes)
        else:
            self.expert_d_ff = None
            self.d_ff = check_int(d_ff, "d_ff", 1)
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self.activation = activation
        check_choice(activation, "activation", ACTIVATIONS)
        kinds = (null_experts,) if isinstance(null_experts, str) else tuple(null_experts or ())
        for kind in kinds:
            check_choice(kind, "null_experts entry", NULL_KINDS)
        self.null_experts = kinds
        self.n_null = len(kinds)
        check_choice(router, "router", ROUTERS)
        self.router = router
        self.router_p = check_float(router_p, "router_p")
        if not 0.0 < self.router_p <= 1.0:
            raise ValueError(f"router_p must be in (0, 1], got {router_p}")
        self.router_threshold = check_float(router_threshold, "router_threshold")
        self.k_min = check_int(k_min, "k_min", 1)
        self.skip_threshold = check_float(skip_threshold, "skip_threshold")
        if self.skip_threshold < 0:
            raise ValueError(f"skip_threshold must be >= 0, got {skip_threshold}")
        self.skip_renormalize = bool(skip_renormalize)
        check_choice(router_grad, "router_grad", ROUTER_GRADS)
        if router_grad != "default" and router != "top_k":
            raise ValueError(f"router_grad={router_grad!r} is an option of the top-k router, "
                             f"not of router={router!r}")
        self.router_grad = router_grad
        if router != "top_k" and (n_groups != 1 or expert_bias):
            raise ValueError(f"router={router!r} takes no n_groups / expert_bias (those are "
                             "top-k options)")
        if router == "expert_choice" and scoring not in ("softmax", "sigmoid"):
            raise ValueError("router='expert_choice' needs scoring 'softmax' or 'sigmoid', "
                             f"got {scoring!r}")
        check_routing_options(self.n_router, top_k, scoring, n_groups, topk_groups,
                              routed_scaling, capacity_factor)
        self.top_k, self.scoring, self.renormalize = int(top_k), scoring, bool(renormalize)
        self.routed_scaling = float(routed_scaling)
        self.n_groups, self.topk_groups = int(n_groups), int(topk_groups)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.n_shared_experts = check_int(n_shared_experts, "n_shared_experts", 0)
        self.shared_d_ff = self.d_ff if shared_d_ff is None else check_int(shared_d_ff,
                                                                          "shared_d_ff", 1)
        self.shared_expert_gate = bool(shared_expert_gate)
        self.use_expert_bias = bool(expert_bias)
        check_choice(dtype, "dtype", WEIGHT_DTYPES + QUANT_DTYPES)
        self.dtype = dtype
        shared_dtype = dtype if shared_dtype is None else shared_dtype
        check_choice(shared_dtype, "shared_dtype", WEIGHT_DTYPES + QUANT_DTYPES)
        self.shared_dtype = shared_dtype
        quantized = [t for t in (dtype, shared_dtype) if t in QUANT_DTYPES]
        if not quantized and group_size is not None:
            raise ValueError(f"group_size is an option of the quantized dtypes "
                             f"({', '.join(QUANT_DTYPES)}), not of dtype={dtype!r}")
        # the weights per scale along k (0: one scale per row), None without quantization
        if group_size is None and "mxfp4" in quantized:
            group_size = 32  # the one group size of mxfp4 serves the other format too
        for t in quantized:
            group_size = check_group_size(t, group_size)
        self.group_size = group_size if quantized else None
        self.use_router_bias, self.use_expert_biases = bool(router_bias), bool(expert_biases)
        self.swiglu_alpha = check_float(swiglu_alpha, "swiglu_alpha", float32=True)
        self.swiglu_limit = check_float(swiglu_limit, "swiglu_limit", True, float32=True)
        self.lora_rank = check_int(lora_rank, "lora_rank", 0)
        self.lora_alpha = (float(self.lora_rank) if lora_alpha is None
                           else check_float(lora_alpha, "lora_alpha", float32=True))
        if lora_targets is None:  # every projection the activation has
            lora_targets = LORA_TARGETS if activation in GATED else LORA_TARGETS[1:]
        targets = (lora_targets,) if isinstance(lora_targets, str) else tuple(lora_targets)
        for t in targets:
            check_choice(t, "lora_targets entry", LORA_TARGETS)
        if "w_gate" in targets and activation not in GATED and self.lora_rank:
            raise ValueError(f"lora_targets has 'w_gate' but activation {activation!r} has no "
                             "gate")
        if self.lora_rank and not targets:
            raise ValueError("lora_rank > 0 needs at least one of lora_targets")
        if self.lora_rank and self.expert_d_ff is not None:
            raise ValueError("expert LoRA (lora_rank > 0) needs experts of one size (d_ff)")
        self.lora_targets = tuple(t for t in LORA_TARGETS if t in targets)
        check_choice(compute_dtype, "compute_dtype", _C.COMPUTE_DTYPES)
        if compute_dtype == "int8":
            if dtype not in _C.QUANT_DTYPES:
                raise ValueError("compute_dtype='int8' needs quantized expert weights (dtype "
                                 f"one of {', '.join(map(repr, _C.QUANT_DTYPES))}), got "
                                 f"dtype={dtype!r}")
            if self.lora_rank:
                raise ValueError("compute_dtype='int8' does not support expert LoRA "
                                 "(lora_rank > 0)")
        if compute_dtype == "bfloat16":
            if dtype != "bfloat16" or shared_dtype != "bfloat16":
                raise ValueError("compute_dtype='bfloat16' needs dtype='bfloat16' weights, got "
                                 f"dtype={dtype!r}, shared_dtype={shared_dtype!r}")
            sizes = {"d_model": self.d_model, "d_ff": self.d_ff}
            if self.n_shared_experts:
                sizes["shared_d_ff"] = self.shared_d_ff
            odd = {k: v for k, v in sizes.items() if v % 2}
            odd_entries = [f for f in self.expert_d_ff or () if f % 2]
            if odd_entries:
                odd["d_ff entries"] = odd_entries
            if odd:
                raise ValueError("compute_dtype='bfloat16' pairs the inputs along k: it needs "
                                 f"even sizes, got {odd}")
            if self.lora_rank:
                raise ValueError("compute_dtype='bfloat16' does not support expert LoRA "
                                 "(lora_rank > 0)")
        self.compute_dtype = compute_dtype
        self._packed = None

        object.__setattr__(self, "_packed", None)
        for name in _WEIGHTS:
            object.__setattr__(self, name, None)
        if not init:
            if self.use_expert_bias:
                self.expert_bias = np.zeros(self.n_router, np.float32)
            return
        if self.use_router_bias:
            self.router_bias = np.zeros(self.n_router, np.float32)
        if self.use_expert_biases:
            self.b_gate = np.zeros((self.n_experts, self.d_ff), np.float32)
            self.b_up = np.zeros((self.n_experts, self.d_ff), np.float32)
            self.b_down = np.zeros((self.n_experts, self.d_model), np.float32)
        rng = np.random.default_rng(seed)
        d, F, E = self.d_model, self.d_ff, self.n_experts

        def normal(shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

        gated = activation in GATED
        self.router_weight = normal((self.n_router, d), d)
        self.null_values = normal((self.n_null, d), d) if "constant" in self.null_experts \
            else None
        # (weights are drawn in float32 and rounded to `dtype` on assignment)
        self.w_gate = normal((E, F, d), d) if gated else None
        self.w_up = normal((E, F, d), d)
        self.w_down = normal((E, d, F), F)
        self.expert_bias = np.zeros(self.n_router, np.float32) if self.use_expert_bias else None
        H = self.n_shared_experts * self.shared_d_ff
        self.shared_w_gate = normal((H, d), d) if H and gated else None
        self.shared_w_up = normal((H, d), d) if H else None
        self.shared_w_down = normal((d, H), H) if H else None
        self.shared_gate_weight = normal((1, d), d) if H and self.shared_expert_gate else None
        r = self.lora_rank
        for t in self.lora_targets if r else ():
            fan_in, out = (F, d) if t == "w_down" else (d, F)
            setattr(self, f"lora_a_{t[2:]}", normal((E, r, fan_in), fan_in))
            setattr(self, f"lora_b_{t[2:]}", np.zeros((E, out, r), np.float32))

    # Weight attributes are checked and converted when assigned.
    def __setattr__(self, name, value):
        refuse_resize(self, name, _FIXED)
        self.__dict__.pop("_call_args", None)  # any option or weight may change a call's args
        if name in _WEIGHTS and value is not None:
            sizes = {"n_experts": self.n_experts, "d_model": self.d_model, "d_ff": self.d_ff,
                     "shared_hidden": self.n_shared_experts * self.shared_d_ff, "one": 1,
                     "lora_rank": self.lora_rank, "n_router": self.n_router,
                     "n_null": self.n_null}
            if name in _LORA_WEIGHTS and (not self.lora_rank or
                                          f"w_{name[7:]}" not in self.lora_targets):
                raise ValueError(f"{name}: {'w_' + name[7:]!r} is not in lora_targets="
                                 f"{self.lora_targets} (or lora_rank is 0)"
                                 if self.lora_rank else
                                 f"{name} needs a layer built with lora_rank > 0")
            shape = tuple((s, sizes[s]) for s in _WEIGHTS[name])
            if name in _EXPERT_WEIGHTS:
                dtype = self.shared_dtype if name.startswith("shared_") else self.dtype
                value = (quantized_weight(value, name, shape, dtype, self.group_size)
                         if dtype in QUANT_DTYPES else
                         stored_weight(value, name, shape, dtype, name in _ROUTED))
            else:
                value = float_array(value, name, shape)
        if name in _EXPERT_WEIGHTS or name in ("b_gate", "b_up", "b_down") + _LORA_WEIGHTS:
            object.__setattr__(self, "_packed", None)
        object.__setattr__(self, name, value)

    def __getstate__(self):
        """Pickle / deepcopy without the packed copies (repacked on the next call)."""
        state = dict(self.__dict__, _packed=None)
        state.pop("_call_args", None)
        return state

    def pack(self):
        """Pack the expert FFN weights for the kernels now (call after in-place edits).

        Done automatically on the first call and after a weight attribute is assigned.
        """
        require_ffn_weights(self, ("router_weight", "w_up", "w_down"))
        gated = self.activation in GATED

        biases = (None, None, None)
        if self.use_expert_biases:
            biases = (self.b_gate if gated else None, self.b_up, self.b_down)
            if any(b is None for b in biases[1:]) or (gated and biases[0] is None):
                raise ValueError("expert biases are missing (set b_gate, b_up and b_down)")
        sizes = None if self.expert_d_ff is None else np.array(self.expert_d_ff, np.int64)
        compute = _C.COMPUTE_DTYPES.index(self.compute_dtype)
        # int8 compute: the quantized packs only (float shared experts stay float32)
        shared_compute = compute if self.compute_dtype != "int8" or \
            self.shared_dtype in _C.QUANT_DTYPES else 0
        with naming_nonfinite(self.dtype, w_gate=self.w_gate, w_up=self.w_up,
                              w_down=self.w_down):
            routed = _C.pack_experts(**pack_weight_args(
                self.w_gate if gated else None, self.w_up, self.w_down, self.dtype,
                self.group_size), b_gate=biases[0], b_up=biases[1], b_down=biases[2],
                expert_d_ff=sizes, compute=compute)
        shared = None
        if self.n_shared_experts:
            if self.shared_w_up is None or self.shared_w_down is None or \
                    (gated and self.shared_w_gate is None):
                raise ValueError("shared expert weights are missing (set shared_w_up, "
                                 "shared_w_down and, for gated activations, shared_w_gate)")
            with naming_nonfinite(self.shared_dtype, shared_w_gate=self.shared_w_gate,
                                  shared_w_up=self.shared_w_up,
                                  shared_w_down=self.shared_w_down):
                shared = _C.pack_experts(**pack_weight_args(
                    self.shared_w_gate if gated else None, self.shared_w_up,
                    self.shared_w_down, self.shared_dtype, self.group_size, one=True),
                    compute=shared_compute)
        lora = None
        if self.lora_rank:
            ab = {}
            for t in LORA_TARGETS:
                pair = [getattr(self, f"lora_{x}_{t[2:]}") for x in "ab"]
                if t in self.lora_targets and any(w is None for w in pair):
                    raise ValueError(f"LoRA weights for {t} are missing (set lora_a_{t[2:]} "
                                     f"and lora_b_{t[2:]})")
                if t in self.lora_targets:
                    ab[f"a_{t[2:]}"], ab[f"b_{t[2:]}"] = pair
            lora = _C.pack_expert_lora(routed, rank=self.lora_rank,
                                       scaling=self.lora_alpha / self.lora_rank, **ab)
        object.__setattr__(self, "_packed", (routed, shared, _C.build_info()["isa"], lora))
        return self

    @property
    def n_router(self):
        """Router outputs: the real experts, then the null experts."""
        return self.n_experts + getattr(self, "n_null", 0)

    @property
    def lora_scaling(self):
        """The expert LoRA scaling lora_alpha / lora_rank (0 without LoRA)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def _checked_weights(self):
        """The packed experts and small weights for one call; repacks when needed."""
        if self.use_expert_bias:
            if self.expert_bias is None:
                raise ValueError("expert_bias is None but the layer was built with expert_bias=True")
            check_finite(self.expert_bias, "expert_bias")
        if self.use_router_bias and self.router_bias is None:
            raise ValueError("router_bias is None but the layer was built with router_bias=True")
        if self._packed is None:
            self.pack()
        routed, shared, _, lora = self._packed
        gate = None
        if shared is not None and self.shared_expert_gate:
            if self.shared_gate_weight is None:
                raise ValueError("shared_gate_weight is None but shared_expert_gate=True")
            gate = self.shared_gate_weight.reshape(self.d_model)
        return routed, shared, gate, lora

    def __call__(self, x, return_routing=False, *, allowed=None, groups=None):
        """x: (..., d_model) float32/float64 (float64 is rounded to float32 first).

        Returns (..., d_model) float32; with return_routing=True also a RoutingResult whose
        (T, k) arrays cover the flattened tokens.  allowed / groups: a selection mask as in
        moe.route over the flattened tokens -- (T, n_router) bool, or a (G, n_router) table
        with groups (T,) ints (task / modality / domain routing); it is combined with
        layer.expert_mask.
        """
        out, routing, _ = self._forward(x, allowed, groups, False)
        return (out, routing) if return_routing else out

    @property
    def expert_mask(self):
        """(n_router,) bool or None: experts that may be selected (pruning by mask: a False
        expert is never chosen; scores, weights and losses still see it).  Not saved."""
        return getattr(self, "_expert_mask", None)

    @expert_mask.setter
    def expert_mask(self, mask):
        if mask is not None:
            m = _as_ndarray(mask, "expert_mask")
            if m.dtype != np.bool_ or m.shape != (self.n_router,):
                raise ValueError(f"expert_mask must be a bool array of shape (n_router="
                                 f"{self.n_router},), got {m.dtype} {_shape_str(m.shape)}")
            if int(m.sum()) < self.top_k:
                raise ValueError(f"expert_mask must allow at least top_k={self.top_k} experts, "
                                 f"got {int(m.sum())}")
            mask = np.ascontiguousarray(m)
        object.__setattr__(self, "_expert_mask", mask)

    def _forward(self, x, allowed, groups, want_norm, save=False, save_hidden=False):
        """(out, routing, per-expert gate * ||output|| sums or None); with save also
        (the call's args, kwargs, what the forward saved) for the backward; save_hidden:
        that includes the routed rows' gate / up pre-activations."""
        lead, x2 = token_rows(x, self.d_model)
        args, kw = self._forward_args(x2, allowed, groups, want_norm)
        out, ids, w, counts, n_dropped, aux, z, n_real, norm, saved = _C.layer_forward(
            *args, **kw, save=save, save_hidden=save_hidden)
        out = out.reshape(lead + (self.d_model,))
        if self.n_null:
            routing = NullRoutingResult(ids, w, counts, int(n_dropped), float(aux), float(z),
                                        n_real)
        else:
            routing = RoutingResult(ids, w, counts, int(n_dropped), float(aux), float(z))
        if save:
            return out, routing, (args, kw, saved)
        return out, routing, norm

    def _forward_args(self, x2, allowed, groups, want_norm):
        """The arguments of _C.layer_forward for the rows x2: (args, kwargs)."""
        T = x2.shape[0]
        allowed, groups = mask_args(allowed, groups, T, self.n_router, self.n_groups)
        if self.expert_mask is not None:
            if allowed is None:
                allowed, groups = self.expert_mask[None], np.zeros(T, np.int32)
            else:
                allowed = np.ascontiguousarray(allowed & self.expert_mask)
        # The rest is checked once and kept until an attribute is assigned (__setattr__)
        # or the layer repacks: a decode call's Python time is mostly these checks.
        # In-place edits of the arrays are seen (they are passed by reference); the C
        # core checks what they may hold (a non-finite expert_bias).
        cached = self.__dict__.get("_call_args")
        if cached is None or cached[0] is not self._packed:
            cached = self._call_options()
            object.__setattr__(self, "_call_args", cached)
        _, args, kw = cached
        if self.router != "top_k" and allowed is not None:
            raise ValueError(f"allowed / groups / expert_mask need router='top_k', got "
                             f"{self.router!r}")
        return (x2,) + args, dict(kw, allowed=allowed, groups=groups,
                                  want_out_norm=bool(want_norm))

    def _call_options(self):
        """(the packed experts, the args after x, the kwargs but the call's own) of
        _C.layer_forward, checked."""
        routed, shared, sgate, lora = self._checked_weights()
        top_k, code, n_groups, topk_groups, scaling, cf = check_routing_options(
            self.n_router, self.top_k, self.scoring, self.n_groups, self.topk_groups,
            self.routed_scaling, self.capacity_factor)
        act = check_choice(self.activation, "activation", ACTIVATIONS)
        kinds = values = None
        if self.n_null:
            kinds = np.array([NULL_KINDS.index(k) for k in self.null_experts], np.int32)
            if "constant" in self.null_experts:
                if self.null_values is None:
                    raise ValueError("null_values is None but a null expert is 'constant'")
                values = self.null_values
        router = ROUTERS.index(self.router)
        if self.router == "expert_choice":  # each expert takes ceil(cf * T / E) tokens
            cf = 1.0 if self.capacity_factor is None else self.capacity_factor
        router_p = self.router_threshold if self.router == "threshold" else self.router_p
        args = (self.router_weight, routed, top_k, act)
        kw = dict(
            expert_bias=self.expert_bias if self.use_expert_bias else None, scoring=code,
            renormalize=self.renormalize, routed_scaling=scaling, n_groups=n_groups,
            topk_groups=topk_groups, capacity_factor=cf, shared_experts=shared,
            shared_gate_weight=sgate,
            router_bias=self.router_bias if self.use_router_bias else None,
            alpha=self.swiglu_alpha, limit=self.swiglu_limit, lora=lora, null_kinds=kinds,
            null_values=values, router=router, router_p=router_p, k_min=min(self.k_min, top_k),
            skip_threshold=self.skip_threshold, skip_renormalize=self.skip_renormalize)
        return self._packed, args, kw

    # ---- training ---------------------------------------------------------------------

    def trainable_weights(self):
        """Names of the weights the backward returns a gradient for (those the layer has).
        With expert LoRA (lora_rank > 0) the experts are frozen (routed and shared: their
        weights and biases get no gradient, none is computed); the adapters, the router and
        the shared-expert gate train."""
        unused = set()
        if self.lora_rank:
            unused.update(_FROZEN_BY_LORA)
        if self.activation not in GATED:  # (an ungated layer keeps a b_gate it never reads)
            unused.add("b_gate")
        if not self.use_expert_biases:
            unused.update(("b_gate", "b_up", "b_down"))
        if not self.use_router_bias:
            unused.add("router_bias")
        if not self.shared_expert_gate:
            unused.add("shared_gate_weight")
        if "constant" not in self.null_experts:
            unused.add("null_values")
        lora = tuple(f"lora_{ab}_{t[2:]}" for t in self.lora_targets for ab in "ab") \
            if self.lora_rank else ()
        return tuple(n for n in _TRAINABLE if n not in unused and getattr(self, n) is not None) \
            + lora

    def _check_trainable(self):
        why = []
        if self.compute_dtype == "int8":
            why.append("compute_dtype='int8'")
        for name, dt in (("dtype", self.dtype), ("shared_dtype", self.shared_dtype)):
            if dt in QUANT_DTYPES and (name == "dtype" or self.n_shared_experts):
                why.append(f"{name}={dt!r} (quantized weights: train the float layer, then "
                           "moe.quantize it)")
        if why:
            raise NotImplementedError(
                "the backward covers every router with shared experts, biases, null "
                "experts, skipping, expert LoRA and bf16 compute; not: " + ", ".join(why))

    def forward_train(self, x, *, allowed=None, groups=None, recompute_hidden=None):
        """The forward of __call__ keeping what backward needs: returns (y, ctx).

        ctx (moe.train.TrainContext) holds the input, the float64 router logits, the routing
        (ctx.routing, a RoutingResult with aux_loss and z_loss), the experts' outputs and the
        shared experts' output: O(T k d) floats.  recompute_hidden (default: the layer's
        attribute recompute_hidden, True): the backward recomputes the routed rows' gate / up
        pre-activations, (T k, d_ff) each, from the packed weights; False keeps them in ctx
        instead (4 T k d_ff bytes each more memory, 2 of the backward's 8 (T k, d_ff, d)
        products less).  The gradients are the same bits either way.  The weights must not
        change before the backward.
        """
        self._check_trainable()
        if recompute_hidden is None:
            recompute_hidden = self.recompute_hidden
        lead, x2 = token_rows(x, self.d_model)
        out, routing, (args, kw, saved) = self._forward(
            x2, allowed, groups, False, save=True, save_hidden=not recompute_hidden)
        ctx = TrainContext(self, lead, x2, routing, (args, kw, saved), allowed, groups)
        return out.reshape(lead + (self.d_model,)), ctx

    def backward(self, ctx, dy, *, aux_coef=0.0, z_coef=0.0, retain=False):
        """Gradients of  sum(dy * y) + aux_coef * aux_loss + z_coef * z_loss  for the forward
        that made ctx (layer.forward_train), the routing held fixed.

        dy: the output's shape (or (T, d_model)).  Returns a dict of float32 arrays: "x"
        (the input's shape) and one entry per name of trainable_weights() (router_weight,
        router_bias, w_gate, w_up, w_down, b_gate, b_up, b_down, shared_w_gate, shared_w_up,
        shared_w_down, shared_gate_weight; with expert LoRA the lora_a_<t> / lora_b_<t> instead
        of the frozen experts'), each in its weight's shape (float32 whatever the layer's
        dtype; when w_gate and w_up are the two halves of one (E, 2F, d) array, their
        gradients are the halves of one such array too).  expert_bias gets none (it moves the selection only; update it with
        moe.update_expert_bias).  ctx is used up unless retain=True.  Bitwise the same for
        any thread count.
        """
        dy32, aux, z = check_backward_args(self, ctx, dy, aux_coef, z_coef)
        args, kw, (logits, y, shared, hidden) = ctx.saved
        if args[2] is not self._checked_weights()[0]:
            raise RuntimeError("the layer's FFN weights changed since forward_train: the "
                               "backward needs the weights the forward ran with")
        gated = self.activation in GATED
        bits = weight_bits
        ids, w = ctx.routing.expert_ids, ctx.routing.weights
        lora = {}
        if self.lora_rank:
            if kw.get("lora") is not self._packed[3]:
                raise RuntimeError("the layer's LoRA adapters changed since forward_train: "
                                   "the backward needs the adapters the forward ran with")
            lora = dict(lora_weights=tuple(
                getattr(self, f"lora_{ab}_{t}") if f"w_{t}" in self.lora_targets else None
                for t in ("gate", "up", "down") for ab in "ab"),
                lora_rank=self.lora_rank, lora_scaling=float(self.lora_scaling), frozen=True)
        g = _C.layer_backward(
            args, kw, ids, w, logits, y, shared, dy32,
            w_gate=bits(self.w_gate) if gated else None, w_up=bits(self.w_up),
            w_down=bits(self.w_down),
            shared_w_gate=bits(self.shared_w_gate) if gated and self.n_shared_experts
            else None,
            shared_w_up=bits(self.shared_w_up) if self.n_shared_experts else None,
            shared_w_down=bits(self.shared_w_down) if self.n_shared_experts else None,
            aux_coef=aux, z_coef=z, biases=self.use_expert_biases,
            router_grad=ROUTER_GRADS.index(self.router_grad), hidden=hidden, **lora)
        if not retain:
            ctx.released = True
            ctx.saved = None
        out = {"x": g["x"].reshape(ctx.lead + (self.d_model,))}
        for name in self.trainable_weights():
            out[name] = g[name]
        return out

    def config(self):
        """The constructor arguments of this layer (JSON-friendly), without weights or seed."""
        return dict(d_model=self.d_model,
                    d_ff=self.d_ff if self.expert_d_ff is None else list(self.expert_d_ff),
                    n_experts=self.n_experts,
                    top_k=self.top_k, activation=self.activation, scoring=self.scoring,
                    renormalize=self.renormalize, routed_scaling=self.routed_scaling,
                    n_groups=self.n_groups, topk_groups=self.topk_groups,
                    expert_bias=self.use_expert_bias, n_shared_experts=self.n_shared_experts,
                    shared_d_ff=self.shared_d_ff, shared_expert_gate=self.shared_expert_gate,
                    capacity_factor=self.capacity_factor, dtype=self.dtype,
                    router_bias=self.use_router_bias, expert_biases=self.use_expert_biases,
                    swiglu_alpha=self.swiglu_alpha, swiglu_limit=self.swiglu_limit,
                    lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    lora_targets=list(self.lora_targets), null_experts=list(self.null_experts),
                    router=self.router, router_p=self.router_p,
                    router_threshold=self.router_threshold, k_min=self.k_min,
                    skip_threshold=self.skip_threshold,
                    skip_renormalize=self.skip_renormalize,
                    compute_dtype=self.compute_dtype, router_grad=self.router_grad,
                    group_size=self.group_size, shared_dtype=self.shared_dtype)

    def save(self, path):
        """Write the layer to one safetensors file (weights + its config in the metadata);
        moe.load(path) gives it back bit for bit."""
        from .io import save
        save(self, path)

    def _weight_names(self):
        return tuple(_WEIGHTS)

    def flops(self, n_tokens):
        """Multiply-add FLOPs (x2) of one forward pass over n_tokens (dropless)."""
        mats = 3 if self.activation in GATED else 2
        # (different expert sizes: counted at the mean size)
        mean_ff = self.d_ff if self.expert_d_ff is None else float(np.mean(self.expert_d_ff))
        routed = int(2 * n_tokens * self.top_k * mats * self.d_model * mean_ff)
        shared = 2 * n_tokens * mats * self.d_model * self.n_shared_experts * self.shared_d_ff
        lora = sum(2 * n_tokens * self.top_k * self.lora_rank * (self.d_model + self.d_ff)
                   for _ in self.lora_targets) if self.lora_rank else 0
        return routed + shared + lora + 2 * n_tokens * self.n_router * self.d_model

    def __repr__(self):
        opts = [f"d_model={self.d_model}", f"d_ff={self.d_ff}", f"n_experts={self.n_experts}",
                f"top_k={self.top_k}", f"activation={self.activation!r}",
                f"scoring={self.scoring!r}"]
        if self.n_groups > 1:
            opts.append(f"n_groups={self.n_groups}, topk_groups={self.topk_groups}")
        if self.routed_scaling != 1.0:
            opts.append(f"routed_scaling={self.routed_scaling}")
        if self.use_expert_bias:
            opts.append("expert_bias=True")
        if self.n_shared_experts:
            opts.append(f"n_shared_experts={self.n_shared_experts}, shared_d_ff={self.shared_d_ff}")
        if self.capacity_factor is not None:
            opts.append(f"capacity_factor={self.capacity_factor}")
        if self.dtype != "float32":
            opts.append(f"dtype={self.dtype!r}")
        if self.shared_dtype != self.dtype and self.n_shared_experts:
            opts.append(f"shared_dtype={self.shared_dtype!r}")
        if self.group_size is not None:
            opts.append(f"group_size={self.group_size or 'per row'}")
        if self.compute_dtype != "float32":
            opts.append(f"compute_dtype={self.compute_dtype!r}")
        if self.lora_rank:
            opts.append(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets}")
        if self.n_null:
            opts.append(f"null_experts={self.null_experts}")
        return f"SparseMoE({', '.join(opts)})"


def prune_experts(layer, keep):
    """A copy of `layer` with only the routed experts `keep` (physical pruning).

    keep: (n_experts,) bool mask or a sequence of expert indices (kept in ascending order).
    Router rows, biases, FFN weights and expert LoRA adapters are sliced; null and shared
    experts stay.  Returns (pruned_layer, remap): remap (n_experts,) int64 gives each old
    expert's new index, or -1 if it was removed.  Routing over fewer experts changes the
    softmax probabilities (not the renormalised weights of tokens whose top-k survive), so
    with softmax scores and an expert_bias the selection may differ from pruning by mask;
    with sigmoid scores it does not.
    """
    E = layer.n_experts
    k = np.asarray(keep)
    if k.dtype == np.bool_:
        if k.shape != (E,):
            raise ValueError(f"keep must have shape (n_experts={E},) as a mask, got "
                             f"{_shape_str(k.shape)}")
        idx = np.flatnonzero(k)
    else:
        idx = np.unique(k.astype(np.int64, casting="same_kind").ravel())
        if idx.size and (idx[0] < 0 or idx[-1] >= E):
            raise ValueError(f"keep indices must be in [0, n_experts={E}), got "
                             f"{idx[0] if idx[0] < 0 else idx[-1]}")
    if idx.size == 0:
        raise ValueError("keep must keep at least one expert")
    rows = np.concatenate([idx, np.arange(E, layer.n_router)])
    cfg = layer.config()
    cfg["n_experts"] = int(idx.size)
    if cfg["top_k"] > len(rows):
        raise ValueError(f"top_k={cfg['top_k']} needs at least that many experts, "
                         f"keep leaves {len(rows)}")
    if cfg["n_groups"] > 1 and len(rows) % cfg["n_groups"]:
        raise ValueError(f"n_groups={cfg['n_groups']} must divide the experts left "
                         f"({len(rows)})")
    new = SparseMoE(**cfg, init=False)
    for name in _WEIGHTS:
        value = getattr(layer, name)
        if value is None:
            continue
        if name in ("router_weight", "expert_bias", "router_bias"):
            value = value[rows]
        elif name not in ("shared_w_gate", "shared_w_up", "shared_w_down",
                          "shared_gate_weight", "null_values"):
            value = value[idx]
        setattr(new, name, np.array(value))
    if layer.expert_mask is not None:
        new.expert_mask = layer.expert_mask[rows]
    remap = np.full(E, -1, np.int64)
    remap[idx] = np.arange(idx.size)
    return new, remap
