/*
 * ops/backend.c - the public entry points of csrc/moe.h.  This is the one place
 * that chooses a backend per op (today the CPU, always available; the CUDA
 * issue adds its switch here) and the place for checks that protect memory
 * whichever backend runs.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <math.h>

/* Ops with only a CPU implementation so far: the entry point forwards. */
#define MOE_CPU_ONLY(op, params_t)                                          \
    moe_status moe_##op(const params_t *p) { return moe_cpu_##op(p); }

MOE_CPU_ONLY(router_logits, moe_router_params)
MOE_CPU_ONLY(dispatch_count, moe_dispatch_params)
MOE_CPU_ONLY(dispatch_build, moe_dispatch_params)
MOE_CPU_ONLY(dispatch_gather, moe_gather_params)
MOE_CPU_ONLY(combine, moe_combine_params)
MOE_CPU_ONLY(combine_backward, moe_combine_backward_params)
MOE_CPU_ONLY(dispatch_backward, moe_dispatch_backward_params)
MOE_CPU_ONLY(router_backward, moe_router_backward_params)
MOE_CPU_ONLY(linear_backward, moe_linear_backward_params)

moe_status
moe_route_topk(const moe_route_params *p)
{
    const moe_route_options *o = &p->opt;
    const int32_t E = p->n_experts;

    if (E <= 0 || o->top_k < 1 || o->top_k > E) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "top_k must be in 1..n_experts=%d, got %d", E,
                             o->top_k);
    }
    if (o->n_groups < 1 || E % o->n_groups != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "n_groups must divide n_experts=%d, got %d", E,
                             o->n_groups);
    }
    if (o->topk_groups < 1 || o->topk_groups > o->n_groups ||
        (int64_t)o->topk_groups * (E / o->n_groups) < o->top_k) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "topk_groups must be in 1..n_groups=%d with "
                             "topk_groups * (n_experts / n_groups) >= top_k"
                             "=%d, got %d", o->n_groups, o->top_k,
                             o->topk_groups);
    }
    if (p->n_tokens < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "n_tokens < 0");
    }
    if (o->allowed != NULL) {
        int64_t t;
        int32_t e, n;
        if (o->n_groups != 1) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "allowed needs n_groups == 1, got %d",
                                 o->n_groups);
        }
        /* Top-k must find k selectable experts in every row. */
        for (t = 0; t < p->n_tokens; t++) {
            int64_t row = t;
            if (o->mask_rows != NULL) {
                row = o->mask_rows[t];
                if (row < 0 || row >= o->n_mask_rows) {
                    return moe_set_error(MOE_STATUS_INVALID_ARG,
                                         "groups must be in [0, %lld), got "
                                         "%lld at token %lld",
                                         (long long)o->n_mask_rows,
                                         (long long)row, (long long)t);
                }
            }
            for (e = 0, n = 0; e < E; e++) {
                n += o->allowed[row * E + e] != 0;
            }
            if (n < o->top_k) {
                return moe_set_error(MOE_STATUS_INVALID_ARG,
                                     "allowed lets token %lld%s choose %d "
                                     "expert(s), fewer than top_k=%d",
                                     (long long)t, o->mask_rows
                                         ? " (through its group)" : "",
                                     n, o->top_k);
            }
        }
    }
    return moe_cpu_route_topk(p);
}

moe_status
moe_route_expert_choice(const moe_expert_choice_params *p)
{
    if (p->n_experts <= 0 || p->n_tokens < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "expert choice needs n_experts >= 1 and "
                             "n_tokens >= 0, got %d and %lld", p->n_experts,
                             (long long)p->n_tokens);
    }
    if (p->capacity < 0 || p->capacity > p->n_tokens) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "capacity must be in 0..n_tokens=%lld, got %lld",
                             (long long)p->n_tokens, (long long)p->capacity);
    }
    if (p->scoring != MOE_SCORING_SOFTMAX && p->scoring != MOE_SCORING_SIGMOID) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "expert choice scoring must be softmax or "
                             "sigmoid, got code %d", (int)p->scoring);
    }
    return moe_cpu_route_expert_choice(p);
}

moe_status
moe_expert_choice_by_token(const moe_ec_tokens_params *p)
{
    int64_t j;

    if (p->n_experts <= 0 || p->n_tokens < 0 || p->capacity < 0 ||
        p->capacity > p->n_tokens || p->width < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "bad expert-choice sizes: n_experts=%d, "
                             "n_tokens=%lld, capacity=%lld, width=%lld",
                             p->n_experts, (long long)p->n_tokens,
                             (long long)p->capacity, (long long)p->width);
    }
    /* The token ids index the outputs: check them whichever backend runs. */
    for (j = 0; j < (int64_t)p->n_experts * p->capacity; j++) {
        if (p->token_ids[j] < 0 || p->token_ids[j] >= p->n_tokens) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "token_ids must be in [0, n_tokens=%lld), "
                                 "got %lld", (long long)p->n_tokens,
                                 (long long)p->token_ids[j]);
        }
    }
    return moe_cpu_expert_choice_by_token(p);
}

moe_status
moe_route_dynamic(const moe_route_dynamic_params *p)
{
    const int32_t E = p->n_experts;

    if (E <= 0 || p->n_tokens < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "dynamic-k routing needs n_experts >= 1 and "
                             "n_tokens >= 0, got %d and %lld", E,
                             (long long)p->n_tokens);
    }
    if (p->k_max < 1 || p->k_max > E || p->k_min < 1 || p->k_min > p->k_max) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "need 1 <= k_min <= k_max <= n_experts=%d, got "
                             "k_min=%d, k_max=%d", E, p->k_min, p->k_max);
    }
    if (p->mode == MOE_DYNAMIC_TOP_P && !(p->p > 0.0 && p->p <= 1.0)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "p must be in (0, 1], got %g", p->p);
    }
    if (p->mode == MOE_DYNAMIC_THRESHOLD && !(p->p >= 0.0 && p->p <= 1.0)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "threshold must be in [0, 1], got %g", p->p);
    }
    if (p->mode != MOE_DYNAMIC_TOP_P && p->mode != MOE_DYNAMIC_THRESHOLD) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "unknown dynamic-k mode %d", (int)p->mode);
    }
    return moe_cpu_route_dynamic(p);
}

moe_status
moe_route_skip(const moe_route_skip_params *p)
{
    if (p->n_tokens < 0 || p->top_k < 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "n_tokens and top_k must be >= 0, got %lld, %d",
                             (long long)p->n_tokens, p->top_k);
    }
    if (!isfinite(p->threshold)) {
        return moe_set_error(MOE_STATUS_NONFINITE,
                             "threshold must be finite, got %g", p->threshold);
    }
    return moe_cpu_route_skip(p);
}

static moe_status
moe_peer_forward_check(const moe_peer_params *p)
{
    if (p->n_tokens < 0 || p->d_model < 1 || p->d_out < 1 || p->n_heads < 1) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "PEER needs n_tokens >= 0, d_model, d_out and "
                             "n_heads >= 1, got %lld, %lld, %lld, %d",
                             (long long)p->n_tokens, (long long)p->d_model,
                             (long long)p->d_out, p->n_heads);
    }
    if (p->d_key < 2 || p->d_key % 2 != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "d_key must be even and >= 2, got %d", p->d_key);
    }
    /* Expert ids i * n + j are int32. */
    if (p->n_sub_keys < 1 || p->n_sub_keys > 46340) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "n_sub_keys must be in 1..46340, got %d",
                             p->n_sub_keys);
    }
    if (p->top_k < 1 || p->top_k > p->n_sub_keys) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "top_k must be in 1..n_sub_keys=%d, got %d",
                             p->n_sub_keys, p->top_k);
    }
    if (p->n_key_sets != 1 && p->n_key_sets != p->n_heads) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "sub-keys must be shared (1 set) or per head "
                             "(n_heads=%d sets), got %d sets", p->n_heads,
                             p->n_key_sets);
    }
    if ((int)p->activation < 0 ||
        (int)p->activation >= (int)MOE_PEER_ACTIVATION_COUNT) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "unknown PEER activation code %d",
                             (int)p->activation);
    }
    return MOE_STATUS_OK;
}

moe_status
moe_peer_forward(const moe_peer_params *p)
{
    MOE_TRY(moe_peer_forward_check(p));
    return moe_cpu_peer_forward(p);
}

moe_status
moe_peer_backward(const moe_peer_backward_params *p)
{
    if (p->forward == NULL || p->expert_ids == NULL || p->dy == NULL ||
        p->n_used < 0 || (p->n_used > 0 && p->used == NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "PEER backward needs the "
                             "forward's params, its expert_ids, dy and the "
                             "used experts");
    }
    MOE_TRY(moe_peer_forward_check(p->forward));
    return moe_cpu_peer_backward(p);
}

moe_status
moe_check_wstrides(const char *op, moe_dtype dtype, const moe_wstrides *s,
                   int n)
{
    int i;

    for (i = 0; i < n; i++) {
        const int dense = s[i].expert == 0 && s[i].row == 0 && s[i].col == 0;
        if (s[i].expert < 0 || s[i].row < 0 || s[i].col < 0 ||
            (!dense && moe_dtype_quantized(dtype))) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "%s: weight strides "
                                 "must be >= 0, and all 0 (dense) for "
                                 "quantized weights, got (%lld, %lld, %lld)",
                                 op, (long long)s[i].expert,
                                 (long long)s[i].row, (long long)s[i].col);
        }
    }
    return MOE_STATUS_OK;
}

moe_status
moe_experts_pack(const moe_pack_params *p, moe_experts **out)
{
    if (out == NULL || p->w_up == NULL || p->w_down == NULL ||
        p->n_experts < 1 || p->d_model < 0 || p->d_ff < 0 ||
        (int)p->dtype < 0 || p->dtype >= MOE_DTYPE_COUNT) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "moe_experts_pack: "
                             "w_up, w_down, n_experts >= 1, sizes >= 0 and "
                             "a known dtype are required");
    }
    if (moe_dtype_quantized(p->dtype) &&
        (p->s_up == NULL || p->s_down == NULL ||
         (p->w_gate != NULL) != (p->s_gate != NULL) || p->group_size < 0 ||
         (p->dtype == MOE_DTYPE_MXFP4 && p->group_size != 32))) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "moe_experts_pack: "
                             "quantized weights need the scales of each "
                             "weight and group_size >= 0 (0: one per row; "
                             "mxfp4: 32), got group_size=%lld",
                             (long long)p->group_size);
    }
    {
        const moe_wstrides st[3] = {p->gate_strides, p->up_strides,
                                    p->down_strides};
        MOE_TRY(moe_check_wstrides("moe_experts_pack", p->dtype, st, 3));
    }
    if ((int)p->compute < 0 || p->compute >= MOE_COMPUTE_COUNT ||
        (p->compute == MOE_COMPUTE_INT8 && !moe_dtype_quantized(p->dtype))) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "moe_experts_pack: compute %d needs a known "
                             "compute and, for int8, a quantized dtype "
                             "(int8, int4, mxfp4), got dtype %d",
                             (int)p->compute, (int)p->dtype);
    }
    if (p->compute == MOE_COMPUTE_BFLOAT16 &&
        (p->dtype != MOE_DTYPE_BF16 || p->d_model % 2 || p->d_ff % 2)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "bf16 compute needs bfloat16 weights and even "
                             "d_model and d_ff, got dtype %d, d_model=%lld, "
                             "d_ff=%lld", (int)p->dtype, (long long)p->d_model,
                             (long long)p->d_ff);
    }
    if (p->expert_d_ff != NULL) {
        int32_t e;
        for (e = 0; e < p->n_experts; e++) {
            if (p->expert_d_ff[e] < 0 || p->expert_d_ff[e] > p->d_ff ||
                (p->compute == MOE_COMPUTE_BFLOAT16 &&
                 p->expert_d_ff[e] % 2)) {
                return moe_set_error(MOE_STATUS_INVALID_ARG,
                                     "expert_d_ff must be in [0, d_ff=%lld]%s, "
                                     "got %lld for expert %d", (long long)p->d_ff,
                                     p->compute == MOE_COMPUTE_BFLOAT16
                                         ? " and even (bf16 compute)"
                                                     : "",
                                     (long long)p->expert_d_ff[e], e);
            }
        }
    }
    return moe_cpu_experts_pack(p, out);
}

/* Rows grouped by offsets and read through token_index: checked once, as
 * they decide which memory is read and written. */
static moe_status
moe_check_rows(const int64_t *offsets, int32_t n_groups, int64_t n_rows,
               const int64_t *token_index, int64_t n_tokens)
{
    int64_t r;
    int32_t e;

    if (offsets[0] != 0 || offsets[n_groups] != n_rows) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "offsets must start at 0 and end at n_rows=%lld",
                             (long long)n_rows);
    }
    for (e = 0; e < n_groups; e++) {
        if (offsets[e + 1] < offsets[e]) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "offsets must be non-decreasing, got "
                                 "offsets[%d]=%lld > offsets[%d]=%lld", e,
                                 (long long)offsets[e], e + 1,
                                 (long long)offsets[e + 1]);
        }
    }
    if (token_index == NULL && n_tokens != n_rows) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "without token_index, x "
                             "must have n_rows=%lld rows, got %lld",
                             (long long)n_rows, (long long)n_tokens);
    }
    for (r = 0; token_index != NULL && r < n_rows; r++) {
        if (token_index[r] < 0 || token_index[r] >= n_tokens) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "token_index must be in [0, n_tokens=%lld), "
                                 "got %lld at row %lld",
                                 (long long)n_tokens,
                                 (long long)token_index[r], (long long)r);
        }
    }
    return MOE_STATUS_OK;
}

/* A pack is laid out for one kernel set (its panel width). */
static moe_status
moe_check_pack(const moe_experts *w, int linear, const char *what)
{
    if (w == NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "%s is NULL", what);
    }
    if (w->nr != moe_cpu_kernels()->nr) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "the %s were packed "
                             "for another CPU kernel set: pack them again",
                             what);
    }
    if (w->linear != linear) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "%s must be packed %s",
                             what, linear ? "with moe_linear_pack"
                                          : "with moe_experts_pack");
    }
    return MOE_STATUS_OK;
}

moe_status
moe_ffn_grouped(const moe_ffn_params *p)
{
    const moe_experts *w = p->experts;

    MOE_TRY(moe_check_pack(w, 0, "experts"));
    if (moe_activation_gated(p->act.activation) != w->gated) {
        return moe_set_error(MOE_STATUS_INVALID_ARG,
                             "activation is %sgated but the experts were "
                             "packed %s w_gate",
                             w->gated ? "not " : "", w->gated ? "with"
                                                              : "without");
    }
    if (p->lora != NULL && p->lora->experts != w) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the expert LoRA was "
                             "packed for other experts: pack it again");
    }
    if (p->save_gu != NULL && w->compute == MOE_COMPUTE_INT8) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "save_gu needs a float32- "
                             "or bfloat16-compute pack (the backward's)");
    }
    MOE_TRY(moe_check_rows(p->offsets, w->n_experts, p->n_rows,
                           p->token_index, p->n_tokens));
    return moe_cpu_ffn_grouped(p);
}

moe_status
moe_ffn_backward(const moe_ffn_backward_params *p)
{
    const moe_experts *w = p->experts;

    MOE_TRY(moe_check_pack(w, 0, "experts"));
    if (w->compute == MOE_COMPUTE_INT8) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "the backward of an "
                             "int8-compute pack is not implemented: train the "
                             "float layer");
    }
    if (moe_activation_gated(p->act.activation) != w->gated ||
        (w->gated && p->w_gate == NULL) || p->w_up == NULL ||
        p->w_down == NULL || p->dy == NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "ffn backward needs dy, "
                             "w_up, w_down and (gated activations, packed "
                             "with w_gate) w_gate");
    }
    {
        const moe_wstrides st[3] = {p->gate_strides, p->up_strides,
                                    p->down_strides};
        MOE_TRY(moe_check_wstrides("ffn backward", w->dtype, st, 3));
    }
    if (p->d_gu_stride != 0 && p->d_gu_stride < w->d_ff * w->d_model) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "ffn backward: d_gu_stride "
                             "must be 0 or >= d_ff * d_model = %lld, got %lld",
                             (long long)(w->d_ff * w->d_model),
                             (long long)p->d_gu_stride);
    }
    MOE_TRY(moe_check_rows(p->offsets, w->n_experts, p->n_rows,
                           p->token_index, p->n_tokens));
    return moe_cpu_ffn_backward(p);
}

moe_status
moe_route_backward(const moe_route_backward_params *p)
{
    if (p->opt.router != MOE_ROUTER_TOP_K || p->opt.top_k < 1 ||
        p->opt.top_k > p->n_experts || p->opt.n_groups < 1 ||
        p->n_experts % p->opt.n_groups != 0) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "route backward: top_k "
                             "routing with 1 <= top_k <= n_experts and "
                             "n_groups dividing n_experts");
    }
    if ((int)p->router_grad < 0 ||
        (int)p->router_grad >= (int)MOE_ROUTER_GRAD_COUNT) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "unknown router_grad code "
                             "%d", (int)p->router_grad);
    }
    return moe_cpu_route_backward(p);
}

moe_status
moe_expert_lora_pack(const moe_expert_lora_params *p,
                     const moe_experts *experts, moe_expert_lora **out)
{
    MOE_TRY(moe_check_pack(experts, 0, "experts"));
    if (out == NULL || p->rank < 1 || !isfinite(p->scaling)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "moe_expert_lora_pack: "
                             "rank >= 1 and a finite scaling are required");
    }
    if ((p->a_gate == NULL) != (p->b_gate == NULL) ||
        (p->a_up == NULL) != (p->b_up == NULL) ||
        (p->a_down == NULL) != (p->b_down == NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "each LoRA adapter needs "
                             "both its A and its B");
    }
    if (experts->expert_ff != NULL) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "LoRA on experts of "
                             "different sizes (expert_d_ff) is not supported");
    }
    if (experts->compute != MOE_COMPUTE_FLOAT32) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "LoRA on experts packed "
                             "for bfloat16 or int8 compute is not supported");
    }
    if (p->a_gate != NULL && !experts->gated) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "a LoRA on w_gate needs "
                             "experts packed with w_gate");
    }
    return moe_cpu_expert_lora_pack(p, experts, out);
}

moe_status
moe_linear_pack(const moe_linear_pack_params *p, moe_experts **out)
{
    if (out == NULL || p->w == NULL || p->n_groups < 1 || p->d_in < 0 ||
        p->d_out < 0 ||
        (p->dtype != MOE_DTYPE_F32 && p->dtype != MOE_DTYPE_BF16 &&
         p->dtype != MOE_DTYPE_F16)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "moe_linear_pack: w, "
                             "n_groups >= 1, sizes >= 0 and a known dtype "
                             "are required");
    }
    return moe_cpu_linear_pack(p, out);
}

moe_status
moe_linear_grouped(const moe_linear_params *p)
{
    const moe_experts *w = p->weights;
    const moe_lowrank *lr = p->lowrank;
    int64_t i;

    MOE_TRY(moe_check_pack(w, 1, "weights"));
    MOE_TRY(moe_check_rows(p->offsets, w->n_experts, p->n_rows,
                           p->token_index, p->n_tokens));
    if (lr != NULL) {
        int64_t n_bank;
        if (lr->n_terms < 0 ||
            (lr->n_terms > 0 && moe_check_pack(lr->bank, 1, "lowrank bank") !=
                                    MOE_STATUS_OK)) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "lowrank: n_terms "
                                 ">= 0 and a packed linear bank are required");
        }
        if (lr->n_terms > 0 &&
            (lr->bank->n_experts != 1 || lr->bank->d_model != w->d_model ||
             lr->bank->dtype != MOE_DTYPE_F32)) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "lowrank: the bank must "
                                 "be an fp32 packed linear (1, d_out=%lld, "
                                 "n_bank)", (long long)w->d_model);
        }
        n_bank = lr->n_terms > 0 ? lr->bank->d_ff : 0;
        for (i = 0; i < p->n_rows * lr->n_terms; i++) {
            if (lr->index[i] < -1 || lr->index[i] >= n_bank) {
                return moe_set_error(MOE_STATUS_INVALID_ARG,
                                     "lowrank index must be in [0, n_bank="
                                     "%lld) or -1, got %d at row %lld",
                                     (long long)n_bank, lr->index[i],
                                     (long long)(i / lr->n_terms));
            }
        }
    }
    return moe_cpu_linear_grouped(p);
}

/* ---- the CUDA backend's ops (the loader only loads: moe_cuda()) ---- */

moe_status
moe_cuda_route(const struct moe_cuda_route_params *p, void *stream)
{
    const moe_cuda_api *api = moe_cuda();

    if (api == NULL) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "the CUDA backend is not "
                             "available: %s", moe_cuda_unavailable_reason());
    }
    return (moe_status)api->route_topk(p, stream);
}
