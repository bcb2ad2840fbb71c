/*
 * cpu/peer.c - product-key expert retrieval (PEER, "Mixture of A Million
 * Experts"): per token and head, a float64 query scored against two small
 * sets of sub-keys, top-k of each half, top-k of the k^2 candidate sums,
 * and a softmax-weighted sum of single-neuron experts act(u_e . x) v_e.
 * Nothing of size N = n^2 is formed but the weights themselves.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

/*
 * Tokens per task: four tiles of the GEMM's MR rows.  The block's sub-key
 * scores (2 x 24 x n float64) stay in L2 up to n of a few thousand, and each
 * key panel is read once per block.
 */
#define MOE_PEER_MR    6
#define MOE_PEER_NR    8
#define MOE_PEER_BLOCK (4 * MOE_PEER_MR)
/* How many (token, head, slot) entries ahead the expert rows are fetched:
 * the rows of a million experts are a random gather from memory.  (4 to 32
 * ahead, and prefetching to L1 or not, measured the same at 512 tokens.) */
#define MOE_PEER_AHEAD 8

#if defined(__GNUC__)
#define MOE_PEER_INLINE static inline __attribute__((always_inline))
#else
#define MOE_PEER_INLINE static inline
#endif

/* Four float64 lanes; on a plain x86-64 build GCC splits them into SSE2. */
typedef double moe_v4d __attribute__((vector_size(32), aligned(8), may_alias));

typedef struct moe_peer_job {
    const moe_peer_params *p;
    int64_t  ldq;     /* n_heads * d_key rounded up to MOE_PEER_NR          */
    int64_t  ldn;     /* n_sub_keys rounded up to MOE_PEER_NR               */
    double  *wq;      /* (ldq / NR, d_model, NR) panels of w_query          */
    double  *k1;      /* (n_key_sets, ldn / NR, d_key / 2, NR) panels       */
    double  *k2;      /* likewise                                          */
    int64_t *bad;     /* (tasks,) 0, the first non-finite flat index (packing)
                         or token (forward) + 1, or INT64_MIN: no scratch    */
} moe_peer_job;

/* Per-task scratch, carved from one workspace buffer. */
typedef struct moe_peer_scratch {
    double  *xd;    /* (block, d_model) widened tokens                     */
    double  *q;     /* (block, ldq) queries                                */
    double  *s1;    /* (block, ldn) sub-key scores, first half             */
    double  *s2;    /* (block, ldn) second half                            */
    double  *gate;  /* (block, n_heads, top_k) softmax weights             */
    double  *acc;   /* (d_out,) one token's output                         */
    double  *va;    /* (top_k,) best sub-key scores, first half            */
    double  *vb;    /* (top_k,) second half                                */
    double  *cv;    /* (top_k,) best candidate sums                        */
    int32_t *ia;    /* (top_k,) their sub-key indices                      */
    int32_t *jb;    /* (top_k,)                                            */
    int32_t *ce;    /* (top_k,) candidate expert ids                       */
    int32_t *ids;   /* (block, n_heads, top_k) selected experts            */
} moe_peer_scratch;

static int64_t
moe_peer_pad(int64_t n)
{
    return (n + MOE_PEER_NR - 1) / MOE_PEER_NR * MOE_PEER_NR;
}

/* ---- float64 GEMM on packed panels ------------------------------------ */

/*
 * c[r][0..NR) = sum_k a[r][k] * b[k][0..NR) for rows r < m (m <= MR, a
 * constant once inlined), one multiply-add chain per element over k in
 * order from 0: an element's bits depend neither on its tile nor on m.
 */
MOE_PEER_INLINE void
moe_peer_ukr(const double *a, int64_t lda, const int m, const double *b,
             int64_t kd, double *c, int64_t ldc)
{
    moe_v4d acc[MOE_PEER_MR][2];
    int64_t k;
    int r;

    for (r = 0; r < m; r++) {
        acc[r][0] = (moe_v4d){0.0, 0.0, 0.0, 0.0};
        acc[r][1] = acc[r][0];
    }
    for (k = 0; k < kd; k++) {
        const moe_v4d b0 = *(const moe_v4d *)(b + k * MOE_PEER_NR);
        const moe_v4d b1 = *(const moe_v4d *)(b + k * MOE_PEER_NR + 4);
        _Pragma("GCC unroll 6")
        for (r = 0; r < m; r++) {
            acc[r][0] += a[r * lda + k] * b0;
            acc[r][1] += a[r * lda + k] * b1;
        }
    }
    for (r = 0; r < m; r++) {
        *(moe_v4d *)(c + r * ldc) = acc[r][0];
        *(moe_v4d *)(c + r * ldc + 4) = acc[r][1];
    }
}

/*
 * c (m, n_pad) = a (m, kd) @ B, B as (n_pad / NR, kd, NR) panels.  Panels
 * outer: each stays in L1 while the block's row tiles pass over it; a short
 * last tile (a token alone, say) runs a kernel of its own height.
 */
MOE_PEER_INLINE void
moe_peer_gemm(const double *a, int64_t lda, int64_t m, const double *panels,
              int64_t n_pad, int64_t kd, double *c, int64_t ldc)
{
    int64_t p, r0;

    for (p = 0; p < n_pad / MOE_PEER_NR; p++) {
        const double *b = panels + p * kd * MOE_PEER_NR;
        double *cp = c + p * MOE_PEER_NR;
        for (r0 = 0; r0 + MOE_PEER_MR <= m; r0 += MOE_PEER_MR) {
            moe_peer_ukr(a + r0 * lda, lda, MOE_PEER_MR, b, kd, cp + r0 * ldc,
                         ldc);
        }
        switch (m - r0) {
        case 1: moe_peer_ukr(a + r0 * lda, lda, 1, b, kd, cp + r0 * ldc, ldc);
                break;
        case 2: moe_peer_ukr(a + r0 * lda, lda, 2, b, kd, cp + r0 * ldc, ldc);
                break;
        case 3: moe_peer_ukr(a + r0 * lda, lda, 3, b, kd, cp + r0 * ldc, ldc);
                break;
        case 4: moe_peer_ukr(a + r0 * lda, lda, 4, b, kd, cp + r0 * ldc, ldc);
                break;
        case 5: moe_peer_ukr(a + r0 * lda, lda, 5, b, kd, cp + r0 * ldc, ldc);
                break;
        default: break;
        }
    }
}

/* ---- selection --------------------------------------------------------- */

/*
 * Keep the best k of s[0..n) (index, value), best first.  Strict '>' leaves
 * an earlier (lower) index ahead of a later one with an equal value: the tie
 * rule.  Once k are kept, a run of 16 with none above the k-th is skipped
 * after one vectorised comparison (most runs, past the first few hundred).
 */
MOE_PEER_INLINE void
moe_peer_topk(const double *s, int32_t n, int32_t k, int32_t *ids,
              double *vals)
{
    int32_t i0, i, len = 0;

    for (i0 = 0; i0 < n; i0 += 16) {
        const int32_t end = n - i0 < 16 ? n : i0 + 16;
        if (len == k) {
            const double kth = vals[k - 1];
            int any = 0;
            for (i = i0; i < end; i++) {
                any |= s[i] > kth;
            }
            if (!any) {
                continue;
            }
        }
        for (i = i0; i < end; i++) {
            const double v = s[i];
            int32_t pos = len;
            if (len == k) {
                if (!(v > vals[k - 1])) {
                    continue;
                }
                pos = k - 1;
            }
            else {
                len++;
            }
            while (pos > 0 && v > vals[pos - 1]) {
                ids[pos] = ids[pos - 1];
                vals[pos] = vals[pos - 1];
                pos--;
            }
            ids[pos] = i;
            vals[pos] = v;
        }
    }
}

/*
 * The best k of the k^2 sums va[a] + vb[b] (expert i_a * n + j_b), ties to
 * the lower expert id.  va and vb are sorted descending, so a row's sums
 * only fall with b and the rows' best sums only fall with a: once a sum is
 * strictly below the k-th kept, the rest of its row (and, at b = 0, every
 * later row) cannot enter.  Rounding is monotone, so this holds for the
 * float64 sums as computed.
 */
MOE_PEER_INLINE void
moe_peer_candidates(const moe_peer_scratch *s, int32_t n, int32_t k)
{
    int32_t a, b, len = 0;

    for (a = 0; a < k; a++) {
        for (b = 0; b < k; b++) {
            const double v = s->va[a] + s->vb[b];
            const int32_t e = s->ia[a] * n + s->jb[b];
            int32_t pos = len;
            if (len == k) {
                if (v < s->cv[k - 1]) {
                    break;
                }
                if (v == s->cv[k - 1] && e > s->ce[k - 1]) {
                    continue;
                }
                pos = k - 1;
            }
            else {
                len++;
            }
            while (pos > 0 && (v > s->cv[pos - 1] ||
                               (v == s->cv[pos - 1] && e < s->ce[pos - 1]))) {
                s->cv[pos] = s->cv[pos - 1];
                s->ce[pos] = s->ce[pos - 1];
                pos--;
            }
            s->cv[pos] = v;
            s->ce[pos] = e;
        }
        if (len == k && b == 0) {
            break; /* this row's best sum was already out */
        }
    }
}

/* ---- experts ------------------------------------------------------------ */

static double
moe_peer_act(moe_peer_activation act, double h)
{
    switch (act) {
    case MOE_PEER_ACTIVATION_RELU:
        return h > 0.0 ? h : 0.0;
    case MOE_PEER_ACTIVATION_GELU:
        return 0.5 * h * (1.0 + erf(h * 0.70710678118654752440));
    case MOE_PEER_ACTIVATION_SILU:
        /* h * sigmoid(h), exp of non-positive numbers only */
        if (h >= 0.0) {
            return h / (1.0 + exp(-h));
        }
        return h * exp(h) / (1.0 + exp(h));
    default:
        return h;
    }
}

/*
 * u . x in float64 with eight partial sums (element i to lane i % 8) and one
 * reduction tree.  The products of two floats are exact in float64, so the
 * result does not depend on FMA or the vector width.
 */
MOE_PEER_INLINE double
moe_peer_dot(const double *x, const float *u, int64_t d)
{
    double a[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i;
    int l;

    for (i = 0; i + 8 <= d; i += 8) {
        for (l = 0; l < 8; l++) {
            a[l] += x[i + l] * (double)u[i + l];
        }
    }
    for (l = 0; i + l < d; l++) {
        a[l] += x[i + l] * (double)u[i + l];
    }
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

MOE_PEER_INLINE void
moe_peer_prefetch(const float *row, int64_t n)
{
    int64_t i;

    for (i = 0; i < n; i += 16) {
        __builtin_prefetch(row + i, 0, 3);
    }
}

/* ---- one block of tokens ------------------------------------------------ */

static void
moe_peer_carve(const moe_peer_job *job, void *buf, moe_peer_scratch *s)
{
    const moe_peer_params *p = job->p;
    const int64_t B = MOE_PEER_BLOCK, HK = (int64_t)p->n_heads * p->top_k;
    const int64_t K = p->top_k;
    double *d = buf;
    int32_t *i32;

    s->xd = d;   d += B * p->d_model;
    s->q = d;    d += B * job->ldq;
    s->s1 = d;   d += B * job->ldn;
    s->s2 = d;   d += B * job->ldn;
    s->gate = d; d += B * HK;
    s->acc = d;  d += p->d_out;
    s->va = d;   d += K;
    s->vb = d;   d += K;
    s->cv = d;   d += K;
    i32 = (int32_t *)d;
    s->ia = i32; i32 += K;
    s->jb = i32; i32 += K;
    s->ce = i32; i32 += K;
    s->ids = i32;
}

/* Bytes of scratch moe_peer_carve lays out. */
static size_t
moe_peer_scratch_bytes(const moe_peer_job *job)
{
    const moe_peer_params *p = job->p;
    const int64_t B = MOE_PEER_BLOCK, HK = (int64_t)p->n_heads * p->top_k;

    return sizeof(double) * (size_t)(B * p->d_model + B * job->ldq +
                                     2 * B * job->ldn + B * HK + p->d_out +
                                     3 * p->top_k) +
           sizeof(int32_t) * (size_t)(3 * p->top_k + B * HK);
}

/*
 * Route the block's m tokens: ids and gates per (token, head).  With finite
 * float32 inputs no float64 score can overflow (|s| <= d_key d_model
 * FLT_MAX^3 / 2, far below DBL_MAX), so scores need no check.
 */
MOE_PEER_INLINE void
moe_peer_route_block(const moe_peer_job *job, moe_peer_scratch *s, int64_t m)
{
    const moe_peer_params *p = job->p;
    const int32_t H = p->n_heads, K = p->top_k, n = p->n_sub_keys;
    const int64_t dk = p->d_key, dh = dk / 2, ldn = job->ldn;
    int64_t t;
    int32_t h, j;

    moe_peer_gemm(s->xd, p->d_model, m, job->wq, job->ldq, p->d_model, s->q,
                  job->ldq);
    for (h = 0; h < H; h++) {
        const int64_t set = p->n_key_sets == 1 ? 0 : h;
        moe_peer_gemm(s->q + h * dk, job->ldq, m, job->k1 + set * ldn * dh,
                      ldn, dh, s->s1, ldn);
        moe_peer_gemm(s->q + h * dk + dh, job->ldq, m,
                      job->k2 + set * ldn * dh, ldn, dh, s->s2, ldn);
        for (t = 0; t < m; t++) {
            const double *s1 = s->s1 + t * ldn, *s2 = s->s2 + t * ldn;
            int32_t *ids = s->ids + (t * H + h) * K;
            double *g = s->gate + (t * H + h) * K, sum = 0.0;
            moe_peer_topk(s1, n, K, s->ia, s->va);
            moe_peer_topk(s2, n, K, s->jb, s->vb);
            moe_peer_candidates(s, n, K);
            /* Softmax over the k selected, the best (largest) first. */
            for (j = 0; j < K; j++) {
                ids[j] = s->ce[j];
                g[j] = exp(s->cv[j] - s->cv[0]);
                sum += g[j];
            }
            for (j = 0; j < K; j++) {
                g[j] /= sum;
            }
        }
    }
}

/* The block's outputs: per token, heads then slots best first, one fixed
 * order; the output row summed in float64. */
MOE_PEER_INLINE void
moe_peer_experts_block(const moe_peer_job *job, moe_peer_scratch *s,
                       int64_t t0, int64_t m)
{
    const moe_peer_params *p = job->p;
    const int64_t HK = (int64_t)p->n_heads * p->top_k;
    const int64_t d = p->d_model, dout = p->d_out;
    int64_t t, i, j;

    for (j = 0; j < MOE_PEER_AHEAD && j < m * HK; j++) {
        moe_peer_prefetch(p->u + (int64_t)s->ids[j] * d, d);
        moe_peer_prefetch(p->v + (int64_t)s->ids[j] * dout, dout);
    }
    for (t = 0; t < m; t++) {
        const double *g = s->gate + t * HK, *x = s->xd + t * d;
        float *out = p->out + (t0 + t) * dout;

        for (i = 0; i < dout; i++) {
            s->acc[i] = 0.0;
        }
        for (j = 0; j < HK; j++) {
            const int64_t f = t * HK + j, e = s->ids[f];
            const float *u = p->u + e * d, *v = p->v + e * dout;
            double c;
            if (f + MOE_PEER_AHEAD < m * HK) {
                const int64_t e2 = s->ids[f + MOE_PEER_AHEAD];
                moe_peer_prefetch(p->u + e2 * d, d);
                moe_peer_prefetch(p->v + e2 * dout, dout);
            }
            c = g[j] * moe_peer_act(p->activation, moe_peer_dot(x, u, d));
            for (i = 0; i < dout; i++) {
                s->acc[i] += c * (double)v[i];
            }
        }
        for (i = 0; i < dout; i++) {
            out[i] = (float)s->acc[i];
        }
        if (p->expert_ids != NULL) {
            memcpy(p->expert_ids + (t0 + t) * HK, s->ids + t * HK,
                   (size_t)HK * sizeof(int32_t));
        }
        if (p->gates != NULL) {
            for (j = 0; j < HK; j++) {
                p->gates[(t0 + t) * HK + j] = (float)g[j];
            }
        }
    }
}

MOE_PEER_INLINE void
moe_peer_task_body(void *ctx, int64_t task)
{
    moe_peer_job *job = ctx;
    const moe_peer_params *p = job->p;
    const int64_t d = p->d_model, t0 = task * MOE_PEER_BLOCK;
    const int64_t m = p->n_tokens - t0 < MOE_PEER_BLOCK ? p->n_tokens - t0
                                                       : MOE_PEER_BLOCK;
    moe_peer_scratch s;
    void *buf;
    int64_t i;

    buf = moe_workspace(MOE_WS_PEER_TASK, moe_peer_scratch_bytes(job), 1);
    if (buf == NULL) {
        job->bad[task] = INT64_MIN; /* out of memory */
        return;
    }
    moe_peer_carve(job, buf, &s);
    for (i = 0; i < m * d; i++) {
        s.xd[i] = (double)p->x[t0 * d + i];
        if (!isfinite(s.xd[i])) {
            job->bad[task] = t0 + i / d + 1;
            return;
        }
    }
    moe_peer_route_block(job, &s, m);
    moe_peer_experts_block(job, &s, t0, m);
}

/* ---- packing ------------------------------------------------------------ */

typedef float   moe_v4f __attribute__((vector_size(16), aligned(4), may_alias));
typedef int64_t moe_v4i __attribute__((vector_size(32)));

/*
 * Rows r0..r0+3 of v (4 consecutive k each) transposed into the panel: the
 * four k of the chunk become four panel rows of which these fill 4 lanes.
 */
MOE_PEER_INLINE void
moe_peer_transpose4(const moe_v4d *v, double *dst)
{
    const moe_v4d t0 = __builtin_shuffle(v[0], v[1], (moe_v4i){0, 4, 2, 6});
    const moe_v4d t1 = __builtin_shuffle(v[0], v[1], (moe_v4i){1, 5, 3, 7});
    const moe_v4d t2 = __builtin_shuffle(v[2], v[3], (moe_v4i){0, 4, 2, 6});
    const moe_v4d t3 = __builtin_shuffle(v[2], v[3], (moe_v4i){1, 5, 3, 7});

    *(moe_v4d *)(dst + 0 * MOE_PEER_NR) =
        __builtin_shuffle(t0, t2, (moe_v4i){0, 1, 4, 5});
    *(moe_v4d *)(dst + 1 * MOE_PEER_NR) =
        __builtin_shuffle(t1, t3, (moe_v4i){0, 1, 4, 5});
    *(moe_v4d *)(dst + 2 * MOE_PEER_NR) =
        __builtin_shuffle(t0, t2, (moe_v4i){2, 3, 6, 7});
    *(moe_v4d *)(dst + 3 * MOE_PEER_NR) =
        __builtin_shuffle(t1, t3, (moe_v4i){2, 3, 6, 7});
}

/*
 * Pack w (rows, kd) float32 as (pad(rows) / NR, kd, NR) float64 panels, zero
 * rows past the end; returns the first non-finite value's flat index + 1, or
 * 0.  This runs on every call, for T = 1 too: full panels go 4 k at a time
 * through an in-register transpose (the plain loop was 3x slower).
 */
MOE_PEER_INLINE int64_t
moe_peer_pack(const float *w, int64_t rows, int64_t kd, double *out)
{
    const moe_v4d zero = {0.0, 0.0, 0.0, 0.0};
    moe_v4i ok = {-1, -1, -1, -1};
    int64_t p, k, l;
    int bad = 0;

    for (p = 0; p < moe_peer_pad(rows) / MOE_PEER_NR; p++) {
        const int64_t nr = rows - p * MOE_PEER_NR < MOE_PEER_NR
                               ? rows - p * MOE_PEER_NR : MOE_PEER_NR;
        const float *src = w + p * MOE_PEER_NR * kd;
        double *dst = out + p * kd * MOE_PEER_NR;
        k = 0;
        if (nr == MOE_PEER_NR) {
            for (; k + 4 <= kd; k += 4) {
                moe_v4d v[MOE_PEER_NR];
                for (l = 0; l < MOE_PEER_NR; l++) {
                    v[l] = __builtin_convertvector(
                        *(const moe_v4f *)(src + l * kd + k), moe_v4d);
                    ok &= (v[l] - v[l]) == zero; /* NaN for NaN and Inf */
                }
                moe_peer_transpose4(v, dst + k * MOE_PEER_NR);
                moe_peer_transpose4(v + 4, dst + k * MOE_PEER_NR + 4);
            }
        }
        for (; k < kd; k++) {
            for (l = 0; l < MOE_PEER_NR; l++) {
                const double v = l < nr ? (double)src[l * kd + k] : 0.0;
                dst[k * MOE_PEER_NR + l] = v;
                bad |= !(v - v == 0.0);
            }
        }
    }
    bad |= !(ok[0] & ok[1] & ok[2] & ok[3]);
    for (k = 0; bad && k < rows * kd; k++) {
        if (!isfinite(w[k])) {
            return k + 1;
        }
    }
    return 0;
}

/* Task 0 packs w_query; task 1 + 2 s + half packs key set s, that half. */
MOE_PEER_INLINE void
moe_peer_pack_body(void *ctx, int64_t task)
{
    moe_peer_job *job = ctx;
    const moe_peer_params *p = job->p;
    const int64_t dh = p->d_key / 2, n = p->n_sub_keys;
    int64_t set, half;

    if (task == 0) {
        job->bad[0] = moe_peer_pack(p->w_query, (int64_t)p->n_heads * p->d_key,
                                    p->d_model, job->wq);
        return;
    }
    set = (task - 1) / 2;
    half = (task - 1) % 2;
    job->bad[task] = moe_peer_pack((half ? p->sub_keys_2 : p->sub_keys_1) +
                                       set * n * dh,
                                   n, dh, (half ? job->k2 : job->k1) +
                                              set * job->ldn * dh);
}

/* ---- the entry point ---------------------------------------------------- */

/*
 * The same code twice: built for the plain x86-64 baseline, and for AVX2 +
 * FMA where the kernel set in use is one (MOE_ISA=scalar keeps the plain
 * one).  With FMA the float64 score and output sums round differently (in
 * the last bit), so bits match across batches and threads, not across ISAs.
 */
static void
moe_peer_pack_task(void *ctx, int64_t task)
{
    moe_peer_pack_body(ctx, task);
}

static void
moe_peer_task(void *ctx, int64_t task)
{
    moe_peer_task_body(ctx, task);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_PEER_HAVE_AVX2 1
__attribute__((target("avx2,fma"))) static void
moe_peer_pack_task_avx2(void *ctx, int64_t task)
{
    moe_peer_pack_body(ctx, task);
}

__attribute__((target("avx2,fma"))) static void
moe_peer_task_avx2(void *ctx, int64_t task)
{
    moe_peer_task_body(ctx, task);
}
#endif

moe_status
moe_cpu_peer_forward(const moe_peer_params *p)
{
    const int64_t n_tasks = (p->n_tokens + MOE_PEER_BLOCK - 1) / MOE_PEER_BLOCK;
    const int64_t n_pack = 1 + 2 * (int64_t)p->n_key_sets;
    const int64_t dh = p->d_key / 2;
    moe_peer_job job;
    moe_task_fn pack_fn = moe_peer_pack_task, task_fn = moe_peer_task;
    int64_t task, nq, nk;

    if (p->n_tokens == 0) {
        return MOE_STATUS_OK;
    }
    job.p = p;
    job.ldq = moe_peer_pad((int64_t)p->n_heads * p->d_key);
    job.ldn = moe_peer_pad(p->n_sub_keys);
    nq = job.ldq * p->d_model;
    nk = (int64_t)p->n_key_sets * job.ldn * dh;
    /* The query and key weights as float64 panels, packed on every call (a
     * few MB at a million experts); the expert rows u, v are read as they
     * are.  Reused across calls: fresh pages cost their faults each time. */
    job.wq = moe_workspace(MOE_WS_PEER, (size_t)(nq + 2 * nk) +
                           (size_t)(n_tasks > n_pack ? n_tasks : n_pack),
                           sizeof(double));
    if (job.wq == NULL) {
        return MOE_STATUS_ALLOC;
    }
    job.k1 = job.wq + nq;
    job.k2 = job.k1 + nk;
    job.bad = (int64_t *)(job.k2 + nk);
#ifdef MOE_PEER_HAVE_AVX2
    if (strcmp(moe_cpu_kernels()->name, "scalar") != 0) {
        pack_fn = moe_peer_pack_task_avx2;
        task_fn = moe_peer_task_avx2;
    }
#endif
    MOE_TRY(moe_pool_run(n_pack, pack_fn, &job));
    for (task = 0; task < n_pack; task++) {
        if (job.bad[task] != 0) {
            static const char *const names[2] = {"sub_keys_1", "sub_keys_2"};
            const char *name = task == 0 ? "w_query" : names[(task - 1) % 2];
            const int64_t set_off =
                task == 0 ? 0 : (task - 1) / 2 * p->n_sub_keys * dh;
            return moe_set_error(MOE_STATUS_NONFINITE, "%s must be finite, "
                                 "got a NaN or Inf at flat index %lld", name,
                                 (long long)(set_off + job.bad[task] - 1));
        }
    }
    memset(job.bad, 0, (size_t)n_tasks * sizeof(int64_t));
    MOE_TRY(moe_pool_run(n_tasks, task_fn, &job));
    for (task = 0; task < n_tasks; task++) {
        const int64_t bad = job.bad[task];
        if (bad == INT64_MIN) {
            return moe_set_error(MOE_STATUS_ALLOC, "out of memory for the "
                                 "PEER scratch of a pool thread");
        }
        if (bad > 0) {
            return moe_set_error(MOE_STATUS_NONFINITE, "x must be finite, got "
                                 "a NaN or Inf in token %lld",
                                 (long long)(bad - 1));
        }
    }
    return MOE_STATUS_OK;
}
