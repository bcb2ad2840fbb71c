/*
 * cpu/matmul.c - the backward's fp32 GEMM on the packed micro-kernels:
 *   C (m, n) = sum over segments s of A_s (m, K_s) @ B_s (K_s, n)
 * with A_s read through strides (packed into MR-row panels here, so a
 * transposed operand costs nothing extra) and B_s fp32 row-major, copied
 * block by block into a contiguous (k block, NR) panel (zero-padded past
 * n) that every row panel reuses from L1.  k is blocked; each element
 * stays one FMA chain over the segments' k in order (load_c continues it),
 * so the result does not depend on the blocking, the tasks or the thread
 * count.  No BLAS.
 *
 * moe_mm on the pool: with several row and column blocks, A and B are
 * packed once into a shared buffer, panel by panel, before the blocks are
 * computed from it (each block packing its own operands packed A again for
 * every column block and B for every row block: a 512 x 1024 x 1024
 * linear backward went from about 210 to 250 GFLOP/s on an AMX Xeon).
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <string.h>

#define MOE_MM_KB   512 /* k per block (measured: 128..4096, best near 512) */
#define MOE_MM_PACK_MIN 6 /* row panels from which B is packed            */
#define MOE_MM_ROWS 96  /* rows per task of moe_mm (a multiple of MR)     */
#define MOE_MM_COLS 256 /* columns per task of moe_mm                     */
#define MOE_MM_TILE_KB 128 /* bf16 on tiles: pairs of k per block (16 KiB
                              of B, reused from L1 by every row panel)   */

/* a (K, MR) k-major from rows [i0, i0 + m) of A (picked through a_rows
 * where set), zero rows past m. */
static void
moe_mm_pack_a(const moe_mm_seg *s, int64_t i0, int m, int mr, int64_t k0,
              int64_t kb, int bf16, float *a)
{
    const float *row[MOE_MAX_MR];
    int64_t k;
    int i;

    for (i = 0; i < m; i++) {
        row[i] = s->a + (s->a_rows ? s->a_rows[i0 + i] : i0 + i) * s->a_rs +
                 k0 * s->a_cs;
    }
    if (s->a_cs == 1) {
        for (i = 0; i < mr; i++) {
            if (i >= m) {
                for (k = 0; k < kb; k++) {
                    a[k * mr + i] = 0.0f;
                }
                continue;
            }
            for (k = 0; k < kb; k++) {
                a[k * mr + i] = bf16 ? moe_bf16_value(row[i][k]) : row[i][k];
            }
        }
        return;
    }
    if (!bf16 && s->a_rs == 1 && m == mr && s->a_rows == NULL) {
        /* rows side by side: a copy */
        for (k = 0; k < kb; k++) {
            memcpy(a + k * mr, row[0] + k * s->a_cs, sizeof(float) * (size_t)mr);
        }
        return;
    }
    for (k = 0; k < kb; k++) {
        for (i = 0; i < mr; i++) {
            const float v = i < m ? row[i][k * s->a_cs] : 0.0f;
            a[k * mr + i] = bf16 ? moe_bf16_value(v) : v;
        }
    }
}

/* B's rows [k0, k0 + kb) and columns [j0, j0 + n) -> column panels
 * (n_pad / nr, kb, nr), zero past n; each row of B is read once,
 * contiguously (through g->b_rows where the rows are picked). */
static void
moe_mm_pack_b(const moe_mm_seg *g, int64_t k0, int64_t j0, int64_t kb,
              int64_t n, int nr, int bf16, float *out)
{
    const int64_t n_full = n / nr * nr;
    int64_t k, j, q;

    for (k = 0; k < kb; k++) {
        const float *src = g->b + j0 +
                           (g->b_rows ? g->b_rows[k0 + k] : k0 + k) * g->ldb;
        for (j = 0; j < n_full; j += nr) {
            float *dst = out + j * kb + k * nr;
            if (!bf16) {
                memcpy(dst, src + j, sizeof(float) * (size_t)nr);
                continue;
            }
            for (q = 0; q < nr; q++) {
                dst[q] = moe_bf16_value(src[j + q]);
            }
        }
        if (n_full < n) {
            float *dst = out + n_full * kb + k * nr;
            for (q = 0; q < nr; q++) {
                const float v = n_full + q < n ? src[n_full + q] : 0.0f;
                dst[q] = bf16 ? moe_bf16_value(v) : v;
            }
        }
    }
}

/* Whether some segment picks its B rows (b_rows). */
static int
moe_mm_picks(const moe_mm_seg *segs, int n_segs)
{
    int s;

    for (s = 0; s < n_segs; s++) {
        if (segs[s].b_rows != NULL) {
            return 1;
        }
    }
    return 0;
}

static moe_status
moe_mm_run(const moe_mm_seg *segs, int n_segs, int64_t m, int64_t n,
           float *c, int64_t ldc, int bf16)
{
    const moe_kernels *kr = moe_cpu_kernels();
    const int mr = kr->mr, nr = kr->nr;
    const int64_t n_pan = (m + mr - 1) / mr, n_pad = (n + nr - 1) / nr * nr;
    const int64_t a_size = n_pan * MOE_MM_KB * mr;
    const int64_t b_size = n_pad * MOE_MM_KB;
    /* Copying B into panels pays off when enough row panels reuse it; with
     * few (a small expert's rows against its weights) the kernel reads B in
     * place, row by row (picked rows are always packed). */
    const int pack_b = bf16 || n_pan >= MOE_MM_PACK_MIN ||
                       moe_mm_picks(segs, n_segs);
    float *buf, *ap, *bp, *edge;
    int64_t i, j, p, k0;
    int first = 1, s;

    if (m <= 0 || n <= 0) {
        return MOE_STATUS_OK;
    }
    /* A panels, B panels, and the partial column panel's C (m, nr) */
    buf = moe_workspace(MOE_WS_MM, (size_t)(a_size + b_size + n_pan * mr * nr),
                        sizeof(float));
    if (buf == NULL) {
        return MOE_STATUS_ALLOC;
    }
    ap = buf;
    bp = ap + a_size;
    edge = bp + b_size;
    for (s = 0; s < n_segs; s++) {
        const moe_mm_seg *g = &segs[s];
        for (k0 = 0; k0 < g->K; k0 += MOE_MM_KB) {
            const int64_t kb = g->K - k0 < MOE_MM_KB ? g->K - k0 : MOE_MM_KB;
            for (p = 0; p < n_pan; p++) {
                const int rows = m - p * mr < mr ? (int)(m - p * mr) : mr;
                moe_mm_pack_a(g, p * mr, rows, mr, k0, kb, bf16,
                              ap + p * kb * mr);
            }
            if (pack_b) {
                moe_mm_pack_b(g, k0, 0, kb, n, nr, bf16, bp);
            }
            else if (n % nr != 0) { /* only the partial panel, zero-padded */
                moe_mm_pack_b(g, k0, n / nr * nr, kb, n % nr, nr, 0,
                              bp + n / nr * nr * kb);
            }
            for (j = 0; j < n; j += nr) {
                /* full panels accumulate in c itself, the last partial one
                 * in edge (copied out at the end) */
                const int full = j + nr <= n;
                const float *b = full && !pack_b ? g->b + k0 * g->ldb + j
                                                 : bp + j * kb;
                const int64_t ldb = full && !pack_b ? g->ldb : nr;
                for (p = 0; p < n_pan; p++) {
                    const int rows = m - p * mr < mr ? (int)(m - p * mr) : mr;
                    kr->ukr_acc(ap + p * kb * mr, b, ldb, kb, rows,
                                full ? c + p * mr * ldc + j
                                     : edge + p * mr * nr,
                                full ? ldc : nr, !first);
                }
            }
            first = 0;
        }
    }
    if (first) { /* no k at all: the empty sum */
        for (i = 0; i < m; i++) {
            memset(c + i * ldc, 0, sizeof(float) * (size_t)n);
        }
    }
    else if (n % nr != 0) {
        j = n - n % nr;
        for (i = 0; i < m; i++) {
            memcpy(c + i * ldc + j, edge + i * nr,
                   sizeof(float) * (size_t)(n - j));
        }
    }
    return MOE_STATUS_OK;
}

moe_status
moe_mm_block(const moe_mm_seg *segs, int n_segs, int64_t m, int64_t n,
             float *c, int64_t ldc)
{
    return moe_mm_run(segs, n_segs, m, n, c, ldc, 0);
}

moe_status
moe_mm_block_bf16(const moe_mm_seg *segs, int n_segs, int64_t m, int64_t n,
                  float *c, int64_t ldc)
{
    return moe_mm_run(segs, n_segs, m, n, c, ldc, 1);
}

moe_status
moe_tmm_block(const moe_tmm_seg *segs, int n_segs, int64_t m, int64_t n,
              float *c, int64_t ldc)
{
#if defined(MOE_HAVE_X86_KERNELS)
    const moe_kernels *kr = moe_cpu_kernels();
    const int64_t n_pan = (m + 31) / 32, n_cp = (n + 31) / 32;
    const int64_t np = n_cp * 32;
    const int part_rows = (int)(m % 32), part = part_rows != 0 || n % 32 != 0;
    /* whole 32 x 32 blocks accumulate in c; the others in edge (n_pan * 32,
     * np), copied out at the end */
    const size_t edge_n = part ? (size_t)(n_pan * 32 * np) : 0;
    float *edge;
    int64_t i, j, p, k0;
    int first = 1, s;

    if (m <= 0 || n <= 0) {
        return MOE_STATUS_OK;
    }
    if (kr->tile_begin == NULL) {
        return moe_set_error(MOE_STATUS_INTERNAL, "moe_tmm_block: the %s "
                             "kernels have no tiles", kr->name);
    }
    edge = moe_workspace(MOE_WS_MM, edge_n, sizeof(float));
    if (edge == NULL) {
        return MOE_STATUS_ALLOC;
    }
    kr->tile_begin();
    for (s = 0; s < n_segs; s++) {
        const moe_tmm_seg *g = &segs[s];
        for (k0 = 0; k0 < g->Kp; k0 += MOE_MM_TILE_KB) {
            const int64_t len = g->Kp - k0 < MOE_MM_TILE_KB ? g->Kp - k0
                                                            : MOE_MM_TILE_KB;
            for (j = 0; j < n_cp; j++) {
                for (p = 0; p < n_pan; p++) {
                    const int rows = p < n_pan - 1 || !part_rows ? 32 : part_rows;
                    const int whole = rows == 32 && (j + 1) * 32 <= n;
                    float *cp = whole ? c + p * 32 * ldc + j * 32
                                      : edge + p * 32 * np + j * 32;
                    moe_gemm_amx(g->a + p * g->a_panel + k0 * 32,
                                 g->b + j * g->b_panel + k0 * 32, len, rows,
                                 first ? NULL : cp, cp, whole ? ldc : np);
                }
            }
            first = 0;
        }
    }
    kr->tile_end();
    if (first) { /* no k at all: the empty sum */
        for (i = 0; i < m; i++) {
            memset(c + i * ldc, 0, sizeof(float) * (size_t)n);
        }
        return MOE_STATUS_OK;
    }
    for (p = 0; part && p < n_pan; p++) { /* the blocks kept in edge */
        const int64_t rows = m - p * 32 < 32 ? m - p * 32 : 32;
        for (j = 0; j < n_cp; j++) {
            const int64_t cols = n - j * 32 < 32 ? n - j * 32 : 32;
            if (rows == 32 && cols == 32) {
                continue;
            }
            for (i = 0; i < rows; i++) {
                memcpy(c + (p * 32 + i) * ldc + j * 32,
                       edge + (p * 32 + i) * np + j * 32,
                       sizeof(float) * (size_t)cols);
            }
        }
    }
    return MOE_STATUS_OK;
#else
    return moe_set_error(MOE_STATUS_INTERNAL, "moe_tmm_block: no tiles here");
#endif
}

typedef struct moe_mm_job {
    const moe_mm_seg *segs;
    int               n_segs;
    int64_t           m, n, ldc, col_tasks;
    float            *c;
    moe_status        st;
    /* shared packing (moe_mm_shared): per segment s, A as (n_pan, K_s, MR)
     * at pa[s] and B as (n_cpan, K_s, NR) at pb[s] */
    const moe_kernels *kr;
    int64_t           n_pan, n_cpan;
    float            *pa[MOE_MM_MAX_SEGS], *pb[MOE_MM_MAX_SEGS];
} moe_mm_job;

/* Block `task` (row block, column block) of the product job->segs: each
 * block packs its own operands (moe_mm_block). */
static moe_status
moe_mm_block_task(const moe_mm_seg *job_segs, int n_segs, int64_t m_all,
                  int64_t n_all, float *c, int64_t ldc, int64_t task)
{
    const int64_t col_tasks = (n_all + MOE_MM_COLS - 1) / MOE_MM_COLS;
    const int64_t i0 = task / col_tasks * MOE_MM_ROWS;
    const int64_t j0 = task % col_tasks * MOE_MM_COLS;
    const int64_t m = m_all - i0 < MOE_MM_ROWS ? m_all - i0 : MOE_MM_ROWS;
    const int64_t n = n_all - j0 < MOE_MM_COLS ? n_all - j0 : MOE_MM_COLS;
    moe_mm_seg segs[MOE_MM_MAX_SEGS];
    int s;

    for (s = 0; s < n_segs; s++) {
        segs[s] = job_segs[s];
        if (segs[s].a_rows != NULL) {
            segs[s].a_rows += i0;
        }
        else {
            segs[s].a += i0 * segs[s].a_rs;
        }
        segs[s].b += j0;
    }
    return moe_mm_block(segs, n_segs, m, n, c + i0 * ldc + j0, ldc);
}

static int64_t
moe_mm_tasks(int64_t m, int64_t n)
{
    return m <= 0 || n <= 0 ? 0 : (m + MOE_MM_ROWS - 1) / MOE_MM_ROWS *
                                  ((n + MOE_MM_COLS - 1) / MOE_MM_COLS);
}

static void
moe_mm_task(void *ctx, int64_t task)
{
    moe_mm_job *job = ctx;

    if (moe_mm_block_task(job->segs, job->n_segs, job->m, job->n, job->c,
                          job->ldc, task) != MOE_STATUS_OK) {
        __atomic_store_n(&job->st, MOE_STATUS_ALLOC, __ATOMIC_RELAXED);
    }
}

/* Shared packing, phase 1: task t packs one row panel of A or one column
 * panel of B of one segment, over all of its K. */
static void
moe_mm_pack_task(void *ctx, int64_t t)
{
    moe_mm_job *job = ctx;
    const int mr = job->kr->mr, nr = job->kr->nr;
    const int64_t per = job->n_pan + job->n_cpan;
    const int s = (int)(t / per);
    const int64_t q = t % per;
    const moe_mm_seg *g = &job->segs[s];

    if (q < job->n_pan) {
        const int64_t i0 = q * mr;
        const int rows = job->m - i0 < mr ? (int)(job->m - i0) : mr;
        moe_mm_pack_a(g, i0, rows, mr, 0, g->K, 0, job->pa[s] + q * g->K * mr);
    }
    else {
        const int64_t j0 = (q - job->n_pan) * nr;
        const int64_t cols = job->n - j0 < nr ? job->n - j0 : nr;
        moe_mm_pack_b(g, 0, j0, g->K, cols, nr, 0,
                      job->pb[s] + (q - job->n_pan) * g->K * nr);
    }
}

/* Phase 2: task -> a block of MOE_MM_ROWS x MOE_MM_COLS of C from the
 * packed panels, k in blocks of MOE_MM_KB (a B block reused from L1 by the
 * block's row panels); the FMA chains of moe_mm_block, so its bits. */
static void
moe_mm_shared_task(void *ctx, int64_t task)
{
    moe_mm_job *job = ctx;
    const moe_kernels *kr = job->kr;
    const int mr = kr->mr, nr = kr->nr;
    const int64_t p0 = task / job->col_tasks * (MOE_MM_ROWS / mr);
    const int64_t q0 = task % job->col_tasks * (MOE_MM_COLS / nr);
    const int64_t p1 = p0 + MOE_MM_ROWS / mr < job->n_pan
                           ? p0 + MOE_MM_ROWS / mr : job->n_pan;
    const int64_t q1 = q0 + MOE_MM_COLS / nr < job->n_cpan
                           ? q0 + MOE_MM_COLS / nr : job->n_cpan;
    /* the partial column panel's tiles (rows of nr floats) */
    float edge[MOE_MM_ROWS * MOE_MAX_NR];
    int64_t k0, p, q, i;
    int s, first = 1;

    for (s = 0; s < job->n_segs; s++) {
        const moe_mm_seg *g = &job->segs[s];
        for (k0 = 0; k0 < g->K; k0 += MOE_MM_KB) {
            const int64_t kb = g->K - k0 < MOE_MM_KB ? g->K - k0 : MOE_MM_KB;
            for (q = q0; q < q1; q++) {
                const int full = (q + 1) * nr <= job->n;
                const float *b = job->pb[s] + q * g->K * nr + k0 * nr;
                for (p = p0; p < p1; p++) {
                    const int rows = job->m - p * mr < mr
                                         ? (int)(job->m - p * mr) : mr;
                    float *cp = full ? job->c + p * mr * job->ldc + q * nr
                                     : edge + (p - p0) * mr * nr;
                    kr->ukr_acc(job->pa[s] + p * g->K * mr + k0 * mr, b, nr,
                                kb, rows, cp, full ? job->ldc : nr, !first);
                }
            }
            first = 0;
        }
    }
    for (q = q0; q < q1; q++) {
        const int64_t j0 = q * nr, cols = job->n - j0;
        if (cols >= nr) {
            continue;
        }
        for (p = p0; p < p1; p++) {
            const int64_t rows = job->m - p * mr < mr ? job->m - p * mr : mr;
            for (i = 0; i < rows; i++) {
                memcpy(job->c + (p * mr + i) * job->ldc + j0,
                       edge + ((p - p0) * mr + i) * nr,
                       sizeof(float) * (size_t)cols);
            }
        }
    }
}

/*
 * Several tasks: A and B packed once into a shared buffer (each panel by
 * one task), then blocks of C from it, instead of every task packing its
 * own rows and columns (A again per column block, B per row block).
 */
static moe_status
moe_mm_shared(moe_mm_job *job)
{
    const int mr = job->kr->mr, nr = job->kr->nr;
    int64_t total = 0;
    moe_status st;
    float *buf;
    int s;

    job->n_pan = (job->m + mr - 1) / mr;
    job->n_cpan = (job->n + nr - 1) / nr;
    for (s = 0; s < job->n_segs; s++) {
        total += (job->n_pan * mr + job->n_cpan * nr) * job->segs[s].K;
    }
    buf = moe_workspace(MOE_WS_MM_SHARED, (size_t)total, sizeof(float));
    if (buf == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (s = 0; s < job->n_segs; s++) {
        job->pa[s] = buf;
        buf += job->n_pan * mr * job->segs[s].K;
        job->pb[s] = buf;
        buf += job->n_cpan * nr * job->segs[s].K;
    }
    st = moe_pool_run(job->n_segs * (job->n_pan + job->n_cpan),
                      moe_mm_pack_task, job);
    if (st != MOE_STATUS_OK) {
        return st;
    }
    job->col_tasks = (job->n + MOE_MM_COLS - 1) / MOE_MM_COLS;
    return moe_pool_run((job->m + MOE_MM_ROWS - 1) / MOE_MM_ROWS *
                            job->col_tasks, moe_mm_shared_task, job);
}

moe_status
moe_mm(const moe_mm_seg *segs, int n_segs, int64_t m, int64_t n, float *c,
       int64_t ldc)
{
    moe_mm_job job;
    moe_status st;
    int s;

    if (n_segs < 0 || n_segs > MOE_MM_MAX_SEGS) {
        return moe_set_error(MOE_STATUS_INTERNAL, "moe_mm: %d segments",
                             n_segs);
    }
    if (m <= 0 || n <= 0) {
        return MOE_STATUS_OK;
    }
    job.segs = segs;
    job.n_segs = n_segs;
    job.m = m;
    job.n = n;
    job.ldc = ldc;
    job.c = c;
    job.col_tasks = (n + MOE_MM_COLS - 1) / MOE_MM_COLS;
    job.st = MOE_STATUS_OK;
    job.kr = moe_cpu_kernels();
    /* several row and column blocks and some k: shared packing (else each
     * block packs its own A and B, measured no slower there, and an empty
     * sum is written as zeros by moe_mm_block) */
    for (s = 0; s < n_segs && segs[s].K == 0; s++) {
    }
    if (m > MOE_MM_ROWS && job.col_tasks > 1 && s < n_segs) {
        return moe_mm_shared(&job);
    }
    st = moe_pool_run(moe_mm_tasks(m, n), moe_mm_task, &job);
    if (st == MOE_STATUS_OK && job.st != MOE_STATUS_OK) {
        return moe_set_error(job.st, "moe_mm: out of memory for a task");
    }
    return st;
}

typedef struct moe_mm_many_job {
    const moe_mm_prob *probs;
    const int64_t     *first; /* (n_probs + 1,) first task of each product */
    int                n_probs;
    moe_status         st;
} moe_mm_many_job;

static void
moe_mm_many_task(void *ctx, int64_t task)
{
    moe_mm_many_job *job = ctx;
    int lo = 0, hi = job->n_probs - 1;
    const moe_mm_prob *q;

    while (lo < hi) { /* the last product whose first task is <= task */
        const int mid = (lo + hi + 1) / 2;
        if (job->first[mid] <= task) {
            lo = mid;
        }
        else {
            hi = mid - 1;
        }
    }
    q = &job->probs[lo];
    if (moe_mm_block_task(q->segs, q->n_segs, q->m, q->n, q->c, q->ldc,
                          task - job->first[lo]) != MOE_STATUS_OK) {
        __atomic_store_n(&job->st, MOE_STATUS_ALLOC, __ATOMIC_RELAXED);
    }
}

moe_status
moe_mm_many(const moe_mm_prob *probs, int n_probs)
{
    moe_mm_many_job job;
    int64_t *first;
    moe_status st;
    int i;

    if (n_probs == 1) {
        return moe_mm(probs[0].segs, probs[0].n_segs, probs[0].m, probs[0].n,
                      probs[0].c, probs[0].ldc);
    }
    for (i = 0; i < n_probs; i++) {
        if (probs[i].n_segs < 0 || probs[i].n_segs > MOE_MM_MAX_SEGS) {
            return moe_set_error(MOE_STATUS_INTERNAL, "moe_mm_many: %d "
                                 "segments", probs[i].n_segs);
        }
    }
    if ((first = moe_alloc((size_t)n_probs + 1, sizeof(int64_t))) == NULL) {
        return MOE_STATUS_ALLOC;
    }
    first[0] = 0;
    for (i = 0; i < n_probs; i++) {
        first[i + 1] = first[i] + moe_mm_tasks(probs[i].m, probs[i].n);
    }
    job.probs = probs;
    job.first = first;
    job.n_probs = n_probs;
    job.st = MOE_STATUS_OK;
    st = moe_pool_run(first[n_probs], moe_mm_many_task, &job);
    free(first);
    if (st == MOE_STATUS_OK && job.st != MOE_STATUS_OK) {
        return moe_set_error(job.st, "moe_mm_many: out of memory for a task");
    }
    return st;
}

/* (rows, cols) row-major -> (cols, rows), n_mats of them, in 16 x 16 blocks
 * (a row of a block is one cache line, read or written whole). */
void
moe_transpose(const float *src, int64_t n_mats, int64_t rows, int64_t cols,
              float *dst)
{
    int64_t m, i0, j0, i, j;

    for (m = 0; m < n_mats; m++) {
        const float *a = src + m * rows * cols;
        float *b = dst + m * rows * cols;
        for (i0 = 0; i0 < rows; i0 += 16) {
            const int64_t i1 = i0 + 16 < rows ? i0 + 16 : rows;
            for (j0 = 0; j0 < cols; j0 += 16) {
                const int64_t j1 = j0 + 16 < cols ? j0 + 16 : cols;
                for (j = j0; j < j1; j++) {
                    for (i = i0; i < i1; i++) {
                        b[j * rows + i] = a[i * cols + j];
                    }
                }
            }
        }
    }
}
