/*
 * cpu/gemm_amx.c - the bf16-compute kernel on AMX tiles (AMX-BF16), for the
 * "amx" kernel set: the avx512bf16 set with this dot (cpu/ffn.c composes it).
 *
 * c (m <= 32, 32) = a @ b over Kp pairs of k, fp32 accumulation in tiles
 * (moe_dot_amx_acc; moe_gemm_amx, the backward's, continues from c itself):
 *   a: MOE_DOT_TILES, blocks of 16 pairs of the 32 rows (a tile's rows),
 *   b: the packed (Kp, 32, 2) bf16 weight panel: a tile's 16 pair rows of
 *      16 columns are 64 of every 128 bytes (stride 128), as TDPBF16PS
 *      reads its second operand, so the forward's packing serves as is.
 * Tiles 0-3 hold the (2 x 16 rows, 2 x 16 columns) accumulators, 4-5 the
 * activation rows, 6-7 the weight columns; one step takes 16 pairs (32 k).
 * A part step at the end (Kp % 16) runs on AVX-512 FMAs, k then k + 1.
 * Each element is one chain over k in order, the same for any tiling,
 * batch or thread count; TDPBF16PS adds a pair of products per step with
 * its own internal rounding (and flushes denormals), so bits may differ
 * from the avx512bf16 set's VDPBF16PS and from the FMA emulation.
 *
 * The int8-compute kernels (moe_q8_amx_*, AMX-INT8) are at the end.
 */
#include "moe.h"
#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The 64-byte tile configuration LDTILECFG reads (palette 1). */
typedef struct moe_tilecfg {
    uint8_t  palette;
    uint8_t  start_row;
    uint8_t  reserved[14];
    uint16_t colsb[16];
    uint8_t  rows[16];
} moe_tilecfg;

/* Eight 16 x 64-byte tiles.  A constant: GCC 12 drops the stores into a
 * local configuration (it does not see LDTILECFG read them).  Loaded once
 * per task (44 ns here: too dear per call), since another library may have
 * configured or released this thread's tiles in between. */
static const moe_tilecfg moe_amx_cfg __attribute__((aligned(64))) = {
    1, 0, {0},
    {64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0},
    {16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0},
};

void
moe_amx_begin(void)
{
    _tile_loadconfig(&moe_amx_cfg);
}

/* Back to the init state: a context switch need not save 8 KiB of tiles. */
void
moe_amx_end(void)
{
    _tile_release();
}

#define MOE_ARCH_GET_XCOMP_PERM 0x1022
#define MOE_ARCH_REQ_XCOMP_PERM 0x1023
#define MOE_XFEATURE_XTILEDATA  18

/* Linux grants the tile state per process, on request (5.16 and later);
 * without the grant the first tile instruction kills the process. */
int
moe_amx_request(void)
{
    unsigned long mask = 0;

    if (syscall(SYS_arch_prctl, MOE_ARCH_REQ_XCOMP_PERM,
                MOE_XFEATURE_XTILEDATA) != 0) {
        return 0;
    }
    if (syscall(SYS_arch_prctl, MOE_ARCH_GET_XCOMP_PERM, &mask) != 0) {
        return 0;
    }
    return (mask >> MOE_XFEATURE_XTILEDATA) & 1;
}

/* Pairs of bf16 as two fp32 vectors: the even k (low halves), the odd. */
static inline __m512
moe_amx_lo(__m512i u)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

static inline __m512
moe_amx_hi(__m512i u)
{
    return _mm512_castsi512_ps(
        _mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

/* c rows i < m += pairs [k0, Kp) of a @ b, two FMAs per pair (k, k + 1):
 * pair k of row i at a[i * lda + k], b's pair row k at b + k * ldb. */
static void
moe_amx_tail(const uint32_t *a, int64_t lda, const uint32_t *b, int64_t ldb,
             int64_t k0, int64_t Kp, int m, float *c, int64_t ldc)
{
    int i;

    for (i = 0; i < m; i++) {
        __m512 c0 = _mm512_loadu_ps(c + i * ldc);
        __m512 c1 = _mm512_loadu_ps(c + i * ldc + 16);
        int64_t k;
        for (k = k0; k < Kp; k++) {
            const __m512i av = _mm512_set1_epi32((int)a[i * lda + k]);
            const __m512i b0 = _mm512_loadu_si512(b + k * ldb);
            const __m512i b1 = _mm512_loadu_si512(b + k * ldb + 16);
            const __m512 alo = moe_amx_lo(av), ahi = moe_amx_hi(av);
            c0 = _mm512_fmadd_ps(alo, moe_amx_lo(b0), c0);
            c1 = _mm512_fmadd_ps(alo, moe_amx_lo(b1), c1);
            c0 = _mm512_fmadd_ps(ahi, moe_amx_hi(b0), c0);
            c1 = _mm512_fmadd_ps(ahi, moe_amx_hi(b1), c1);
        }
        _mm512_storeu_ps(c + i * ldc, c0);
        _mm512_storeu_ps(c + i * ldc + 16, c1);
    }
}

/* One 16-pair step's prefetches (moe_prefetch pacing, one count per pair). */
#define MOE_AMX_PREFETCH()                                                   \
    do {                                                                     \
        if (pf_at != NULL) {                                                 \
            int s_;                                                          \
            for (s_ = 0; s_ < 16; s_++) {                                    \
                if (--pf_count == 0) {                                       \
                    pf_count = pf.every;                                     \
                    __builtin_prefetch(pf_at, 0, 2);                         \
                    pf_at += 64;                                             \
                }                                                            \
            }                                                                \
        }                                                                    \
    } while (0)

/*
 * The whole 16-pair steps of a @ b added into tiles 0-1 (rows 0-15) and,
 * when two, 2-3 (rows 16-31).  Step s reads rows 0-15 of a at a + s *
 * a_step (rows a_stride bytes apart), rows 16-31 a_half further, and b's
 * 16 pair rows of 32 columns at b + s * b_step (b_stride bytes apart) as
 * two tiles of 16 columns.  The forward's panels: a 2 KiB block of 32 rows
 * of 16 pairs (stride 64), b the packed weight panel (stride 128), both
 * streams sequential; the backward's: row-major operands read in place.
 */
static inline __attribute__((always_inline)) void
moe_amx_steps(const uint32_t *a, int64_t a_step, int a_stride, int64_t a_half,
              const uint32_t *b, int64_t b_step, int b_stride, int64_t Kt,
              int two, moe_prefetch pf)
{
    const char *pf_at = pf.at;
    int pf_count = pf.every;
    int64_t k, s;

    if (two) {
        for (k = 0, s = 0; k < Kt; k += 16, s++) {
            const uint32_t *ak = a + s * a_step, *bk = b + s * b_step;
            _tile_loadd(4, ak, a_stride);
            _tile_loadd(6, bk, b_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, bk + 16, b_stride);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, ak + a_half, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            MOE_AMX_PREFETCH();
        }
    }
    else {
        for (k = 0, s = 0; k < Kt; k += 16, s++) {
            const uint32_t *bk = b + s * b_step;
            _tile_loadd(4, a + s * a_step, a_stride);
            _tile_loadd(6, bk, b_stride);
            _tile_loadd(7, bk + 16, b_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            MOE_AMX_PREFETCH();
        }
    }
}

/* Tiles 0-3 from c_in (rows of ld_in floats), or zero. */
static inline __attribute__((always_inline)) void
moe_amx_load_c(const float *c_in, int64_t ld_in, int two)
{
    const int sc = (int)(ld_in * 4);

    if (c_in != NULL) {
        _tile_loadd(0, c_in, sc);
        _tile_loadd(1, c_in + 16, sc);
        if (two) {
            _tile_loadd(2, c_in + 16 * ld_in, sc);
            _tile_loadd(3, c_in + 16 * ld_in + 16, sc);
        }
    }
    else {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
    }
}

/* Tiles 0-1 (and 2-3) to c, rows of ldc floats. */
static inline __attribute__((always_inline)) void
moe_amx_store_c(float *c, int64_t ldc, int two)
{
    const int64_t sc = ldc * 4;

    _tile_stored(0, c, sc);
    _tile_stored(1, c + 16, sc);
    if (two) {
        _tile_stored(2, c + 16 * ldc, sc);
        _tile_stored(3, c + 16 * ldc + 16, sc);
    }
}

/* moe_dot_amx_acc with c_in's rows ld_in floats apart. */
static inline __attribute__((always_inline)) void
moe_amx_acc(const uint32_t *a, const uint32_t *b, int64_t Kp, int m,
            const float *c_in, int64_t ld_in, float *c, int64_t ldc,
            moe_prefetch pf)
{
    const int64_t Kt = Kp & ~(int64_t)15;
    const int two = m > 16;

    moe_amx_load_c(c_in, ld_in, two);
    moe_amx_steps(a, 16 * MOE_AMX_MR, 64, 16 * 16, b, 16 * 32, 128, Kt, two,
                  pf);
    moe_amx_store_c(c, ldc, two);
    if (Kt < Kp) {
        /* the part block: rows of 16 pairs (k from its start Kt) */
        moe_amx_tail(a + Kt * MOE_AMX_MR - Kt, 16, b, 32, Kt, Kp, m, c, ldc);
    }
}

void
moe_dot_amx_acc(const void *a_panel, const void *b_panel, int64_t Kp, int m,
                const float *c_in, float *c, int64_t ldc, moe_prefetch pf)
{
    moe_amx_acc(a_panel, b_panel, Kp, m, c_in, 32, c, ldc, pf);
}

void
moe_gemm_amx(const uint32_t *a, const uint32_t *b, int64_t Kp, int m,
             const float *c_in, float *c, int64_t ldc)
{
    const moe_prefetch none = {NULL, 0};

    moe_amx_acc(a, b, Kp, m, c_in, ldc, c, ldc, none);
}

void
moe_dot_amx(const void *a_panel, const void *b_panel, int64_t Kp, int m,
            float *c, int64_t ldc, moe_prefetch pf)
{
    float buf[32 * 32] __attribute__((aligned(64)));
    int i;

    moe_dot_amx_acc(a_panel, b_panel, Kp, m, NULL, buf, 32, pf);
    for (i = 0; i < m; i++) {
        memcpy(c + i * ldc, buf + i * 32, 32 * sizeof(float));
    }
}

/*
 * int8 compute on AMX-INT8 tiles (cpu/kernels.h: moe_q8_*): c (m <= 32,
 * 32) = a @ b, a an activation panel of MOE_AMX_MR rows in the row layout
 * (moe_q8_pack: each sub-block's codes row-major, row i's n4 = 4 ceil(n / 4)
 * codes at i * n4), b an int8-compute weight panel as every set packs it.
 * A quad row of b (4 k of 32 columns, 4 bytes a column) is what TDPBSUD
 * reads as its second operand: 16 quads of 16 columns make a tile, so int8
 * panels are read in place (stride 128); a sub-block's last part step
 * (fewer than 16 quads) and every 4-bit quad go through a 2 x 1 KiB copy
 * (4-bit codes widened to signed bytes, int4 n - 8 and mxfp4 2 v, summed
 * by TDPBSSD with no offset to correct), zero past its quads, so the
 * activations' bytes read past a row (the next row's, or the panel's
 * 64-byte slack) multiply zeros.  Per sub-block each tile sums 64 k at a
 * step, exactly in int32; then c = fma((float)sum, s_w_j * s_a_i, c) (int8:
 * sum - corr_i) as in the other sets: the integer sums are exact and the
 * float steps the same, so the bits equal the avx512bf16 set's VPDPBUSD
 * kernel (cpu/gemm.inc).
 */
static inline __attribute__((always_inline)) void
moe_q8_amx_scales(const uint8_t *p, int wtype, __m512 sw[2])
{
    int j;

    for (j = 0; j < 2; j++) {
        if (wtype == MOE_WTYPE_MXFP4) {
            /* e8m0: 2^(e - 127), 2^-127 for e = 0 (gemm.inc's rule) */
            const __m512i e = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i *)(p + 16 * j)));
            const __mmask16 zero = _mm512_cmpeq_epi32_mask(
                e, _mm512_setzero_si512());
            const __m512i bits = _mm512_slli_epi32(e, 23);
            sw[j] = _mm512_castsi512_ps(_mm512_mask_or_epi32(
                bits, zero, bits, _mm512_set1_epi32(0x00400000)));
        }
        else {
            sw[j] = _mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(p + 32 * j)));
        }
    }
}

/* Quads [0, n) of q (qb bytes each) into bt[0] (columns 0-15) and bt[1]
 * (16-31), 64 bytes a quad, quads n .. 15 zero: int8 codes as they are
 * (code + 128), 4-bit ones as their signed values (int4 n - 8, mxfp4 2 v),
 * so that TDPBSSD sums the products without the offset's correction.
 * *dirty: quads [*dirty, 16) of bt are known zero (a part step zeroes only
 * the quads the last copy wrote past n; a memset each time took 11%). */
static inline __attribute__((always_inline)) void
moe_q8_amx_copy(const uint8_t *q, int n, int wtype, uint8_t bt[2][16 * 64],
                int *dirty)
{
    const __m512i low = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    /* e2m1 nibble -> 2 v (signed), per 16 bytes */
    const __m512i e2m1 = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12));
    int t;

    for (t = 0; t < n; t++) {
        __m512i lo, hi;
        if (wtype == MOE_WTYPE_INT8) {
            lo = _mm512_loadu_si512(q + t * 128);
            hi = _mm512_loadu_si512(q + t * 128 + 64);
        }
        else {
            const __m512i v = _mm512_loadu_si512(q + t * 64);
            lo = _mm512_and_si512(v, low);
            hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            if (wtype == MOE_WTYPE_MXFP4) {
                lo = _mm512_shuffle_epi8(e2m1, lo);
                hi = _mm512_shuffle_epi8(e2m1, hi);
            }
            else {
                lo = _mm512_sub_epi8(lo, eight);
                hi = _mm512_sub_epi8(hi, eight);
            }
        }
        _mm512_store_si512(bt[0] + t * 64, lo);
        _mm512_store_si512(bt[1] + t * 64, hi);
    }
    for (; t < *dirty; t++) {
        _mm512_store_si512(bt[0] + t * 64, _mm512_setzero_si512());
        _mm512_store_si512(bt[1] + t * 64, _mm512_setzero_si512());
    }
    *dirty = n;
}

/* Tile C += A (signed codes) x B: int8 weights' bytes are unsigned (code +
 * 128, TDPBSUD), the 4-bit copies' signed (TDPBSSD).  wtype a constant. */
#define MOE_Q8_AMX_DP(C, A, B)                                               \
    do {                                                                     \
        if (wtype == MOE_WTYPE_INT8) {                                       \
            _tile_dpbsud(C, A, B);                                           \
        }                                                                    \
        else {                                                               \
            _tile_dpbssd(C, A, B);                                           \
        }                                                                    \
    } while (0)

static inline __attribute__((always_inline)) void
moe_q8_amx(const void *a, const void *b, int64_t K, int64_t group, int m,
           float *c, int64_t ldc, moe_prefetch pf, const int wtype)
{
    const int64_t qb = wtype == MOE_WTYPE_INT8 ? 128 : 64;
    const int64_t sb = wtype == MOE_WTYPE_MXFP4 ? 32 : 64;
    const int two = m > 16;
    const char *pf_at = pf.at;
    int pf_count = pf.every;
    float acc[32 * 32] __attribute__((aligned(64)));
    int32_t isum[32 * 32] __attribute__((aligned(64)));
    uint8_t bt[2][16 * 64] __attribute__((aligned(64)));
    const uint8_t *q = b, *ap = a;
    int64_t k0, s0, t;
    int i, j, dirty = 16;

    memset(acc, 0, sizeof(float) * 32 * (size_t)m);
    for (k0 = 0; k0 < K; k0 += group) {
        const int64_t rows = K - k0 < group ? K - k0 : group;
        __m512 sw[2];
        moe_q8_amx_scales(q, wtype, sw);
        q += sb;
        for (s0 = 0; s0 < rows; s0 += MOE_Q8_BLOCK) {
            const int64_t n = rows - s0 < MOE_Q8_BLOCK ? rows - s0
                                                       : MOE_Q8_BLOCK;
            const int64_t nq = (n + 3) / 4;
            const int lda = (int)(nq * 4);
            const float *sa = (const float *)ap;
            const int32_t *corr = (const int32_t *)ap + MOE_AMX_MR;
            const uint8_t *codes = ap + 8 * MOE_AMX_MR;
            _tile_zero(0);
            _tile_zero(1);
            if (two) {
                _tile_zero(2);
                _tile_zero(3);
            }
            for (t = 0; t < nq; t += 16) {
                const int nt = nq - t < 16 ? (int)(nq - t) : 16;
                const uint8_t *b0 = q + t * qb, *b1 = b0 + 64;
                int bs = (int)qb;
                if (wtype != MOE_WTYPE_INT8 || nt < 16) {
                    moe_q8_amx_copy(q + t * qb, nt, wtype, bt, &dirty);
                    b0 = bt[0];
                    b1 = bt[1];
                    bs = 64;
                }
                _tile_loadd(4, codes + t * 4, lda);
                _tile_loadd(6, b0, bs);
                _tile_loadd(7, b1, bs);
                MOE_Q8_AMX_DP(0, 4, 6);
                MOE_Q8_AMX_DP(1, 4, 7);
                if (two) {
                    _tile_loadd(5, codes + 16 * lda + t * 4, lda);
                    MOE_Q8_AMX_DP(2, 5, 6);
                    MOE_Q8_AMX_DP(3, 5, 7);
                }
                if (pf_at != NULL) {
                    int s_;
                    for (s_ = 0; s_ < nt; s_++) {
                        if (--pf_count == 0) {
                            pf_count = pf.every;
                            __builtin_prefetch(pf_at, 0, 2);
                            pf_at += 64;
                        }
                    }
                }
            }
            _tile_stored(0, isum, 128);
            _tile_stored(1, isum + 16, 128);
            if (two) {
                _tile_stored(2, isum + 16 * 32, 128);
                _tile_stored(3, isum + 16 * 32 + 16, 128);
            }
            for (i = 0; i < m; i++) {
                /* (4-bit: the sums are already of the signed values) */
                const __m512i ci = _mm512_set1_epi32(
                    wtype == MOE_WTYPE_INT8 ? corr[i] : 0);
                const __m512 si = _mm512_set1_ps(sa[i]);
                for (j = 0; j < 2; j++) {
                    const __m512i v = _mm512_load_si512(isum + i * 32 + 16 * j);
                    const __m512 d = _mm512_cvtepi32_ps(
                        wtype == MOE_WTYPE_INT8 ? _mm512_sub_epi32(v, ci) : v);
                    _mm512_store_ps(acc + i * 32 + 16 * j,
                                    _mm512_fmadd_ps(
                                        d, _mm512_mul_ps(sw[j], si),
                                        _mm512_load_ps(acc + i * 32 + 16 * j)));
                }
            }
            q += nq * qb;
            ap += (8 + 4 * nq) * MOE_AMX_MR;
        }
    }
    for (i = 0; i < m; i++) {
        memcpy(c + i * ldc, acc + i * 32, 32 * sizeof(float));
    }
}

void
moe_q8_amx_int8(const void *a, const void *b, int64_t K, int64_t group, int m,
                float *c, int64_t ldc, moe_prefetch pf)
{
    moe_q8_amx(a, b, K, group, m, c, ldc, pf, MOE_WTYPE_INT8);
}

void
moe_q8_amx_int4(const void *a, const void *b, int64_t K, int64_t group, int m,
                float *c, int64_t ldc, moe_prefetch pf)
{
    moe_q8_amx(a, b, K, group, m, c, ldc, pf, MOE_WTYPE_INT4);
}

void
moe_q8_amx_mxfp4(const void *a, const void *b, int64_t K, int64_t group,
                 int m, float *c, int64_t ldc, moe_prefetch pf)
{
    moe_q8_amx(a, b, K, group, m, c, ldc, pf, MOE_WTYPE_MXFP4);
}
#else
typedef int moe_cpu_gemm_amx_unused;
#endif
