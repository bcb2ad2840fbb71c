"""moe.torch: the nn.Module over the C core, checked against an independent pure-torch
implementation written the way Hugging Face's MoE blocks are (router linear, softmax /
sigmoid, group-limited top-k, per-expert loop), autograd on both sides; plus training,
no_grad, memory sharing, dtypes, bad input and torch.compile; and moe.torch.MultiHeadMoE's
gradients against the NumPy layer's backward.
"""
import copy
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

import moe
import moe.torch as mt

# Each config as its peer's MoE block (small sizes).  The options are moe.SparseMoE's.
CONFIGS = {
    "mixtral": dict(n_experts=8, top_k=2),
    "qwen3_moe": dict(n_experts=16, top_k=8),
    "deepseek_v3": dict(n_experts=16, top_k=4, scoring="sigmoid", expert_bias=True,
                        n_groups=4, topk_groups=2, routed_scaling=2.5, n_shared_experts=1,
                        shared_d_ff=8),
    "qwen2_moe": dict(n_experts=8, top_k=4, renormalize=False, n_shared_experts=1,
                      shared_d_ff=20, shared_expert_gate=True),
    "biases": dict(n_experts=4, top_k=2, router_bias=True, expert_biases=True),
}
D, FF = 16, 12


def _module(rng, seed=0, **opts):
    """A moe.torch.SparseMoE with every parameter and buffer random (biases too)."""
    m = mt.SparseMoE(D, FF, **opts, seed=seed)
    with torch.no_grad():  # in place: the module must notice (version counters) and repack
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name in ("router_bias", "b_gate", "b_up", "b_down", "expert_bias"):
                t.copy_(torch.from_numpy(0.1 * rng.standard_normal(t.shape)))
    return m


def hf_style_moe(x, p, cfg):
    """y, aux_loss, z_loss, expert_ids of an MoE block written as in transformers, from
    scratch in torch: p maps moe.torch's parameter names to tensors."""
    T, E, k = x.shape[0], cfg["n_experts"], cfg["top_k"]
    logits = x @ p["router_weight"].T
    if "router_bias" in p:
        logits = logits + p["router_bias"]
    if cfg.get("scoring", "softmax") == "sigmoid":  # DeepSeek-V3
        scores = logits.sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)  # for the aux loss
    else:
        scores = probs = logits.softmax(-1)
    choice = scores.detach()
    if "expert_bias" in p:  # e_score_correction_bias: selection only
        choice = choice + p["expert_bias"]
    n_groups = cfg.get("n_groups", 1)
    if n_groups > 1:  # group score: sum of each group's top-2; keep the best topk_groups
        group_scores = choice.view(T, n_groups, -1).topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(cfg["topk_groups"], dim=-1).indices
        mask = torch.zeros(T, n_groups, dtype=torch.bool).scatter_(1, keep, True)
        mask = mask.repeat_interleave(E // n_groups, dim=1)
        # -inf, not transformers' 0.0: a biased score may be negative
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.get("renormalize", True):
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.get("routed_scaling", 1.0)

    def swiglu(h, wg, wu, wd, bg=0, bu=0, bd=0):
        return (F.silu(h @ wg.T + bg) * (h @ wu.T + bu)) @ wd.T + bd

    y = torch.zeros_like(x)
    for e in range(E):  # the per-expert loop of the HF blocks
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        b = [p[n][e] for n in ("b_gate", "b_up", "b_down") if n in p]
        out = swiglu(x[tok], p["w_gate"][e], p["w_up"][e], p["w_down"][e], *b)
        y = y.index_add(0, tok, w[tok, slot, None] * out)
    if "shared_w_up" in p:
        shared = swiglu(x, p["shared_w_gate"], p["shared_w_up"], p["shared_w_down"])
        if "shared_gate_weight" in p:  # Qwen2-MoE's sigmoid gate
            shared = torch.sigmoid(x @ p["shared_gate_weight"].T) * shared
        y = y + shared
    f = torch.bincount(ids.reshape(-1), minlength=E).to(x.dtype) / (T * k)  # no grad
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return y, aux, z, ids


def _close(actual, expected, rtol=1e-4, what=""):
    """|a - e| <= rtol * ||e|| / sqrt(n) elementwise (fp32 against a float64 oracle)."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.norm().item() / max(e.numel(), 1) ** 0.5
    err = (a - e).abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_hf_style_implementation(name, rng):
    cfg = CONFIGS[name]
    m = _module(rng, **cfg)
    T, a, b = 24, 0.1, 0.01
    x = torch.from_numpy(rng.standard_normal((2, T // 2, D), dtype=np.float32))
    x.requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal((2, T // 2, D), dtype=np.float32))
    y, r = m(x, return_routing=True)
    ((y * dy).sum() + a * r.aux_loss + b * r.z_loss).backward()

    # the oracle in float64, on copies of the parameters
    p = {n: t.detach().double().requires_grad_(t.requires_grad)
         for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    x64 = x.detach().double().reshape(T, D).requires_grad_(True)
    y64, aux64, z64, ids64 = hf_style_moe(x64, p, cfg)
    ((y64 * dy.double().reshape(T, D)).sum() + a * aux64 + b * z64).backward()

    np.testing.assert_array_equal(np.sort(r.expert_ids.numpy(), 1), np.sort(ids64.numpy(), 1))
    _close(y.reshape(T, D), y64, what="y")
    _close(r.aux_loss, aux64, 1e-6, "aux_loss")
    _close(r.z_loss, z64, 1e-6, "z_loss")
    _close(x.grad.reshape(T, D), x64.grad, what="x.grad")
    names = [n for n, t in m.named_parameters()]
    assert set(names) == set(m.to_layer().trainable_weights())
    for n in names:
        _close(getattr(m, n).grad, p[n].grad, what=f"{n}.grad")
    if cfg.get("expert_bias"):
        assert "expert_bias" in dict(m.named_buffers())


@pytest.mark.parametrize("cfg", [
    dict(router="expert_choice", null_experts=("copy", "constant")),
    dict(router="top_p", router_p=0.6, skip_threshold=0.1, skip_renormalize=True),
    dict(router="threshold", router_threshold=0.15, null_experts=("zero",)),
], ids=["expert_choice", "top_p", "threshold"])
def test_other_routers_train(cfg, rng):
    """Every router trains through the module: its gradients are the NumPy layer's
    backward bit for bit (the same C calls), null_values included."""
    m = mt.SparseMoE(D, FF, 6, 3, seed=2, **cfg)
    x = torch.from_numpy(rng.standard_normal((20, D), dtype=np.float32)).requires_grad_(True)
    dy = rng.standard_normal((20, D), dtype=np.float32)
    y, r = m(x, return_routing=True)
    ((y * torch.from_numpy(dy)).sum() + 0.1 * r.aux_loss + 0.01 * r.z_loss).backward()
    layer = m.to_layer()
    y2, ctx = layer.forward_train(x.detach().numpy())
    g = layer.backward(ctx, dy, aux_coef=0.1, z_coef=0.01)
    np.testing.assert_array_equal(y.detach().numpy(), y2)
    assert set(layer.trainable_weights()) == {n for n, _ in m.named_parameters()}
    for name in layer.trainable_weights():
        np.testing.assert_array_equal(getattr(m, name).grad.numpy(), g[name], err_msg=name)
    np.testing.assert_allclose(x.grad.numpy(), g["x"], rtol=1e-6, atol=1e-7)


def test_parameters_are_the_layers_weights():
    m = mt.SparseMoE(D, FF, 8, 2, n_shared_experts=1, shared_expert_gate=True,
                     expert_bias=True, router_bias=True, expert_biases=True)
    layer = m.to_layer()
    params = dict(m.named_parameters())
    assert set(params) == set(layer.trainable_weights())
    assert [n for n, _ in m.named_buffers()] == ["expert_bias"]
    for name, t in list(params.items()) + [("expert_bias", m.expert_bias)]:
        arr = getattr(layer, name)
        assert tuple(t.shape) == arr.shape and t.dtype == torch.float32
        assert np.shares_memory(arr, t.detach().numpy()), name


def test_from_layer_and_to_layer_share_memory(rng):
    layer = moe.SparseMoE(D, FF, 4, 2, seed=3)
    w = rng.standard_normal((4, FF, D), dtype=np.float32)
    layer.w_up = w  # float32 C-contiguous: stored without a copy
    assert np.shares_memory(layer.w_up, w)
    m = mt.from_layer(layer)
    assert m.to_layer() is layer
    for name in layer.trainable_weights():
        assert np.shares_memory(getattr(layer, name), getattr(m, name).detach().numpy()), name
    x = torch.from_numpy(rng.standard_normal((5, D), dtype=np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), layer(x.numpy()))
        m.w_down.mul_(2.0)  # in place through torch: the module repacks
        assert np.shares_memory(layer.w_down, m.w_down.numpy())
        y = m(x).numpy()
    fresh = moe.SparseMoE(D, FF, 4, 2, init=False)
    for name in layer.trainable_weights():
        setattr(fresh, name, np.array(getattr(layer, name)))
    np.testing.assert_array_equal(y, fresh(x.numpy()))


def _train_toy_regression(m, x, target, steps=25):
    """AdamW on mse(m(x), target) + the routing losses: the loss must halve."""
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        y, r = m(x, return_routing=True)
        loss = F.mse_loss(y, target) + 0.01 * r.aux_loss + 1e-3 * r.z_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(F.mse_loss(y, target).item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_adamw_trains_a_toy_regression(rng):
    torch.manual_seed(0)
    m = mt.SparseMoE(8, 16, 4, 2, seed=1)
    x = torch.from_numpy(rng.standard_normal((64, 8), dtype=np.float32))
    target = torch.from_numpy(rng.standard_normal((8, 8), dtype=np.float32) * 0.3)
    target = x @ target
    _train_toy_regression(m, x, target)
    # after the steps the kernels run on the updated weights (repacked)
    fresh = moe.SparseMoE(8, 16, 4, 2, init=False)
    for name, t in m.named_parameters():
        setattr(fresh, name, t.detach().numpy().copy())
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), fresh(x.numpy()))


def test_grad_accumulates_and_retain_graph(rng):
    m = mt.SparseMoE(D, FF, 4, 2, seed=2)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32)).requires_grad_(True)
    y, r = m(x, return_routing=True)
    loss = y.square().sum() + 0.1 * r.aux_loss + 0.1 * r.z_loss
    loss.backward(retain_graph=True)
    once = {n: t.grad.clone() for n, t in m.named_parameters()}
    gx = x.grad.clone()
    loss.backward()
    for n, t in m.named_parameters():
        torch.testing.assert_close(t.grad, 2 * once[n], rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, 2 * gx, rtol=1e-6, atol=0)
    m.zero_grad()
    m(x).sum().backward()
    m(x).sum().backward()
    single = {n: t.grad.clone() for n, t in m.named_parameters()}
    m.zero_grad()
    m(x).sum().backward()
    for n, t in m.named_parameters():
        torch.testing.assert_close(single[n], 2 * t.grad, rtol=1e-6, atol=1e-7)


def test_recompute_hidden_off(rng):
    """m.recompute_hidden = False: the same gradients (bits), the setting kept by copies."""
    m = mt.SparseMoE(D, FF, 4, 2, seed=2, n_shared_experts=1, shared_d_ff=8)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32)).requires_grad_(True)
    grads = []
    for keep in (False, True):
        m.zero_grad()
        x.grad = None
        m.recompute_hidden = not keep
        assert m.to_layer().recompute_hidden is (not keep)
        y, r = m(x, return_routing=True)
        (y.square().sum() + 0.1 * r.aux_loss).backward()
        grads.append({"x": x.grad.clone(), **{n: t.grad.clone() for n, t in
                                              m.named_parameters()}})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    m.recompute_hidden = False
    c = copy.deepcopy(m)
    assert c.recompute_hidden is False
    c(x).sum().backward()
    assert c.to_layer().recompute_hidden is False


def test_saved_state_is_freed(rng):
    m = mt.SparseMoE(D, FF, 4, 2)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32)).requires_grad_(True)
    before = len(mt._CONTEXTS)
    y = m(x)
    assert len(mt._CONTEXTS) == before + 1
    y.sum().backward()  # the graph is freed after its backward
    assert len(mt._CONTEXTS) == before
    y = m(x)
    del y  # a forward without backward leaves nothing behind
    assert len(mt._CONTEXTS) == before


def test_no_grad(rng):
    m = mt.SparseMoE(D, FF, 8, 2, expert_bias=True)
    x = torch.from_numpy(rng.standard_normal((3, 4, D), dtype=np.float32)).requires_grad_(True)
    before = len(mt._CONTEXTS)
    with torch.no_grad():
        y, r = m(x, return_routing=True)
    assert len(mt._CONTEXTS) == before
    assert not y.requires_grad and not r.aux_loss.requires_grad
    ref_y, ref_r = m.to_layer()(x.detach().numpy(), return_routing=True)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ref_r.expert_ids)
    np.testing.assert_array_equal(r.counts.numpy(), ref_r.counts)
    assert r.aux_loss.item() == pytest.approx(ref_r.aux_loss, rel=1e-6)



def test_eager_calls_skip_the_op_dispatch_with_the_same_bits(rng):
    """In eager mode the forward calls the op's function directly (moe.torch._call: the
    dispatch costs ~40 us a decode call); under a dispatch mode (and fake tensors,
    torch.compile) it goes through torch.ops.moe.sparse_moe_forward -- the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    m = mt.SparseMoE(D, FF, 8, 2, expert_bias=True)
    x = torch.from_numpy(rng.standard_normal((5, D), dtype=np.float32))
    with torch.no_grad():
        with Seen() as seen:
            y_op = m(x)
        y = m(x)
    assert any("moe.sparse_moe_forward" in op for op in seen.ops), seen.ops
    np.testing.assert_array_equal(y.numpy(), y_op.numpy())
    np.testing.assert_array_equal(y.numpy(), m.to_layer()(x.numpy()))

def test_expert_lora_trains(rng):
    """SparseMoE(lora_rank=...) as a module: the experts are frozen parameters, the adapters
    and the router get the NumPy backward's gradients bitwise, and AdamW lowers a loss."""
    m = mt.SparseMoE(D, FF, 4, 2, lora_rank=3, lora_alpha=6.0, n_shared_experts=1, seed=5)
    with torch.no_grad():
        m.lora_b_up.normal_()
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"w_gate", "w_up", "w_down", "shared_w_up"} <= frozen
    assert "lora_a_gate" not in frozen and "router_weight" not in frozen
    x = torch.from_numpy(rng.standard_normal((9, D), dtype=np.float32)).requires_grad_(True)
    dy = rng.standard_normal((9, D), dtype=np.float32)
    y = m(x)
    y.backward(torch.from_numpy(dy))
    layer = m.to_layer()
    y2, ctx = layer.forward_train(x.detach().numpy())
    np.testing.assert_array_equal(y.detach().numpy(), y2)
    g = layer.backward(ctx, dy)
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    for name, p in m.named_parameters():
        if p.requires_grad:
            np.testing.assert_array_equal(p.grad.numpy(), g[name], err_msg=name)
        else:
            assert p.grad is None, name
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    target = torch.from_numpy(rng.standard_normal((9, D), dtype=np.float32))
    xs = x.detach()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = ((m(xs) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_bfloat16_input(rng):
    m = mt.SparseMoE(D, FF, 4, 2, seed=4)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32)).bfloat16()
    x.requires_grad_(True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    (y.float() ** 2).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_(True)
    y32 = m(x32)
    assert torch.equal(y, y32.bfloat16())
    (y.detach().float() * 2 * y32).sum().backward()
    assert torch.equal(x.grad, x32.grad.bfloat16())


def test_bfloat16_weights(rng):
    layer = moe.SparseMoE(D, FF, 4, 2, dtype="bfloat16", n_shared_experts=1, seed=5)
    m = mt.from_layer(layer)
    assert m.w_up.dtype == torch.bfloat16 and m.router_weight.dtype == torch.float32
    assert m.shared_w_down.dtype == torch.bfloat16
    assert np.shares_memory(layer.w_up, m.w_up.detach().view(torch.int16).numpy())
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32)).requires_grad_(True)
    y = m(x)
    np.testing.assert_array_equal(y.detach().numpy(), layer(x.detach().numpy()))
    y.square().sum().backward()
    assert m.w_up.grad.dtype == torch.bfloat16 and m.router_weight.grad.dtype == torch.float32
    # against the float32 module on the same (rounded) weights: grads rounded to bf16
    f32 = moe.SparseMoE(D, FF, 4, 2, n_shared_experts=1, init=False)
    for name, t in m.named_parameters():
        setattr(f32, name, t.detach().float().numpy())
    m32 = mt.from_layer(f32)
    x2 = x.detach().clone().requires_grad_(True)
    m32(x2).square().sum().backward()
    for name, t in m.named_parameters():
        ref = getattr(m32, name).grad
        _close(t.grad.float(), ref.to(t.dtype).float(), 1e-6, name)


def test_bad_input(rng):
    m = mt.SparseMoE(D, FF, 4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_model=16\), got "
                                         r"\(3, 5\)"):
        m(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="d_model=16"):
        m(torch.zeros(()))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(3, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(np.zeros((3, D), np.float32))
    with pytest.raises(TypeError, match="router_weight is torch.float64 but .* needs "
                                        "torch.float32"):
        copy.deepcopy(m).double()(torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="expert_bias=True"):
        m.update_expert_bias(torch.zeros(4, dtype=torch.int64), 0.01)
    with pytest.raises(TypeError, match="moe.SparseMoE"):
        mt.from_layer(m)
    with pytest.raises(TypeError, match="top_k"):
        mt.SparseMoE(D, FF, 4)
    with pytest.raises(ValueError, match="top_k"):
        mt.SparseMoE(D, FF, 4, 5)
    m.w_up = torch.nn.Parameter(torch.zeros(4, FF, D + 1))  # the layer checks the shape
    with pytest.raises(ValueError, match="w_up must have shape"):
        m(torch.zeros(3, D))
    # the process survives and a good module still works
    assert mt.SparseMoE(D, FF, 4, 2)(torch.ones(2, D)).shape == (2, D)


def test_update_expert_bias():
    m = mt.SparseMoE(D, FF, 4, 2, expert_bias=True)
    counts = torch.tensor([5, 1, 3, 3])
    want = moe.update_expert_bias(np.zeros(4, np.float32), counts.numpy(), 0.01)
    v = m.expert_bias._version
    m.update_expert_bias(counts, 0.01)
    np.testing.assert_array_equal(m.expert_bias.numpy(), want)
    assert m.expert_bias._version > v
    assert np.shares_memory(m.to_layer().expert_bias, m.expert_bias.numpy())


def test_deepcopy_state_dict_and_pickle(rng, tmp_path):
    m = _module(rng, n_experts=8, top_k=2, n_shared_experts=1, expert_bias=True)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32))
    with torch.no_grad():
        y = m(x)
        c = copy.deepcopy(m)
        assert torch.equal(c(x), y)
        c.w_up.mul_(0.5)  # independent of the original
        assert not torch.equal(c(x), y) and torch.equal(m(x), y)
        other = mt.SparseMoE(D, FF, 8, 2, n_shared_experts=1, expert_bias=True, seed=9)
        other.load_state_dict(m.state_dict())
        assert torch.equal(other(x), y)
        torch.save(m, tmp_path / "m.pt")
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), y)


def test_repack_after_writes_through_data(rng):
    m = mt.SparseMoE(D, FF, 4, 2)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32))
    with torch.no_grad():
        y = m(x)
        m.w_gate.data.mul_(3.0)  # .data has its own version counter: not seen
        assert torch.equal(m(x), y)
        m.repack()
        assert not torch.equal(m(x), y)


def test_custom_ops_opcheck(rng):
    m = mt.SparseMoE(D, FF, 4, 2)
    x = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32))
    weights = [t.detach() for _, t in m.named_parameters()]
    # the inference form (train=False): the training form's handle differs on every call
    torch.library.opcheck(torch.ops.moe.sparse_moe_forward.default,
                          (x, weights, m._layer_id, False))


def test_import_moe_does_not_import_torch():
    code = "import sys, moe; assert 'torch' not in sys.modules, 'moe imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _compile_ok():
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported() and \
        (shutil.which("c++") or shutil.which("g++") or shutil.which("gcc"))


def _compiled_matches_eager(layer, rng, d_in=8, x_shape=(5, 8), routing=True):
    """A projection (8 -> d_in) then `layer` (a moe.torch module), with its router losses
    when routing: the compiled (fullgraph) forward and backward against eager (the
    parameters that train), and the saved state freed.  Returns (the module, its compiled
    form); the module's `layer` is the layer."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, d_in)
            self.layer = layer

        def forward(self, x):
            if not routing:
                return self.layer(self.proj(x)).square().mean()
            y, r = self.layer(self.proj(x), return_routing=True)
            return y.square().mean() + 0.1 * r.aux_loss + 0.01 * r.z_loss

    net = Net()
    before = len(mt._CONTEXTS)
    x = torch.from_numpy(rng.standard_normal(x_shape, dtype=np.float32))
    eager_loss = net(x)
    eager_loss.backward()
    eager = {n: t.grad.clone() for n, t in net.named_parameters() if t.requires_grad}
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    params = dict(net.named_parameters())
    for n, g in eager.items():
        torch.testing.assert_close(params[n].grad, g, rtol=1e-5, atol=1e-7, msg=n)
    assert len(mt._CONTEXTS) == before  # the saved state went with the graph
    return net, compiled


@pytest.mark.skipif(not _compile_ok(), reason="torch.compile (dynamo + a C++ compiler) "
                                               "is not available here")
def test_torch_compile_fullgraph(rng):
    torch.manual_seed(0)
    net, compiled = _compiled_matches_eager(
        mt.SparseMoE(8, 8, 4, 2, scoring="sigmoid", n_shared_experts=1, shared_d_ff=4,
                     expert_bias=True, seed=7), rng)
    # another number of tokens (a dynamic-shape graph), after an in-place weight update
    # that the compiled graph's op must see (repack)
    with torch.no_grad():
        net.layer.w_up.mul_(1.5)
    fresh = copy.deepcopy(net)  # a new moe.SparseMoE, packed from the updated weights
    x = torch.from_numpy(rng.standard_normal((7, 8), dtype=np.float32))
    assert compiled(x).item() == pytest.approx(fresh(x).item(), rel=1e-6)


# ---- moe.torch.MultiHeadMoE ------------------------------------------------------------

MH_OPTS = dict(n_shared_experts=1, shared_d_ff=6, router_bias=True, expert_biases=True,
               expert_bias=True)


def _multihead(rng, **opts):
    """A moe.torch.MultiHeadMoE (d_model 16, 4 heads of 4) with random inner biases."""
    m = mt.MultiHeadMoE(D, 4, FF, 4, 2, seed=5, **opts)
    with torch.no_grad():  # in place: the module must notice and repack the inner layer
        for name, t in list(m.moe.named_parameters()) + list(m.moe.named_buffers()):
            if name in ("router_bias", "b_gate", "b_up", "b_down", "expert_bias"):
                t.copy_(torch.from_numpy(0.1 * rng.standard_normal(t.shape)))
    return m


def test_multihead_gradients_are_the_numpy_backwards(rng):
    m = _multihead(rng, **MH_OPTS)
    layer = m.to_layer()
    assert layer.moe is m.moe.to_layer()
    params = dict(m.named_parameters())
    assert set(params) == set(layer.trainable_weights())
    assert [n for n, _ in m.named_buffers()] == ["moe.expert_bias"]
    for name, t in params.items():
        owner, attr = (layer.moe, name[4:]) if name.startswith("moe.") else (layer, name)
        assert np.shares_memory(getattr(owner, attr), t.detach().numpy()), name
    x = torch.from_numpy(rng.standard_normal((2, 3, D), dtype=np.float32)).requires_grad_(True)
    dy = rng.standard_normal((2, 3, D), dtype=np.float32)
    y, r = m(x, return_routing=True)
    assert r.expert_ids.shape == (2 * 3 * 4, 2) and r.counts.shape == (4,)
    (y * torch.from_numpy(dy)).sum().add(0.1 * r.aux_loss + 0.01 * r.z_loss).backward()
    y2, ctx = layer.forward_train(x.detach().numpy())
    g = layer.backward(ctx, dy, aux_coef=0.1, z_coef=0.01)
    np.testing.assert_array_equal(y.detach().numpy(), y2)
    assert r.aux_loss.item() == np.float32(ctx.routing.aux_loss)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ctx.routing.expert_ids)
    for name in layer.trainable_weights():
        np.testing.assert_array_equal(params[name].grad.numpy(), g[name], err_msg=name)
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])


def test_multihead_adamw_trains_a_toy_regression(rng):
    torch.manual_seed(0)
    m = mt.MultiHeadMoE(8, 2, 16, 4, 2, seed=1)
    x = torch.from_numpy(rng.standard_normal((48, 8), dtype=np.float32))
    target = x @ torch.from_numpy(rng.standard_normal((8, 8), dtype=np.float32) * 0.3)
    _train_toy_regression(m, x, target)
    # after the steps both projections and the inner layer run on the updated weights
    fresh = moe.MultiHeadMoE(8, 2, 16, 4, 2, init=False)
    for name, t in m.named_parameters():
        owner = fresh.moe if name.startswith("moe.") else fresh
        setattr(owner, name.rpartition(".")[2], t.detach().numpy().copy())
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), fresh(x.numpy()))


def test_multihead_no_grad(rng):
    m = _multihead(rng, expert_bias=True)
    x = torch.from_numpy(rng.standard_normal((3, D), dtype=np.float32)).requires_grad_(True)
    before = len(mt._CONTEXTS)
    with torch.no_grad():
        y, r = m(x, return_routing=True)
    assert len(mt._CONTEXTS) == before
    assert not y.requires_grad and not r.aux_loss.requires_grad
    ref_y, ref_r = m.to_layer()(x.detach().numpy(), return_routing=True)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ref_r.expert_ids)
    np.testing.assert_array_equal(r.counts.numpy(), ref_r.counts)
    y = m(x)
    assert len(mt._CONTEXTS) == before + 1
    del y  # nothing kept without a backward
    assert len(mt._CONTEXTS) == before
    # the fake op's shapes (routing over T * n_heads sub-tokens) against the real op's
    torch.library.opcheck(torch.ops.moe.sparse_moe_forward.default,
                          (x.detach(), [t.detach() for t in m._weights()], m._layer_id, False))


def test_multihead_state_dict_deepcopy_and_from_layer(rng, tmp_path):
    m = _multihead(rng, **MH_OPTS)
    keys = list(m.state_dict())
    assert keys[:2] == ["w_in", "w_merge"] and set(keys[2:]) == {
        "moe.router_weight", "moe.router_bias", "moe.w_gate", "moe.w_up", "moe.w_down",
        "moe.b_gate", "moe.b_up", "moe.b_down", "moe.expert_bias", "moe.shared_w_gate",
        "moe.shared_w_up", "moe.shared_w_down"}
    x = torch.from_numpy(rng.standard_normal((5, D), dtype=np.float32))
    with torch.no_grad():
        y = m(x)
        other = mt.MultiHeadMoE(D, 4, FF, 4, 2, seed=9, **MH_OPTS)
        other.load_state_dict(m.state_dict())
        assert torch.equal(other(x), y)
        c = copy.deepcopy(m)
        assert c.to_layer().moe is c.moe.to_layer()
        assert torch.equal(c(x), y)
        c.w_merge.mul_(0.5)
        c.moe.w_down.mul_(2.0)
        assert not torch.equal(c(x), y) and torch.equal(m(x), y)
        torch.save(m, tmp_path / "m.pt")
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(x), y)
        layer = moe.MultiHeadMoE(D, 4, FF, 4, 2, seed=3)
        f = mt.from_layer(layer)
        assert isinstance(f, mt.MultiHeadMoE) and f.to_layer() is layer
        np.testing.assert_array_equal(f(x).numpy(), layer(x.numpy()))


@pytest.mark.skipif(not _compile_ok(), reason="torch.compile (dynamo + a C++ compiler) "
                                               "is not available here")
def test_multihead_torch_compile_fullgraph(rng):
    torch.manual_seed(0)
    net, compiled = _compiled_matches_eager(
        mt.MultiHeadMoE(8, 2, 8, 4, 2, n_shared_experts=1, shared_d_ff=4, seed=7), rng)
    with torch.no_grad():  # in-place updates the compiled graph's op must see (repack)
        net.layer.w_in.mul_(1.5)
        net.layer.moe.w_up.mul_(0.5)
    fresh = copy.deepcopy(net)
    x = torch.from_numpy(rng.standard_normal((7, 8), dtype=np.float32))
    assert compiled(x).item() == pytest.approx(fresh(x).item(), rel=1e-6)
