"""Training bf16-compute layers (issue 22, item 5): SparseMoE(dtype="bfloat16",
compute_dtype="bfloat16").backward runs every product of the FFN backward on bf16 operands
with float32 sums -- on AMX tiles where the amx set runs, the fp32 kernels on the rounded
values elsewhere -- and returns float32 gradients.  Checked on every kernel set this CPU
runs (MOE_ISA children) against moe.reference.layer_backward with the same roundings
(compute_dtype="bfloat16": dy, dg, du, x, h rounded where a product reads them; the bias
sums exact); recompute_hidden=False gives the same bits as recomputing (the forward's dot
kernel on its panels); bitwise for any thread count; the torch module trains through it.
"""
import json

import numpy as np
import pytest

import moe
from moe import reference
from childproc import child_env
from test_bf16_compute import CASES, build
from test_cpu_kernels import available_isas, run_child

# the backward's cases: one token, odd rows per expert, biases, shared experts, a tile tail
TRAIN_CASES = [c for c in CASES if c[0] in ("swiglu", "one-token", "one-expert", "tiny",
                                             "gelu", "geglu-biases", "deepseek", "tiles",
                                             "tiles-tail")]

_CHILD = r"""
import json, sys
import numpy as np
import moe
sys.path.insert(0, sys.argv[3])
from test_bf16_train import grads
out = {}
for case in json.loads(sys.argv[1]):
    for name, g in grads(case).items():
        out[case[0] + "/" + name] = g
np.savez(sys.argv[2], **out)
print(moe._C.build_info()["isa"])
"""


def grads(case, recompute_hidden=True):
    """A case's gradients ({name: array}) for a fixed dy, from fixed seeds."""
    layer, x = build(*case)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    _, ctx = layer.forward_train(x, recompute_hidden=recompute_hidden)
    return layer.backward(ctx, dy, aux_coef=0.01, z_coef=0.001)


def _check_against_reference(case, ours, what):
    layer, x = build(*case)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    ref = reference.layer_backward(layer, x, dy, aux_coef=0.01, z_coef=0.001)
    fp32_layer, _ = build(*case)
    object.__setattr__(fp32_layer, "compute_dtype", "float32")
    ref32 = reference.layer_backward(fp32_layer, x, dy, aux_coef=0.01, z_coef=0.001)
    for name, g in ours.items():
        key = "dx" if name == "x" else name
        r, r32 = ref[key], ref32[key]
        assert g.shape == np.shape(r) and g.dtype == np.float32, (what, name)
        # the same bf16 roundings as the reference: far closer to it than fp32 compute is.
        # (an element whose fp32 dg / h sits within float32 error of a bf16 rounding
        # boundary rounds the other way: a few per 10^5, each one bf16 ulp of one term)
        err = np.sqrt(np.mean((g - r) ** 2))
        gap = np.sqrt(np.mean((r32 - r) ** 2))
        scale = np.sqrt(np.mean(np.square(r))) + 1e-30
        assert err <= 0.1 * gap + 1e-6 * scale, \
            f"{what} {case[0]} {name}: error {err:.3g} vs the fp32 gap {gap:.3g}"


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16", "avx512sim", "amx"])
def test_bf16_backward_matches_reference(tmp_path, isa):
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    path = tmp_path / "grads.npz"
    got_isa = run_child(_CHILD, json.dumps(TRAIN_CASES), path, __import__("os").path.dirname(
        __file__), env=child_env(MOE_ISA=isa), timeout=300).stdout.strip()
    assert got_isa == isa
    outs = np.load(path)
    for case in TRAIN_CASES:
        ours = {k.split("/", 1)[1]: outs[k] for k in outs.files if k.startswith(case[0] + "/")}
        assert ours, case[0]
        _check_against_reference(case, ours, f"MOE_ISA={isa}")


@pytest.mark.parametrize("name", ["swiglu", "geglu-biases", "deepseek", "tiles-tail"])
def test_bf16_backward_same_bits_with_saved_hidden(name):
    case = next(c for c in CASES if c[0] == name)
    a, b = grads(case, True), grads(case, False)
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


@pytest.mark.parametrize("T, d, F", [(1, 64, 96), (300, 64, 96), (300, 288, 400)])
def test_bf16_backward_bitwise_for_any_thread_count(T, d, F):
    layer = moe.SparseMoE(d, F, 8, 2, dtype="bfloat16", compute_dtype="bfloat16", seed=3,
                          n_shared_experts=1)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    outs = []
    before = moe.get_num_threads()
    try:
        for n in (1, 2, 3):
            moe.set_num_threads(n)
            _, ctx = layer.forward_train(x)
            outs.append(layer.backward(ctx, dy))
    finally:
        moe.set_num_threads(before)
    for g in outs[1:]:
        for n in g:
            np.testing.assert_array_equal(g[n], outs[0][n], err_msg=n)


def test_bf16_backward_nan_stays_in_its_row():
    case = next(c for c in CASES if c[0] == "swiglu")
    layer, x = build(*case)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    dy[4, 3] = np.nan
    _, ctx = layer.forward_train(x)
    g = layer.backward(ctx, dy)
    # the NaN reaches x's gradient in row 4 only (and the weights its rows touch)
    assert np.isnan(g["x"][4]).all()
    assert np.isfinite(np.delete(g["x"], 4, axis=0)).all()


def test_int8_compute_still_has_no_backward():
    layer = moe.SparseMoE(32, 64, 4, 2, dtype="int8", compute_dtype="int8", seed=1)
    with pytest.raises(NotImplementedError, match="int8"):
        layer.forward_train(np.ones((3, 32), np.float32))


def test_torch_module_trains_with_bf16_compute():
    torch = pytest.importorskip("torch")
    import moe.torch as mt
    torch.manual_seed(0)
    m = mt.SparseMoE(48, 64, 6, 2, dtype="bfloat16", compute_dtype="bfloat16", seed=2,
                     n_shared_experts=1)
    x = torch.randn(5, 7, 48, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    layer = m.to_layer()
    _, ctx = layer.forward_train(x.detach().numpy())
    g = layer.backward(ctx, dy.numpy())
    np.testing.assert_array_equal(y.detach().numpy(), layer(x.detach().numpy()))
    np.testing.assert_array_equal(x.grad.numpy(), g["x"])
    for name, p in m.named_parameters():
        if name in g:
            # (bf16 parameters hold their float32 gradient rounded to bf16, as torch does)
            want = torch.from_numpy(g[name].reshape(p.shape)).to(p.dtype)
            assert torch.equal(p.grad, want), name
