"""Load the MoE block of one decoder layer of a Hugging Face checkpoint as a moe.SparseMoE.

Reads `config.json` and the (possibly sharded) safetensors files of a model directory,
memory-mapped, and maps each architecture's routing semantics and weight names onto the
layer: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and gpt-oss (router bias, expert
biases, clamped SwiGLU).  Per-expert keys and fused 3-D expert tensors both load, and so do
gpt-oss's native MXFP4 experts (`*_blocks` / `*_scales`), kept as mxfp4 without widening.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from . import safetensors
from ._api import check_float, check_int
from .layer import SparseMoE
from .quant import QuantizedWeight

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu",
                "gelu_pytorch_tanh": "geglu-tanh", "gelu_new": "geglu-tanh"}


def _progress_bar(i, n, filename):
    """A one-line progress bar on stderr while shards are opened (only for several files)."""
    if n <= 1:
        return
    width = 30
    done = int(width * (i + 1) / n)
    sys.stderr.write(f"\rmoe.from_hf: [{'#' * done}{'.' * (width - done)}] {i + 1}/{n} "
                     f"{os.path.basename(filename)}")
    if i + 1 == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _read_config(path):
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model "
                                "directory)") from None
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    # multimodal / nested configs keep the language model's under text_config
    if "text_config" in cfg and "hidden_size" not in cfg:
        text = _field(cfg, "text_config", "multimodal", dict)
        cfg = dict(text, model_type=text.get("model_type"))
    return cfg


_REQUIRED = object()
_KINDS = {bool: "true or false", str: "a string", list: "a list", dict: "a JSON object"}


def _name(cfg, key):
    """The name cfg holds `key` under (key may be a tuple of the names one version or another
    of transformers uses), or None."""
    return next((k for k in (key if isinstance(key, tuple) else (key,)) if k in cfg), None)


def _field(cfg, key, arch, kind=int, low=None, default=_REQUIRED):
    """Config field `key` checked to be of `kind` (an int >= low, a finite float, or a JSON
    bool / str / list / dict), naming it in the error; `default` when absent or null
    (without a default the field is required).  The one place config fields are checked."""
    name = _name(cfg, key)
    value = None if name is None else cfg[name]
    if value is None and default is not _REQUIRED:
        return default
    if name is None:
        raise ValueError(f"config.json of this {arch} checkpoint has no {key!r}")
    label = f"config.json: {name}"
    if kind is int:
        return check_int(value, label, low)
    if kind is float:
        return check_float(value, label)
    if not isinstance(value, kind):
        raise TypeError(f"{label} must be {_KINDS[kind]}, got {type(value).__name__}")
    return value


_N_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _layer_plan(cfg, layer):
    """(arch, block prefix, SparseMoE kwargs, the config field each size of kwargs comes
    from, expert key style, shared prefix and gate key) for one layer."""
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture (model_type) {arch!r}; moe.from_hf knows "
                         f"{', '.join(ARCHITECTURES)}")
    n_layers = _field(cfg, "num_hidden_layers", arch, low=1)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in 0..{n_layers - 1}, got {layer!r}")
    hidden_act = _field(cfg, "hidden_act", arch, str, default="silu")
    act = _ACTIVATIONS.get(hidden_act)
    if act is None:
        raise ValueError(f"unsupported hidden_act {hidden_act!r} in config.json")
    ff_key = ("moe_intermediate_size" if arch in ("qwen2_moe", "qwen3_moe", "deepseek_v3")
              else "intermediate_size")
    kw = dict(d_model=_field(cfg, "hidden_size", arch, low=1),
              d_ff=_field(cfg, ff_key, arch, low=1),
              n_experts=_field(cfg, _N_EXPERTS, arch, low=1),
              top_k=_field(cfg, "num_experts_per_tok", arch, low=1), activation=act)
    fields = dict(d_model="hidden_size", d_ff=ff_key, n_experts=_name(cfg, _N_EXPERTS))
    prefix = f"model.layers.{layer}.mlp."
    style = ("gate_proj", "up_proj", "down_proj")
    shared = None
    if arch == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe."
        kw.update(renormalize=True)
        style = ("w1", "w3", "w2")
    elif arch in ("qwen2_moe", "qwen3_moe"):
        sparse_step = _field(cfg, "decoder_sparse_step", arch, low=1, default=1)
        if (layer in _field(cfg, "mlp_only_layers", arch, list, default=[])
                or (layer + 1) % sparse_step):
            raise ValueError(f"layer {layer} of this {arch} checkpoint is a dense MLP, not an "
                             "MoE block (mlp_only_layers / decoder_sparse_step)")
        kw.update(renormalize=_field(cfg, "norm_topk_prob", arch, bool, default=False))
        shared_d_ff = (_field(cfg, "shared_expert_intermediate_size", arch, low=0, default=0)
                       if arch == "qwen2_moe" else 0)
        if shared_d_ff:
            kw.update(n_shared_experts=1, shared_d_ff=shared_d_ff, shared_expert_gate=True)
            fields.update(shared="shared_expert_intermediate_size")
            shared = ("shared_expert.", "shared_expert_gate.weight")
    elif arch == "olmoe":
        kw.update(renormalize=_field(cfg, "norm_topk_prob", arch, bool, default=False))
    elif arch == "deepseek_v3":
        first_dense = _field(cfg, "first_k_dense_replace", arch, low=0, default=0)
        freq = _field(cfg, "moe_layer_freq", arch, low=1, default=1)
        if layer < first_dense or layer % freq:
            raise ValueError(f"layer {layer} of this deepseek_v3 checkpoint is a dense MLP "
                             f"(first_k_dense_replace={first_dense}, moe_layer_freq={freq})")
        kw.update(scoring="sigmoid",
                  renormalize=_field(cfg, "norm_topk_prob", arch, bool, default=True),
                  routed_scaling=_field(cfg, "routed_scaling_factor", arch, float, default=1.0),
                  n_groups=_field(cfg, "n_group", arch, low=1, default=1),
                  topk_groups=_field(cfg, "topk_group", arch, low=1, default=1),
                  expert_bias=True)
        n_shared = _field(cfg, "n_shared_experts", arch, low=0, default=0)
        if n_shared:
            kw.update(n_shared_experts=n_shared, shared_d_ff=kw["d_ff"])
            fields.update(shared="n_shared_experts*moe_intermediate_size")
            shared = ("shared_experts.", None)
    else:  # gpt_oss: router with a bias, top-k of the logits then softmax, clamped SwiGLU
        kw.update(scoring="softmax-after-topk", activation="swiglu-oai", router_bias=True,
                  expert_biases=True,
                  swiglu_alpha=_field(cfg, "swiglu_alpha", arch, float, default=1.702),
                  swiglu_limit=_field(cfg, "swiglu_limit", arch, float, default=7.0))
        style = None
    return arch, prefix, kw, fields, style, shared


def _check_shape(ck, key, dims, label):
    """Tensor `key` must have the shape `dims`, (config field, size) pairs.  This reads the
    header only: the config's sizes are checked against the file before anything of their
    size is built (10**9 experts would build 10**9 key names), naming the field that asks
    for more, or other, than the file holds."""
    if key not in ck:
        raise KeyError(f"the checkpoint has no tensor {key!r} ({label})")
    shape = tuple(ck.shape(key))
    if shape == tuple(size for _, size in dims):
        return
    expected = ", ".join(f"{field}={size}" for field, size in dims)
    bad = [f"config.json: {field}={size}, but " for (field, size), n in zip(dims, shape)
           if n != size and len(shape) == len(dims)]
    raise ValueError(f"{bad[0] if bad else ''}{key} ({label}) in the checkpoint has shape "
                     f"{shape}, expected ({expected})")


def _stack(ck, keys, shape, label):
    for k in keys:
        _check_shape(ck, k, shape, label)
    return np.stack([np.asarray(ck.get(k)) for k in keys])


def _expert_weights(ck, prefix, E, F, d, style):
    """(w_gate, w_up, w_down) as (E, F, d), (E, F, d), (E, d, F) in the file's dtype; E, F, d
    are (config field, size) pairs, E already checked against the router."""
    g, u, dn = style
    if prefix + "experts.gate_up_proj" in ck:  # fused 3-D tensors (transformers >= 5)
        _check_shape(ck, prefix + "experts.gate_up_proj", (E, (f"2*{F[0]}", 2 * F[1]), d),
                     "fused gate and up projections")
        _check_shape(ck, prefix + "experts.down_proj", (E, d, F), "fused down projections")
        gu = np.asarray(ck.get(prefix + "experts.gate_up_proj"))
        return gu[:, :F[1]], gu[:, F[1]:], np.asarray(ck.get(prefix + "experts.down_proj"))
    keys = lambda name: [f"{prefix}experts.{e}.{name}.weight" for e in range(E[1])]  # noqa: E731
    return (_stack(ck, keys(g), (F, d), "expert gate projections"),
            _stack(ck, keys(u), (F, d), "expert up projections"),
            _stack(ck, keys(dn), (d, F), "expert down projections"))


def _gpt_oss_experts(ck, prefix, E, F, d):
    """gpt-oss stores (E, d, 2F) with gate and up interleaved column by column, and
    (E, F, d) for down: transpose to the nn.Linear layout."""
    _check_shape(ck, prefix + "experts.gate_up_proj", (E, d, (f"2*{F[0]}", 2 * F[1])),
                 "fused gate and up projections")
    _check_shape(ck, prefix + "experts.down_proj", (E, F, d), "fused down projections")
    gu = np.asarray(ck.get(prefix + "experts.gate_up_proj"))
    down = np.asarray(ck.get(prefix + "experts.down_proj"))
    return (gu[:, :, 0::2].transpose(0, 2, 1), gu[:, :, 1::2].transpose(0, 2, 1),
            down.transpose(0, 2, 1))


_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _gpt_oss_mxfp4(ck, prefix, E, F, d):
    """gpt-oss's native MXFP4 experts as (values, scales) pairs for w_gate, w_up and w_down,
    copied out of the file.  The checkpoint holds, per OUTPUT row (the nn.Linear layout),
    blocks (E, rows, k/32, 16) uint8 -- 32 e2m1 nibbles per block, element k in byte k // 2,
    the low nibble first -- and e8m0 scales (E, rows, k/32): gate_up_proj rows 2F over k = d,
    the gate the even rows and up the odd ones (interleaved like gate_up_proj_bias), and
    down_proj rows d over k = F.  Merging the last two axes of the blocks is moe's mxfp4
    layout (transformers' convert_moe_packed_tensors dequantizes the same bytes, then
    transposes to its (E, d, 2F) / (E, F, d) parameters)."""
    gu, dn = prefix + "experts.gate_up_proj", prefix + "experts.down_proj"
    groups = lambda n: (f"{n[0]}/32", -(-n[1] // 32))  # noqa: E731
    block = ("bytes per block", 16)
    F2 = (f"2*{F[0]}", 2 * F[1])
    for key, dims, label in (
            (gu + "_blocks", (E, F2, groups(d), block), "MXFP4 gate and up projections"),
            (gu + "_scales", (E, F2, groups(d)), "e8m0 scales of the gate and up projections"),
            (dn + "_blocks", (E, d, groups(F), block), "MXFP4 down projections"),
            (dn + "_scales", (E, d, groups(F)), "e8m0 scales of the down projections")):
        _check_shape(ck, key, dims, label)
        if ck.dtype(key) != "U8":
            raise TypeError(f"{key} ({label}) in the checkpoint is {ck.dtype(key)}, expected U8")
    for field, size in (d, F):
        if size % 32:
            raise ValueError(f"config.json: {field}={size}: gpt-oss MXFP4 experts need a "
                             "multiple of 32 (whole blocks of 32 values per row)")
    n_e, n_f, n_d = E[1], F[1], d[1]
    gu_values = ck.get(gu + "_blocks").reshape(n_e, 2 * n_f, n_d // 2)
    gu_scales = ck.get(gu + "_scales")
    return ((np.array(gu_values[:, 0::2]), np.array(gu_scales[:, 0::2])),
            (np.array(gu_values[:, 1::2]), np.array(gu_scales[:, 1::2])),
            (np.array(ck.get(dn + "_blocks").reshape(n_e, n_d, n_f // 2)),
             np.array(ck.get(dn + "_scales"))))


def _file_dtype(ck, key):
    dt = ck.dtype(key)
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt, dt)


def _float32(ck, key):
    """A small tensor (router, bias, gate) as float32, exactly (bf16/f16 widen exactly)."""
    if key not in ck:
        raise KeyError(f"the checkpoint has no tensor {key!r}")
    a = np.asarray(ck.get(key))
    if ck.dtype(key) == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def from_hf(path, layer, *, dtype=None, progress=None) -> SparseMoE:
    """The MoE block of decoder layer `layer` of the Hugging Face model in directory `path`.

    path: a folder with config.json and model.safetensors (or shards listed in
    model.safetensors.index.json), read memory-mapped.  dtype: storage of the expert FFN
    weights: None keeps the checkpoint's (float32, bfloat16 or float16), or "float32" /
    "bfloat16" / "float16" converts (bfloat16 -> float32 is exact); "int8" / "int4" /
    "mxfp4" quantize a float checkpoint's experts to nearest (see moe.quant).

    gpt-oss checkpoints with native MXFP4 experts (experts.gate_up_proj_blocks / _scales,
    down_proj_blocks / _scales): dtype None or "mxfp4" keeps the file's bytes (a layer of
    dtype "mxfp4", group_size 32, gate and up de-interleaved by rows); "float32" /
    "bfloat16" dequantizes exactly (float16 exactly within its range; a weight past it
    is refused as Inf); "int8" / "int4" raise ValueError rather than quantize twice --
    load as "float32" and call moe.quantize to choose that explicitly.  progress: a callable
    (i, n_files, filename), default a bar on stderr for multi-file checkpoints; False for
    none.  Routing semantics come from the config (softmax/sigmoid, norm_topk_prob,
    routed_scaling_factor, n_group/topk_group, e_score_correction_bias, shared experts and
    Qwen2-MoE's shared-expert gate).  Unknown architectures and missing keys raise
    ValueError / KeyError naming them; a config field of the wrong type or range raises
    TypeError / ValueError naming it, and so does a size (n_experts, d_ff, d_model) that
    the checkpoint's tensors do not hold, checked on the header before anything is built.
    """
    cfg = _read_config(path)
    arch, prefix, kw, fields, style, shared = _layer_plan(cfg, layer)
    bar = None if progress is False else (progress or _progress_bar)
    with safetensors.open_checkpoint(path, progress=bar) as ck:
        router_key = prefix + ("router.weight" if arch == "gpt_oss" else "gate.weight")
        if router_key not in ck:
            raise KeyError(f"the checkpoint has no tensor {router_key!r}: layer {layer} has no "
                           f"{arch} MoE block here")
        E, F, d = ((fields[k], kw[k]) for k in ("n_experts", "d_ff", "d_model"))
        _check_shape(ck, router_key, (E, d), "router")
        mxfp4 = arch == "gpt_oss" and prefix + "experts.gate_up_proj_blocks" in ck
        if mxfp4:
            if dtype in ("int8", "int4"):
                raise ValueError(f"dtype={dtype!r}: this gpt-oss checkpoint's experts are "
                                 "MXFP4; re-quantizing them would round twice.  Load with "
                                 "dtype=None (mxfp4) or 'float32', then moe.quantize(layer, "
                                 f"{dtype!r}) to choose that explicitly")
            if dtype not in (None, "mxfp4") + _FLOAT_DTYPES:
                raise ValueError(f"dtype must be None, 'mxfp4', 'float32', 'bfloat16' or "
                                 f"'float16' for MXFP4 gpt-oss experts, got {dtype!r}")
            wg, wu, wd = _gpt_oss_mxfp4(ck, prefix, E, F, d)
            file_dtype = "mxfp4"
            dtype = dtype or "mxfp4"
            if dtype != "mxfp4":  # exact float32, rounded by the layer only for float16
                wg, wu, wd = [QuantizedWeight(v, s, "mxfp4", v.shape[:-1] + (2 * v.shape[-1],),
                                              32).dequantize() for v, s in (wg, wu, wd)]
        elif arch == "gpt_oss":
            wg, wu, wd = _gpt_oss_experts(ck, prefix, E, F, d)
        else:
            wg, wu, wd = _expert_weights(ck, prefix, E, F, d, style)
        if not mxfp4:
            key0 = (prefix + "experts.gate_up_proj" if prefix + "experts.gate_up_proj" in ck
                    else f"{prefix}experts.0.{style[1]}.weight")
            file_dtype = _file_dtype(ck, key0)
        if dtype is None:
            dtype = file_dtype if file_dtype in _FLOAT_DTYPES else "float32"
        convert = file_dtype != dtype
        if file_dtype == "bfloat16" and convert:
            # the layer takes float arrays for a conversion: widen bfloat16 bits exactly
            wg, wu, wd = [(np.asarray(a).astype(np.uint32) << 16).view(np.float32)
                          for a in (wg, wu, wd)]
        moe_layer = SparseMoE(**kw, dtype=dtype, init=False)
        moe_layer.router_weight = _float32(ck, router_key)
        moe_layer.w_gate, moe_layer.w_up, moe_layer.w_down = wg, wu, wd
        if arch == "deepseek_v3":
            moe_layer.expert_bias = _float32(ck, prefix + "gate.e_score_correction_bias")
        if arch == "gpt_oss":
            moe_layer.router_bias = _float32(ck, prefix + "router.bias")
            gub = _float32(ck, prefix + "experts.gate_up_proj_bias")
            moe_layer.b_gate, moe_layer.b_up = gub[:, 0::2], gub[:, 1::2]
            moe_layer.b_down = _float32(ck, prefix + "experts.down_proj_bias")
        if shared is not None:
            sp, gate_key = shared
            H = (fields["shared"], kw["n_shared_experts"] * kw["shared_d_ff"])
            sw = []
            for n, shape in (("gate_proj", (H, d)), ("up_proj", (H, d)), ("down_proj", (d, H))):
                _check_shape(ck, prefix + sp + n + ".weight", shape, "shared expert projections")
                sw.append(np.asarray(ck.get(prefix + sp + n + ".weight")))
            if file_dtype == "bfloat16" and convert:
                sw = [(a.astype(np.uint32) << 16).view(np.float32) for a in sw]
            moe_layer.shared_w_gate, moe_layer.shared_w_up, moe_layer.shared_w_down = sw
            if gate_key is not None:
                moe_layer.shared_gate_weight = _float32(ck, prefix + gate_key)
        moe_layer.pack()  # copies out of the memory map before it closes (mxfp4 values and
        # scales were copied by _gpt_oss_mxfp4: the layer keeps them)
    return moe_layer
