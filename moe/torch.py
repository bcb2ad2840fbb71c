"""moe.torch: moe.SparseMoE and moe.MultiHeadMoE as torch.nn.Modules with autograd,
traceable by torch.compile.

A module's parameters share memory with its NumPy layer's weights; the forward and backward
run the C core through two custom ops (torch.ops.moe.sparse_moe_forward / _backward, with
fake implementations; they run either layer) wrapped by an autograd.Function.  Importing
`moe` never imports torch: only `import moe.torch` does.
"""
import functools
import itertools
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import layer as _layer_mod
from .layer import SparseMoE as _NumpySparseMoE
from .multihead import MultiHeadMoE as _NumpyMultiHeadMoE

__all__ = ["MultiHeadMoE", "Routing", "SparseMoE", "from_layer"]

# weights whose in-place change needs layer.pack(): the kernels read a packed copy of them
_PACKED = frozenset(_layer_mod._EXPERT_WEIGHTS + ("b_gate", "b_up", "b_down")
                    + _layer_mod._LORA_WEIGHTS)
# ... and a MultiHeadMoE's: its two projections (its inner layer packs its own)
_PACKED_MULTIHEAD = frozenset(("w_in", "w_merge"))
# layer dtype -> the torch dtype of its FFN weights (bfloat16 is stored as uint16 bits)
_FFN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Routing(NamedTuple):
    """What SparseMoE(x, return_routing=True) returns beside y.

    expert_ids (T, k) int32 (-1: dropped by capacity), weights (T, k) float32 and counts (E,)
    int64 over the flattened tokens, without grad; aux_loss (Switch load balancing) and
    z_loss (mean logsumexp^2) are 0-d float32 tensors with grad: adding a * aux_loss +
    b * z_loss to the loss trains the router through them.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


# ---- the layers the custom ops run on -------------------------------------------------
#
# A custom op takes tensors and plain values only, so a module registers its layer (a
# moe.SparseMoE or moe.MultiHeadMoE) here under an int id and passes the id.  The registry is
# weak: it never keeps a layer alive.

class _Binding:
    """A layer, its weights' names in the ops' order ("moe.w_up": the w_up of layer.moe),
    those with a gradient, the layers that pack weights (the layer, and a MultiHeadMoE's
    inner layer) and the (data_ptr, _version) of each packed weight at the last pack."""

    __slots__ = ("layer", "names", "trainable", "packers", "versions", "__weakref__")

    def __init__(self, layer, names, trainable=_layer_mod._TRAINABLE):
        self.layer, self.names = layer, tuple(names)
        self.trainable = frozenset(self.names) & frozenset(trainable)
        self.packers = (layer, layer.moe) if isinstance(layer, _NumpyMultiHeadMoE) else (layer,)
        self.versions = {}


def _owner(layer, name):
    """The (layer, attribute) that a binding's weight name points to."""
    head, _, attr = name.rpartition(".")
    return (getattr(layer, head) if head else layer), attr


def _packed_names(layer):
    return _PACKED_MULTIHEAD if isinstance(layer, _NumpyMultiHeadMoE) else _PACKED


_BINDINGS = weakref.WeakValueDictionary()
_ids = itertools.count(1)


def _register(binding):
    key = next(_ids)
    _BINDINGS[key] = binding
    return key


def _binding(layer_id):
    b = _BINDINGS.get(layer_id)
    if b is None:
        raise RuntimeError(f"moe.torch: no layer registered as {layer_id} (its module is gone)")
    return b


def _numpy_view(t, name):
    """A CPU tensor as a NumPy array on the same memory (bfloat16 as uint16 bits)."""
    if t.device.type != "cpu":
        raise ValueError(f"moe.torch runs on the CPU: {name} is on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensor_view(arr):
    """A layer's NumPy weight as a tensor on the same memory (uint16 bits as bfloat16)."""
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _version(t):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: always repack
        return None


def _bind(b, tensors):
    """Point b.layer's weights at `tensors` (in b.names order) and repack when a packed one
    changed since the last pack.

    The layer's weights are NumPy views of the parameters, so in-place updates (an
    optimizer step, load_state_dict) reach it without a copy -- but its kernels run on a
    *packed* copy of the FFN weights.  Every in-place torch op bumps a tensor's _version
    counter (shared with its views and detach()), so a changed (data_ptr, _version) of a
    packed weight is the sign to repack; a parameter replaced by another tensor is rebound.
    Writes that bypass the counter (through .data or NumPy) need SparseMoE.repack().
    """
    stale = []  # the layers (b.packers) one of whose packed weights moved
    for name, t in zip(b.names, tensors):
        owner, attr = _owner(b.layer, name)
        arr = getattr(owner, attr)
        ptr = t.data_ptr()
        if arr is None or arr.ctypes.data != ptr or arr.shape != tuple(t.shape):
            setattr(owner, attr, _numpy_view(t, name))  # checks the shape
        if attr in _packed_names(owner):
            key = (ptr, _version(t))
            if key[1] is None or b.versions.get(name) != key:
                stale.append(owner)
                b.versions[name] = key
    # (assigning a packed weight drops its layer's pack: _packed is None)
    for layer in b.packers:
        if layer._packed is None or any(o is layer for o in stale):
            layer.pack()
    return b.layer


# ---- what the forward keeps for the backward -------------------------------------------
#
# TODO(issue 18): moe.train.TrainContext is not a tensor, so the forward op returns a 0-d
# int64 "handle" whose storage is a NumPy array carrying the context; the backward op finds
# it by the handle's value.  The context lives exactly as long as that storage -- saved by
# autograd (or AOTAutograd) until the graph is freed -- so an unused forward leaks nothing.
# When moe.train grows forward_saved(layer, x) -> (y, saved) / backward_saved(layer, x,
# saved, dy, aux_coef, z_coef) with NumPy arrays of shapes known from (T, layer) alone
# (today's ctx.saved: logits (T, n_router) float64, the experts' outputs (T*k, d) float32,
# the shared output (T, d) float32 or none; plus expert_ids / weights (T, k)), the handle
# becomes those tensors (declared in the fake op by shape) and this registry goes away.

class _Saved(np.ndarray):
    """A 0-d int64 array (the handle's storage) carrying the forward's TrainContext."""


_CONTEXTS = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def _handle_for(ctx):
    key = next(_handles)
    holder = np.array(key, np.int64).view(_Saved)
    holder.ctx = ctx
    _CONTEXTS[key] = holder
    return torch.from_numpy(holder)  # the tensor's storage keeps the holder alive


def _context_of(handle):
    holder = _CONTEXTS.get(int(handle))
    if holder is None:
        raise RuntimeError("moe.torch: the forward's saved state is gone (was this backward's "
                           "graph already freed?)")
    return holder.ctx


# ---- the custom ops --------------------------------------------------------------------

@torch.library.custom_op(
    "moe::sparse_moe_forward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, int layer_id, bool train) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _forward_op(x, weights, layer_id, train):
    """x (T, d_model) float32, weights in the binding's order -> y (T, d) float32, aux, z
    (0-d float32), expert_ids (R, k) int32, weights (R, k) float32, counts (E,) int64 and
    the handle of the training context (-1 when train is False).  R is T, or T * n_heads
    sub-tokens for a MultiHeadMoE (the routing is its inner layer's)."""
    layer = _bind(_binding(layer_id), weights)
    xn = x.detach().contiguous().numpy()
    if train:
        y, ctx = layer.forward_train(xn)
        r, handle = ctx.routing, _handle_for(ctx)
    else:
        y, r = layer(xn, return_routing=True)
        handle = torch.tensor(-1, dtype=torch.int64)
    return (torch.from_numpy(y), torch.tensor(r.aux_loss, dtype=torch.float32),
            torch.tensor(r.z_loss, dtype=torch.float32), torch.from_numpy(r.expert_ids),
            torch.from_numpy(r.weights), torch.from_numpy(r.counts), handle)


@_forward_op.register_fake
def _(x, weights, layer_id, train):
    layer = _binding(layer_id).layer
    T = x.shape[0]
    inner, rows = ((layer.moe, T * layer.n_heads) if isinstance(layer, _NumpyMultiHeadMoE)
                   else (layer, T))
    # the top-k router gives k slots per token; the others a data-dependent number
    k = inner.top_k if inner.router == "top_k" else torch.library.get_ctx().new_dynamic_size()
    scalar = x.new_empty((), dtype=torch.float32)
    return (x.new_empty((T, layer.d_model), dtype=torch.float32), scalar, scalar.clone(),
            x.new_empty((rows, k), dtype=torch.int32),
            x.new_empty((rows, k), dtype=torch.float32),
            x.new_empty((inner.n_router,), dtype=torch.int64),
            x.new_empty((), dtype=torch.int64))


@torch.library.custom_op(
    "moe::sparse_moe_backward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor handle, Tensor dy, Tensor aux_coef, "
           "Tensor z_coef, int layer_id) -> (Tensor, Tensor[])")
def _backward_op(x, weights, handle, dy, aux_coef, z_coef, layer_id):
    """Gradients of sum(dy * y) + aux_coef * aux + z_coef * z: dx (T, d) float32 and one per
    trainable weight (binding order), in that weight's dtype."""
    b = _binding(layer_id)
    layer = _bind(b, weights)
    g = layer.backward(_context_of(handle), dy.detach().contiguous().numpy(),
                       aux_coef=float(aux_coef), z_coef=float(z_coef), retain=True)
    grads = [torch.from_numpy(g[n]).to(w.dtype)
             for n, w in zip(b.names, weights) if n in b.trainable]
    return torch.from_numpy(g["x"]), grads


@_backward_op.register_fake
def _(x, weights, handle, dy, aux_coef, z_coef, layer_id):
    b = _binding(layer_id)
    return (torch.empty_like(x, dtype=torch.float32),
            [torch.empty_like(w) for n, w in zip(b.names, weights) if n in b.trainable])


class _SparseMoEFunction(torch.autograd.Function):
    """y, aux_loss, z_loss (differentiable) and the routing of the layer `layer_id`.

    The incoming gradients of aux_loss and z_loss are the backward's aux_coef and z_coef."""

    @staticmethod
    def forward(ctx, x, layer_id, trainable, *weights):
        y, aux, z, ids, w, counts, handle = torch.ops.moe.sparse_moe_forward(
            x, list(weights), layer_id, True)
        ctx.mark_non_differentiable(ids, w, counts, handle)
        # saving the weights makes autograd refuse a backward after they changed in place
        ctx.save_for_backward(x, handle, *weights)
        ctx.layer_id, ctx.trainable = layer_id, trainable
        return y, aux, z, ids, w, counts, handle

    @staticmethod
    def backward(ctx, dy, daux, dz, *_):
        x, handle, *weights = ctx.saved_tensors
        dx, grads = torch.ops.moe.sparse_moe_backward(x, weights, handle, dy, daux, dz,
                                                      ctx.layer_id)
        it = iter(grads)
        return (dx, None, None) + tuple(next(it) if t else None for t in ctx.trainable)


# ---- the modules -----------------------------------------------------------------------

def _adopt_weights(module, layer, names):
    """Register the layer's weights `names` (those it has) as the module's parameters
    (expert_bias: a buffer) on the same memory; returns the registered names."""
    out = []
    for name in names:
        arr = getattr(layer, name)
        if arr is None:
            continue
        if not arr.flags.writeable:  # e.g. memory-mapped from a checkpoint
            setattr(layer, name, np.array(arr))
            arr = getattr(layer, name)
        t = _tensor_view(arr)
        if name == "expert_bias":
            module.register_buffer(name, t)
        else:
            module.register_parameter(name, nn.Parameter(t))
        out.append(name)
    return out


class _LayerModule(nn.Module):
    """What SparseMoE and MultiHeadMoE share: the binding to their NumPy layer, the forward
    through the custom ops, to_layer and repack.  A subclass sets _config (its layer's
    constructor arguments), _dtypes (binding name -> parameter dtype) and the binding."""

    def _set_binding(self, binding):
        self._binding = binding
        self._layer_id = _register(binding)
        self._trainable = tuple(n in binding.trainable for n in binding.names)

    # a NumPy layer holds packed weights that do not pickle: copies and pickles rebuild the
    # layer from its config and bind it to the (copied) parameters on the first call
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_binding", None)
        state.pop("_layer_id", None)
        return state

    def _weights(self):
        out = []
        for name in self._binding.names:
            t = functools.reduce(getattr, name.split("."), self)
            if t.dtype != self._dtypes[name]:
                raise TypeError(f"{name} is {t.dtype} but this layer (dtype="
                                f"{self._config['dtype']!r}) needs {self._dtypes[name]}: build "
                                "it with the dtype you want instead of converting the module")
            out.append(t)
        return out

    def forward(self, x, return_routing=False):
        """x: (..., d_model) CPU float tensor -> y of x's shape and dtype [, Routing]."""
        d = self._config["d_model"]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (..., d_model={d}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"moe.torch runs on the CPU: x is on {x.device}")
        weights = self._weights()
        x2 = x.reshape(-1, d).to(torch.float32).contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad
                                                               for w in weights)):
            y, aux, z, ids, w, counts, _ = _SparseMoEFunction.apply(
                x2, self._layer_id, self._trainable, *weights)
        else:
            y, aux, z, ids, w, counts, _ = torch.ops.moe.sparse_moe_forward(
                x2, weights, self._layer_id, False)
        y = y.reshape(x.shape[:-1] + (d,)).to(x.dtype)
        return (y, Routing(ids, w, counts, aux, z)) if return_routing else y

    def to_layer(self):
        """The NumPy layer this module runs, its weights views of the parameters (no copy;
        repacked if they changed).  After editing its packed weights in place through
        NumPy, call layer.pack() (or m.repack())."""
        return _bind(self._binding, self._weights())

    def repack(self):
        """Repack the packed weights now (after writes the version counters do not see)."""
        self._binding.versions.clear()
        _bind(self._binding, self._weights())
        return self

    def extra_repr(self):
        return repr(self._binding.layer)


class SparseMoE(_LayerModule):
    """moe.SparseMoE(d_model, d_ff, n_experts, top_k, **options) as a torch.nn.Module.

    Parameters are named and shaped as the layer's weights (router_weight (E, d); w_gate,
    w_up (E, F, d); w_down (E, d, F); router_bias (E,); b_gate, b_up (E, F); b_down (E, d);
    shared_w_gate, shared_w_up (S*Fs, d); shared_w_down (d, S*Fs); shared_gate_weight (1, d):
    those the config has), expert_bias (E,) is a buffer.  They share memory with the NumPy
    layer (to_layer()).  Parameters are float32, except for dtype="bfloat16" / "float16"
    layers, whose six FFN weights are torch.bfloat16 / torch.float16 parameters on the
    layer's own storage: their gradients are computed in float32 and rounded to that dtype
    (train with dtype="float32", the main path, unless bf16 weights are what you want).

    m(x) -> y; m(x, return_routing=True) -> (y, Routing).  x: (..., d_model) CPU tensor,
    float32 (or bfloat16 / float16 / float64: computed in float32, y and the gradient of x
    in x's dtype).  With grad enabled the forward keeps what the backward needs
    (layer.forward_train); under torch.no_grad() it runs the plain forward.  The routing is
    held fixed in the backward (gradients flow through the selected gates and the losses).

    The kernels run on a packed copy of the FFN weights; a forward repacks when a packed
    parameter's version counter moved (every in-place torch op moves it: optimizer steps,
    load_state_dict, nn.init).  After writing weights through .data or NumPy, call
    m.repack().  Options that the backward does not cover yet (expert LoRA, bf16
    compute) run under no_grad only.
    """

    def __init__(self, d_model, d_ff, n_experts, top_k, **options):
        super().__init__()
        self._adopt(_NumpySparseMoE(d_model, d_ff, n_experts, top_k, **options))

    def _adopt(self, layer):
        """Make the layer's weights this module's parameters / buffer, on the same memory."""
        names = _adopt_weights(self, layer, layer._weight_names())
        self._config = layer.config()
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._set_binding(_Binding(layer, names))

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = _NumpySparseMoE(**self._config, init=False)
        self._set_binding(_Binding(layer, state["_dtypes"]))

    @torch.no_grad()
    def update_expert_bias(self, counts, rate):
        """Auxiliary-loss-free balancing (DeepSeek-V3), in place: expert_bias += rate *
        sign(mean(counts) - counts).  counts: (E,) ints, e.g. Routing.counts.  Call it after
        the backward of the forward that routed with the old bias."""
        if getattr(self, "expert_bias", None) is None:
            raise ValueError("update_expert_bias needs a layer built with expert_bias=True")
        from . import update_expert_bias
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        bias = self.expert_bias.numpy().copy()
        update_expert_bias(bias, counts, rate)
        # through torch, so that the version counter sees it (autograd refuses a pending
        # backward whose forward used the old bias)
        self.expert_bias.copy_(torch.from_numpy(bias))
        return self.expert_bias


class MultiHeadMoE(_LayerModule):
    """moe.MultiHeadMoE(d_model, n_heads, d_ff, n_experts, top_k, **options) as a
    torch.nn.Module.

    Parameters w_in, w_merge (d_model, d_model) and the submodule `moe`: a moe.torch.SparseMoE
    on the inner layer's weights (state_dict keys "moe.router_weight", "moe.w_up", ...), all
    sharing memory with the NumPy layer (to_layer(); to_layer().moe is m.moe.to_layer()).
    The whole layer -- both projections and the inner layer -- runs as one custom-op call
    forward and one backward; m.moe alone is the inner layer as a module of its own
    (m.moe.update_expert_bias(r.counts, rate) for expert_bias).

    m(x) -> y; m(x, return_routing=True) -> (y, Routing) where the routing (and aux_loss /
    z_loss, differentiable) is the inner layer's over the T * n_heads sub-tokens, in token
    order (token t's heads are rows t*n_heads ... t*n_heads + n_heads - 1).  Dtypes,
    no_grad, the routing held fixed in the backward and repacking on version-counter moves
    (of w_in, w_merge and the inner FFN weights) are as in moe.torch.SparseMoE.
    """

    def __init__(self, d_model, n_heads, d_ff, n_experts, top_k, **options):
        super().__init__()
        self._adopt(_NumpyMultiHeadMoE(d_model, n_heads, d_ff, n_experts, top_k, **options))

    def _adopt(self, layer):
        names = _adopt_weights(self, layer, ("w_in", "w_merge"))
        self.moe = _from_sparse(layer.moe)
        self._config = dict(d_model=layer.d_model, n_heads=layer.n_heads,
                            **{k: v for k, v in self.moe._config.items() if k != "d_model"})
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._dtypes.update((f"moe.{n}", t) for n, t in self.moe._dtypes.items())
        self._set_binding(self._binding_for(layer))

    def _binding_for(self, layer):
        inner = self.moe._binding
        names = ("w_in", "w_merge") + tuple(f"moe.{n}" for n in inner.names)
        trainable = ("w_in", "w_merge") + tuple(f"moe.{n}" for n in inner.trainable)
        return _Binding(layer, names, trainable)

    def __setstate__(self, state):
        # (self.moe is already rebuilt, on a layer of its own: rebind it to this one's inner)
        super().__setstate__(state)
        layer = _NumpyMultiHeadMoE(**self._config, init=False)
        self.moe._set_binding(_Binding(layer.moe, self.moe._binding.names))
        self._set_binding(self._binding_for(layer))


def _from_sparse(layer):
    m = SparseMoE.__new__(SparseMoE)
    nn.Module.__init__(m)
    m._adopt(layer)
    return m


def from_layer(layer):
    """A moe.torch.SparseMoE / MultiHeadMoE whose parameters are the NumPy layer's weights
    (no copy: torch.from_numpy; read-only arrays, e.g. memory-mapped, are copied once)."""
    if isinstance(layer, _NumpySparseMoE):
        return _from_sparse(layer)
    if isinstance(layer, _NumpyMultiHeadMoE):
        m = MultiHeadMoE.__new__(MultiHeadMoE)
        nn.Module.__init__(m)
        m._adopt(layer)
        return m
    raise TypeError(f"from_layer takes a moe.SparseMoE or moe.MultiHeadMoE, got "
                    f"{type(layer).__name__}")
