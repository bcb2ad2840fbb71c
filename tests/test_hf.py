"""moe.from_hf against transformers' own MoE blocks, and layer save/load.

For each architecture a tiny random model is built with transformers (config -> model ->
save_pretrained into a temporary folder, no download), loaded with moe.from_hf, and its
block output and expert ids compared with the transformers module on the same input.
Also bf16 and sharded checkpoints, the errors, and a bitwise save/load round trip.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import moe
from moe import safetensors
from tolerances import assert_close

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, num_experts=6,
                       num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                         first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         routed_scaling_factor=2.5)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                     head_dim=8, layer_types=["full_attention", "full_attention"])),
}
MOE_LAYER = 1  # DeepSeek-V3's layer 0 is dense here (first_k_dense_replace=1)


def build(arch, seed=0, dtype=None):
    """A tiny random transformers model of `arch` (weights N(0, 0.2), biases too)."""
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**COMMON, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.05)  # selection-only bias: make it matter
    return model.to(dtype) if dtype is not None else model


def block(model):
    return model.model.layers[MOE_LAYER].mlp


def hf_forward(model, x):
    with torch.no_grad():
        out = block(model)(torch.from_numpy(x))
    return (out[0] if isinstance(out, tuple) else out).float().numpy()


def hf_expert_ids(arch, model, x):
    """The experts transformers' router picks for each token (best first)."""
    mlp = block(model)
    router = mlp.router if arch == "gpt_oss" else mlp.gate
    with torch.no_grad():
        out = router(torch.from_numpy(x.reshape(-1, x.shape[-1])))
    return out[-1].numpy()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_from_hf_matches_transformers(arch, tmp_path, rng):
    model = build(arch)
    model.save_pretrained(tmp_path)
    layer = moe.from_hf(str(tmp_path), MOE_LAYER)
    x = (rng.standard_normal((3, 11, 32)) * 2).astype(np.float32)
    y, routing = layer(x, return_routing=True)
    ref = hf_forward(model, x)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-5, f"{arch}: relative error {err:.2e}"
    assert_close(y, ref, rtol=1e-4, atol_scale=1e-5, what=arch)
    ids = hf_expert_ids(arch, model, x)
    assert np.array_equal(np.sort(routing.expert_ids, axis=1), np.sort(ids, axis=1)), arch
    # and the float64 oracle agrees with both
    ref64, _ = moe.reference.layer_forward(layer, x)
    assert_close(y, ref64, what=f"{arch} vs moe.reference")


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_bf16_checkpoint(arch, tmp_path, rng):
    model = build(arch, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    with safetensors.safe_open(str(tmp_path / "model.safetensors")) as f:
        assert "BF16" in {f.dtype(k) for k in f.keys()}
    kept = moe.from_hf(str(tmp_path), MOE_LAYER)
    widened = moe.from_hf(str(tmp_path), MOE_LAYER, dtype="float32")
    assert kept.dtype == "bfloat16" and widened.dtype == "float32"
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    # bf16 -> fp32 is exact and both compute in fp32: the same bits
    assert np.array_equal(kept(x), widened(x))
    # against transformers in fp32 on the very same (bf16-valued) weights
    ref = hf_forward(model.float(), x)
    err = float(np.max(np.abs(kept(x) - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-5, f"{arch}: relative error {err:.2e}"


def test_sharded_checkpoint_and_progress(tmp_path, rng):
    model = build("qwen2_moe")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    calls = []
    layer = moe.from_hf(str(tmp_path), MOE_LAYER, progress=lambda *a: calls.append(a))
    n_files = len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")])
    assert n_files > 1 and len(calls) == n_files
    x = rng.standard_normal((1, 5, 32)).astype(np.float32)
    assert_close(layer(x), hf_forward(model, x), rtol=1e-4, atol_scale=1e-5)


def test_errors(tmp_path):
    model = build("deepseek_v3")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer 0 of this deepseek_v3 checkpoint is a dense"):
        moe.from_hf(str(tmp_path), 0)
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.1, got 5"):
        moe.from_hf(str(tmp_path), 5)
    # a missing key is named
    path = str(tmp_path / "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors.load_file(path).items()}
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[key]
    safetensors.save_file(tensors, path)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        moe.from_hf(str(tmp_path), 1)
    # an unknown architecture is named
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown architecture \(model_type\) 'llama'"):
        moe.from_hf(str(tmp_path), 1)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        moe.from_hf(str(tmp_path / "nowhere"), 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["deepseek", "gpt_oss", "plain"])
def test_save_load_round_trip(dtype, kind, tmp_path, rng):
    if kind == "deepseek":
        layer = moe.SparseMoE(24, 20, 8, 3, scoring="sigmoid", expert_bias=True, n_groups=4,
                              topk_groups=2, routed_scaling=2.5, n_shared_experts=2,
                              shared_expert_gate=True, dtype=dtype, seed=3)
        layer.expert_bias[:] = rng.standard_normal(8) * 0.1
    elif kind == "gpt_oss":
        layer = moe.SparseMoE(24, 20, 8, 2, activation="swiglu-oai",
                              scoring="softmax-after-topk", router_bias=True,
                              expert_biases=True, swiglu_limit=3.0, dtype=dtype, seed=4)
        layer.router_bias = rng.standard_normal(8).astype(np.float32)
        layer.b_up = rng.standard_normal((8, 20)).astype(np.float32)
    else:
        layer = moe.SparseMoE(24, 20, 8, 2, activation="gelu", capacity_factor=1.5,
                              dtype=dtype, seed=5)
    path = str(tmp_path / "layer.safetensors")
    layer.save(path)
    back = moe.load(path)
    assert back.config() == layer.config()
    for name in ("router_weight", "w_gate", "w_up", "w_down", "expert_bias", "shared_w_gate",
                 "shared_w_up", "shared_w_down", "shared_gate_weight", "router_bias",
                 "b_gate", "b_up", "b_down"):
        a, b = getattr(layer, name, None), getattr(back, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    x = rng.standard_normal((7, 24)).astype(np.float32)
    assert np.array_equal(layer(x), back(x))


def test_load_rejects_other_files(tmp_path):
    path = str(tmp_path / "x.safetensors")
    safetensors.save_file({"a": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match=r"not a moe layer file"):
        moe.load(path)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fused_expert_tensors_load(arch, tmp_path, rng):
    """The same checkpoint with its experts stored as fused 3-D tensors (transformers' own
    in-memory layout: gate_up_proj (E, 2F, d), down_proj (E, d, F)) loads to the same layer."""
    model = build(arch)
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors.load_file(path).items()}
    prefix = (f"model.layers.{MOE_LAYER}.block_sparse_moe." if arch == "mixtral"
              else f"model.layers.{MOE_LAYER}.mlp.")
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    E = ARCHS[arch][2].get("num_local_experts", ARCHS[arch][2].get("num_experts"))
    per = {n: np.stack([tensors.pop(f"{prefix}experts.{e}.{n}.weight") for e in range(E)])
           for n in names}
    tensors[prefix + "experts.gate_up_proj"] = np.concatenate([per[names[0]], per[names[1]]],
                                                              axis=1)
    tensors[prefix + "experts.down_proj"] = per[names[2]]
    per_expert = moe.from_hf(str(tmp_path), MOE_LAYER)
    safetensors.save_file(tensors, path)
    fused = moe.from_hf(str(tmp_path), MOE_LAYER)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    assert np.array_equal(fused(x), per_expert(x))
    assert_close(fused(x[None]), hf_forward(model, x[None]), rtol=1e-4, atol_scale=1e-5)


def tiny_mixtral(folder, **config):
    """A hand-written Mixtral checkpoint of 4 experts (d_model 16, d_ff 8; the keys and
    layout save_pretrained writes) whose config.json takes `config` over the true sizes."""
    d, F, E = 16, 8, 4
    src = moe.SparseMoE(d_model=d, d_ff=F, n_experts=E, top_k=2, seed=1)
    prefix = "model.layers.0.block_sparse_moe."
    tensors = {prefix + "gate.weight": src.router_weight}
    for e in range(E):
        for name, w in (("w1", src.w_gate), ("w3", src.w_up), ("w2", src.w_down)):
            tensors[f"{prefix}experts.{e}.{name}.weight"] = w[e]
    safetensors.save_file(tensors, str(folder / "model.safetensors"))
    cfg = {"model_type": "mixtral", "hidden_size": d, "intermediate_size": F,
           "num_local_experts": E, "num_experts_per_tok": 2, "num_hidden_layers": 1}
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                    if v is not None}))
    return str(folder)


@pytest.mark.parametrize("field, value", [("num_local_experts", 10**9),
                                          ("num_local_experts", 5), ("num_local_experts", 3),
                                          ("hidden_size", 17), ("intermediate_size", 9)])
def test_config_sizes_checked_against_the_file(field, value, tmp_path):
    """A config asking for more (or other) than the checkpoint's tensors hold fails on the
    header, naming the field, before building a name or an array of that size (10**9
    experts would once build 10**9 key names)."""
    folder = tiny_mixtral(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.json: {field}={value}, but .* has shape"):
        moe.from_hf(folder, 0)


@pytest.mark.parametrize("config, error, message", [
    ({"num_local_experts": -3}, ValueError, r"num_local_experts must be in >= 1, got -3"),
    ({"num_hidden_layers": "1"}, TypeError, r"num_hidden_layers must be an int, got str"),
    ({"num_experts_per_tok": True}, TypeError, r"num_experts_per_tok must be an int, got bool"),
    ({"hidden_size": None, "text_config": 5}, TypeError,
     r"text_config must be a JSON object, got int"),
])
def test_bad_config_fields_are_named(config, error, message, tmp_path):
    with pytest.raises(error, match=r"config\.json: " + message):
        moe.from_hf(tiny_mixtral(tmp_path, **config), 0)


# gpt-oss's native MXFP4 experts: per output row (nn.Linear layout), blocks (E, rows, k/32,
# 16) uint8 and e8m0 scales (E, rows, k/32); gate_up_proj rows interleave gate (even) and up
# (odd).  transformers dequantizes them with convert_moe_packed_tensors to its (E, d, 2F) and
# (E, F, d) parameters.
MX = dict(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory):
    """(folder, the file's tensors, a float transformers gpt-oss model whose experts are the
    checkpoint's MXFP4 experts as dequantized by transformers' convert_moe_packed_tensors)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    torch.manual_seed(7)
    cfg = T.GptOssConfig(**dict(COMMON, **MX), head_dim=8,
                         layer_types=["full_attention", "full_attention"])
    model = T.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for layer in model.model.layers:  # scales spread over a few binades
            ex = layer.mlp.experts
            ex.gate_up_proj.mul_(torch.exp2(torch.randint(-3, 4, ex.gate_up_proj.shape[:2]))
                                 [..., None])
    model.save_pretrained(folder)
    path = str(folder / "model.safetensors")
    tensors = {k: np.array(v) for k, v in safetensors.load_file(path).items()}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        ex = layer.mlp.experts
        for name, param in (("gate_up_proj", ex.gate_up_proj), ("down_proj", ex.down_proj)):
            del tensors[prefix + name]
            # (E, d, 2F) / (E, F, d) -> rows = outputs: (E, 2F, d) with gate/up rows
            # interleaved (0::2 / 1::2, like the bias), (E, d, F)
            w = param.detach().numpy().transpose(0, 2, 1)
            q = moe.quant.quantize_weight(w, "mxfp4")
            rows, k = w.shape[1:]
            blocks = q.values.reshape(len(w), rows, k // 32, 16)
            tensors[prefix + name + "_blocks"] = blocks
            tensors[prefix + name + "_scales"] = q.scales
            deq = convert_moe_packed_tensors(torch.from_numpy(blocks),
                                             torch.from_numpy(q.scales), dtype=torch.float32)
            assert tuple(deq.shape) == tuple(param.shape)
            with torch.no_grad():
                param.copy_(deq)
    safetensors.save_file(tensors, path)
    return str(folder), tensors, model


def test_gpt_oss_mxfp4_keeps_the_files_bytes(mxfp4_gpt_oss):
    folder, tensors, _ = mxfp4_gpt_oss
    layer = moe.from_hf(folder, MOE_LAYER)
    E, F, d = MX["num_local_experts"], MX["intermediate_size"], MX["hidden_size"]
    assert layer.dtype == "mxfp4" and layer.group_size == 32
    prefix = f"model.layers.{MOE_LAYER}.mlp.experts."
    gu = tensors[prefix + "gate_up_proj_blocks"].reshape(E, 2 * F, d // 2)
    gus = tensors[prefix + "gate_up_proj_scales"]
    expected = {"w_gate": (gu[:, 0::2], gus[:, 0::2]), "w_up": (gu[:, 1::2], gus[:, 1::2]),
                "w_down": (tensors[prefix + "down_proj_blocks"].reshape(E, d, F // 2),
                           tensors[prefix + "down_proj_scales"])}
    for name, (values, scales) in expected.items():
        w = getattr(layer, name)
        assert isinstance(w, moe.QuantizedWeight) and w.dtype == "mxfp4", name
        assert w.values.dtype == np.uint8 and np.array_equal(w.values, values), name
        assert w.scales.dtype == np.uint8 and np.array_equal(w.scales, scales), name
        assert w.values.flags.owndata and w.scales.flags.owndata, name  # not the file's map
    assert layer.w_gate.shape == (E, F, d) and layer.w_down.shape == (E, d, F)
    gub = tensors[prefix + "gate_up_proj_bias"]
    assert np.array_equal(layer.b_gate, gub[:, 0::2]) and np.array_equal(layer.b_up, gub[:, 1::2])
    assert np.array_equal(layer.b_down, tensors[prefix + "down_proj_bias"])


def test_gpt_oss_mxfp4_matches_transformers(mxfp4_gpt_oss, rng):
    """The layer against transformers' gpt-oss block on transformers' own dequantization of
    the same blocks and scales (convert_moe_packed_tensors): the weights bitwise, the output
    to float32 rounding, the same experts."""
    folder, _, model = mxfp4_gpt_oss
    layer = moe.from_hf(folder, MOE_LAYER)
    ex = block(model).experts
    gate_up = ex.gate_up_proj.detach().numpy()  # (E, d, 2F), gate the even columns
    assert np.array_equal(layer.w_gate.dequantize(), gate_up[..., 0::2].transpose(0, 2, 1))
    assert np.array_equal(layer.w_up.dequantize(), gate_up[..., 1::2].transpose(0, 2, 1))
    assert np.array_equal(layer.w_down.dequantize(),
                          ex.down_proj.detach().numpy().transpose(0, 2, 1))
    x = (rng.standard_normal((3, 11, MX["hidden_size"])) * 2).astype(np.float32)
    y, routing = layer(x, return_routing=True)
    ref64, _ = moe.reference.layer_forward(layer, x)
    assert_close(y, ref64, what="mxfp4 gpt-oss vs moe.reference")
    ref = hf_forward(model, x)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-5, f"relative error {err:.2e} against transformers"
    ids = hf_expert_ids("gpt_oss", model, x)
    assert np.array_equal(np.sort(routing.expert_ids, axis=1), np.sort(ids, axis=1))


def test_gpt_oss_mxfp4_dequantized_loads(mxfp4_gpt_oss, rng):
    folder, _, _ = mxfp4_gpt_oss
    kept = moe.from_hf(folder, MOE_LAYER)
    explicit = moe.from_hf(folder, MOE_LAYER, dtype="mxfp4")
    wide = moe.from_hf(folder, MOE_LAYER, dtype="float32")
    bf16 = moe.from_hf(folder, MOE_LAYER, dtype="bfloat16")
    f16 = moe.from_hf(folder, MOE_LAYER, dtype="float16")
    assert explicit.dtype == "mxfp4" and wide.dtype == "float32" and bf16.dtype == "bfloat16"
    for name in ("w_gate", "w_up", "w_down"):
        deq = getattr(kept, name).dequantize()
        assert np.array_equal(getattr(explicit, name).values, getattr(kept, name).values)
        w = getattr(wide, name)
        assert w.dtype == np.float32 and np.array_equal(w.view(np.uint32), deq.view(np.uint32))
        # e2m1 times a power of two is exact in bfloat16
        bits = getattr(bf16, name).astype(np.uint32) << 16
        assert np.array_equal(bits, deq.view(np.uint32)), name
        # and in float16 within its range (these scales are)
        assert np.array_equal(getattr(f16, name).astype(np.float32), deq), name
    # the quantized kernels are bitwise the float32 ones on the dequantized weights
    x = rng.standard_normal((2, 9, MX["hidden_size"])).astype(np.float32)
    assert np.array_equal(kept(x), wide(x)) and np.array_equal(kept(x), bf16(x))
    assert np.array_equal(kept(x), f16(x))
    for dtype in ("int8", "int4"):
        with pytest.raises(ValueError, match=rf"dtype='{dtype}': this gpt-oss checkpoint's "
                                             r"experts are MXFP4"):
            moe.from_hf(folder, MOE_LAYER, dtype=dtype)
    with pytest.raises(ValueError, match=r"dtype must be None, 'mxfp4', .* got 'fp4'"):
        moe.from_hf(folder, MOE_LAYER, dtype="fp4")


@pytest.mark.parametrize("name, shape", [
    ("gate_up_proj_blocks", (4, 64, 2, 16)),    # rows: intermediate_size, not 2*
    ("gate_up_proj_blocks", (4, 128, 2, 8)),    # half blocks
    ("gate_up_proj_scales", (4, 128, 1)),       # k/32 of hidden_size
    ("down_proj_blocks", (4, 64, 4, 16)),       # intermediate_size/32
    ("down_proj_scales", (4, 32, 2)),           # rows: hidden_size
])
def test_gpt_oss_mxfp4_shapes_checked(name, shape, mxfp4_gpt_oss, tmp_path):
    """A blocks or scales tensor of the wrong shape fails on the header, naming it."""
    folder, tensors, _ = mxfp4_gpt_oss
    key = f"model.layers.{MOE_LAYER}.mlp.experts.{name}"
    bad = dict(tensors, **{key: np.zeros(shape, np.uint8)})
    safetensors.save_file(bad, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    with pytest.raises(ValueError, match=re.escape(key) + r" \(.*\) in the checkpoint has "
                                         + re.escape(f"shape {shape}, expected")):
        moe.from_hf(str(tmp_path), MOE_LAYER)


def test_gpt_oss_mxfp4_blocks_must_be_bytes(mxfp4_gpt_oss, tmp_path):
    folder, tensors, _ = mxfp4_gpt_oss
    key = f"model.layers.{MOE_LAYER}.mlp.experts.down_proj_scales"
    bad = dict(tensors, **{key: tensors[key].astype(np.int8)})
    safetensors.save_file(bad, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    with pytest.raises(TypeError, match=re.escape(key) + r" \(.*\) in the checkpoint is I8, "
                                        r"expected U8"):
        moe.from_hf(str(tmp_path), MOE_LAYER)
