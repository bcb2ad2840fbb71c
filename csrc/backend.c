/*
 * backend.c - the public entry points of csrc/moe.h.  This is the one place
 * that chooses a backend per op (today the CPU, always available; the CUDA
 * issue adds its switch here) and the place for checks that protect memory
 * whichever backend runs.
 */
#include "moe_impl.h"

moe_status
moe_router_logits(const moe_router_params *p)
{
    return moe_cpu_router_logits(p);
}

moe_status
moe_route_topk(const moe_route_params *p)
{
    const int32_t E = p->n_experts;

    if (E <= 0 || p->top_k < 1 || p->top_k > E) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "top_k must be in 1..n_experts=%d, got %d", E,
                             p->top_k);
    }
    if (p->n_groups < 1 || E % p->n_groups != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "n_groups must divide n_experts=%d, got %d", E,
                             p->n_groups);
    }
    if (p->topk_groups < 1 || p->topk_groups > p->n_groups ||
        (int64_t)p->topk_groups * (E / p->n_groups) < p->top_k) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "topk_groups must be in 1..n_groups=%d with "
                             "topk_groups * (n_experts / n_groups) >= top_k"
                             "=%d, got %d", p->n_groups, p->top_k,
                             p->topk_groups);
    }
    if (p->n_tokens < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "n_tokens < 0");
    }
    return moe_cpu_route_topk(p);
}

moe_status
moe_dispatch_count(const moe_dispatch_params *p)
{
    return moe_cpu_dispatch_count(p);
}

moe_status
moe_dispatch_build(const moe_dispatch_params *p)
{
    return moe_cpu_dispatch_build(p);
}

moe_status
moe_dispatch_gather(const moe_gather_params *p)
{
    return moe_cpu_dispatch_gather(p);
}

moe_status
moe_combine(const moe_combine_params *p)
{
    return moe_cpu_combine(p);
}

moe_status
moe_ffn_grouped(const moe_ffn_params *p)
{
    int32_t e;

    /* Offsets decide which memory is read and written: check them here. */
    if (p->offsets[0] != 0 || p->offsets[p->n_experts] != p->n_rows) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "offsets must start at 0 and end at n_rows=%lld",
                             (long long)p->n_rows);
    }
    for (e = 0; e < p->n_experts; e++) {
        if (p->offsets[e + 1] < p->offsets[e]) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "offsets must be non-decreasing, got "
                                 "offsets[%d]=%lld > offsets[%d]=%lld", e,
                                 (long long)p->offsets[e], e + 1,
                                 (long long)p->offsets[e + 1]);
        }
    }
    if (moe_activation_is_gated(p->activation) && p->w_gate == NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "w_gate is required by a gated activation");
    }
    return moe_cpu_ffn_grouped(p);
}
