"""moe.torch's mixture-of-LoRA modules (TopKLoRA, SoftLoRA, HydraLoRA, GatedLoRA, FlyLoRA,
SMoRA, MultiLoRA): gradients bit for bit the NumPy layers' backward, and against torch
autograd of an independent pure-torch implementation written PEFT-style
(y = x W0^T + b + s * sum_j g_j B_j (A_j x), the routers' softmax / sigmoid / top-k in
torch); training, no_grad, state_dict, torch.compile; and the PEFT LoRA interop against a
real peft model.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

import moe
import moe.torch as mt
from test_torch import _compile_ok, _compiled_matches_eager

DI, DO = 12, 10
A, Z = 0.125, 0.015625  # the losses' coefficients (exact in float32: bitwise comparisons)

# name -> (module class, positional args, options, per-call input)
CASES = {
    "topk": (mt.TopKLoRA, (DI, DO, 4, 3), dict(top_k=2, alpha=6.0, bias=True), None),
    "topk_per_sequence": (mt.TopKLoRA, (DI, DO, 4, 3), dict(top_k=2, per_sequence=True),
                          None),
    "topk_bf16_base": (mt.TopKLoRA, (DI, DO, 4, 3), dict(top_k=2, dtype="bfloat16"), None),
    "soft": (mt.SoftLoRA, (DI, DO, 4, 3), dict(bias=True), None),
    "hydra": (mt.HydraLoRA, (DI, DO, 4, 3), dict(alpha=2.0), None),
    "hydra_top2": (mt.HydraLoRA, (DI, DO, 4, 3), dict(top_k=2, bias=True), None),
    "gated": (mt.GatedLoRA, (DI, DO, 4, 3), dict(bias=True), "scalings"),
    "gated_softmax_topk": (mt.GatedLoRA, (DI, DO, 4, 3), dict(top_k=2, softmax_topk=True),
                           "scalings"),
    "fly": (mt.FlyLoRA, (DI, DO, 8, 3), dict(bias=True), None),
    "smora": (mt.SMoRA, (DI, DO, 8, 3), dict(rank_partition=2, alpha=2.0), None),
    "multi": (mt.MultiLoRA, (DI, DO, 3, 4), dict(bias=True), "adapter_ids"),
}


def _module(name, rng):
    """The case's module with every weight random (lora_b and the biases too), written in
    place through torch (the module must notice and repack)."""
    cls, args, opts, _ = CASES[name]
    m = cls(*args, seed=1, **opts)
    with torch.no_grad():
        for n, t in list(m.named_parameters()) + list(m.named_buffers()):
            if n in ("lora_b", "base_bias", "rank_bias"):
                t.copy_(torch.from_numpy(0.3 * rng.standard_normal(t.shape)))
            elif n == "scalings":  # MultiLoRA's per-adapter scalings
                t.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, t.shape)))
    return m


def _inputs(name, rng, lead=(2, 5)):
    """x and the per-call arguments (torch) of the case."""
    kind = CASES[name][3]
    x = torch.from_numpy(rng.standard_normal(lead + (DI,), dtype=np.float32))
    if kind == "scalings":
        return x, (torch.from_numpy(rng.standard_normal(lead + (4,), dtype=np.float32)),)
    if kind == "adapter_ids":
        return x, (torch.from_numpy(rng.integers(-1, 3, lead)),)
    return x, ()


# ---- the independent implementation -----------------------------------------------------

def _route(logits, k, *, sigmoid=False, renormalize=True, scaled=1.0, bias=None):
    """Top-k routing in torch: (ids, gates with grad, aux_loss, z_loss) -- the Switch
    load-balancing loss over the selection counts and mean logsumexp^2."""
    T, E = logits.shape
    scores = logits.sigmoid() if sigmoid else logits.softmax(-1)
    probs = scores / scores.sum(-1, keepdim=True) if sigmoid else scores
    choice = scores.detach() if bias is None else scores.detach() + bias
    ids = choice.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    f = torch.bincount(ids.reshape(-1), minlength=E).to(logits.dtype) / (T * k)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return ids, w * scaled, aux, z


def _mixture(x, a, b, ids, w, s):
    """s * sum_j w_j B_{ids_j} (A_{ids_j} x): PEFT's lora_B(lora_A(x)) * scaling per slot
    (a: (E, r, d) or the shared (r, d))."""
    z = x @ a.T if a.dim() == 2 else torch.einsum("tkrd,td->tkr", a[ids], x)
    eq = "tkor,tr->tko" if a.dim() == 2 else "tkor,tkr->tko"
    return s * (w[..., None] * torch.einsum(eq, b[ids], z)).sum(1)


def reference(m, p, x, extra):
    """y, aux, z of the module `m`'s layer from p (name -> float64 tensor), x (T, d_in)
    float64 and the per-call input (scalings (T, E) / adapter_ids (T,) / seq_lens)."""
    cfg, layer = m._config, m.to_layer()
    y = x @ p["base_weight"].T
    if "base_bias" in p:
        y = y + p["base_bias"]
    zero = x.new_zeros(())
    aux = zz = zero
    if isinstance(m, (mt.TopKLoRA, mt.SoftLoRA, mt.HydraLoRA)):
        xr, seq = x, None
        if cfg["per_sequence"]:  # one gate per sequence, from its mean token
            seq = torch.repeat_interleave(torch.arange(len(extra)), extra)
            xr = torch.stack([x[seq == i].mean(0) for i in range(len(extra))])
        k = layer.top_k or layer.n_experts
        ids, w, aux, zz = _route(xr @ p["router_weight"].T, k,
                                 renormalize=isinstance(m, mt.TopKLoRA) or (
                                     isinstance(m, mt.HydraLoRA) and layer.renormalize))
        if seq is not None:
            ids, w = ids[seq], w[seq]
        y = y + _mixture(x, p["lora_a"], p["lora_b"], ids, w, layer.scaling)
    elif isinstance(m, mt.GatedLoRA):
        c = extra
        if cfg["top_k"] is None:
            ids = torch.arange(c.shape[1]).expand(c.shape)
            w = c
        else:
            ids = c.detach().topk(cfg["top_k"], dim=-1).indices
            w = c.gather(1, ids)
            if cfg["softmax_topk"]:
                w = w.softmax(-1)
        y = y + _mixture(x, p["lora_a"], p["lora_b"], ids, w, layer.scaling)
    elif isinstance(m, mt.FlyLoRA):  # the top-k ranks of |A x| + rank_bias
        z = x @ p["lora_a"].T
        sel = (z.detach().abs() + p["rank_bias"]).topk(layer.top_k, dim=-1).indices
        mask = torch.zeros_like(z).scatter(1, sel, 1.0)
        y = y + layer.scaling * (mask * z) @ p["lora_b"].T
    elif isinstance(m, mt.SMoRA):  # every rank an expert, sigmoid gates, renormalised * k
        logits = (x @ p["router_weight"].T).repeat_interleave(layer.rank_partition, dim=1)
        ids, w, aux, zz = _route(logits, layer.top_k, sigmoid=True, scaled=layer.top_k,
                                 bias=p["rank_bias"])
        z = torch.einsum("tkd,td->tk", p["lora_a"][ids], x)
        y = y + layer.scaling * torch.einsum("otk,tk->to", p["lora_b"][:, ids], w * z)
    elif isinstance(m, mt.MultiLoRA):
        for t in range(x.shape[0]):  # per token, its adapter (-1: the base alone)
            i = int(extra[t])
            if i >= 0:
                delta = p["scalings"][i] * p["lora_b"][i] @ (p["lora_a"][i] @ x[t])
                y = y.index_add(0, torch.tensor([t]), delta[None])
    return y, aux, zz


def _close(actual, expected, rtol=1e-4, what=""):
    """|a - e| <= rtol * ||e|| / sqrt(n) elementwise (float32 against a float64 oracle)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.norm().item() / max(e.numel(), 1) ** 0.5
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: max error {err:.3g}, scale {scale:.3g}"


# ---- gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_are_the_numpy_backward_and_torch_autograds(name, rng):
    m = _module(name, rng)
    x, args = _inputs(name, rng)
    x.requires_grad_(True)
    for t in args:
        if t.is_floating_point():  # GatedLoRA's scalings: from a scaling head, trained
            t.requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal(x.shape[:-1] + (DO,), dtype=np.float32))
    y, r = m(x, *args, return_routing=True)
    assert y.shape == dy.shape and y.dtype == torch.float32
    ((y * dy).sum() + A * r.aux_loss + Z * r.z_loss).backward()

    # 1. the NumPy layer's backward, bit for bit (the same C calls)
    layer = m.to_layer()
    params = dict(m.named_parameters())
    assert {n for n, t in params.items() if t.requires_grad} == set(layer.trainable_weights())
    for n, t in params.items():
        if not t.requires_grad:
            assert t.grad is None, n
    y2, ctx = layer.forward_train(x.detach().numpy(), *(t.detach().numpy() for t in args))
    g = layer.backward(ctx, dy.numpy(), aux_coef=A, z_coef=Z)
    np.testing.assert_array_equal(y.detach().numpy(), y2)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ctx.routing.expert_ids)
    assert r.aux_loss.item() == np.float32(ctx.routing.aux_loss)
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    for n in layer.trainable_weights():
        np.testing.assert_array_equal(params[n].grad.float().numpy(), g[n], err_msg=n)
    if CASES[name][3] == "scalings":
        np.testing.assert_array_equal(args[0].grad.numpy(), g["scalings"])

    # 2. torch autograd of the independent implementation, in float64
    p = {n: t.detach().double().requires_grad_(t.requires_grad)
         for n, t in list(params.items()) + list(m.named_buffers())}
    T = x.shape[0] * x.shape[1]
    x64 = x.detach().double().reshape(T, DI).requires_grad_(True)
    extra = None
    if args:
        extra = args[0].detach().reshape(T, -1).squeeze(1) if CASES[name][3] == "adapter_ids" \
            else args[0].detach().double().reshape(T, -1).requires_grad_(True)
    elif m._config.get("per_sequence"):
        extra = torch.full((x.shape[0],), x.shape[1])
    y64, aux64, z64 = reference(m, p, x64, extra)
    ((y64 * dy.double().reshape(T, DO)).sum() + A * aux64 + Z * z64).backward()
    _close(y.reshape(T, DO), y64, what="y")
    _close(r.aux_loss, aux64, 1e-6, "aux_loss")
    _close(r.z_loss, z64, 1e-6, "z_loss")
    _close(x.grad.reshape(T, DI), x64.grad, what="x.grad")
    for n in layer.trainable_weights():
        _close(params[n].grad, p[n].grad, what=f"{n}.grad")
    if CASES[name][3] == "scalings":
        _close(args[0].grad.reshape(T, -1), extra.grad, what="scalings.grad")


def test_explicit_seq_lens_and_bfloat16_input(rng):
    m = _module("topk_per_sequence", rng)
    x = torch.from_numpy(rng.standard_normal((7, DI), dtype=np.float32))
    y = m(x, seq_lens=[3, 4])
    with torch.no_grad():
        np.testing.assert_array_equal(y.detach().numpy(), m.to_layer()(x.numpy(),
                                                                     seq_lens=[3, 4]))
    with pytest.raises(ValueError, match="seq_lens"):
        m(x)
    # bfloat16 x: computed in float32, y and x's gradient in bfloat16
    xb = x.bfloat16().requires_grad_(True)
    yb = m(xb, seq_lens=torch.tensor([3, 4]))
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    x32 = xb.detach().float().requires_grad_(True)
    y32 = m(x32, seq_lens=[3, 4])
    assert torch.equal(yb, y32.bfloat16())
    y32.sum().backward()
    assert torch.equal(xb.grad, x32.grad.bfloat16())


def test_grad_accumulates(rng):
    m = _module("hydra_top2", rng)
    x, _ = _inputs("hydra_top2", rng)
    m(x).square().sum().backward()
    once = {n: t.grad.clone() for n, t in m.named_parameters() if t.requires_grad}
    m(x).square().sum().backward()
    for n, g in once.items():
        torch.testing.assert_close(getattr(m, n).grad, 2 * g, rtol=1e-6, atol=0)


# ---- training ----------------------------------------------------------------------------

class XLoRA(torch.nn.Module):
    """A GatedLoRA whose scalings come from a trained head (X-LoRA's scaling classifier)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(DI, 4)
        self.lora = mt.GatedLoRA(DI, DO, 4, 3, top_k=2, softmax_topk=True, seed=3)

    def forward(self, x, return_routing=False):
        return self.lora(x, self.head(x), return_routing=return_routing)


@pytest.mark.parametrize("name", ["topk", "soft", "hydra", "gated", "fly", "smora", "multi"])
def test_adamw_reduces_a_loss(name, rng):
    torch.manual_seed(0)
    m = XLoRA() if name == "gated" else CASES[name][0](*CASES[name][1], seed=2,
                                                       **CASES[name][2])
    x = torch.from_numpy(rng.standard_normal((64, DI), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(0, 3, 64))
    call = (lambda: m(x, ids, return_routing=True)) if name == "multi" else \
        (lambda: m(x, return_routing=True))
    with torch.no_grad():
        target = call()[0] + x @ torch.from_numpy(
            0.3 * rng.standard_normal((DI, DO), dtype=np.float32))
    trained = [t for t in m.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trained, lr=2e-2, weight_decay=0.01)
    frozen = {n: t.detach().clone() for n, t in m.named_parameters() if not t.requires_grad}
    losses = []
    for _ in range(30):
        y, r = call()
        loss = F.mse_loss(y, target)
        opt.zero_grad()
        (loss + 0.01 * r.aux_loss + 1e-3 * r.z_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for n, t in m.named_parameters():  # the base (and FlyLoRA's A) stay frozen
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    if name == "gated":  # the scaling head trained through the scalings' gradient
        assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0


def test_optimizer_step_repacks_the_adapters_not_the_frozen_base(rng):
    """A step that moves only the adapters keeps the base's packed copy; an in-place edit
    of the base repacks it (forward and the backward's transposed copy), and every output
    and gradient is the fresh NumPy layer's."""
    m = mt.TopKLoRA(DI, DO, 4, 3, top_k=2, bias=True, seed=4)
    layer = m._binding.layer
    x = torch.from_numpy(rng.standard_normal((9, DI), dtype=np.float32)).requires_grad_()
    dy = torch.from_numpy(rng.standard_normal((9, DO), dtype=np.float32))

    def step_matches_fresh_layer():
        y = m(x)
        x.grad = None
        y.backward(dy)
        fresh = m.to_layer()
        yn, ctx = fresh.forward_train(x.detach().numpy())
        np.testing.assert_array_equal(y.detach().numpy(), yn)
        np.testing.assert_array_equal(x.grad.numpy(), fresh.backward(ctx, dy.numpy())["x"])

    step_matches_fresh_layer()
    base = layer._packed[0]
    opt = torch.optim.SGD([t for t in m.parameters() if t.requires_grad], lr=0.1)
    opt.step()  # lora_a, lora_b and the router move
    step_matches_fresh_layer()
    assert layer._packed[0] is base
    with torch.no_grad():
        m.base_weight.mul_(2.0)  # the frozen base edited in place: repacked
    step_matches_fresh_layer()
    assert layer._packed[0] is not base


def test_numpy_layer_keeps_the_base_pack_until_the_base_changes(rng):
    layer = moe.TopKLoRA(DI, DO, 4, 3, top_k=2, seed=5)
    x = rng.standard_normal((7, DI), dtype=np.float32)
    dy = rng.standard_normal((7, DO), dtype=np.float32)
    layer(x)
    base = layer._packed[0]
    layer.lora_b = rng.standard_normal(layer.lora_b.shape, dtype=np.float32)
    layer(x)
    assert layer._packed[0] is base  # an adapter assigned: the base pack kept
    _, ctx = layer.forward_train(x)
    layer.backward(ctx, dy)
    layer.base_weight *= 3.0  # in place, then pack(): everything repacked
    layer.pack()
    assert layer._packed[0] is not base
    fresh = moe.TopKLoRA(DI, DO, 4, 3, top_k=2, init=False)
    for name in layer._weight_names():
        setattr(fresh, name, None if getattr(layer, name) is None
                else getattr(layer, name).copy())
    y, ctx = layer.forward_train(x)
    yf, ctxf = fresh.forward_train(x)
    np.testing.assert_array_equal(y, yf)
    g, gf = layer.backward(ctx, dy), fresh.backward(ctxf, dy)
    for key in g:
        np.testing.assert_array_equal(g[key], gf[key], err_msg=key)


# ---- no_grad, state, layers --------------------------------------------------------------

@pytest.mark.parametrize("name", ["topk", "gated", "fly", "smora", "multi"])
def test_no_grad(name, rng):
    m = _module(name, rng)
    x, args = _inputs(name, rng)
    x.requires_grad_(True)
    before = len(mt._CONTEXTS)
    with torch.no_grad():
        y, r = m(x, *args, return_routing=True)
    assert len(mt._CONTEXTS) == before
    assert not y.requires_grad and not r.aux_loss.requires_grad
    ref_y, ref_r = m.to_layer()(x.detach().numpy(), *(t.numpy() for t in args),
                                return_routing=True)
    np.testing.assert_array_equal(y.numpy(), ref_y)
    np.testing.assert_array_equal(r.expert_ids.numpy(), ref_r.expert_ids)
    np.testing.assert_array_equal(r.weights.numpy(), ref_r.weights)
    np.testing.assert_array_equal(r.counts.numpy(), ref_r.counts)
    y = m(x, *args)
    assert len(mt._CONTEXTS) == before + 1
    del y  # nothing kept without a backward
    assert len(mt._CONTEXTS) == before
    # the fake op's shapes against the real op's
    extra = m._no_extra(x) if not args else (
        args[0].reshape(-1, 4).float() if name == "gated" else args[0].reshape(-1))
    torch.library.opcheck(torch.ops.moe.lora_forward.default,
                          (x.detach().reshape(-1, DI), extra,
                           [t.detach() for t in m._weights()], m._layer_id, False))


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameters_buffers_state_dict(name, rng):
    m = _module(name, rng)
    layer = m.to_layer()
    names = [n for n in layer._weight_names() if getattr(layer, n) is not None]
    assert list(m.state_dict()) == names
    buffers = [n for n, _ in m.named_buffers()]
    assert set(buffers) == {"rank_bias", "scalings"} & set(names)
    for n, t in m.state_dict().items():  # the NumPy layer's own memory
        arr = getattr(layer, n)
        view = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert np.shares_memory(arr, view), n
        if n in ("base_weight", "base_bias") or (n == "lora_a" and name == "fly"):
            assert not getattr(m, n).requires_grad, n
    x, args = _inputs(name, rng)
    with torch.no_grad():
        y = m(x, *args)
        cls, a, opts, _ = CASES[name]
        other = cls(*a, seed=9, **opts)
        other.load_state_dict(m.state_dict())
        assert torch.equal(other(x, *args), y)
        c = copy.deepcopy(m)
        assert torch.equal(c(x, *args), y)
        c.lora_b.mul_(0.5)
        assert not torch.equal(c(x, *args), y) and torch.equal(m(x, *args), y)
        f = mt.from_layer(layer)
        assert type(f) is type(m) and f.to_layer() is layer
        assert torch.equal(f(x, *args), y)


def test_frozen_and_bad_inputs(rng):
    m = _module("topk", rng)
    x = torch.zeros(3, DI)
    m.base_weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base_weight is frozen"):
        m(x)
    with torch.no_grad():
        assert m(x).shape == (3, DO)
    m.base_weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in=12\)"):
        m(torch.zeros(3, DI + 1))
    g = _module("gated", rng)
    with pytest.raises(ValueError, match="scalings must have shape"):
        g(x, torch.zeros(3, 5))
    mu = _module("multi", rng)
    with pytest.raises(TypeError, match="adapter_ids must be integers"):
        mu(x, torch.zeros(3))
    with pytest.raises(ValueError, match="adapter_ids"):
        mu(x, torch.tensor([0, 1, 3]))
    assert mu(x, 1).shape == (3, DO)
    with pytest.raises(TypeError, match="from_layer takes"):
        mt.from_layer(object())


def test_update_bias(rng):
    for name, rate in (("fly", 0.25), ("smora", 1e-5)):
        m = _module(name, rng)
        before = m.rank_bias.clone()
        _, r = m(_inputs(name, rng)[0], return_routing=True)
        m.update_bias(r.counts, rate)
        want = before.numpy() + np.float32(rate) * np.sign(r.counts.float().mean().numpy()
                                                           - r.counts.float().numpy())
        np.testing.assert_allclose(m.rank_bias.numpy(), want, rtol=1e-6, atol=1e-9)
        assert np.shares_memory(m.to_layer().rank_bias, m.rank_bias.numpy())


@pytest.mark.skipif(not _compile_ok(), reason="torch.compile (dynamo + a C++ compiler) "
                                               "is not available here")
def test_torch_compile_fullgraph(rng):
    torch.manual_seed(0)
    lora = mt.TopKLoRA(DI, DO, 4, 3, top_k=2, bias=True, seed=4)
    with torch.no_grad():
        lora.lora_b.normal_()
    net, compiled = _compiled_matches_eager(lora, rng, d_in=DI)
    with torch.no_grad():  # an in-place update the compiled graph's op must see (repack)
        net.layer.lora_a.mul_(1.5)
    fresh = copy.deepcopy(net)
    x = torch.from_numpy(rng.standard_normal((7, 8), dtype=np.float32))
    assert compiled(x).item() == pytest.approx(fresh(x).item(), rel=1e-6)


# ---- PEFT --------------------------------------------------------------------------------

PREFIX = "base_model.model.fc1."


@pytest.fixture
def peft_model():
    """A two-linear torch model with a PEFT LoRA (r=4, lora_alpha=8) on both, B non-zero."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("fc1", torch.nn.Linear(DI, DO))
    net.add_module("fc2", torch.nn.Linear(DO, 6))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0,
                          init_lora_weights=False)
    return peft.get_peft_model(net, cfg).eval()


def test_peft_adapter_into_multilora_and_back(peft_model, rng):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    fc1 = peft_model.base_model.model.fc1
    x = torch.from_numpy(rng.standard_normal((6, DI), dtype=np.float32))
    m = mt.MultiLoRA(DI, DO, 3, 8, bias=True)
    keys = mt.load_peft_lora(m, peft_model.state_dict(), index=1, prefix=PREFIX, alpha=8)
    assert keys == (PREFIX + "lora_A.default.weight", PREFIX + "lora_B.default.weight",
                    PREFIX + "base_layer.weight", PREFIX + "base_layer.bias")
    assert m.scalings[1].item() == 2.0  # lora_alpha / r
    with torch.no_grad():
        want = fc1(x)
        _close(m(x, 1), want, 1e-5, "adapter 1")
        _close(m(x, -1), fc1.base_layer(x), 1e-5, "base only")
        # a mixed batch: each token its adapter
        ids = torch.tensor([1, -1, 1, 1, -1, 1])
        _close(m(x, ids)[ids < 0], fc1.base_layer(x)[ids < 0], 1e-5, "mixed base")
        _close(m(x, ids)[ids > 0], want[ids > 0], 1e-5, "mixed adapter")

    # back to PEFT: the adapter's own keys and values (its rank 4, alpha 8)
    sd = get_peft_model_state_dict(peft_model)
    out = mt.peft_state_dict(m, index=1, prefix=PREFIX, rank=4, alpha=8)
    fc1_keys = [k for k in sd if k.startswith(PREFIX)]
    assert sorted(out) == sorted(fc1_keys)
    for k in fc1_keys:
        assert torch.equal(out[k], sd[k]), k
    with torch.no_grad():  # a changed adapter exported into the PEFT model
        m.lora_b[1].mul_(-0.5)
        set_peft_model_state_dict(peft_model, mt.peft_state_dict(m, index=1, prefix=PREFIX,
                                                                rank=4))
        _close(fc1(x), m(x, 1), 1e-5, "exported")
    with pytest.raises(ValueError, match="drop non-zero"):
        mt.peft_state_dict(m, index=1, rank=2)
    full = mt.peft_state_dict(m, index=1, include_base=True)
    assert torch.equal(full["base_layer.weight"], fc1.base_layer.weight)
    assert full["lora_A.weight"].shape == (8, DI)  # zero-padded to the layer's rank


@pytest.mark.parametrize("cls", [mt.TopKLoRA, mt.SoftLoRA, mt.HydraLoRA])
def test_peft_adapter_into_routed_experts(cls, peft_model, rng):
    """index=None puts the adapter in every expert / head: the gates sum to 1, so the
    mixture is the PEFT layer; index=i fills one expert with B folded by the scalings."""
    from peft import get_peft_model_state_dict
    fc1 = peft_model.base_model.model.fc1
    sd = get_peft_model_state_dict(peft_model)
    m = cls(DI, DO, 4, 6, bias=True, alpha=3.0)  # scaling 0.5 (PEFT's: 2)
    mt.load_peft_lora(m, peft_model.state_dict(), prefix=PREFIX, alpha=8)
    x = torch.from_numpy(rng.standard_normal((6, DI), dtype=np.float32))
    with torch.no_grad():
        _close(m(x), fc1(x), 1e-5, "every expert")
    a, b = sd[PREFIX + "lora_A.weight"], sd[PREFIX + "lora_B.weight"]
    m2 = cls(DI, DO, 4, 6, seed=5)  # scaling 1: B * 2 (PEFT's 8 / 4)
    before = m2.lora_a.detach().clone()
    mt.load_peft_lora(m2, sd, index=2, prefix=PREFIX, alpha=8)  # no base in this dict
    shared = m2.lora_a.dim() == 2
    got_a = m2.lora_a if shared else m2.lora_a[2]
    assert torch.equal(got_a[:4], a) and not got_a[4:].any()
    assert torch.equal(m2.lora_b[2][:, :4], b * 2.0) and not m2.lora_b[2][:, 4:].any()
    if not shared:
        assert torch.equal(m2.lora_a[1], before[1])
    back = mt.peft_state_dict(m2, index=2, prefix=PREFIX, rank=4, alpha=8)
    assert torch.equal(back[PREFIX + "lora_A.weight"], a)
    torch.testing.assert_close(back[PREFIX + "lora_B.weight"], b, rtol=0, atol=0)
    # the module's forward sees the loaded weights (repacked)
    with torch.no_grad():
        np.testing.assert_array_equal(m2(x).numpy(), m2.to_layer()(x.numpy()))


def test_peft_into_numpy_layer_and_errors(peft_model, rng):
    import moe
    sd = peft_model.state_dict()
    layer = moe.MultiLoRA(DI, DO, 2, 4, bias=True)
    mt.load_peft_lora(layer, sd, index=0, prefix=PREFIX, alpha=8)
    x = torch.from_numpy(rng.standard_normal((3, DI), dtype=np.float32))
    with torch.no_grad():
        _close(torch.from_numpy(layer(x.numpy(), 0)),
               peft_model.base_model.model.fc1(x), 1e-5, "numpy layer")
    with pytest.raises(ValueError, match=r"lora_A.default.weight: expected shape \(r, 12\) "
                                         r"with 1 <= r <= 2"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 2), sd, index=0, prefix=PREFIX)
    with pytest.raises(ValueError, match=r"fc2.lora_A.default.weight: expected shape "
                                         r"\(r, 12\)"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4), sd, index=0,
                          prefix="base_model.model.fc2.")
    with pytest.raises(ValueError, match=r"lora_B.weight: expected shape \(10, 4\)"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4), {"lora_A.weight": torch.zeros(4, DI),
                                                       "lora_B.weight": torch.zeros(9, 4)})
    with pytest.raises(ValueError, match="base_layer.bias: the layer has no base bias"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4), sd, index=0, prefix=PREFIX)
    with pytest.raises(ValueError, match="2 lora_A keys"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4), sd, index=0)
    with pytest.raises(KeyError, match="no lora_A.weight"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4), sd, prefix="nothing.")
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 2\)"):
        mt.load_peft_lora(mt.MultiLoRA(DI, DO, 2, 4, bias=True), sd, index=2, prefix=PREFIX)
    with pytest.raises(ValueError, match="index is required"):
        mt.peft_state_dict(mt.TopKLoRA(DI, DO, 4, 4))
    # a module's set_adapter writes in place (the NumPy layer's would replace the arrays)
    mu = mt.MultiLoRA(DI, DO, 2, 4)
    a, b = torch.randn(3, DI), torch.randn(DO, 3)
    mu.set_adapter(1, a, b, alpha=6.0)
    assert np.shares_memory(mu.to_layer().lora_a, mu.lora_a.detach().numpy())
    assert torch.equal(mu.lora_a[1, :3], a) and mu.scalings[1].item() == 2.0
