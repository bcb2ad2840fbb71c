"""moe.torch.patch on a transformers model: build a small Qwen3-MoE (or Mixtral) from a config
(no download), patch its sparse MoE blocks onto moe's C core, check it computes the same,
generate, train a step, and time it against the unpatched model.

    python examples/patch_transformers.py [--arch qwen3_moe|mixtral] [--layers 4]
        [--hidden 512] [--experts 32] [--top-k 4] [--d-ff 256] [--tokens 256] [--new 32]
        [--dtype float32|bfloat16]
"""
import argparse
import copy
import time

import torch
import transformers

import moe.torch as mt


def build(args):
    common = dict(vocab_size=2048, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=4,
                  head_dim=args.hidden // 8, max_position_embeddings=4096,
                  num_experts_per_tok=args.top_k, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if args.arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=args.d_ff,
                                         num_local_experts=args.experts)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=4 * args.hidden,
                                          moe_intermediate_size=args.d_ff,
                                          num_experts=args.experts, norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    with torch.no_grad():  # the routers start at zero: spread them
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.1)
    return model.eval()


def best_of(fn, repeat=3):
    fn()  # warm up (the patched model packs its experts on the first call)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "mixtral"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    ref = build(args)
    model = copy.deepcopy(ref)
    report = mt.patch(model)
    print(report)

    ids = torch.randint(3, 2048, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    prompt = ids[:, :16]
    out_ref = ref.generate(prompt, max_new_tokens=args.new, do_sample=False)
    out = model.generate(prompt, max_new_tokens=args.new, do_sample=False)
    print(f"max |logits - reference| / max |reference| = {err:.2e}; greedy tokens "
          f"{'identical' if torch.equal(out, out_ref) else 'DIFFER'}")

    def prefill(m):
        with torch.no_grad():
            m(ids)

    def generate(m):
        m.generate(prompt, max_new_tokens=args.new, do_sample=False)

    def train_step(m):
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids, output_router_logits=True).loss.backward()

    print(f"{args.arch}, {args.layers} layers, d_model {args.hidden}, {args.experts} experts "
          f"top-{args.top_k}, d_ff {args.d_ff}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'':24s}{'transformers':>14s}{'patched':>10s}{'speedup':>9s}")
    for label, fn in ((f"prefill {args.tokens} tokens", prefill),
                      (f"generate {args.new} tokens", generate),
                      (f"train step {args.tokens} tok", train_step)):
        a, b = best_of(lambda: fn(ref)), best_of(lambda: fn(model))
        print(f"{label:24s}{a * 1e3:11.1f} ms{b * 1e3:7.1f} ms{a / b:8.2f}x")


if __name__ == "__main__":
    main()
