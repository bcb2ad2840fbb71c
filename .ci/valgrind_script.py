"""The workload .ci/valgrind.sh runs under memcheck: each public op on small inputs,
with the thread pool, on the success and the error paths."""
import io

import numpy as np

import moe

rng = np.random.default_rng(0)
moe.set_num_threads(2)
for dtype in ("float32", "bfloat16"):
    layer = moe.SparseMoE(24, 20, 8, 2, scoring="sigmoid", expert_bias=True, n_groups=4,
                          topk_groups=2, n_shared_experts=1, shared_expert_gate=True,
                          dtype=dtype)
    x = rng.standard_normal((13, 24)).astype(np.float32)
    y, r = layer(x, return_routing=True)
    moe.update_expert_bias(layer.expert_bias, r.counts, 1e-3)
    capped = moe.SparseMoE(24, 20, 8, 2, capacity_factor=0.5, activation="gelu")
    capped(x)
logits = rng.standard_normal((13, 6))
r = moe.route(logits, 2, scoring="softmax-after-topk")
d = moe.dispatch(x, r.expert_ids, 6)
w = rng.standard_normal((6, 5, 24)).astype(np.float32)
h = moe.expert_ffn(d.x_sorted, d.offsets, w, w, rng.standard_normal((6, 24, 5)).astype(np.float32))
moe.combine(h, d.position, r.weights)
for bad in (lambda: moe.route(np.full((2, 3), np.nan), 1),
            lambda: moe.route(logits, 0),
            lambda: moe.dispatch(x, np.full((13, 2), 9), 4),
            lambda: moe.combine(h, np.full((13, 2), 99), r.weights),
            lambda: moe.expert_ffn(d.x_sorted, [0, 1], w, w, w),
            lambda: layer(np.ones((2, 5), np.float32))):
    try:
        bad()
    except (ValueError, TypeError):
        pass
# the CUDA loader: dlopen of moe/_moe_cuda.so and a device query (none here)
moe.show_config(file=io.StringIO())
assert isinstance(moe.cuda_available(), bool)
print("valgrind workload done")
