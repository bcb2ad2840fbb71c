/*
 * cpu/route.c - CPU routing: router logits, softmax / sigmoid scores,
 * selection-only expert bias, group-limited top-k, renormalisation and
 * scaling, capacity dropping and the load-balancing / z losses.
 * Scores are computed in float64 so that selection matches the float64
 * reference; ties always break toward the lower index.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

/* ---- router logits ---------------------------------------------------- */

/* Tokens per task of the parallel routing loops. */
#define MOE_ROUTE_BLOCK 64

/*
 * Logits in float64 so that selection matches the float64 reference; the
 * blocked dot products (widening x and w as they load) come from the kernel
 * set (cpu/gemm.inc).
 */
typedef struct moe_logits_job {
    const moe_router_params *p;
    moe_router_fn            logits;
} moe_logits_job;

static void
moe_logits_task(void *ctx, int64_t t)
{
    const moe_logits_job *job = ctx;
    const moe_router_params *p = job->p;
    const int64_t t0 = t * MOE_ROUTE_BLOCK, d = p->d_model;
    int64_t n = p->n_tokens - t0 < MOE_ROUTE_BLOCK ? p->n_tokens - t0
                                                  : MOE_ROUTE_BLOCK;
    int64_t i;

    job->logits(p->x + t0 * d, n, p->weight, p->n_experts, d,
                p->logits + t0 * p->n_experts);
    if (p->bias != NULL) {
        for (i = 0; i < n * p->n_experts; i++) {
            p->logits[t0 * p->n_experts + i] += (double)p->bias[i % p->n_experts];
        }
    }
}

moe_status
moe_cpu_router_logits(const moe_router_params *p)
{
    moe_logits_job job;

    job.p = p;
    job.logits = moe_cpu_kernels()->router;
    return moe_pool_run((p->n_tokens + MOE_ROUTE_BLOCK - 1) / MOE_ROUTE_BLOCK,
                        moe_logits_task, &job);
}

/* ---- top-k ------------------------------------------------------------ */

double
moe_softmax_f64(const double *logit, int32_t n, double *prob)
{
    double mx = logit[0], sum = 0.0;
    int32_t e;

    for (e = 1; e < n; e++) {
        mx = logit[e] > mx ? logit[e] : mx;
    }
    for (e = 0; e < n; e++) {
        prob[e] = exp(logit[e] - mx);
        sum += prob[e];
    }
    for (e = 0; e < n; e++) {
        prob[e] /= sum;
    }
    return mx + log(sum);
}

/*
 * Insert candidate i into the descending list ids/vals of length *len (at
 * most k).  Strict '>' keeps an earlier (lower) index ahead of a later one
 * with an equal value, which is the tie rule.
 */
static void
moe_topk_insert(int32_t *ids, double *vals, int32_t *len, int32_t k,
                int32_t i, double v)
{
    int32_t pos = *len;

    if (pos == k) {
        if (!(v > vals[k - 1])) {
            return;
        }
        pos = k - 1;
    }
    else {
        (*len)++;
    }
    while (pos > 0 && v > vals[pos - 1]) {
        ids[pos] = ids[pos - 1];
        vals[pos] = vals[pos - 1];
        pos--;
    }
    ids[pos] = i;
    vals[pos] = v;
}

/* Per-token scratch: scores, selection scores, group state, top-k lists. */
typedef struct moe_route_scratch {
    double  *score;   /* (E,) probabilities / sigmoid / logits            */
    double  *sel;     /* (E,) selection score = score + bias              */
    double  *gscore;  /* (n_groups,)                                      */
    uint8_t *allowed; /* (n_groups,)                                      */
    int32_t *gids;    /* (topk_groups,)                                   */
    double  *gvals;   /* (topk_groups,)                                   */
    double  *kvals;   /* (top_k,)                                         */
} moe_route_scratch;

/*
 * Route one token: fills ids (k,) and w (k,) (before capacity) and adds the
 * token's aux-loss probabilities to psum (E,).  allowed (E,) or NULL masks
 * the selection only (the scores, and so the losses, keep every expert).
 * Returns log-sum-exp of the logits for the z-loss.
 */
static double
moe_route_token(const moe_route_params *p, const double *logit,
                const uint8_t *allowed, moe_route_scratch *s, int32_t *ids,
                float *w, double *psum)
{
    const moe_route_options *o = &p->opt;
    const int32_t E = p->n_experts, k = o->top_k;
    const int32_t G = p->n_experts / o->n_groups;
    double mx = logit[0], sum = 0.0, lse, wsum;
    double *wd = s->kvals + k; /* kvals holds 2k: top-k values, weights */
    int32_t e, g, j, len;

    for (e = 1; e < E; e++) {
        mx = logit[e] > mx ? logit[e] : mx;
    }
    for (e = 0; e < E; e++) {
        sum += exp(logit[e] - mx);
    }
    lse = mx + log(sum);

    /* Scores, and the aux-loss probabilities P (unbiased). */
    if (o->scoring == MOE_SCORING_SIGMOID) {
        double ssum = 0.0;
        for (e = 0; e < E; e++) {
            /* Stable both ways: exp of a negative number only. */
            double z = exp(-fabs(logit[e]));
            s->score[e] = logit[e] >= 0.0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
            ssum += s->score[e];
        }
        /* All scores can underflow to 0 for logits below about -745. */
        for (e = 0; ssum > 0.0 && e < E; e++) {
            psum[e] += s->score[e] / ssum;
        }
    }
    else {
        for (e = 0; e < E; e++) {
            double pe = exp(logit[e] - mx) / sum;
            psum[e] += pe;
            s->score[e] = o->scoring == MOE_SCORING_SOFTMAX ? pe : logit[e];
        }
    }
    for (e = 0; e < E; e++) {
        s->sel[e] = s->score[e] + (o->expert_bias ? o->expert_bias[e] : 0.0);
    }

    /* Group-limited: score groups by the sum of their top-2 selections. */
    len = 0;
    if (o->n_groups > 1) {
        for (g = 0; g < o->n_groups; g++) {
            const double *sg = s->sel + (int64_t)g * G;
            double b1 = sg[0], b2 = -INFINITY;
            for (e = 1; e < G; e++) {
                if (sg[e] > b1) {
                    b2 = b1;
                    b1 = sg[e];
                }
                else if (sg[e] > b2) {
                    b2 = sg[e];
                }
            }
            s->gscore[g] = G >= 2 ? b1 + b2 : b1;
            s->allowed[g] = 0;
        }
        for (g = 0; g < o->n_groups; g++) {
            moe_topk_insert(s->gids, s->gvals, &len, o->topk_groups, g,
                            s->gscore[g]);
        }
        for (j = 0; j < len; j++) {
            s->allowed[s->gids[j]] = 1;
        }
    }

    len = 0;
    for (e = 0; e < E; e++) {
        if ((o->n_groups > 1 && !s->allowed[e / G]) ||
            (allowed != NULL && !allowed[e])) {
            continue;
        }
        moe_topk_insert(ids, s->kvals, &len, k, e, s->sel[e]);
    }

    /* Gate weights from the unbiased scores of the selected experts. */
    if (o->scoring == MOE_SCORING_SOFTMAX_AFTER_TOPK) {
        double m = logit[ids[0]];
        for (j = 1; j < k; j++) {
            m = logit[ids[j]] > m ? logit[ids[j]] : m;
        }
        for (j = 0; j < k; j++) {
            wd[j] = exp(logit[ids[j]] - m);
        }
    }
    else {
        for (j = 0; j < k; j++) {
            wd[j] = s->score[ids[j]];
        }
    }
    wsum = 0.0;
    for (j = 0; j < k; j++) {
        wsum += wd[j];
    }
    if ((o->renormalize || o->scoring == MOE_SCORING_SOFTMAX_AFTER_TOPK) &&
        wsum > 0.0) {
        for (j = 0; j < k; j++) {
            wd[j] /= wsum;
        }
    }
    for (j = 0; j < k; j++) {
        w[j] = (float)(wd[j] * o->routed_scaling);
    }
    return lse;
}

/* Per-task state of the parallel per-token loop. */
typedef struct moe_route_job {
    const moe_route_params *p;
    moe_route_scratch      *scratch; /* one per task                      */
    double                 *psum;    /* (n_tasks, E) aux-loss P partials  */
    double                 *zsum;    /* (n_tasks,) z-loss partials        */
} moe_route_job;

static void
moe_route_task(void *ctx, int64_t t)
{
    const moe_route_job *job = ctx;
    const moe_route_params *p = job->p;
    const moe_route_options *o = &p->opt;
    const int32_t E = p->n_experts, k = o->top_k;
    double *psum = job->psum + t * E, z = 0.0;
    int64_t i, end = (t + 1) * MOE_ROUTE_BLOCK;
    int32_t e;

    end = end < p->n_tokens ? end : p->n_tokens;
    for (e = 0; e < E; e++) {
        psum[e] = 0.0;
    }
    for (i = t * MOE_ROUTE_BLOCK; i < end; i++) {
        double lse = moe_route_token(p, p->logits + i * E,
                                     o->allowed ? o->allowed +
                                         (o->mask_rows ? o->mask_rows[i]
                                                       : i) * E : NULL,
                                     &job->scratch[t],
                                     p->expert_ids + i * k,
                                     p->weights + i * k, psum);
        z += lse * lse;
    }
    job->zsum[t] = z;
}

moe_status
moe_cpu_route_topk(const moe_route_params *p)
{
    const moe_route_options *o = &p->opt;
    const int64_t T = p->n_tokens;
    const int32_t E = p->n_experts, k = o->top_k, G = o->n_groups;
    const int64_t n_tasks = (T + MOE_ROUTE_BLOCK - 1) / MOE_ROUTE_BLOCK;
    /* doubles of scratch per task: score, sel (E each), gscore, gvals (G
     * each), kvals (2k); then bytes: allowed (G), gids (G int32) */
    const size_t nd = (size_t)E * 2 + (size_t)G * 2 + (size_t)k * 2;
    moe_route_job job;
    double *dbuf = NULL, zsum = 0.0, aux = 0.0;
    int32_t *ibuf = NULL;
    uint8_t *abuf = NULL;
    int64_t *selected = NULL, t, dropped = 0, cap = 0;
    moe_status st = MOE_STATUS_ALLOC;
    int32_t e;

    memset(&job, 0, sizeof(job));
    for (t = 0; t < T * E; t++) {
        if (!isfinite(p->logits[t])) {
            return moe_set_error(MOE_STATUS_NONFINITE,
                                 "logits must be finite, got %g at token %lld,"
                                 " expert %lld", p->logits[t],
                                 (long long)(t / E), (long long)(t % E));
        }
    }
    if (o->expert_bias) {
        for (e = 0; e < E; e++) {
            if (!isfinite(o->expert_bias[e])) {
                return moe_set_error(MOE_STATUS_NONFINITE,
                                     "expert_bias must be finite, got %g at "
                                     "expert %d", (double)o->expert_bias[e], e);
            }
        }
    }

    job.p = p;
    job.scratch = moe_alloc((size_t)n_tasks + 1, sizeof(moe_route_scratch));
    job.psum = moe_alloc((size_t)(n_tasks + 1) * E, sizeof(double));
    job.zsum = moe_alloc((size_t)n_tasks + 1, sizeof(double));
    dbuf = moe_alloc((size_t)(n_tasks + 1) * nd, sizeof(double));
    ibuf = moe_alloc((size_t)(n_tasks + 1) * G, sizeof(int32_t));
    abuf = moe_alloc((size_t)(n_tasks + 1) * G, 1);
    selected = moe_alloc((size_t)E, sizeof(int64_t));
    if (!job.scratch || !job.psum || !job.zsum || !dbuf || !ibuf || !abuf ||
        !selected) {
        goto done;
    }
    for (t = 0; t < n_tasks; t++) {
        moe_route_scratch *s = &job.scratch[t];
        s->score = dbuf + t * nd;
        s->sel = s->score + E;
        s->gscore = s->sel + E;
        s->gvals = s->gscore + G;
        s->kvals = s->gvals + G;
        s->gids = ibuf + t * G;
        s->allowed = abuf + t * G;
    }
    if ((st = moe_pool_run(n_tasks, moe_route_task, &job)) != MOE_STATUS_OK) {
        goto done;
    }

    /* Capacity: walk (token, slot) pairs in order; overflow is dropped. */
    for (e = 0; e < E; e++) {
        selected[e] = 0;
        p->counts[e] = 0;
    }
    if (o->capacity_factor > 0.0) {
        /* A capacity past 2^62 (or inf) drops nothing: don't overflow the cast. */
        double c = ceil(o->capacity_factor * (double)T * (double)k / (double)E);
        cap = c < 4611686018427387904.0 ? (int64_t)c : INT64_MAX;
    }
    for (t = 0; t < T * k; t++) {
        e = p->expert_ids[t];
        selected[e]++;
        if (o->capacity_factor > 0.0 && p->counts[e] >= cap) {
            p->expert_ids[t] = -1;
            p->weights[t] = 0.0f;
            dropped++;
            continue;
        }
        p->counts[e]++;
    }

    /* Losses: task partials summed in task order (fixed for a given T). */
    if (T > 0) {
        for (e = 0; e < E; e++) {
            double P = 0.0;
            for (t = 0; t < n_tasks; t++) {
                P += job.psum[t * E + e];
            }
            aux += ((double)selected[e] / ((double)T * k)) * (P / T);
        }
        aux *= E;
        for (t = 0; t < n_tasks; t++) {
            zsum += job.zsum[t];
        }
        zsum /= (double)T;
    }
    *p->n_dropped = dropped;
    *p->aux_loss = aux;
    *p->z_loss = zsum;
    st = MOE_STATUS_OK;
done:
    free(job.scratch);
    free(job.psum);
    free(job.zsum);
    free(dbuf);
    free(ibuf);
    free(abuf);
    free(selected);
    return st;
}

moe_status
moe_expert_bias_update(double *bias, const int64_t *counts, int32_t n_experts,
                       double rate)
{
    double mean = 0.0;
    int32_t e;

    if (n_experts <= 0) {
        return MOE_STATUS_OK;
    }
    for (e = 0; e < n_experts; e++) {
        mean += (double)counts[e];
    }
    mean /= n_experts;
    for (e = 0; e < n_experts; e++) {
        double d = mean - (double)counts[e];
        double sgn = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0);
        bias[e] += rate * sgn;
    }
    return MOE_STATUS_OK;
}
