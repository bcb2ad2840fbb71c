"""moe.torch: moe.SparseMoE, moe.MultiHeadMoE, moe.SoftMoE, moe.MixtureOfTokens, moe.PEER and
the mixture-of-LoRA layers of moe.lora (TopKLoRA, SoftLoRA, HydraLoRA, GatedLoRA, FlyLoRA, SMoRA,
MultiLoRA) as torch.nn.Modules with autograd, traceable by torch.compile; plus PEFT LoRA
interop (load_peft_lora, peft_state_dict).

A module's parameters share memory with its NumPy layer's weights; the forward and backward
run the C core through custom ops (torch.ops.moe.sparse_moe_forward / _backward for the two
MoE layers, torch.ops.moe.lora_forward / _backward for every LoRA layer,
torch.ops.moe.soft_moe_forward / _backward for the two soft layers,
torch.ops.moe.peer_forward / _backward for PEER, with fake implementations) wrapped by an
autograd.Function.  Importing `moe` never imports torch: only `import moe.torch` does.
"""
import functools
import itertools
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import layer as _layer_mod
from . import lora as _lora_mod
from . import peer as _peer_mod
from . import soft_moe as _soft_mod
from .layer import SparseMoE as _NumpySparseMoE
from .multihead import MultiHeadMoE as _NumpyMultiHeadMoE
from .quant import QUANT_DTYPES as _QUANT_DTYPES

__all__ = ["FlyLoRA", "GatedLoRA", "HydraLoRA", "MixtureOfTokens", "MultiHeadMoE", "MultiLoRA",
           "PEER", "PEERRouting", "Routing", "SMoRA", "SoftLoRA", "SoftMoE", "SparseMoE",
           "TopKLoRA", "from_layer", "load_peft_lora", "patch", "peft_state_dict", "unpatch"]

# weights whose in-place change needs layer.pack(): the kernels read a packed copy of them
_PACKED = frozenset(_layer_mod._EXPERT_WEIGHTS + ("b_gate", "b_up", "b_down")
                    + _layer_mod._LORA_WEIGHTS)
# ... and a MultiHeadMoE's: its two projections (its inner layer packs its own)
_PACKED_MULTIHEAD = frozenset(("w_in", "w_merge"))
# ... and a SoftMoE's / MixtureOfTokens's: the expert FFN weights (not phi)
_SOFT_PACKED = frozenset(_soft_mod._EXPERT_WEIGHTS)
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
    inner layer), the (data_ptr, _version) of each packed weight at the last pack and the
    `scalars`: names whose layer attribute is a Python float (a soft layer's scale), bound
    to a 0-d tensor by value (written into the layer at every bind)."""

    __slots__ = ("layer", "names", "trainable", "packers", "versions", "scalars", "bound",
                 "__weakref__")

    def __init__(self, layer, names, trainable=_layer_mod._TRAINABLE, scalars=()):
        self.layer, self.names = layer, tuple(names)
        self.trainable = frozenset(self.names) & frozenset(trainable)
        self.scalars = frozenset(self.names) & frozenset(scalars)
        self.packers = ((layer, layer.moe) if isinstance(layer, _NumpyMultiHeadMoE)
                        else (layer,) if hasattr(layer, "pack") else ())  # PEER packs nothing
        self.versions = {}
        # name -> (the layer's array, data_ptr, shape, strides of the tensor) at the last
        # bind that checked them: a call whose tensors and arrays are those skips the check
        self.bound = {}


def _owner(layer, name):
    """The (layer, attribute) that a binding's weight name points to."""
    head, _, attr = name.rpartition(".")
    return (getattr(layer, head) if head else layer), attr


def _packed_names(layer):
    if isinstance(layer, _lora_mod._LoRALayer):  # all but the weights read on every call
        return frozenset(layer._all_weights()) - frozenset(layer._READ_EACH_CALL)
    if isinstance(layer, _soft_mod.SoftMoE):  # the expert FFN weights, not phi
        return _SOFT_PACKED
    if isinstance(layer, _peer_mod.PEER):  # reads its weights as they are
        return frozenset()
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
    A scalar (b.scalars) is copied into the layer as a float every time.
    """
    stale = {}  # id of a layer (b.packers) -> the names of its packed weights that moved
    for name, t in zip(b.names, tensors):
        owner, attr = _owner(b.layer, name)
        if name in b.scalars:
            setattr(owner, attr, float(t.detach()))
            continue
        arr = getattr(owner, attr)
        ptr, shape, stride = t.data_ptr(), t.shape, t.stride()
        seen = b.bound.get(name)
        if (seen is None or seen[0] is not arr or seen[1] != ptr or seen[2] != shape or
                seen[3] != stride):
            if (arr is None or arr.ctypes.data != ptr or arr.shape != tuple(shape) or
                    arr.strides != tuple(st * t.element_size() for st in stride)):
                setattr(owner, attr, _numpy_view(t, name))  # checks the shape
                arr = getattr(owner, attr)
            b.bound[name] = (arr, ptr, shape, stride)
        if attr in _packed_names(owner):
            key = (ptr, _version(t))
            if key[1] is None or b.versions.get(name) != key:
                stale.setdefault(id(owner), []).append(attr)
                b.versions[name] = key
    # (assigning a packed weight drops its layer's pack: _packed is None)
    for layer in b.packers:
        if layer._packed is None or id(layer) in stale:
            if isinstance(layer, _lora_mod._LoRALayer):  # the frozen base stays packed
                layer.pack(changed=stale.get(id(layer), ()))
            else:
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
#
# Each op's function is also kept in _DIRECT: in eager mode on a plain tensor _call runs it
# directly, since the op's dispatch costs ~40 us a call (a large part of a decode step); while
# torch.compile traces, for tensor subclasses (fake tensors) and under a dispatch mode it goes
# through torch.ops.moe.<name>.

_DIRECT = {}


def _direct(name):
    """Decorator (under torch.library.custom_op): keep fn as op `name`'s direct call."""
    def keep(fn):
        _DIRECT[name] = fn
        return fn
    return keep


def _call(name, x, *args):
    """torch.ops.moe.<name>(x, *args), called directly where nothing needs the dispatch."""
    if (type(x) is not torch.Tensor or torch.compiler.is_compiling() or
            _get_current_dispatch_mode() is not None):
        return getattr(torch.ops.moe, name)(x, *args)
    return _DIRECT[name](x, *args)


@torch.library.custom_op(
    "moe::sparse_moe_forward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, int layer_id, bool train) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
@_direct("sparse_moe_forward")
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
@_direct("sparse_moe_backward")
def _backward_op(x, weights, handle, dy, aux_coef, z_coef, layer_id):
    """Gradients of sum(dy * y) + aux_coef * aux + z_coef * z: dx (T, d) float32 and one per
    trainable weight (binding order), in that weight's dtype."""
    dx, grads = layer_backward(x, weights, handle, dy, aux_coef, z_coef, layer_id)
    out, seen = [], set()
    for g, w in zip(grads, (w for n, w in zip(_binding(layer_id).names, weights)
                            if n in _binding(layer_id).trainable)):
        g = g.to(w.dtype)
        if g.untyped_storage().data_ptr() in seen:  # a custom op's outputs alias nothing
            g = g.clone()
        seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return dx, out


def layer_backward(x, weights, handle, dy, aux_coef, z_coef, layer_id):
    """The work of sparse_moe_backward: dx and the trainable weights' gradients (binding
    order), float32 tensors on the core's arrays -- the gradients of weights that are the
    gate / up halves of one fused array are the halves of one fused gradient (views of one
    storage: moe.hf_patch assembles gate_up_proj's gradient without a copy)."""
    b = _binding(layer_id)
    layer = _bind(b, weights)
    g = layer.backward(_context_of(handle), dy.detach().contiguous().numpy(),
                       aux_coef=float(aux_coef), z_coef=float(z_coef), retain=True)
    bases = {}
    grads = [_shared_tensor(g[n], bases) for n in b.names if n in b.trainable]
    return torch.from_numpy(g["x"]), grads


def _shared_tensor(arr, bases):
    """torch.from_numpy(arr), except that views of one C-contiguous base array become views
    of one tensor on it (bases: id -> that tensor), so they keep sharing a storage."""
    base = arr.base
    if not isinstance(base, np.ndarray) or not base.flags.c_contiguous or \
            base.dtype != arr.dtype:
        return torch.from_numpy(arr)
    t = bases.setdefault(id(base), (base, torch.from_numpy(base)))[1]
    size = arr.itemsize
    offset = (arr.__array_interface__["data"][0] - base.__array_interface__["data"][0])
    return t.as_strided(arr.shape, tuple(s // size for s in arr.strides), offset // size)


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
        y, aux, z, ids, w, counts, handle = _call("sparse_moe_forward", x, list(weights),
                                                  layer_id, True)
        ctx.mark_non_differentiable(ids, w, counts, handle)
        # saving the weights makes autograd refuse a backward after they changed in place
        ctx.save_for_backward(x, handle, *weights)
        ctx.layer_id, ctx.trainable = layer_id, trainable
        return y, aux, z, ids, w, counts, handle

    @staticmethod
    def backward(ctx, dy, daux, dz, *_):
        x, handle, *weights = ctx.saved_tensors
        dx, grads = _call("sparse_moe_backward", x, weights, handle, dy, daux, dz,
                                                      ctx.layer_id)
        it = iter(grads)
        return (dx, None, None) + tuple(next(it) if t else None for t in ctx.trainable)


# ---- the LoRA layers' custom ops ------------------------------------------------------
#
# One pair for the seven moe.lora layers.  Besides x and the weights they take `extra`, the
# layer's per-call input flattened over the tokens: GatedLoRA's scalings (T, E) float32,
# MultiLoRA's adapter_ids (T,) int64, a routed layer's seq_lens (n_seq,) int64 -- or an
# empty tensor (no seq_lens; FlyLoRA and SMoRA take nothing).

def _lora_routing_shape(layer):
    """(slots per token, length of counts) of a LoRA layer's RoutingResult."""
    if isinstance(layer, _lora_mod.MultiLoRA):
        return 1, layer.n_experts
    if layer._KIND == _lora_mod._RANKS:  # FlyLoRA, SMoRA: the ranks are the experts
        return layer.top_k, layer.rank
    return (layer.n_experts if layer.top_k is None else layer.top_k), layer.n_experts


def _lora_call_args(layer, extra, n_tokens):
    """The layer's per-call arguments (args, kwargs) from the op's `extra` tensor."""
    if isinstance(layer, (_lora_mod.GatedLoRA, _lora_mod.MultiLoRA)):
        return (extra.detach().contiguous().numpy(),), {}
    if isinstance(layer, _lora_mod._RoutedLoRA) and layer.per_sequence and (
            extra.numel() or n_tokens == 0):
        return (), {"seq_lens": extra.detach().contiguous().numpy()}
    return (), {}


@torch.library.custom_op(
    "moe::lora_forward", mutates_args=(),
    schema="(Tensor x, Tensor extra, Tensor[] weights, int layer_id, bool train) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
@_direct("lora_forward")
def _lora_forward_op(x, extra, weights, layer_id, train):
    """x (T, d_in) float32, extra (see above), weights in the binding's order -> y (T, d_out)
    float32, aux, z (0-d float32), expert_ids (T, k) int32, weights (T, k) float32, counts
    int64 and the handle of the training context (-1 when train is False)."""
    layer = _bind(_binding(layer_id), weights)
    xn = x.detach().contiguous().numpy()
    args, kw = _lora_call_args(layer, extra, xn.shape[0])
    if train:
        y, ctx = layer.forward_train(xn, *args, **kw)
        r, handle = ctx.routing, _handle_for(ctx)
    else:
        y, r = layer(xn, *args, return_routing=True, **kw)
        handle = torch.tensor(-1, dtype=torch.int64)
    T = xn.shape[0]
    return (torch.from_numpy(np.ascontiguousarray(y.reshape(T, layer.d_out))),
            torch.tensor(r.aux_loss, dtype=torch.float32),
            torch.tensor(r.z_loss, dtype=torch.float32),
            torch.from_numpy(np.array(r.expert_ids, np.int32)),
            torch.from_numpy(np.array(r.weights, np.float32)),
            torch.from_numpy(np.array(r.counts, np.int64)), handle)


@_lora_forward_op.register_fake
def _(x, extra, weights, layer_id, train):
    layer = _binding(layer_id).layer
    T = x.shape[0]
    k, n = _lora_routing_shape(layer)
    scalar = x.new_empty((), dtype=torch.float32)
    return (x.new_empty((T, layer.d_out), dtype=torch.float32), scalar, scalar.clone(),
            x.new_empty((T, k), dtype=torch.int32), x.new_empty((T, k), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.int64), x.new_empty((), dtype=torch.int64))


@torch.library.custom_op(
    "moe::lora_backward", mutates_args=(),
    schema="(Tensor x, Tensor extra, Tensor[] weights, Tensor handle, Tensor dy, "
           "Tensor aux_coef, Tensor z_coef, int layer_id) -> (Tensor, Tensor, Tensor[])")
@_direct("lora_backward")
def _lora_backward_op(x, extra, weights, handle, dy, aux_coef, z_coef, layer_id):
    """Gradients of sum(dy * y) + aux_coef * aux + z_coef * z: dx (T, d_in) float32, d extra
    (GatedLoRA: the scalings' (T, E) float32; others: an empty tensor) and one per trainable
    weight (binding order), in that weight's dtype."""
    b = _binding(layer_id)
    layer = _bind(b, weights)
    g = layer.backward(_context_of(handle), dy.detach().contiguous().numpy(),
                       aux_coef=float(aux_coef), z_coef=float(z_coef), retain=True)
    d_extra = (torch.from_numpy(np.ascontiguousarray(g["scalings"], np.float32))
               if "scalings" in g else x.new_empty((0,), dtype=torch.float32))
    grads = [torch.from_numpy(g[n]).to(w.dtype)
             for n, w in zip(b.names, weights) if n in b.trainable]
    return torch.from_numpy(np.ascontiguousarray(g["x"])), d_extra, grads


@_lora_backward_op.register_fake
def _(x, extra, weights, handle, dy, aux_coef, z_coef, layer_id):
    b = _binding(layer_id)
    d_extra = (torch.empty_like(extra, dtype=torch.float32)
               if isinstance(b.layer, _lora_mod.GatedLoRA)
               else x.new_empty((0,), dtype=torch.float32))
    return (torch.empty_like(x, dtype=torch.float32), d_extra,
            [torch.empty_like(w) for n, w in zip(b.names, weights) if n in b.trainable])


class _LoRAFunction(torch.autograd.Function):
    """_SparseMoEFunction for the LoRA layers: one more input, `extra`, which takes a
    gradient (GatedLoRA's scalings) when it requires one."""

    @staticmethod
    def forward(ctx, x, extra, layer_id, trainable, *weights):
        y, aux, z, ids, w, counts, handle = _call(
            "lora_forward", x, extra, list(weights), layer_id, True)
        ctx.mark_non_differentiable(ids, w, counts, handle)
        ctx.save_for_backward(x, extra, handle, *weights)
        ctx.layer_id, ctx.trainable = layer_id, trainable
        return y, aux, z, ids, w, counts, handle

    @staticmethod
    def backward(ctx, dy, daux, dz, *_):
        x, extra, handle, *weights = ctx.saved_tensors
        dx, d_extra, grads = _call("lora_backward", x, extra, weights, handle, dy, daux,
                                                         dz, ctx.layer_id)
        it = iter(grads)
        return ((dx, d_extra if ctx.needs_input_grad[1] else None, None, None)
                + tuple(next(it) if t else None for t in ctx.trainable))


# ---- the modules -----------------------------------------------------------------------

def _adopt_weights(module, layer, names, buffers=("expert_bias",), frozen=()):
    """Register the layer's weights `names` (those it has) as the module's parameters
    (`buffers` as buffers, `frozen` as parameters with requires_grad=False) on the same
    memory; returns the registered names."""
    out = []
    for name in names:
        arr = getattr(layer, name)
        if arr is None:
            continue
        if not arr.flags.writeable:  # e.g. memory-mapped from a checkpoint
            setattr(layer, name, np.array(arr))
            arr = getattr(layer, name)
        t = _tensor_view(arr)
        if name in buffers:
            module.register_buffer(name, t)
        else:
            module.register_parameter(name, nn.Parameter(t, requires_grad=name not in frozen))
        out.append(name)
    return out


def _sparse_trainable(layer):
    """The weights a SparseMoE's backward can return (those it has are picked by the
    binding's names): with expert LoRA the adapters instead of the experts."""
    if not layer.lora_rank:
        return _layer_mod._TRAINABLE
    return (tuple(n for n in _layer_mod._TRAINABLE if n not in _layer_mod._FROZEN_BY_LORA)
            + _layer_mod._LORA_WEIGHTS)


class _LayerModule(nn.Module):
    """What SparseMoE and MultiHeadMoE share: the binding to their NumPy layer, the forward
    through the custom ops, to_layer and repack.  A subclass sets _config (its layer's
    constructor arguments), _dtypes (binding name -> parameter dtype) and the binding."""

    def _set_binding(self, binding):
        self._binding = binding
        self._layer_id = _register(binding)
        if hasattr(binding.layer, "recompute_hidden"):
            binding.layer.recompute_hidden = self.__dict__.get("_recompute_hidden", True)
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
                dtype = self._config.get("dtype", "float32")
                raise TypeError(f"{name} is {t.dtype} but this layer (dtype={dtype!r}) needs "
                                f"{self._dtypes[name]}: build it with the dtype you want "
                                "instead of converting the module")
            out.append(t)
        return out

    @staticmethod
    def _tokens(x, d, what="d_model"):
        """x checked (a CPU float tensor of shape (..., d)) -> (T, d) float32 contiguous."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (..., {what}={d}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"moe.torch runs on the CPU: x is on {x.device}")
        return x.reshape(-1, d).to(torch.float32).contiguous()

    def forward(self, x, return_routing=False):
        """x: (..., d_model) CPU float tensor -> y of x's shape and dtype [, Routing]."""
        d = self._config["d_model"]
        x2 = self._tokens(x, d)
        weights = self._weights()
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad
                                                               for w in weights)):
            y, aux, z, ids, w, counts, _ = _SparseMoEFunction.apply(
                x2, self._layer_id, self._trainable, *weights)
        else:
            y, aux, z, ids, w, counts, _ = _call("sparse_moe_forward", x2, weights,
                                                         self._layer_id, False)
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
    m.repack().  With expert LoRA (lora_rank > 0) the experts are frozen parameters and the
    adapters (lora_a_<t>, lora_b_<t>) and the router train.  compute_dtype="bfloat16"
    trains too (moe.SparseMoE.backward: bf16 products, float32 gradients).  m.recompute_hidden = False makes training
    forwards keep the gate / up pre-activations (more memory, a faster backward, the same
    gradients; moe.SparseMoE.forward_train).
    """

    @property
    def recompute_hidden(self):
        """True (default): the backward recomputes the routed rows' gate / up
        pre-activations; False: the training forward keeps them (4 T k d_ff bytes each)."""
        return self.__dict__.get("_recompute_hidden", True)

    @recompute_hidden.setter
    def recompute_hidden(self, value):
        self.__dict__["_recompute_hidden"] = bool(value)
        self._binding.layer.recompute_hidden = bool(value)

    def __init__(self, d_model, d_ff, n_experts, top_k, **options):
        super().__init__()
        self._adopt(_NumpySparseMoE(d_model, d_ff, n_experts, top_k, **options))

    def _adopt(self, layer):
        """Make the layer's weights this module's parameters / buffer, on the same memory
        (with expert LoRA the experts are frozen parameters: requires_grad False)."""
        quantized = [f"{n}={getattr(layer, n)!r}" for n in ("dtype", "shared_dtype")
                     if getattr(layer, n) in _QUANT_DTYPES]
        if quantized:
            raise TypeError("moe.torch.SparseMoE holds float weights as parameters; a "
                            f"quantized layer ({', '.join(quantized)}) runs as moe.SparseMoE "
                            "(NumPy / DLPack inputs, e.g. torch tensors through "
                            "np.from_dlpack); train the float module, then moe.quantize "
                            "its to_layer()")
        frozen = _layer_mod._FROZEN_BY_LORA if layer.lora_rank else ()
        names = _adopt_weights(self, layer, layer._weight_names(), frozen=frozen)
        self._config = layer.config()
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._set_binding(_Binding(layer, names, _sparse_trainable(layer)))

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = _NumpySparseMoE(**self._config, init=False)
        self._set_binding(_Binding(layer, state["_dtypes"], _sparse_trainable(layer)))

    @torch.no_grad()
    def update_expert_bias(self, counts, rate):
        """Auxiliary-loss-free balancing (DeepSeek-V3), in place: expert_bias += rate *
        sign(mean(counts) - counts).  counts: (E,) ints, e.g. Routing.counts.  Call it after
        the backward of the forward that routed with the old bias."""
        if getattr(self, "expert_bias", None) is None:
            raise ValueError("update_expert_bias needs a layer built with expert_bias=True")
        return _update_bias_buffer(self.expert_bias, counts, rate)


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
    """A moe.torch.SparseMoE / MultiHeadMoE / SoftMoE / MixtureOfTokens / PEER / LoRA module
    (TopKLoRA, ...) whose parameters are the NumPy layer's weights (no copy:
    torch.from_numpy; read-only arrays, e.g. memory-mapped, are copied once; a soft layer's
    scale becomes a 0-d float32 parameter)."""
    if isinstance(layer, _NumpySparseMoE):
        return _from_sparse(layer)
    cls = MultiHeadMoE if isinstance(layer, _NumpyMultiHeadMoE) else (
        _SOFT_MODULES.get(type(layer)) or _LORA_MODULES.get(type(layer))
        or (PEER if type(layer) is _peer_mod.PEER else None))
    if cls is None:
        raise TypeError(f"from_layer takes a moe.SparseMoE, moe.MultiHeadMoE, moe.SoftMoE, "
                        f"moe.MixtureOfTokens, moe.PEER or a moe.lora layer ("
                        f"{', '.join(sorted(c.__name__ for c in _LORA_MODULES))}), got "
                        f"{type(layer).__name__}")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m._adopt(layer)
    return m



# ---- the mixture-of-LoRA layers --------------------------------------------------------

# weights that are buffers (never trained, not parameters)
_LORA_BUFFERS = ("rank_bias", "scalings")


class _LoRAModule(_LayerModule):
    """What the moe.lora modules share.  A subclass sets _NUMPY (its moe.lora class) and a
    forward that passes its per-call input to _run."""

    _NUMPY = None

    def _adopt(self, layer):
        names = [n for n in layer._weight_names() if getattr(layer, n) is not None]
        trainable = layer.trainable_weights()
        frozen = [n for n in names if n not in trainable and n not in _LORA_BUFFERS]
        names = _adopt_weights(self, layer, names, buffers=_LORA_BUFFERS, frozen=frozen)
        self._config = layer.config()
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._set_binding(_Binding(layer, names, trainable))

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = self._NUMPY(**self._config, init=False)
        self._set_binding(_Binding(layer, state["_dtypes"], layer.trainable_weights()))

    @property
    def scaling(self):
        """The layer's LoRA scaling (alpha / rank; SMoRA: alpha / top_k)."""
        return self._binding.layer.scaling

    def _run(self, x, extra, return_routing):
        """The forward: x (..., d_in), extra (the op's per-call tensor, over the tokens)."""
        d_in, d_out = self._config["d_in"], self._config["d_out"]
        x2 = self._tokens(x, d_in, "d_in")
        weights = self._weights()
        if torch.is_grad_enabled() and (x.requires_grad or extra.requires_grad
                                        or any(w.requires_grad for w in weights)):
            for name, w, t in zip(self._binding.names, weights, self._trainable):
                if w.requires_grad and not t:
                    raise ValueError(
                        f"{name} is frozen (moe.torch computes no gradient for it) but "
                        f"requires grad: call {name}.requires_grad_(False), or run under "
                        "torch.no_grad()")
            y, aux, z, ids, w, counts, _ = _LoRAFunction.apply(
                x2, extra, self._layer_id, self._trainable, *weights)
        else:
            y, aux, z, ids, w, counts, _ = _call(
                "lora_forward", x2, extra, weights, self._layer_id, False)
        y = y.reshape(x.shape[:-1] + (d_out,)).to(x.dtype)
        return (y, Routing(ids, w, counts, aux, z)) if return_routing else y

    @staticmethod
    def _no_extra(x):
        return torch.empty((0,), dtype=torch.int64)


class _RoutedLoRAModule(_LoRAModule):
    def forward(self, x, seq_lens=None, return_routing=False):
        """x: (..., d_in) CPU float tensor [, seq_lens (n_seq,) ints for per_sequence=True
        (default for a 3-D x: one sequence per row)] -> y (..., d_out) of x's dtype
        [, Routing with differentiable aux_loss / z_loss]."""
        if seq_lens is None:
            if self._config["per_sequence"] and isinstance(x, torch.Tensor) and x.dim() == 3:
                extra = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
            else:
                extra = self._no_extra(x)
        else:
            extra = torch.as_tensor(seq_lens).detach().reshape(-1)
            if extra.is_floating_point() or extra.is_complex():
                raise TypeError(f"seq_lens must be integers, got {extra.dtype}")
            extra = extra.to(torch.int64).contiguous()
        return self._run(x, extra, return_routing)


class TopKLoRA(_RoutedLoRAModule):
    """moe.lora.TopKLoRA (MixLoRA / MoLA) as a torch.nn.Module: same constructor arguments.

    Parameters router_weight (E, d_in), lora_a (E, r, d_in), lora_b (E, d_out, r), trainable;
    base_weight (d_out, d_in) and base_bias (d_out,) (bias=True) are frozen *parameters*
    (requires_grad=False, as PEFT keeps its base layer's weight; dtype="bfloat16" /
    "float16" makes base_weight a torch.bfloat16 / float16 parameter).  All share memory
    with the NumPy layer (to_layer()); state_dict keys are the weight names.

    m(x, seq_lens=None, return_routing=False): x (..., d_in) CPU float tensor (bfloat16 /
    float64 computed in float32, y and x's gradient in x's dtype) -> y (..., d_out)
    [, Routing: aux_loss / z_loss differentiable].  The selection is held fixed in the
    backward; under torch.no_grad() the plain forward runs.  In-place updates (optimizer
    steps, load_state_dict) are seen through the version counters, as in moe.torch.SparseMoE;
    after writes through .data or NumPy call m.repack().
    """

    _NUMPY = _lora_mod.TopKLoRA

    def __init__(self, d_in, d_out, n_experts, rank, top_k=2, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, n_experts, rank, top_k, **options))


class SoftLoRA(_RoutedLoRAModule):
    """moe.lora.SoftLoRA (MoLoRA / LoRAMoE) as a torch.nn.Module: parameters, forward and
    frozen base as in moe.torch.TopKLoRA."""

    _NUMPY = _lora_mod.SoftLoRA

    def __init__(self, d_in, d_out, n_experts, rank, top_k=None, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, n_experts, rank, top_k, **options))


class HydraLoRA(_RoutedLoRAModule):
    """moe.lora.HydraLoRA as a torch.nn.Module: router_weight (E, d_in), the shared lora_a
    (r, d_in) and the heads lora_b (E, d_out, r) trainable; forward and frozen base as in
    moe.torch.TopKLoRA."""

    _NUMPY = _lora_mod.HydraLoRA

    def __init__(self, d_in, d_out, n_experts, rank, top_k=None, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, n_experts, rank, top_k, **options))


class GatedLoRA(_LoRAModule):
    """moe.lora.GatedLoRA (X-LoRA) as a torch.nn.Module: lora_a (E, r, d_in), lora_b
    (E, d_out, r) trainable, the base frozen as in moe.torch.TopKLoRA.

    m(x, scalings, return_routing=False): scalings (..., E) float tensor, x's leading shape;
    when it requires grad it gets one (X-LoRA trains the scaling head that produces it;
    through the softmax of the kept ones with top_k / softmax_topk).  The Routing's
    aux_loss / z_loss are 0 (no router)."""

    _NUMPY = _lora_mod.GatedLoRA

    def __init__(self, d_in, d_out, n_experts, rank, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, n_experts, rank, **options))

    def forward(self, x, scalings, return_routing=False):
        E = self._config["n_experts"]
        if not isinstance(scalings, torch.Tensor):
            scalings = torch.as_tensor(np.asarray(scalings, np.float32))
        lead = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) else None
        if lead is not None and tuple(scalings.shape) != lead + (E,):
            raise ValueError(f"scalings must have shape {lead + (E,)} (x's leading shape, "
                             f"n_experts), got {tuple(scalings.shape)}")
        if not scalings.is_floating_point():
            raise TypeError(f"scalings must be a floating-point tensor, got {scalings.dtype}")
        extra = scalings.reshape(-1, E).to(torch.float32).contiguous()
        return self._run(x, extra, return_routing)


class FlyLoRA(_LoRAModule):
    """moe.lora.FlyLoRA as a torch.nn.Module: lora_b (d_out, r) trainable; lora_a (r, d_in),
    the frozen sparse random projection, a parameter with requires_grad=False (like the
    base); rank_bias (r,) a buffer (update it with m.update_bias(counts), e.g. Routing.counts,
    or update_bias="every-forward").  m(x, return_routing=False)."""

    _NUMPY = _lora_mod.FlyLoRA

    def __init__(self, d_in, d_out, rank, top_k, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, rank, top_k, **options))

    def forward(self, x, return_routing=False):
        return self._run(x, self._no_extra(x), return_routing)

    def update_bias(self, counts, rate=None):
        """rank_bias += rate * sign(mean(counts) - counts) (rate defaults to bias_rate), in
        place through torch.  counts: (r,) ints, e.g. Routing.counts."""
        return _update_rank_bias(self, counts, self._config["bias_rate"] if rate is None
                                 else rate)


class SMoRA(_LoRAModule):
    """moe.lora.SMoRA as a torch.nn.Module: router_weight (r / rank_partition, d_in), lora_a
    (r, d_in), lora_b (d_out, r) trainable; rank_bias (r,) a buffer (m.update_bias(counts,
    rate)); base frozen as in moe.torch.TopKLoRA.  m(x, return_routing=False), aux_loss /
    z_loss differentiable."""

    _NUMPY = _lora_mod.SMoRA

    def __init__(self, d_in, d_out, rank, top_k, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, rank, top_k, **options))

    forward = FlyLoRA.forward

    def update_bias(self, counts, rate=1e-5):
        """rank_bias += rate * sign(mean(counts) - counts), in place through torch."""
        return _update_rank_bias(self, counts, rate)


def _update_rank_bias(module, counts, rate):
    return _update_bias_buffer(module.rank_bias, counts, rate)


@torch.no_grad()
def _update_bias_buffer(buffer, counts, rate):
    """buffer += rate * sign(mean(counts) - counts) (moe.update_expert_bias), in place
    through torch so that the version counter sees it (autograd refuses a pending backward
    whose forward used the old bias)."""
    from . import update_expert_bias
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    bias = buffer.numpy().copy()
    update_expert_bias(bias, counts, rate)
    buffer.copy_(torch.from_numpy(bias))
    return buffer


class MultiLoRA(_LoRAModule):
    """moe.lora.MultiLoRA (Punica / S-LoRA batches) as a torch.nn.Module: lora_a (N, r, d_in),
    lora_b (N, d_out, r) trainable, scalings (N,) a buffer, base frozen as in
    moe.torch.TopKLoRA.

    m(x, adapter_ids, return_routing=False): adapter_ids (...) ints in [-1, N) per token
    (x's leading shape; -1: base only) or one int for the whole batch.  Install an adapter
    with m.set_adapter(i, lora_a, lora_b, alpha) or load_peft_lora(m, state_dict, index=i)
    (in place: not the NumPy layer's set_adapter, which would replace the shared arrays)."""

    _NUMPY = _lora_mod.MultiLoRA

    def __init__(self, d_in, d_out, n_adapters, rank, **options):
        super().__init__()
        self._adopt(self._NUMPY(d_in, d_out, n_adapters, rank, **options))

    def forward(self, x, adapter_ids, return_routing=False):
        ids = torch.as_tensor(adapter_ids).detach()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"adapter_ids must be integers, got {ids.dtype}")
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            lead = tuple(x.shape[:-1])
            if ids.dim() == 0:
                ids = ids.expand(lead)
            elif tuple(ids.shape) != lead:
                raise ValueError(f"adapter_ids must have x's leading shape {lead} (or be one "
                                 f"int), got {tuple(ids.shape)}")
        return self._run(x, ids.reshape(-1).to(torch.int64).contiguous(), return_routing)

    def set_adapter(self, i, lora_a, lora_b, alpha=None):
        """Install adapter i in place: lora_a (r_i, d_in), lora_b (d_out, r_i), r_i <= rank
        (zero-padded), scaling alpha / r_i (alpha defaults to r_i)."""
        _load_adapter(self, {"lora_A.weight": lora_a, "lora_B.weight": lora_b}, index=i,
                      alpha=alpha)
        return self


_LORA_MODULES = {c._NUMPY: c for c in (TopKLoRA, SoftLoRA, HydraLoRA, GatedLoRA, FlyLoRA,
                                       SMoRA, MultiLoRA)}


# ---- the soft layers: SoftMoE and MixtureOfTokens ---------------------------------------
#
# One custom-op pair for both.  x keeps its shape ((B, m, d) or 2-D, as the NumPy layer's
# __call__ takes it): the groups depend on it.  The temperature (a MixtureOfTokens module's
# plain attribute) is an argument of the forward op, written into the layer at each call;
# the normalised layers' `scale` is a 0-d float32 parameter, bound by value (b.scalars).

@torch.library.custom_op(
    "moe::soft_moe_forward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, int layer_id, float temperature, bool train) -> "
           "(Tensor, Tensor)")
@_direct("soft_moe_forward")
def _soft_forward_op(x, weights, layer_id, temperature, train):
    """x (B, m, d) or 2-D float32, weights in the binding's order -> y (x's shape) float32
    and the handle of the training context (-1 when train is False)."""
    layer = _bind(_binding(layer_id), weights)
    if isinstance(layer, _soft_mod.MixtureOfTokens):
        layer.temperature = temperature
    xn = x.detach().contiguous().numpy()
    if train:
        y, ctx = layer.forward_train(xn)
        handle = _handle_for(ctx)
    else:
        y = layer(xn)
        handle = torch.tensor(-1, dtype=torch.int64)
    return torch.from_numpy(np.ascontiguousarray(y)), handle


@_soft_forward_op.register_fake
def _(x, weights, layer_id, temperature, train):
    return torch.empty_like(x, dtype=torch.float32), x.new_empty((), dtype=torch.int64)


@torch.library.custom_op(
    "moe::soft_moe_backward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor handle, Tensor dy, int layer_id) -> "
           "(Tensor, Tensor[])")
@_direct("soft_moe_backward")
def _soft_backward_op(x, weights, handle, dy, layer_id):
    """Gradients of sum(dy * y): dx (x's shape) float32 and one per trainable weight
    (binding order) in that weight's dtype (scale: 0-d float32)."""
    b = _binding(layer_id)
    layer = _bind(b, weights)
    g = layer.backward(_context_of(handle), dy.detach().contiguous().numpy(), retain=True)
    grads = [torch.tensor(g[n], dtype=w.dtype) if n in b.scalars
             else torch.from_numpy(g[n]).to(w.dtype)
             for n, w in zip(b.names, weights) if n in b.trainable]
    return torch.from_numpy(np.ascontiguousarray(g["x"]).reshape(x.shape)), grads


@_soft_backward_op.register_fake
def _(x, weights, handle, dy, layer_id):
    b = _binding(layer_id)
    return (torch.empty_like(x, dtype=torch.float32),
            [torch.empty_like(w) for n, w in zip(b.names, weights) if n in b.trainable])


class _SoftMoEFunction(torch.autograd.Function):
    """y of the soft layer `layer_id` (and the handle, not differentiable)."""

    @staticmethod
    def forward(ctx, x, layer_id, temperature, trainable, *weights):
        y, handle = _call("soft_moe_forward", x, list(weights), layer_id, temperature,
                                                   True)
        ctx.mark_non_differentiable(handle)
        # saving the weights makes autograd refuse a backward after they changed in place
        ctx.save_for_backward(x, handle, *weights)
        ctx.layer_id, ctx.trainable = layer_id, trainable
        return y, handle

    @staticmethod
    def backward(ctx, dy, _):
        x, handle, *weights = ctx.saved_tensors
        dx, grads = _call("soft_moe_backward", x, weights, handle, dy, ctx.layer_id)
        it = iter(grads)
        return (dx, None, None, None) + tuple(next(it) if t else None for t in ctx.trainable)


class _SoftModule(_LayerModule):
    """What SoftMoE and MixtureOfTokens share.  A subclass sets _NUMPY (its NumPy class)."""

    _NUMPY = None
    _WHAT = "(batch, tokens, d_model) or (tokens, d_model)"

    def _adopt(self, layer):
        names = _adopt_weights(self, layer, layer._weight_names(), buffers=())
        if layer.normalize:
            self.register_parameter("scale", nn.Parameter(
                torch.tensor(layer.scale, dtype=torch.float32)))
            names.append("scale")
        self._config = layer.config()
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._set_binding(self._binding_for(layer, names))

    @staticmethod
    def _binding_for(layer, names):
        return _Binding(layer, names, layer.trainable_weights(), scalars=("scale",))

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = self._NUMPY(**self._config, init=False)
        self._set_binding(self._binding_for(layer, state["_dtypes"]))

    def _temperature(self):
        return 1.0

    def forward(self, x):
        """x: (B, m, d_model) or 2-D (see the class) CPU float tensor -> y of x's shape and
        dtype (computed in float32)."""
        d = self._config["d_model"]
        x2 = self._tokens(x, d)  # the checks of every module
        if x.dim() not in (2, 3):
            raise ValueError(f"x must have shape {self._WHAT} with d_model={d}, got "
                             f"{tuple(x.shape)}")
        x2 = x2.reshape(x.shape)
        weights = self._weights()
        temp = self._temperature()
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad
                                                               for w in weights)):
            y, _ = _SoftMoEFunction.apply(x2, self._layer_id, temp, self._trainable, *weights)
        else:
            y, _ = _call("soft_moe_forward", x2, weights, self._layer_id, temp, False)
        return y.to(x.dtype)

    def to_layer(self):
        """The NumPy layer this module runs, its weights views of the parameters (no copy;
        repacked if they changed; scale and temperature copied in).  After editing its
        packed weights in place through NumPy, call layer.pack() (or m.repack())."""
        layer = super().to_layer()
        if isinstance(layer, _soft_mod.MixtureOfTokens):
            layer.temperature = self._temperature()
        return layer


class SoftMoE(_SoftModule):
    """moe.SoftMoE(d_model, d_ff, n_experts, slots_per_expert=1, **options) as a
    torch.nn.Module: same constructor arguments (activation, normalize, scale, dtype, seed,
    init, swiglu_alpha, swiglu_limit).

    Parameters are named and shaped as the layer's weights: phi (d, E*s) float32; w_gate
    (gated activations only), w_up (E, F, d) and w_down (E, d, F), float32 or, for
    dtype="bfloat16" / "float16", torch.bfloat16 / torch.float16 parameters on the layer's
    own storage (gradients computed in float32 and rounded to that dtype); with
    normalize=True, `scale`, a 0-d float32 parameter (trainable; copied into the layer's
    float scale at every forward).  They share memory with the NumPy layer (to_layer()).

    m(x) -> y.  x: (B, m, d_model) B groups of m tokens, or (m, d_model) one group; CPU
    float32 (other float dtypes computed in float32, y and the gradient of x in x's dtype).
    With grad enabled the forward keeps what the backward needs (layer.forward_train);
    under torch.no_grad() it runs the plain forward.  The expert weights run packed; the
    forward repacks when their version counter moved (optimizer steps, load_state_dict);
    after writes through .data or NumPy, call m.repack().
    """

    _NUMPY = _soft_mod.SoftMoE

    def __init__(self, d_model, d_ff, n_experts, slots_per_expert=1, **options):
        super().__init__()
        self._adopt(_soft_mod.SoftMoE(d_model, d_ff, n_experts, slots_per_expert, **options))


class MixtureOfTokens(_SoftModule):
    """moe.MixtureOfTokens(d_model, d_ff, n_experts, slots_per_expert=1, **options) as a
    torch.nn.Module: same constructor arguments (temperature, mixing, group_size and those
    of moe.torch.SoftMoE), same parameters.

    m(x) -> y.  x: (B, m, d_model) B sequences of m tokens (groups across the batch: the
    tokens at one position of group_size consecutive sequences), or (B, d_model) one
    position.  `temperature` is a plain attribute (a float, not trained), read at every
    forward; mixing and group_size are fixed at construction.  Everything else as in
    moe.torch.SoftMoE.
    """

    _NUMPY = _soft_mod.MixtureOfTokens
    _WHAT = "(batch, tokens, d_model) or (batch, d_model)"

    def __init__(self, d_model, d_ff, n_experts, slots_per_expert=1, **options):
        super().__init__()
        self._adopt(_soft_mod.MixtureOfTokens(d_model, d_ff, n_experts, slots_per_expert,
                                              **options))

    def _adopt(self, layer):
        super()._adopt(layer)
        self.temperature = layer.temperature

    def _temperature(self):
        return float(self.temperature)  # (checked by the layer in the op)


_SOFT_MODULES = {c._NUMPY: c for c in (SoftMoE, MixtureOfTokens)}


# ---- PEER -------------------------------------------------------------------------------
#
# One custom-op pair.  A custom op returns strided tensors only, so the backward op returns
# u's and v's gradients as rows: `used` (U,) int64, the experts the batch retrieved
# (ascending; U is data-dependent, a dynamic size in the fake op), and du (U, d_model), dv
# (U, d_out); the autograd.Function makes them sparse COO gradients (as
# nn.Embedding(sparse=True) does), so nothing of size (N, d) is ever formed.

class PEERRouting(NamedTuple):
    """What moe.torch.PEER(x, return_routing=True) returns beside y, without grad:
    expert_ids (..., n_heads, top_k) int32, best first (e = i * n_sub_keys + j), and gates
    (..., n_heads, top_k) float32 (softmax over each head's k scores)."""

    expert_ids: torch.Tensor
    gates: torch.Tensor


@torch.library.custom_op(
    "moe::peer_forward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, int layer_id, bool train) -> "
           "(Tensor, Tensor, Tensor, Tensor)")
@_direct("peer_forward")
def _peer_forward_op(x, weights, layer_id, train):
    """x (T, d_model) float32, weights (w_query, sub_keys_1, sub_keys_2, u, v) -> y (T, d_out)
    float32, expert_ids (T, H, k) int32, gates (T, H, k) float32 and the handle of the
    training context (-1 when train is False)."""
    layer = _bind(_binding(layer_id), weights)
    xn = x.detach().contiguous().numpy()
    if train:
        y, ctx = layer.forward_train(xn)
        r, handle = ctx.routing, _handle_for(ctx)
    else:
        y, r = layer(xn, return_routing=True)
        handle = torch.tensor(-1, dtype=torch.int64)
    return (torch.from_numpy(np.ascontiguousarray(y)),
            torch.from_numpy(np.array(r.expert_ids, np.int32)),
            torch.from_numpy(np.array(r.gates, np.float32)), handle)


@_peer_forward_op.register_fake
def _(x, weights, layer_id, train):
    layer = _binding(layer_id).layer
    T, H, k = x.shape[0], layer.n_heads, layer.top_k
    return (x.new_empty((T, layer.d_out), dtype=torch.float32),
            x.new_empty((T, H, k), dtype=torch.int32),
            x.new_empty((T, H, k), dtype=torch.float32), x.new_empty((), dtype=torch.int64))


@torch.library.custom_op(
    "moe::peer_backward", mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor handle, Tensor dy, int layer_id) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
@_direct("peer_backward")
def _peer_backward_op(x, weights, handle, dy, layer_id):
    """Gradients of sum(dy * y): dx (T, d_model), w_query's, sub_keys_1's, sub_keys_2's
    (their shapes) float32, and u's and v's as rows: used (U,) int64 (the experts the batch
    retrieved, ascending), du (U, d_model), dv (U, d_out) float32."""
    layer = _bind(_binding(layer_id), weights)
    g = layer.backward(_context_of(handle), dy.detach().contiguous().numpy(), retain=True)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))
    return (t(g["x"]), t(g["w_query"]), t(g["sub_keys_1"]), t(g["sub_keys_2"]),
            t(g["u"].indices), t(g["u"].values), t(g["v"].values))


@_peer_backward_op.register_fake
def _(x, weights, handle, dy, layer_id):
    layer = _binding(layer_id).layer
    U = torch.library.get_ctx().new_dynamic_size()
    return ((torch.empty_like(x, dtype=torch.float32),)
            + tuple(torch.empty_like(w) for w in weights[:3])
            + (x.new_empty((U,), dtype=torch.int64),
               x.new_empty((U, layer.d_model), dtype=torch.float32),
               x.new_empty((U, layer.d_out), dtype=torch.float32)))


class _PEERFunction(torch.autograd.Function):
    """y of the PEER layer `layer_id` (routing and handle not differentiable); u and v get
    sparse COO gradients (coalesced: one row per expert used)."""

    @staticmethod
    def forward(ctx, x, layer_id, *weights):
        y, ids, gates, handle = _call("peer_forward", x, list(weights), layer_id, True)
        ctx.mark_non_differentiable(ids, gates, handle)
        # saving the weights makes autograd refuse a backward after they changed in place
        ctx.save_for_backward(x, handle, *weights)
        ctx.layer_id = layer_id
        return y, ids, gates, handle

    @staticmethod
    def backward(ctx, dy, *_):
        x, handle, *weights = ctx.saved_tensors
        dx, dq, dk1, dk2, used, du, dv = _call("peer_backward", x, weights, handle, dy,
                                                                     ctx.layer_id)

        def rows(values, w):  # (own index views: AccumulateGrad can then keep them uncopied)
            return torch.sparse_coo_tensor(used[None], values, w.shape, is_coalesced=True,
                                           check_invariants=False)
        grads = (dq, dk1, dk2, rows(du, weights[3]), rows(dv, weights[4]))
        need = ctx.needs_input_grad
        return ((dx if need[0] else None, None)
                + tuple(g if n else None for g, n in zip(grads, need[2:])))


class PEER(_LayerModule):
    """moe.PEER(d_model, n_sub_keys, n_heads=8, top_k=16, d_key=None, activation="relu",
    seed=0, *, d_out=None, per_head_keys=True) as a torch.nn.Module: same arguments.

    Parameters (float32, named and shaped as the layer's weights, sharing memory with the
    NumPy layer: to_layer(); state_dict keys are these names): w_query (H, d_key, d_model);
    sub_keys_1, sub_keys_2 (H, n, d_key/2), or (n, d_key/2) with per_head_keys=False;
    u (N, d_model); v (N, d_out); N = n_sub_keys ** 2.

    m(x) -> y; m(x, return_routing=True) -> (y, PEERRouting).  x: (..., d_model) CPU float
    tensor (other float dtypes computed in float32; y (..., d_out) and x's gradient in x's
    dtype).  The retrieval is held fixed in the backward (gradients reach the queries and
    sub-keys through the selected experts' gates); under torch.no_grad() the plain forward
    runs.  Weights are read on every call: in-place updates need no repack.

    Gradients: x, w_query and the sub-keys get dense ones; u and v *sparse* ones
    (torch.sparse_coo_tensor, coalesced, one row per expert the batch retrieved -- at most
    T * n_heads * top_k rows -- like nn.Embedding(sparse=True)): a million-expert layer
    never forms a dense (N, d) gradient.  Train u and v with an optimizer that takes sparse
    gradients -- torch.optim.SparseAdam (its two moment buffers are dense (N, d) each) or
    plain torch.optim.SGD (no state) -- and the rest with a dense one (Adam / AdamW refuse
    sparse gradients)::

        sparse = [m.u, m.v]
        dense = [p for n, p in m.named_parameters() if n not in ("u", "v")]
        opts = [torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.AdamW(dense, lr=1e-3)]
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    """

    _NUMPY = _peer_mod.PEER

    def __init__(self, d_model, n_sub_keys, n_heads=8, top_k=16, d_key=None, activation="relu",
                 seed=0, **options):
        super().__init__()
        self._adopt(_peer_mod.PEER(d_model, n_sub_keys, n_heads, top_k, d_key, activation, seed,
                                   **options))

    def _adopt(self, layer):
        missing = [n for n in layer._weight_names() if getattr(layer, n) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not set (the layer was made with "
                             "init=False): assign its weights first")
        names = _adopt_weights(self, layer, layer._weight_names(), buffers=())
        self._config = layer.config()
        self._dtypes = {n: getattr(self, n).dtype for n in names}
        self._set_binding(_Binding(layer, names, layer.trainable_weights()))

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = _peer_mod.PEER(**self._config, init=False)
        self._set_binding(_Binding(layer, state["_dtypes"], layer.trainable_weights()))

    def forward(self, x, return_routing=False):
        """x: (..., d_model) CPU float tensor -> y (..., d_out) of x's dtype
        [, PEERRouting of tensors (..., n_heads, top_k)]."""
        layer = self._binding.layer
        x2 = self._tokens(x, layer.d_model)
        weights = self._weights()
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad
                                                               for w in weights)):
            y, ids, gates, _ = _PEERFunction.apply(x2, self._layer_id, *weights)
        else:
            y, ids, gates, _ = _call("peer_forward", x2, weights, self._layer_id, False)
        lead = tuple(x.shape[:-1])
        y = y.reshape(lead + (layer.d_out,)).to(x.dtype)
        if not return_routing:
            return y
        shape = lead + (layer.n_heads, layer.top_k)
        return y, PEERRouting(ids.reshape(shape), gates.reshape(shape))


# ---- PEFT interop ----------------------------------------------------------------------
#
# A PEFT LoRA adapter on an nn.Linear (d_in -> d_out) holds lora_A.weight (r, d_in) and
# lora_B.weight (d_out, r), its output is base(x) + (lora_alpha / r) * B A x (rsLoRA:
# lora_alpha / sqrt(r)); the scaling is in the LoraConfig, not the state dict.

def _target(obj):
    """(the NumPy layer, put(name, float32 array)) for a moe.lora layer or a LoRA module:
    put writes a whole weight -- into the module's tensor in place (torch sees it), or by
    assignment into a NumPy layer."""
    if isinstance(obj, _LoRAModule):
        layer = obj.to_layer()

        def put(name, arr):
            with torch.no_grad():
                getattr(obj, name).copy_(torch.from_numpy(arr))
        return layer, put
    if isinstance(obj, _lora_mod._LoRALayer):
        return obj, lambda name, arr: setattr(obj, name, arr)
    raise TypeError(f"expected a moe.lora layer or a moe.torch LoRA module, got "
                    f"{type(obj).__name__}")


def _as_float32(v, key):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().float().numpy()
    arr = np.asarray(v)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{key}: expected a float tensor, got dtype {arr.dtype}")
    return np.array(arr, np.float32)


def _find_key(state_dict, prefix, part, adapter_name):
    """The key of `part` ("lora_A") under prefix: prefix + "lora_A.weight" (a
    get_peft_model_state_dict key), prefix + "lora_A.<adapter_name>.weight" (a PEFT model's
    own state_dict), or else the only key under prefix ending that way."""
    for key in (f"{prefix}{part}.weight", f"{prefix}{part}.{adapter_name}.weight"):
        if key in state_dict:
            return key
    found = [k for k in state_dict if k.startswith(prefix) and (
        k.endswith(f"{part}.weight") or k.endswith(f"{part}.{adapter_name}.weight"))
        and (k == f"{part}.weight" or f".{part}." in "." + k)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise KeyError(f"no {part}.weight (or {part}.{adapter_name}.weight) key under "
                       f"prefix {prefix!r} in the state dict ({len(state_dict)} keys)")
    raise ValueError(f"{len(found)} {part} keys under prefix {prefix!r} ({', '.join(found[:4])}"
                     f"{', ...' if len(found) > 4 else ''}): pass prefix= the module's")


def _slots(layer, index, what):
    """The expert / adapter / head indices an adapter goes to (index None: all of them)."""
    n = layer.n_experts
    if index is None:
        return list(range(n))
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or \
            not 0 <= index < n:
        raise ValueError(f"index must be an int in [0, {n}) ({what}), got {index!r}")
    return [int(index)]


def _load_adapter(obj, state_dict, index=None, prefix="", adapter_name="default", alpha=None,
                  scaling=None, load_base=True):
    layer, put = _target(obj)
    a_key = _find_key(state_dict, prefix, "lora_A", adapter_name)
    b_key = "lora_B".join(a_key.rsplit("lora_A", 1))
    if b_key not in state_dict:
        raise KeyError(f"{b_key} (the lora_B of {a_key}) is not in the state dict")
    a, b = _as_float32(state_dict[a_key], a_key), _as_float32(state_dict[b_key], b_key)
    R, d_in, d_out = layer.rank, layer.d_in, layer.d_out
    if a.ndim != 2 or a.shape[1] != d_in or not 1 <= a.shape[0] <= R:
        raise ValueError(f"{a_key}: expected shape (r, {d_in}) with 1 <= r <= {R} (the layer's "
                         f"rank; d_in={d_in}), got {tuple(a.shape)}")
    r = a.shape[0]
    if b.shape != (d_out, r):
        raise ValueError(f"{b_key}: expected shape ({d_out}, {r}) (d_out, the r of {a_key}), "
                         f"got {tuple(b.shape)}")
    if alpha is not None and scaling is not None:
        raise ValueError("pass alpha (PEFT's lora_alpha: scaling alpha / r) or scaling, "
                         "not both")
    s = float(scaling) if scaling is not None else (r if alpha is None else float(alpha)) / r
    a_pad = np.zeros((R, d_in), np.float32)
    a_pad[:r] = a
    b_pad = np.zeros((d_out, R), np.float32)
    b_pad[:, :r] = b
    loaded = [a_key, b_key]
    if isinstance(layer, _lora_mod.MultiLoRA):  # a slot with its own scaling
        slots = _slots(layer, index, "the adapter slot")
        la, lb, sc = layer.lora_a.copy(), layer.lora_b.copy(), layer.scalings.copy()
        la[slots], lb[slots], sc[slots] = a_pad, b_pad, s
        put("lora_a", la)
        put("lora_b", lb)
        put("scalings", sc)
    else:  # one scaling for the layer: fold the adapter's into B
        b_pad *= np.float32(s / layer.scaling)
        if layer.lora_a.ndim == 3:  # TopKLoRA, SoftLoRA, GatedLoRA: one expert (or all)
            slots = _slots(layer, index, "the expert")
            la, lb = layer.lora_a.copy(), layer.lora_b.copy()
            la[slots], lb[slots] = a_pad, b_pad
        elif layer.lora_b.ndim == 3:  # HydraLoRA: the shared A and one head (or all)
            slots = _slots(layer, index, "the B head")
            la, lb = a_pad, layer.lora_b.copy()
            lb[slots] = b_pad
        else:  # FlyLoRA, SMoRA: one LoRA whose ranks are the experts
            if index is not None:
                raise ValueError(f"{type(layer).__name__} holds one adapter: index must be "
                                 f"None, got {index!r}")
            la, lb = a_pad, b_pad
        put("lora_a", la)
        put("lora_b", lb)
    base = a_key.rsplit("lora_A", 1)[0] + "base_layer."
    if load_base and base + "weight" in state_dict:
        key = base + "weight"
        w = _as_float32(state_dict[key], key)
        if w.shape != (d_out, d_in):
            raise ValueError(f"{key}: expected shape ({d_out}, {d_in}) (d_out, d_in), got "
                             f"{tuple(w.shape)}")
        put("base_weight", w)
        loaded.append(key)
        if base + "bias" in state_dict:
            key = base + "bias"
            if not layer.use_bias:
                raise ValueError(f"{key}: the layer has no base bias (build it with "
                                 "bias=True)")
            v = _as_float32(state_dict[key], key)
            if v.shape != (d_out,):
                raise ValueError(f"{key}: expected shape ({d_out},) (d_out), got "
                                 f"{tuple(v.shape)}")
            put("base_bias", v)
            loaded.append(key)
    return tuple(loaded)


def load_peft_lora(layer, state_dict, *, index=None, prefix="", adapter_name="default",
                   alpha=None, scaling=None, load_base=True):
    """Load one PEFT LoRA adapter (of an nn.Linear d_in -> d_out) into a moe.lora layer or
    moe.torch LoRA module, in place; returns the keys it read.

    state_dict: get_peft_model_state_dict(model) (keys "<prefix>lora_A.weight" (r, d_in),
    "<prefix>lora_B.weight" (d_out, r)) or the PEFT model's own state_dict ("...lora_A.
    <adapter_name>.weight"); prefix selects the module, e.g. "base_model.model.fc1." (may be
    omitted when the state dict holds one adapter).  r <= the layer's rank (zero-padded).
    The scaling is PEFT's lora_alpha / r: pass alpha=lora_alpha (default r: scaling 1) or
    scaling= directly (rsLoRA: lora_alpha / sqrt(r)).  Where it goes:

    - MultiLoRA: adapter slot `index` (its scalings entry set to the adapter's scaling);
    - TopKLoRA / SoftLoRA / GatedLoRA: expert `index`;
    - HydraLoRA: the shared A (every head's) and head `index`'s B;
    - FlyLoRA / SMoRA: the one A and B (index None; only the selected ranks are active);
    index=None loads every slot / expert / head (with gates summing to 1 the mixture then
    equals the adapter).  The layers other than MultiLoRA have one scaling: the adapter's
    is folded into B (B * adapter_scaling / layer.scaling).  With load_base (default) the
    base linear's "<module>base_layer.weight" / ".bias" (a PEFT model's state_dict) are
    loaded too when present.  Shape or rank mismatches raise ValueError naming the key and
    the expected shape.
    """
    return _load_adapter(layer, state_dict, index=index, prefix=prefix,
                         adapter_name=adapter_name, alpha=alpha, scaling=scaling,
                         load_base=load_base)


def peft_state_dict(layer, *, index=None, prefix="", alpha=None, rank=None,
                    include_base=False):
    """One adapter of a moe.lora layer or moe.torch LoRA module as a PEFT LoRA state dict
    {prefix + "lora_A.weight": (r, d_in), prefix + "lora_B.weight": (d_out, r)} of float32
    tensors (copies), loadable with peft's set_peft_model_state_dict into a LoraConfig(r=r,
    lora_alpha=alpha) adapter (prefix e.g. "base_model.model.fc1.").

    index: the MultiLoRA slot / expert / HydraLoRA head (required when there are several;
    None for FlyLoRA / SMoRA).  rank (default the layer's): the r exported -- an adapter
    installed with a smaller r (zero-padded) exports back at that r; dropping non-zero
    rows raises.  alpha: the LoraConfig's lora_alpha; B is rescaled so that alpha / r
    gives the slot's scaling (default alpha = that scaling * r: B unchanged).
    include_base adds prefix + "base_layer.weight" (and ".bias"), in the base's dtype.
    """
    lay, _ = _target(layer)
    R = lay.rank
    r = R if rank is None else int(rank)
    if not 1 <= r <= R:
        raise ValueError(f"rank must be in [1, {R}] (the layer's rank), got {rank!r}")
    if lay.lora_a.ndim == 3 or lay.lora_b.ndim == 3:
        if index is None:
            if lay.n_experts != 1:
                raise ValueError(f"index is required: {type(lay).__name__} holds "
                                 f"{lay.n_experts} adapters / experts / heads")
            index = 0
        i = _slots(lay, index, "the slot / expert / head")[0]
    elif index is not None:
        raise ValueError(f"{type(lay).__name__} holds one adapter: index must be None")
    a = lay.lora_a[i] if lay.lora_a.ndim == 3 else lay.lora_a
    b = lay.lora_b[i] if lay.lora_b.ndim == 3 else lay.lora_b
    if np.any(a[r:]) or np.any(b[:, r:]):
        raise ValueError(f"rank={r} would drop non-zero rows of lora_a / columns of lora_b "
                         f"(the layer's rank is {R})")
    s = float(lay.scalings[i]) if isinstance(lay, _lora_mod.MultiLoRA) else lay.scaling
    b = b[:, :r] * np.float32(1.0 if alpha is None else s / (float(alpha) / r))
    out = {f"{prefix}lora_A.weight": torch.from_numpy(np.array(a[:r], np.float32)),
           f"{prefix}lora_B.weight": torch.from_numpy(np.array(b, np.float32))}
    if include_base:
        out[f"{prefix}base_layer.weight"] = _tensor_view(lay.base_weight).clone()
        if lay.use_bias:
            out[f"{prefix}base_layer.bias"] = torch.from_numpy(np.array(lay.base_bias))
    return out


# ---- transformers models: patch / unpatch (moe/hf_patch.py) ---------------------------
from .hf_patch import patch, unpatch  # noqa: E402
