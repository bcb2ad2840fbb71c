/*
 * compose/layer.c - the whole sparse MoE layer composed from the public ops:
 * router logits -> route -> dispatch -> grouped FFN (gathering the routed
 * rows as it packs them) -> combine, plus shared experts with their
 * optional sigmoid gate.  Backend-neutral: it only calls csrc/moe.h.
 */
#include "moe_impl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* out += shared(x) [* sigmoid(x . shared_gate)], token by token. */
static moe_status
moe_layer_shared(const moe_layer_params *p, float *tmp)
{
    const int64_t T = p->n_tokens, d = p->d_model;
    int64_t offsets[2] = {0, T}, t, i;
    moe_ffn_params fp;
    double *g = NULL;
    moe_status st;

    memset(&fp, 0, sizeof(fp));
    fp.x = p->x;
    fp.token_index = NULL;
    fp.n_tokens = T;
    fp.offsets = offsets;
    fp.n_rows = T;
    fp.experts = p->shared;
    fp.act = p->act;
    fp.lora = NULL;
    fp.out = tmp;
    MOE_TRY(moe_ffn_grouped(&fp));

    if (p->shared_gate != NULL) {
        moe_router_params rp;
        g = moe_alloc((size_t)T, sizeof(double));
        if (g == NULL) {
            return MOE_STATUS_ALLOC;
        }
        rp.x = p->x;
        rp.weight = p->shared_gate;
        rp.bias = NULL;
        rp.n_tokens = T;
        rp.d_model = d;
        rp.n_experts = 1;
        rp.logits = g;
        if ((st = moe_router_logits(&rp)) != MOE_STATUS_OK) {
            free(g);
            return st;
        }
    }
    if (p->save_shared != NULL) {
        memcpy(p->save_shared, tmp, sizeof(float) * (size_t)T * (size_t)d);
    }
    for (t = 0; t < T; t++) {
        float s = g ? (float)(1.0 / (1.0 + exp(-g[t]))) : 1.0f;
        for (i = 0; i < d; i++) {
            p->out[t * d + i] += s * tmp[t * d + i];
        }
    }
    free(g);
    return MOE_STATUS_OK;
}

/*
 * Null experts, after the combine: zero adds nothing, copy adds w * x,
 * constant adds w * v, slot by slot in order; n_real counts the rest.
 */
static void
moe_layer_null(const moe_layer_params *p, int32_t k)
{
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts;
    int64_t t, i;
    int32_t j;

    for (t = 0; t < T; t++) {
        int32_t real = 0;
        for (j = 0; j < k; j++) {
            const int32_t e = p->expert_ids[t * k + j];
            const float w = p->weights[t * k + j];
            const float *v;
            if (e < 0) {
                continue;
            }
            if (e < E) {
                real++;
                continue;
            }
            switch (p->null_kinds[e - E]) {
            case MOE_NULL_COPY:     v = p->x + t * d; break;
            case MOE_NULL_CONSTANT: v = p->null_values + (e - E) * d; break;
            default:                v = NULL; break;
            }
            for (i = 0; v != NULL && i < d; i++) {
                p->out[t * d + i] += w * v[i];
            }
        }
        if (p->n_real != NULL) {
            p->n_real[t] = real;
        }
    }
}

/*
 * The losses of a router other than top-k, over the assignments it made
 * (ids (T, k), -1 = none), from the same float64 logits (T, E): counts[e]
 * the assignments to e, z = mean_t lse_t^2, aux = E sum_e f_e P_e with
 * f_e = counts[e] / kept and P_e the mean over tokens of softmax_e; tokens
 * in order, experts in order.
 */
static moe_status
moe_layer_losses(const moe_layer_params *p, const double *logits, int32_t E,
                 int32_t k)
{
    const int64_t T = p->n_tokens;
    double z = 0.0, aux = 0.0, *P = NULL;
    int64_t t, i, kept = 0;
    int32_t e;

    memset(p->counts, 0, sizeof(int64_t) * (size_t)E);
    for (i = 0; i < T * k; i++) {
        if (p->expert_ids[i] >= 0) {
            p->counts[p->expert_ids[i]]++;
            kept++;
        }
    }
    if (kept > 0 && (P = moe_alloc((size_t)E, sizeof(double))) == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (e = 0; P != NULL && e < E; e++) {
        P[e] = 0.0;
    }
    for (t = 0; t < T; t++) {
        const double *l = logits + t * E;
        double mx = l[0], s = 0.0, lse;
        for (e = 1; e < E; e++) {
            mx = l[e] > mx ? l[e] : mx;
        }
        for (e = 0; e < E; e++) {
            s += exp(l[e] - mx);
        }
        lse = mx + log(s);
        z += lse * lse;
        for (e = 0; P != NULL && e < E; e++) {
            P[e] += exp(l[e] - mx) / s;
        }
    }
    for (e = 0; P != NULL && e < E; e++) {
        aux += ((double)p->counts[e] / (double)kept) * (P[e] / (double)T);
    }
    *p->aux_loss = E * aux;
    *p->z_loss = T > 0 ? z / (double)T : 0.0;
    *p->n_dropped = 0;
    free(P);
    return MOE_STATUS_OK;
}

/*
 * Expert choice, top-p or threshold routing on the logits (T, E): ids and
 * weights into p->expert_ids / p->weights, (T, *k) with *k the slots per
 * token; routed_scaling applied (float32, as the weights are).
 */
static moe_status
moe_layer_route_other(const moe_layer_params *p, const double *logits,
                      int32_t E, int32_t *k)
{
    const moe_route_options *o = &p->route;
    const int64_t T = p->n_tokens;
    moe_status st = MOE_STATUS_OK;
    int64_t i;

    if (o->allowed != NULL || o->n_groups > 1 || o->expert_bias != NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "allowed, n_groups and "
                             "expert_bias are options of the top_k router");
    }
    if (o->router == MOE_ROUTER_EXPERT_CHOICE) {
        moe_expert_choice_params ep;
        moe_ec_tokens_params bp;
        const double c = o->capacity_factor * (double)T / (double)E;
        const int64_t cap = c >= (double)T ? T : (int64_t)ceil(c);
        int32_t *per = moe_alloc((size_t)T + 1, sizeof(int32_t));
        int64_t *tok = moe_alloc((size_t)E * (size_t)cap + 1, sizeof(int64_t));
        float *gates = moe_alloc((size_t)E * (size_t)cap + 1, sizeof(float));
        int32_t width = 1;

        if (!(o->capacity_factor >= 0.0)) {
            st = moe_set_error(MOE_STATUS_INVALID_ARG, "expert choice needs "
                               "capacity_factor >= 0, got %g",
                               o->capacity_factor);
        }
        else if (!per || !tok || !gates) {
            st = MOE_STATUS_ALLOC;
        }
        if (st == MOE_STATUS_OK) {
            ep.logits = logits;
            ep.n_tokens = T;
            ep.n_experts = E;
            ep.capacity = cap;
            ep.scoring = o->scoring;
            ep.token_ids = tok;
            ep.gates = gates;
            ep.n_experts_per_token = per;
            st = moe_route_expert_choice(&ep);
        }
        for (i = 0; st == MOE_STATUS_OK && i < T; i++) {
            width = per[i] > width ? per[i] : width;
        }
        if (st == MOE_STATUS_OK) {
            bp.token_ids = tok;
            bp.gates = gates;
            bp.n_tokens = T;
            bp.n_experts = E;
            bp.capacity = cap;
            bp.width = width;
            bp.expert_ids = p->expert_ids;
            bp.weights = p->weights;
            st = moe_expert_choice_by_token(&bp);
        }
        free(per);
        free(tok);
        free(gates);
        *k = width;
    }
    else if (o->router == MOE_ROUTER_TOP_P || o->router == MOE_ROUTER_THRESHOLD) {
        moe_route_dynamic_params dp;
        int32_t *n_sel = moe_alloc((size_t)T + 1, sizeof(int32_t));

        if (n_sel == NULL) {
            return MOE_STATUS_ALLOC;
        }
        dp.logits = logits;
        dp.n_tokens = T;
        dp.n_experts = E;
        dp.mode = o->router == MOE_ROUTER_TOP_P ? MOE_DYNAMIC_TOP_P
                                                : MOE_DYNAMIC_THRESHOLD;
        dp.p = o->router_p;
        dp.k_min = o->k_min;
        dp.k_max = o->top_k;
        dp.renormalize = o->renormalize;
        dp.expert_ids = p->expert_ids;
        dp.weights = p->weights;
        dp.n_selected = n_sel;
        st = moe_route_dynamic(&dp);
        free(n_sel);
        *k = o->top_k;
    }
    else {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "unknown router %d",
                             (int)o->router);
    }
    if (st != MOE_STATUS_OK) {
        return st;
    }
    if (o->routed_scaling != 1.0) {
        const float s = (float)o->routed_scaling;
        for (i = 0; i < T * *k; i++) {
            p->weights[i] = p->weights[i] * s;
        }
    }
    return moe_layer_losses(p, logits, E, *k);
}

moe_status
moe_layer_route(const moe_layer_params *p, const double *logits, int32_t *k)
{
    const int32_t E_all = p->n_experts + (p->n_null > 0 ? p->n_null : 0);
    moe_route_params qp;
    moe_status st;

    if (p->route.router != MOE_ROUTER_TOP_K) {
        return moe_layer_route_other(p, logits, E_all, k);
    }
    qp = (moe_route_params){
        .logits = logits, .n_tokens = p->n_tokens, .n_experts = E_all,
        .opt = p->route, .expert_ids = p->expert_ids, .weights = p->weights,
        .counts = p->counts, .n_dropped = p->n_dropped,
        .aux_loss = p->aux_loss, .z_loss = p->z_loss};
    if ((st = moe_route_topk(&qp)) == MOE_STATUS_NONFINITE) {
        /* Say where non-finite logits come from in a layer call. */
        char detail[256];
        snprintf(detail, sizeof(detail), "%s", moe_last_error());
        moe_set_error(st, "%s (the logits are x @ router_weight.T: is there "
                      "NaN or Inf in x or router_weight?)", detail);
    }
    *k = p->route.top_k;
    return st;
}

moe_status
moe_layer_forward(const moe_layer_params *p)
{
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts;
    int32_t k = p->route.top_k;
    const int32_t E_all = p->n_experts + (p->n_null > 0 ? p->n_null : 0);
    int32_t *real_ids = NULL;
    moe_router_params rp;
    moe_dispatch_params dp;
    moe_ffn_params fp;
    moe_combine_params cp;
    double *logits = NULL;
    int64_t *offsets = NULL, *token_index = NULL, *position = NULL, n_rows;
    float *ys = NULL, *tmp = NULL;
    int32_t i_null;
    moe_status st = MOE_STATUS_ALLOC;

    if (p->experts == NULL || p->experts->n_experts != E ||
        p->experts->d_model != d ||
        (p->shared != NULL && (p->shared->n_experts != 1 ||
                               p->shared->d_model != d))) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the packed experts do "
                             "not match n_experts=%d, d_model=%lld", E,
                             (long long)d);
    }
    if (p->n_null < 0 || (p->n_null > 0 && p->null_kinds == NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "n_null must be >= 0, "
                             "with null_kinds");
    }
    for (i_null = 0; i_null < p->n_null; i_null++) {
        const int32_t kind = p->null_kinds[i_null];
        if (kind < 0 || kind >= MOE_NULL_COUNT ||
            (kind == MOE_NULL_CONSTANT && p->null_values == NULL)) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "null expert %d: kind "
                                 "%d is not zero (0), copy (1) or constant (2) "
                                 "with values", i_null, kind);
        }
    }
    logits = moe_workspace(MOE_WS_LAYER_LOGITS, (size_t)T * E_all,
                           sizeof(double));
    offsets = moe_alloc((size_t)E + 1, sizeof(int64_t));
    if (!logits || !offsets) {
        goto done;
    }

    rp.x = p->x;
    rp.weight = p->router_weight;
    rp.bias = p->router_bias;
    rp.n_tokens = T;
    rp.d_model = d;
    rp.n_experts = E_all;
    rp.logits = logits;
    if ((st = moe_router_logits(&rp)) != MOE_STATUS_OK) {
        goto done;
    }

    if (p->save_logits != NULL) {
        memcpy(p->save_logits, logits, sizeof(double) * (size_t)T * E_all);
    }
    if ((st = moe_layer_route(p, logits, &k)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->width != NULL) {
        *p->width = k;
    }
    st = MOE_STATUS_ALLOC;
    position = moe_alloc((size_t)T * k, sizeof(int64_t));
    if (position == NULL) {
        goto done;
    }
    if (p->skip_threshold > 0.0) {
        moe_route_skip_params sp;
        int64_t i, skipped = 0;
        sp.expert_ids = p->expert_ids;
        sp.weights = p->weights;
        sp.n_tokens = T;
        sp.top_k = k;
        sp.threshold = p->skip_threshold;
        sp.renormalize = p->skip_renormalize;
        sp.n_skipped = &skipped;
        if ((st = moe_route_skip(&sp)) != MOE_STATUS_OK) {
            goto done;
        }
        memset(p->counts, 0, sizeof(int64_t) * (size_t)E_all);
        for (i = 0; i < T * k; i++) {
            if (p->expert_ids[i] >= 0) {
                p->counts[p->expert_ids[i]]++;
            }
        }
        if (p->n_skipped != NULL) {
            *p->n_skipped = skipped;
        }
    }
    dp.expert_ids = p->expert_ids;
    if (p->n_null > 0) {
        /* null experts are never dispatched */
        int64_t i;
        st = MOE_STATUS_ALLOC;
        real_ids = moe_alloc((size_t)T * k, sizeof(int32_t));
        if (real_ids == NULL) {
            goto done;
        }
        for (i = 0; i < T * k; i++) {
            real_ids[i] = p->expert_ids[i] < E ? p->expert_ids[i] : -1;
        }
        dp.expert_ids = real_ids;
    }
    dp.n_tokens = T;
    dp.top_k = k;
    dp.n_experts = E;
    dp.offsets = offsets;
    dp.position = position;
    dp.token_index = NULL;
    if ((st = moe_dispatch_count(&dp)) != MOE_STATUS_OK) {
        goto done;
    }
    n_rows = offsets[E];
    st = MOE_STATUS_ALLOC;
    token_index = moe_alloc((size_t)n_rows, sizeof(int64_t));
    ys = moe_workspace(MOE_WS_LAYER_Y, (size_t)n_rows * (size_t)d,
                       sizeof(float));
    if (!token_index || !ys) {
        goto done;
    }
    dp.token_index = token_index;
    if ((st = moe_dispatch_build(&dp)) != MOE_STATUS_OK) {
        goto done;
    }

    fp.x = p->x;
    fp.token_index = token_index;
    fp.n_tokens = T;
    fp.offsets = offsets;
    fp.n_rows = n_rows;
    fp.experts = p->experts;
    fp.act = p->act;
    fp.lora = p->lora;
    fp.out = ys;
    fp.save_gu = p->save_gu;
    if ((st = moe_ffn_grouped(&fp)) != MOE_STATUS_OK) {
        goto done;
    }

    if (p->save_y != NULL) {
        memcpy(p->save_y, ys, sizeof(float) * (size_t)n_rows * (size_t)d);
    }
    if (p->out_norm != NULL) {
        /* gate * ||y||, summed per expert in (token, slot) order */
        int64_t t, i;
        int32_t j;
        memset(p->out_norm, 0, sizeof(double) * (size_t)E);
        for (t = 0; t < T; t++) {
            for (j = 0; j < k; j++) {
                const int64_t r = position[t * k + j];
                double ss = 0.0;
                if (r < 0) {
                    continue;
                }
                for (i = 0; i < d; i++) {
                    ss += (double)ys[r * d + i] * ys[r * d + i];
                }
                p->out_norm[p->expert_ids[t * k + j]] +=
                    (double)p->weights[t * k + j] * sqrt(ss);
            }
        }
    }

    cp.y = ys;
    cp.position = position;
    cp.weights = p->weights;
    cp.n_rows = n_rows;
    cp.n_tokens = T;
    cp.top_k = k;
    cp.d_model = d;
    cp.out = p->out;
    if ((st = moe_combine(&cp)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->n_null > 0 || p->n_real != NULL) {
        moe_layer_null(p, k);
    }

    if (p->shared != NULL) {
        st = MOE_STATUS_ALLOC;
        tmp = moe_workspace(MOE_WS_LAYER_SHARED, (size_t)T * (size_t)d,
                            sizeof(float));
        if (tmp == NULL) {
            goto done;
        }
        st = moe_layer_shared(p, tmp);
    }
done:
    free(offsets);
    free(token_index);
    free(position);
    free(real_ids);
    return st;
}
