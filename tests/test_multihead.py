"""Multi-head MoE: sub-token routing through one inner SparseMoE."""
import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_multi_head_moe(n_heads, dtype):
    rng = np.random.default_rng(n_heads)
    layer = moe.MultiHeadMoE(48, n_heads, 20, 6, 2, dtype=dtype, scoring="sigmoid",
                             n_shared_experts=1, seed=3)
    x = rng.standard_normal((2, 9, 48)).astype(np.float32)
    y, r = layer(x, return_routing=True)
    assert y.shape == (2, 9, 48) and r.expert_ids.shape == (18 * n_heads, 2)
    y_ref, r_ref = ref.multi_head_moe(layer, x)
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    assert_close(y.reshape(-1, 48), y_ref, what=f"MH-MoE heads={n_heads} {dtype}")
    np.testing.assert_array_equal(layer(x[1, 3:4]), y[1, 3:4])


def test_multi_head_moe_errors():
    with pytest.raises(ValueError, match="n_heads must divide d_model=10"):
        moe.MultiHeadMoE(10, 3, 8, 4, 1)
    layer = moe.MultiHeadMoE(8, 2, 8, 4, 1)
    with pytest.raises(ValueError, match=r"w_in must have shape \(d_model=8, d_model=8\)"):
        layer.w_in = np.zeros((8, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(..., d_model=8\)"):
        layer(np.zeros((3, 4)))
    bare = moe.MultiHeadMoE(8, 2, 8, 4, 1, init=False)
    with pytest.raises(ValueError, match="w_in and w_merge must be set"):
        bare(np.zeros((3, 8)))
