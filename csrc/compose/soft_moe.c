/*
 * compose/soft_moe.c - Soft MoE and Mixture of Tokens (moe.h,
 * moe_soft_moe_forward), a composer beside compose/layer.c and lora.c: every
 * slot is a softmax-weighted mix of a group's tokens, every token a
 * softmax-weighted mix of the slots' expert outputs.  The logit, slot and
 * combine GEMMs run on the public grouped linear and the experts on the grouped
 * FFN; this file adds the two softmaxes (float64, on the pool) and packs the
 * GEMMs' right-hand matrices straight into panels -- the one place a composer
 * still knows the CPU panel layout (cpu/kernels.h: the panel width), because no
 * public op packs a strided B in caller memory yet.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

/* Tokens per task of the combine softmax and of the output scatter. */
#define MOE_SOFT_BLOCK 64
/* The authors' l2 normalisation: v * rsqrt(sum v^2 + eps). */
#define MOE_SOFT_NORM_EPS 1e-6

typedef struct moe_soft_job {
    const moe_soft_moe_params *p;
    int64_t  G, M, T, d;       /* groups, tokens per group, tokens, d_model */
    int32_t  E, s, S;          /* experts, slots per expert, all slots      */
    int64_t  gstride, tstride; /* x row of token t of group g:
                                  g * gstride + t * tstride                 */
    const float *logits;       /* (T, S) x @ phi, rows as x                 */
    double  *xn;               /* (T,) 1 / |x_t| with normalize, or NULL    */
    const double *phin;        /* (S,) 1 / |phi_j| with normalize           */
    double  *cbuf;             /* (T, S) combine softmax scratch            */
    float   *cw;               /* (T, S) combine weights, rows as x         */
    float   *cw_expert;        /* (T, E) m == 1: C summed per expert        */
    float   *dt;               /* (G, S, M) D^T of each group               */
    double  *dbuf;             /* (G, M + 2, S) dispatch scratch            */
    int64_t  n_ctasks;         /* combine-softmax tasks (then G dispatch)   */
    int64_t *bad;              /* (n_ctasks,) first non-finite index or -1  */
    const float *tmp;          /* (T, d) strided grouping: Y in group order */
} moe_soft_job;

/*
 * A right-hand matrix packed in place.  The grouped linear computes
 * out = x @ w_g^T from w_g packed in panels (moe_impl.h: (n_groups,
 * down_panels, d_in, nr), float32 columns in order).  Here w_g = B_g^T for a
 * row-major B_g (K, N), so panel c is columns [c nr, c nr + nr) of B_g's
 * rows, k-major: a copy of row slices, with no transposed B ever formed and
 * no allocation (moe_linear_pack would need B^T).  Row k of group g is at
 * src + g * gs + (k / kb) * kbs + (k % kb) * ks (kb: rows per block, for
 * the slot outputs, whose rows come expert by expert).
 */
typedef struct moe_soft_panels {
    const float *src;
    int64_t      gs, kb, kbs, ks;
    moe_experts  w;            /* the packed linear (n_groups, N, K)        */
} moe_soft_panels;

static void
moe_soft_panels_init(moe_soft_panels *b, int32_t n_groups, int64_t K,
                     int64_t N, float *panels)
{
    memset(b, 0, sizeof(*b));
    b->w.dtype = MOE_DTYPE_F32;
    b->w.nr = moe_cpu_kernels()->nr;
    b->w.linear = 1;
    b->w.n_experts = n_groups;
    b->w.d_model = N;
    b->w.d_ff = K;
    b->w.down_panels = (N + b->w.nr - 1) / b->w.nr;
    b->w.down = panels;
}

/* Floats of a packed (n_groups, K, N) B. */
static int64_t
moe_soft_panels_size(int64_t n_groups, int64_t K, int64_t N)
{
    const int64_t nr = moe_cpu_kernels()->nr;
    return n_groups * ((N + nr - 1) / nr) * K * nr;
}

/* Rows of B per packing task. */
#define MOE_SOFT_PACK_ROWS 16

/*
 * Task: rows [k0, k0 + 16) of group g into every panel, zero-padded past
 * column N.  Each row of B is read once, front to back, and each panel gets
 * 16 consecutive rows (a contiguous run): a panel-at-a-time order would read
 * one line from each of K rows a page apart, at a fraction of the bandwidth.
 */
static void
moe_soft_panels_task(void *ctx, int64_t task)
{
    const moe_soft_panels *b = ctx;
    const int64_t nr = b->w.nr, K = b->w.d_ff, N = b->w.d_model;
    const int64_t per = (K + MOE_SOFT_PACK_ROWS - 1) / MOE_SOFT_PACK_ROWS;
    const int64_t g = task / per, k0 = (task % per) * MOE_SOFT_PACK_ROWS;
    const int64_t k1 = K - k0 < MOE_SOFT_PACK_ROWS ? K : k0 + MOE_SOFT_PACK_ROWS;
    float *panels = (float *)b->w.down + g * b->w.down_panels * K * nr;
    int64_t k, c;

    for (k = k0; k < k1; k++) {
        const float *row = b->src + g * b->gs + (k / b->kb) * b->kbs +
                           (k % b->kb) * b->ks;
        for (c = 0; c < b->w.down_panels; c++) {
            const int64_t n = N - c * nr < nr ? N - c * nr : nr;
            float *dst = panels + (c * K + k) * nr;
            int64_t j;
            for (j = 0; j < n; j++) {
                dst[j] = row[c * nr + j];
            }
            for (; j < nr; j++) {
                dst[j] = 0.0f;
            }
        }
    }
}

static moe_status
moe_soft_panels_pack(moe_soft_panels *b)
{
    const int64_t per = (b->w.d_ff + MOE_SOFT_PACK_ROWS - 1) /
                        MOE_SOFT_PACK_ROWS;
    return moe_pool_run(b->w.down_panels > 0 ? b->w.n_experts * per : 0,
                        moe_soft_panels_task, b);
}

/* out (n_rows, N) = rows of x (through token_index if not NULL) times B_g,
 * rows of group g at [offsets[g], offsets[g + 1]). */
static moe_status
moe_soft_gemm(const float *x, const int64_t *token_index, int64_t n_tokens,
              const int64_t *offsets, int64_t n_rows, const moe_soft_panels *b,
              float *out)
{
    moe_linear_params gp;

    memset(&gp, 0, sizeof(gp));
    gp.x = x;
    gp.token_index = token_index;
    gp.n_tokens = n_tokens;
    gp.offsets = offsets;
    gp.n_rows = n_rows;
    gp.weights = &b->w;
    gp.out = out;
    return moe_linear_grouped(&gp);
}

/* The logit of x row r and slot j, in float64, with the row's factor f. */
static inline double
moe_soft_logit(const moe_soft_job *job, int64_t r, int32_t j, double f)
{
    double z = (double)job->logits[r * job->S + j] * f;
    return job->phin != NULL ? z * job->phin[j] : z;
}

/* The factor of row r: scale / |x_r| with normalize, over the temperature. */
static inline double
moe_soft_row_factor(const moe_soft_job *job, int64_t r)
{
    const moe_soft_moe_params *p = job->p;
    return (job->xn != NULL ? p->scale * job->xn[r] : 1.0) / p->temperature;
}

/* 1 / sqrt(sum v^2 + eps) of x rows, a block of tokens per task. */
static void
moe_soft_norm_task(void *ctx, int64_t task)
{
    const moe_soft_job *job = ctx;
    const int64_t t1 = (task + 1) * MOE_SOFT_BLOCK < job->T
                           ? (task + 1) * MOE_SOFT_BLOCK : job->T;
    int64_t t, i;

    for (t = task * MOE_SOFT_BLOCK; t < t1; t++) {
        const float *x = job->p->x + t * job->d;
        double sum = 0.0;
        for (i = 0; i < job->d; i++) {
            sum += (double)x[i] * (double)x[i];
        }
        job->xn[t] = 1.0 / sqrt(sum + MOE_SOFT_NORM_EPS);
    }
}

/*
 * Combine weights of a block of x rows: softmax over the S slots.  With
 * m == 1 also their sum per expert (the one FFN output of that expert).
 */
static void
moe_soft_combine_softmax(const moe_soft_job *job, int64_t task)
{
    const int32_t S = job->S;
    const int64_t r1 = (task + 1) * MOE_SOFT_BLOCK < job->T
                           ? (task + 1) * MOE_SOFT_BLOCK : job->T;
    int64_t r;
    int32_t j, e, q;

    for (r = task * MOE_SOFT_BLOCK; r < r1; r++) {
        const double f = moe_soft_row_factor(job, r);
        double *z = job->cbuf + r * S, mx = -INFINITY, sum = 0.0;
        float *c = job->cw + r * S;
        for (j = 0; j < S; j++) {
            z[j] = moe_soft_logit(job, r, j, f);
            if (!isfinite(z[j])) {
                job->bad[task] = r * S + j;
                return;
            }
            mx = z[j] > mx ? z[j] : mx;
        }
        for (j = 0; j < S; j++) {
            z[j] = exp(z[j] - mx);
            sum += z[j];
        }
        for (j = 0; j < S; j++) {
            z[j] /= sum;
            c[j] = (float)z[j];
        }
        if (job->cw_expert != NULL) {
            for (e = 0; e < job->E; e++) {
                double ce = 0.0;
                for (q = 0; q < job->s; q++) {
                    ce += z[e * job->s + q];
                }
                job->cw_expert[r * job->E + e] = (float)ce;
            }
        }
    }
}

/*
 * Dispatch weights of group g: softmax over its M tokens, slot by slot,
 * sums in token order.  Written as D^T (S, M) for the slot GEMM, and as D
 * in x's row order when the caller asked for it.
 */
static void
moe_soft_dispatch_softmax(const moe_soft_job *job, int64_t g)
{
    const moe_soft_moe_params *p = job->p;
    const int64_t M = job->M;
    const int32_t S = job->S;
    double *z = job->dbuf + g * (M + 2) * S, *mx = z + M * S, *sum = mx + S;
    float *dt = job->dt + g * S * M;
    int64_t t;
    int32_t j;

    for (j = 0; j < S; j++) {
        mx[j] = -INFINITY;
        sum[j] = 0.0;
    }
    for (t = 0; t < M; t++) {
        const int64_t r = g * job->gstride + t * job->tstride;
        const double f = moe_soft_row_factor(job, r);
        for (j = 0; j < S; j++) {
            z[t * S + j] = moe_soft_logit(job, r, j, f);
            mx[j] = z[t * S + j] > mx[j] ? z[t * S + j] : mx[j];
        }
    }
    for (t = 0; t < M; t++) {
        for (j = 0; j < S; j++) {
            z[t * S + j] = exp(z[t * S + j] - mx[j]);
            sum[j] += z[t * S + j];
        }
    }
    for (t = 0; t < M; t++) {
        const int64_t r = g * job->gstride + t * job->tstride;
        for (j = 0; j < S; j++) {
            float w = (float)(z[t * S + j] / sum[j]);
            dt[(int64_t)j * M + t] = w;
            if (p->dispatch != NULL) {
                p->dispatch[r * S + j] = w;
            }
        }
    }
}

/* Tasks [0, n_ctasks): combine softmax; then one dispatch task per group
 * (none with m == 1, where D is 1). */
static void
moe_soft_softmax_task(void *ctx, int64_t task)
{
    const moe_soft_job *job = ctx;

    if (task < job->n_ctasks) {
        moe_soft_combine_softmax(job, task);
    }
    else {
        moe_soft_dispatch_softmax(job, task - job->n_ctasks);
    }
}

/* Strided grouping: Y rows in group order (g, t) back to x's order. */
static void
moe_soft_scatter_task(void *ctx, int64_t task)
{
    const moe_soft_job *job = ctx;
    const int64_t r1 = (task + 1) * MOE_SOFT_BLOCK < job->T
                           ? (task + 1) * MOE_SOFT_BLOCK : job->T;
    int64_t r;

    for (r = task * MOE_SOFT_BLOCK; r < r1; r++) {
        const int64_t g = r / job->M, t = r % job->M;
        memcpy(job->p->out + (g * job->gstride + t * job->tstride) * job->d,
               job->tmp + r * job->d, sizeof(float) * (size_t)job->d);
    }
}

/* Carve aligned pieces out of one workspace buffer (base NULL: sizing
 * only, *used counts the bytes). */
static void *
moe_soft_carve(char *base, size_t *used, size_t count, size_t size)
{
    void *at = base != NULL ? base + *used : NULL;
    *used += (count * size + 63) & ~(size_t)63;
    return at;
}

static moe_status moe_soft_backward_rest(const moe_soft_job *job,
                                         const moe_soft_moe_backward_params *b,
                                         const float *slots,
                                         const int64_t *token_index,
                                         const int64_t *offsets);

/* The forward, or with b the backward (which recomputes steps 1-3). */
static moe_status
moe_soft_moe_run(const moe_soft_moe_params *p,
                 const moe_soft_moe_backward_params *b)
{
    const int64_t G = p->n_groups, M = p->group_size, T = G * M;
    const int64_t d = p->d_model;
    const int32_t E = p->n_experts, s = p->slots_per_expert, S = E * s;
    const int mixing = M > 1;
    /* rows of expert outputs: every slot, or with m == 1 every token once */
    const int64_t n_rows = mixing ? G * S : G * E;
    const int strided = p->grouping == MOE_SOFT_GROUPS_STRIDED;
    moe_soft_job job;
    moe_soft_panels bp;
    moe_ffn_params fp;
    moe_combine_params cp;
    char *base = NULL;
    size_t used;
    float *logits, *panels, *slots = NULL, *ys, *tmp = NULL;
    int64_t *offsets, *position = NULL, *token_index, *rows = NULL;
    int64_t i, g, t;
    double *phin = NULL;
    int32_t j, e, q;
    int pass;

    if (T == 0) {
        return MOE_STATUS_OK;
    }
    memset(&job, 0, sizeof(job));
    job.p = p;
    job.G = G;
    job.M = M;
    job.T = T;
    job.d = d;
    job.E = E;
    job.s = s;
    job.S = S;
    job.gstride = strided ? 1 : M;
    job.tstride = strided ? G : 1;
    job.n_ctasks = (T + MOE_SOFT_BLOCK - 1) / MOE_SOFT_BLOCK;

    /* One workspace, carved: the first pass sizes it, the second places. */
    for (pass = 0; pass < 2; pass++) {
        int64_t np = moe_soft_panels_size(1, d, S);
        used = 0;
        logits = moe_soft_carve(base, &used, (size_t)(T * S), sizeof(float));
        job.cbuf = moe_soft_carve(base, &used, (size_t)(T * S), sizeof(double));
        job.xn = NULL;
        phin = NULL;
        if (p->normalize) {
            job.xn = moe_soft_carve(base, &used, (size_t)T, sizeof(double));
            phin = moe_soft_carve(base, &used, (size_t)S, sizeof(double));
        }
        job.cw = p->combine;
        if (p->combine == NULL) {
            job.cw = moe_soft_carve(base, &used, (size_t)(T * S),
                                    sizeof(float));
        }
        job.bad = moe_soft_carve(base, &used, (size_t)job.n_ctasks,
                                 sizeof(int64_t));
        offsets = moe_soft_carve(base, &used, (size_t)(G > E ? G : E) + 1,
                                 sizeof(int64_t));
        token_index = moe_soft_carve(base, &used, (size_t)n_rows,
                                     sizeof(int64_t));
        ys = moe_soft_carve(base, &used, (size_t)(n_rows * d), sizeof(float));
        if (mixing) {
            job.dt = moe_soft_carve(base, &used, (size_t)(T * S),
                                    sizeof(float));
            job.dbuf = moe_soft_carve(base, &used, (size_t)(G * (M + 2) * S),
                                      sizeof(double));
            slots = moe_soft_carve(base, &used, (size_t)(G * S * d),
                                   sizeof(float));
            /* one panel buffer, reused: phi, then X, then Y_slots */
            np = np > moe_soft_panels_size(G, M, d)
                     ? np : moe_soft_panels_size(G, M, d);
            np = np > moe_soft_panels_size(G, S, d)
                     ? np : moe_soft_panels_size(G, S, d);
            if (strided) {
                rows = moe_soft_carve(base, &used, (size_t)T, sizeof(int64_t));
                tmp = moe_soft_carve(base, &used, (size_t)(T * d),
                                     sizeof(float));
            }
        }
        else {
            job.cw_expert = moe_soft_carve(base, &used, (size_t)(T * E),
                                           sizeof(float));
            position = moe_soft_carve(base, &used, (size_t)(T * E),
                                      sizeof(int64_t));
        }
        panels = moe_soft_carve(base, &used, (size_t)np, sizeof(float));
        if (pass == 0 &&
            (base = moe_workspace(MOE_WS_SOFT_MOE, used, 1)) == NULL) {
            return MOE_STATUS_ALLOC;
        }
    }
    job.logits = logits;
    job.phin = phin;

    /* 1. logits = x @ phi (phi's rows are B: (d, S)), and the l2 norms */
    moe_soft_panels_init(&bp, 1, d, S, panels);
    bp.src = p->phi;
    bp.kb = d;
    bp.ks = S;
    MOE_TRY(moe_soft_panels_pack(&bp));
    offsets[0] = 0;
    offsets[1] = T;
    MOE_TRY(moe_soft_gemm(p->x, NULL, T, offsets, T, &bp, logits));
    if (p->normalize) {
        MOE_TRY(moe_pool_run(job.n_ctasks, moe_soft_norm_task, &job));
        for (j = 0; j < S; j++) {
            double sum = 0.0;
            for (i = 0; i < d; i++) {
                sum += (double)p->phi[i * S + j] * (double)p->phi[i * S + j];
            }
            phin[j] = 1.0 / sqrt(sum + MOE_SOFT_NORM_EPS);
        }
    }

    /* 2. both softmaxes; a non-finite logit stops the call */
    for (i = 0; i < job.n_ctasks; i++) {
        job.bad[i] = -1;
    }
    MOE_TRY(moe_pool_run(job.n_ctasks + (mixing ? G : 0),
                         moe_soft_softmax_task, &job));
    for (i = 0; i < job.n_ctasks; i++) {
        if (job.bad[i] >= 0) {
            return moe_set_error(MOE_STATUS_NONFINITE, "non-finite logit at "
                                 "token %lld, slot %lld (the logits are "
                                 "x @ phi: is there NaN or Inf in x or phi?)",
                                 (long long)(job.bad[i] / S),
                                 (long long)(job.bad[i] % S));
        }
    }
    if (!mixing && p->dispatch != NULL) {
        for (i = 0; i < T * S; i++) {
            p->dispatch[i] = 1.0f;
        }
    }

    /* 3. slots_g = D_g^T X_g (X_g's rows are B: (M, d)), rows (g, slot);
     * the FFN reads them expert by expert through token_index */
    memset(&fp, 0, sizeof(fp));
    if (mixing) {
        moe_soft_panels_init(&bp, (int32_t)G, M, d, panels);
        bp.src = p->x;
        bp.gs = job.gstride * d;
        bp.kb = M;
        bp.ks = job.tstride * d;
        MOE_TRY(moe_soft_panels_pack(&bp));
        for (g = 0; g <= G; g++) {
            offsets[g] = g * S;
        }
        MOE_TRY(moe_soft_gemm(job.dt, NULL, G * S, offsets, G * S, &bp,
                              slots));
        for (e = 0; e < E; e++) {
            for (g = 0; g < G; g++) {
                for (q = 0; q < s; q++) {
                    token_index[(e * G + g) * s + q] = g * S + e * s + q;
                }
            }
        }
        fp.x = slots;
        fp.n_tokens = G * S;
    }
    else {
        for (e = 0; e < E; e++) {
            for (g = 0; g < G; g++) {
                token_index[e * G + g] = g;
            }
        }
        fp.x = p->x;
        fp.n_tokens = T;
    }
    for (e = 0; e <= E; e++) {
        offsets[e] = e * (n_rows / E);
    }
    if (b != NULL) {
        return moe_soft_backward_rest(&job, b, slots, token_index, offsets);
    }

    /* 4. the expert FFNs on their rows: ys (E, G, s, d) or (E, T, d) */
    fp.token_index = token_index;
    fp.offsets = offsets;
    fp.n_rows = n_rows;
    fp.experts = p->experts;
    fp.act = p->act;
    fp.out = ys;
    MOE_TRY(moe_ffn_grouped(&fp));
    if (p->save_ys != NULL) {
        memcpy(p->save_ys, ys, sizeof(float) * (size_t)(n_rows * d));
    }

    /* 5. Y_g = C_g Y_slots,g (Y_slots,g's rows are B: (S, d), slot e s + q
     * of group g at ys row (e G + g) s + q); C's rows read in group order.
     * With m == 1 each token sums its E expert outputs in expert order. */
    if (mixing) {
        moe_soft_panels_init(&bp, (int32_t)G, S, d, panels);
        bp.src = ys;
        bp.gs = s * d;
        bp.kb = s;
        bp.kbs = G * s * d;
        bp.ks = d;
        MOE_TRY(moe_soft_panels_pack(&bp));
        for (g = 0; g <= G; g++) {
            offsets[g] = g * M;
        }
        if (!strided) {
            return moe_soft_gemm(job.cw, NULL, T, offsets, T, &bp, p->out);
        }
        for (g = 0; g < G; g++) {
            for (t = 0; t < M; t++) {
                rows[g * M + t] = g * job.gstride + t * job.tstride;
            }
        }
        MOE_TRY(moe_soft_gemm(job.cw, rows, T, offsets, T, &bp, tmp));
        job.tmp = tmp;
        return moe_pool_run(job.n_ctasks, moe_soft_scatter_task, &job);
    }
    for (g = 0; g < G; g++) {
        for (e = 0; e < E; e++) {
            position[g * E + e] = e * G + g;
        }
    }
    memset(&cp, 0, sizeof(cp));
    cp.y = ys;
    cp.position = position;
    cp.weights = job.cw_expert;
    cp.n_rows = n_rows;
    cp.n_tokens = T;
    cp.top_k = E;
    cp.d_model = d;
    cp.out = p->out;
    return moe_combine(&cp);
}

/* The entry point of moe.h: its arguments, then the run above. */
static moe_status
moe_soft_moe_check(const moe_soft_moe_params *p)
{
    const int64_t G = p->n_groups, M = p->group_size, d = p->d_model;
    moe_experts_info w;
    int64_t S;

    if (p->experts == NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "experts is NULL");
    }
    /* (moe_ffn_grouped checks the pack's kernel set) */
    moe_experts_get_info(p->experts, &w);
    if (w.linear) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "experts must be packed "
                             "with moe_experts_pack");
    }
    if (p->n_experts < 1 || p->slots_per_expert < 1 ||
        (int64_t)p->n_experts * p->slots_per_expert > INT32_MAX) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "soft MoE needs "
                             "n_experts >= 1 and slots_per_expert >= 1 with "
                             "n_experts * slots_per_expert < 2^31, got %d and "
                             "%d", p->n_experts, p->slots_per_expert);
    }
    S = (int64_t)p->n_experts * p->slots_per_expert;
    if (w.n_experts != p->n_experts || w.d_model != d) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the packed experts "
                             "(n_experts=%d, d_model=%lld) do not match "
                             "n_experts=%d, d_model=%lld", w.n_experts,
                             (long long)w.d_model, p->n_experts,
                             (long long)d);
    }
    if (moe_activation_gated(p->act.activation) != w.gated) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "activation is %sgated "
                             "but the experts were packed %s w_gate",
                             w.gated ? "not " : "",
                             w.gated ? "with" : "without");
    }
    if (p->grouping != MOE_SOFT_GROUPS_ROWS &&
        p->grouping != MOE_SOFT_GROUPS_STRIDED) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "unknown soft MoE "
                             "grouping %d", (int)p->grouping);
    }
    /* Every buffer of the forward is a product of these: keep them far
     * from overflowing int64 (and n_groups within a linear's int32). */
    if (G < 0 || M < 0 || d < 0 || G > INT32_MAX ||
        (double)G * (double)M * (double)(d > S ? d : S) > 0x1p40 ||
        (double)G * (double)(M + 2) * (double)S > 0x1p40 ||
        (double)G * (double)S * (double)d > 0x1p40 ||
        (double)S * (double)d > 0x1p40) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "soft MoE sizes out of "
                             "range: n_groups=%lld, group_size=%lld, "
                             "d_model=%lld, slots=%lld", (long long)G,
                             (long long)M, (long long)d, (long long)S);
    }
    if (!isfinite(p->temperature) || (p->normalize && !isfinite(p->scale))) {
        return moe_set_error(MOE_STATUS_NONFINITE, "temperature and scale "
                             "must be finite, got %g and %g", p->temperature,
                             p->scale);
    }
    if (!(p->temperature > 0.0)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "temperature must be "
                             "> 0, got %g", p->temperature);
    }
    return MOE_STATUS_OK;
}

moe_status
moe_soft_moe_forward(const moe_soft_moe_params *p)
{
    MOE_TRY(moe_soft_moe_check(p));
    return moe_soft_moe_run(p, NULL);
}

/* ---- backward ---------------------------------------------------------- */

/* c (m, n) at ldc = A (m, K) B (K, n) [+ A2 B2]: A through strides, B
 * row-major at ldb (cpu/matmul.c). */
static moe_status
moe_soft_mm(const float *a, int64_t a_rs, int64_t a_cs, const float *bm,
            int64_t ldb, int64_t K, int64_t m, int64_t n, float *c,
            int64_t ldc)
{
    moe_mm_seg seg = moe_mm_term(a, a_rs, a_cs, bm, ldb, K);
    return moe_mm(&seg, 1, m, n, c, ldc);
}

/* (rows, cols) row-major src at stride ld -> its transpose (cols, rows). */
static void
moe_soft_transpose(const float *src, int64_t ld, int64_t rows, int64_t cols,
                   float *dst)
{
    int64_t i, j;

    for (i = 0; i < rows; i++) {
        for (j = 0; j < cols; j++) {
            dst[j * rows + i] = src[i * ld + j];
        }
    }
}

/*
 * After the forward's steps 1-3 (logits, norms, both softmaxes, slots),
 * with L the logits, C, D the softmaxes, Y the expert outputs (saved):
 *   dY_slots = C^T dy, dC = dy Y^T      (per group; m == 1: per expert)
 *   d slots, dW: the FFN's backward     (m == 1: d x rows, per expert)
 *   dD = X d_slots^T
 *   dL = C (dC - <C, dC>) + D (dD - sum_t D dD)   (softmax backwards)
 *   dR = dL f phin  (R = X phi, f = [scale / |x|] / temperature)
 *   dx = D d_slots + dR phi^T (+ the norm's term), d phi = X^T dR (+ its)
 */
static moe_status
moe_soft_backward_rest(const moe_soft_job *job,
                       const moe_soft_moe_backward_params *b,
                       const float *slots, const int64_t *token_index,
                       const int64_t *offsets)
{
    const moe_soft_moe_params *p = job->p;
    const int64_t G = job->G, M = job->M, T = job->T, d = job->d;
    const int32_t E = job->E, s = job->s, S = job->S;
    const int mixing = M > 1;
    const int64_t n_rows = mixing ? G * S : G * E;
    const int64_t gs = job->gstride, ts = job->tstride;
    const float *x = p->x, *dy = b->dy;
    float *dys, *dsl, *tmp, *tr, *dc, *dd, *dr, *phit;
    double *rowt, *colt, dscale = 0.0;
    moe_ffn_backward_params fb;
    moe_status st = MOE_STATUS_ALLOC;
    int64_t g, t, i, r;
    int32_t j, e, q;

    dys = moe_alloc((size_t)(n_rows * d) + 1, sizeof(float));
    dsl = moe_alloc((size_t)(n_rows * d) + 1, sizeof(float));
    tmp = moe_alloc((size_t)(mixing ? G * S * d : 1), sizeof(float));
    tr = moe_alloc((size_t)(d * S) + 1, sizeof(float));
    dc = moe_alloc((size_t)(T * S) + 1, sizeof(float));
    dd = moe_alloc((size_t)(mixing ? T * S : 1), sizeof(float));
    dr = moe_alloc((size_t)(T * S) + 1, sizeof(float));
    phit = moe_alloc((size_t)(S * d) + 1, sizeof(float));
    rowt = moe_alloc((size_t)T + 1, sizeof(double));
    colt = moe_alloc((size_t)S + 1, sizeof(double));
    if (!dys || !dsl || !tmp || !tr || !dc || !dd || !dr || !phit || !rowt ||
        !colt) {
        goto done;
    }
    st = MOE_STATUS_OK;

    /* dY_slots and dC */
    if (mixing) {
        for (g = 0; g < G && st == MOE_STATUS_OK; g++) {
            /* tmp_g (S, d) = C_g^T dy_g */
            st = moe_soft_mm(job->cw + g * gs * S, 1, ts * S, dy + g * gs * d,
                             ts * d, M, S, d, tmp + g * S * d, d);
            /* dC_g (M, S) = dy_g Y_g^T, Y_g^T (d, S) from the saved rows */
            for (j = 0; j < S && st == MOE_STATUS_OK; j++) {
                const float *yr = b->ys + (((int64_t)(j / s) * G + g) * s +
                                           j % s) * d;
                for (i = 0; i < d; i++) {
                    tr[i * S + j] = yr[i];
                }
            }
            if (st == MOE_STATUS_OK) {
                st = moe_soft_mm(dy + g * gs * d, ts * d, 1, tr, S, d, M, S,
                                 dc + g * gs * S, ts * S);
            }
        }
        for (e = 0; e < E; e++) { /* slot order -> the FFN's rows */
            for (g = 0; g < G; g++) {
                memcpy(dys + (e * G + g) * s * d,
                       tmp + (g * S + (int64_t)e * s) * d,
                       sizeof(float) * (size_t)(s * d));
            }
        }
    }
    else {
        for (t = 0; t < T; t++) {
            const float *dyt = dy + t * d;
            for (e = 0; e < E; e++) {
                const float *yr = b->ys + (e * G + t) * d;
                const float ce = job->cw_expert[t * E + e];
                float *o = dys + (e * G + t) * d;
                double dot = 0.0;
                for (i = 0; i < d; i++) {
                    o[i] = ce * dyt[i];
                    dot += (double)dyt[i] * yr[i];
                }
                for (q = 0; q < s; q++) {
                    dc[t * S + (int64_t)e * s + q] = (float)dot;
                }
            }
        }
    }
    if (st != MOE_STATUS_OK) {
        goto done;
    }

    /* the experts */
    memset(&fb, 0, sizeof(fb));
    fb.x = mixing ? slots : x;
    fb.token_index = token_index;
    fb.n_tokens = mixing ? G * S : T;
    fb.offsets = offsets;
    fb.n_rows = n_rows;
    fb.experts = p->experts;
    fb.w_gate = b->w_gate;
    fb.w_up = b->w_up;
    fb.w_down = b->w_down;
    fb.act = p->act;
    fb.dy = dys;
    fb.dx = dsl;
    fb.d_w_gate = b->d_w_gate;
    fb.d_w_up = b->d_w_up;
    fb.d_w_down = b->d_w_down;
    if ((st = moe_ffn_backward(&fb)) != MOE_STATUS_OK) {
        goto done;
    }

    /* dD_g (M, S) = X_g d_slots_g^T, d slots back in slot order (tmp) */
    if (mixing) {
        for (e = 0; e < E; e++) {
            for (g = 0; g < G; g++) {
                memcpy(tmp + (g * S + (int64_t)e * s) * d,
                       dsl + (e * G + g) * s * d,
                       sizeof(float) * (size_t)(s * d));
            }
        }
        for (g = 0; g < G && st == MOE_STATUS_OK; g++) {
            moe_soft_transpose(tmp + g * S * d, d, S, d, tr);
            st = moe_soft_mm(x + g * gs * d, ts * d, 1, tr, S, d, M, S,
                             dd + g * gs * S, ts * S);
        }
        if (st != MOE_STATUS_OK) {
            goto done;
        }
    }

    /* the softmaxes' backward into dR, and the norms' sums */
    memset(rowt, 0, sizeof(double) * (size_t)T);
    memset(colt, 0, sizeof(double) * (size_t)S);
    {
        double *dl = job->cbuf; /* (T, S) scratch, free after the forward */
        for (r = 0; r < T; r++) {
            const float *c = job->cw + r * S, *g1 = dc + r * S;
            double dot = 0.0;
            for (j = 0; j < S; j++) {
                dot += (double)c[j] * g1[j];
            }
            for (j = 0; j < S; j++) {
                dl[r * S + j] = (double)c[j] * ((double)g1[j] - dot);
            }
        }
        for (g = 0; mixing && g < G; g++) {
            const float *dt = job->dt + g * S * M;
            for (j = 0; j < S; j++) {
                double dot = 0.0;
                for (t = 0; t < M; t++) {
                    dot += (double)dt[j * M + t] * dd[(g * gs + t * ts) * S + j];
                }
                for (t = 0; t < M; t++) {
                    r = g * gs + t * ts;
                    dl[r * S + j] += (double)dt[j * M + t] *
                                     ((double)dd[r * S + j] - dot);
                }
            }
        }
        for (r = 0; r < T; r++) {
            const double f = moe_soft_row_factor(job, r);
            for (j = 0; j < S; j++) {
                const double ph = job->phin != NULL ? job->phin[j] : 1.0;
                const double lg = moe_soft_logit(job, r, j, f);
                const double g1 = dl[r * S + j];
                dr[r * S + j] = (float)(g1 * f * ph);
                rowt[r] += g1 * lg;
                colt[j] += g1 * lg;
                if (p->normalize) {
                    dscale += g1 * (double)job->logits[r * S + j] * job->xn[r] *
                              ph / p->temperature;
                }
            }
        }
    }
    if (b->d_scale != NULL) {
        *b->d_scale = dscale;
    }

    /* dx = D d_slots + dR phi^T (m == 1: the FFN's rows summed per token) */
    moe_soft_transpose(p->phi, S, d, S, phit);
    if (b->dx != NULL && mixing) {
        for (g = 0; g < G && st == MOE_STATUS_OK; g++) {
            moe_mm_seg seg[2] = {
                moe_mm_term(job->dt + g * S * M, 1, M, tmp + g * S * d, d, S),
                moe_mm_term(dr + g * gs * S, ts * S, 1, phit, d, S)};
            st = moe_mm(seg, 2, M, d, b->dx + g * gs * d, ts * d);
        }
    }
    else if (b->dx != NULL) {
        st = moe_soft_mm(dr, S, 1, phit, d, S, T, d, b->dx, d);
        for (t = 0; st == MOE_STATUS_OK && t < T; t++) {
            for (e = 0; e < E; e++) {
                const float *src = dsl + (e * G + t) * d;
                for (i = 0; i < d; i++) {
                    b->dx[t * d + i] += src[i];
                }
            }
        }
    }
    if (st == MOE_STATUS_OK && b->dx != NULL && p->normalize) {
        for (r = 0; r < T; r++) {
            const float k = (float)(-job->xn[r] * job->xn[r] * rowt[r]);
            for (i = 0; i < d; i++) {
                b->dx[r * d + i] += k * x[r * d + i];
            }
        }
    }

    /* d phi = X^T dR (+ the norm's term) */
    if (st == MOE_STATUS_OK && b->d_phi != NULL) {
        st = moe_soft_mm(x, 1, d, dr, S, T, d, S, b->d_phi, S);
        for (j = 0; st == MOE_STATUS_OK && p->normalize && j < S; j++) {
            const float k = (float)(-job->phin[j] * job->phin[j] * colt[j]);
            for (i = 0; i < d; i++) {
                b->d_phi[i * S + j] += k * p->phi[i * S + j];
            }
        }
    }
done:
    free(dys);
    free(dsl);
    free(tmp);
    free(tr);
    free(dc);
    free(dd);
    free(dr);
    free(phit);
    free(rowt);
    free(colt);
    return st;
}

moe_status
moe_soft_moe_backward(const moe_soft_moe_backward_params *b)
{
    const moe_soft_moe_params *p = b->forward;

    if (p == NULL || b->ys == NULL || b->dy == NULL || b->w_up == NULL ||
        b->w_down == NULL) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "soft MoE backward: "
                             "needs the forward's params, its saved ys, dy "
                             "and the unpacked expert weights");
    }
    MOE_TRY(moe_soft_moe_check(p));
    if (p->n_groups * p->group_size == 0) { /* nothing ran: zero gradients */
        const int64_t S = (int64_t)p->n_experts * p->slots_per_expert;
        moe_experts_info w;
        moe_experts_get_info(p->experts, &w);
        if (b->d_phi != NULL) {
            memset(b->d_phi, 0, sizeof(float) * (size_t)(p->d_model * S));
        }
        if (b->d_scale != NULL) {
            *b->d_scale = 0.0;
        }
        if (b->d_w_gate != NULL) {
            memset(b->d_w_gate, 0, sizeof(float) * (size_t)(w.n_experts * w.d_ff * w.d_model));
        }
        if (b->d_w_up != NULL) {
            memset(b->d_w_up, 0, sizeof(float) * (size_t)(w.n_experts * w.d_ff * w.d_model));
        }
        if (b->d_w_down != NULL) {
            memset(b->d_w_down, 0, sizeof(float) * (size_t)(w.n_experts * w.d_ff * w.d_model));
        }
        return MOE_STATUS_OK;
    }
    return moe_soft_moe_run(p, b);
}
