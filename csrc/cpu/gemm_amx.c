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
 */
#include "moe.h"
#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx2,fma")
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
#else
typedef int moe_cpu_gemm_amx_unused;
#endif
