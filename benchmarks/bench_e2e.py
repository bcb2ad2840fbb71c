"""End-to-end benchmark: moe.torch.patch(model) against the unpatched transformers model.

Small Qwen3-MoE, Mixtral and DeepSeek-V3 causal LMs built from configs (no download; 4
layers, d_model 512, fp32, seeded, routers spread as after training), each timed on

- prefill: one forward of 512 tokens (batch 1, no grad);
- decode: model.generate(prompt of 16 tokens, max_new_tokens=32, do_sample=False), as
  generated tokens / s (the prompt's prefill included);
- train step: forward with labels (and output_router_logits=True where the model has a
  load-balancing loss) + backward, 512 tokens, from fresh (None) gradients;

for deep copies with identical weights: patched (moe.torch.patch), transformers'
default expert path (transformers 5.23 resolves experts_implementation to "grouped_mm",
torch's grouped GEMM, which has a CPU kernel in torch >= 2.9) and the faster of its other
CPU options -- "eager" (the per-expert loop) or "batched_mm" (gathers each token's expert
weights: tried only where the gathered weights stay under 1 GiB a layer, i.e. decode) --,
picked per row by one timed call of each -- and, for the ceiling, the default model with its
MoE blocks replaced by a block that returns zeros at no cost (what no MoE implementation can
beat: the attention, norms, embeddings, LM head and autograd around the blocks).  Before
timing, every path is checked against the default: logits max-abs-normalised error < 1e-4
on the 512-token prompt and the same greedy tokens (--dtype bfloat16: against the float32
model, a mean logits error at most twice the default's own, tokens not compared -- bf16
rounding flips near-tied routing choices).  The four run in interleaved rounds (one call of each per round, rotating order, a
pause after each: torch's OpenMP threads spin after a call); medians (min-max) over rounds,
speed-ups as the median over rounds of the per-round ratio.

    python benchmarks/bench_e2e.py [--archs qwen3_moe mixtral deepseek_v3] [--rounds 5]
        [--dtype float32|bfloat16] [--tiny] [--out FILE.md]
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

import moe
import moe.torch as mt
from _common import cpu_model, interleaved, per_round, spread  # noqa: E402

THREADS = 2
SETTLE = 0.15  # seconds of pause after each timed call
TOKENS = 512
PROMPT = 16
NEW = 32
VOCAB = 4096
TARGETS = {"prefill": 2.0, "decode": 1.5, "train": 1.5}  # issue 20: patched / default
ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")
GATHER_LIMIT = 1 << 30  # batched_mm: bytes of gathered expert weights per layer


def config(arch, tiny=False):
    """transformers' config of the small model of `arch` (tiny: a few-second smoke size)."""
    import transformers as T

    d, L = (64, 2) if tiny else (512, 4)
    common = dict(vocab_size=256 if tiny else VOCAB, hidden_size=d, num_hidden_layers=L,
                  num_attention_heads=8, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**common, num_key_value_heads=4, head_dim=d // 8,
                               intermediate_size=4 * d, moe_intermediate_size=d // 2,
                               num_experts=16 if tiny else 64, num_experts_per_tok=8,
                               norm_topk_prob=True)
    elif arch == "mixtral":
        cfg = T.MixtralConfig(**common, num_key_value_heads=4, head_dim=d // 8,
                              intermediate_size=d * 7 // 2, num_local_experts=8,
                              num_experts_per_tok=2, router_jitter_noise=0.0)
    elif arch == "deepseek_v3":
        cfg = T.DeepseekV3Config(
            **common, num_key_value_heads=8, intermediate_size=4 * d,
            moe_intermediate_size=d // 2, n_routed_experts=16 if tiny else 64,
            num_experts_per_tok=6, n_group=4 if tiny else 8, topk_group=2 if tiny else 4,
            n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
            norm_topk_prob=True, kv_lora_rank=d // 4, q_lora_rank=d // 2,
            qk_rope_head_dim=d // 16, qk_nope_head_dim=d // 8, v_head_dim=d // 8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        raise SystemExit(f"unknown arch {arch!r} (one of {', '.join(ARCHS)})")
    return cfg


def build(arch, tiny=False, dtype=torch.float32):
    """The seeded model (eval mode), routers spread as after some training; built in fp32,
    then cast to `dtype`."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(arch, tiny),
                                                          dtype=torch.float32)
    with torch.no_grad():  # transformers' routers start at zero: every expert tied
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.01)
    model.generation_config.eos_token_id = None  # always NEW tokens
    return model.to(dtype).eval()


class FreeMoE(torch.nn.Module):
    """A stand-in for a MoE block that costs nothing: zeros of the input's shape (the blocks
    of the three architectures here return one tensor)."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def without_moe(model):
    """A deep copy of `model` with every MoE block a FreeMoE: the time no MoE kernel can
    beat."""
    from moe.hf_patch import _BLOCKS

    free = copy.deepcopy(model)
    for name, m in list(free.named_modules()):
        if type(m).__name__ in _BLOCKS:
            parent, _, child = name.rpartition(".")
            setattr(free.get_submodule(parent) if parent else free, child, FreeMoE())
    return free


def describe(arch, cfg):
    E = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) \
        or cfg.n_routed_experts
    F = getattr(cfg, "moe_intermediate_size", None) if arch != "mixtral" else \
        cfg.intermediate_size
    extra = (f", 1 shared expert, sigmoid routing, {cfg.n_group} groups (top-{cfg.topk_group}),"
             f" routed scaling {cfg.routed_scaling_factor:g}" if arch == "deepseek_v3" else "")
    return (f"{cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, {E} experts top-"
            f"{cfg.num_experts_per_tok}, d_ff {F}{extra}")


# ---- the three tasks --------------------------------------------------------------------

def prefill(m, ids):
    with torch.no_grad():
        return m(ids).logits


def decode(m, prompt):
    out = m.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + NEW, out.shape
    return out


def train_step(m, ids, aux):
    m.zero_grad(set_to_none=True)
    kw = {"output_router_logits": True} if aux else {}
    loss = m(ids, labels=ids, **kw).loss
    loss.backward()
    return loss.detach()


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


class Mismatch(Exception):
    pass


def mean_err(got, want):
    return ((got - want).abs().mean() / want.abs().mean()).item()


def check(name, model, ref, ids, prompt, aux, tol=1e-4, exact=None):
    """Raise Mismatch unless `model` gives ref's logits (max-abs-normalised error < tol) and
    greedy tokens; returns (logits error, training loss error, max gradient error).  bf16
    models: `exact` is the float32 model's logits, and model's mean error from them must be
    at most twice ref's own (bf16 rounding flips near-tied routing choices: the logits of
    two bf16 paths differ as much as each differs from float32; tokens not compared)."""
    got, want = prefill(model, ids).float(), prefill(ref, ids).float()
    err = rel_err(got, want)
    bf16 = exact is not None
    if bf16:
        mine, theirs = mean_err(got, exact), mean_err(want, exact)
        if not mine <= 2 * theirs + 1e-3:
            raise Mismatch(f"{name}: bf16 logits are {mine:.2e} off the float32 model's "
                           f"(mean error over their mean size), transformers' {theirs:.2e}")
    elif not err < tol:
        raise Mismatch(f"{name}: logits differ from transformers' default "
                       f"(max-abs-normalised error {err:.2e} >= {tol:.0e})")
    if not bf16 and not torch.equal(decode(model, prompt), decode(ref, prompt)):
        raise Mismatch(f"{name}: greedy tokens differ from transformers' default")
    loss_err = rel_err(train_step(model, ids, aux), train_step(ref, ids, aux))
    grads = dict(ref.named_parameters())
    g_err = max(rel_err(p.grad.float(), grads[n].grad.float())
                for n, p in model.named_parameters()
                if p.grad is not None and grads[n].grad is not None
                and grads[n].grad.abs().max() > 0)
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return err, loss_err, g_err


def gathered_bytes(cfg, tokens):
    """Bytes batched_mm gathers per layer for `tokens` tokens (gate_up and down weights)."""
    F = cfg.intermediate_size if cfg.model_type == "mixtral" else cfg.moe_intermediate_size
    return tokens * cfg.num_experts_per_tok * 3 * F * cfg.hidden_size * 4


def pick_alternative(alt, fn, cfg, tokens):
    """The faster of transformers' non-default CPU expert paths for fn (one warm, one timed
    call each); sets it on `alt` and returns its name."""
    options = ["eager"] + (["batched_mm"] if gathered_bytes(cfg, tokens) <= GATHER_LIMIT
                           else [])
    best = None
    for impl in options:
        alt.set_experts_implementation(impl)
        fn(alt)
        time.sleep(SETTLE)
        t0 = time.perf_counter()
        fn(alt)
        t = time.perf_counter() - t0
        time.sleep(SETTLE)
        if best is None or t < best[0]:
            best = (t, impl)
    alt.set_experts_implementation(best[1])
    return best[1]


def run_arch(arch, rounds, tiny=False, settle=SETTLE, dtype=torch.float32):
    """The three rows of `arch` (markdown) and the raw times {task: [patched, default,
    alternative, MoE-free]}."""
    ref = build(arch, tiny, dtype)
    bf16 = dtype == torch.bfloat16
    exact = build(arch, tiny) if bf16 else None  # the float32 model: bf16's yardstick
    assert ref.config._experts_implementation == "grouped_mm", \
        ref.config._experts_implementation
    patched, alt, free = copy.deepcopy(ref), copy.deepcopy(ref), without_moe(ref)
    report = mt.patch(patched)
    if not report.replaced or report.left:
        raise SystemExit(f"{arch}: patch replaced {len(report.replaced)} blocks, left "
                         f"{report.left}")
    cfg = ref.config
    aux = arch != "deepseek_v3"  # transformers' DeepSeek-V3 has no load-balancing loss
    tokens = 64 if tiny else TOKENS
    for seed in range(3):  # a token whose top-k is a near tie (float64 vs float32 router
        # logits) would pick other experts: another draw of the tokens then
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=gen)
        prompt = ids[:, :PROMPT]
        try:
            exact_logits = prefill(exact, ids).float() if bf16 else None
            errs = check("patched", patched, ref, ids, prompt, aux, exact=exact_logits)
            alt_errs = {}
            for impl in ("eager", "batched_mm"):
                alt.set_experts_implementation(impl)
                if impl == "batched_mm" and gathered_bytes(cfg, tokens) > GATHER_LIMIT:
                    if bf16:
                        check(impl, alt, ref, prompt, prompt, aux,
                              exact=prefill(exact, prompt).float())
                        continue
                    e = rel_err(prefill(alt, prompt), prefill(ref, prompt))
                    if not e < 1e-4 or not torch.equal(decode(alt, prompt),
                                                       decode(ref, prompt)):
                        raise Mismatch(f"{impl} differs from grouped_mm")
                    continue
                alt_errs[impl] = check(impl, alt, ref, ids, prompt, aux, exact=exact_logits)
            break
        except Mismatch as e:
            print(f"{arch}, tokens drawn with seed {seed}: {e}", file=sys.stderr)
    else:
        raise SystemExit(f"{arch}: no agreement in 3 draws of the tokens")
    tasks = {"prefill": lambda m: prefill(m, ids),
             "decode": lambda m: decode(m, prompt),
             "train": lambda m: train_step(m, ids, aux and m is not free)}
    pause = (lambda: time.sleep(settle)) if settle else None
    rows, raw = [], {}
    for task, fn in tasks.items():
        impl = pick_alternative(alt, fn, cfg, PROMPT if task == "decode" else tokens)
        models = (patched, ref, alt, free)
        fns = [(lambda m=m, fn=fn: fn(m), None, pause) for m in models]
        times = interleaved(fns, min_rounds=rounds, max_rounds=rounds, warmup=1)
        raw[task] = times
        ours, default, other, bare = times
        up = per_round(default, ours)
        up_alt = per_round([min(a, b) for a, b in zip(default, other)], ours)
        ceiling = per_round(default, bare)  # default / the model without MoE cost
        if task == "decode":
            tps = lambda ts: "%.0f (%.0f-%.0f)" % (NEW / statistics.median(ts),  # noqa: E731
                                                   NEW / max(ts), NEW / min(ts))
            label = f"decode {NEW} tok/s"
            cells = [tps(t) for t in times]
        else:
            label = f"{'prefill' if task == 'prefill' else 'train step'} {tokens} ms"
            cells = ["%.1f (%.1f-%.1f)" % tuple(v * 1e3 for v in spread(t)) for t in times]
        target = TARGETS[task]
        verdict = f"{'met' if up >= target else 'MISSED'} (>= {target:g}x)"
        rows.append("| " + " | ".join([arch, label] + cells[:2] + [f"{cells[2]} {impl}",
                                       f"{up:.2f}x", f"{up_alt:.2f}x", verdict,
                                       f"{ceiling:.2f}x"]) + " |")
    del patched, alt, ref, free, exact
    return rows, raw, errs, alt_errs, seed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the models' weights and compute (bfloat16: moe.torch.patch's "
                    "default inference_compute runs bf16 kernels where the CPU has them)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test: tiny models, 64 tokens, 1 round, no pauses")
    ap.add_argument("--out", help="also write the results to this markdown file")
    args = ap.parse_args(argv)
    settle = SETTLE
    if args.tiny:
        args.rounds, settle = 1, 0.0

    torch.set_num_threads(1 if args.tiny else THREADS)
    moe.set_num_threads(1 if args.tiny else THREADS)
    import transformers

    info = moe._C.build_info()
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    head = [
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs; moe "
        f"{info['version']} kernels {info['isa']}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {torch.get_num_threads()} threads (torch and moe); "
        f"{args.dtype}; load average at the start {load0[0]:.2f} {load0[1]:.2f} "
        f"{load0[2]:.2f}; {args.rounds} round(s)",
        "",
        "| model | task | patched | transformers default (grouped_mm) | transformers "
        "other (fastest) | speed-up vs default | speed-up vs the faster | issue 20 target | "
        "ceiling: default / MoE-free |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(head), flush=True)
    rows, models, checks = [], [], []
    for arch in args.archs:
        cfg = config(arch, args.tiny)
        models.append(f"- {arch}: {describe(arch, cfg)}, vocab {cfg.vocab_size}")
        arch_rows, _, errs, alt_errs, seed = run_arch(arch, args.rounds, args.tiny, settle,
                                                      getattr(torch, args.dtype))
        checks.append(f"{arch} (tokens seed {seed}): patched logits {errs[0]:.1e}, loss {errs[1]:.1e}, grads "
                      f"{errs[2]:.1e}; " + ", ".join(
                          f"{k} {v[0]:.1e} / {v[1]:.1e} / {v[2]:.1e}"
                          for k, v in alt_errs.items()))
        rows += arch_rows
        print("\n".join(arch_rows), flush=True)
    load1 = os.getloadavg()
    tokens = 64 if args.tiny else TOKENS
    notes = [
        "",
        f"Load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; the run "
        f"took {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Models (built from configs, seeded, routers drawn N(0, 0.1), in fp32, then cast "
        f"to {args.dtype}):",
        *models,
        "",
        f"Tasks: prefill = one no-grad forward of {tokens} tokens (batch 1); decode = "
        f"model.generate of {NEW} tokens after a {PROMPT}-token prompt (greedy, prompt "
        f"included in the time), in generated tokens/s; train step = forward with labels "
        f"(output_router_logits=True for Qwen3-MoE / Mixtral: the load-balancing loss; "
        f"DeepSeek-V3 has none) + backward on {tokens} tokens from None gradients. "
        f"Patched (moe.torch.patch), transformers' default (experts_implementation "
        f"resolves to grouped_mm) and the faster of its other CPU options (eager: the "
        f"per-expert loop; batched_mm: gathers every token's expert weights, tried only "
        f"where that stays under 1 GiB a layer, i.e. decode), picked per row by one timed "
        f"call each, are deep copies with identical weights, timed in interleaved rounds "
        f"(rotating order, {SETTLE} s pause after each call): medians (min-max) over rounds; "
        f"speed-ups are medians over rounds of default / patched and min(default, other) / "
        f"patched (for decode: of the times, i.e. of tokens/s patched / other). Targets "
        f"(issue 20): patched >= 2x the default on prefill, >= 1.5x on decode tokens/s and "
        f"on a training step. Ceiling: the default's time over that of a copy whose MoE "
        f"blocks return zeros at no cost (timed in the same rounds; no aux loss), i.e. the "
        f"speed-up an infinitely fast MoE block would give.",
        "",
        "Checked before timing against the default (max-abs-normalised errors of the "
        "prefill logits / training loss / worst parameter gradient; " +
        ("greedy tokens identical" if args.dtype == "float32" else
         "bf16: the mean logits error from the float32 model at most twice the default's") +
        "): " +
        "; ".join(checks) + ".",
    ]
    print("\n".join(notes))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(head + rows + notes) + "\n")
        print(f"\nwritten to {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
