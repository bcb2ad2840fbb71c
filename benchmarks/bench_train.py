"""Training-step benchmark: moe.torch.SparseMoE's forward + backward against transformers.

One training step of our layer against what a PyTorch user trains with instead, in one run,
and the memory each keeps for its backward.

For mixtral-small, qwen3-small and deepseek-small (shapes.json, "cpu") at 512 and 2048
tokens, fp32, 2 threads: (a) ours, (b) transformers' own MoE block (MixtralSparseMoeBlock,
Qwen3MoeSparseMoeBlock, DeepseekV3MoE) with experts_implementation="grouped_mm" and (c) a
per-expert nn.Linear loop, both under autograd.  The loss is sum(y * dy) + 0.01 * aux_loss
wherever the block has a load-balancing loss (transformers' DeepseekV3MoE has none).  Every
implementation is checked against ours (output, input and weight gradients) before it is
timed; (a) also runs with recompute_hidden=False (the forward keeps the gate / up
pre-activations: the same gradients, more memory); the four are timed in interleaved
rounds; medians (min-max) over rounds.

--dtype bfloat16: ours with bf16 weights and compute_dtype="bfloat16" (bf16 products, AMX
tiles on the amx kernel set), the two torch ones cast to bfloat16, x and dy bfloat16 for all.

    python benchmarks/bench_train.py [--shapes mixtral-small ...] [--tokens 512 2048]
        [--rounds N] [--quick] [--dtype float32|bfloat16] [--out FILE.md]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import moe
import moe.torch as mt
from _common import check, cpu_model, fma_peak, interleaved, per_round, spread  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.path.join(HERE, "shapes.json")
AUX_COEF = 0.01
THREADS = 2
SETTLE = 0.15  # seconds of pause after each timed step (see row())
# --dtype: the step's dtype (x, dy, the torch modules); bfloat16 makes ours bf16 compute
DTYPE = torch.float32


# ---- the three implementations ---------------------------------------------------------
#
# Each is an object with .name, .module, .has_aux, forward(x) -> (y, aux or None) on a
# (T, d) float32 tensor, and grads() -> the gradients the correctness check compares, named
# and shaped as ours (router_weight (E, d), w_down (E, d, F)).

class Ours:
    name = "moe.torch"
    has_aux = True

    def __init__(self, cfg, seed=0):
        bf16 = dict(dtype="bfloat16", compute_dtype="bfloat16") \
            if DTYPE == torch.bfloat16 else {}
        self.module = mt.SparseMoE(**cfg, **bf16, seed=seed)
        if cfg.get("expert_bias"):  # a selection bias that matters, as after some training
            with torch.no_grad():
                self.module.expert_bias.copy_(
                    torch.from_numpy(np.random.default_rng(seed).standard_normal(
                        cfg["n_experts"]).astype(np.float32) * 0.01))

    def forward(self, x):
        y, r = self.module(x, return_routing=True)
        return y, r.aux_loss

    def grads(self):
        return {"router_weight": self.module.router_weight.grad,
                "w_down": self.module.w_down.grad}


class OursKept(Ours):
    """Ours with recompute_hidden=False: the forward keeps the gate / up pre-activations
    (same weights, same gradients; more memory, less backward work)."""
    name = "moe.torch (recompute_hidden=False)"

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.module.recompute_hidden = False


def _hf_config(arch, cfg):
    """transformers' config for a shapes.json entry of `arch` (mixtral, qwen3, deepseek)."""
    import transformers as T

    kw = dict(hidden_size=cfg["d_model"], num_experts_per_tok=cfg["top_k"], hidden_act="silu",
              experts_implementation="grouped_mm")
    if arch == "deepseek":
        if cfg["shared_d_ff"] != cfg["n_shared_experts"] * cfg["d_ff"]:
            raise SystemExit("DeepseekV3MoE's shared expert is n_shared_experts * d_ff wide")
        return T.DeepseekV3Config(
            **kw, moe_intermediate_size=cfg["d_ff"], n_routed_experts=cfg["n_experts"],
            n_group=cfg["n_groups"], topk_group=cfg["topk_groups"],
            n_shared_experts=cfg["n_shared_experts"], norm_topk_prob=cfg["renormalize"],
            routed_scaling_factor=cfg["routed_scaling"])
    if arch == "qwen3":
        return T.Qwen3MoeConfig(**kw, moe_intermediate_size=cfg["d_ff"],
                                num_experts=cfg["n_experts"], norm_topk_prob=cfg["renormalize"])
    if arch == "mixtral":
        return T.MixtralConfig(**kw, intermediate_size=cfg["d_ff"],
                               num_local_experts=cfg["n_experts"], router_jitter_noise=0.0)
    raise SystemExit(f"no transformers block for {arch!r} (mixtral, qwen3, deepseek)")


class HFBlock:
    """transformers' MoE block on ours' weights (copied), experts on grouped_mm.

    The blocks return y only: the model collects the router logits (here a forward hook
    on block.gate) for its load_balancing_loss_func, which counts f over tokens rather than
    assignments, so it is top_k times ours: weighted by 1 / top_k it is the same loss."""

    name = "transformers grouped_mm"

    def __init__(self, arch, cfg, ours):
        config = _hf_config(arch, cfg)
        if arch == "deepseek":
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
            block, lb = DeepseekV3MoE(config), None
        elif arch == "qwen3":
            from transformers.models.qwen3_moe import modeling_qwen3_moe as m
            block, lb = m.Qwen3MoeSparseMoeBlock(config), m.load_balancing_loss_func
        else:
            from transformers.models.mixtral import modeling_mixtral as m
            block, lb = m.MixtralSparseMoeBlock(config), m.load_balancing_loss_func
        assert config._experts_implementation == "grouped_mm"
        src = ours.module
        with torch.no_grad():
            block.gate.weight.copy_(src.router_weight)
            block.experts.gate_up_proj.copy_(torch.cat([src.w_gate, src.w_up], dim=1))
            block.experts.down_proj.copy_(src.w_down)
            if arch == "deepseek":
                block.gate.e_score_correction_bias.copy_(src.expert_bias)
                block.shared_experts.gate_proj.weight.copy_(src.shared_w_gate)
                block.shared_experts.up_proj.weight.copy_(src.shared_w_up)
                block.shared_experts.down_proj.weight.copy_(src.shared_w_down)
        block.to(DTYPE)
        self.module, self.top_k, self.n_experts, self.lb = block, cfg["top_k"], cfg["n_experts"], lb
        self.has_aux = lb is not None
        self.logits = None
        if lb is not None:
            block.gate.register_forward_hook(lambda mod, args, out: setattr(self, "logits", out[0]))

    def forward(self, x):
        T, d = x.shape
        y = self.module(x.view(1, T, d)).view(T, d)
        if self.lb is None:
            return y, None
        aux = self.lb((self.logits,), self.n_experts, self.top_k) / self.top_k
        self.logits = None
        return y, aux

    def expert_ids(self, x):
        return self.module.gate(x)[2]

    def grads(self):
        return {"router_weight": self.module.gate.weight.grad,
                "w_down": self.module.experts.down_proj.grad}


class _Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopMoE(nn.Module):
    """The per-expert loop of the transformers 4.x MoE blocks: a router nn.Linear, softmax
    (sigmoid, bias and group-limited top-k for DeepSeek-V3), one nn.Linear triple per expert
    over its tokens, index_add_ to combine, the shared expert beside; the Switch loss."""

    def __init__(self, cfg):
        super().__init__()
        d, E = cfg["d_model"], cfg["n_experts"]
        self.cfg = cfg
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(_Expert(d, cfg["d_ff"]) for _ in range(E))
        self.shared = _Expert(d, cfg["shared_d_ff"]) if cfg.get("n_shared_experts") else None
        self.register_buffer("expert_bias", torch.zeros(E))

    def route(self, x):
        """(scores, the probabilities the aux loss averages, expert ids (T, k))."""
        cfg, (T, _) = self.cfg, x.shape
        E, k = cfg["n_experts"], cfg["top_k"]
        logits = self.router(x)
        if cfg.get("scoring") == "sigmoid":
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = logits.softmax(-1)
        choice = scores.detach() + self.expert_bias
        G = cfg.get("n_groups", 1)
        if G > 1:  # groups ranked by the sum of their top-2 scores; keep topk_groups
            top2 = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
            keep = top2.topk(cfg["topk_groups"], dim=-1).indices
            mask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask.repeat_interleave(E // G, dim=1), float("-inf"))
        return scores, probs, choice.topk(k, dim=-1).indices

    def forward(self, x):
        cfg, (T, _) = self.cfg, x.shape
        E, k = cfg["n_experts"], cfg["top_k"]
        scores, probs, ids = self.route(x)
        w = scores.gather(1, ids)
        if cfg.get("renormalize", True):
            w = w / w.sum(-1, keepdim=True)
        w = w * cfg.get("routed_scaling", 1.0)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        if self.shared is not None:
            y = y + self.shared(x)
        f = torch.bincount(ids.reshape(-1), minlength=E).to(x.dtype) / (T * k)
        return y, E * (f * probs.mean(0)).sum()


class Loop:
    name = "nn.Linear loop"
    has_aux = True

    def __init__(self, cfg, ours):
        self.module = LoopMoE(cfg)
        src = ours.module
        with torch.no_grad():
            self.module.router.weight.copy_(src.router_weight)
            for e, ex in enumerate(self.module.experts):
                ex.gate_proj.weight.copy_(src.w_gate[e])
                ex.up_proj.weight.copy_(src.w_up[e])
                ex.down_proj.weight.copy_(src.w_down[e])
            if self.module.shared is not None:
                self.module.shared.gate_proj.weight.copy_(src.shared_w_gate)
                self.module.shared.up_proj.weight.copy_(src.shared_w_up)
                self.module.shared.down_proj.weight.copy_(src.shared_w_down)
            if cfg.get("expert_bias"):
                self.module.expert_bias.copy_(src.expert_bias)
        self.module.to(DTYPE)

    def forward(self, x):
        return self.module(x)

    def expert_ids(self, x):
        return self.module.route(x)[2]

    def grads(self):
        return {"router_weight": self.module.router.weight.grad,
                "w_down": torch.stack([ex.down_proj.weight.grad
                                       if ex.down_proj.weight.grad is not None
                                       else torch.zeros_like(ex.down_proj.weight)
                                       for ex in self.module.experts])}  # (no rows: 0)


# ---- one training step, its check and its saved memory ---------------------------------

def step(impl, x, dy, aux_coef=AUX_COEF):
    """One forward + backward of sum(y * dy) + aux_coef * aux (aux where impl has one) from
    fresh gradients; returns y."""
    impl.module.zero_grad(set_to_none=True)
    x.grad = None
    y, aux = impl.forward(x)
    loss = (y * dy).sum()
    if aux is not None and aux_coef:
        loss = loss + aux_coef * aux
    loss.backward()
    return y.detach()


def check_against_ours(ours, other, cfg, tokens=64, tries=5, rtol=1e-4):
    """Stop unless `other` gives ours' y, x.grad and weight gradients (both with the aux loss
    when `other` has one).  Ours routes on float64 logits, torch on float32 ones: a token
    whose top-k differs by a rounding would fail the check, so x is redrawn until both pick
    the same experts for every token.  bfloat16: torch rounds every layer's output to bf16
    and routes on bf16 logits: 16 tokens, 40 draws, max-abs-normalised errors below 0.1."""
    coef = AUX_COEF if other.has_aux else 0.0
    gen = torch.Generator().manual_seed(1)
    if DTYPE == torch.bfloat16:
        tokens, tries, rtol = 16, 40, 0.1
    for _ in range(tries):
        x = torch.randn(tokens, cfg["d_model"], generator=gen).to(DTYPE).requires_grad_(True)
        dy = torch.randn(tokens, cfg["d_model"], generator=gen).to(DTYPE)
        with torch.no_grad():
            _, r = ours.module(x, return_routing=True)
            if np.array_equal(np.sort(r.expert_ids.numpy(), 1),
                              np.sort(other.expert_ids(x).numpy(), 1)):
                break
    else:
        raise SystemExit(f"{other.name}: routing differs from ours in {tries} draws")
    y = step(ours, x, dy, coef)
    want = {"y": y.float().numpy(), "x.grad": x.grad.float().numpy(),
            **{n: g.float().numpy().copy() for n, g in ours.grads().items()}}
    y = step(other, x, dy, coef)
    got = {"y": y.float().numpy(), "x.grad": x.grad.float().numpy(),
           **{n: g.float().numpy() for n, g in other.grads().items()}}
    for name, ref in want.items():
        check(f"{other.name} {name}", got[name], ref.astype(np.float64), rtol)


def _context_arrays(t):
    """The NumPy arrays of the moe.torch training context whose handle is t, else []."""
    if t.dim() != 0 or t.dtype != torch.int64:
        return []
    try:
        ctx = mt._context_of(t)
    except (RuntimeError, AttributeError):
        return []
    out, todo = [], [ctx.x, ctx.routing, ctx.saved]
    while todo:
        o = todo.pop()
        if isinstance(o, np.ndarray):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
    return out


def saved_bytes(impl, x):
    """Bytes a forward keeps for its backward: the unique storages autograd saves (through
    torch.autograd.graph.saved_tensors_hooks) plus, for ours, the arrays of the training
    context behind the handle it saves (x, the float64 router logits, the routing, the
    experts' and shared expert's outputs).  The parameters and buffers, which are there
    with or without a backward, are left out; x is counted (every implementation keeps it).
    Storages are counted whole, once, by address."""
    held = {t.untyped_storage().data_ptr()
            for t in list(impl.module.parameters()) + list(impl.module.buffers())}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        for arr in _context_arrays(t):
            base = arr.__array_interface__["data"][0]
            if base not in held:
                seen[base] = max(seen.get(base, 0), arr.nbytes)
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, aux = impl.forward(x)
    del y, aux  # frees the graph (and our context) without a backward
    return sum(seen.values())


# ---- main ---------------------------------------------------------------------------------

def row(name, cfg, impls, tokens, rounds, measure_peak=True, n_ours=1):
    """Time impls (our n_ours variants first) on `tokens` tokens in interleaved rounds;
    returns the table row (markdown) and the raw figures.  measure_peak: the FMA peak is
    measured at the start of every round too, and our (first variant's) % of it taken
    round by round (the machine is shared)."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg["d_model"], generator=gen).to(DTYPE).requires_grad_(True)
    dy = torch.randn(tokens, cfg["d_model"], generator=gen).to(DTYPE)
    mem = [saved_bytes(impl, x) for impl in impls]
    # torch's OpenMP threads spin-wait after a call and would take the cores from the next
    # implementation's call: a pause after each lets them sleep (README: oversubscription)
    settle = lambda: time.sleep(SETTLE)  # noqa: E731
    fns = [(lambda impl=impl: step(impl, x, dy), None, settle) for impl in impls]
    fma = []
    peak_now = (lambda: fma.append(fma_peak(THREADS, 0.2)[0])) if measure_peak else None
    times = interleaved(fns, min_rounds=rounds, max_rounds=rounds, warmup=1,
                        each_round=peak_now)
    ours, others = times[0], times[n_ours:]
    best = [min(ts) for ts in zip(*others)]  # the faster baseline, round by round
    flops = 3 * moe.SparseMoE(**cfg, init=False).flops(tokens)  # forward + 2x for backward
    gf = [flops / t / 1e9 for t in ours]
    ms = lambda t: "%.1f (%.1f-%.1f)" % tuple(v * 1e3 for v in spread(t))  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    peak = (f" ({100 * statistics.median(g / f for g, f in zip(gf, fma)):.0f}% of "
            f"{statistics.median(fma):.0f})" if fma else "")
    cells = [name, str(tokens), ms(ours), f"{statistics.median(gf):.0f}{peak}"]
    cells += [ms(t) for t in times[1:]]
    cells += [f"{per_round(best, t):.2f}x" for t in times[:n_ours]]
    cells += [mib(mem[0])] + [f"{mib(m)} ({m / mem[0]:.1f}x)" for m in mem[1:]]
    return "| " + " | ".join(cells) + " |", times, mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral-small", "qwen3-small",
                                                    "deepseek-small"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row")
    ap.add_argument("--quick", action="store_true", help="one round, 512 tokens only")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    if args.quick:
        args.rounds, args.tokens = 1, [512]

    torch.set_num_threads(THREADS)
    moe.set_num_threads(THREADS)
    with open(SHAPES) as f:
        shapes = json.load(f)["cpu"]
    import transformers

    info = moe._C.build_info()
    load0 = os.getloadavg()
    fma, fma_isa = fma_peak(THREADS)
    head = [
        f"Machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, cpu "
        f"features: {info['cpu_features']}",
        f"moe {info['version']}: kernels {info['isa']}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {THREADS} threads (torch and moe); "
        f"{args.dtype}" + (" (ours: compute_dtype='bfloat16')" if args.dtype == "bfloat16"
                           else ""),
        f"At the start: FMA peak {fma:.0f} GFLOP/s ({fma_isa}, {THREADS} threads), load "
        f"average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; {args.rounds} round(s)",
        "",
        "| shape | tokens | moe.torch ms | GFLOP/s (% peak) | moe.torch, hidden kept ms | "
        "transformers grouped_mm ms | nn.Linear loop ms | speed-up vs the faster | "
        "hidden kept: speed-up | moe.torch saved MiB | hidden kept: saved MiB | "
        "grouped_mm saved MiB | loop saved MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(head), flush=True)
    rows = []
    for name in args.shapes:
        cfg = {k: v for k, v in shapes[name].items() if k != "n_tokens"}
        ours = Ours(cfg)
        impls = [ours, OursKept(cfg), HFBlock(name.split("-")[0], cfg, ours),
                 Loop(cfg, ours)]
        for other in impls[2:]:
            check_against_ours(ours, other, cfg)
        for T in args.tokens:
            # (bf16: the FMA peak is not this step's ceiling, so none is taken)
            line, _, _ = row(name, cfg, impls, T, args.rounds, n_ours=2,
                             measure_peak=args.dtype == "float32")
            rows.append(line)
            print(line, flush=True)
        del impls, ours
    load1 = os.getloadavg()
    notes = [
        "",
        f"Load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}.",
        "A step: forward, loss = sum(y * dy) + 0.01 * aux_loss (transformers' DeepseekV3MoE "
        "has no auxiliary loss: sum(y * dy) there), backward to x and every weight, from "
        "fresh (None) gradients. 'Hidden kept': ours with recompute_hidden=False (the forward "
        "keeps the gate / up pre-activations; the same gradients). The four run in "
        "interleaved rounds (one step each per round, "
        "rotating order, a 0.15 s pause after each): medians (min-max) over rounds; the "
        "speed-up is the median over rounds of min(grouped_mm, loop) / ours. GFLOP/s: 3x the "
        "forward's multiply-adds x 2 (routed and shared experts, router) per step; % of the "
        "FMA peak measured at the start of each round (its median after 'of'). Saved "
        "MiB: what the forward keeps for the backward besides the weights, x included "
        "(torch: unique storages through saved_tensors_hooks; ours: its training context's "
        "arrays); in brackets, over ours. Each implementation matched ours (y, x.grad, "
        "router and w_down gradients) on 64 tokens before timing.",
    ]
    print("\n".join(notes))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(head + rows + notes) + "\n")
        print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
