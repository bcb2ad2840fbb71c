"""Golden outputs: every layer class, router and staged op on fixed seeds, bit for bit.

    python benchmarks/golden_outputs.py save OUT.npz      # run every case, save all outputs
    python benchmarks/golden_outputs.py compare OUT.npz   # rerun, compare bit for bit

A refactor of the C core's plumbing must leave every output bitwise identical: save on the
old build, compare on the new one (exit status 1 on any difference or missing key).  Keys
are "<case>/threads=<n>/<field>", a case named by its class or op and the options it sets
(e.g. "SparseMoE/router=top_p/top_k=4/threads=1/out"); routing results are saved field by
field.  Every case runs at 1 and 2 threads, on the native kernels and again, in child
processes, with MOE_ISA forcing each other kernel set (keys "MOE_ISA=<isa>/<case>/...").
Zero-initialised parameters (biases, LoRA B) are replaced by seeded random values so their
code paths change the outputs.  Small sizes: the whole run takes seconds.  Golden files are
specific to the machine's CPU (its native kernels).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

import moe
from moe.peer import PEER_ACTIVATIONS

THREADS = (1, 2)
# kernels also run, in child processes, with MOE_ISA set to each of these (native first)
ISAS = ("avx512", "avx2", "avx512sim", "scalar")
# tokens, d_model, d_ff, experts: not multiples of the kernels' tiles (even: bf16 compute)
T, D, F, E = 37, 36, 50, 8
HETERO = (50, 32, 18, 0, 50, 6, 40, 26)  # heterogeneous d_ff (even: bf16 compute takes it)
MASK = (1, 1, 0, 1, 1, 0, 1, 1)  # expert_mask
# zero-initialised parameters that get random values
RANDOMIZED = ("router_bias", "expert_bias", "b_gate", "b_up", "b_down", "lora_b_gate",
              "lora_b_up", "lora_b_down", "lora_b", "base_bias", "rank_bias")


def rng(name):
    """A generator seeded by the case's name: stable whatever the order of the cases."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def data(shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def randomize(layer, name):
    r = rng(name)
    for attr in RANDOMIZED:
        v = getattr(layer, attr, None)
        if isinstance(v, np.ndarray):
            setattr(layer, attr, (0.1 * r.standard_normal(v.shape)).astype(v.dtype))
    return layer


def fmt(v):
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return v.__name__ if isinstance(v, type) else str(v)


def label(head, kw):
    return "/".join([head] + [f"{k}={fmt(v)}" for k, v in kw.items()]) if kw else head + "/default"


def masks(kind, n_tokens, n_experts, k, r):
    """(allowed, groups) for moe.route / SparseMoE: a per-token mask or a group table."""
    if kind == "per-token":
        allowed = r.random((n_tokens, n_experts)) < 0.6
        allowed[:, :k] = True  # at least k per token
        return allowed, None
    table = r.random((3, n_experts)) < 0.5
    table[:, -k:] = True
    return table, r.integers(0, 3, n_tokens)


# ---- SparseMoE ---------------------------------------------------------------------------
# constructor options, plus n_tokens / expert_mask / allowed (the call's selection mask)
SPARSE = [
    {},
    *({"activation": a} for a in moe.ACTIVATIONS if a != "swiglu"),
    {"activation": "swiglu-oai", "swiglu_alpha": 1.5, "swiglu_limit": 0.5},
    {"scoring": "softmax-after-topk"},
    {"scoring": "sigmoid"},
    {"scoring": "sigmoid", "renormalize": False},
    {"renormalize": False, "top_k": 3},
    {"routed_scaling": 2.5},
    {"dtype": "bfloat16"},
    {"dtype": "float16"},
    {"dtype": "bfloat16", "activation": "gelu"},
    {"dtype": "float16", "activation": "geglu-tanh"},
    {"dtype": "bfloat16", "compute_dtype": "bfloat16"},
    {"dtype": "bfloat16", "compute_dtype": "bfloat16", "activation": "relu",
     "n_shared_experts": 1},
    {"capacity_factor": 1.0},
    {"capacity_factor": 0.5},
    {"capacity_factor": 0.5, "scoring": "sigmoid", "top_k": 3},
    {"n_groups": 4, "topk_groups": 2},
    {"n_groups": 4, "topk_groups": 2, "scoring": "sigmoid", "expert_bias": True,
     "routed_scaling": 2.5, "n_shared_experts": 1},  # DeepSeek-V3
    {"expert_bias": True},
    {"expert_bias": True, "capacity_factor": 0.75, "scoring": "softmax-after-topk"},
    {"n_shared_experts": 1},
    {"n_shared_experts": 2, "shared_d_ff": 24, "shared_expert_gate": True},  # Qwen2-MoE
    {"n_shared_experts": 1, "shared_expert_gate": True, "dtype": "float16",
     "activation": "silu"},
    {"router_bias": True},
    {"expert_biases": True},
    {"scoring": "softmax-after-topk", "activation": "swiglu-oai", "router_bias": True,
     "expert_biases": True},  # gpt-oss
    {"null_experts": ("zero",)},
    {"null_experts": ("zero", "copy", "constant"), "top_k": 3},
    {"null_experts": ("copy", "constant"), "capacity_factor": 0.75, "expert_bias": True},
    {"skip_threshold": 0.3},
    {"skip_threshold": 0.3, "skip_renormalize": True, "top_k": 3},
    {"d_ff": HETERO},
    {"d_ff": HETERO, "dtype": "bfloat16", "compute_dtype": "bfloat16"},
    {"d_ff": HETERO, "dtype": "float16", "activation": "gelu-tanh", "capacity_factor": 1.0},
    {"lora_rank": 4},
    {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("w_up",), "activation": "gelu"},
    {"lora_rank": 3, "lora_targets": ("w_gate", "w_down"), "dtype": "bfloat16"},
    {"expert_mask": MASK},
    {"expert_mask": MASK, "capacity_factor": 1.0, "scoring": "sigmoid"},
    {"allowed": "per-token"},
    {"allowed": "groups", "expert_mask": MASK},
    {"router": "expert_choice"},
    {"router": "expert_choice", "scoring": "sigmoid", "capacity_factor": 2.0},
    {"router": "expert_choice", "capacity_factor": 0.25, "n_shared_experts": 1},
    {"router": "top_p", "top_k": 4},
    {"router": "top_p", "top_k": 4, "router_p": 0.9, "k_min": 2, "renormalize": False},
    {"router": "top_p", "top_k": 4, "scoring": "sigmoid", "routed_scaling": 2.0,
     "skip_threshold": 0.2},
    {"router": "threshold", "top_k": 4, "router_threshold": 0.1},
    {"router": "threshold", "top_k": 4, "router_threshold": 0.2, "k_min": 2,
     "renormalize": False, "null_experts": ("zero", "copy")},
    {"router": "threshold", "top_k": 3, "router_bias": True, "n_shared_experts": 1,
     "skip_threshold": 0.25, "skip_renormalize": True},
    # larger, so that two threads split the work
    {"n_tokens": 300, "d_model": 80, "d_ff": 136, "n_experts": 16, "top_k": 4},
    {"n_tokens": 300, "d_model": 80, "d_ff": 136, "n_experts": 16, "top_k": 4,
     "dtype": "bfloat16", "compute_dtype": "bfloat16", "n_shared_experts": 1},
]


def sparse_layer(name, opts):
    kw = dict(d_model=D, d_ff=F, n_experts=E, top_k=2, seed=0)
    kw.update({k: v for k, v in opts.items() if k not in ("n_tokens", "expert_mask", "allowed")})
    layer = randomize(moe.SparseMoE(**kw), name)
    if "expert_mask" in opts:
        layer.expert_mask = np.array(opts["expert_mask"], bool)
    return layer


def sparse_case(name, opts):
    layer = sparse_layer(name, opts)
    n = opts.get("n_tokens", T)
    call = {}
    if "allowed" in opts:
        call["allowed"], call["groups"] = masks(opts["allowed"], n, layer.n_router,
                                                layer.top_k, rng(name))
    out, routing = layer(data((n, layer.d_model), 1), return_routing=True, **call)
    return {"out": out, "routing": routing}


def routing_stats_case(name, opts):
    layer = sparse_layer(name, opts)
    stats = moe.routing_stats(layer, data((T, D), 1))
    return {"load": stats.load, "output_norm": stats.output_norm}


def prune_case(name, opts):
    layer, remap = moe.prune_experts(sparse_layer(name, opts), [0, 2, 3, 5, 7])
    out, routing = layer(data((T, D), 1), return_routing=True)
    return {"remap": remap, "out": out, "routing": routing}


# ---- SoftMoE, MixtureOfTokens, PEER, MultiHeadMoE ------------------------------------------

SOFT = [  # (class, x shape, options)
    (moe.SoftMoE, (3, 11, D), {}),
    (moe.SoftMoE, (11, D), {}),
    (moe.SoftMoE, (3, 11, D), {"slots_per_expert": 2, "activation": "gelu"}),
    (moe.SoftMoE, (3, 11, D), {"normalize": True, "scale": 2.0, "activation": "swiglu-oai",
                               "swiglu_alpha": 1.5, "swiglu_limit": 1.0}),
    (moe.SoftMoE, (3, 11, D), {"dtype": "bfloat16"}),
    (moe.SoftMoE, (3, 11, D), {"dtype": "float16", "activation": "relu"}),
    (moe.MixtureOfTokens, (4, 5, D), {}),
    (moe.MixtureOfTokens, (4, D), {}),
    (moe.MixtureOfTokens, (4, 5, D), {"group_size": 2, "temperature": 0.5}),
    (moe.MixtureOfTokens, (4, 5, D), {"mixing": False, "activation": "geglu"}),
    (moe.MixtureOfTokens, (4, 5, D), {"slots_per_expert": 2, "normalize": True,
                                      "dtype": "bfloat16"}),
]


def soft_case(name, cls, shape, opts):
    layer = cls(D, 24, 4, seed=0, **opts)
    out, dispatch, combine = layer(data(shape, 2), return_weights=True)
    return {"out": out, "dispatch": dispatch, "combine": combine}


PEERS = [{}, *({"activation": a} for a in PEER_ACTIVATIONS if a != "relu"),
         {"per_head_keys": False, "d_out": 24, "d_key": 8},
         {"n_sub_keys": 16, "n_heads": 2, "top_k": 8, "activation": "gelu"}]


def peer_case(name, opts):
    kw = dict(d_model=D, n_sub_keys=8, n_heads=4, top_k=4, seed=0)
    out, routing = moe.PEER(**{**kw, **opts})(data((T, D), 3), return_routing=True)
    return {"out": out, "routing": routing}


MULTIHEAD = [{}, {"dtype": "bfloat16", "scoring": "sigmoid", "n_shared_experts": 1},
             {"dtype": "float16", "router": "top_p", "top_k": 3, "capacity_factor": 1.0}]


def multihead_case(name, opts):
    kw = dict(d_model=D, n_heads=4, d_ff=16, n_experts=8, top_k=2, seed=0)
    layer = moe.MultiHeadMoE(**{**kw, **opts})
    randomize(layer.moe, name)
    out, routing = layer(data((T, D), 4), return_routing=True)
    return {"out": out, "routing": routing}


# ---- LoRA layers ---------------------------------------------------------------------------
# (class, constructor options, call options); d_in = D, d_out = 24.  Call options: x (the
# input shape), seq_lens, scalings / adapter_ids ("random" or a value), calls (repeat the
# call: the every-forward bias update changes the second), set_adapter (a smaller adapter)
LORA = [
    (moe.TopKLoRA, {"n_experts": 4, "rank": 4}, {}),
    (moe.TopKLoRA, {"n_experts": 4, "rank": 4, "top_k": 1, "scoring": "sigmoid",
                    "renormalize": False, "bias": True, "alpha": 8.0}, {}),
    (moe.TopKLoRA, {"n_experts": 4, "rank": 4, "scoring": "softmax-after-topk",
                    "per_sequence": True, "dtype": "bfloat16"}, {"seq_lens": (10, 20, 7)}),
    (moe.SoftLoRA, {"n_experts": 4, "rank": 4}, {}),
    (moe.SoftLoRA, {"n_experts": 4, "rank": 4, "top_k": 2, "dtype": "float16"}, {}),
    (moe.HydraLoRA, {"n_experts": 4, "rank": 4}, {}),
    (moe.HydraLoRA, {"n_experts": 4, "rank": 4, "top_k": 1, "bias": True}, {}),
    (moe.HydraLoRA, {"n_experts": 3, "rank": 4, "top_k": 2, "per_sequence": True},
     {"x": (3, 9, D)}),
    (moe.GatedLoRA, {"n_experts": 4, "rank": 4}, {"scalings": "random"}),
    (moe.GatedLoRA, {"n_experts": 4, "rank": 4, "top_k": 2, "softmax_topk": True,
                     "dtype": "bfloat16"}, {"scalings": "random"}),
    (moe.FlyLoRA, {"rank": 8, "top_k": 2}, {}),
    (moe.FlyLoRA, {"rank": 8, "top_k": 3, "signed": True, "density": 0.5, "bias_rate": 0.01,
                   "update_bias": "every-forward", "bias": True}, {"calls": 2}),
    (moe.SMoRA, {"rank": 8, "top_k": 3}, {}),
    (moe.SMoRA, {"rank": 8, "top_k": 4, "rank_partition": 2, "tile": True, "bias": True,
                 "dtype": "float16"}, {}),
    (moe.MultiLoRA, {"n_adapters": 3, "rank": 4}, {"adapter_ids": "random",
                                                  "set_adapter": True}),
    (moe.MultiLoRA, {"n_adapters": 3, "rank": 4, "dtype": "bfloat16"}, {"adapter_ids": 1}),
]


def lora_case(name, cls, opts, call):
    d_in, d_out = D, 24
    layer = randomize(cls(d_in, d_out, seed=0, **opts), name)
    r = rng(name + "/call")
    if call.get("set_adapter"):
        layer.set_adapter(1, data((2, d_in), 5), data((d_out, 2), 6), alpha=3.0)
    x = data(call.get("x", (T, d_in)), 7)
    args, kw = [x], {}
    if "seq_lens" in call:
        kw["seq_lens"] = np.array(call["seq_lens"])
    if "scalings" in call:
        args.append(r.standard_normal(x.shape[:-1] + (layer.n_experts,)).astype(np.float32))
    if "adapter_ids" in call:
        ids = call["adapter_ids"]
        args.append(r.integers(-1, layer.n_adapters, x.shape[:-1]) if ids == "random" else ids)
    res = {"base": layer.base_forward(x)}
    for i in range(call.get("calls", 1)):
        out, routing = layer(*args, return_routing=True, **kw)
        res.update({f"call{i}/out": out, f"call{i}/routing": routing})
    if getattr(layer, "rank_bias", None) is not None:
        res["rank_bias"] = layer.rank_bias
    return res


# ---- staged ops ----------------------------------------------------------------------------

LOGITS = data((T, E), 8)
ROUTE = [{}, {"scoring": "softmax-after-topk"}, {"scoring": "sigmoid"},
         {"scoring": "sigmoid", "renormalize": False, "routed_scaling": 2.5},
         {"renormalize": False, "top_k": 3}, {"top_k": E}, {"expert_bias": True},
         {"n_groups": 4, "topk_groups": 2},
         {"n_groups": 4, "topk_groups": 2, "scoring": "sigmoid", "expert_bias": True},
         {"capacity_factor": 1.0}, {"capacity_factor": 0.5, "scoring": "softmax-after-topk"},
         {"allowed": "per-token"}, {"allowed": "groups", "top_k": 3},
         {"logits": "ties"}, {"logits": "ties", "scoring": "sigmoid", "n_groups": 2,
                              "topk_groups": 1}]


def route_case(name, opts):
    kw = {"top_k": 2, **opts}
    logits = np.round(LOGITS, 1) if kw.pop("logits", None) == "ties" else LOGITS
    if kw.get("expert_bias"):
        kw["expert_bias"] = 0.1 * rng(name).standard_normal(E).astype(np.float32)
    if "allowed" in kw:
        kw["allowed"], kw["groups"] = masks(kw["allowed"], T, E, kw["top_k"], rng(name))
    return {"routing": moe.route(logits, **kw)}


def experts(activation, dtype="float32", d_ff=F, seed=9):
    """(w_gate or None, w_up, w_down) for moe.expert_ffn / pack_experts, nn.Linear layout."""
    w = [data((E, d_ff, D), seed, D ** -0.5), data((E, d_ff, D), seed + 1, D ** -0.5),
         data((E, D, d_ff), seed + 2, d_ff ** -0.5)]
    if not activation.startswith(("swiglu", "geglu")):  # not gated
        w[0] = None
    if dtype == "float16":
        w = [None if a is None else a.astype(np.float16) for a in w]
    elif dtype == "bfloat16":
        w = [None if a is None else moe.float32_to_bfloat16(a) for a in w]
    return w


# how the staged pipeline routes (moe.route options, or another router)
PIPE_ROUTES = {
    "top_k": lambda: moe.route(LOGITS, 2),
    "top_k/capacity_factor=0.5": lambda: moe.route(LOGITS, 2, capacity_factor=0.5),
    "expert_choice": lambda: moe.route_expert_choice(LOGITS, 1.5),
    "top_p": lambda: moe.route_top_p(LOGITS, 0.7, k_max=4),
}


def pipeline_case(name, route):
    """route -> dispatch -> expert_ffn -> combine, every intermediate saved."""
    r = PIPE_ROUTES[route]()
    d = moe.dispatch(data((T, D), 10), r.expert_ids, E)
    y = moe.expert_ffn(d.x_sorted, d.offsets, *experts("swiglu"))
    return {"dispatch": d, "y_sorted": y, "out": moe.combine(y, d.position, r.weights)}


FFNS = [*({"activation": a} for a in moe.ACTIVATIONS),
        {"activation": "swiglu-oai", "swiglu_alpha": 1.5, "swiglu_limit": 0.5},
        {"dtype": "bfloat16"}, {"dtype": "float16", "activation": "gelu"},
        {"packed": True}, {"packed": True, "dtype": "bfloat16", "compute_dtype": "bfloat16"},
        {"packed": True, "biases": True, "activation": "swiglu-oai"},
        {"packed": True, "biases": True, "activation": "relu", "dtype": "float16"}]


def expert_ffn_case(name, opts):
    kw = dict(opts)
    act, dtype = kw.pop("activation", "swiglu"), kw.pop("dtype", "float32")
    d = moe.dispatch(data((T, D), 10), moe.route(LOGITS, 2).expert_ids, E)
    w = experts(act, dtype)
    if kw.pop("packed", False):
        if kw.pop("biases", False):
            r = rng(name)
            kw.update(b_up=r.standard_normal((E, F)).astype(np.float32),
                      b_down=r.standard_normal((E, D)).astype(np.float32))
            if w[0] is not None:
                kw["b_gate"] = r.standard_normal((E, F)).astype(np.float32)
        w = [moe.pack_experts(*w, activation=act, dtype=dtype, **kw), None, None]
        kw = {}
    else:
        kw["dtype"] = dtype
    return {"y_sorted": moe.expert_ffn(d.x_sorted, d.offsets, *w, activation=act, **kw)}


DENSE = [{}, {"activation": "relu"}, {"activation": "geglu", "dtype": "bfloat16"},
         {"activation": "silu", "dtype": "float16"}]


def dense_ffn_case(name, opts):
    act, dtype = opts.get("activation", "swiglu"), opts.get("dtype", "float32")
    w = [None if a is None else a[0] for a in experts(act, dtype, seed=11)]
    return {"out": moe.ffn(data((T, D), 12), *w, activation=act, dtype=dtype)}


def update_bias_case(name, dtype):
    bias = (0.1 * rng(name).standard_normal(E)).astype(dtype)
    counts = moe.route(LOGITS, 2).counts
    for rate in (1e-3, 0.5):
        moe.update_expert_bias(bias, counts, rate)
    return {"bias": bias}


OTHER_ROUTERS = {
    "route_expert_choice/default": lambda: moe.route_expert_choice(LOGITS),
    "route_expert_choice/capacity_factor=0.5/scoring=sigmoid":
        lambda: moe.route_expert_choice(LOGITS, 0.5, scoring="sigmoid"),
    "route_expert_choice/capacity=40": lambda: moe.route_expert_choice(LOGITS, capacity=40),
    "route_expert_choice/logits=ties":
        lambda: moe.route_expert_choice(np.round(LOGITS, 1), 2.0),
    "route_top_p/p=0.5": lambda: moe.route_top_p(LOGITS, 0.5),
    "route_top_p/p=0.9/k_min=2/k_max=4/renormalize=False":
        lambda: moe.route_top_p(LOGITS, 0.9, k_min=2, k_max=4, renormalize=False),
    "route_top_p/p=1.0/logits=ties": lambda: moe.route_top_p(np.round(LOGITS, 1), 1.0, k_max=5),
    "route_threshold/threshold=0.1": lambda: moe.route_threshold(LOGITS, 0.1),
    "route_threshold/threshold=0.3/k_min=2/k_max=3/renormalize=False":
        lambda: moe.route_threshold(LOGITS, 0.3, k_min=2, k_max=3, renormalize=False),
    "skip_experts/threshold=0.3": lambda: moe.skip_experts(
        *moe.route(LOGITS, 3)[:2], 0.3),
    "skip_experts/threshold=0.2/renormalize=True/capacity_factor=0.5": lambda: moe.skip_experts(
        *moe.route(LOGITS, 3, capacity_factor=0.5)[:2], 0.2, renormalize=True),
    "sparse_projection/rank=8/d_in=36/density=0.25":
        lambda: moe.sparse_projection(8, 36, 0.25, seed=3),
    "bfloat16_conversion": lambda: bf16_round_trip([0.0, -0.0, 1.0, 1.00390625, 1.01171875,
                                                    3.4e38, -np.inf, np.inf, 1e-40, np.pi]),
}


def bf16_round_trip(values):
    bits = moe.float32_to_bfloat16(np.array(values, np.float32))
    return {"bits": bits, "back": moe.bfloat16_to_float32(bits)}


# ---- the table -----------------------------------------------------------------------------

def cases():
    """[(name, thunk returning {field: array | scalar | NamedTuple | dict})]."""
    out = [(label("SparseMoE", o), lambda n, o=o: sparse_case(n, o)) for o in SPARSE]
    for o in ({}, {"null_experts": ("copy", "constant"), "n_shared_experts": 1, "top_k": 3},
              {"d_ff": HETERO, "capacity_factor": 0.5}):
        out.append((label("routing_stats", o), lambda n, o=o: routing_stats_case(n, o)))
    for o in ({"lora_rank": 2, "expert_biases": True, "activation": "swiglu-oai"},
              {"null_experts": ("copy",), "expert_bias": True, "scoring": "sigmoid"}):
        out.append((label("prune_experts", o), lambda n, o=o: prune_case(n, o)))
    out += [(label(f"{c.__name__}/x={'x'.join(map(str, s))}", o),
             lambda n, c=c, s=s, o=o: soft_case(n, c, s, o)) for c, s, o in SOFT]
    out += [(label("PEER", o), lambda n, o=o: peer_case(n, o)) for o in PEERS]
    out += [(label("MultiHeadMoE", o), lambda n, o=o: multihead_case(n, o)) for o in MULTIHEAD]
    out += [(label(c.__name__, {**o, **{k: v for k, v in call.items() if k != "x"}}),
             lambda n, c=c, o=o, call=call: lora_case(n, c, o, call)) for c, o, call in LORA]
    out += [(label("route", o), lambda n, o=o: route_case(n, o)) for o in ROUTE]
    out += [(f"pipeline/{r}", lambda n, r=r: pipeline_case(n, r)) for r in PIPE_ROUTES]
    out += [(label("expert_ffn", o), lambda n, o=o: expert_ffn_case(n, o)) for o in FFNS]
    out += [(label("ffn", o), lambda n, o=o: dense_ffn_case(n, o)) for o in DENSE]
    out += [(f"update_expert_bias/dtype={t}", lambda n, t=t: update_bias_case(n, t))
            for t in ("float32", "float64")]
    out += [(n, lambda n, f=f: {"result": f()}) for n, f in OTHER_ROUTERS.items()]
    names = [n for n, _ in out]
    assert len(set(names)) == len(names), "duplicate case names"
    return out


def flatten(prefix, value, into):
    """Arrays by key: NamedTuples and dicts field by field, scalars as 0-d arrays."""
    if hasattr(value, "_asdict"):
        value = value._asdict()
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, into)
    elif value is not None:
        into[prefix] = np.asarray(value)
    return into


def run_all():
    arrays, before = {}, moe.get_num_threads()
    table = cases()
    try:
        for name, thunk in table:
            for t in THREADS:
                moe.set_num_threads(t)
                flatten(f"{name}/threads={t}", thunk(name), arrays)
    finally:
        moe.set_num_threads(before)
    return len(table), arrays


def first_difference(a, b):
    """(max |a - b|, first differing index) of two same-shape arrays, bitwise."""
    bits = lambda x: x.view(f"u{x.itemsize}") if x.dtype.kind in "fc" else x  # noqa: E731
    idx = tuple(int(i) for i in np.argwhere(bits(a) != bits(b))[0]) if a.ndim else ()
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) if a.dtype.kind in "biuf" \
            else np.array(np.nan)
    return float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan"), idx


def compare(golden, fresh):
    """Print the differences; returns how many keys differ or are missing."""
    bad = 0
    for key in sorted(golden.keys() & fresh.keys()):
        a, b = golden[key], fresh[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            print(f"DIFF  {key}: {a.dtype}{list(a.shape)} saved, {b.dtype}{list(b.shape)} now")
        elif a.tobytes() != b.tobytes():
            diff, idx = first_difference(a, b)
            print(f"DIFF  {key}: max abs diff {diff:.3g}, first at {idx} "
                  f"(saved {a[idx]!r}, now {b[idx]!r})")
        else:
            continue
        bad += 1
    for side, keys in (("saved file", fresh.keys() - golden.keys()),
                       ("this run", golden.keys() - fresh.keys())):
        for key in sorted(keys):
            print(f"MISSING in {side}: {key}")
            bad += 1
    return bad


def run_isa(isa):
    """run_all() in a child process with MOE_ISA=isa (the kernels are chosen once per
    process), on this process's moe; returns (actual isa, arrays keyed "MOE_ISA=<isa>/...")."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "child.npz")
        env = dict(os.environ, MOE_ISA=isa, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(moe.__file__)), os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, os.path.abspath(__file__), "_child", path], env=env,
                       check=True)
        with np.load(path) as f:
            return str(f["_isa"]), {f"MOE_ISA={isa}/{k}": f[k] for k in f.files if k != "_isa"}


def main(argv):
    if len(argv) != 3 or argv[1] not in ("save", "compare", "_child"):
        print(__doc__)
        return 2
    mode, path = argv[1], argv[2]
    if mode == "_child":
        np.savez(path, _isa=moe._C.build_info()["isa"], **run_all()[1])
        return 0
    start = time.perf_counter()
    n_cases, arrays = run_all()
    isas = [moe._C.build_info()["isa"]]
    for isa in ISAS:
        got, more = run_isa(isa)
        isas.append(f"{isa}->{got}")
        arrays.update(more)
    seconds = time.perf_counter() - start
    print(f"moe: {moe.__file__}\nkernels: {', '.join(isas)}; threads {THREADS}\n"
          f"{n_cases} cases x {1 + len(ISAS)} ISAs, {len(arrays)} arrays in {seconds:.1f} s")
    if mode == "save":
        np.savez_compressed(path, **arrays)
        print(f"saved {path}")
        return 0
    with np.load(path) as f:
        golden = {k: f[k] for k in f.files}
    bad = compare(golden, arrays)
    common = len(golden.keys() & arrays.keys())
    print(f"compared {common} arrays of {n_cases} cases x {1 + len(ISAS)} ISAs against {path}: "
          + ("all bitwise identical" if not bad else f"{bad} differ or are missing"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
