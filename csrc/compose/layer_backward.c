/*
 * compose/layer_backward.c - the top-k layer's backward composed from the
 * public backward ops, the forward's order reversed:
 *   combine -> grouped FFN -> dispatch (the routed rows' dx), route ->
 *   router linear, shared experts and their gate,
 * with dx summed per token in that fixed order.  The dispatch is rebuilt
 * from the forward's expert ids (the same stable sort: the same rows as
 * the saved expert outputs).  Backend-neutral: it only calls csrc/moe.h.
 */
#include "moe_impl.h"

#include <math.h>
#include <string.h>

/* The shared experts: d_shared = dy * s, s = sigmoid(x . gate) (or 1);
 * their FFN's backward adds into dx, the gate's gradient goes to
 * d_shared_gate and dx. */
static moe_status
moe_layer_backward_shared(const moe_layer_backward_params *b, float *dx)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens, d = p->d_model;
    int64_t offsets[2] = {0, T}, t, i;
    double *g = NULL, *ds = NULL;
    float *dsh = NULL, *dxs = NULL;
    moe_ffn_backward_params fb;
    moe_status st = MOE_STATUS_ALLOC;

    dsh = moe_alloc((size_t)(T * d) + 1, sizeof(float));
    dxs = moe_alloc((size_t)(T * d) + 1, sizeof(float));
    g = moe_alloc((size_t)T + 1, sizeof(double));
    ds = moe_alloc((size_t)T + 1, sizeof(double));
    if (!dsh || !dxs || !g || !ds) {
        goto done;
    }
    if (p->shared_gate != NULL) {
        const moe_router_params rp = {.x = p->x, .weight = p->shared_gate,
                                      .n_tokens = T, .d_model = d,
                                      .n_experts = 1, .logits = g};
        if ((st = moe_router_logits(&rp)) != MOE_STATUS_OK) {
            goto done;
        }
    }
    for (t = 0; t < T; t++) {
        /* the forward's gate value (float32, as it scaled the output) */
        const float s = p->shared_gate ? (float)(1.0 / (1.0 + exp(-g[t])))
                                       : 1.0f;
        double dot = 0.0;
        for (i = 0; i < d; i++) {
            dsh[t * d + i] = b->dy[t * d + i] * s;
            dot += (double)b->dy[t * d + i] * p->save_shared[t * d + i];
        }
        ds[t] = dot * s * (1.0 - s);
    }
    fb = (moe_ffn_backward_params){
        .x = p->x, .n_tokens = T, .offsets = offsets, .n_rows = T,
        .experts = p->shared, .w_gate = b->shared_w_gate,
        .w_up = b->shared_w_up, .w_down = b->shared_w_down, .act = p->act,
        .dy = dsh, .dx = dx != NULL ? dxs : NULL,
        .d_w_gate = b->d_shared_w_gate, .d_w_up = b->d_shared_w_up,
        .d_w_down = b->d_shared_w_down};
    if ((st = moe_ffn_backward(&fb)) != MOE_STATUS_OK) {
        goto done;
    }
    for (t = 0; dx != NULL && t < T; t++) {
        for (i = 0; i < d; i++) {
            dx[t * d + i] += dxs[t * d + i];
        }
        if (p->shared_gate != NULL) {
            for (i = 0; i < d; i++) {
                dx[t * d + i] += (float)(ds[t] * p->shared_gate[i]);
            }
        }
    }
    if (p->shared_gate != NULL && b->d_shared_gate != NULL) {
        for (i = 0; i < d; i++) {
            double s = 0.0;
            for (t = 0; t < T; t++) {
                s += ds[t] * p->x[t * d + i];
            }
            b->d_shared_gate[i] = (float)s;
        }
    }
    st = MOE_STATUS_OK;
done:
    free(dsh);
    free(dxs);
    free(g);
    free(ds);
    return st;
}

/*
 * Null experts: slot (t, j) of null expert i adds w * v, v = x[t] (copy),
 * null_values[i] (constant) or 0 (zero), so d_weights[t, j] = <dy[t], v>
 * and constant ones add w * dy[t] to d_null_values[i]; tokens and slots in
 * order.
 */
static moe_status
moe_layer_backward_null(const moe_layer_backward_params *b, float *dws)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts, k = p->route.top_k;
    int64_t t, i;
    int32_t j;

    if (b->d_null_values != NULL) {
        memset(b->d_null_values, 0, sizeof(float) * (size_t)(p->n_null * d));
    }
    for (t = 0; t < T; t++) {
        const float *g = b->dy + t * d;
        for (j = 0; j < k; j++) {
            const int32_t e = p->expert_ids[t * k + j];
            const float w = p->weights[t * k + j];
            const float *v = NULL;
            double dot = 0.0;
            if (e < E) {
                continue;
            }
            if (p->null_kinds[e - E] == MOE_NULL_COPY) {
                v = p->x + t * d;
            }
            else if (p->null_kinds[e - E] == MOE_NULL_CONSTANT) {
                v = p->null_values + (e - E) * d;
                for (i = 0; b->d_null_values != NULL && i < d; i++) {
                    b->d_null_values[(e - E) * d + i] += w * g[i];
                }
            }
            for (i = 0; v != NULL && i < d; i++) {
                dot += (double)g[i] * v[i];
            }
            dws[t * k + j] = (float)dot;
        }
    }
    return MOE_STATUS_OK;
}

/*
 * Back through skipping with renormalisation: a token's kept weights were
 * w_j / S (w the routed weights, S their sum over the kept slots), so the
 * routed weight of kept slot i gets dw_i / S - sum_j dw_j w_j / S^2; the
 * routed weights come from routing again (capacity does not change a kept
 * slot's weight).  Skipped slots already carry 0.
 */
static moe_status
moe_layer_backward_skip(const moe_layer_params *p, float *dws)
{
    const int64_t T = p->n_tokens;
    const int32_t k = p->route.top_k;
    const int32_t E_all = p->n_experts + (p->n_null > 0 ? p->n_null : 0);
    int32_t *ids = moe_alloc((size_t)(T * k) + 1, sizeof(int32_t));
    float *w = moe_alloc((size_t)(T * k) + 1, sizeof(float));
    int64_t *counts = moe_alloc((size_t)E_all, sizeof(int64_t));
    int64_t t, n_dropped;
    double aux, z;
    moe_route_params rp;
    moe_status st = MOE_STATUS_ALLOC;
    int32_t j;

    if (ids && w && counts) {
        rp = (moe_route_params){
            .logits = p->save_logits, .n_tokens = T, .n_experts = E_all,
            .opt = p->route, .expert_ids = ids, .weights = w, .counts = counts,
            .n_dropped = &n_dropped, .aux_loss = &aux, .z_loss = &z};
        rp.opt.capacity_factor = 0.0;
        st = moe_route_topk(&rp);
    }
    for (t = 0; st == MOE_STATUS_OK && t < T; t++) {
        double S = 0.0, dot = 0.0;
        for (j = 0; j < k; j++) {
            if (p->expert_ids[t * k + j] >= 0) {
                S += w[t * k + j];
                dot += (double)dws[t * k + j] * w[t * k + j];
            }
        }
        for (j = 0; j < k; j++) {
            if (p->expert_ids[t * k + j] >= 0 && S > 0.0) {
                dws[t * k + j] = (float)(dws[t * k + j] / S - dot / (S * S));
            }
        }
    }
    free(ids);
    free(w);
    free(counts);
    return st;
}

/* dx[t] += w * dy[t] for each copy null expert's slot, slots in order. */
static void
moe_layer_backward_copy(const moe_layer_backward_params *b)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts, k = p->route.top_k;
    int64_t t, i;
    int32_t j;

    for (t = 0; p->n_null > 0 && t < T; t++) {
        for (j = 0; j < k; j++) {
            const int32_t e = p->expert_ids[t * k + j];
            const float w = p->weights[t * k + j];
            if (e >= E && p->null_kinds[e - E] == MOE_NULL_COPY) {
                for (i = 0; i < d; i++) {
                    b->dx[t * d + i] += w * b->dy[t * d + i];
                }
            }
        }
    }
}

moe_status
moe_layer_backward(const moe_layer_backward_params *b)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts, k = p->route.top_k;
    const int32_t E_all = E + (p->n_null > 0 ? p->n_null : 0);
    int64_t *offsets = NULL, *token_index = NULL, *position = NULL, n_rows;
    int32_t *real_ids = NULL;
    float *dys = NULL, *dws = NULL, *dxs = NULL, *dxr = NULL;
    double *dl = NULL;
    moe_dispatch_params dp;
    moe_combine_backward_params cb;
    moe_ffn_backward_params fb;
    moe_dispatch_backward_params db;
    moe_route_backward_params rb;
    moe_router_backward_params lb;
    moe_status st = MOE_STATUS_ALLOC;
    int64_t i;

    if (p->route.router != MOE_ROUTER_TOP_K || p->lora != NULL) {
        return moe_set_error(MOE_STATUS_UNSUPPORTED, "the layer backward "
                             "covers the top_k router without expert LoRA");
    }
    if (p->save_logits == NULL || p->save_y == NULL || b->dy == NULL ||
        (p->shared != NULL && p->save_shared == NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the layer backward needs "
                             "dy and what the forward saved (save_logits, "
                             "save_y and, with shared experts, save_shared)");
    }
    offsets = moe_alloc((size_t)E + 1, sizeof(int64_t));
    position = moe_alloc((size_t)(T * k) + 1, sizeof(int64_t));
    dws = moe_alloc((size_t)(T * k) + 1, sizeof(float));
    dl = moe_alloc((size_t)(T * E_all) + 1, sizeof(double));
    if (!offsets || !position || !dws || !dl) {
        goto done;
    }
    if (p->n_null > 0) { /* null experts are never dispatched */
        if ((real_ids = moe_alloc((size_t)(T * k) + 1, sizeof(int32_t))) == NULL) {
            goto done;
        }
        for (i = 0; i < T * k; i++) {
            real_ids[i] = p->expert_ids[i] < E ? p->expert_ids[i] : -1;
        }
    }
    /* the forward's dispatch, again */
    dp = (moe_dispatch_params){.expert_ids = real_ids ? real_ids : p->expert_ids,
                               .n_tokens = T,
                               .top_k = k, .n_experts = E, .offsets = offsets,
                               .position = position};
    if ((st = moe_dispatch_count(&dp)) != MOE_STATUS_OK) {
        goto done;
    }
    n_rows = offsets[E];
    st = MOE_STATUS_ALLOC;
    token_index = moe_alloc((size_t)n_rows + 1, sizeof(int64_t));
    dys = moe_workspace(MOE_WS_LAYER_BWD, (size_t)((2 * n_rows + T) * d) + 1,
                        sizeof(float));
    if (!token_index || !dys) {
        goto done;
    }
    dxs = dys + n_rows * d;
    dxr = dxs + n_rows * d;
    dp.token_index = token_index;
    if ((st = moe_dispatch_build(&dp)) != MOE_STATUS_OK) {
        goto done;
    }

    cb = (moe_combine_backward_params){
        .y = p->save_y, .position = position, .weights = p->weights,
        .n_rows = n_rows, .n_tokens = T, .top_k = k, .d_model = d,
        .d_out = b->dy, .d_y = dys, .d_weights = dws};
    if ((st = moe_combine_backward(&cb)) != MOE_STATUS_OK) {
        goto done;
    }

    fb = (moe_ffn_backward_params){
        .x = p->x, .token_index = token_index, .n_tokens = T,
        .offsets = offsets, .n_rows = n_rows, .experts = p->experts,
        .w_gate = b->w_gate, .w_up = b->w_up, .w_down = b->w_down,
        .act = p->act, .dy = dys, .dx = b->dx != NULL ? dxs : NULL,
        .d_w_gate = b->d_w_gate, .d_w_up = b->d_w_up, .d_w_down = b->d_w_down,
        .d_b_gate = b->d_b_gate, .d_b_up = b->d_b_up, .d_b_down = b->d_b_down};
    if ((st = moe_ffn_backward(&fb)) != MOE_STATUS_OK) {
        goto done;
    }

    if (p->n_null > 0 && (st = moe_layer_backward_null(b, dws)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->skip_threshold > 0.0 && p->skip_renormalize &&
        (st = moe_layer_backward_skip(p, dws)) != MOE_STATUS_OK) {
        goto done;
    }
    rb = (moe_route_backward_params){
        .logits = p->save_logits, .n_tokens = T, .n_experts = E_all,
        .opt = p->route, .expert_ids = p->expert_ids, .d_weights = dws,
        .aux_coef = b->aux_coef, .z_coef = b->z_coef, .d_logits = dl};
    if ((st = moe_route_backward(&rb)) != MOE_STATUS_OK) {
        goto done;
    }
    lb = (moe_router_backward_params){
        .x = p->x, .weight = p->router_weight, .n_tokens = T, .d_model = d,
        .n_experts = E_all, .d_logits = dl, .dx = b->dx != NULL ? dxr : NULL,
        .d_weight = b->d_router_weight,
        .d_bias = p->router_bias != NULL ? b->d_router_bias : NULL};
    if ((st = moe_router_backward(&lb)) != MOE_STATUS_OK) {
        goto done;
    }

    if (b->dx != NULL) { /* routed rows (slots in order), then the router */
        db = (moe_dispatch_backward_params){
            .d_rows = dxs, .position = position, .n_rows = n_rows,
            .n_tokens = T, .top_k = k, .d_model = d, .dx = b->dx};
        if ((st = moe_dispatch_backward(&db)) != MOE_STATUS_OK) {
            goto done;
        }
        for (i = 0; i < T * d; i++) {
            b->dx[i] += dxr[i];
        }
        moe_layer_backward_copy(b);
    }
    if (p->shared != NULL) {
        st = moe_layer_backward_shared(b, b->dx);
    }
done:
    free(offsets);
    free(position);
    free(token_index);
    free(dws);
    free(dl);
    free(real_ids);
    return st;
}
