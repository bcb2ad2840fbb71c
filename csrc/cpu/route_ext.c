/*
 * cpu/route_ext.c - CPU routing beyond token-choice top-k: expert-choice
 * routing (each expert takes its top-C tokens), dynamic-k routing (top-p and
 * probability threshold, padded to k_max) and dynamic expert skipping.
 * Scores are float64 like cpu/route.c, so selection matches the float64
 * reference; every ranking breaks ties toward the lower index.
 */
#include "moe_impl.h"

#include <math.h>
#include <string.h>

/* Tokens (or experts) per task of the parallel loops. */
#define MOE_EXT_BLOCK 64

static moe_status
moe_ext_check_finite(const double *logits, int64_t T, int32_t E)
{
    int64_t i;

    for (i = 0; i < T * E; i++) {
        if (!isfinite(logits[i])) {
            return moe_set_error(MOE_STATUS_NONFINITE,
                                 "logits must be finite, got %g at token %lld,"
                                 " expert %lld", logits[i],
                                 (long long)(i / E), (long long)(i % E));
        }
    }
    return MOE_STATUS_OK;
}


/* ---- expert choice ----------------------------------------------------- */

typedef struct moe_ec_job {
    const moe_expert_choice_params *p;
    double                         *score_t; /* (E, T) transposed scores   */
    double                         *vals;    /* (E, C) heap values         */
    double                         *block;   /* (n_tasks, block, E) scores */
    double                         *copy;    /* (E, T) rows for radix select */
} moe_ec_job;

/*
 * Scores of a block of tokens, transposed to (E, T) so that each expert
 * scans a contiguous row.  They go through a (block, E) buffer first: written
 * straight, token by token, each store of a token would land T * 8 bytes
 * from the last, all in one cache set (conflict misses made this step 3x
 * slower); from the buffer each expert writes one contiguous run.
 */
static void
moe_ec_score_task(void *ctx, int64_t task)
{
    const moe_ec_job *job = ctx;
    const moe_expert_choice_params *p = job->p;
    const int32_t E = p->n_experts;
    const int64_t T = p->n_tokens, t0 = task * MOE_EXT_BLOCK;
    const int64_t n = T - t0 < MOE_EXT_BLOCK ? T - t0 : MOE_EXT_BLOCK;
    double *buf = job->block + task * (int64_t)MOE_EXT_BLOCK * E;
    int64_t t;
    int32_t e;

    for (t = 0; t < n; t++) {
        const double *logit = p->logits + (t0 + t) * E;
        double *s = buf + t * E;
        if (p->scoring == MOE_SCORING_SIGMOID) {
            for (e = 0; e < E; e++) {
                double z = exp(-fabs(logit[e]));
                s[e] = logit[e] >= 0.0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
            }
        }
        else {
            moe_softmax_f64(logit, E, s);
        }
    }
    for (e = 0; e < E; e++) {
        double *dst = job->score_t + (int64_t)e * T + t0;
        for (t = 0; t < n; t++) {
            dst[t] = buf[t * E + e];
        }
    }
}

/*
 * (va, ia) ranks below (vb, ib): lower score, or equal score and higher
 * token index (ties go to the lower index).
 */
static inline int
moe_ec_worse(double va, int64_t ia, double vb, int64_t ib)
{
    return va < vb || (va == vb && ia > ib);
}

/* Sift element i down the heap whose root is the worst entry. */
static void
moe_ec_sift(double *v, int64_t *id, int64_t n, int64_t i)
{
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        double tv;
        int64_t ti;
        if (l < n && moe_ec_worse(v[l], id[l], v[w], id[w])) {
            w = l;
        }
        if (r < n && moe_ec_worse(v[r], id[r], v[w], id[w])) {
            w = r;
        }
        if (w == i) {
            return;
        }
        tv = v[i]; v[i] = v[w]; v[w] = tv;
        ti = id[i]; id[i] = id[w]; id[w] = ti;
        i = w;
    }
}

/*
 * Pop a heap of n entries (worst at the root) to the end, which leaves them
 * best first, and write expert e's gates (its token_ids are sorted with them).
 */
static void
moe_ec_heap_finish(const moe_expert_choice_params *p, int64_t e, double *v,
                   int64_t *id, int64_t n)
{
    int64_t j;

    for (j = n - 1; j > 0; j--) {
        double tv = v[0];
        int64_t ti = id[0];
        v[0] = v[j]; v[j] = tv;
        id[0] = id[j]; id[j] = ti;
        moe_ec_sift(v, id, j, 0);
    }
    for (j = 0; j < n; j++) {
        p->gates[e * p->capacity + j] = (float)v[j];
    }
}

/*
 * One expert: a heap of its C best tokens (root = worst kept), O(T log C);
 * tokens come in ascending order, so an equal score never displaces a kept
 * token.  Heap-sorting in place leaves the best first.
 */
static void
moe_ec_expert_heap(const moe_ec_job *job, int64_t e)
{
    const moe_expert_choice_params *p = job->p;
    const int64_t T = p->n_tokens, C = p->capacity;
    const double *s = job->score_t + e * T;
    double *v = job->vals + e * C;
    int64_t *id = p->token_ids + e * C, t, n = 0, j;

    for (t = 0; t < T; t++) {
        if (n < C) {
            /* Sift up. */
            j = n++;
            v[j] = s[t];
            id[j] = t;
            while (j > 0 && moe_ec_worse(v[j], id[j], v[(j - 1) / 2],
                                         id[(j - 1) / 2])) {
                int64_t up = (j - 1) / 2, ti = id[j];
                double tv = v[j];
                v[j] = v[up]; v[up] = tv;
                id[j] = id[up]; id[up] = ti;
                j = up;
            }
        }
        else if (s[t] > v[0]) {
            v[0] = s[t];
            id[0] = t;
            moe_ec_sift(v, id, n, 0);
        }
    }
    moe_ec_heap_finish(p, e, v, id, n);
}

/*
 * The value that sorting s (n,) descending would put at index k, for scores
 * >= 0 (probabilities, sigmoids): their bit patterns order like the values,
 * so an MSD radix select on 11-bit digits finds it in one full pass plus
 * passes over the few candidates left -- no data-dependent branches in the
 * full pass.  cand: (n,) scratch.
 */
static double
moe_ec_radix_kth(const double *s, int64_t n, int64_t k, uint64_t *cand)
{
    uint32_t hist[1 << 11];
    uint64_t u;
    int shift = 64;
    int64_t i, m;

    memcpy(cand, s, (size_t)n * sizeof(double));
    while (shift > 0 && n > 1) {
        const int w = shift >= 11 ? 11 : shift;
        const uint64_t mask = ((uint64_t)1 << w) - 1;
        int64_t digit = (int64_t)mask;
        shift -= w;
        memset(hist, 0, sizeof(uint32_t) << w);
        for (i = 0; i < n; i++) {
            hist[(cand[i] >> shift) & mask]++;
        }
        while (k >= (int64_t)hist[digit]) {
            k -= hist[digit];
            digit--;
        }
        for (i = 0, m = 0; i < n; i++) {
            cand[m] = cand[i];
            m += (int64_t)((cand[i] >> shift) & mask) == digit;
        }
        n = m;
    }
    u = cand[0];
    {
        double v;
        memcpy(&v, &u, sizeof(v));
        return v;
    }
}

/*
 * One expert: the C-th best score by radix select on a copy of its row,
 * O(T); then the tokens above it, and of those equal to it the lowest
 * indices (the tie rule), collected in token order; then a heap sort of
 * the C, best first.  O(T + C log C), against the heap's
 * O(T + C ln(T/C) log C) branchy sifts: it wins for large C.
 */
static void
moe_ec_expert_select(const moe_ec_job *job, int64_t e)
{
    const moe_expert_choice_params *p = job->p;
    const int64_t T = p->n_tokens, C = p->capacity;
    const double *s = job->score_t + e * T;
    double *v = job->vals + e * C, *copy = job->copy + e * T, kth;
    int64_t *id = p->token_ids + e * C, t, n = 0, need, j;

    kth = moe_ec_radix_kth(s, T, C - 1, (uint64_t *)copy);
    need = C;
    for (t = 0; t < T; t++) {
        need -= s[t] > kth;
    }
    /* need = how many tokens scoring exactly kth are taken (>= 1). */
    for (t = 0; t < T && n < C; t++) {
        if (s[t] > kth || (s[t] == kth && need-- > 0)) {
            v[n] = s[t];
            id[n++] = t;
        }
    }
    /* Heap sort: build with the worst entry at the root, then pop to the
     * end, which leaves the best first. */
    for (j = C / 2 - 1; j >= 0; j--) {
        moe_ec_sift(v, id, C, j);
    }
    moe_ec_heap_finish(p, e, v, id, C);
}

/*
 * Heap for small capacities (measured at T = 4096, E = 128: 1.8x faster at
 * C = 32), radix select for large (at C = 256 the whole op takes 1.04x plain
 * top-k routing; it took 1.54x with quickselect).  Both give the same tokens
 * in the same order.
 */
static void
moe_ec_expert_task(void *ctx, int64_t e)
{
    const moe_ec_job *job = ctx;
    const int64_t C = job->p->capacity;

    if (C == 0) {
        return;
    }
    if (C * 32 <= job->p->n_tokens) {
        moe_ec_expert_heap(job, e);
    }
    else {
        moe_ec_expert_select(job, e);
    }
}

moe_status
moe_cpu_route_expert_choice(const moe_expert_choice_params *p)
{
    const int64_t T = p->n_tokens, C = p->capacity;
    const int64_t n_tasks = (T + MOE_EXT_BLOCK - 1) / MOE_EXT_BLOCK;
    const int32_t E = p->n_experts;
    moe_ec_job job;
    int64_t t, j;

    MOE_TRY(moe_ext_check_finite(p->logits, T, E));
    job.p = p;
    /* Reused across calls: fresh multi-MB buffers cost their page faults
     * on every call, as much as the scoring itself. */
    job.score_t = moe_workspace(MOE_WS_ROUTE_EXT,
                                (size_t)T * E * 2 + (size_t)E * C +
                                    (size_t)n_tasks * MOE_EXT_BLOCK * E + 1,
                                sizeof(double));
    if (job.score_t == NULL) {
        return MOE_STATUS_ALLOC;
    }
    job.vals = job.score_t + (size_t)T * E;
    job.block = job.vals + (size_t)E * C;
    job.copy = job.block + (size_t)n_tasks * MOE_EXT_BLOCK * E;
    MOE_TRY(moe_pool_run(n_tasks, moe_ec_score_task, &job));
    MOE_TRY(moe_pool_run(E, moe_ec_expert_task, &job));
    for (t = 0; t < T; t++) {
        p->n_experts_per_token[t] = 0;
    }
    for (j = 0; j < (int64_t)E * C; j++) {
        p->n_experts_per_token[p->token_ids[j]]++;
    }
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_expert_choice_by_token(const moe_ec_tokens_params *p)
{
    const int64_t T = p->n_tokens, C = p->capacity, W = p->width;
    int32_t *fill = moe_alloc((size_t)T + 1, sizeof(int32_t));
    int64_t t, j;
    int32_t e;

    if (fill == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (t = 0; t < T; t++) {
        fill[t] = 0;
    }
    for (t = 0; t < T * W; t++) {
        p->expert_ids[t] = -1;
        p->weights[t] = 0.0f;
    }
    /* Experts in ascending order, so each token's slots come out sorted. */
    for (e = 0; e < p->n_experts; e++) {
        for (j = 0; j < C; j++) {
            int64_t tok = p->token_ids[(int64_t)e * C + j];
            if (fill[tok] == W) {
                free(fill);
                return moe_set_error(MOE_STATUS_INVALID_ARG,
                                     "width=%lld is less than the experts of "
                                     "token %lld", (long long)W,
                                     (long long)tok);
            }
            p->expert_ids[tok * W + fill[tok]] = e;
            p->weights[tok * W + fill[tok]] = p->gates[(int64_t)e * C + j];
            fill[tok]++;
        }
    }
    free(fill);
    return MOE_STATUS_OK;
}

/* ---- dynamic k: top-p and threshold ----------------------------------- */

typedef struct moe_rank {
    double  v;
    int32_t i;
} moe_rank;

typedef struct moe_dyn_job {
    const moe_route_dynamic_params *p;
    double                         *prob; /* (n_tasks, E)                  */
    moe_rank                       *rank; /* (n_tasks, 2E)                 */
} moe_dyn_job;

/* a ranks above b: higher probability, or equal and lower index. */
static inline int
moe_rank_better(const moe_rank *a, const moe_rank *b)
{
    return a->v > b->v || (a->v == b->v && a->i < b->i);
}

static void
moe_rank_sift(moe_rank *h, int32_t n, int32_t i)
{
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, m = i;
        moe_rank tmp;
        if (l < n && moe_rank_better(&h[l], &h[m])) {
            m = l;
        }
        if (r < n && moe_rank_better(&h[r], &h[m])) {
            m = r;
        }
        if (m == i) {
            return;
        }
        tmp = h[i]; h[i] = h[m]; h[m] = tmp;
        i = m;
    }
}

/*
 * Choose one token's experts into r (best first) and return their count.
 * Small k_max: insertion top-k_max (strict '>' keeps the lower index ahead
 * on ties), then count.  Large k_max: a max-heap over all E (O(E) to build)
 * popped only as far as the rule needs, O(E + k log E) instead of the
 * O(E k_max) of insertion or a full sort; the rank order is a total order,
 * so both paths give the same sequence.
 */
static int32_t
moe_dyn_select(const moe_route_dynamic_params *p, const double *prob,
               moe_rank *r, moe_rank *h)
{
    const int32_t E = p->n_experts, K = p->k_max;
    const int top_p = p->mode == MOE_DYNAMIC_TOP_P;
    double cum = 0.0;
    int32_t e, k = 0, len = 0, n = E;

    if (K <= 16) {
        for (e = 0; e < E; e++) {
            double v = prob[e];
            int32_t pos = len;
            if (len == K) {
                if (!(v > r[K - 1].v)) {
                    continue;
                }
                pos = K - 1;
            }
            else {
                len++;
            }
            while (pos > 0 && v > r[pos - 1].v) {
                r[pos] = r[pos - 1];
                pos--;
            }
            r[pos].v = v;
            r[pos].i = e;
        }
        while (k < K) {
            if (k >= p->k_min &&
                (top_p ? (p->p < 1.0 && cum >= p->p) : r[k].v < p->p)) {
                break;
            }
            cum += r[k++].v;
        }
        return k;
    }
    for (e = 0; e < E; e++) {
        h[e].v = prob[e];
        h[e].i = e;
    }
    for (e = E / 2 - 1; e >= 0; e--) {
        moe_rank_sift(h, E, e);
    }
    while (k < K) {
        if (k >= p->k_min &&
            (top_p ? (p->p < 1.0 && cum >= p->p) : h[0].v < p->p)) {
            break;
        }
        r[k] = h[0];
        cum += r[k++].v;
        h[0] = h[--n];
        moe_rank_sift(h, n, 0);
    }
    return k;
}

static void
moe_dyn_task(void *ctx, int64_t task)
{
    const moe_dyn_job *job = ctx;
    const moe_route_dynamic_params *p = job->p;
    const int32_t E = p->n_experts, K = p->k_max;
    double *prob = job->prob + task * E;
    moe_rank *r = job->rank + task * 2 * E; /* ranking, then heap */
    int64_t t, end = (task + 1) * MOE_EXT_BLOCK;
    int32_t j, k;

    end = end < p->n_tokens ? end : p->n_tokens;
    for (t = task * MOE_EXT_BLOCK; t < end; t++) {
        int32_t *ids = p->expert_ids + t * K;
        float *w = p->weights + t * K;
        double sum = 0.0;

        moe_softmax_f64(p->logits + t * E, E, prob);
        k = moe_dyn_select(p, prob, r, r + E);
        for (j = 0; j < k; j++) {
            sum += r[j].v;
        }
        for (j = 0; j < K; j++) {
            if (j < k) {
                ids[j] = r[j].i;
                w[j] = (float)(p->renormalize && sum > 0.0 ? r[j].v / sum
                                                           : r[j].v);
            }
            else {
                ids[j] = -1;
                w[j] = 0.0f;
            }
        }
        p->n_selected[t] = k;
    }
}

moe_status
moe_cpu_route_dynamic(const moe_route_dynamic_params *p)
{
    const int64_t n_tasks = (p->n_tokens + MOE_EXT_BLOCK - 1) / MOE_EXT_BLOCK;
    moe_dyn_job job;
    moe_status st;

    MOE_TRY(moe_ext_check_finite(p->logits, p->n_tokens, p->n_experts));
    job.p = p;
    job.prob = moe_alloc((size_t)(n_tasks + 1) * p->n_experts, sizeof(double));
    job.rank = moe_alloc((size_t)(n_tasks + 1) * 2 * p->n_experts,
                         sizeof(moe_rank));
    if (job.prob == NULL || job.rank == NULL) {
        st = MOE_STATUS_ALLOC;
    }
    else {
        st = moe_pool_run(n_tasks, moe_dyn_task, &job);
    }
    free(job.prob);
    free(job.rank);
    return st;
}

/* ---- dynamic expert skipping ------------------------------------------ */

moe_status
moe_cpu_route_skip(const moe_route_skip_params *p)
{
    const int32_t k = p->top_k;
    int64_t t, skipped = 0;
    int32_t j;

    for (t = 0; t < p->n_tokens * k; t++) {
        if (!isfinite(p->weights[t])) {
            return moe_set_error(MOE_STATUS_NONFINITE,
                                 "weights must be finite, got %g at token "
                                 "%lld, slot %d", (double)p->weights[t],
                                 (long long)(t / k), (int)(t % k));
        }
    }
    /* O(T k), memory-bound: a serial loop is as fast as the pool here. */
    for (t = 0; t < p->n_tokens; t++) {
        int32_t *ids = p->expert_ids + t * k;
        float *w = p->weights + t * k;
        double sum = 0.0;
        for (j = 0; j < k; j++) {
            if (ids[j] < 0) {
                continue;
            }
            if ((double)w[j] < p->threshold) {
                ids[j] = -1;
                w[j] = 0.0f;
                skipped++;
            }
            else {
                sum += w[j];
            }
        }
        if (p->renormalize && sum > 0.0) {
            for (j = 0; j < k; j++) {
                if (ids[j] >= 0) {
                    w[j] = (float)(w[j] / sum);
                }
            }
        }
    }
    *p->n_skipped = skipped;
    return MOE_STATUS_OK;
}
