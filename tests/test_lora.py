"""LoRA experts (moe.lora) against moe.reference, PEFT, and their own invariances."""
import numpy as np
import pytest

import moe
from moe import _C, reference as ref
from tolerances import assert_close

RNG = np.random.default_rng


def _randomise(layer, rng, scale=0.3):
    """Fresh random adapters (LoRA's B starts at zero, which would hide the update)."""
    layer.lora_b = rng.standard_normal(layer.lora_b.shape) * scale
    if layer.use_bias:
        layer.base_bias = rng.standard_normal(layer.d_out)
    return layer


def _check(layer, x, **kw):
    """The layer's output and routing against reference.lora_forward."""
    call_kw = {k: v for k, v in kw.items() if k != "adapter_ids"}
    args = (kw["adapter_ids"],) if "adapter_ids" in kw else ()
    if "scalings" in kw:
        args, call_kw = (kw["scalings"],), {}
    y, r = layer(x, *args, return_routing=True, **call_kw)
    if "scalings" in kw:
        kw = dict(kw, scalings=np.reshape(kw["scalings"], (-1, layer.n_experts)))
    y_ref, ids_ref, w_ref = ref.lora_forward(layer, x.reshape(-1, layer.d_in), **kw)
    np.testing.assert_array_equal(r.expert_ids, ids_ref)
    assert_close(r.weights, w_ref, what="gate weights")
    assert_close(y.reshape(-1, layer.d_out), y_ref, what=type(layer).__name__)
    return y, r


# ---- shapes: (d_in, d_out, n_experts, rank, top_k); odd sizes, rank 1, rank >= d ----------

SHAPES = [
    (64, 48, 8, 16, 2),
    (37, 29, 5, 3, 2),     # sizes off the vector width
    (33, 40, 4, 1, 1),     # rank 1
    (20, 17, 3, 24, 2),    # rank > d_in and > d_out
    (24, 24, 1, 4, 1),     # one expert
    (16, 35, 6, 5, 6),     # top_k == n_experts
]


@pytest.mark.parametrize("d_in,d_out,E,r,k", SHAPES)
@pytest.mark.parametrize("T", [1, 7, 50])
def test_topk_lora(d_in, d_out, E, r, k, T):
    rng = RNG(T * 1000 + d_in)
    layer = _randomise(moe.TopKLoRA(d_in, d_out, E, r, k, alpha=2.0 * r, bias=True,
                                    seed=T), rng)
    _check(layer, rng.standard_normal((T, d_in)).astype(np.float32))


@pytest.mark.parametrize("scoring,renormalize", [("softmax", False), ("sigmoid", True),
                                                 ("softmax-after-topk", True)])
def test_topk_lora_scoring(scoring, renormalize):
    rng = RNG(3)
    layer = _randomise(moe.TopKLoRA(40, 24, 6, 4, 3, scoring=scoring,
                                    renormalize=renormalize), rng)
    _check(layer, rng.standard_normal((30, 40)))


def test_empty_experts_and_zero_tokens():
    rng = RNG(4)
    layer = _randomise(moe.TopKLoRA(32, 16, 16, 4, 1), rng)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    _, r = _check(layer, x)
    assert (r.counts == 0).sum() >= 13  # 3 tokens, top-1 of 16: most experts get nothing
    assert r.counts.sum() == 3
    y0 = layer(np.zeros((0, 32), np.float32))
    assert y0.shape == (0, 16)


@pytest.mark.parametrize("top_k", [None, 3])
def test_soft_lora(top_k):
    rng = RNG(5)
    layer = _randomise(moe.SoftLoRA(48, 36, 6, 8, top_k=top_k, bias=True), rng)
    _, r = _check(layer, rng.standard_normal((25, 48)))
    if top_k is None:
        assert_close(r.weights.sum(axis=1), np.ones(25), what="dense gates sum to 1")


@pytest.mark.parametrize("cls", [moe.SoftLoRA, moe.TopKLoRA, moe.HydraLoRA])
def test_per_sequence_gates(cls):
    rng = RNG(6)
    layer = _randomise(cls(32, 24, 4, 4, per_sequence=True), rng)
    x = rng.standard_normal((17, 32)).astype(np.float32)
    lens = [5, 1, 11]
    y, r = _check(layer, x, seq_lens=lens)
    # every token of a sequence has its sequence's gate
    for a, b in ((0, 5), (5, 6), (6, 17)):
        assert (r.expert_ids[a:b] == r.expert_ids[a]).all()
        assert (r.weights[a:b] == r.weights[a]).all()
    # (batch, seq, d) input: one gate per batch row
    x3 = rng.standard_normal((3, 4, 32)).astype(np.float32)
    y3, r3 = layer(x3, return_routing=True)
    y3b = layer(x3.reshape(12, 32), seq_lens=[4, 4, 4])
    np.testing.assert_array_equal(y3.reshape(12, -1), y3b)
    with pytest.raises(ValueError, match="seq_lens"):
        layer(x)
    with pytest.raises(ValueError, match="seq_lens must be 1-D and sum to n_tokens=17"):
        layer(x, seq_lens=[5, 5])


@pytest.mark.parametrize("top_k,softmax_topk", [(None, False), (2, False), (2, True),
                                                (4, True)])
def test_gated_lora(top_k, softmax_topk):
    rng = RNG(7)
    layer = _randomise(moe.GatedLoRA(30, 26, 4, 6, top_k=top_k, softmax_topk=softmax_topk),
                       rng)
    x = rng.standard_normal((2, 9, 30))
    c = rng.random((2, 9, 4))
    c[0, 0] = 0.5  # ties go to the lower adapter
    y, r = _check(layer, x, scalings=c)
    assert y.shape == (2, 9, 26)
    if top_k == 2:
        np.testing.assert_array_equal(r.expert_ids[0], [0, 1])
    with pytest.raises(ValueError, match="scalings must have shape"):
        layer(x, rng.random((2, 9, 3)))
    c[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="scalings must be finite"):
        layer(x, c)


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_hydra_lora(top_k):
    rng = RNG(8)
    layer = _randomise(moe.HydraLoRA(44, 31, 5, 6, top_k=top_k, bias=True), rng)
    _, r = _check(layer, rng.standard_normal((40, 44)))
    if top_k == 1:
        np.testing.assert_array_equal(r.weights, 1.0)  # hard routing: gate 1


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rank,top_k", [(32, 8), (7, 1), (6, 6), (40, 3)])
def test_flylora(signed, rank, top_k):
    rng = RNG(rank + top_k)
    layer = _randomise(moe.FlyLoRA(36, 22, rank, top_k, signed=signed, bias=True), rng)
    layer.rank_bias = rng.standard_normal(rank) * 0.1
    _check(layer, rng.standard_normal((33, 36)))


def test_flylora_ties_nan_and_bias_update():
    rng = RNG(9)
    layer = _randomise(moe.FlyLoRA(16, 12, 8, 2, bias_rate=0.01,
                                   update_bias="every-forward"), rng)
    a = layer.lora_a.copy()
    a[5] = a[1]  # ranks 1, 3 and 5 always tie (|z_3| = |z_1| = |z_5|): with two
    a[3] = -a[1]  # slots, the lower ranks 1 and 3 win, and 5 is never chosen
    layer.lora_a = a
    x = rng.standard_normal((20, 16)).astype(np.float32)
    before = layer.rank_bias.copy()
    y, r = layer(x, return_routing=True)
    assert not np.isin(5, r.expert_ids)
    has1, has3 = (r.expert_ids == 1).any(axis=1), (r.expert_ids == 3).any(axis=1)
    assert (has3 <= has1).all() and has1.any()
    np.testing.assert_array_equal(r.counts, np.bincount(r.expert_ids.ravel(), minlength=8))
    expected = before + 0.01 * np.sign(r.counts.mean() - r.counts)
    assert_close(layer.rank_bias, expected, what="bias after one forward")
    # a NaN row gives a NaN row, and no other row changes
    xn = x.copy()
    xn[4, 2] = np.nan
    layer.update_bias_mode = "manual"
    y1 = layer(x)
    yn = layer(xn)
    assert np.isnan(yn[4]).all()
    np.testing.assert_array_equal(np.delete(yn, 4, 0), np.delete(y1, 4, 0))


def test_sparse_projection():
    a = moe.sparse_projection(16, 100, 0.25, seed=3)
    assert a.shape == (16, 100) and a.dtype == np.float32
    np.testing.assert_array_equal((a != 0).sum(axis=1), 25)
    np.testing.assert_array_equal(a, moe.sparse_projection(16, 100, 0.25, seed=3))
    assert abs(a[a != 0].std() - 1 / 16) < 0.02
    assert (moe.sparse_projection(4, 10, 1.0) != 0).all()
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            moe.sparse_projection(4, 10, bad)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        moe.FlyLoRA(10, 10, 8, 2, density=2.0)


@pytest.mark.parametrize("partition,tile", [(1, False), (2, False), (4, True)])
def test_smora(partition, tile):
    rng = RNG(10 + partition)
    layer = _randomise(moe.SMoRA(40, 28, 16, 4, rank_partition=partition, tile=tile,
                                 alpha=8.0), rng)
    layer.rank_bias = rng.standard_normal(16) * 0.05
    _, r = _check(layer, rng.standard_normal((26, 40)))
    assert_close(r.weights.sum(axis=1), np.full(26, 4.0), what="weights sum to top_k")
    counts = r.counts.copy()
    layer.update_bias(counts, 0.5)
    with pytest.raises(ValueError, match="rank_partition must divide"):
        moe.SMoRA(40, 28, 16, 4, rank_partition=3)


def test_multi_lora():
    rng = RNG(11)
    layer = _randomise(moe.MultiLoRA(34, 27, 4, 8, bias=True), rng)
    layer.set_adapter(2, rng.standard_normal((3, 34)), rng.standard_normal((27, 3)),
                      alpha=6.0)
    assert layer.scalings[2] == 2.0
    ids = rng.integers(-1, 4, size=45)
    ids[:3] = -1
    y, r = _check(layer, rng.standard_normal((45, 34)), adapter_ids=ids)
    np.testing.assert_array_equal(r.counts, np.bincount(ids[ids >= 0], minlength=4))
    x = rng.standard_normal((5, 34))
    np.testing.assert_array_equal(layer(x, -1), layer.base_forward(x))
    with pytest.raises(ValueError, match=r"adapter_ids values must be in \[-1, n_adapters=4\)"):
        layer(x, [0, 1, 4, 0, 0])
    with pytest.raises(ValueError, match="adapter_ids must have shape"):
        layer(x, [0, 1])
    with pytest.raises(ValueError, match="lora_a must have 1..rank=8 rows"):
        layer.set_adapter(0, rng.standard_normal((9, 34)), rng.standard_normal((27, 9)))


# ---- invariances ----------------------------------------------------------------------

def _all_layers(rng):
    layers = [moe.TopKLoRA(40, 33, 6, 5, 2), moe.SoftLoRA(40, 33, 6, 5),
              moe.HydraLoRA(40, 33, 6, 5, top_k=2), moe.FlyLoRA(40, 33, 16, 4),
              moe.SMoRA(40, 33, 16, 4)]
    return [_randomise(layer, rng) for layer in layers]


def test_batch_and_thread_invariance():
    rng = RNG(12)
    x = rng.standard_normal((61, 40)).astype(np.float32)
    n = moe.get_num_threads()
    try:
        for layer in _all_layers(rng):
            full = layer(x)
            for lo, hi in ((0, 1), (3, 20), (60, 61)):
                np.testing.assert_array_equal(layer(x[lo:hi]), full[lo:hi],
                                              err_msg=type(layer).__name__)
            moe.set_num_threads(1)
            np.testing.assert_array_equal(layer(x), full, err_msg=type(layer).__name__)
            moe.set_num_threads(n)
    finally:
        moe.set_num_threads(n)


def test_non_contiguous_and_float64_input():
    rng = RNG(13)
    layer = _randomise(moe.TopKLoRA(24, 20, 4, 4, 2), rng)
    big = rng.standard_normal((30, 48))
    x = big[::2, ::2]
    np.testing.assert_array_equal(layer(x), layer(np.ascontiguousarray(x, np.float32)))
    xf = np.asfortranarray(rng.standard_normal((9, 24)).astype(np.float32))
    _check(layer, xf)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_base_is_exact_on_decoded_weights(dtype):
    rng = RNG(14)
    lp = _randomise(moe.TopKLoRA(48, 40, 4, 6, 2, dtype=dtype), rng)
    f32 = moe.TopKLoRA(48, 40, 4, 6, 2)
    w = lp.base_weight
    f32.base_weight = moe.bfloat16_to_float32(w) if dtype == "bfloat16" else w.astype(np.float32)
    for name in ("router_weight", "lora_a", "lora_b"):
        setattr(f32, name, getattr(lp, name))
    x = rng.standard_normal((20, 48)).astype(np.float32)
    np.testing.assert_array_equal(lp(x), f32(x))
    _check(lp if dtype == "bfloat16" else f32, x)


def test_in_place_edit_needs_pack():
    rng = RNG(15)
    layer = _randomise(moe.TopKLoRA(16, 16, 2, 2, 1), rng)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    y = layer(x)
    layer.lora_b[...] *= 2.0  # in place: the packed bank is stale until pack()
    np.testing.assert_array_equal(layer(x), y)
    layer.pack()
    _check(layer, x)
    layer.router_weight[0] += 1.0  # read every call
    _check(layer, x)


# ---- PEFT pins the scaling convention ----------------------------------------------------

def _peft_linear(w0, b0, adapters):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(w0.shape[1], w0.shape[0])

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(w0))
        net.proj.bias.copy_(torch.from_numpy(b0))
    model = None
    for name, (a, b, alpha) in adapters.items():
        cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["proj"],
                              lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(net, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        with torch.no_grad():
            model.base_model.model.proj.lora_A[name].weight.copy_(torch.from_numpy(a))
            model.base_model.model.proj.lora_B[name].weight.copy_(torch.from_numpy(b))
    model.eval()
    return torch, model


@pytest.mark.parametrize("r,alpha", [(8, 16.0), (4, 4.0), (16, 7.0)])
def test_single_adapter_matches_peft(r, alpha):
    rng = RNG(16 + r)
    d_in, d_out = 40, 36
    w0 = rng.standard_normal((d_out, d_in)).astype(np.float32) / 6
    b0 = rng.standard_normal(d_out).astype(np.float32)
    a = rng.standard_normal((r, d_in)).astype(np.float32) / 6
    b = rng.standard_normal((d_out, r)).astype(np.float32) / 6
    torch, model = _peft_linear(w0, b0, {"default": (a, b, alpha)})
    x = rng.standard_normal((23, d_in)).astype(np.float32)
    with torch.no_grad():
        y_peft = model(torch.from_numpy(x)).numpy()
    layer = moe.TopKLoRA(d_in, d_out, 1, r, 1, alpha=alpha, bias=True)
    layer.base_weight, layer.base_bias = w0, b0
    layer.lora_a, layer.lora_b = a[None], b[None]
    assert_close(layer(x), y_peft.astype(np.float64), what="TopKLoRA(E=1) vs PEFT")
    assert_close(y_peft, ref.lora_linear(x, w0, a, b, alpha / r, b0), what="PEFT vs reference")
    multi = moe.MultiLoRA(d_in, d_out, 1, r, alpha=alpha, bias=True)
    multi.base_weight, multi.base_bias = w0, b0
    multi.lora_a, multi.lora_b = a[None], b[None]
    assert_close(multi(x, 0), y_peft.astype(np.float64), what="MultiLoRA vs PEFT")


def test_mixed_adapter_batch_matches_peft():
    rng = RNG(17)
    d_in, d_out = 32, 24
    w0 = rng.standard_normal((d_out, d_in)).astype(np.float32) / 5
    b0 = rng.standard_normal(d_out).astype(np.float32)
    ranks, alphas = (4, 8, 2), (8.0, 4.0, 2.0)
    adapters = {f"a{i}": (rng.standard_normal((r, d_in)).astype(np.float32) / 5,
                          rng.standard_normal((d_out, r)).astype(np.float32) / 5, alpha)
                for i, (r, alpha) in enumerate(zip(ranks, alphas))}
    torch, model = _peft_linear(w0, b0, adapters)
    names = ["a0", "a2", "__base__", "a1", "a1", "a0", "__base__", "a2"]
    x = rng.standard_normal((len(names), d_in)).astype(np.float32)
    with torch.no_grad():
        y_peft = model(torch.from_numpy(x), adapter_names=names).numpy()
    layer = moe.MultiLoRA(d_in, d_out, 3, max(ranks), bias=True)
    layer.base_weight, layer.base_bias = w0, b0
    for i, (a, b, alpha) in enumerate(adapters.values()):
        layer.set_adapter(i, a, b, alpha=alpha)
    ids = [-1 if n == "__base__" else int(n[1]) for n in names]
    assert_close(layer(x, ids), y_peft.astype(np.float64), what="MultiLoRA vs PEFT mixed batch")


# ---- the grouped linear engine and bad input -------------------------------------------------

def test_linear_grouped_op():
    rng = RNG(18)
    G, d_in, d_out, T = 4, 37, 21, 30
    w = rng.standard_normal((G, d_out, d_in)).astype(np.float32)
    b = rng.standard_normal((G, d_out)).astype(np.float32)
    packed = _C.pack_linear(w, dtype=0, bias=b)
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    token_index = rng.integers(0, T, size=25).astype(np.int64)
    offsets = np.array([0, 10, 10, 24, 25], np.int64)  # group 1 empty
    out = _C.linear_grouped(x, token_index=token_index, offsets=offsets, weights=packed)
    expect = np.zeros((25, d_out))
    for g in range(G):
        rows = slice(offsets[g], offsets[g + 1])
        expect[rows] = x[token_index[rows]].astype(np.float64) @ w[g].T + b[g]
    assert_close(out, expect, what="linear_grouped")
    with pytest.raises(TypeError, match="weights must be a packed linear"):
        _C.linear_grouped(x, token_index=None, offsets=np.array([0, T], np.int64),
                          weights=_C.pack_experts(w_gate=None, w_up=w[:, :, :d_in],
                                                  w_down=np.ascontiguousarray(
                                                      w.transpose(0, 2, 1)), dtype=0))
    with pytest.raises(ValueError, match="token_index must be in"):
        _C.linear_grouped(x, token_index=np.full(25, T, np.int64), offsets=offsets,
                          weights=packed)
    with pytest.raises(TypeError, match="packed experts"):
        _C.ffn_grouped(x, token_index=None, offsets=np.array([0, T], np.int64), experts=packed,
                       activation=5)


def test_bad_input():
    rng = RNG(19)
    layer = moe.TopKLoRA(16, 12, 4, 4, 2)
    with pytest.raises(ValueError, match=r"lora_a must have shape \(n_experts=4, rank=4, d_in=16\), got \(4, 5, 16\)"):
        layer.lora_a = rng.standard_normal((4, 5, 16))
    with pytest.raises(ValueError, match=r"lora_b must have shape \(n_experts=4, d_out=12, rank=4\)"):
        layer.lora_b = rng.standard_normal((4, 12, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(..., d_in=16\)"):
        layer(rng.standard_normal((3, 15)))
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        moe.TopKLoRA(16, 12, 4, 4, 5)
    with pytest.raises(ValueError, match="top_k must be in 1..8"):
        moe.FlyLoRA(16, 12, 8, 9)
    with pytest.raises(ValueError, match="rank must be in"):
        moe.HydraLoRA(16, 12, 4, 0)
    x = rng.standard_normal((3, 16))
    x[1, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        layer(x)
    bare = moe.TopKLoRA(16, 12, 4, 4, 2, init=False)
    with pytest.raises(ValueError, match="is not set"):
        bare(rng.standard_normal((3, 16)))
    # the C entry checks ids and ranks itself
    base = _C.pack_linear(rng.standard_normal((1, 12, 16)).astype(np.float32), dtype=0)
    a = _C.pack_linear(rng.standard_normal((4, 4, 16)).astype(np.float32), dtype=0)
    bank = _C.pack_linear(np.zeros((1, 12, 16), np.float32), dtype=0)
    bank8 = _C.pack_linear(np.zeros((1, 12, 8), np.float32), dtype=0)
    xs = rng.standard_normal((3, 16)).astype(np.float32)
    ids = np.array([[0, 1], [2, 4], [3, -1]], np.int32)

    def forward(kind, ids, bank):
        return _C.lora_forward(xs, base=base, kind=kind, lora_a=a, bank=bank, n_adapters=4,
                               ids=ids, weights=None, scaling=1.0, adapter_scaling=None,
                               select_k=0, select_signed=0, rank_bias=None)

    with pytest.raises(ValueError, match=r"adapter ids must be in \[0, 4\) or -1, got 4 "
                                         r"at token 1, slot 1"):
        forward(0, ids, bank)
    with pytest.raises(ValueError, match=r"lora_a must be a packed linear of shape "
                                         r"\(1, rank=4, d_in=16\)"):
        forward(1, ids % 4, bank)
    with pytest.raises(ValueError, match=r"bank must be an fp32 packed linear of shape "
                                         r"\(1, d_out=12, 16\)"):
        forward(0, ids % 4, bank8)


# ---- LoRA on the experts of a SparseMoE ----------------------------------------------------

def _lora_moe(rng, targets, activation="swiglu", r=4, **kw):
    layer = moe.SparseMoE(36, 20, 5, 2, activation=activation, lora_rank=r, lora_alpha=2.0 * r,
                          lora_targets=targets, seed=1, **kw)
    for t in layer.lora_targets:
        name = f"lora_b_{t[2:]}"
        setattr(layer, name, rng.standard_normal(getattr(layer, name).shape) * 0.3)
    return layer


@pytest.mark.parametrize("targets", [("w_gate", "w_up", "w_down"), ("w_up",), ("w_gate",),
                                     ("w_down",), ("w_gate", "w_down")])
def test_sparse_moe_expert_lora(targets):
    rng = RNG(20)
    layer = _lora_moe(rng, targets)
    x = rng.standard_normal((41, 36)).astype(np.float32)
    y = layer(x)
    y_ref, _ = ref.layer_forward(layer, x)
    assert_close(y, y_ref, what=f"SparseMoE + LoRA on {targets}")
    plain = moe.SparseMoE(36, 20, 5, 2, seed=1)
    assert np.abs(y - plain(x)).max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("activation", ["gelu", "swiglu-oai"])
def test_sparse_moe_expert_lora_options(activation):
    rng = RNG(21)
    targets = ("w_up", "w_down") if activation == "gelu" else LORA_ALL
    layer = _lora_moe(rng, targets, activation, r=25, expert_biases=True, n_shared_experts=1,
                      dtype="bfloat16")
    x = rng.standard_normal((30, 36)).astype(np.float32)
    assert_close(layer(x), ref.layer_forward(layer, x)[0], what=activation)
    for lo, hi in ((0, 1), (7, 19)):
        np.testing.assert_array_equal(layer(x[lo:hi]), layer(x)[lo:hi])


LORA_ALL = ("w_gate", "w_up", "w_down")


def test_sparse_moe_expert_lora_save_load_and_errors(tmp_path):
    rng = RNG(22)
    layer = _lora_moe(rng, LORA_ALL)
    x = rng.standard_normal((9, 36)).astype(np.float32)
    layer.save(tmp_path / "l.safetensors")
    back = moe.load(tmp_path / "l.safetensors")
    assert back.lora_targets == LORA_ALL and back.lora_rank == 4
    np.testing.assert_array_equal(back(x), layer(x))
    with pytest.raises(ValueError, match=r"lora_a_up must have shape \(n_experts=5, "
                                         r"lora_rank=4, d_model=36\)"):
        layer.lora_a_up = rng.standard_normal((5, 3, 36))
    with pytest.raises(ValueError, match="needs a layer built with lora_rank > 0"):
        moe.SparseMoE(8, 8, 2, 1).lora_a_up = np.zeros((2, 1, 8))
    with pytest.raises(ValueError, match="'w_down' is not in lora_targets"):
        _lora_moe(rng, ("w_up",)).lora_b_down = np.zeros((5, 36, 4))
    with pytest.raises(ValueError, match="activation 'gelu' has no gate"):
        moe.SparseMoE(8, 8, 2, 1, activation="gelu", lora_rank=2, lora_targets=("w_gate",))
    with pytest.raises(ValueError, match="lora_targets entry must be one of"):
        moe.SparseMoE(8, 8, 2, 1, lora_rank=2, lora_targets=("q_proj",))
    # the packed LoRA keeps its experts alive and refuses other experts
    w = rng.standard_normal((2, 6, 8)).astype(np.float32)
    wd = rng.standard_normal((2, 8, 6)).astype(np.float32)
    experts = _C.pack_experts(w_gate=w, w_up=w, w_down=wd, dtype=0)
    lora = _C.pack_expert_lora(experts, rank=2, scaling=1.0, a_gate=None, b_gate=None,
                               a_up=rng.standard_normal((2, 2, 8)).astype(np.float32),
                               b_up=rng.standard_normal((2, 6, 2)).astype(np.float32),
                               a_down=None, b_down=None)
    other = _C.pack_experts(w_gate=w, w_up=w, w_down=wd, dtype=0)
    xs = rng.standard_normal((4, 8)).astype(np.float32)
    off = np.array([0, 2, 4], np.int64)
    with pytest.raises(ValueError, match="packed for other experts"):
        _C.ffn_grouped(xs, token_index=None, offsets=off, experts=other, activation=0,
                       alpha=1.702, limit=7.0, lora=lora)
    del experts
    ys = _C.ffn_grouped(xs, token_index=None, offsets=off,
                        experts=_C.pack_experts(w_gate=w, w_up=w, w_down=wd, dtype=0),
                        activation=0)
    assert ys.shape == (4, 8)
    with pytest.raises(ValueError, match="b_up must have shape"):
        _C.pack_expert_lora(other, rank=2, scaling=1.0, a_up=np.zeros((2, 2, 8), np.float32),
                            b_up=np.zeros((2, 6, 3), np.float32))
    with pytest.raises(ValueError, match="both its A and its B"):
        _C.pack_expert_lora(other, rank=2, scaling=1.0, a_up=np.zeros((2, 2, 8), np.float32),
                            b_up=None)
