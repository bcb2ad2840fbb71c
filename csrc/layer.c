/*
 * layer.c - the whole sparse MoE layer composed from the public ops:
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
    fp.activation = p->activation;
    fp.act_alpha = p->act_alpha;
    fp.act_limit = p->act_limit;
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
    for (t = 0; t < T; t++) {
        float s = g ? (float)(1.0 / (1.0 + exp(-g[t]))) : 1.0f;
        for (i = 0; i < d; i++) {
            p->out[t * d + i] += s * tmp[t * d + i];
        }
    }
    free(g);
    return MOE_STATUS_OK;
}

moe_status
moe_layer_forward(const moe_layer_params *p)
{
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts, k = p->top_k;
    moe_router_params rp;
    moe_route_params qp;
    moe_dispatch_params dp;
    moe_ffn_params fp;
    moe_combine_params cp;
    double *logits = NULL;
    int64_t *offsets = NULL, *token_index = NULL, *position = NULL, n_rows;
    float *ys = NULL, *tmp = NULL;
    moe_status st = MOE_STATUS_ALLOC;

    if (p->experts == NULL || p->experts->n_experts != E ||
        p->experts->d_model != d ||
        (p->shared != NULL && (p->shared->n_experts != 1 ||
                               p->shared->d_model != d))) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the packed experts do "
                             "not match n_experts=%d, d_model=%lld", E,
                             (long long)d);
    }
    logits = moe_workspace(MOE_WS_LAYER_LOGITS, (size_t)T * E, sizeof(double));
    offsets = moe_alloc((size_t)E + 1, sizeof(int64_t));
    position = moe_alloc((size_t)T * k, sizeof(int64_t));
    if (!logits || !offsets || !position) {
        goto done;
    }

    rp.x = p->x;
    rp.weight = p->router_weight;
    rp.bias = p->router_bias;
    rp.n_tokens = T;
    rp.d_model = d;
    rp.n_experts = E;
    rp.logits = logits;
    if ((st = moe_router_logits(&rp)) != MOE_STATUS_OK) {
        goto done;
    }

    qp.logits = logits;
    qp.expert_bias = p->expert_bias;
    qp.allowed = NULL;
    qp.n_tokens = T;
    qp.n_experts = E;
    qp.top_k = k;
    qp.n_groups = p->n_groups;
    qp.topk_groups = p->topk_groups;
    qp.scoring = p->scoring;
    qp.renormalize = p->renormalize;
    qp.routed_scaling = p->routed_scaling;
    qp.capacity_factor = p->capacity_factor;
    qp.expert_ids = p->expert_ids;
    qp.weights = p->weights;
    qp.counts = p->counts;
    qp.n_dropped = p->n_dropped;
    qp.aux_loss = p->aux_loss;
    qp.z_loss = p->z_loss;
    if ((st = moe_route_topk(&qp)) != MOE_STATUS_OK) {
        if (st == MOE_STATUS_NONFINITE) {
            /* Say where non-finite logits come from in a layer call. */
            char detail[256];
            snprintf(detail, sizeof(detail), "%s", moe_last_error());
            moe_set_error(st, "%s (the logits are x @ router_weight.T: is there "
                          "NaN or Inf in x or router_weight?)", detail);
        }
        goto done;
    }

    dp.expert_ids = p->expert_ids;
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
    fp.activation = p->activation;
    fp.act_alpha = p->act_alpha;
    fp.act_limit = p->act_limit;
    fp.lora = p->lora;
    fp.out = ys;
    if ((st = moe_ffn_grouped(&fp)) != MOE_STATUS_OK) {
        goto done;
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
    return st;
}
