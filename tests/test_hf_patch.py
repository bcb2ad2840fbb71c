"""moe.torch.patch / unpatch on tiny transformers models built locally (no download): the
six architectures' logits, greedy generation, gradients of every parameter (with the
model's own aux loss), the packed-weight refresh after optimizer.step, unpatch, bf16, and
what the report says about blocks it leaves."""
import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moe  # noqa: E402
import moe.torch as mt  # noqa: E402
from moe.hf_patch import PatchedMoE, PatchReport, _fused_grad  # noqa: E402

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=8, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def _config(arch, **over):
    t = transformers
    if arch == "mixtral":
        cfg = t.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6,
                              num_experts_per_tok=2)
    elif arch == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                               shared_expert_intermediate_size=40, num_experts=8,
                               num_experts_per_tok=2, norm_topk_prob=False)
    elif arch == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    elif arch == "olmoe":
        cfg = t.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    elif arch == "deepseek_v3":  # layer 0 dense, layer 1 MoE with grouped sigmoid routing
        common = {k: v for k, v in COMMON.items() if k not in ("head_dim",
                                                                "num_key_value_heads")}
        cfg = t.DeepseekV3Config(
            **common, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        cfg = t.GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=6,
                             num_experts_per_tok=2, sliding_window=16,
                             layer_types=["sliding_attention", "full_attention"])
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return cfg


def _build(arch, dtype=torch.float32, **over):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, **over), dtype=dtype)
    with torch.no_grad():  # some routers start at zero: give every router a spread
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "router.bias",
                              "gate_up_proj_bias", "down_proj_bias")):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model.eval()


def _pair(arch, **kw):
    """(reference model, patched deep copy of it, report)."""
    ref = _build(arch, **kw)
    model = copy.deepcopy(ref)
    return ref, model, mt.patch(model)


def _ids(seed=1, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def _close(a, b, rtol=1e-4):
    """|a - b| <= rtol * max|b| (elementwise against the tensor's scale)."""
    a, b = a.detach().float(), b.detach().float()
    err = (a - b).abs().max().item()
    assert err <= rtol * max(b.abs().max().item(), 1e-12), (err, b.abs().max().item())


def _moe_blocks(model):
    return [m for m in model.modules() if isinstance(m, PatchedMoE)]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_generate_and_unpatch(arch):
    ref, model, report = _pair(arch)
    n_moe = 1 if arch == "deepseek_v3" else 2  # DeepSeek-V3's layer 0 is dense
    assert len(report.replaced) == n_moe and not report.left and report.reason is None
    assert len(_moe_blocks(model)) == n_moe
    # the state dict is the model's: same keys, same memory
    sd_ref, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(sd_ref)
    originals = {n: m.original for n, m in model.named_modules() if isinstance(m, PatchedMoE)}
    for name, blk in originals.items():
        patched = model.get_submodule(name)
        for pname, p in blk.named_parameters():
            assert patched.get_parameter(pname) is p
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    _close(got, want)
    out_ref = ref.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    out = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(out, out_ref)
    # unpatch puts the very same block objects back
    names = mt.unpatch(model)
    assert sorted(names) == sorted(originals)
    for name, blk in originals.items():
        assert model.get_submodule(name) is blk
    assert not _moe_blocks(model)
    with torch.no_grad():
        _close(model(ids).logits, want, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_and_optimizer_refresh(arch):
    ref, model, _ = _pair(arch)
    ref.train()
    model.train()
    ids = _ids(2)
    aux = getattr(ref.config, "router_aux_loss_coef", None) is not None and arch != "deepseek_v3"
    kw = dict(labels=ids, output_router_logits=True) if aux else dict(labels=ids)
    out_ref, out = ref(ids, **kw), model(ids, **kw)
    _close(out.loss, out_ref.loss)
    if aux:  # transformers' own load-balancing loss, from the recorded router logits
        assert out.aux_loss is not None and float(out_ref.aux_loss.detach()) > 0
        _close(out.aux_loss, out_ref.aux_loss)
    out_ref.loss.backward()
    out.loss.backward()
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        q = params[name]
        assert q.grad is not None and q.grad.dtype == q.dtype, name
        _close(q.grad, p.grad)  # relative to the gradient's scale
    # the optimizer steps the model's parameters; the next forward sees the new weights
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        opt.step()
    with torch.no_grad():
        _close(model(ids).logits, ref(ids).logits)


def test_bf16_model():
    """bf16 weights stay bf16 (the packed ones too); the core computes in float32 (bf16 weights
    widened exactly, float32 accumulation) where transformers rounds every op to bf16:
    logits agree to 1e-2 of their scale on average (measured 2e-3 to 5e-3), gradients are
    rounded to bf16."""
    for arch in ("qwen3_moe", "gpt_oss"):
        ref, model, report = _pair(arch, dtype=torch.bfloat16)
        assert len(report.replaced) == 2
        blk = _moe_blocks(model)[0]
        assert blk.experts.gate_up_proj.dtype == torch.bfloat16
        assert blk.to_layer().dtype == "bfloat16"
        ids = _ids(3)
        with torch.no_grad():
            want, got = ref(ids).logits.float(), model(ids).logits.float()
        assert got.dtype == want.dtype
        assert (got - want).abs().mean() <= 1e-2 * want.abs().mean()
        model.train()
        model(ids, labels=ids).loss.backward()
        gu = blk.experts.gate_up_proj
        assert gu.grad is not None and gu.grad.dtype == torch.bfloat16
        assert torch.isfinite(gu.grad.float()).all() and gu.grad.float().abs().sum() > 0


@pytest.mark.parametrize("compute", ["float32", "bfloat16", "auto"])
def test_bf16_inference_compute(compute):
    """inference_compute picks what no-grad forwards of a bf16 model compute in: the block
    gives exactly what moe.SparseMoE computes with that compute_dtype (float32: bf16 weights
    widened; bfloat16: the bf16 x bf16 kernels), "auto" is bfloat16 where the CPU has bf16
    dot products; training forwards compute in float32 either way."""
    if compute == "auto":
        want_compute = ("bfloat16" if moe._C.build_info()["bf16_dot"] in ("amx", "vdpbf16ps")
                        else "float32")
    else:
        want_compute = compute
    ref = _build("mixtral", dtype=torch.bfloat16)
    model = copy.deepcopy(ref)
    report = mt.patch(model, inference_compute=compute)
    assert len(report.replaced) == 2
    blk = _moe_blocks(model)[0]
    seen = {}
    hook = blk.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    ids = _ids(3)
    with torch.no_grad():
        got = model(ids).logits.float()
        want = ref(ids).logits.float()
    hook.remove()
    assert (got - want).abs().mean() <= 1e-2 * want.abs().mean()
    layer = blk.to_layer()
    twin = moe.SparseMoE(layer.d_model, layer.d_ff, layer.n_experts, layer.top_k,
                         dtype="bfloat16", compute_dtype=want_compute, init=False)
    for name in ("router_weight", "w_gate", "w_up", "w_down"):
        setattr(twin, name, getattr(layer, name))
    x = seen["x"].reshape(-1, layer.d_model).float().numpy()
    expect = torch.from_numpy(twin(x)).to(torch.bfloat16)
    assert torch.equal(seen["y"].reshape(expect.shape), expect)
    # a training step after it runs the float32-compute layer (its gradients finite)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert torch.isfinite(blk.experts.gate_up_proj.grad.float()).all()


def test_inference_compute_errors():
    with pytest.raises(ValueError, match="inference_compute must be one of"):
        mt.patch(_build("mixtral"), inference_compute="fp8")
    report = mt.patch(_build("mixtral"), inference_compute="bfloat16")  # a float32 model
    assert not report.replaced and len(report.left) == 2
    assert "needs a bf16 model" in report.left[0].reason


def test_dense_model_is_reported_and_works():
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items()}, intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    report = mt.patch(model)
    assert isinstance(report, PatchReport)
    assert report.replaced == [] and report.left == []
    assert report.reason == "no sparse MoE block found" and report.reason in str(report)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert mt.unpatch(model) == []


def test_unsupported_blocks_are_left_with_a_reason():
    # a supported architecture in a configuration the core does not compute
    ref, model, report = _pair("mixtral", router_jitter_noise=0.1)
    assert not report.replaced and report.reason == "no supported MoE block"
    assert [e.name for e in report.left] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all("router_jitter_noise" in e.reason for e in report.left)
    assert all(e.kind == "MixtralSparseMoeBlock" for e in report.left)
    # an MoE block of an architecture patch() does not know
    ref, model = _build("qwen3_moe"), None
    model = copy.deepcopy(ref)

    class CustomSparseMoeBlock(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.experts = inner.experts
            self.gate = inner.gate
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model.model.layers[1].mlp = CustomSparseMoeBlock(model.model.layers[1].mlp)
    report = mt.patch(model)
    assert [r.name for r in report.replaced] == ["model.layers.0.mlp"]
    (left,) = report.left
    assert left.name == "model.layers.1.mlp" and left.kind == "CustomSparseMoeBlock"
    assert "unsupported MoE block" in left.reason and "left model.layers.1.mlp" in str(report)
    ids = _ids()
    with torch.no_grad():
        _close(model(ids).logits, ref(ids).logits)
    # patching twice leaves the patched blocks
    again = mt.patch(model)
    assert not again.replaced and "already patched" in [e.reason for e in again.left]


def test_recompute_hidden_off_same_gradients():
    """patch(model, recompute_hidden=False): training forwards keep the gate / up
    pre-activations; the gradients are the same bits as with the default."""
    base = _build("qwen3_moe").train()
    grads = []
    for recompute in (True, False):
        model = copy.deepcopy(base)
        mt.patch(model, recompute_hidden=recompute)
        assert all(b._rt.layer.recompute_hidden is recompute for b in _moe_blocks(model))
        ids = _ids(2)
        model(ids, labels=ids, output_router_logits=True).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.equal(g, grads[1][n]), n


def test_report_and_memory():
    _, model, report = _pair("qwen2_moe")
    r = report.replaced[0]
    assert (r.name, r.arch) == ("model.layers.0.mlp", "qwen2_moe")
    assert r.options["n_experts"] == 8 and r.options["d_ff"] == 16
    assert r.options["shared_expert_gate"] and r.options["renormalize"] is False
    # nothing is copied: the gate / up halves of the fused gate_up_proj are strided views
    assert r.copies == [] and r.copy_bytes == 0 and report.copy_bytes == 0
    assert {"router_weight", "w_gate", "w_up", "w_down", "shared_w_up",
            "shared_gate_weight"} <= set(r.views)
    experts = model.model.layers[0].mlp.experts
    gu, F, d = experts.gate_up_proj, r.options["d_ff"], r.options["d_model"]
    layer = model.model.layers[0].mlp.to_layer()
    assert layer.w_down.ctypes.data == experts.down_proj.data_ptr()
    assert layer.w_gate.ctypes.data == gu.data_ptr()
    assert layer.w_up.ctypes.data == gu.data_ptr() + F * d * gu.element_size()
    assert layer.w_gate.strides[0] == 2 * F * d * gu.element_size()
    assert "replaced model.layers.0.mlp (qwen2_moe)" in str(report)


def test_fused_gate_up_gradient_is_not_copied():
    """The core writes gate_up_proj's gradient as one (E, 2F, d) array (its w_gate / w_up
    gradients are the halves); the patched block hands that array to autograd as is."""
    _, model, _ = _pair("qwen3_moe")
    blk = _moe_blocks(model)[0]
    rt, params = blk._rt, blk._params()
    seen = []
    orig = mt.layer_backward

    def spy(*args):
        dx, grads = orig(*args)
        seen.append(grads)
        return dx, grads

    ids = _ids(2)
    try:
        mt.layer_backward = spy
        model.train()
        model(ids, labels=ids).loss.backward()
    finally:
        mt.layer_backward = orig
    names = [n for n in rt.names if n in rt.binding.trainable]
    g = dict(zip(names, seen[0]))
    assert g["w_gate"].untyped_storage().data_ptr() == g["w_up"].untyped_storage().data_ptr()
    fused = _fused_grad([g["w_gate"], g["w_up"]], blk.experts.gate_up_proj.shape)
    assert fused is not None and fused.data_ptr() == g["w_gate"].data_ptr()
    assert _fused_grad([g["w_gate"], g["w_gate"]], blk.experts.gate_up_proj.shape) is None
    assert _fused_grad([g["w_up"], g["w_gate"]], blk.experts.gate_up_proj.shape) is None
    del params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_expert_weights_are_views(dtype):
    """gpt-oss's transposed, interleaved gate_up_proj (E, d, 2F) and down_proj (E, F, d)
    are read in place; only the small biases (interleaved: 2-d strided) and, in bf16
    models, the float32 router weight are copied."""
    _, model, report = _pair("gpt_oss", dtype=dtype)
    for r in report.replaced:
        assert {"w_gate", "w_up", "w_down"} <= set(r.views), r.copies
        want = {"b_gate", "b_up"} | ({"router_weight", "router_bias", "b_down"}
                                     if dtype == torch.bfloat16 else set())
        assert set(r.copies) == want
        block = model.get_submodule(r.name)
        experts, layer = block.experts, block.to_layer()
        es = experts.gate_up_proj.element_size()
        assert layer.w_gate.ctypes.data == experts.gate_up_proj.data_ptr()
        assert layer.w_up.ctypes.data == experts.gate_up_proj.data_ptr() + es
        assert layer.w_down.ctypes.data == experts.down_proj.data_ptr()
        E, F, d = (r.options[k] for k in ("n_experts", "d_ff", "d_model"))
        sizes = {"b_gate": E * F, "b_up": E * F, "b_down": E * d, "router_weight": E * d,
                 "router_bias": E}
        assert r.copy_bytes == 4 * sum(sizes[n] for n in want)  # float32 copies


def test_replaced_part_falls_back_to_the_original_forward():
    """A part swapped after patching (as a PEFT LoRA wrapper does) is never ignored: the
    block runs its original forward, warning once."""
    ref, model, _ = _pair("qwen2_moe")

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    for m in (ref, model):
        old = m.model.layers[0].mlp.shared_expert.up_proj
        new = Scaled(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        m.model.layers[0].mlp.shared_expert.up_proj = new
    ids = _ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(ids).logits
    assert any("original forward" in str(w.message) for w in caught)
    with torch.no_grad():
        _close(got, ref(ids).logits)


def test_load_state_dict_refreshes():
    ref, model, _ = _pair("olmoe")
    other = _build("olmoe")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    ref.load_state_dict(other.state_dict())
    model.load_state_dict(other.state_dict())
    ids = _ids()
    with torch.no_grad():
        _close(model(ids).logits, ref(ids).logits)


def test_peft_lora_on_a_patched_model():
    """A PEFT LoRA model over a patched one: the frozen base's MoE blocks run on the core,
    the adapters' gradients (through them) match the unpatched PEFT model's."""
    peft = pytest.importorskip("peft")
    ref, model, _ = _pair("qwen3_moe")
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    pref = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    pmod = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    pmod.load_state_dict(pref.state_dict())
    assert len(_moe_blocks(pmod)) == 2
    ids = _ids()
    pref(ids, labels=ids).loss.backward()
    pmod(ids, labels=ids).loss.backward()
    want = dict(pref.named_parameters())
    trained = [(n, p) for n, p in pmod.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for name, p in trained:
        _close(p.grad, want[name].grad)
    blk = _moe_blocks(pmod)[0]
    assert blk.experts.gate_up_proj.grad is None  # frozen: no gradient computed into it


def test_copy_pickle_and_dtype_change():
    """deepcopy / torch.save of a patched model rebuild the core's layer on the copy; a
    model converted after patching (.to(bfloat16)) rebuilds it in the new dtype."""
    import io
    ref, model, _ = _pair("mixtral")
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        twin = copy.deepcopy(model)
        blk = twin.model.layers[0].mlp
        assert isinstance(blk, PatchedMoE) and blk.original.experts is blk.experts
        _close(twin(ids).logits, want)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        _close(torch.load(buf, weights_only=False)(ids).logits, want)
        model.to(torch.bfloat16)
        got = model(ids).logits.float()
        assert model.model.layers[0].mlp.to_layer().dtype == "bfloat16"
        ref.to(torch.bfloat16)
        want = ref(ids).logits.float()
        assert (got - want).abs().mean() <= 3e-2 * want.abs().mean()
