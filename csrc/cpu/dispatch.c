/*
 * cpu/dispatch.c - CPU token dispatch and combine.  Dispatch is a stable
 * counting sort of the (token, slot) pairs by expert, so rows of one expert
 * stay in token order; combine sums each token's slots in slot order with no
 * atomics, so the output never depends on thread count or batch neighbours.
 */
#include "moe_impl.h"

#include <string.h>

moe_status
moe_cpu_dispatch_count(const moe_dispatch_params *p)
{
    const int64_t n = p->n_tokens * p->top_k;
    int64_t i;
    int32_t e;

    memset(p->offsets, 0, sizeof(int64_t) * ((size_t)p->n_experts + 1));
    for (i = 0; i < n; i++) {
        int32_t id = p->expert_ids[i];
        if (id == -1) {
            continue;
        }
        if (id < 0 || id >= p->n_experts) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "expert_ids must be in [0, n_experts=%d) or "
                                 "-1, got %d at token %lld, slot %lld",
                                 p->n_experts, id, (long long)(i / p->top_k),
                                 (long long)(i % p->top_k));
        }
        p->offsets[id + 1]++;
    }
    for (e = 0; e < p->n_experts; e++) {
        p->offsets[e + 1] += p->offsets[e];
    }
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_dispatch_build(const moe_dispatch_params *p)
{
    const int64_t n = p->n_tokens * p->top_k;
    int64_t *cursor, i;

    MOE_TRY(moe_cpu_dispatch_count(p));
    cursor = moe_alloc((size_t)p->n_experts + 1, sizeof(int64_t));
    if (cursor == NULL) {
        return MOE_STATUS_ALLOC;
    }
    memcpy(cursor, p->offsets, sizeof(int64_t) * ((size_t)p->n_experts + 1));
    for (i = 0; i < n; i++) {
        int32_t id = p->expert_ids[i];
        if (id == -1) {
            p->position[i] = -1;
            continue;
        }
        p->position[i] = cursor[id];
        p->token_index[cursor[id]++] = i / p->top_k;
    }
    free(cursor);
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_dispatch_gather(const moe_gather_params *p)
{
    int64_t r;

    for (r = 0; r < p->n_rows; r++) {
        int64_t t = p->token_index[r];
        if (t < 0 || t >= p->n_tokens) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "token_index must be in [0, n_tokens=%lld), "
                                 "got %lld at row %lld",
                                 (long long)p->n_tokens, (long long)t,
                                 (long long)r);
        }
        memcpy(p->out + r * p->d_model, p->x + t * p->d_model,
               sizeof(float) * (size_t)p->d_model);
    }
    return MOE_STATUS_OK;
}

/* Tokens per task of the parallel combine. */
#define MOE_COMBINE_BLOCK 32

static void
moe_combine_task(void *ctx, int64_t task)
{
    const moe_combine_params *p = ctx;
    const int64_t d = p->d_model;
    int64_t t, i, end = (task + 1) * MOE_COMBINE_BLOCK;
    int32_t j;

    end = end < p->n_tokens ? end : p->n_tokens;
    for (t = task * MOE_COMBINE_BLOCK; t < end; t++) {
        float *o = p->out + t * d;
        memset(o, 0, sizeof(float) * (size_t)d);
        /* Slot order is fixed: the same token always sums the same way. */
        for (j = 0; j < p->top_k; j++) {
            int64_t row = p->position[t * p->top_k + j];
            float w = p->weights[t * p->top_k + j];
            const float *y;
            if (row < 0) {
                continue;
            }
            y = p->y + row * d;
            for (i = 0; i < d; i++) {
                o[i] += w * y[i];
            }
        }
    }
}

/* position (n_tokens, top_k) in [0, n_rows) or -1. */
static moe_status
moe_check_position(const int64_t *position, int64_t n_tokens, int32_t top_k,
                   int64_t n_rows)
{
    const int64_t n = n_tokens * top_k;
    int64_t i;

    for (i = 0; i < n; i++) {
        if (position[i] < -1 || position[i] >= n_rows) {
            return moe_set_error(MOE_STATUS_INVALID_ARG,
                                 "position must be in [0, n_rows=%lld) or -1, "
                                 "got %lld at token %lld, slot %lld",
                                 (long long)n_rows, (long long)position[i],
                                 (long long)(i / top_k),
                                 (long long)(i % top_k));
        }
    }
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_combine(const moe_combine_params *p)
{
    MOE_TRY(moe_check_position(p->position, p->n_tokens, p->top_k, p->n_rows));
    return moe_pool_run((p->n_tokens + MOE_COMBINE_BLOCK - 1) /
                        MOE_COMBINE_BLOCK, moe_combine_task, (void *)p);
}

/* ---- backward ---------------------------------------------------------- */

static void
moe_combine_backward_task(void *ctx, int64_t task)
{
    const moe_combine_backward_params *p = ctx;
    const int64_t d = p->d_model;
    int64_t t, i, end = (task + 1) * MOE_COMBINE_BLOCK;
    int32_t j;

    end = end < p->n_tokens ? end : p->n_tokens;
    for (t = task * MOE_COMBINE_BLOCK; t < end; t++) {
        const float *g = p->d_out + t * d;
        for (j = 0; j < p->top_k; j++) {
            const int64_t row = p->position[t * p->top_k + j];
            const float w = p->weights[t * p->top_k + j];
            double dot = 0.0;
            if (row < 0) {
                if (p->d_weights != NULL) {
                    p->d_weights[t * p->top_k + j] = 0.0f;
                }
                continue;
            }
            if (p->d_y != NULL) {
                float *dy = p->d_y + row * d;
                for (i = 0; i < d; i++) {
                    dy[i] = w * g[i];
                }
            }
            if (p->d_weights != NULL) {
                const float *y = p->y + row * d;
                for (i = 0; i < d; i++) {
                    dot += (double)g[i] * y[i];
                }
                p->d_weights[t * p->top_k + j] = (float)dot;
            }
        }
    }
}

moe_status
moe_cpu_combine_backward(const moe_combine_backward_params *p)
{
    MOE_TRY(moe_check_position(p->position, p->n_tokens, p->top_k, p->n_rows));
    if (p->d_y != NULL) { /* rows no slot reads */
        memset(p->d_y, 0, sizeof(float) * (size_t)(p->n_rows * p->d_model));
    }
    return moe_pool_run((p->n_tokens + MOE_COMBINE_BLOCK - 1) /
                        MOE_COMBINE_BLOCK, moe_combine_backward_task,
                        (void *)p);
}

static void
moe_dispatch_backward_task(void *ctx, int64_t task)
{
    const moe_dispatch_backward_params *p = ctx;
    const int64_t d = p->d_model;
    int64_t t, i, end = (task + 1) * MOE_COMBINE_BLOCK;
    int32_t j;

    end = end < p->n_tokens ? end : p->n_tokens;
    for (t = task * MOE_COMBINE_BLOCK; t < end; t++) {
        float *o = p->dx + t * d;
        memset(o, 0, sizeof(float) * (size_t)d);
        for (j = 0; j < p->top_k; j++) { /* slots in order */
            const int64_t row = p->position[t * p->top_k + j];
            if (row >= 0) {
                const float *g = p->d_rows + row * d;
                for (i = 0; i < d; i++) {
                    o[i] += g[i];
                }
            }
        }
    }
}

moe_status
moe_cpu_dispatch_backward(const moe_dispatch_backward_params *p)
{
    MOE_TRY(moe_check_position(p->position, p->n_tokens, p->top_k, p->n_rows));
    return moe_pool_run((p->n_tokens + MOE_COMBINE_BLOCK - 1) /
                        MOE_COMBINE_BLOCK, moe_dispatch_backward_task,
                        (void *)p);
}
