/*
 * cpu/route_backward.c - the backward of top-k routing (d_weights and the
 * loss coefficients -> d_logits) and of the router linear.  The selection
 * is held fixed; see moe_route_backward_params in moe.h for the math.
 * Float64 throughout, tokens in order: the same bits for any thread count.
 */
#include "moe_impl.h"

#include <math.h>
#include <string.h>

/* Scores of one token: softmax p (E,), sigmoid s (E,) when sigmoid; lse. */
static double
moe_rb_scores(const double *l, int32_t E, double *p, double *s)
{
    int32_t e;

    for (e = 0; s != NULL && e < E; e++) {
        const double z = exp(-fabs(l[e]));
        s[e] = l[e] >= 0.0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
    }
    return moe_softmax_f64(l, E, p);
}

void
moe_softmax_backward_f64(const double *p, const double *g, int32_t E,
                         double *dl)
{
    double dot = 0.0;
    int32_t e;

    for (e = 0; e < E; e++) {
        dot += g[e] * p[e];
    }
    for (e = 0; e < E; e++) {
        dl[e] += p[e] * (g[e] - dot);
    }
}

moe_status
moe_cpu_route_backward(const moe_route_backward_params *p)
{
    const moe_route_options *o = &p->opt;
    const int64_t T = p->n_tokens;
    const int32_t E = p->n_experts, k = o->top_k;
    const int sig = o->scoring == MOE_SCORING_SIGMOID;
    const int sat = o->scoring == MOE_SCORING_SOFTMAX_AFTER_TOPK;
    const int32_t *ids = p->expert_ids;
    int32_t *full = NULL;
    float *full_w = NULL;
    double *buf = NULL, *f;
    int64_t t, *counts = NULL, dropped = 0;
    double aux = 0.0, z = 0.0;
    moe_status st = MOE_STATUS_ALLOC;
    int32_t e, j;

    memset(p->d_logits, 0, sizeof(double) * (size_t)(T * E));
    if (T == 0) {
        return MOE_STATUS_OK;
    }
    buf = moe_alloc((size_t)(5 * E + 2 * k), sizeof(double));
    counts = moe_alloc((size_t)E, sizeof(int64_t));
    if (buf == NULL || counts == NULL) {
        goto done;
    }
    for (t = 0; t < T * k && o->capacity_factor <= 0.0; t++) {
        if (ids[t] < 0) { /* a slot skipped after routing */
            break;
        }
    }
    if (o->capacity_factor > 0.0 || t < T * k) {
        /* the selection before capacity (or skipping) emptied slots: route
         * again */
        moe_route_params rp;
        full = moe_alloc((size_t)(T * k), sizeof(int32_t));
        full_w = moe_alloc((size_t)(T * k), sizeof(float));
        if (full == NULL || full_w == NULL) {
            goto done;
        }
        rp = (moe_route_params){
            .logits = p->logits, .n_tokens = T, .n_experts = E, .opt = *o,
            .expert_ids = full, .weights = full_w, .counts = counts,
            .n_dropped = &dropped, .aux_loss = &aux, .z_loss = &z};
        rp.opt.capacity_factor = 0.0;
        if ((st = moe_cpu_route_topk(&rp)) != MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
        ids = full;
    }
    for (e = 0; e < E; e++) {
        counts[e] = 0;
    }
    for (t = 0; t < T * k; t++) {
        if (ids[t] < 0 || ids[t] >= E) {
            st = moe_set_error(MOE_STATUS_INVALID_ARG, "expert_ids[%lld, %lld] "
                               "= %d is not a selected expert in 0..%d",
                               (long long)(t / k), (long long)(t % k), ids[t],
                               E - 1);
            goto done;
        }
        counts[ids[t]]++;
    }
    f = buf + 3 * E; /* d aux / d P_e, the same for every token */
    for (e = 0; e < E; e++) {
        f[e] = p->aux_coef * E * ((double)counts[e] / ((double)T * k)) /
               (double)T;
    }
    for (t = 0; t < T; t++) {
        const double *l = p->logits + t * E;
        double *dl = p->d_logits + t * E;
        double *pr = buf, *s = buf + E, *g = buf + 2 * E;
        double *dw = buf + 4 * E, *w = dw + k;
        const int32_t *sel = ids + t * k;
        const double lse = moe_rb_scores(l, E, pr, sig ? s : NULL);
        double *m = w + k; /* (E,) straight-through: d loss / d mask */
        double S = 0.0, dot = 0.0;

        for (j = 0; j < k; j++) {
            dw[j] = p->expert_ids[t * k + j] >= 0
                        ? (double)p->d_weights[t * k + j] * o->routed_scaling
                        : 0.0;
        }
        memset(g, 0, sizeof(double) * (size_t)E);
        if (sat) { /* w = softmax of the selected logits */
            for (j = 0; j < k; j++) {
                g[j] = l[sel[j]];
            }
            moe_softmax_f64(g, k, w);
            memset(g, 0, sizeof(double) * (size_t)k);
            for (j = 0; j < k; j++) {
                dot += dw[j] * w[j];
            }
            for (j = 0; j < k; j++) {
                dl[sel[j]] += w[j] * (dw[j] - dot);
            }
            for (j = 0; j < k; j++) { /* the weights as routed (over c) */
                m[j] = w[j];
            }
        }
        else {
            const double *score = sig ? s : pr;
            for (j = 0; j < k; j++) {
                S += score[sel[j]];
                dot += dw[j] * score[sel[j]];
            }
            for (j = 0; j < k; j++) { /* d score of the selected experts */
                g[sel[j]] += o->renormalize && S > 0.0
                                 ? dw[j] / S - dot / (S * S) : dw[j];
            }
            for (j = 0; j < k; j++) {
                m[j] = o->renormalize && S > 0.0 ? score[sel[j]] / S
                                                 : score[sel[j]];
            }
            if (sig) {
                for (e = 0; e < E; e++) {
                    dl[e] += g[e] * s[e] * (1.0 - s[e]);
                }
            }
            else {
                moe_softmax_backward_f64(pr, g, E, dl);
            }
        }
        if (p->router_grad == MOE_ROUTER_GRAD_STRAIGHT_THROUGH) {
            /* dL/dm_e = w_j * d_weights_j (dw holds c * d_weights, m the
             * weights over c), through dq/dlogits */
            for (j = 0; j < k; j++) {
                m[j] *= dw[j];
            }
            memset(g, 0, sizeof(double) * (size_t)E);
            for (j = 0; j < k; j++) {
                g[sel[j]] += m[j];
            }
            if (sig) {
                for (e = 0; e < E; e++) {
                    dl[e] += g[e] * s[e] * (1.0 - s[e]);
                }
            }
            else {
                moe_softmax_backward_f64(pr, g, E, dl);
            }
        }
        if (p->aux_coef != 0.0) {
            if (sig) { /* P = s / sum(s) */
                double ss = 0.0, fs = 0.0;
                for (e = 0; e < E; e++) {
                    ss += s[e];
                    fs += f[e] * s[e];
                }
                for (e = 0; ss > 0.0 && e < E; e++) {
                    dl[e] += (f[e] / ss - fs / (ss * ss)) * s[e] * (1.0 - s[e]);
                }
            }
            else {
                moe_softmax_backward_f64(pr, f, E, dl);
            }
        }
        if (p->z_coef != 0.0) {
            const double c = p->z_coef * 2.0 * lse / (double)T;
            for (e = 0; e < E; e++) {
                dl[e] += c * pr[e];
            }
        }
    }
    st = MOE_STATUS_OK;
done:
    free(buf);
    free(counts);
    free(full);
    free(full_w);
    return st;
}

moe_status
moe_cpu_router_backward(const moe_router_backward_params *p)
{
    const int64_t T = p->n_tokens, d = p->d_model;
    const int32_t E = p->n_experts;
    float *dl = moe_alloc((size_t)(T * E) + 1, sizeof(float));
    moe_mm_seg seg;
    moe_status st = MOE_STATUS_OK;
    int64_t i, t;

    if (dl == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (i = 0; i < T * E; i++) {
        dl[i] = (float)p->d_logits[i];
    }
    if (p->dx != NULL) { /* dx (T, d) = dL (T, E) @ W (E, d) */
        seg = moe_mm_term(dl, E, 1, p->weight, d, E);
        st = moe_mm(&seg, 1, T, d, p->dx, d);
    }
    if (st == MOE_STATUS_OK && p->d_weight != NULL) { /* dL^T (E, T) @ x */
        seg = moe_mm_term(dl, 1, E, p->x, d, T);
        st = moe_mm(&seg, 1, E, d, p->d_weight, d);
    }
    if (st == MOE_STATUS_OK && p->d_bias != NULL) {
        int32_t e;
        for (e = 0; e < E; e++) {
            double s = 0.0;
            for (t = 0; t < T; t++) {
                s += p->d_logits[t * E + e];
            }
            p->d_bias[e] = (float)s;
        }
    }
    free(dl);
    return st;
}
