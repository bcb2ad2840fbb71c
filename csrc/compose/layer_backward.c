/*
 * compose/layer_backward.c - the layer's backward composed from the public
 * backward ops, the forward's order reversed:
 *   combine (+ null experts) -> grouped FFN -> dispatch (the routed rows'
 *   dx), skipping -> routing (top-k, or the other routers here) -> router
 *   linear, shared experts and their gate,
 * with dx summed per token in that fixed order.  The dispatch is rebuilt
 * from the forward's expert ids (the same stable sort: the same rows as
 * the saved expert outputs); where the backward needs the selection before
 * capacity or skipping emptied slots it routes again from the saved logits
 * (moe_layer_route, the forward's own).  Backend-neutral: it only calls
 * csrc/moe.h and the composers' shared routing.
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
    const int32_t E = p->n_experts, k = b->width;
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
 * The forward's selection before capacity or skipping emptied slots: route
 * again from the saved logits (the same router; top-k without capacity)
 * into ids / w (n_tokens, width).
 */
static moe_status
moe_layer_backward_reroute(const moe_layer_backward_params *b, int32_t *ids,
                           float *w)
{
    const moe_layer_params *p = b->forward;
    const int32_t E_all = p->n_experts + (p->n_null > 0 ? p->n_null : 0);
    int64_t *counts = moe_alloc((size_t)E_all, sizeof(int64_t)), n_dropped;
    double aux, z;
    int32_t k = 0;
    moe_layer_params q = *p;
    moe_status st = MOE_STATUS_ALLOC;

    if (counts != NULL) {
        q.expert_ids = ids;
        q.weights = w;
        q.counts = counts;
        q.n_dropped = &n_dropped;
        q.aux_loss = &aux;
        q.z_loss = &z;
        q.route.capacity_factor = p->route.router == MOE_ROUTER_TOP_K
                                      ? 0.0 : p->route.capacity_factor;
        st = moe_layer_route(&q, p->save_logits, &k);
    }
    free(counts);
    if (st == MOE_STATUS_OK && k != b->width) {
        st = moe_set_error(MOE_STATUS_INVALID_ARG, "routing again gave %d slots "
                           "per token, the forward's expert_ids have %d: they "
                           "do not come from this forward", k, b->width);
    }
    return st;
}

/*
 * Back through skipping with renormalisation: a token's kept weights were
 * w_j / S (w the routed weights, S their sum over the kept slots), so the
 * routed weight of kept slot i gets dw_i / S - sum_j dw_j w_j / S^2.
 * Skipped slots already carry 0.
 */
static void
moe_layer_backward_skip(const moe_layer_backward_params *b, const float *w,
                        float *dws)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens;
    const int32_t k = b->width;
    int64_t t;
    int32_t j;

    for (t = 0; t < T; t++) {
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
}

/*
 * d_logits for the routers other than top-k, the selection (ids, before
 * skipping) held fixed: expert choice's weights are c * score (softmax or
 * sigmoid), top-p / threshold's c * p / sum(p) over the selected with
 * renormalize, else c * p (p the softmax); the losses' f (the router's
 * share per expert) is constant, P the mean softmax.  Tokens in order.
 */
static moe_status
moe_layer_backward_route_other(const moe_layer_backward_params *b,
                               const int32_t *ids, const float *dws, double *dl)
{
    const moe_layer_params *p = b->forward;
    const moe_route_options *o = &p->route;
    const int64_t T = p->n_tokens;
    const int32_t E = p->n_experts + (p->n_null > 0 ? p->n_null : 0);
    const int32_t k = b->width;
    const int sig = o->router == MOE_ROUTER_EXPERT_CHOICE &&
                    o->scoring == MOE_SCORING_SIGMOID;
    double *buf = moe_alloc((size_t)(3 * E), sizeof(double));
    double *pr, *g, *f;
    int64_t t, n_kept = 0;
    int32_t e, j;

    if (buf == NULL) {
        return MOE_STATUS_ALLOC;
    }
    pr = buf;
    g = buf + E;
    f = buf + 2 * E; /* d aux / d P_e */
    memset(f, 0, sizeof(double) * (size_t)E);
    for (t = 0; t < T * k; t++) {
        if (ids[t] >= 0) {
            f[ids[t]] += 1.0;
            n_kept++;
        }
    }
    for (e = 0; e < E; e++) {
        f[e] = n_kept > 0 ? b->aux_coef * E * (f[e] / (double)n_kept) / (double)T
                          : 0.0;
    }
    for (t = 0; t < T; t++) {
        const double *l = p->save_logits + t * E;
        double *d = dl + t * E;
        const double lse = moe_softmax_f64(l, E, pr);
        double S = 0.0, dot = 0.0;
        memset(g, 0, sizeof(double) * (size_t)E);
        memset(d, 0, sizeof(double) * (size_t)E);
        for (j = 0; j < k; j++) { /* selected scores and dw . p */
            const int32_t id = ids[t * k + j];
            const double dw = p->expert_ids[t * k + j] >= 0
                ? (double)dws[t * k + j] * o->routed_scaling : 0.0;
            if (id >= 0) {
                g[id] = dw;
                S += pr[id];
                dot += dw * pr[id];
            }
        }
        if (o->router != MOE_ROUTER_EXPERT_CHOICE && o->renormalize && S > 0.0) {
            for (j = 0; j < k; j++) {
                const int32_t id = ids[t * k + j];
                if (id >= 0) {
                    g[id] = g[id] / S - dot / (S * S);
                }
            }
        }
        if (sig) {
            for (e = 0; e < E; e++) {
                const double z = exp(-fabs(l[e]));
                const double s = l[e] >= 0.0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
                d[e] += g[e] * s * (1.0 - s);
            }
        }
        else {
            moe_softmax_backward_f64(pr, g, E, d);
        }
        if (n_kept > 0 && b->aux_coef != 0.0) {
            moe_softmax_backward_f64(pr, f, E, d);
        }
        for (e = 0; b->z_coef != 0.0 && e < E; e++) {
            d[e] += b->z_coef * 2.0 * lse / (double)T * pr[e];
        }
    }
    free(buf);
    return MOE_STATUS_OK;
}

/* dx[t] += w * dy[t] for each copy null expert's slot, slots in order. */
static void
moe_layer_backward_copy(const moe_layer_backward_params *b)
{
    const moe_layer_params *p = b->forward;
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts, k = b->width;
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
    const int32_t E = p->n_experts, k = b->width;
    const int32_t E_all = E + (p->n_null > 0 ? p->n_null : 0);
    int64_t *offsets = NULL, *token_index = NULL, *position = NULL, n_rows;
    int32_t *real_ids = NULL, *full_ids = NULL;
    float *full_w = NULL;
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

    if (b->router_grad != MOE_ROUTER_GRAD_DEFAULT &&
        p->route.router != MOE_ROUTER_TOP_K) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "router_grad other than "
                             "the default needs the top-k router");
    }
    if ((p->lora != NULL) != (b->lora != NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the layer backward needs "
                             "the forward's expert LoRA unpacked (lora) exactly "
                             "when the forward had one");
    }
    if (b->width < 1 || (p->route.router != MOE_ROUTER_EXPERT_CHOICE &&
                         b->width != p->route.top_k)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "width must be the "
                             "forward's slots per token (top_k, or expert "
                             "choice's width), got %d", b->width);
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
        .gate_strides = b->gate_strides, .up_strides = b->up_strides,
        .down_strides = b->down_strides, .act = p->act, .gu = p->save_gu,
        .dy = dys, .dx = b->dx != NULL ? dxs : NULL,
        .d_w_gate = b->d_w_gate, .d_w_up = b->d_w_up, .d_w_down = b->d_w_down,
        .d_gu_stride = b->d_gu_stride,
        .d_b_gate = b->d_b_gate, .d_b_up = b->d_b_up, .d_b_down = b->d_b_down,
        .lora = b->lora, .d_lora_a_gate = b->d_lora_a_gate,
        .d_lora_b_gate = b->d_lora_b_gate, .d_lora_a_up = b->d_lora_a_up,
        .d_lora_b_up = b->d_lora_b_up, .d_lora_a_down = b->d_lora_a_down,
        .d_lora_b_down = b->d_lora_b_down};
    if ((st = moe_ffn_backward(&fb)) != MOE_STATUS_OK) {
        goto done;
    }

    if (p->n_null > 0 && (st = moe_layer_backward_null(b, dws)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->route.router != MOE_ROUTER_TOP_K ||
        (p->skip_threshold > 0.0 && p->skip_renormalize)) {
        st = MOE_STATUS_ALLOC;
        full_ids = moe_alloc((size_t)(T * (k > E_all ? k : E_all)) + 1,
                             sizeof(int32_t));
        full_w = moe_alloc((size_t)(T * (k > E_all ? k : E_all)) + 1,
                           sizeof(float));
        if (!full_ids || !full_w ||
            (st = moe_layer_backward_reroute(b, full_ids, full_w)) !=
                MOE_STATUS_OK) {
            goto done;
        }
    }
    if (p->skip_threshold > 0.0 && p->skip_renormalize) {
        moe_layer_backward_skip(b, full_w, dws);
    }
    if (p->route.router != MOE_ROUTER_TOP_K) {
        st = moe_layer_backward_route_other(b, full_ids, dws, dl);
    }
    else {
        rb = (moe_route_backward_params){
            .logits = p->save_logits, .n_tokens = T, .n_experts = E_all,
            .opt = p->route, .expert_ids = p->expert_ids, .d_weights = dws,
            .aux_coef = b->aux_coef, .z_coef = b->z_coef,
            .router_grad = b->router_grad, .d_logits = dl};
        st = moe_route_backward(&rb);
    }
    if (st != MOE_STATUS_OK) {
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
    free(full_ids);
    free(full_w);
    return st;
}
