"""moe.SoftMoE and moe.MixtureOfTokens: fully differentiable mixtures of experts.

No token is routed: every expert slot is a softmax-weighted mix of a group's tokens, and
every token a softmax-weighted mix of the slots' expert outputs (Soft MoE, Puigcerver et al.
2023).  Mixture of Tokens (Antoniak et al. 2023) is the same computation with the group
taken across the batch (the tokens at one position of several sequences).  The forward pass
is one call into the C core, whose GEMMs and grouped expert FFN are those of SparseMoE.
"""
from __future__ import annotations

import numpy as np

from . import _C
from ._api import (ACTIVATIONS, GATED, WEIGHT_DTYPES, _shape_str, check_choice, check_float,
                   check_int, float_array, naming_nonfinite, refuse_resize, remember_config,
                   require_ffn_weights, saveable, stored_weight, weight_bits)
from .train import TrainContext, check_backward_args

# attribute -> shape template; names are resolved against the layer's sizes
_WEIGHTS = {
    "phi": ("d_model", "n_slots"),
    "w_gate": ("n_experts", "d_ff", "d_model"),
    "w_up": ("n_experts", "d_ff", "d_model"),
    "w_down": ("n_experts", "d_model", "d_ff"),
}
_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@saveable
class SoftMoE:
    """Soft MoE: y = C FFN(D^T X) per group of tokens, no routing and no dropped tokens.

    For each group X (m, d) (a sequence, an image's patches):
      logits L = X @ phi                         (m, E*s); slot j = e * s + i is slot i of
                                                 expert e
      D = softmax of L over the m tokens         (each slot's weights over the tokens)
      slots = D^T X                              (E*s, d), a convex mix of the group's tokens
      Y_slots = FFN_e(slots of expert e)         (E*s, d), each expert on its s slots
      C = softmax of L over the E*s slots        (each token's weights over the slots)
      y = C Y_slots                              (m, d)
    With normalize=True (the paper's l2 normalisation, important at large d_model), the
    logits are scale * <x / |x|, phi_j / |phi_j|>, |v| = sqrt(sum v^2 + 1e-6); the slots
    still mix the unnormalised x.  A group's output depends on the other tokens of its
    group (that is the mixing) but never on other groups.

    Parameters: d_model, d_ff (per expert), n_experts, slots_per_expert (s); activation in
    "swiglu" | "geglu" | "geglu-tanh" | "gelu" | "gelu-tanh" | "relu" | "silu" |
    "swiglu-oai" (with swiglu_alpha / swiglu_limit), the expert FFN of SparseMoE;
    normalize; scale (the learned scalar of the normalisation, initially 1.0); dtype of the
    FFN weights ("float32", "bfloat16" as uint16 bits, "float16"); seed for the initial
    weights, or init=False to leave them None.

    Weights (writable attributes, shapes checked on assignment):
      phi (d, E*s) float32; w_gate, w_up (E, F, d), w_down (E, d, F) in `dtype` (w_gate None
      for non-gated activations); scale, a float.
    The FFN weights are packed on the first call and after any assignment; after editing
    them in place, call layer.pack().

    Precision: the logit, slot and combine GEMMs and the FFN run in float32 (float32
    accumulation); both softmaxes in float64 with the maximum subtracted, rounded to float32
    once.  Deterministic for any thread count.  NaN or Inf in x or phi raises ValueError
    (a non-finite logit, named by token and slot).
    """

    @remember_config
    def __init__(self, d_model, d_ff, n_experts, slots_per_expert=1, *, activation="swiglu",
                 normalize=False, scale=1.0, dtype="float32", seed=0, init=True,
                 swiglu_alpha=1.702, swiglu_limit=7.0):
        object.__setattr__(self, "_packed", None)
        for name in _WEIGHTS:
            object.__setattr__(self, name, None)
        self.d_model = check_int(d_model, "d_model", 1)
        self.d_ff = check_int(d_ff, "d_ff", 1)
        self.n_experts = check_int(n_experts, "n_experts", 1, 2**31 - 1)
        self.slots_per_expert = check_int(slots_per_expert, "slots_per_expert", 1,
                                          (2**31 - 1) // self.n_experts)
        check_choice(activation, "activation", ACTIVATIONS)
        self.activation = activation
        self.normalize = bool(normalize)
        self.scale = scale
        check_choice(dtype, "dtype", WEIGHT_DTYPES)
        self.dtype = dtype
        self.swiglu_alpha = check_float(swiglu_alpha, "swiglu_alpha", float32=True)
        self.swiglu_limit = check_float(swiglu_limit, "swiglu_limit", True, float32=True)
        if not init:
            return
        rng = np.random.default_rng(seed)
        d, F, E = self.d_model, self.d_ff, self.n_experts

        def normal(shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

        self.phi = normal((d, self.n_slots), d)  # lecun normal, as the authors' init
        self.w_gate = normal((E, F, d), d) if activation in GATED else None
        self.w_up = normal((E, F, d), d)
        self.w_down = normal((E, d, F), F)

    @property
    def n_slots(self):
        """All slots, n_experts * slots_per_expert (the columns of phi)."""
        return self.n_experts * self.slots_per_expert

    # Weight attributes are checked and converted when assigned.
    def __setattr__(self, name, value):
        refuse_resize(self, name, ("d_model", "d_ff", "n_experts", "slots_per_expert", "dtype"))
        if name in _WEIGHTS and value is not None:
            sizes = {"n_experts": self.n_experts, "d_model": self.d_model, "d_ff": self.d_ff,
                     "n_slots": self.n_slots}
            shape = tuple((s, sizes[s]) for s in _WEIGHTS[name])
            if name in _EXPERT_WEIGHTS:
                value = stored_weight(value, name, shape, self.dtype)
            else:
                value = float_array(value, name, shape)
        elif name == "scale":
            value = check_float(value, "scale")
        elif name == "temperature":
            value = check_float(value, "temperature", True)
        if name in _EXPERT_WEIGHTS:
            object.__setattr__(self, "_packed", None)
        object.__setattr__(self, name, value)

    def pack(self):
        """Pack the expert FFN weights for the kernels now (call after in-place edits).

        Done automatically on the first call and after a weight attribute is assigned.
        """
        require_ffn_weights(self)
        gated = self.activation in GATED

        with naming_nonfinite(self.dtype, w_gate=self.w_gate, w_up=self.w_up,
                              w_down=self.w_down):
            packed = _C.pack_experts(w_gate=weight_bits(self.w_gate) if gated else None,
                                     w_up=weight_bits(self.w_up),
                                     w_down=weight_bits(self.w_down),
                                     dtype=WEIGHT_DTYPES.index(self.dtype))
        object.__setattr__(self, "_packed", packed)
        return self

    def _forward(self, x3, across, temperature, return_weights, keep=None, sel=None):
        """One core call on x3 (A, B, d) float32 C-contiguous: groups are its rows
        (across=False) or its columns x3[:, b] (across=True).  keep (a list): the call's
        arguments, its saved expert outputs and sel (how x3 was cut from the input, applied
        again to dy and dx) are appended for the backward."""
        if self.phi is None:
            raise ValueError("phi is not set (the layer was made with init=False)")
        if self._packed is None:
            self.pack()
        act = check_choice(self.activation, "activation", ACTIVATIONS)
        args = (x3, self.phi, self._packed, self.slots_per_expert, act, self.normalize,
                check_float(self.scale, "scale"), temperature)
        kw = dict(across=across, alpha=self.swiglu_alpha, limit=self.swiglu_limit)
        out, D, C, ys = _C.soft_moe_forward(*args, return_weights=bool(return_weights),
                                            save=keep is not None, **kw)
        if keep is not None:
            keep.append((args, kw, ys, sel))
        return out, D, C

    # ---- training ---------------------------------------------------------------------

    def trainable_weights(self):
        """Names of the weights backward returns a gradient for: phi, the expert FFN
        weights (w_gate when gated) and, with normalize, scale."""
        names = ("phi",) + (("w_gate",) if self.activation in GATED else ()) + \
            ("w_up", "w_down")
        return names + (("scale",) if self.normalize else ())

    def forward_train(self, x):
        """The forward of __call__ keeping what backward needs: returns (y, ctx).

        ctx (moe.train.TrainContext) holds the input and the experts' outputs (one row per
        slot: O(n_groups * n_slots * d)); the softmaxes and the slots are recomputed by the
        backward, the experts' hidden activations too.  The weights must not change before
        the backward."""
        keep = []
        x = float_array(x, "x")
        out = self._run(x, False, keep)
        ctx = TrainContext(self, out.shape[:-1], x.reshape(-1, self.d_model), None,
                           (keep, self._packed), None, None)
        return out, ctx

    def backward(self, ctx, dy, *, retain=False):
        """Gradients of sum(dy * y) for the forward that made ctx (layer.forward_train).

        dy: the output's shape.  Returns a dict of float32 arrays: "x" (the input's shape)
        and one entry per name of trainable_weights() in its weight's shape (float32 whatever
        the layer's dtype; "scale" a float).  ctx is used up unless retain=True.  Bitwise
        the same for any thread count.  Soft MoE has no router losses."""
        dy32, _, _ = check_backward_args(self, ctx, dy, 0.0, 0.0)
        keep, packed = ctx.saved
        if packed is not self._packed:
            raise RuntimeError("the layer's expert weights changed since forward_train: the "
                               "backward needs the weights the forward ran with")
        dy_full = dy32.reshape(ctx.lead + (self.d_model,))
        dx = np.zeros(dy_full.shape, np.float32)
        gated = self.activation in GATED
        total = None
        for args, kw, ys, sel in keep:
            cut = (lambda a: a) if sel is None else sel
            dy3 = np.ascontiguousarray(cut(dy_full))
            parts = _C.soft_moe_backward(
                args, kw, ys, dy3.reshape(args[0].shape),
                w_gate=weight_bits(self.w_gate) if gated else None,
                w_up=weight_bits(self.w_up), w_down=weight_bits(self.w_down))
            cut(dx)[...] = parts[0].reshape(cut(dx).shape)
            total = list(parts[1:]) if total is None else \
                [t if p is None else t + p for t, p in zip(total, parts[1:])]
        if not retain:
            ctx.released = True
        grads = {"x": dx, "phi": total[0], "w_gate": total[1], "w_up": total[2],
                 "w_down": total[3], "scale": float(total[4])}
        return {"x": dx, **{name: grads[name] for name in self.trainable_weights()}}

    def _input(self, x, what):
        x = float_array(x, "x")
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape {what} with d_model={self.d_model}, got "
                             f"{_shape_str(x.shape)}")
        return x

    def __call__(self, x, return_weights=False):
        """x: (B, m, d_model) B groups of m tokens, or (m, d_model) one group; float32 or
        float64 (rounded to float32 first).

        Returns y, float32 of x's shape; with return_weights=True, (y, dispatch, combine):
        D and C of shape x.shape[:-1] + (n_slots,), float32; D sums to 1 over each group's
        tokens (axis -2), C over the slots (axis -1).
        """
        return self._run(x, return_weights)

    def _run(self, x, return_weights, keep=None):
        x = self._input(x, "(batch, tokens, d_model) or (tokens, d_model)")
        x3 = x[None] if x.ndim == 2 else x
        sel = (lambda a: a[None]) if x.ndim == 2 else None
        out, D, C = self._forward(x3, False, 1.0, return_weights, keep, sel)
        if x.ndim == 2:
            out, D, C = out[0], None if D is None else D[0], None if C is None else C[0]
        return (out, D, C) if return_weights else out

    def flops(self, n_groups, group_size):
        """Multiply-add FLOPs (x2) of one forward over n_groups groups of group_size tokens:
        the logits, slot and combine GEMMs and the FFN on every slot."""
        T, S, d = n_groups * group_size, self.n_slots, self.d_model
        mats = 3 if self.activation in GATED else 2
        return 2 * (3 * T * S * d + n_groups * S * mats * d * self.d_ff)

    def _options(self):
        opts = [f"d_model={self.d_model}", f"d_ff={self.d_ff}", f"n_experts={self.n_experts}",
                f"slots_per_expert={self.slots_per_expert}", f"activation={self.activation!r}"]
        if self.normalize:
            opts.append(f"normalize=True, scale={self.scale}")
        if self.dtype != "float32":
            opts.append(f"dtype={self.dtype!r}")
        return opts

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self._options())})"

    def config(self):
        """The constructor arguments of this layer (JSON-friendly), without weights or seed."""
        return dict(self._init_config)

    def save(self, path):
        """Write the layer to one safetensors file; moe.load(path) gives it back bit for bit."""
        from .io import save
        save(self, path)

    def _weight_names(self):
        return tuple(_WEIGHTS)


@saveable
class MixtureOfTokens(SoftMoE):
    """Mixture of Tokens: Soft MoE whose groups run across the batch.

    x (B, m, d) holds B sequences of m tokens.  A group is the tokens at one position of
    group_size consecutive sequences (group_size=None: all B), so tokens of different
    examples are mixed while positions never are (no token sees a later token of its own
    sequence: causal models keep causality).  Logits are divided by `temperature` before
    both softmaxes.  Everything else (phi, the expert FFN weights, normalize, dtype) is as
    in SoftMoE; slots_per_expert defaults to 1, one mixed token per expert and group, as in
    the paper.

    mixing=False (inference, where examples must not be mixed): every token is its own
    group.  D is then 1, each expert's slots are the token itself, and the token goes
    through every expert once, its outputs weighted by its softmax C over the E*s slots
    (summed over an expert's slots): y = sum_e (sum_i C_{e,i}) FFN_e(x), a dense soft
    mixture costing E FFN passes per token.  This follows the spec's reading of "mixing can
    be turned off"; the paper's own inference switch (transition tuning towards a sparse
    MoE by lowering the temperature) is left to the caller (set `temperature`).
    """

    @remember_config
    def __init__(self, d_model, d_ff, n_experts, slots_per_expert=1, *, temperature=1.0,
                 mixing=True, group_size=None, activation="swiglu", normalize=False,
                 scale=1.0, dtype="float32", seed=0, init=True, swiglu_alpha=1.702,
                 swiglu_limit=7.0):
        super().__init__(d_model, d_ff, n_experts, slots_per_expert, activation=activation,
                         normalize=normalize, scale=scale, dtype=dtype, seed=seed, init=init,
                         swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
        self.temperature = temperature
        self.mixing = bool(mixing)
        self.group_size = None if group_size is None else check_int(group_size, "group_size", 1)

    def __call__(self, x, return_weights=False):
        """x: (B, m, d_model) B sequences of m tokens, or (B, d_model) one position of B
        sequences; float32 or float64.

        Returns y, float32 of x's shape; with return_weights=True, (y, dispatch, combine) of
        shape x.shape[:-1] + (n_slots,): D sums to 1 over each group's sequences (axis 0,
        within each block of group_size), C over the slots (axis -1).
        """
        return self._run(x, return_weights)

    def _run(self, x, return_weights, keep=None):
        x = self._input(x, "(batch, tokens, d_model) or (batch, d_model)")
        x3 = x[:, None] if x.ndim == 2 else x
        B, m, d = x3.shape
        temp = check_float(self.temperature, "temperature", True)
        as3 = (lambda a: a[:, None]) if x.ndim == 2 else (lambda a: a)  # noqa: E731
        if not self.mixing:
            out, D, C = self._forward(x3.reshape(B * m, 1, d), False, temp, return_weights,
                                      keep, lambda a: as3(a).reshape(B * m, 1, d))
            out = out.reshape(B, m, d)
            if return_weights:
                D, C = D.reshape(B, m, -1), C.reshape(B, m, -1)
        else:
            g = B if self.group_size is None else self.group_size
            if B % g:
                raise ValueError(f"the batch (x.shape[0]={B}) must be a multiple of "
                                 f"group_size={g}")
            if g == B:
                out, D, C = self._forward(x3, True, temp, return_weights, keep, as3)
            else:
                # one call per block of g sequences: each block is a contiguous view
                parts = [self._forward(x3[c:c + g], True, temp, return_weights, keep,
                                       lambda a, c=c: as3(a)[c:c + g])
                         for c in range(0, B, g)]
                out = np.concatenate([p[0] for p in parts])
                D = np.concatenate([p[1] for p in parts]) if return_weights else None
                C = np.concatenate([p[2] for p in parts]) if return_weights else None
        if x.ndim == 2:
            out = out[:, 0]
            D, C = (D[:, 0], C[:, 0]) if return_weights else (D, C)
        return (out, D, C) if return_weights else out

    def _options(self):
        opts = super()._options()
        opts.append(f"temperature={self.temperature}")
        if not self.mixing:
            opts.append("mixing=False")
        if self.group_size is not None:
            opts.append(f"group_size={self.group_size}")
        return opts
