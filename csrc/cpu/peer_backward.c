/*
 * cpu/peer_backward.c - PEER's backward on the CPU, the selection held fixed.
 * Per token t, head h and slot j (expert e = i n + jj, from the forward's
 * ids), with q = W_q[h] x recomputed in float64:
 *   s_j = K1[i] . q1 + K2[jj] . q2,  g = softmax(s),  a_j = u_e . x,
 *   c_j = v_e . dy,  dg_j = act(a_j) c_j,  ds_j = g_j (dg_j - sum g dg),
 *   da_j = g_j c_j act'(a_j);
 *   d v_e += g_j act(a_j) dy,  d u_e += da_j x,  dx += da_j u_e,
 *   dK1[i] += ds_j q1,  dK2[jj] += ds_j q2,  dq += ds_j [K1[i], K2[jj]],
 *   dx += W_q^T dq,  dW_q[h] += dq x^T.
 * Phase 1 (tasks over tokens) computes every (t, h, j)'s coefficients and
 * the token's own sums; phase 2 reduces them into the used experts' rows,
 * the sub-keys and W_q, each in (t, h, j) order.
 */
#include "moe_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MOE_PEER_BWD_BLOCK 16 /* tokens per phase-1 task                */
#define MOE_PEER_BWD_ROWS  64 /* expert rows per phase-2 task           */

typedef struct moe_peer_bwd {
    const moe_peer_backward_params *b;
    const moe_peer_params *p;
    int64_t  T, d, dout, M;   /* tokens, widths, entries T H k            */
    int32_t  H, dk, hk, n, k;
    double  *q;               /* (T, H, dk) the queries                    */
    float   *dq;              /* (T, H, dk) their gradient                 */
    double  *ds;              /* (M,) d score of each entry                */
    double  *cu, *cv;         /* (M,) d u and d v coefficients             */
    int64_t *row;             /* (M,) the entry's row among the used      */
    int64_t *order;           /* (M,) entries by row, stable               */
    int64_t *offs;            /* (n_used + 1,)                             */
    float   *dxu;             /* (T, d) the u part of dx                   */
    int      failed;
} moe_peer_bwd;

static double
moe_peer_bwd_dot(const float *a, const double *b, int64_t n)
{
    double s = 0.0;
    int64_t i;

    for (i = 0; i < n; i++) {
        s += (double)a[i] * b[i];
    }
    return s;
}

/* act(a) and act'(a) */
static double
moe_peer_bwd_act(moe_peer_activation act, double a, double *deriv)
{
    double sg;

    switch (act) {
    case MOE_PEER_ACTIVATION_RELU:
        *deriv = a > 0.0 ? 1.0 : 0.0;
        return a > 0.0 ? a : 0.0;
    case MOE_PEER_ACTIVATION_GELU:
        sg = 0.5 * (1.0 + erf(a * 0.70710678118654752440));
        *deriv = sg + a * exp(-0.5 * a * a) * 0.39894228040143267794;
        return a * sg;
    case MOE_PEER_ACTIVATION_SILU:
        sg = a >= 0.0 ? 1.0 / (1.0 + exp(-a)) : exp(a) / (1.0 + exp(a));
        *deriv = sg * (1.0 + a * (1.0 - sg));
        return a * sg;
    default:
        *deriv = 1.0;
        return a;
    }
}

/* Phase 1: tokens [16 task, 16 task + 16). */
static void
moe_peer_bwd_tokens(void *ctx, int64_t task)
{
    moe_peer_bwd *w = ctx;
    const moe_peer_params *p = w->p;
    const int64_t d = w->d, dout = w->dout;
    const int32_t H = w->H, dk = w->dk, hk = w->hk, n = w->n, k = w->k;
    const int64_t t1 = (task + 1) * MOE_PEER_BWD_BLOCK < w->T
                           ? (task + 1) * MOE_PEER_BWD_BLOCK : w->T;
    double *xd = NULL, *dyd = NULL, *acc = NULL, *sc = NULL, *dg = NULL;
    double *dqd = NULL;
    int64_t t, i;
    int32_t h, j, c;

    xd = moe_alloc((size_t)(d + dout + d + 3 * (int64_t)k + dk) + 1,
                   sizeof(double));
    if (xd == NULL) {
        __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    dyd = xd + d;
    acc = dyd + dout;
    sc = acc + d;
    dg = sc + k;
    dqd = dg + 2 * (int64_t)k; /* (sc: scores then gates, dg: dg, da) */
    for (t = task * MOE_PEER_BWD_BLOCK; t < t1; t++) {
        const float *x = p->x + t * d, *dy = w->b->dy + t * dout;
        for (i = 0; i < d; i++) {
            xd[i] = x[i];
            acc[i] = 0.0;
        }
        for (i = 0; i < dout; i++) {
            dyd[i] = dy[i];
        }
        for (h = 0; h < H; h++) {
            const int32_t ks = p->n_key_sets == 1 ? 0 : h;
            const float *k1 = p->sub_keys_1 + (int64_t)ks * n * hk;
            const float *k2 = p->sub_keys_2 + (int64_t)ks * n * hk;
            const int32_t *ids = w->b->expert_ids + (t * H + h) * k;
            const int64_t m0 = (t * H + h) * k;
            double *q = w->q + (t * H + h) * dk, mx = -INFINITY, sum = 0.0;
            double sgd = 0.0;
            for (c = 0; c < dk; c++) {
                q[c] = moe_peer_bwd_dot(p->w_query + ((int64_t)h * dk + c) * d,
                                        xd, d);
                dqd[c] = 0.0;
            }
            for (j = 0; j < k; j++) {
                const int64_t ii = ids[j] / n, jj = ids[j] % n;
                sc[j] = moe_peer_bwd_dot(k1 + ii * hk, q, hk) +
                        moe_peer_bwd_dot(k2 + jj * hk, q + hk, hk);
                mx = sc[j] > mx ? sc[j] : mx;
            }
            for (j = 0; j < k; j++) {
                sc[j] = exp(sc[j] - mx);
                sum += sc[j];
            }
            for (j = 0; j < k; j++) { /* gates, then dg and da */
                const float *u = p->u + (int64_t)ids[j] * d;
                const float *v = p->v + (int64_t)ids[j] * dout;
                double deriv, a, act, cj;
                sc[j] /= sum;
                a = moe_peer_bwd_dot(u, xd, d);
                act = moe_peer_bwd_act(p->activation, a, &deriv);
                cj = moe_peer_bwd_dot(v, dyd, dout);
                dg[j] = act * cj;
                dg[k + j] = sc[j] * cj * deriv;
                sgd += sc[j] * dg[j];
                w->cv[m0 + j] = sc[j] * act;
                w->cu[m0 + j] = dg[k + j];
                for (i = 0; i < d; i++) {
                    acc[i] += dg[k + j] * (double)u[i];
                }
            }
            for (j = 0; j < k; j++) {
                const int64_t ii = ids[j] / n, jj = ids[j] % n;
                const double dsj = sc[j] * (dg[j] - sgd);
                w->ds[m0 + j] = dsj;
                for (c = 0; c < hk; c++) {
                    dqd[c] += dsj * (double)k1[ii * hk + c];
                    dqd[hk + c] += dsj * (double)k2[jj * hk + c];
                }
            }
            for (c = 0; c < dk; c++) {
                w->dq[(t * H + h) * dk + c] = (float)dqd[c];
            }
        }
        for (i = 0; i < d; i++) {
            w->dxu[t * d + i] = (float)acc[i];
        }
    }
    free(xd);
}

/* Phase 2a: rows [64 task, 64 task + 64) of d u and d v. */
static void
moe_peer_bwd_rows(void *ctx, int64_t task)
{
    moe_peer_bwd *w = ctx;
    const moe_peer_backward_params *b = w->b;
    const int64_t r1 = (task + 1) * MOE_PEER_BWD_ROWS < b->n_used
                           ? (task + 1) * MOE_PEER_BWD_ROWS : b->n_used;
    const int64_t d = w->d, dout = w->dout, per_t = (int64_t)w->H * w->k;
    double *au = moe_alloc((size_t)(d + dout), sizeof(double)), *av;
    int64_t r, q, i;

    if (au == NULL) {
        __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    av = au + d;
    for (r = task * MOE_PEER_BWD_ROWS; r < r1; r++) {
        memset(au, 0, sizeof(double) * (size_t)(d + dout));
        for (q = w->offs[r]; q < w->offs[r + 1]; q++) {
            const int64_t m = w->order[q], t = m / per_t;
            const float *x = w->p->x + t * d, *dy = b->dy + t * dout;
            for (i = 0; b->d_u != NULL && i < d; i++) {
                au[i] += w->cu[m] * (double)x[i];
            }
            for (i = 0; b->d_v != NULL && i < dout; i++) {
                av[i] += w->cv[m] * (double)dy[i];
            }
        }
        for (i = 0; b->d_u != NULL && i < d; i++) {
            b->d_u[r * d + i] = (float)au[i];
        }
        for (i = 0; b->d_v != NULL && i < dout; i++) {
            b->d_v[r * dout + i] = (float)av[i];
        }
    }
    free(au);
}

/* Phase 2b: task 2 s + half: sub-key set s, that half. */
static void
moe_peer_bwd_keys(void *ctx, int64_t task)
{
    moe_peer_bwd *w = ctx;
    const moe_peer_params *p = w->p;
    const int32_t ks = (int32_t)(task / 2), half = (int32_t)(task % 2);
    const int32_t H = w->H, hk = w->hk, n = w->n, k = w->k, dk = w->dk;
    float *out = (half ? w->b->d_sub_keys_2 : w->b->d_sub_keys_1) +
                 (int64_t)ks * n * hk;
    double *acc = moe_alloc((size_t)((int64_t)n * hk) + 1, sizeof(double));
    int64_t t, i;
    int32_t h, j, c;

    if (acc == NULL) {
        __atomic_store_n(&w->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    memset(acc, 0, sizeof(double) * (size_t)((int64_t)n * hk));
    for (t = 0; t < w->T; t++) {
        for (h = 0; h < H; h++) {
            const int32_t *ids = w->b->expert_ids + (t * H + h) * k;
            const double *q = w->q + (t * H + h) * dk + (half ? hk : 0);
            if (p->n_key_sets != 1 && h != ks) {
                continue;
            }
            for (j = 0; j < k; j++) {
                const int64_t key = half ? ids[j] % n : ids[j] / n;
                const double dsj = w->ds[(t * H + h) * k + j];
                for (c = 0; c < hk; c++) {
                    acc[key * hk + c] += dsj * q[c];
                }
            }
        }
    }
    for (i = 0; i < (int64_t)n * hk; i++) {
        out[i] = (float)acc[i];
    }
    free(acc);
}

static int
moe_peer_cmp_i64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

moe_status
moe_peer_used(const int32_t *ids, int64_t n, int64_t *used, int64_t *n_used)
{
    int64_t *all, i, u = 0;

    if ((all = moe_alloc((size_t)n + 1, sizeof(int64_t))) == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (i = 0; i < n; i++) {
        all[i] = ids[i];
    }
    qsort(all, (size_t)n, sizeof(int64_t), moe_peer_cmp_i64);
    for (i = 0; i < n; i++) {
        if (i == 0 || all[i] != all[i - 1]) {
            if (used != NULL) {
                used[u] = all[i];
            }
            u++;
        }
    }
    *n_used = u;
    free(all);
    return MOE_STATUS_OK;
}

/* The entries' rows among the used experts, and the entries by row. */
static moe_status
moe_peer_bwd_group(moe_peer_bwd *w)
{
    const moe_peer_backward_params *b = w->b;
    int64_t m, r;

    for (m = 0; m < w->M; m++) {
        const int64_t e = b->expert_ids[m];
        int64_t lo = 0, hi = b->n_used;
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (b->used[mid] < e) {
                lo = mid + 1;
            }
            else {
                hi = mid;
            }
        }
        if (lo == b->n_used || b->used[lo] != e) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "expert %lld of "
                                 "entry %lld is not in the used list",
                                 (long long)e, (long long)m);
        }
        w->row[m] = lo;
    }
    memset(w->offs, 0, sizeof(int64_t) * (size_t)(b->n_used + 1));
    for (m = 0; m < w->M; m++) {
        w->offs[w->row[m] + 1]++;
    }
    for (r = 0; r < b->n_used; r++) {
        w->offs[r + 1] += w->offs[r];
    }
    {   /* a stable counting sort: entries of a row in (t, h, j) order */
        int64_t *fill = moe_alloc((size_t)b->n_used + 1, sizeof(int64_t));
        if (fill == NULL) {
            return MOE_STATUS_ALLOC;
        }
        memcpy(fill, w->offs, sizeof(int64_t) * (size_t)b->n_used);
        for (m = 0; m < w->M; m++) {
            w->order[fill[w->row[m]]++] = m;
        }
        free(fill);
    }
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_peer_backward(const moe_peer_backward_params *b)
{
    const moe_peer_params *p = b->forward;
    moe_peer_bwd w;
    moe_mm_seg seg;
    moe_status st = MOE_STATUS_ALLOC;
    int64_t m, i;
    int32_t h;

    memset(&w, 0, sizeof(w));
    w.b = b;
    w.p = p;
    w.T = p->n_tokens;
    w.d = p->d_model;
    w.dout = p->d_out;
    w.H = p->n_heads;
    w.dk = p->d_key;
    w.hk = p->d_key / 2;
    w.n = p->n_sub_keys;
    w.k = p->top_k;
    w.M = w.T * w.H * w.k;
    for (m = 0; m < w.M; m++) {
        if (b->expert_ids[m] < 0 ||
            b->expert_ids[m] >= (int64_t)p->n_sub_keys * p->n_sub_keys) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "expert_ids[%lld] = "
                                 "%d is not an expert id", (long long)m,
                                 b->expert_ids[m]);
        }
    }
    w.q = moe_alloc((size_t)(w.T * w.H * w.dk) + 1, sizeof(double));
    w.dq = moe_alloc((size_t)(w.T * w.H * w.dk) + 1, sizeof(float));
    w.ds = moe_alloc((size_t)w.M + 1, sizeof(double));
    w.cu = moe_alloc((size_t)w.M + 1, sizeof(double));
    w.cv = moe_alloc((size_t)w.M + 1, sizeof(double));
    w.row = moe_alloc((size_t)w.M + 1, sizeof(int64_t));
    w.order = moe_alloc((size_t)w.M + 1, sizeof(int64_t));
    w.offs = moe_alloc((size_t)b->n_used + 1, sizeof(int64_t));
    w.dxu = moe_alloc((size_t)(w.T * w.d) + 1, sizeof(float));
    if (!w.q || !w.dq || !w.ds || !w.cu || !w.cv || !w.row || !w.order ||
        !w.offs || !w.dxu) {
        goto done;
    }
    if ((st = moe_peer_bwd_group(&w)) != MOE_STATUS_OK) {
        goto done;
    }
    st = moe_pool_run((w.T + MOE_PEER_BWD_BLOCK - 1) / MOE_PEER_BWD_BLOCK,
                      moe_peer_bwd_tokens, &w);
    if (st == MOE_STATUS_OK && w.failed) {
        st = moe_set_error(MOE_STATUS_ALLOC, "PEER backward: out of memory "
                           "for a task");
    }
    if (st != MOE_STATUS_OK) {
        goto done;
    }
    if (b->d_u != NULL || b->d_v != NULL) {
        st = moe_pool_run((b->n_used + MOE_PEER_BWD_ROWS - 1) /
                          MOE_PEER_BWD_ROWS, moe_peer_bwd_rows, &w);
    }
    if (st == MOE_STATUS_OK && b->d_sub_keys_1 != NULL &&
        b->d_sub_keys_2 != NULL) {
        st = moe_pool_run(2 * (int64_t)p->n_key_sets, moe_peer_bwd_keys, &w);
    }
    if (st == MOE_STATUS_OK && w.failed) {
        st = moe_set_error(MOE_STATUS_ALLOC, "PEER backward: out of memory "
                           "for a task");
    }
    /* dW_q[h] (d_key, d) = dq_h^T X over the tokens */
    for (h = 0; st == MOE_STATUS_OK && b->d_w_query != NULL && h < w.H; h++) {
        seg = moe_mm_term(w.dq + (int64_t)h * w.dk, 1, (int64_t)w.H * w.dk,
                          p->x, w.d, w.T);
        st = moe_mm(&seg, 1, w.dk, w.d, b->d_w_query + (int64_t)h * w.dk * w.d,
                    w.d);
    }
    /* dx = dQ W_q (heads' queries side by side) + the u part */
    if (st == MOE_STATUS_OK && b->dx != NULL) {
        seg = moe_mm_term(w.dq, (int64_t)w.H * w.dk, 1, p->w_query, w.d,
                          (int64_t)w.H * w.dk);
        st = moe_mm(&seg, 1, w.T, w.d, b->dx, w.d);
        for (i = 0; st == MOE_STATUS_OK && i < w.T * w.d; i++) {
            b->dx[i] += w.dxu[i];
        }
    }
done:
    free(w.q);
    free(w.dq);
    free(w.ds);
    free(w.cu);
    free(w.cv);
    free(w.row);
    free(w.order);
    free(w.offs);
    free(w.dxu);
    return st;
}
