"""SparseMoE with the routers beyond top-k (expert choice, top-p, threshold)."""
import numpy as np
import pytest

import moe
from moe import reference as ref
from tolerances import assert_close


def check_against_reference(layer, x, what):
    """The layer's output and routing against moe.reference.layer_forward: ids and counts
    exactly, weights and output to the tolerance table.  Returns (y, routing, the
    reference's routing)."""
    y, r = layer(x, return_routing=True)
    y_ref, r_ref = ref.layer_forward(layer, x)
    np.testing.assert_array_equal(r.expert_ids, r_ref["expert_ids"])
    np.testing.assert_array_equal(r.counts, r_ref["counts"])
    assert_close(r.weights, r_ref["weights"], what=f"{what}: weights")
    assert_close(y, y_ref, what=what)
    return y, r, r_ref


@pytest.mark.parametrize("router,opts", [
    ("expert_choice", {}), ("expert_choice", {"capacity_factor": 2.0, "scoring": "sigmoid"}),
    ("expert_choice", {"capacity_factor": 0.01}),
    ("top_p", {"router_p": 0.6}), ("top_p", {"router_p": 1.0, "renormalize": False}),
    ("threshold", {"router_threshold": 0.12, "k_min": 1}),
    ("threshold", {"router_threshold": 0.2, "routed_scaling": 2.0,
                   "null_experts": ("copy", "zero")}),
])
def test_layer_routers_match_reference(router, opts):
    rng = np.random.default_rng(len(router) + len(opts))
    layer = moe.SparseMoE(32, 24, 8, 3, router=router, n_shared_experts=1, seed=5, **opts)
    x = rng.standard_normal((45, 32)).astype(np.float32)
    y, r, r_ref = check_against_reference(layer, x, f"SparseMoE(router={router!r})")
    assert np.isfinite(r.aux_loss) and r.z_loss > 0
    # the losses come from the core (no Python on the layer's path), the reference's own
    # formula agrees to rounding
    assert r.aux_loss == pytest.approx(r_ref["aux_loss"], rel=1e-12)
    assert r.z_loss == pytest.approx(r_ref["z_loss"], rel=1e-12)
    if router != "expert_choice":  # token choice: batch-independent
        np.testing.assert_array_equal(layer(x[7:8]), y[7:8])
    back = moe.SparseMoE(**layer.config(), init=False)
    assert back.router == router


def test_layer_router_errors():
    with pytest.raises(ValueError, match="router must be one of"):
        moe.SparseMoE(8, 8, 4, 2, router="hash")
    with pytest.raises(ValueError, match="takes no n_groups / expert_bias"):
        moe.SparseMoE(8, 8, 4, 2, router="top_p", expert_bias=True)
    with pytest.raises(ValueError, match=r"router_p must be in \(0, 1\]"):
        moe.SparseMoE(8, 8, 4, 2, router="top_p", router_p=0.0)
    layer = moe.SparseMoE(8, 8, 4, 2, router="top_p")
    with pytest.raises(ValueError, match="need router='top_k'"):
        layer(np.zeros((3, 8), np.float32), allowed=np.ones((3, 4), bool))


@pytest.mark.parametrize("router", ["top_k", "top_p"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_layer_expert_skipping(router, renormalize):
    rng = np.random.default_rng(9)
    layer = moe.SparseMoE(32, 24, 8, 3, router=router, skip_threshold=0.3,
                          skip_renormalize=renormalize, seed=6)
    x = rng.standard_normal((50, 32)).astype(np.float32)
    y, r, r_ref = check_against_reference(layer, x, "skipping layer")
    plain = moe.SparseMoE(**dict(layer.config(), skip_threshold=0.0), init=False)
    for name in ("router_weight", "w_gate", "w_up", "w_down"):
        setattr(plain, name, getattr(layer, name))
    _, r0 = plain(x, return_routing=True)
    skipped = int((r.expert_ids < 0).sum() - (r0.expert_ids < 0).sum())  # top-p pads with -1
    assert skipped > 0 and r.n_dropped == skipped
    np.testing.assert_array_equal(layer(x[4:5]), y[4:5])
    with pytest.raises(ValueError, match="skip_threshold must be >= 0"):
        moe.SparseMoE(8, 8, 4, 2, skip_threshold=-1.0)


@pytest.mark.parametrize("router", ["top_k", "expert_choice", "top_p", "threshold"])
def test_layer_routing_does_not_use_the_reference(router, monkeypatch):
    # The test oracle is not on the production path: every router runs (and computes its
    # losses) in the core, with moe.reference's functions broken.
    layer = moe.SparseMoE(16, 8, 6, 2, router=router, seed=1)
    x = np.random.default_rng(3).standard_normal((9, 16)).astype(np.float32)
    want, r_want = layer(x, return_routing=True)

    def broken(*args, **kwargs):
        raise AssertionError("moe.reference used on the layer's path")

    for name in dir(ref):
        if callable(getattr(ref, name)) and not name.startswith("_") and \
                getattr(getattr(ref, name), "__module__", "") == "moe.reference":
            monkeypatch.setattr(ref, name, broken)
    got, r_got = layer(x, return_routing=True)
    np.testing.assert_array_equal(got, want)
    assert (r_got.aux_loss, r_got.z_loss) == (r_want.aux_loss, r_want.z_loss)
