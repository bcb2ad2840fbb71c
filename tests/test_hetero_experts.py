"""Heterogeneous expert sizes: a per-expert d_ff."""
import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_expert_d_ff(activation, dtype):
    rng = np.random.default_rng(7)
    sizes = [40, 17, 0, 33, 8, 40]
    layer = moe.SparseMoE(24, sizes, 6, 2, activation=activation, dtype=dtype,
                          expert_biases=True, seed=2)
    layer.b_up = rng.standard_normal((6, 40)) * 0.1
    if layer.b_gate is not None:
        layer.b_gate = rng.standard_normal((6, 40)) * 0.1
    assert layer.d_ff == 40 and layer.expert_d_ff == tuple(sizes)
    x = rng.standard_normal((60, 24)).astype(np.float32)
    y, r = layer(x, return_routing=True)
    y_ref, r_ref = ref.layer_forward(layer, x)
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    assert_close(y, y_ref, what=f"heterogeneous {activation} {dtype}")
    # rows past an expert's size are ignored: junk there changes nothing
    w = layer.w_up.copy()
    w[1, 17:] = 1e3
    layer.w_up = w
    np.testing.assert_array_equal(layer(x), y)
    np.testing.assert_array_equal(layer(x[3:4]), y[3:4])


def test_per_expert_d_ff_errors_and_io(tmp_path):
    with pytest.raises(ValueError, match="d_ff must be an int or n_experts=3 sizes, got 2"):
        moe.SparseMoE(8, [4, 5], 3, 1)
    with pytest.raises(ValueError, match="expert LoRA"):
        moe.SparseMoE(8, [4, 5, 6], 3, 1, lora_rank=2)
    layer = moe.SparseMoE(8, [4, 5, 6], 3, 1, seed=1)
    layer.save(tmp_path / "h.safetensors")
    back = moe.load(tmp_path / "h.safetensors")
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(back(x), layer(x))
    assert moe.SparseMoE(8, [4, 4, 4], 3, 1).expert_d_ff is None  # uniform: plain d_ff
