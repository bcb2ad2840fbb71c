"""moe.save / moe.load for every layer class: a bitwise round trip of weights and config."""
import numpy as np
import pytest

import moe


def _layers():
    rng = np.random.default_rng(0)
    out = [
        moe.SoftMoE(16, 24, 4, 2, dtype="bfloat16"),
        moe.MixtureOfTokens(16, 24, 4, 2, temperature=0.5),
        moe.PEER(16, 8, n_heads=2, top_k=3),
        moe.TopKLoRA(16, 12, 4, 4, 2, bias=True, dtype="bfloat16"),
        moe.SoftLoRA(16, 12, 4, 4, per_sequence=True),
        moe.GatedLoRA(16, 12, 4, 4, top_k=2, softmax_topk=True, dtype="float16"),
        moe.HydraLoRA(16, 12, 4, 4, top_k=1),
        moe.FlyLoRA(16, 12, 8, 2, signed=True, bias_rate=0.01),
        moe.SMoRA(16, 12, 8, 2, rank_partition=2),
        moe.MultiLoRA(16, 12, 3, 4),
        moe.SparseMoE(16, [8, 12, 4], 3, 2, null_experts=("copy",), router="top_p"),
    ]
    for layer in out:
        if hasattr(layer, "lora_b"):
            layer.lora_b = rng.standard_normal(layer.lora_b.shape) * 0.1
    out[7].rank_bias = rng.standard_normal(8).astype(np.float32)
    return out


@pytest.mark.parametrize("index", range(11))
def test_round_trip(tmp_path, index):
    layer = _layers()[index]
    path = tmp_path / "layer.safetensors"
    moe.save(layer, path)
    back = moe.load(path)
    assert type(back) is type(layer)
    assert back.config() == layer.config()
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    if isinstance(layer, moe.GatedLoRA):
        c = np.random.default_rng(2).random((2, 5, 4))
        np.testing.assert_array_equal(back(x, c), layer(x, c))
    elif isinstance(layer, moe.MultiLoRA):
        np.testing.assert_array_equal(back(x, 1), layer(x, 1))
    else:
        np.testing.assert_array_equal(back(x), layer(x))


def test_save_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="moe.save takes"):
        moe.save(moe.MultiHeadMoE(8, 2, 8, 2, 1), tmp_path / "x.safetensors")


@pytest.mark.parametrize("config", ["[1, 2]", '"SparseMoE"', "null"])
def test_load_refuses_a_config_that_is_not_an_object(tmp_path, config):
    path = tmp_path / "layer.safetensors"
    moe.save(moe.SparseMoE(8, 4, 2, 1), path)
    tensors = moe.safetensors.load_file(path)
    meta = {"format": moe.io.FORMAT, "class": "SparseMoE", "config": config}
    moe.safetensors.save_file({k: np.array(v) for k, v in tensors.items()}, path,
                              metadata=meta)
    with pytest.raises(ValueError, match=r"the layer config in the metadata must be a JSON "
                                         r"object \(the layer's arguments\), got"):
        moe.load(path)
