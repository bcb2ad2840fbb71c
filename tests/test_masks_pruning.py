"""Group-id masks, expert pruning (by mask and physically) and the pruning statistic."""
import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


def _layer(**kw):
    return moe.SparseMoE(32, 20, 8, 2, seed=4, **kw)


def test_route_with_group_table():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 8))
    table = rng.random((3, 8)) < 0.6
    table[:, :2] = True  # every group can choose at least top_k experts
    groups = rng.integers(0, 3, 50)
    r = moe.route(logits, 2, allowed=table, groups=groups)
    r_ref = ref.route(logits, 2, allowed=table[groups])
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    assert_close(r.weights, r_ref["weights"])
    assert table[groups[:, None], r.expert_ids].all()
    with pytest.raises(ValueError, match=r"groups values must be in \[0, G=3\)"):
        moe.route(logits, 2, allowed=table, groups=np.full(50, 3))
    with pytest.raises(ValueError, match="groups needs an allowed"):
        moe.route(logits, 2, groups=groups)
    bad = table.copy()
    bad[1] = False
    bad[1, 5] = True
    with pytest.raises(ValueError, match=r"allowed lets token \d+ \(through its group\) "
                                         r"choose 1 expert\(s\), fewer than top_k=2"):
        moe.route(logits, 2, allowed=bad, groups=np.where(groups == 1, 1, 0))


@pytest.mark.parametrize("use_groups", [False, True])
def test_layer_masks_match_reference(use_groups):
    rng = np.random.default_rng(1)
    layer = _layer(n_shared_experts=1)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    table = np.ones((2, 8), bool)
    table[0, :4] = False  # group 0: experts 4..7 only; group 1: all
    groups = rng.integers(0, 2, 40)
    per_token = table[groups]
    y, r = (layer(x, True, allowed=table, groups=groups) if use_groups
            else layer(x, True, allowed=per_token))
    y_ref, r_ref = ref.layer_forward(layer, x, allowed=per_token)
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    assert_close(y, y_ref, what="masked layer")
    assert (r.expert_ids[groups == 0] >= 4).all()
    np.testing.assert_array_equal(layer(x[5:6], allowed=table, groups=groups[5:6]), y[5:6])


def test_prune_by_mask_and_physically(tmp_path):
    rng = np.random.default_rng(2)
    # (sigmoid scores: a selection bias keeps its meaning when the pool shrinks; with
    # softmax + expert_bias, removing experts rescales the probabilities the bias is added to)
    layer = _layer(expert_bias=True, expert_biases=True, router_bias=True, scoring="sigmoid")
    layer.expert_bias = rng.standard_normal(8) * 0.1
    x = rng.standard_normal((60, 32)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True, True, True])
    layer.expert_mask = keep
    y_mask, r_mask = layer(x, return_routing=True)
    assert not np.isin([1, 4], r_mask.expert_ids).any()
    y_ref, _ = ref.layer_forward(layer, x, allowed=np.broadcast_to(keep, (60, 8)))
    assert_close(y_mask, y_ref, what="pruned by mask")
    pruned, remap = moe.prune_experts(layer, keep)
    np.testing.assert_array_equal(remap, [0, -1, 1, 2, -1, 3, 4, 5])
    assert pruned.n_experts == 6 and pruned.w_up.shape[0] == 6
    y_phys, r_phys = pruned(x, return_routing=True)
    # same experts chosen (through the remap); with renormalize the same weights
    np.testing.assert_array_equal(remap[r_mask.expert_ids], r_phys.expert_ids)
    assert_close(y_phys, y_mask, what="physically pruned vs masked")
    assert_close(y_phys, ref.layer_forward(pruned, x)[0], what="pruned vs reference")
    same, remap2 = moe.prune_experts(layer, [7, 0, 2])  # indices, any order
    np.testing.assert_array_equal(remap2, [0, -1, 1, -1, -1, -1, -1, 2])
    with pytest.raises(ValueError, match="keep must keep at least one expert"):
        moe.prune_experts(layer, np.zeros(8, bool))
    with pytest.raises(ValueError, match=r"keep indices must be in \[0, n_experts=8\)"):
        moe.prune_experts(layer, [0, 8])
    with pytest.raises(ValueError, match="top_k=2 needs at least that many experts"):
        moe.prune_experts(layer, [3])
    with pytest.raises(ValueError, match=r"expert_mask must allow at least top_k=2"):
        layer.expert_mask = np.eye(8, dtype=bool)[0]
    with pytest.raises(ValueError, match=r"expert_mask must be a bool array of shape"):
        layer.expert_mask = np.ones(7, bool)


def test_pruning_statistic():
    rng = np.random.default_rng(3)
    layer = _layer()
    x = rng.standard_normal((70, 32)).astype(np.float32)
    stats = moe.routing_stats(layer, x)
    _, r_ref = ref.layer_forward(layer, x)
    counts = r_ref["counts"]
    expect = np.where(counts > 0, r_ref["out_norm"] / np.maximum(counts, 1), np.nan)
    assert_close(np.nan_to_num(stats.output_norm), np.nan_to_num(expect),
                 what="gate-weighted output norm")
    assert_close(stats.output_contribution, r_ref["out_norm"], what="contribution")
    assert len(stats.to_dict()["output_norm"]) == 8
    # an expert that is never chosen has NaN
    layer.expert_mask = np.arange(8) != 3
    assert np.isnan(moe.routing_stats(layer, x).output_norm[3])
