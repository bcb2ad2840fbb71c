/*
 * cpu/ffn_backward.c - the grouped expert FFN's backward on the CPU.  For the
 * rows X_e of expert e (forward: G = X W_g^T + b_g, U = X W_u^T + b_u,
 * H = act(G, U), Y = H W_d^T + b_d) and dY:
 *   1. G, U recomputed from the forward's packed panels (the forward's
 *      bits: nothing of size rows x d_ff was kept), dH = dY W_d, then
 *      H, dG, dU from the activation's backward;
 *   2. dX = dG W_g + dU W_u (one chain over both);
 *   3. dW_d = dY^T H, dW_g = dG^T X, dW_u = dU^T X over the expert's rows,
 *      and the bias gradients, column sums in row order.
 * The products run on cpu/matmul.c (B read in place from the unpacked
 * weights; weights stored as bf16 / fp16 are widened to fp32 first).
 * A bf16-compute pack (the forward rounded X and H to bf16): gate and up
 * are recomputed with the forward's dot kernel on its panels (its bits),
 * and every product of steps 1-3 rounds both operands to bf16 with fp32
 * sums (moe_mm_block_bf16: dY, dG, dU, X, H and the weights, which are
 * bf16 already); the activation's backward and the bias sums stay fp32,
 * as in mixed-precision training.  Each
 * output element is computed by one task as one chain in a fixed order:
 * the same bits for any thread count, and a row's dX depends on that row
 * alone.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

#define MOE_BWD_ROWS   192 /* rows per phase-1 task (a multiple of MR)    */
#define MOE_BWD_UNITS  128 /* hidden units per phase-1 task               */
#define MOE_BWD_MROWS  192 /* output rows per phase-2 / 3 task            */
#define MOE_BWD_MCOLS  256 /* output columns per phase-2 / 3 task         */

typedef struct moe_bwd_job {
    const moe_ffn_backward_params *p;
    const moe_experts *w;
    const moe_kernels *kr;
    int64_t            d, F;
    const float       *xs;      /* (n_rows, d) the rows, gathered          */
    const float       *wg, *wu, *wd; /* fp32 weights (E, F, d), (E, d, F)  */
    int64_t            wes[3], wld[3]; /* their expert and row strides
                                    (gate, up, down; columns dense)         */
    moe_wstrides       src[3];  /* the caller's arrays' strides, resolved   */
    int                copy[3]; /* matrix m read from a dense fp32 copy     */
    float             *h, *dg, *du;  /* (n_rows, F)                         */
    struct moe_bwd_task { int64_t e, r, c; } *tasks; /* a phase's tasks:
                                    (expert, first row, first column)       */
    int64_t            n_tasks;
    int                mat;     /* phase 3: 0 gate, 1 up, 2 down, 3 biases */
    int                bf16;    /* a bf16-compute pack: products in bf16    */
    /* bf16 on tiles (a tile set): every product's operands packed once
     * (rounded to bf16), A as activation panels of 32 rows (MOE_DOT_TILES),
     * B as (pairs of k, 32 columns) panels; expert e's rows r in [lo, hi),
     * n_e of them, q_e = ceil(n_e / 2) pairs of rows:                       */
    int                tiles;
    int64_t            dp, Fp;  /* d, F rounded up to 32 (B's columns)      */
    int64_t           *po;      /* (E + 1,) offsets of the experts' 32-row
                                   panels                                   */
    int64_t           *oq;      /* (E + 1,) offsets of q_e                  */
    int64_t           *ob;      /* (E + 1,) offsets of ceil(q_e / 16)       */
    uint32_t          *dyb;     /* A, dY rows: panel po[e] + i / 32, k d/2  */
    uint32_t          *xb;      /* A, X rows as dyb (the gate / up recompute:
                                   the forward's panels), or NULL with gu   */
    uint32_t          *dgb, *dub; /* A, dG / dU rows: as dyb, k F / 2      */
    uint32_t          *dyt;     /* A, dY^T of expert e: dp / 32 panels of
                                   q_e pairs at ob[e] * 512 * (dp / 32)     */
    uint32_t          *dgt, *dut; /* A, dG^T / dU^T: as dyt, Fp / 32 panels */
    uint32_t          *xv;      /* B, pairs of X rows: dp / 32 panels of q_e
                                   pair rows at oq[e] * dp                  */
    uint32_t          *hv;      /* B, pairs of H rows: as xv, Fp            */
    uint32_t          *wv[3];   /* B, W_g, W_u (F / 2 pairs, dp) and W_d
                                   (d / 2, Fp) of expert e at e * their size */
    int                failed;
    /* expert LoRA (rank r > 0), the scaling s folded into the row terms:  */
    int32_t            r;
    float             *zg, *zu; /* (n_rows, r) s * X A_g^T, s * X A_u^T      */
    float             *vd;      /* (n_rows, r) s * dY B_d                   */
    float             *bgt, *but; /* (E, r, F) B_g^T, B_u^T                  */
} moe_bwd_job;

static int64_t
moe_bwd_ff(const moe_experts *w, int64_t e)
{
    return w->expert_ff ? w->expert_ff[e] : w->d_ff;
}

/* min(avail, block), and 0 for nothing left. */
static int64_t
moe_bwd_clamp(int64_t avail, int64_t block)
{
    return avail < 0 ? 0 : (avail < block ? avail : block);
}

static void
moe_bwd_fail(moe_bwd_job *job)
{
    __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
}

/* IEEE half bits -> float (exact; subnormals, inf and NaN included). */
static float
moe_bwd_half(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    float f;
    uint32_t u;

    if (ex == 0) { /* zero or subnormal: man * 2^-24 */
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    u = ex == 31 ? sign | 0x7f800000u | (man << 13)
                 : sign | ((ex + 112u) << 23) | (man << 13);
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* n weights of dtype `dt` at stride cs -> fp32 (bf16 / fp16 widened
 * exactly). */
static void
moe_bwd_widen(const void *src, moe_dtype dt, int64_t cs, int64_t n, float *o)
{
    const uint16_t *s = src;
    int64_t i;

    for (i = 0; i < n; i++) {
        if (dt == MOE_DTYPE_F32) {
            o[i] = ((const float *)src)[i * cs];
        }
        else if (dt == MOE_DTYPE_BF16) {
            uint32_t u = (uint32_t)s[i * cs] << 16;
            memcpy(&o[i], &u, sizeof(u));
        }
        else {
            o[i] = moe_bwd_half(s[i * cs]);
        }
    }
}

/* Expert e's weights that are read from a copy (job->copy): to dense fp32
 * (task e). */
static void
moe_bwd_widen_task(void *ctx, int64_t e)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    const size_t es = job->w->dtype == MOE_DTYPE_F32 ? 4 : 2;
    const void *src[3] = {p->w_gate, p->w_up, p->w_down};
    float *dst[3] = {(float *)job->wg, (float *)job->wu, (float *)job->wd};
    int m;

    if (p->offsets[e + 1] == p->offsets[e]) {
        return; /* no rows: its weights are never read */
    }
    for (m = 0; m < 3; m++) {
        const moe_wstrides st = job->src[m];
        const int64_t rows = m < 2 ? job->F : job->d, cols = m < 2 ? job->d : job->F;
        int64_t r;
        if (src[m] == NULL || !job->copy[m]) {
            continue;
        }
        for (r = 0; r < rows; r++) {
            moe_bwd_widen((const char *)src[m] + (size_t)(e * st.expert + r * st.row) * es,
                          job->w->dtype, st.col, cols,
                          dst[m] + (e * rows + r) * cols);
        }
    }
}

/* Words of an activation panel of 32 rows and Kp pairs. */
static int64_t
moe_bwd_tp(int64_t Kp)
{
    return (Kp + 15) / 16 * 16 * 32;
}

/* A, transposed: element (j, kp) = (v[2 i][j], v[2 i + 1][j]), i = kp -
 * kp0, for pair rows kp in [kp0, kp0 + nq) (v's rows ld floats apart, n of
 * them: the high half 0 past them) and columns j in [j0, j1) -> panels of
 * 32 columns-as-rows, `panel` words apart. */
static void
moe_bwd_pack_at(const float *v, int64_t ld, int64_t n, int64_t kp0,
                int64_t nq, int64_t j0, int64_t j1, uint32_t *a, int64_t panel)
{
    int64_t kp, j;

    for (kp = kp0; kp < kp0 + nq; kp++) {
        const int64_t i = 2 * (kp - kp0);
        const float *r0 = v + i * ld, *r1 = i + 1 < n ? r0 + ld : NULL;
        for (j = j0; j < j1; j++) {
            a[(j / 32) * panel + moe_tile_pair(kp, (int)(j % 32), 32)] =
                moe_bf16_pair(r0[j], r1 ? r1[j] : 0.0f);
        }
    }
}

/* B: pair rows kp as moe_bwd_pack_at, columns [j0, j1) -> panels of (q
 * pair rows, 32 columns), q * 32 words apart. */
static void
moe_bwd_pack_b(const float *v, int64_t ld, int64_t n, int64_t kp0, int64_t nq,
               int64_t j0, int64_t j1, uint32_t *b, int64_t q)
{
    int64_t kp, j;

    for (kp = kp0; kp < kp0 + nq; kp++) {
        const int64_t i = 2 * (kp - kp0);
        const float *r0 = v + i * ld, *r1 = i + 1 < n ? r0 + ld : NULL;
        for (j = j0; j < j1; j++) {
            b[(j / 32) * q * 32 + kp * 32 + j % 32] =
                moe_bf16_pair(r0[j], r1 ? r1[j] : 0.0f);
        }
    }
}

/* Tiles, before phase 1, task e: expert e's weights as B panels (bf16
 * bits as they are; columns past the matrix 0), its rows of dY (A, and A
 * transposed: rows past d 0) and of X (B pair rows, columns past d 0), and
 * the rows past the expert's in the last dG / dU row panels (0). */
static void
moe_bwd_tiles_prep(void *ctx, int64_t e)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    const int64_t d = job->d, F = job->F, lo = p->offsets[e];
    const int64_t n = p->offsets[e + 1] - lo, q = job->oq[e + 1] - job->oq[e];
    const int64_t pan = job->po[e + 1] - job->po[e];
    const int64_t tq = (job->ob[e + 1] - job->ob[e]) * 512;
    const void *src[3] = {job->w->gated ? p->w_gate : NULL, p->w_up, p->w_down};
    uint32_t *dyt = job->dyt + job->ob[e] * 512 * (job->dp / 32);
    uint32_t *xv = job->xv + job->oq[e] * job->dp;
    const float *rows[32];
    int64_t P, i, j;
    int m;

    if (n == 0) {
        return; /* no rows: nothing reads them */
    }
    for (m = 0; m < 3; m++) {
        const moe_wstrides st = job->src[m];
        const int64_t R = m < 2 ? F : d, C = m < 2 ? d : F;
        const int64_t Cp = m < 2 ? job->dp : job->Fp;
        const uint16_t *w = src[m];
        uint32_t *o = job->wv[m] + e * (R / 2) * Cp;
        if (w == NULL) {
            continue;
        }
        w += e * st.expert;
        for (i = 0; i < R; i += 2) {
            const uint16_t *w0 = w + i * st.row, *w1 = w0 + st.row;
            for (P = 0; P < Cp; P += 32) { /* one 32-column panel's row */
                uint32_t *oi = o + P * (R / 2) + (i / 2) * 32;
                const int64_t cn = C - P < 32 ? C - P : 32;
                int jj;
                if (st.col == 1 && cn == 32) {
                    for (jj = 0; jj < 32; jj++) {
                        oi[jj] = (uint32_t)w0[P + jj] | (uint32_t)w1[P + jj] << 16;
                    }
                    continue;
                }
                for (jj = 0; jj < 32; jj++) {
                    oi[jj] = jj < cn ? (uint32_t)w0[(P + jj) * st.col] |
                                           (uint32_t)w1[(P + jj) * st.col] << 16
                                     : 0u;
                }
            }
        }
    }
    for (P = 0; P < pan; P++) {
        const int rn = n - P * 32 < 32 ? (int)(n - P * 32) : 32;
        const int64_t at = job->po[e] + P;
        for (i = 0; i < 32; i++) {
            rows[i] = p->dy + (lo + P * 32 + (i < rn ? i : 0)) * d;
        }
        job->kr->pack_tiles(rows, rn, 32, d, job->dyb + at * moe_bwd_tp(d / 2));
        if (job->xb != NULL) {
            for (i = 0; i < 32; i++) {
                rows[i] = job->xs + (lo + P * 32 + (i < rn ? i : 0)) * d;
            }
            job->kr->pack_tiles(rows, rn, 32, d, job->xb + at * moe_bwd_tp(d / 2));
        }
        for (m = 0; m < 2 && rn < 32; m++) {
            uint32_t *g = m == 0 ? job->dgb : job->dub;
            int64_t kp;
            if (g == NULL) {
                continue;
            }
            g += at * moe_bwd_tp(F / 2);
            for (kp = 0; kp < F / 2; kp++) {
                for (i = rn; i < 32; i++) {
                    g[moe_tile_pair(kp, (int)i, 32)] = 0;
                }
            }
        }
    }
    moe_bwd_pack_at(p->dy + lo * d, d, n, 0, q, 0, d, dyt, tq);
    moe_bwd_pack_b(job->xs + lo * d, d, n, 0, q, 0, d, xv, q);
    for (i = d; i < job->dp; i++) {
        for (j = 0; j < q; j++) {
            dyt[(i / 32) * tq + moe_tile_pair(j, (int)(i % 32), 32)] = 0;
            xv[(i / 32) * q * 32 + j * 32 + i % 32] = 0;
        }
    }
}

/* Tiles, phase 1: block rows [r0, r0 + m) x units [u0, u0 + nu) of dG, dU
 * (rows, and transposed) and H (pair rows) of expert e into their panels.
 * (Units past the expert's d_ff and columns past F are never written:
 * only the output rows / columns the backward drops read them.) */
static void
moe_bwd_tiles_hidden(const moe_bwd_job *job, int64_t e, int64_t r0, int64_t m,
                     int64_t u0, int64_t nu)
{
    const int64_t F = job->F, lo = job->p->offsets[e];
    const int64_t q = job->oq[e + 1] - job->oq[e];
    const int64_t tq = (job->ob[e + 1] - job->ob[e]) * 512;
    const int64_t i0 = r0 - lo; /* a multiple of 32 (MOE_BWD_ROWS) */
    int64_t r, u;
    int t;

    for (t = 0; t < 2; t++) {
        const float *g = t == 0 ? job->dg : job->du;
        uint32_t *rows = t == 0 ? job->dgb : job->dub;
        uint32_t *at = t == 0 ? job->dgt : job->dut;
        if (g == NULL) {
            continue;
        }
        for (r = 0; r < m; r++) {
            const float *gr = g + (r0 + r) * F;
            uint32_t *o = rows + (job->po[e] + (i0 + r) / 32) * moe_bwd_tp(F / 2);
            for (u = u0; u < u0 + nu; u += 2) {
                o[moe_tile_pair(u / 2, (int)((i0 + r) % 32), 32)] =
                    moe_bf16_pair(gr[u], gr[u + 1]);
            }
        }
        moe_bwd_pack_at(g + r0 * F, F, m, i0 / 2, (m + 1) / 2, u0, u0 + nu,
                        at + job->ob[e] * 512 * (job->Fp / 32), tq);
    }
    moe_bwd_pack_b(job->h + r0 * F, F, m, i0 / 2, (m + 1) / 2, u0, u0 + nu,
                   job->hv + job->oq[e] * job->Fp, q);
}

/* Tiles: the packed operands' memory, then expert by expert the parts
 * packed before phase 1 (moe_bwd_tiles_prep). */
static moe_status
moe_bwd_tiles_alloc(moe_bwd_job *job)
{
    const moe_ffn_backward_params *p = job->p;
    const int64_t E = job->w->n_experts, d = job->d, F = job->F;
    const int gated = job->w->gated;
    int64_t e, np, nq, nb;

    job->dp = (d + 31) / 32 * 32;
    job->Fp = (F + 31) / 32 * 32;
    job->po = moe_alloc((size_t)(3 * (E + 1)), sizeof(int64_t));
    if (job->po == NULL) {
        return MOE_STATUS_ALLOC;
    }
    job->oq = job->po + E + 1;
    job->ob = job->oq + E + 1;
    job->po[0] = job->oq[0] = job->ob[0] = 0;
    for (e = 0; e < E; e++) {
        const int64_t n = p->offsets[e + 1] - p->offsets[e];
        job->po[e + 1] = job->po[e] + (n + 31) / 32;
        job->oq[e + 1] = job->oq[e] + (n + 1) / 2;
        job->ob[e + 1] = job->ob[e] + ((n + 1) / 2 + 15) / 16;
    }
    np = job->po[E];
    nq = job->oq[E];
    nb = job->ob[E] * 512;
    {
        /* one workspace (kept between calls: no page faults per step) */
        uint32_t **dst[12] = {&job->dyb, &job->dub, &job->dgb, &job->dyt,
                              &job->dut, &job->dgt, &job->xv, &job->hv,
                              &job->wv[0], &job->wv[1], &job->wv[2], &job->xb};
        const int64_t size[12] = {
            np * moe_bwd_tp(d / 2), np * moe_bwd_tp(F / 2),
            gated ? np * moe_bwd_tp(F / 2) : 0, nb * (job->dp / 32),
            nb * (job->Fp / 32), gated ? nb * (job->Fp / 32) : 0,
            nq * job->dp, nq * job->Fp, gated ? E * (F / 2) * job->dp : 0,
            E * (F / 2) * job->dp, E * (d / 2) * job->Fp,
            p->gu == NULL ? np * moe_bwd_tp(d / 2) : 0};
        int64_t total = 0;
        uint32_t *ws;
        int b;
        for (b = 0; b < 12; b++) {
            total += (size[b] + 15) / 16 * 16; /* 64-byte aligned parts */
        }
        if ((ws = moe_workspace(MOE_WS_BWD_TILES, (size_t)total + 16, 4)) == NULL) {
            return MOE_STATUS_ALLOC;
        }
        ws += (16 - ((uintptr_t)ws / 4) % 16) % 16;
        for (b = 0; b < 12; b++) {
            *dst[b] = size[b] > 0 ? ws : NULL;
            ws += (size[b] + 15) / 16 * 16;
        }
    }
    return moe_pool_run(E, moe_bwd_tiles_prep, job);
}

/* Phase 0: row r of xs is x[token_index[r]] (tasks of 64 rows). */
static void
moe_bwd_gather_task(void *ctx, int64_t t)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    int64_t r;

    for (r = t * 64; r < p->n_rows && r < t * 64 + 64; r++) {
        memcpy((float *)job->xs + r * job->d,
               p->x + p->token_index[r] * job->d, sizeof(float) * job->d);
    }
}

/* The adapters' terms of row `row` (expert e) on units [f0, f0 + n) of the
 * recomputed gate and up tile rows. */
static void
moe_bwd_lora_add(const moe_bwd_job *job, int64_t row, int64_t e, int64_t f0,
                 int n, float *gate, float *up)
{
    const int64_t F = job->F;
    int64_t q;
    int j;

    for (q = 0; q < job->r; q++) {
        if (gate != NULL && job->zg != NULL) {
            const float z = job->zg[row * job->r + q];
            const float *b = job->bgt + (e * job->r + q) * F + f0;
            for (j = 0; j < n; j++) {
                gate[j] += z * b[j];
            }
        }
        if (job->zu != NULL) {
            const float z = job->zu[row * job->r + q];
            const float *b = job->but + (e * job->r + q) * F + f0;
            for (j = 0; j < n; j++) {
                up[j] += z * b[j];
            }
        }
    }
}

/* c (m, n) = the segments' product: on tiles from the packed operands
 * (ts), else moe_mm_block (bf16: operands rounded as read). */
static moe_status
moe_bwd_product(const moe_bwd_job *job, const moe_mm_seg *segs,
                const moe_tmm_seg *ts, int n_segs, int64_t m, int64_t n,
                float *c, int64_t ldc)
{
    if (job->tiles) {
        return moe_tmm_block(ts, n_segs, m, n, c, ldc);
    }
    return (job->bf16 ? moe_mm_block_bf16 : moe_mm_block)(segs, n_segs, m, n,
                                                          c, ldc);
}

/* Phase 1: task (e, first row, first unit) -> H, dG, dU of that block. */
static void
moe_bwd_hidden_task(void *ctx, int64_t t)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    const moe_experts *w = job->w;
    const moe_kernels *kr = job->kr;
    const int64_t e = job->tasks[t].e, r0 = job->tasks[t].r;
    const int64_t u0 = job->tasks[t].c;
    const int64_t d = job->d, F = job->F, ff = moe_bwd_ff(w, e);
    const int64_t m = moe_bwd_clamp(p->offsets[e + 1] - r0, MOE_BWD_ROWS);
    const int64_t nu = moe_bwd_clamp(ff - u0, MOE_BWD_UNITS);
    const int mr = job->bf16 ? kr->dot_mr : kr->mr, nr = w->nr;
    const int width = w->gated ? nr / 2 : nr;
    const int64_t n_pan = (m + mr - 1) / mr;
    const int64_t panel = moe_panel_bytes(w->dtype, d, nr, w->group_gu);
    /* an activation panel's floats (bf16: room for any dot layout) */
    const int64_t ap_size = job->bf16 ? mr * d + 16 * mr : mr * d;
    float tile[MOE_MAX_MR * MOE_MAX_NR];
    float *ap, *dh;
    moe_mm_seg seg;
    moe_tmm_seg ts = {NULL, 0, NULL, 0, 0};
    int64_t c, P, i, j;

    /* saved pre-activations (p->gu): no row panels to multiply */
    const int64_t n_ap = p->gu != NULL || job->xb != NULL ? 0 : n_pan * ap_size;

    ap = moe_workspace(MOE_WS_BWD_TASK, (size_t)(n_ap + m * MOE_BWD_UNITS),
                       sizeof(float));
    if (ap == NULL) {
        moe_bwd_fail(job);
        return;
    }
    dh = ap + n_ap;
    /* dH (m, nu) = dY rows @ W_d[:, u0:u0+nu] */
    seg = moe_mm_term(p->dy + r0 * d, d, 1,
                        job->wd ? job->wd + e * job->wes[2] + u0 : NULL,
                        job->wld[2], d);
    if (job->tiles) {
        const int64_t ta = moe_bwd_tp(d / 2);
        ts = (moe_tmm_seg){
            job->dyb + (job->po[e] + (r0 - p->offsets[e]) / 32) * ta, ta,
            job->wv[2] + e * (d / 2) * job->Fp + (u0 / 32) * (d / 2) * 32,
            (d / 2) * 32, d / 2};
    }
    if (moe_bwd_product(job, &seg, &ts, 1, m, nu, dh, MOE_BWD_UNITS) !=
        MOE_STATUS_OK) {
        moe_bwd_fail(job);
        return;
    }
    if (job->vd != NULL) { /* + s (dY B_d) A_d */
        const float *ad = p->lora->a_down;
        int64_t q;
        for (i = 0; i < m; i++) {
            for (q = 0; q < job->r; q++) {
                const float v = job->vd[(r0 + i) * job->r + q];
                const float *arow = ad + (e * job->r + q) * F + u0;
                for (j = 0; j < nu; j++) {
                    dh[i * MOE_BWD_UNITS + j] += v * arow[j];
                }
            }
        }
    }
    /* the rows as the forward's activation panels, (d, MR) k-major (bf16:
     * the dot kernel's) */
    for (P = 0; job->bf16 && job->xb == NULL && p->gu == NULL && P < n_pan;
         P++) {
        const float *src[MOE_MAX_MR];
        const int rows = m - P * mr < mr ? (int)(m - P * mr) : mr;
        for (i = 0; i < mr; i++) {
            src[i] = job->xs + (r0 + P * mr + (i < rows ? i : 0)) * d;
        }
        moe_pack_dot_panel(kr, src, rows, mr, d, ap + P * ap_size);
    }
    if (job->bf16 && p->gu == NULL && kr->tile_begin != NULL) {
        kr->tile_begin();
    }
    for (P = 0; !job->bf16 && p->gu == NULL && P < n_pan; P++) {
        for (i = 0; i < mr; i++) {
            const int64_t r = r0 + P * mr + i;
            for (j = 0; j < d; j++) {
                ap[P * mr * d + j * mr + i] =
                    P * mr + i < m ? job->xs[r * d + j] : 0.0f;
            }
        }
    }
    for (c = u0 / width; c * width < u0 + nu; c++) {
        const char *b = (const char *)w->gu +
                        (e * w->gu_panels + c) * panel;
        const float *bias = w->gu_bias ? w->gu_bias +
                                (e * w->gu_panels + c) * nr : NULL;
        const moe_prefetch none = {NULL, 0};
        const int n_units = ff - c * width < width ? (int)(ff - c * width)
                                                   : width;
        for (P = 0; P < n_pan; P++) {
            const int rows = m - P * mr < mr ? (int)(m - P * mr) : mr;
            if (p->gu == NULL && job->bf16) {
                /* tiles: the rows' panels packed once (moe_bwd_tiles_prep) */
                moe_dot_panel(kr, job->xb != NULL
                                  ? job->xb + (job->po[e] + (r0 - p->offsets[e]) / 32 +
                                               P) * moe_bwd_tp(d / 2)
                                  : (const void *)(ap + P * ap_size),
                              b, d / 2, rows, nr, tile);
            }
            else if (p->gu == NULL) {
                kr->ukr[w->dtype](ap + P * ap_size, b, d, w->group_gu, rows,
                                  tile, nr, none);
            }
            for (i = 0; i < rows; i++) {
                float *tr = tile + i * nr;
                const int64_t row = r0 + P * mr + i;
                const int64_t f0 = c * width;
                if (p->gu != NULL) { /* the forward's values, bias and LoRA in */
                    const float *s = p->gu + row * (w->gated ? 2 * F : F) + f0;
                    memcpy(tr, s, sizeof(float) * (size_t)n_units);
                    if (w->gated) {
                        memcpy(tr + width, s + F, sizeof(float) * (size_t)n_units);
                    }
                }
                else if (bias != NULL) {
                    for (j = 0; j < nr; j++) {
                        tr[j] += bias[j];
                    }
                }
                if (job->r > 0 && p->gu == NULL) { /* adapters' z_q B[:, q] */
                    moe_bwd_lora_add(job, row, e, f0, n_units,
                                     w->gated ? tr : NULL,
                                     w->gated ? tr + width : tr);
                }
                kr->act_grad((int)p->act.activation,
                             w->gated ? tr : NULL, w->gated ? tr + width : tr,
                             dh + (P * mr + i) * MOE_BWD_UNITS + (f0 - u0),
                             n_units, p->act.alpha, p->act.limit,
                             job->h + row * F + f0,
                             w->gated ? job->dg + row * F + f0 : NULL,
                             job->du + row * F + f0);
            }
        }
    }
    if (job->bf16 && p->gu == NULL && kr->tile_end != NULL) {
        kr->tile_end();
    }
    if (job->tiles) {
        moe_bwd_tiles_hidden(job, e, r0, m, u0, nu);
    }
}

/* Phase 2: task (e, first row, first column) of dX = dG W_g + dU W_u. */
static void
moe_bwd_dx_task(void *ctx, int64_t t)
{
    moe_bwd_job *job = ctx;
    const struct moe_bwd_task tk = job->tasks[t];
    const int64_t d = job->d, F = job->F, ff = moe_bwd_ff(job->w, tk.e);
    /* gated: the chain runs over dG's units, then dU's */
    const moe_mm_seg segs[2] = {
        moe_mm_term(job->dg + tk.r * F, F, 1,
                    job->wg ? job->wg + tk.e * job->wes[0] + tk.c : NULL,
                    job->wld[0], ff),
        moe_mm_term(job->du + tk.r * F, F, 1,
                    job->wu ? job->wu + tk.e * job->wes[1] + tk.c : NULL,
                    job->wld[1], ff)};
    /* tiles: A the rows' panels, B the weights' column panels */
    const int64_t ta = moe_bwd_tp(F / 2);
    const int64_t ra = job->tiles ? (job->po[tk.e] +
                                     (tk.r - job->p->offsets[tk.e]) / 32) * ta
                                  : 0;
    const int64_t wb = tk.e * (F / 2) * job->dp + (tk.c / 32) * (F / 2) * 32;
    const moe_tmm_seg ts[2] = {
        {job->dgb ? job->dgb + ra : NULL, ta,
         job->wv[0] ? job->wv[0] + wb : NULL, (F / 2) * 32, ff / 2},
        {job->dub ? job->dub + ra : NULL, ta,
         job->wv[1] ? job->wv[1] + wb : NULL, (F / 2) * 32, ff / 2}};
    const int gated = job->w->gated;

    if (moe_bwd_product(job, segs + !gated, ts + !gated, 1 + gated,
                     moe_bwd_clamp(job->p->offsets[tk.e + 1] - tk.r,
                                   MOE_BWD_MROWS),
                     moe_bwd_clamp(d - tk.c, MOE_BWD_MCOLS),
                     job->p->dx + tk.r * d + tk.c, d) != MOE_STATUS_OK) {
        moe_bwd_fail(job);
    }
}

/*
 * Phase 3: task (e, first row, first column) of one weight gradient (mat:
 * 0 dW_g = dG^T X, 1 dW_u = dU^T X, 2 dW_d = dY^T H, all over the expert's
 * rows; rows / columns past the expert's d_ff are 0), or with mat 3 the
 * bias gradients of expert e.
 */
static void
moe_bwd_dw_task(void *ctx, int64_t t)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    const int64_t e = job->tasks[t].e, i0 = job->tasks[t].r, j0 = job->tasks[t].c;
    const int64_t d = job->d, F = job->F, ff = moe_bwd_ff(job->w, e);
    const int64_t lo = p->offsets[e], n_e = p->offsets[e + 1] - lo;
    const int down = job->mat == 2;
    const int64_t rows = down ? d : F, cols = down ? F : d;
    const int64_t m = moe_bwd_clamp(rows - i0, MOE_BWD_MROWS);
    const int64_t n = moe_bwd_clamp(cols - j0, MOE_BWD_MCOLS);
    /* the part inside the expert's size: rows (gate, up) or columns (down) */
    const int64_t m_in = down ? m : moe_bwd_clamp(ff - i0, m);
    const int64_t n_in = down ? moe_bwd_clamp(ff - j0, n) : n;
    float *out = (job->mat == 0 ? p->d_w_gate : job->mat == 1 ? p->d_w_up
                                                             : p->d_w_down) +
                 e * (down || p->d_gu_stride == 0 ? F * d : p->d_gu_stride) +
                 i0 * cols + j0;
    /* A: dY^T (down) or dG^T / dU^T, read transposed; B: H or X rows */
    const moe_mm_seg seg = down
        ? moe_mm_term(p->dy + lo * d + i0, 1, d, job->h + lo * F + j0, F, n_e)
        : moe_mm_term((job->mat == 0 ? job->dg : job->du) + lo * F + i0, 1, F,
                      job->xs + lo * d + j0, d, n_e);
    /* tiles: A dY^T / dG^T / dU^T rows, B pairs of H / X rows */
    const int64_t q = job->tiles ? job->oq[e + 1] - job->oq[e] : 0;
    const int64_t tq = job->tiles ? (job->ob[e + 1] - job->ob[e]) * 512 : 0;
    const moe_tmm_seg ts = !job->tiles ? (moe_tmm_seg){NULL, 0, NULL, 0, 0}
        : down ? (moe_tmm_seg){job->dyt + job->ob[e] * 512 * (job->dp / 32) +
                                   (i0 / 32) * tq, tq,
                               job->hv + job->oq[e] * job->Fp + (j0 / 32) * q * 32,
                               q * 32, q}
               : (moe_tmm_seg){(job->mat == 0 ? job->dgt : job->dut) +
                                   job->ob[e] * 512 * (job->Fp / 32) +
                                   (i0 / 32) * tq, tq,
                               job->xv + job->oq[e] * job->dp + (j0 / 32) * q * 32,
                               q * 32, q};
    int64_t i;

    if (m_in > 0 && n_in > 0) {
        if (moe_bwd_product(job, &seg, &ts, 1, m_in, n_in, out, cols) !=
            MOE_STATUS_OK) {
            moe_bwd_fail(job);
            return;
        }
    }
    for (i = 0; i < m; i++) { /* outside the expert's size */
        if (i >= m_in) {
            memset(out + i * cols, 0, sizeof(float) * (size_t)n);
        }
        else if (n_in < n) {
            memset(out + i * cols + n_in, 0, sizeof(float) * (size_t)(n - n_in));
        }
    }
}

/* Phase 3, mat 3: the bias gradients of expert t, sums over rows in order. */
static void
moe_bwd_bias_task(void *ctx, int64_t e)
{
    moe_bwd_job *job = ctx;
    const moe_ffn_backward_params *p = job->p;
    const int64_t d = job->d, F = job->F, ff = moe_bwd_ff(job->w, e);
    const int64_t lo = p->offsets[e], hi = p->offsets[e + 1];
    float *dst[3] = {p->d_b_gate, p->d_b_up, p->d_b_down};
    const float *src[3] = {job->dg, job->du, p->dy};
    const int64_t n[3] = {F, F, d}, used[3] = {ff, ff, d};
    double *acc;
    int64_t r, j;
    int q;

    acc = moe_workspace(MOE_WS_BWD_TASK, (size_t)(F > d ? F : d),
                        sizeof(double));
    if (acc == NULL) {
        moe_bwd_fail(job);
        return;
    }
    for (q = 0; q < 3; q++) {
        if (dst[q] == NULL || (q == 0 && !job->w->gated)) {
            continue;
        }
        memset(acc, 0, sizeof(double) * (size_t)n[q]);
        for (r = lo; r < hi; r++) {
            const float *row = src[q] + r * n[q];
            for (j = 0; j < used[q]; j++) {
                acc[j] += row[j];
            }
        }
        for (j = 0; j < n[q]; j++) {
            dst[q][e * n[q] + j] = (float)acc[j];
        }
    }
}

/* The (expert, a, b) tasks of a phase: rows of the expert (or `rows` rows
 * when > 0) in blocks of rb, and [0, cols) in blocks of cb. */
static int64_t
moe_bwd_tasks(const moe_ffn_backward_params *p, const moe_experts *w,
              int64_t rows, int64_t rb, int64_t cols, int64_t cb,
              int by_units, struct moe_bwd_task *tasks)
{
    int64_t e, r, c, n = 0;

    for (e = 0; e < w->n_experts; e++) {
        const int64_t lo = rows > 0 ? 0 : p->offsets[e];
        const int64_t hi = rows > 0 ? rows : p->offsets[e + 1];
        const int64_t nc = by_units ? moe_bwd_ff(w, e) : cols;
        for (r = lo; r < hi; r += rb) {
            for (c = 0; c < nc; c += cb) {
                if (tasks != NULL) {
                    tasks[n] = (struct moe_bwd_task){e, r, c};
                }
                n++;
            }
        }
    }
    return n;
}

static moe_status
moe_bwd_phase(moe_bwd_job *job, int64_t rows, int64_t rb, int64_t cols,
              int64_t cb, int by_units, moe_task_fn fn)
{
    moe_status st;
    int64_t n = moe_bwd_tasks(job->p, job->w, rows, rb, cols, cb, by_units,
                              NULL);

    free(job->tasks);
    job->tasks = moe_alloc((size_t)n + 1, sizeof(*job->tasks));
    if (job->tasks == NULL) {
        return MOE_STATUS_ALLOC;
    }
    moe_bwd_tasks(job->p, job->w, rows, rb, cols, cb, by_units, job->tasks);
    job->n_tasks = n;
    st = moe_pool_run(n, fn, job);
    if (st == MOE_STATUS_OK && job->failed) {
        st = moe_set_error(MOE_STATUS_ALLOC, "ffn backward: out of memory "
                           "for a task's scratch");
    }
    return st;
}

/* out rows [o_e, o_e+1) (n_rows, n) = s * (rows of a) @ W_e, W_e (K, n)
 * row-major at w + e * K * n, expert by expert. */
static moe_status
moe_bwd_rowprod(const moe_ffn_backward_params *p, const float *a, int64_t lda,
                const float *w, int64_t K, int64_t n, float s, float *out)
{
    const int64_t E = p->experts->n_experts;
    moe_status st = MOE_STATUS_OK;
    int64_t e, i;

    for (e = 0; e < E && st == MOE_STATUS_OK; e++) {
        const int64_t o = p->offsets[e], m = p->offsets[e + 1] - o;
        const moe_mm_seg seg = moe_mm_term(a + o * lda, lda, 1, w + e * K * n,
                                           n, K);
        if (m > 0) {
            st = moe_mm(&seg, 1, m, n, out + o * n, n);
        }
    }
    for (i = 0; st == MOE_STATUS_OK && s != 1.0f && i < p->n_rows * n; i++) {
        out[i] *= s;
    }
    return st;
}

/* out_e (m, n) = A_e^T B_e over expert e's rows (A rows at a + o * lda, m
 * wide; B rows at b + o * ldb, n wide), expert by expert; 0 without rows. */
static moe_status
moe_bwd_wgrad(const moe_ffn_backward_params *p, const float *a, int64_t lda,
              int64_t m, const float *b, int64_t ldb, int64_t n, float *out)
{
    const int64_t E = p->experts->n_experts;
    moe_status st = MOE_STATUS_OK;
    int64_t e;

    for (e = 0; e < E && st == MOE_STATUS_OK; e++) {
        const int64_t o = p->offsets[e], K = p->offsets[e + 1] - o;
        const moe_mm_seg seg = moe_mm_term(a + o * lda, 1, lda, b + o * ldb,
                                           ldb, K);
        st = moe_mm(&seg, 1, m, n, out + e * m * n, n);
    }
    return st;
}

/* Before phase 1: the adapters' row terms zg, zu (s X A^T), vd (s dY B_d)
 * and B_g^T, B_u^T for the tiles. */
static moe_status
moe_bwd_lora_pre(moe_bwd_job *job)
{
    const moe_ffn_backward_params *p = job->p;
    const moe_expert_lora_params *l = p->lora;
    const int64_t E = job->w->n_experts, d = job->d, F = job->F, N = p->n_rows;
    const int64_t r = l->rank;
    const float s = l->scaling;
    float *at = moe_alloc((size_t)(E * r * (d > F ? d : F)) + 1, sizeof(float));
    moe_status st = MOE_STATUS_ALLOC;

    job->r = l->rank;
    if (at == NULL) {
        return st;
    }
    if (l->a_gate != NULL && job->w->gated) {
        job->zg = moe_alloc((size_t)(N * r) + 1, sizeof(float));
        job->bgt = moe_alloc((size_t)(E * r * F) + 1, sizeof(float));
        if (!job->zg || !job->bgt) {
            goto done;
        }
        moe_transpose(l->a_gate, E, r, d, at);
        moe_transpose(l->b_gate, E, F, r, job->bgt);
        if ((st = moe_bwd_rowprod(p, job->xs, d, at, d, r, s, job->zg)) !=
            MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
    }
    if (l->a_up != NULL) {
        job->zu = moe_alloc((size_t)(N * r) + 1, sizeof(float));
        job->but = moe_alloc((size_t)(E * r * F) + 1, sizeof(float));
        if (!job->zu || !job->but) {
            goto done;
        }
        moe_transpose(l->a_up, E, r, d, at);
        moe_transpose(l->b_up, E, F, r, job->but);
        if ((st = moe_bwd_rowprod(p, job->xs, d, at, d, r, s, job->zu)) !=
            MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
    }
    if (l->a_down != NULL) {
        if ((job->vd = moe_alloc((size_t)(N * r) + 1, sizeof(float))) == NULL) {
            goto done;
        }
        if ((st = moe_bwd_rowprod(p, p->dy, d, l->b_down, d, r, s, job->vd)) !=
            MOE_STATUS_OK) {
            goto done;
        }
    }
    st = MOE_STATUS_OK;
done:
    free(at);
    return st;
}

/*
 * After phases 1-2: the adapters' share of dx (s (dG B_g) A_g + s (dU B_u)
 * A_u) and their gradients, expert by expert over its rows:
 *   dB_g = dG^T (s X A_g^T),  dA_g = (s dG B_g)^T X   (likewise up),
 *   dB_d = dY^T (s H A_d^T),  dA_d = (s dY B_d)^T H.
 */
static moe_status
moe_bwd_lora_post(moe_bwd_job *job)
{
    const moe_ffn_backward_params *p = job->p;
    const moe_expert_lora_params *l = p->lora;
    const int64_t E = job->w->n_experts, d = job->d, F = job->F, N = p->n_rows;
    const int64_t r = l->rank;
    const float s = l->scaling;
    float *pg = NULL, *pu = NULL, *tmp = NULL, *zd = NULL, *adt = NULL;
    moe_status st = MOE_STATUS_ALLOC;
    int64_t e, i;

    if (job->zg != NULL) {
        if ((pg = moe_alloc((size_t)(N * r) + 1, sizeof(float))) == NULL ||
            (st = moe_bwd_rowprod(p, job->dg, F, l->b_gate, F, r, s, pg)) !=
                MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
    }
    if (job->zu != NULL) {
        if ((pu = moe_alloc((size_t)(N * r) + 1, sizeof(float))) == NULL ||
            (st = moe_bwd_rowprod(p, job->du, F, l->b_up, F, r, s, pu)) !=
                MOE_STATUS_OK) {
            goto done;
        }
        st = MOE_STATUS_ALLOC;
    }
    if (p->dx != NULL && (pg != NULL || pu != NULL)) {
        if ((tmp = moe_alloc((size_t)(N * d) + 1, sizeof(float))) == NULL) {
            goto done;
        }
        st = MOE_STATUS_OK;
        for (e = 0; e < E && st == MOE_STATUS_OK; e++) {
            const int64_t o = p->offsets[e], m = p->offsets[e + 1] - o;
            moe_mm_seg seg[2];
            int n = 0;
            if (pg != NULL) {
                seg[n++] = moe_mm_term(pg + o * r, r, 1, l->a_gate + e * r * d,
                                       d, r);
            }
            if (pu != NULL) {
                seg[n++] = moe_mm_term(pu + o * r, r, 1, l->a_up + e * r * d,
                                       d, r);
            }
            if (m > 0) {
                st = moe_mm(seg, n, m, d, tmp + o * d, d);
            }
        }
        for (i = 0; st == MOE_STATUS_OK && i < N * d; i++) {
            p->dx[i] += tmp[i];
        }
        if (st != MOE_STATUS_OK) {
            goto done;
        }
    }
    st = MOE_STATUS_OK;
    if (pg != NULL && p->d_lora_b_gate != NULL) {
        st = moe_bwd_wgrad(p, job->dg, F, F, job->zg, r, r, p->d_lora_b_gate);
    }
    if (st == MOE_STATUS_OK && pg != NULL && p->d_lora_a_gate != NULL) {
        st = moe_bwd_wgrad(p, pg, r, r, job->xs, d, d, p->d_lora_a_gate);
    }
    if (st == MOE_STATUS_OK && pu != NULL && p->d_lora_b_up != NULL) {
        st = moe_bwd_wgrad(p, job->du, F, F, job->zu, r, r, p->d_lora_b_up);
    }
    if (st == MOE_STATUS_OK && pu != NULL && p->d_lora_a_up != NULL) {
        st = moe_bwd_wgrad(p, pu, r, r, job->xs, d, d, p->d_lora_a_up);
    }
    if (st == MOE_STATUS_OK && job->vd != NULL && p->d_lora_b_down != NULL) {
        st = MOE_STATUS_ALLOC;
        zd = moe_alloc((size_t)(N * r) + 1, sizeof(float));
        adt = moe_alloc((size_t)(E * r * F) + 1, sizeof(float));
        if (!zd || !adt) {
            goto done;
        }
        moe_transpose(l->a_down, E, r, F, adt);
        if ((st = moe_bwd_rowprod(p, job->h, F, adt, F, r, s, zd)) ==
            MOE_STATUS_OK) {
            st = moe_bwd_wgrad(p, p->dy, d, d, zd, r, r, p->d_lora_b_down);
        }
    }
    if (st == MOE_STATUS_OK && job->vd != NULL && p->d_lora_a_down != NULL) {
        st = moe_bwd_wgrad(p, job->vd, r, r, job->h, F, F, p->d_lora_a_down);
    }
done:
    free(pg);
    free(pu);
    free(tmp);
    free(zd);
    free(adt);
    return st;
}

/* Zero the adapters' gradients of targets without one (or without rows). */
static void
moe_bwd_lora_zero(const moe_ffn_backward_params *p, int64_t E, int64_t d,
                  int64_t F)
{
    const moe_expert_lora_params *l = p->lora;
    const int64_t r = l->rank;
    float *out[6] = {p->d_lora_a_gate, p->d_lora_b_gate, p->d_lora_a_up,
                     p->d_lora_b_up, p->d_lora_a_down, p->d_lora_b_down};
    const int64_t n[6] = {E * r * d, E * F * r, E * r * d, E * F * r,
                          E * r * F, E * d * r};
    int i;

    for (i = 0; i < 6; i++) {
        if (out[i] != NULL) {
            memset(out[i], 0, sizeof(float) * (size_t)n[i]);
        }
    }
}

moe_status
moe_cpu_ffn_backward(const moe_ffn_backward_params *p)
{
    const moe_experts *w = p->experts;
    const int64_t d = w->d_model, F = w->d_ff, N = p->n_rows;
    const int64_t E = w->n_experts;
    moe_bwd_job job;
    float *wide = NULL, *xs, *hid;
    moe_status st = MOE_STATUS_ALLOC;
    int mat;

    if (moe_dtype_quantized(w->dtype)) {
        /* dx would need the weights widened from the quantized arrays */
        return moe_set_error(MOE_STATUS_INVALID_ARG, "the FFN backward takes "
                             "float32 / bfloat16 / float16 experts, not "
                             "quantized ones");
    }
    memset(&job, 0, sizeof(job));
    job.p = p;
    job.w = w;
    job.kr = moe_cpu_kernels();
    job.d = d;
    job.F = F;
    job.bf16 = w->bf16_act;
    job.tiles = job.bf16 && job.kr->dot_acc != NULL && p->lora == NULL;
    if (N == 0 || d == 0 || F == 0) { /* nothing flows: zero gradients */
        int64_t e;
        if (p->dx) memset(p->dx, 0, sizeof(float) * (size_t)(N * d));
        for (e = 0; e < E; e++) { /* d_w_gate / d_w_up: whole experts */
            const int64_t at = e * (p->d_gu_stride ? p->d_gu_stride : F * d);
            if (p->d_w_gate) memset(p->d_w_gate + at, 0, sizeof(float) * (size_t)(F * d));
            if (p->d_w_up) memset(p->d_w_up + at, 0, sizeof(float) * (size_t)(F * d));
        }
        if (p->d_w_down) memset(p->d_w_down, 0, sizeof(float) * (size_t)(E * F * d));
        if (p->d_b_gate) memset(p->d_b_gate, 0, sizeof(float) * (size_t)(E * F));
        if (p->d_b_up) memset(p->d_b_up, 0, sizeof(float) * (size_t)(E * F));
        if (p->d_b_down) memset(p->d_b_down, 0, sizeof(float) * (size_t)(E * d));
        if (p->lora) moe_bwd_lora_zero(p, E, d, F);
        return MOE_STATUS_OK;
    }
    if (p->lora != NULL) {
        const moe_expert_lora_params *l = p->lora;
        if (l->rank < 1 || w->expert_ff != NULL ||
            (l->a_gate != NULL) != (l->b_gate != NULL) ||
            (l->a_up != NULL) != (l->b_up != NULL) ||
            (l->a_down != NULL) != (l->b_down != NULL) ||
            (l->a_gate != NULL && !w->gated)) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "expert LoRA backward: "
                                 "rank >= 1, experts of one size, each target "
                                 "with both A and B (gate only when gated)");
        }
        moe_bwd_lora_zero(p, E, d, F); /* targets without an adapter */
    }
    if (job.tiles) { /* the weights' strides, for moe_bwd_tiles_prep */
        const moe_wstrides given[3] = {p->gate_strides, p->up_strides,
                                       p->down_strides};
        for (mat = 0; mat < 3; mat++) {
            job.src[mat] = moe_wst(given[mat], mat < 2 ? F : d, mat < 2 ? d : F);
        }
    }
    else {
        /* fp32 weights with dense columns are read in place (through their
         * expert and row strides); the others are widened / gathered into a
         * dense fp32 copy for this call */
        const void *src[3] = {w->gated ? p->w_gate : NULL, p->w_up, p->w_down};
        const moe_wstrides given[3] = {p->gate_strides, p->up_strides,
                                       p->down_strides};
        const float **dst[3] = {&job.wg, &job.wu, &job.wd};
        size_t n_copy = 0, at = 0;
        for (mat = 0; mat < 3; mat++) {
            const int64_t rows = mat < 2 ? F : d, cols = mat < 2 ? d : F;
            job.src[mat] = moe_wst(given[mat], rows, cols);
            job.copy[mat] = src[mat] != NULL &&
                            (w->dtype != MOE_DTYPE_F32 || job.src[mat].col != 1);
            n_copy += job.copy[mat] ? (size_t)(E * F * d) : 0;
            job.wes[mat] = job.copy[mat] ? rows * cols : job.src[mat].expert;
            job.wld[mat] = job.copy[mat] ? cols : job.src[mat].row;
            *dst[mat] = job.copy[mat] ? NULL : (const float *)src[mat];
        }
        if (n_copy > 0) {
            wide = moe_alloc(n_copy, sizeof(float));
            if (wide == NULL) {
                goto done;
            }
            for (mat = 0; mat < 3; mat++) {
                if (job.copy[mat]) {
                    *dst[mat] = wide + at;
                    at += (size_t)(E * F * d);
                }
            }
            if ((st = moe_pool_run(E, moe_bwd_widen_task, &job)) != MOE_STATUS_OK) {
                goto done;
            }
            st = MOE_STATUS_ALLOC;
        }
    }
    if (p->token_index != NULL) {
        xs = moe_workspace(MOE_WS_BWD_ROWS, (size_t)(N * d), sizeof(float));
        if (xs == NULL) {
            goto done;
        }
        job.xs = xs;
        if ((st = moe_pool_run((N + 63) / 64, moe_bwd_gather_task, &job)) !=
            MOE_STATUS_OK) {
            goto done;
        }
    }
    else {
        job.xs = p->x;
    }
    hid = moe_workspace(MOE_WS_BWD_HIDDEN, (size_t)((w->gated ? 3 : 2) * N * F),
                        sizeof(float));
    if (hid == NULL) {
        st = MOE_STATUS_ALLOC;
        goto done;
    }
    job.h = hid;
    job.du = hid + N * F;
    job.dg = w->gated ? hid + 2 * N * F : NULL;
    if (job.tiles && (st = moe_bwd_tiles_alloc(&job)) != MOE_STATUS_OK) {
        goto done;
    }

    if (p->lora != NULL && (st = moe_bwd_lora_pre(&job)) != MOE_STATUS_OK) {
        goto done;
    }
    if ((st = moe_bwd_phase(&job, 0, MOE_BWD_ROWS, 0, MOE_BWD_UNITS, 1,
                            moe_bwd_hidden_task)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->dx != NULL &&
        (st = moe_bwd_phase(&job, 0, MOE_BWD_MROWS, d, MOE_BWD_MCOLS, 0,
                            moe_bwd_dx_task)) != MOE_STATUS_OK) {
        goto done;
    }
    if (p->lora != NULL && (st = moe_bwd_lora_post(&job)) != MOE_STATUS_OK) {
        goto done;
    }
    for (mat = 0; mat < 3; mat++) {
        const float *want = mat == 0 ? (w->gated ? p->d_w_gate : NULL)
                          : mat == 1 ? p->d_w_up : p->d_w_down;
        if (want == NULL) {
            continue;
        }
        job.mat = mat;
        if ((st = moe_bwd_phase(&job, mat == 2 ? d : F, MOE_BWD_MROWS,
                                mat == 2 ? F : d, MOE_BWD_MCOLS, 0,
                                moe_bwd_dw_task)) != MOE_STATUS_OK) {
            goto done;
        }
    }
    if (p->d_b_gate || p->d_b_up || p->d_b_down) {
        st = moe_pool_run(E, moe_bwd_bias_task, &job);
        if (st == MOE_STATUS_OK && job.failed) {
            st = moe_set_error(MOE_STATUS_ALLOC, "ffn backward: out of memory "
                               "for a task's scratch");
        }
    }
done:
    free(job.tasks);
    free(wide);
    free(job.po);

    free(job.zg);
    free(job.zu);
    free(job.vd);
    free(job.bgt);
    free(job.but);
    return st;
}

static moe_status
moe_linear_backward_check(const moe_linear_backward_params *p, int64_t *n_rows)
{
    const int32_t G = p->offsets ? p->n_groups : 1;
    int64_t g, r;

    if (p->n_tokens < 0 || p->d_in < 0 || p->d_out < 0 || G < 1 ||
        (p->offsets == NULL && p->token_index != NULL)) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "linear backward: sizes "
                             ">= 0, n_groups >= 1, token_index only with "
                             "offsets");
    }
    *n_rows = p->n_tokens;
    if (p->offsets == NULL) {
        return MOE_STATUS_OK;
    }
    for (g = 0; g < G; g++) {
        if (p->offsets[0] != 0 || p->offsets[g + 1] < p->offsets[g]) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "offsets must start "
                                 "at 0 and not decrease (group %lld)",
                                 (long long)g);
        }
    }
    *n_rows = p->offsets[G];
    if (p->token_index == NULL && *n_rows > p->n_tokens) {
        return moe_set_error(MOE_STATUS_INVALID_ARG, "offsets name %lld rows "
                             "but x has %lld", (long long)*n_rows,
                             (long long)p->n_tokens);
    }
    for (r = 0; p->token_index != NULL && r < *n_rows; r++) {
        if (p->token_index[r] < 0 || p->token_index[r] >= p->n_tokens) {
            return moe_set_error(MOE_STATUS_INVALID_ARG, "token_index[%lld] "
                                 "= %lld is not in [0, %lld)", (long long)r,
                                 (long long)p->token_index[r],
                                 (long long)p->n_tokens);
        }
    }
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_linear_backward(const moe_linear_backward_params *p)
{
    const int64_t din = p->d_in, dout = p->d_out;
    const int64_t whole[2] = {0, p->n_tokens};
    const int64_t *off = p->offsets ? p->offsets : whole;
    const int32_t G = p->offsets ? p->n_groups : 1;
    const float *w = p->w;
    float *wide = NULL;
    int64_t n_rows = 0, g;
    moe_mm_seg seg;
    moe_status st = MOE_STATUS_OK;

    MOE_TRY(moe_linear_backward_check(p, &n_rows));
    if (p->dtype != MOE_DTYPE_F32 && p->dx != NULL) {
        if ((wide = moe_alloc((size_t)(G * dout * din) + 1, sizeof(float))) == NULL) {
            return MOE_STATUS_ALLOC;
        }
        moe_bwd_widen(p->w, p->dtype, 1, G * dout * din, wide);
        w = wide;
    }
    for (g = 0; g < G && st == MOE_STATUS_OK; g++) {
        const int64_t r0 = off[g], m = off[g + 1] - off[g];
        if (p->dx != NULL && m > 0) { /* dx (m, d_in) = dy (m, d_out) @ W_g */
            seg = moe_mm_term(p->dy + r0 * dout, dout, 1, w + g * dout * din,
                              din, dout);
            st = moe_mm(&seg, 1, m, din, p->dx + r0 * din, din);
        }
        if (st == MOE_STATUS_OK && p->d_w != NULL) { /* dW_g = dy^T @ x */
            /* a group's x rows picked by token_index as they are packed */
            seg = moe_mm_term(p->dy + r0 * dout, 1, dout,
                              p->x + (p->token_index ? 0 : r0 * din), din, m);
            seg.b_rows = p->token_index ? p->token_index + r0 : NULL;
            st = moe_mm(&seg, 1, dout, din, p->d_w + g * dout * din, din);
        }
    }
    free(wide);
    return st;
}
