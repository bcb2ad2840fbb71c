"""moe.torch.patch / unpatch: run the sparse MoE blocks of a `transformers` model on moe's
C core, on the model's own parameters.

patch(model) walks the model and replaces every sparse MoE block of the supported
architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss; transformers 5
module layout: a router submodule and a fused-expert `experts` module) by a PatchedMoE
module.  The routing semantics are those of moe.from_hf (moe.hf._layer_plan, the same
table), the activation / clamp constants are read from the block.

Parameter sharing.  A PatchedMoE registers the block's own children (router, experts,
shared experts) under their own names, so the model's parameters stay the very same
tensors: state_dict keys and values, the optimizer's references, requires_grad flags and
gradients all stay the model's.  Each weight the layer reads is either

- a view of the parameter (no copy): every expert weight -- the gate and up halves of
  transformers' fused gate_up_proj (E, 2F, d), down_proj (E, d, F), gpt-oss's transposed /
  interleaved (E, d, 2F) and (E, F, d) tensors (the core reads routed expert weights
  through their strides: moe_wstrides), the shared experts' weights --, and in float32
  models the router weight and biases; or
- a float32 copy, refreshed in place when the parameter's (data_ptr, _version) moves
  (optimizer.step, load_state_dict, nn.init all bump it): small tensors only, gpt-oss's
  interleaved expert biases and the router weight / biases of bf16 / fp16 models.

Besides, the kernels run on their packed copy of the expert weights (as any moe layer).
Gradients computed by the core are mapped back through the views (the gate and up halves,
the interleave / transpose of gpt-oss, the dtype cast) into the model's parameters' .grad.

Router logits for the aux loss: transformers records them with a forward hook on the
router module (OutputRecorder(<Arch>TopKRouter, index=0)) when output_router_logits=True.
The PatchedMoE calls the model's router module in torch exactly when such a recording is
active (or any forward hook is on the router), so the recorded logits -- and the
load-balancing loss and its gradient -- are transformers' own; otherwise the router is
computed by the core only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import torch as _mt
from ._api import check_choice
from .hf import _layer_plan
from .layer import SparseMoE as _NumpySparseMoE
from .layer import _EXPERT_WEIGHTS, _ROUTED, _WEIGHTS

_COLLECTOR = []  # [transformers' output-recording collector or None], looked up once


def _collector():
    """transformers' (5.x) active output collector, or None when it has none: importing
    moe.torch never imports transformers (a patched model has imported it already)."""
    if not _COLLECTOR:
        try:
            from transformers.utils.output_capturing import _active_collector
        except Exception:  # noqa: BLE001 - another version: call the router when hooked
            _active_collector = None
        _COLLECTOR.append(_active_collector)
    return _COLLECTOR[0]

__all__ = ["PatchedMoE", "PatchReport", "patch", "unpatch"]

# block class -> architecture (model_type of moe.hf._layer_plan)
_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe",
           "Qwen3MoeSparseMoeBlock": "qwen3_moe", "OlmoeSparseMoeBlock": "olmoe",
           "DeepseekV3MoE": "deepseek_v3", "GptOssMLP": "gpt_oss"}
# the submodules each architecture's block must hold, by class name (anything else there --
# a PEFT wrapper, a parametrization, a quantized module -- is not what the core computes)
_PARTS = {
    "mixtral": {"gate": "MixtralTopKRouter", "experts": "MixtralExperts"},
    "qwen2_moe": {"gate": "Qwen2MoeTopKRouter", "experts": "Qwen2MoeExperts",
                  "shared_expert": "Qwen2MoeMLP", "shared_expert.gate_proj": "Linear",
                  "shared_expert.up_proj": "Linear", "shared_expert.down_proj": "Linear",
                  "shared_expert_gate": "Linear"},
    "qwen3_moe": {"gate": "Qwen3MoeTopKRouter", "experts": "Qwen3MoeExperts"},
    "olmoe": {"gate": "OlmoeTopKRouter", "experts": "OlmoeExperts"},
    "deepseek_v3": {"gate": "DeepseekV3TopkRouter", "experts": "DeepseekV3Experts",
                    "shared_experts": "DeepseekV3MLP", "shared_experts.gate_proj": "Linear",
                    "shared_experts.up_proj": "Linear", "shared_experts.down_proj": "Linear"},
    "gpt_oss": {"router": "GptOssTopKRouter", "experts": "GptOssExperts"},
}
_LAYER_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _identity(p):
    return p


def _first_half(F):
    return lambda p: p[:, :F]


def _second_half(F):
    return lambda p: p[:, F:]


def _spec(arch, F):
    """layer weight name -> (the block's parameter / buffer path, view of it in the layer's
    shape).  Every view is a pure view op, so applying it to a gradient buffer of the
    parameter's shape gives where that weight's gradient goes."""
    if arch == "gpt_oss":
        return {"router_weight": ("router.weight", _identity),
                "w_gate": ("experts.gate_up_proj", lambda p: p[:, :, 0::2].transpose(1, 2)),
                "w_up": ("experts.gate_up_proj", lambda p: p[:, :, 1::2].transpose(1, 2)),
                "w_down": ("experts.down_proj", lambda p: p.transpose(1, 2)),
                "router_bias": ("router.bias", _identity),
                "b_gate": ("experts.gate_up_proj_bias", lambda p: p[:, 0::2]),
                "b_up": ("experts.gate_up_proj_bias", lambda p: p[:, 1::2]),
                "b_down": ("experts.down_proj_bias", _identity)}
    spec = {"router_weight": ("gate.weight", _identity),
            "w_gate": ("experts.gate_up_proj", _first_half(F)),
            "w_up": ("experts.gate_up_proj", _second_half(F)),
            "w_down": ("experts.down_proj", _identity)}
    if arch == "deepseek_v3":
        spec["expert_bias"] = ("gate.e_score_correction_bias", _identity)
    shared = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts."}.get(arch)
    if shared:
        spec.update(shared_w_gate=(shared + "gate_proj.weight", _identity),
                    shared_w_up=(shared + "up_proj.weight", _identity),
                    shared_w_down=(shared + "down_proj.weight", _identity))
    if arch == "qwen2_moe":
        spec["shared_gate_weight"] = ("shared_expert_gate.weight", _identity)
    # in the layer's weight order (the binding's)
    return {n: spec[n] for n in _WEIGHTS if n in spec}


def _get(root, path):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _readable_view(t):
    """Whether the core reads the routed expert weight view t in place (SparseMoE keeps
    3-d views with positive strides: moe._api._view_layout)."""
    return t.dim() == 3 and all(n <= 1 or s > 0 for n, s in zip(t.shape, t.stride()))


INFERENCE_COMPUTE = ("auto", "float32", "bfloat16")


def _inference_compute(choice, dtype, kw):
    """What no-grad forwards of a block with weights in `dtype` compute in: "bfloat16" (the
    bf16 x bf16 kernels: inputs and hidden activations rounded to bf16, float32 sums --
    what the bf16 model itself computes) or "float32".  "auto": bfloat16 for bf16 weights
    where the kernels multiply bf16 natively (build_info()["bf16_dot"]: AMX tiles or
    VDPBF16PS; not the FMA emulation, no faster than float32) and the sizes are even."""
    check_choice(choice, "inference_compute", INFERENCE_COMPUTE)
    fits = dtype == "bfloat16" and kw["d_model"] % 2 == 0 and kw["d_ff"] % 2 == 0
    if choice == "bfloat16" and not fits:
        raise ValueError("inference_compute='bfloat16' needs a bf16 model with even "
                         f"d_model and d_ff, got {dtype}, d_model={kw['d_model']}, "
                         f"d_ff={kw['d_ff']}")
    if choice == "auto":
        from . import _C
        native = _C.build_info()["bf16_dot"] in ("amx", "vdpbf16ps")
        choice = "bfloat16" if fits and native else "float32"
    return choice


def _fused_grad(halves, shape):
    """The (E, 2F, d) gradient whose halves [:, :F], [:, F:] are `halves` (the core's
    gradients of the fused gate_up_proj's views, moe_gu_grads), or None when they are not
    one array's halves."""
    if len(halves) != 2 or len(shape) != 3:
        return None
    a, b = halves
    E, F2, d = shape
    if (a.shape != (E, F2 // 2, d) or b.shape != a.shape or a.stride() != (F2 * d, d, 1)
            or b.stride() != a.stride()
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
            or b.storage_offset() != a.storage_offset() + F2 // 2 * d
            or a.untyped_storage().nbytes() < (a.storage_offset() + E * F2 * d) * 4):
        return None
    # a tensor of its own on that storage (not a view: autograd can take it as .grad
    # without copying)
    return torch.empty(0, dtype=a.dtype).set_(a.untyped_storage(), a.storage_offset(),
                                              shape, (F2 * d, d, 1))


def _version(t):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no counter: always refresh
        return None


class _Runtime:
    """The NumPy layer of one PatchedMoE, its binding and the float32 copies of the small
    parameters that cannot be viewed (refreshed when the parameter moves)."""

    def __init__(self, kw, spec, params, paths, inference="auto", recompute_hidden=True):
        self.spec, self.paths = spec, paths
        experts = params[paths.index(spec["w_up"][0])]
        self.dtype = _LAYER_DTYPES[experts.dtype]
        self.layer = _NumpySparseMoE(**kw, dtype=self.dtype, init=False)
        self.layer.recompute_hidden = recompute_hidden
        self.names = tuple(spec)
        # no-grad calls of bf16 models: a bf16-compute twin on the same views, packed on
        # its first call (_inference_compute says when)
        self.kw, self.twin_id = kw, None
        self.inference = _inference_compute(inference, self.dtype, kw)
        self.target = {n: (_mt._FFN_DTYPES[self.dtype] if n in _EXPERT_WEIGHTS
                           else torch.float32) for n in self.names}
        self.binding = _mt._Binding(self.layer, self.names)
        self.layer_id = _mt._register(self.binding)
        self.copies = {}   # name -> a contiguous copy in the target dtype
        self.keys = {}     # name -> the parameter's (data_ptr, _version) at the last copy
        self.signature = self._signature(params)
        self.shared, self.copied = [], []
        for n, t in zip(self.names, self.tensors(params)):
            (self.copied if n in self.copies else self.shared).append(n)

    def inference_id(self):
        """The layer id no-grad forwards run on: the bf16-compute twin (built now if
        needed) when self.inference is "bfloat16", else the layer's own."""
        if self.inference != "bfloat16":
            return self.layer_id
        if self.twin_id is None:
            twin = _NumpySparseMoE(**self.kw, dtype="bfloat16", compute_dtype="bfloat16",
                                   init=False)
            self.twin = _mt._Binding(twin, self.names)  # (the registry holds it weakly)
            self.twin_id = _mt._register(self.twin)
        return self.twin_id

    @staticmethod
    def _signature(params):
        return tuple(p.dtype for p in params)

    def tensors(self, params):
        """The layer's weights (binding order) for the parameters `params` (paths order):
        views where possible, refreshed copies elsewhere."""
        out = []
        for n in self.names:
            path, view = self.spec[n]
            p = params[self.paths.index(path)].detach()
            v = view(p)
            if n not in self.copies and v.dtype == self.target[n] and (
                    v.is_contiguous() or (n in _ROUTED and _readable_view(v))):
                out.append(v)
                continue
            buf = self.copies.get(n)
            key = (p.data_ptr(), _version(p))
            fresh = buf is None
            if fresh:
                buf = self.copies[n] = torch.empty(v.shape, dtype=self.target[n])
            if fresh or key[1] is None or self.keys.get(n) != key:
                with torch.no_grad():
                    buf.copy_(v)  # bumps buf's version: _bind repacks
                self.keys[n] = key
            out.append(buf)
        return out

    def param_grads(self, grads, params, needs):
        """The core's gradients (binding order, trainable names) mapped back into one
        gradient per parameter (paths order; None where not needed)."""
        by_name = dict(zip([n for n in self.names if n in self.binding.trainable], grads))
        out = []
        for path, p, need in zip(self.paths, params, needs):
            parts = [(n, self.spec[n][1]) for n in self.names
                     if self.spec[n][0] == path and n in by_name]
            if not need or not parts:
                out.append(None)
                continue
            if len(parts) == 1 and parts[0][1] is _identity:
                out.append(by_name[parts[0][0]].to(p.dtype))
                continue
            fused = _fused_grad([by_name[n] for n, _ in parts], p.shape)
            if fused is not None:  # the core wrote gate_up_proj's gradient in place
                out.append(fused.to(p.dtype))
                continue
            g = torch.zeros(p.shape, dtype=torch.float32)
            for n, view in parts:
                view(g).copy_(by_name[n])
            out.append(g.to(p.dtype))
        return tuple(out)


class _PatchedFunction(torch.autograd.Function):
    """y (T, d) float32 and the routing weights (T, k) of the core's layer, with the
    gradients of x and of the model's parameters (mapped through the views)."""

    @staticmethod
    def forward(ctx, x, rt, *params):
        tensors = rt.tensors(params)
        y, _aux, _z, _ids, w, _counts, handle = _mt._call(
            "sparse_moe_forward", x, tensors, rt.layer_id, True)
        ctx.mark_non_differentiable(w, handle)
        # saving the layer's weights makes autograd refuse a backward after they changed
        ctx.save_for_backward(x, handle, *tensors)
        ctx.rt, ctx.params = rt, params
        return y, w

    @staticmethod
    def backward(ctx, dy, _dw):
        x, handle, *tensors = ctx.saved_tensors
        rt = ctx.rt
        zero = torch.zeros((), dtype=torch.float32)  # transformers adds its own aux loss
        # the op's work without its no-aliasing rule: gate_up_proj's gradient comes back
        # as one fused array (its halves are the w_gate / w_up gradients)
        dx, grads = _mt.layer_backward(x, tensors, handle, dy.contiguous(), zero, zero,
                                       rt.layer_id)
        return (dx, None) + rt.param_grads(grads, ctx.params, ctx.needs_input_grad[2:])


def _recording(router):
    """Whether the router's output is wanted: a forward hook is on it and (transformers 5)
    a router-logits recording is active."""
    if not router._forward_hooks and not router._forward_pre_hooks:
        return False
    active = _collector()
    if active is None:
        return True
    collected = active.get()
    return bool(router._forward_pre_hooks) or (collected is not None
                                               and "router_logits" in collected)


class PatchedMoE(nn.Module):
    """A transformers sparse MoE block run by moe's C core on the block's own parameters.

    Its children are the original block's children (same objects, same names: the
    model's state_dict keys do not change); `original` is the block it replaced (restored by
    moe.torch.unpatch).  forward(hidden_states) returns what the block returns (gpt-oss:
    (hidden_states, router_scores)).  If a part of the block has been replaced since
    patching (e.g. a PEFT LoRA wrapper on the shared expert), or the block runs where the
    core cannot (not on the CPU), it runs the original block's forward instead (warning
    once): never a result that ignores the change.
    """

    def __init__(self, block, arch, kw, name="", inference_compute="auto",
                 recompute_hidden=True):
        super().__init__()
        for n, child in block.named_children():
            self.add_module(n, child)
        for n, p in block.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in block.named_buffers(recurse=False):
            self.register_buffer(n, b)
        self.__dict__["original"] = block  # not a submodule: its parameters are ours
        self.arch, self.block_name = arch, name
        self._kw = dict(kw)
        self._spec = _spec(arch, kw["d_ff"])
        self._paths = tuple(dict.fromkeys(path for path, _ in self._spec.values()))
        self._parts = {path: type(_get(self, path)) for path in _PARTS[arch]}
        self._router = "router" if arch == "gpt_oss" else "gate"
        self._warned = False
        self._inference = inference_compute
        self._recompute_hidden = bool(recompute_hidden)
        self._rt = None
        self._runtime(self._params())  # build (and pack) now: errors surface at patch time

    # copies / pickles rebuild the runtime (its packed C handles do not pickle) and the
    # views (functions)
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_rt"] = None
        state.pop("_spec", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._spec = _spec(self.arch, self._kw["d_ff"])

    def _params(self):
        return [_get(self, path) for path in self._paths]

    def _runtime(self, params):
        rt = self._rt
        if rt is None or rt.signature != _Runtime._signature(params):
            rt = self._rt = _Runtime(self._kw, self._spec, params, self._paths,
                                     self.__dict__.get("_inference", "auto"),
                                     self.__dict__.get("_recompute_hidden", True))
        return rt

    def _intact(self, params):
        """None when the core computes what this block computes, else why not."""
        for path, cls in self._parts.items():
            try:
                part = _get(self, path)
            except AttributeError:
                return f"{path} is gone"
            if type(part) is not cls:
                return f"{path} is now a {type(part).__name__}"
        for p in params:
            if p.device.type != "cpu":
                return f"its parameters are on {p.device} (the core runs on the CPU)"
            if p.dtype not in _LAYER_DTYPES:
                return f"its parameters are {p.dtype}"
        return None

    def _fallback(self, why, hidden_states):
        if not self._warned:
            warnings.warn(f"moe.torch.patch: {self.block_name or self.arch} runs its original "
                          f"forward: {why}", RuntimeWarning, stacklevel=3)
            self._warned = True
        for n, child in self.named_children():  # the children as they are now
            if getattr(self.original, n, None) is not child:
                setattr(self.original, n, child)
        return self.original(hidden_states)

    def forward(self, hidden_states):
        params = self._params()
        why = self._intact(params)
        if why is None and hidden_states.device.type != "cpu":
            why = f"the input is on {hidden_states.device}"
        if why is not None:
            return self._fallback(why, hidden_states)
        x = hidden_states
        d = self._kw["d_model"]
        x2 = x.reshape(-1, d)
        router = getattr(self, self._router)
        if _recording(router):  # transformers records the router's logits (aux loss)
            router(x2)
        rt = self._runtime(params)
        x32 = x2.to(torch.float32).contiguous()
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                               for p in params)):
            y, w = _PatchedFunction.apply(x32, rt, *params)
        else:
            y, _aux, _z, _ids, w, _counts, _h = _mt._call(
                "sparse_moe_forward", x32, rt.tensors(params), rt.inference_id(), False)
        y = y.reshape(x.shape).to(x.dtype)
        return (y, w.to(x.dtype)) if self.arch == "gpt_oss" else y

    def to_layer(self):
        """The moe.SparseMoE this block runs (its weights views / copies of the
        parameters, as of now)."""
        params = self._params()
        rt = self._runtime(params)
        return _mt._bind(rt.binding, rt.tensors(params))

    def extra_repr(self):
        rt = self._rt
        extra = "" if rt is None else (f", views={rt.shared}, copies={rt.copied}")
        return f"arch={self.arch!r}, {self._rt.layer if rt else self._kw}{extra}"


@dataclass
class Replaced:
    """A block patch() replaced: its module path, architecture, the moe.SparseMoE options
    it runs with, the layer weights that are views of the model's parameters and those
    kept as float32 copies (small tensors only; with their bytes)."""

    name: str
    arch: str
    options: dict
    views: list
    copies: list
    copy_bytes: int


@dataclass
class Left:
    """A block patch() left as it was, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class PatchReport:
    """What moe.torch.patch did: `replaced` (Replaced entries) and `left` (Left entries);
    `reason` is set when nothing was replaced (no MoE block, or none supported)."""

    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)
    reason: str | None = None

    @property
    def copy_bytes(self):
        """Bytes of the copies the replaced blocks keep (small float32 tensors: gpt-oss's
        expert biases, bf16 models' router weights; beside the kernels' packed weights)."""
        return sum(r.copy_bytes for r in self.replaced)

    def __str__(self):
        lines = [f"moe.torch.patch: replaced {len(self.replaced)} block(s), left "
                 f"{len(self.left)}" + (f" ({self.reason})" if self.reason else "")]
        for r in self.replaced:
            lines.append(f"  replaced {r.name} ({r.arch}): views {', '.join(r.views)}; copies "
                         f"{', '.join(r.copies) or 'none'} ({r.copy_bytes / 2**20:.2f} MiB)")
        for e in self.left:
            lines.append(f"  left {e.name} ({e.kind}): {e.reason}")
        return "\n".join(lines)


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _config_dict(config, arch):
    cfg = {k: v for k, v in config.to_dict().items() if v is not None}
    cfg["model_type"] = arch
    # the block exists: the layer-dependent dense / sparse choice is already made
    cfg.update(num_hidden_layers=1, mlp_only_layers=[], decoder_sparse_step=1,
               first_k_dense_replace=0, moe_layer_freq=1)
    return cfg


def _plan(block, arch, config):
    """The SparseMoE options for `block`, or raise ValueError with the reason."""
    if config is None:
        raise ValueError("the model has no config")
    if arch == "mixtral" and float(getattr(config, "router_jitter_noise", 0) or 0) > 0:
        raise ValueError("router_jitter_noise > 0 (multiplicative input noise in training) "
                         "is not supported")
    cfg = _config_dict(config, arch)
    if arch == "gpt_oss":  # the block's own clamp constants
        cfg.update(swiglu_alpha=float(block.experts.alpha),
                   swiglu_limit=float(block.experts.limit))
    try:
        _, _, kw, _, _, _ = _layer_plan(cfg, 0)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"config: {exc}") from None
    for path, cls in _PARTS[arch].items():
        try:
            part = _get(block, path)
        except AttributeError:
            raise ValueError(f"the block has no {path}") from None
        if type(part).__name__ != cls:
            raise ValueError(f"{path} is a {type(part).__name__}, not a {cls}")
        if cls == "Linear" and part.bias is not None:
            raise ValueError(f"{path} has a bias")
    E, F, d = kw["n_experts"], kw["d_ff"], kw["d_model"]
    gu, dn = block.experts.gate_up_proj, block.experts.down_proj
    want = ((E, d, 2 * F), (E, F, d)) if arch == "gpt_oss" else ((E, 2 * F, d), (E, d, F))
    if (tuple(gu.shape), tuple(dn.shape)) != want:
        raise ValueError(f"expert weights have shapes {tuple(gu.shape)}, {tuple(dn.shape)}; the "
                         f"config gives {want[0]}, {want[1]}")
    for p in list(block.parameters()) + list(block.buffers()):
        if p.device.type != "cpu":
            raise ValueError(f"parameters on {p.device} (moe.torch runs on the CPU)")
    if gu.dtype not in _LAYER_DTYPES:
        raise ValueError(f"expert weights are {gu.dtype} (float32, bfloat16 or float16 "
                         "supported)")
    return kw


def _looks_like_moe(module):
    """An MoE block of an architecture patch() does not know (left, and reported)."""
    name = type(module).__name__.lower()
    return ("experts" in module._modules and
            any(s in name for s in ("moe", "sparse", "mlp", "expert")))


def patch(model, *, inference_compute="auto", recompute_hidden=True):
    """Replace every supported sparse MoE block of a transformers model by a PatchedMoE (in
    place) and return a PatchReport of what was replaced and what was left, and why.

    Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and gpt-oss blocks
    (transformers 5 layout), float32 / bfloat16 / float16 weights on the CPU.  Blocks of
    other architectures, or of a supported one in a configuration the core does not
    compute (e.g. Mixtral's router_jitter_noise > 0), are left as they are.  Already
    patched blocks are left ("already patched").  moe.torch.unpatch(model) restores them.

    inference_compute: what forwards without autograd (prefill, decode) compute in --
    "float32" (the bf16 / fp16 weights widened exactly, float32 activations), "bfloat16"
    (bf16 models only: the bf16 x bf16 kernels, inputs and hidden activations rounded to
    bf16 with float32 sums, as the bf16 model computes), or "auto": bfloat16 for bf16 models
    on CPUs with bf16 dot products (AVX512-BF16), float32 otherwise.  Training forwards
    always compute in float32.

    recompute_hidden: True (default) the backward recomputes the expert rows' gate / up
    pre-activations; False the training forward keeps them (8 bytes per routed row and
    d_ff unit more activation memory, a 10-15% faster MoE step, the same gradients).
    """
    check_choice(inference_compute, "inference_compute", INFERENCE_COMPUTE)
    config = _text_config(model)
    report = PatchReport()
    replaced_roots = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(r + ".") for r in replaced_roots):
            continue
        kind = type(module).__name__
        if isinstance(module, PatchedMoE):
            report.left.append(Left(name, kind, "already patched"))
            replaced_roots.append(name)
            continue
        arch = _BLOCKS.get(kind)
        if arch is None:
            if _looks_like_moe(module) and name:
                report.left.append(Left(name, kind, f"unsupported MoE block {kind} (patch "
                                        f"knows {', '.join(sorted(_BLOCKS))})"))
                replaced_roots.append(name)
            continue
        replaced_roots.append(name)
        try:
            kw = _plan(module, arch, config)
            patched = PatchedMoE(module, arch, kw, name, inference_compute,
                                 recompute_hidden)
        except (ValueError, TypeError, NotImplementedError) as exc:
            report.left.append(Left(name, kind, str(exc)))
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, patched)
        rt = patched._rt
        report.replaced.append(Replaced(
            name, arch, dict(kw), list(rt.shared), list(rt.copied),
            sum(t.numel() * t.element_size() for t in rt.copies.values())))
    if not report.replaced:
        report.reason = ("no sparse MoE block found" if not report.left
                         else "no supported MoE block")
    return report


def unpatch(model):
    """Put the original blocks back in place of every PatchedMoE (the same objects patch()
    took out, with the children the patched block holds now); returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, PatchedMoE):
            continue
        original = module.original
        for n, child in module.named_children():
            if getattr(original, n, None) is not child:
                setattr(original, n, child)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, original)
        names.append(name)
    return names
