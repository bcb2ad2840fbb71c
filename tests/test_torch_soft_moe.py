"""moe.torch.SoftMoE and moe.torch.MixtureOfTokens: gradients bit for bit the NumPy layers'
backward, and against torch autograd of an independent pure-torch Soft MoE (Puigcerver et
al. 2023) written here; training (AdamW, scale trained), gradient accumulation, no_grad,
temperature, state_dict / deepcopy / from_layer, bf16 experts, bad input, torch.compile.
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

import moe
import moe.torch as mt
from test_torch import _compile_ok, _compiled_matches_eager

D, FF = 12, 16

# name -> (module class, positional args, options, input shape)
CASES = {
    "soft_swiglu": (mt.SoftMoE, (D, FF, 3, 2), dict(), (2, 5, D)),
    "soft_gelu_normalize": (mt.SoftMoE, (D, FF, 3, 2),
                            dict(activation="gelu", normalize=True, scale=1.7), (2, 5, D)),
    "soft_one_group": (mt.SoftMoE, (D, FF, 4, 1), dict(activation="geglu"), (6, D)),
    "mot_group2": (mt.MixtureOfTokens, (D, FF, 3, 2), dict(group_size=2, temperature=0.7),
                   (4, 3, D)),
    "mot_no_mixing": (mt.MixtureOfTokens, (D, FF, 3, 1), dict(mixing=False), (4, 3, D)),
    "mot_normalize_one_position": (mt.MixtureOfTokens, (D, FF, 2, 2),
                                   dict(normalize=True, scale=0.8, activation="relu"), (5, D)),
}


def _module(name, rng, **extra):
    """The case's module, every parameter redrawn and written in place through torch (the
    module must notice and repack)."""
    cls, args, opts, _ = CASES[name]
    m = cls(*args, seed=1, **{**opts, **extra})
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n == "scale":
                continue
            fan_in = p.shape[-1] if n != "phi" else p.shape[0]
            v = rng.standard_normal(p.shape) * (1.5 / np.sqrt(fan_in))
            p.copy_(torch.from_numpy(v))
    return m


def _x(name, rng):
    return torch.from_numpy(rng.standard_normal(CASES[name][3], dtype=np.float32))


def _numpy_twin(m):
    """A separate NumPy layer holding copies of the module's weights (and scale)."""
    layer = m.to_layer()
    twin = type(layer)(**layer.config(), init=False)
    for n in layer._weight_names():
        if getattr(layer, n) is not None:
            setattr(twin, n, np.array(getattr(layer, n)))
    twin.scale = layer.scale
    if hasattr(m, "temperature"):
        twin.temperature = m.temperature
    return twin


# ---- the independent implementation -----------------------------------------------------

_ACT = {"swiglu": lambda g, u: F.silu(g) * u, "geglu": lambda g, u: F.gelu(g) * u,
        "gelu": lambda g, u: F.gelu(u), "relu": lambda g, u: F.relu(u)}


def _soft_groups(X, phi, w_gate, w_up, w_down, s, activation, normalize, scale, temperature):
    """Soft MoE over groups X (G, m, d), in torch: logits, D = softmax over the tokens,
    C = softmax over the slots, slots = D^T X, expert e on its s slots, y = C Y."""
    if normalize:
        xn = X / torch.sqrt((X * X).sum(-1, keepdim=True) + 1e-6)
        pn = phi / torch.sqrt((phi * phi).sum(0, keepdim=True) + 1e-6)
        logits = scale * (xn @ pn)
    else:
        logits = X @ phi
    logits = logits / temperature
    Dw, Cw = logits.softmax(-2), logits.softmax(-1)
    slots = Dw.transpose(-1, -2) @ X  # (G, S, d)
    G, S, d = slots.shape
    E = w_up.shape[0]
    se = slots.reshape(G, E, s, d)
    up = torch.einsum("gesd,efd->gesf", se, w_up)
    gate = None if w_gate is None else torch.einsum("gesd,efd->gesf", se, w_gate)
    ys = torch.einsum("gesf,edf->gesd", _ACT[activation](gate, up), w_down)
    return Cw @ ys.reshape(G, S, d)


def _reference(m, x):
    """y of the module's layer computed by _soft_groups in float64 from its parameters
    (leaves of the returned dict, with grad) and x."""
    cfg = m._config
    leaves = {n: p.detach().double().requires_grad_(True) for n, p in m.named_parameters()}
    xr = x.detach().double().requires_grad_(True)
    temp = float(getattr(m, "temperature", 1.0))
    scale = leaves.get("scale", 1.0)

    def run(X):
        return _soft_groups(X, leaves["phi"], leaves.get("w_gate"), leaves["w_up"],
                            leaves["w_down"], cfg["slots_per_expert"], cfg["activation"],
                            cfg["normalize"], scale, temp)

    if isinstance(m, mt.SoftMoE):
        y = run(xr[None])[0] if xr.dim() == 2 else run(xr)
    else:
        x3 = xr[:, None] if xr.dim() == 2 else xr
        B, n, d = x3.shape
        if not cfg["mixing"]:
            y = run(x3.reshape(B * n, 1, d)).reshape(B, n, d)
        else:
            g = B if cfg["group_size"] is None else cfg["group_size"]
            # a group: one position of g consecutive sequences
            y = torch.cat([run(x3[c:c + g].transpose(0, 1)).transpose(0, 1)
                           for c in range(0, B, g)])
        y = y[:, 0] if xr.dim() == 2 else y
    return y, xr, leaves


def _close(got, want, what, rtol=1e-4):
    got, want = got.double(), want.double()
    err = (got - want).norm().item()
    assert err <= rtol * want.norm().item() + 1e-12, f"{what}: |diff| {err} vs |ref| " \
                                                     f"{want.norm().item()}"


# ---- gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_bitwise_numpy_backward(name, rng):
    m = _module(name, rng)
    twin = _numpy_twin(m)
    x = _x(name, rng).requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    y = m(x)
    (y * dy).sum().backward()
    ref_y, ctx = twin.forward_train(x.detach().numpy())
    np.testing.assert_array_equal(y.detach().numpy(), ref_y)
    g = twin.backward(ctx, dy.numpy())
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    names = dict(m.named_parameters())
    assert set(names) == set(twin.trainable_weights())
    for n, p in names.items():
        want = np.float32(g[n]) if n == "scale" else g[n]
        assert p.grad.dtype == p.dtype, n
        np.testing.assert_array_equal(p.grad.numpy(), want, err_msg=n)
    if "scale" in names:
        assert names["scale"].grad.shape == () and names["scale"].grad.item() != 0
    # a second backward accumulates
    first = {n: p.grad.clone() for n, p in names.items()}
    (m(x) * dy).sum().backward()
    for n, p in names.items():
        assert torch.equal(p.grad, first[n] + first[n]), n


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_against_torch_autograd(name, rng):
    m = _module(name, rng)
    x = _x(name, rng).requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    y = m(x)
    (y * dy).sum().backward()
    ref, xr, leaves = _reference(m, x)
    _close(y.detach(), ref.detach(), "y")
    (ref * dy.double()).sum().backward()
    _close(x.grad, xr.grad, "x")
    for n, p in m.named_parameters():
        _close(p.grad, leaves[n].grad, n)


def test_bf16_experts(rng):
    """bfloat16 expert weights: bfloat16 parameters and gradients (the float32 gradient
    rounded), bitwise the NumPy backward's."""
    m = _module("soft_swiglu", rng, dtype="bfloat16")
    assert m.w_up.dtype == torch.bfloat16 and m.phi.dtype == torch.float32
    twin = _numpy_twin(m)
    x = _x("soft_swiglu", rng).requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    (m(x) * dy).sum().backward()
    _, ctx = twin.forward_train(x.detach().numpy())
    g = twin.backward(ctx, dy.numpy())
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    np.testing.assert_array_equal(m.phi.grad.numpy(), g["phi"])
    for n in ("w_gate", "w_up", "w_down"):
        p = getattr(m, n)
        assert p.grad.dtype == torch.bfloat16
        assert torch.equal(p.grad, torch.from_numpy(g[n]).to(torch.bfloat16)), n
    with pytest.raises(TypeError, match="needs torch.bfloat16"):
        m.float()(x)


# ---- training ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["soft_gelu_normalize", "mot_group2"])
def test_adamw_reduces_loss(name, rng):
    torch.manual_seed(0)
    m = _module(name, rng)
    x = _x(name, rng)
    target = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (m(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    layer = m.to_layer()
    if "scale" in dict(m.named_parameters()):
        assert m.scale.item() != pytest.approx(1.7) and layer.scale == m.scale.item()
    # the layer ran on the updated (repacked) weights
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), _numpy_twin(m)(x.numpy()))


# ---- no_grad, temperature, state ---------------------------------------------------------

@pytest.mark.parametrize("name", ["soft_gelu_normalize", "mot_group2", "mot_no_mixing"])
def test_no_grad(name, rng):
    m = _module(name, rng)
    x = _x(name, rng).requires_grad_(True)
    before = len(mt._CONTEXTS)
    with torch.no_grad():
        y = m(x)
    assert len(mt._CONTEXTS) == before and not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), _numpy_twin(m)(x.detach().numpy()))
    y = m(x)
    assert len(mt._CONTEXTS) == before + 1
    del y  # nothing kept without a backward
    assert len(mt._CONTEXTS) == before
    # float64 input: computed in float32, returned in float64
    with torch.no_grad():
        y64 = m(x.detach().double())
    assert y64.dtype == torch.float64
    np.testing.assert_array_equal(y64.float().numpy(), m(x).detach().numpy())
    # the fake op's shapes against the real op's
    torch.library.opcheck(torch.ops.moe.soft_moe_forward.default,
                          (x.detach(), [t.detach() for t in m._weights()], m._layer_id,
                           m._temperature(), False))


def test_temperature_attribute(rng):
    m = _module("mot_group2", rng)
    x = _x("mot_group2", rng)
    with torch.no_grad():
        y = m(x)
        m.temperature = 2.5
        y2 = m(x)
    assert not torch.equal(y, y2)
    twin = _numpy_twin(m)
    assert twin.temperature == 2.5 and m.to_layer().temperature == 2.5
    np.testing.assert_array_equal(y2.numpy(), twin(x.numpy()))
    assert "temperature" not in m.state_dict()
    m.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        m(x)


@pytest.mark.parametrize("name", ["soft_swiglu", "soft_gelu_normalize", "mot_group2"])
def test_parameters_state_dict(name, rng):
    m = _module(name, rng)
    layer = m.to_layer()
    names = [n for n in layer._weight_names() if getattr(layer, n) is not None]
    normalize = CASES[name][2].get("normalize", False)
    assert list(m.state_dict()) == names + (["scale"] if normalize else [])
    for n in names:  # the NumPy layer's own memory
        assert np.shares_memory(getattr(layer, n), getattr(m, n).detach().numpy()), n
    if normalize:
        assert m.scale.shape == () and m.scale.dtype == torch.float32
        assert m.scale.requires_grad and layer.scale == m.scale.item()
    x = _x(name, rng)
    cls, a, opts, _ = CASES[name]
    with torch.no_grad():
        y = m(x)
        if normalize:
            m.scale.fill_(2.25)
            assert not torch.equal(m(x), y) and m.to_layer().scale == 2.25
        y = m(x)
        other = cls(*a, seed=9, **opts)
        other.load_state_dict(m.state_dict())
        assert torch.equal(other(x), y)
        c = copy.deepcopy(m)
        assert torch.equal(c(x), y)
        c.w_up.mul_(0.5)
        assert not torch.equal(c(x), y) and torch.equal(m(x), y)
        f = mt.from_layer(layer)
        assert type(f) is type(m) and f.to_layer() is layer
        assert torch.equal(f(x), y)
    # from a fresh NumPy layer
    np_layer = moe.SoftMoE(D, FF, 2, 3, normalize=True, scale=1.25, seed=3)
    f = mt.from_layer(np_layer)
    assert isinstance(f, mt.SoftMoE) and f.scale.item() == 1.25
    with torch.no_grad():
        np.testing.assert_array_equal(f(x).numpy() if x.dim() == 3 else f(x[None]).numpy(),
                                      np_layer(x.numpy() if x.dim() == 3 else x[None].numpy()))


def test_bad_inputs(rng):
    m = _module("soft_swiglu", rng)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_model=12\)"):
        m(torch.zeros(2, 3, D + 1))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, d_model\)"):
        m(torch.zeros(2, 2, 3, D))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(2, 3, D, dtype=torch.int64))
    mot = _module("mot_group2", rng)
    with pytest.raises(ValueError, match="multiple of group_size=2"):
        mot(torch.zeros(3, 2, D))
    with pytest.raises(TypeError, match="from_layer takes"):
        mt.from_layer(object())


# ---- torch.compile -----------------------------------------------------------------------

@pytest.mark.skipif(not _compile_ok(), reason="torch.compile (dynamo + a C++ compiler) "
                                               "is not available here")
def test_torch_compile_fullgraph(rng):
    torch.manual_seed(0)
    net, compiled = _compiled_matches_eager(
        mt.SoftMoE(D, FF, 3, 2, normalize=True, scale=1.5, seed=4), rng, d_in=D,
        x_shape=(2, 5, 8), routing=False)
    with torch.no_grad():  # in-place updates the compiled graph's op must see (repack, scale)
        net.layer.w_up.mul_(1.5)
        net.layer.scale.fill_(0.75)
    fresh = copy.deepcopy(net)
    x = torch.from_numpy(rng.standard_normal((2, 5, 8), dtype=np.float32))
    assert compiled(x).item() == pytest.approx(fresh(x).item(), rel=1e-6)
