"""Load the MoE block of one decoder layer of a Hugging Face checkpoint as a moe.SparseMoE.

Reads `config.json` and the (possibly sharded) safetensors files of a model directory,
memory-mapped, and maps each architecture's routing semantics and weight names onto the
layer: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and gpt-oss (router bias, expert
biases, clamped SwiGLU).  Per-expert keys and fused 3-D expert tensors both load.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from . import safetensors
from .layer import SparseMoE

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
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type"))
    return cfg


def _need(cfg, key, arch):
    """cfg[key]; key may be a tuple of names one version or another of transformers uses."""
    for k in (key if isinstance(key, tuple) else (key,)):
        if k in cfg:
            return cfg[k]
    raise ValueError(f"config.json of this {arch} checkpoint has no {key!r}")


_N_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _layer_plan(cfg, layer):
    """(block prefix, SparseMoE kwargs, expert key style, shared prefix) for one layer."""
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture (model_type) {arch!r}; moe.from_hf knows "
                         f"{', '.join(ARCHITECTURES)}")
    n_layers = _need(cfg, "num_hidden_layers", arch)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in 0..{n_layers - 1}, got {layer!r}")
    act = _ACTIVATIONS.get(cfg.get("hidden_act", "silu"))
    if act is None:
        raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} in config.json")
    d = _need(cfg, "hidden_size", arch)
    kw = dict(d_model=d, activation=act, top_k=_need(cfg, "num_experts_per_tok", arch))
    prefix = f"model.layers.{layer}.mlp."
    shared = None
    if arch == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe."
        kw.update(d_ff=_need(cfg, "intermediate_size", arch),
                  n_experts=_need(cfg, _N_EXPERTS, arch), renormalize=True)
        style = ("w1", "w3", "w2")
    elif arch in ("qwen2_moe", "qwen3_moe"):
        sparse_step = cfg.get("decoder_sparse_step", 1) or 1
        if layer in (cfg.get("mlp_only_layers") or []) or (layer + 1) % sparse_step:
            raise ValueError(f"layer {layer} of this {arch} checkpoint is a dense MLP, not an "
                             "MoE block (mlp_only_layers / decoder_sparse_step)")
        kw.update(d_ff=_need(cfg, "moe_intermediate_size", arch),
                  n_experts=_need(cfg, _N_EXPERTS, arch),
                  renormalize=bool(cfg.get("norm_topk_prob", False)))
        style = ("gate_proj", "up_proj", "down_proj")
        if arch == "qwen2_moe" and cfg.get("shared_expert_intermediate_size", 0):
            kw.update(n_shared_experts=1, shared_d_ff=cfg["shared_expert_intermediate_size"],
                      shared_expert_gate=True)
            shared = ("shared_expert.", "shared_expert_gate.weight")
    elif arch == "olmoe":
        kw.update(d_ff=_need(cfg, "intermediate_size", arch),
                  n_experts=_need(cfg, _N_EXPERTS, arch),
                  renormalize=bool(cfg.get("norm_topk_prob", False)))
        style = ("gate_proj", "up_proj", "down_proj")
    elif arch == "deepseek_v3":
        first_dense = cfg.get("first_k_dense_replace", 0)
        freq = cfg.get("moe_layer_freq", 1) or 1
        if layer < first_dense or layer % freq:
            raise ValueError(f"layer {layer} of this deepseek_v3 checkpoint is a dense MLP "
                             f"(first_k_dense_replace={first_dense}, moe_layer_freq={freq})")
        F = _need(cfg, "moe_intermediate_size", arch)
        kw.update(d_ff=F, n_experts=_need(cfg, _N_EXPERTS, arch), scoring="sigmoid",
                  renormalize=bool(cfg.get("norm_topk_prob", True)),
                  routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
                  n_groups=cfg.get("n_group", 1) or 1, topk_groups=cfg.get("topk_group", 1) or 1,
                  expert_bias=True)
        if cfg.get("n_shared_experts"):
            kw.update(n_shared_experts=cfg["n_shared_experts"], shared_d_ff=F)
            shared = ("shared_experts.", None)
        style = ("gate_proj", "up_proj", "down_proj")
    else:  # gpt_oss: router with a bias, top-k of the logits then softmax, clamped SwiGLU
        kw.update(d_ff=_need(cfg, "intermediate_size", arch),
                  n_experts=_need(cfg, _N_EXPERTS, arch), scoring="softmax-after-topk",
                  activation="swiglu-oai", router_bias=True, expert_biases=True,
                  swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                  swiglu_limit=float(cfg.get("swiglu_limit", 7.0)))
        style = None
    return arch, prefix, kw, style, shared


def _stack(ck, keys, label):
    missing = [k for k in keys if k not in ck]
    if missing:
        raise KeyError(f"the checkpoint has no tensor {missing[0]!r} ({label})")
    return np.stack([np.asarray(ck.get(k)) for k in keys])


def _expert_weights(ck, prefix, E, F, style):
    """(w_gate, w_up, w_down) as (E, F, d), (E, F, d), (E, d, F) in the file's dtype."""
    g, u, dn = style
    if prefix + "experts.gate_up_proj" in ck:  # fused 3-D tensors (transformers >= 5)
        gu = np.asarray(ck.get(prefix + "experts.gate_up_proj"))
        down = np.asarray(ck.get(prefix + "experts.down_proj"))
        if gu.ndim != 3 or gu.shape[0] != E or gu.shape[1] != 2 * F:
            raise ValueError(f"{prefix}experts.gate_up_proj has shape {gu.shape}, expected "
                             f"({E}, {2 * F}, d_model)")
        return gu[:, :F], gu[:, F:], down
    keys = lambda name: [f"{prefix}experts.{e}.{name}.weight" for e in range(E)]  # noqa: E731
    return (_stack(ck, keys(g), "expert gate projections"),
            _stack(ck, keys(u), "expert up projections"),
            _stack(ck, keys(dn), "expert down projections"))


def _gpt_oss_experts(ck, prefix, E, F):
    """gpt-oss stores (E, d, 2F) with gate and up interleaved column by column, and
    (E, F, d) for down: transpose to the nn.Linear layout."""
    gu = np.asarray(ck.get(prefix + "experts.gate_up_proj"))
    down = np.asarray(ck.get(prefix + "experts.down_proj"))
    if gu.ndim != 3 or gu.shape[0] != E or gu.shape[2] != 2 * F:
        raise ValueError(f"{prefix}experts.gate_up_proj has shape {gu.shape}, expected "
                         f"({E}, d_model, {2 * F})")
    return (gu[:, :, 0::2].transpose(0, 2, 1), gu[:, :, 1::2].transpose(0, 2, 1),
            down.transpose(0, 2, 1))


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
    "bfloat16" / "float16" converts (bfloat16 -> float32 is exact).  progress: a callable
    (i, n_files, filename), default a bar on stderr for multi-file checkpoints; False for
    none.  Routing semantics come from the config (softmax/sigmoid, norm_topk_prob,
    routed_scaling_factor, n_group/topk_group, e_score_correction_bias, shared experts and
    Qwen2-MoE's shared-expert gate).  Unknown architectures and missing keys raise
    ValueError / KeyError naming them.
    """
    cfg = _read_config(path)
    arch, prefix, kw, style, shared = _layer_plan(cfg, layer)
    bar = None if progress is False else (progress or _progress_bar)
    with safetensors.open_checkpoint(path, progress=bar) as ck:
        router_key = prefix + ("router.weight" if arch == "gpt_oss" else "gate.weight")
        if router_key not in ck:
            raise KeyError(f"the checkpoint has no tensor {router_key!r}: layer {layer} has no "
                           f"{arch} MoE block here")
        E, F = kw["n_experts"], kw["d_ff"]
        if arch == "gpt_oss":
            wg, wu, wd = _gpt_oss_experts(ck, prefix, E, F)
        else:
            wg, wu, wd = _expert_weights(ck, prefix, E, F, style)
        key0 = (prefix + "experts.gate_up_proj" if prefix + "experts.gate_up_proj" in ck
                else f"{prefix}experts.0.{style[1]}.weight")
        file_dtype = _file_dtype(ck, key0)
        if dtype is None:
            dtype = file_dtype if file_dtype in ("float32", "bfloat16", "float16") else "float32"
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
            sw = [np.asarray(ck.get(prefix + sp + n + ".weight"))
                  if prefix + sp + n + ".weight" in ck else None
                  for n in ("gate_proj", "up_proj", "down_proj")]
            if any(a is None for a in sw):
                raise KeyError(f"the checkpoint has no tensor {prefix}{sp}(gate|up|down)_proj"
                               ".weight for the shared expert")
            if file_dtype == "bfloat16" and convert:
                sw = [(a.astype(np.uint32) << 16).view(np.float32) for a in sw]
            moe_layer.shared_w_gate, moe_layer.shared_w_up, moe_layer.shared_w_down = sw
            if gate_key is not None:
                moe_layer.shared_gate_weight = _float32(ck, prefix + gate_key)
        moe_layer.pack()  # copies out of the memory map before it closes
    return moe_layer
