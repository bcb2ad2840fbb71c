"""Null experts (MoE++) in SparseMoE against moe.reference."""
import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


def _layer(kinds, **kw):
    layer = moe.SparseMoE(40, 24, 6, 3, null_experts=kinds, seed=3, **kw)
    # strong null logits so that null experts are chosen often
    layer.router_weight[6:] *= 3.0
    return layer


@pytest.mark.parametrize("kinds", [("zero",), ("copy",), ("constant",),
                                   ("zero", "copy", "constant", "constant")])
@pytest.mark.parametrize("opts", [{}, {"scoring": "sigmoid", "expert_bias": True},
                                  {"n_shared_experts": 1, "renormalize": False}])
def test_null_experts_match_reference(kinds, opts):
    rng = np.random.default_rng(len(kinds))
    layer = _layer(kinds, **opts)
    if layer.use_expert_bias:
        layer.expert_bias = rng.standard_normal(layer.n_router) * 0.1
    x = rng.standard_normal((57, 40)).astype(np.float32)
    y, r = layer(x, return_routing=True)
    y_ref, r_ref = ref.layer_forward(layer, x)
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    np.testing.assert_array_equal(r.n_real, r_ref["n_real"])
    np.testing.assert_array_equal(r.counts, r_ref["counts"])
    assert r.counts.shape == (6 + len(kinds),)
    assert (r.expert_ids >= 6).any() and (r.n_real < 3).any()  # null experts were used
    assert_close(y, y_ref, what=f"null experts {kinds}")
    # batch invariance holds with null experts too
    np.testing.assert_array_equal(layer(x[10:11]), y[10:11])


def test_null_experts_all_null_token_and_errors(tmp_path):
    layer = moe.SparseMoE(16, 8, 2, 2, null_experts=("copy", "zero"), seed=1)
    layer.router_weight[:2] = 0.0
    layer.router_weight[2:] = 0.0
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    # all logits 0: ties go to the lower index, so the real experts 0 and 1 win
    _, r = layer(x, return_routing=True)
    np.testing.assert_array_equal(r.expert_ids, [[0, 1]] * 5)
    layer.router_weight[2] = 1.0  # copy expert: strongly preferred for x . 1 > 0 tokens
    layer.router_weight[3] = 1.0
    y, r = layer(x, return_routing=True)
    y_ref, r_ref = ref.layer_forward(layer, x)
    assert_close(y, y_ref, what="mostly null")
    np.testing.assert_array_equal(r.n_real, r_ref["n_real"])
    assert (r.n_real == 0).any()
    layer.save(tmp_path / "n.safetensors")
    back = moe.load(tmp_path / "n.safetensors")
    assert back.null_experts == ("copy", "zero")
    np.testing.assert_array_equal(back(x), y)
    with pytest.raises(ValueError, match="null_experts entry must be one of"):
        moe.SparseMoE(16, 8, 2, 2, null_experts=("identity",))
    with pytest.raises(ValueError, match=r"router_weight must have shape \(n_router=4, "
                                         r"d_model=16\)"):
        layer.router_weight = np.zeros((2, 16))
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        moe.SparseMoE(16, 8, 2, 5, null_experts=("zero", "zero"))
