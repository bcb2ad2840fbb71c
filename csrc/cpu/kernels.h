/*
 * cpu/kernels.h - the packed GEMM micro-kernels of the CPU backend.  One
 * source (cpu/gemm.inc) is compiled per instruction set by cpu_gemm_<isa>.c;
 * csrc/cpu/ffn.c picks one set at run time from cpuid (or MOE_ISA).
 *
 * A micro-kernel computes an (MR, NR) tile c = a @ b over K:
 *   a: (K, MR) activation panel, k-major (a[k * MR + i] is row i)
 *   b: (K, NR) weight panel, k-major, of the weight dtype
 * Every element is one fused multiply-add chain over k in order, whatever
 * the ISA, MR, NR or the number of valid rows: results do not depend on
 * tiling, batch or thread count.
 */
#ifndef MOE_CPU_KERNELS_H
#define MOE_CPU_KERNELS_H

#include <stdint.h>
#include <string.h>

/* Largest MR (also dot_mr) and NR of any kernel set (sizes stack tiles). */
#define MOE_MAX_MR 32
#define MOE_MAX_NR 32

/* Weight storage types the kernels read: moe_dtype's values. */
enum {
    MOE_WTYPE_F32   = 0,
    MOE_WTYPE_BF16  = 1,
    MOE_WTYPE_F16   = 2,
    MOE_WTYPE_INT8  = 3,
    MOE_WTYPE_INT4  = 4,
    MOE_WTYPE_MXFP4 = 5,
    MOE_WTYPE_COUNT
};

/*
 * Bytes of a weight panel of K rows and nr columns.  Float types: K rows of
 * nr elements.  Quantized: ceil(K / group) blocks, each nr scales (float16;
 * mxfp4 e8m0 bytes) then its rows (nr int8, or nr / 2 bytes of nibbles:
 * byte l holds column l low, column l + nr / 2 high).  The blocks of the
 * first K' < K rows are a prefix of the panel.
 */
static inline int64_t
moe_panel_bytes(int wtype, int64_t K, int nr, int64_t group)
{
    switch (wtype) {
    case MOE_WTYPE_F32:   return K * nr * 4;
    case MOE_WTYPE_INT8:  return (K + group - 1) / group * nr * 2 + K * nr;
    case MOE_WTYPE_INT4:  return (K + group - 1) / group * nr * 2 + K * nr / 2;
    case MOE_WTYPE_MXFP4: return (K + group - 1) / group * nr + K * nr / 2;
    default:              return K * nr * 2;
    }
}

/*
 * int8 compute (moe_pack_params.compute INT8): integer dot products of
 * quantized weights and activations quantized to int8.
 *
 * Weight panel of K rows: ceil(K / group) blocks of `group` rows (the last
 * one fewer), each nr scales (as moe_panel_bytes) then ceil(rows / 4)
 * quads; quad q holds the block's rows 4q .. 4q + 3 (zero codes past its
 * rows) as 32-bit lanes of 4 unsigned bytes, one per row:
 *   int8:  nr * 4 bytes, byte 4 j + r = code(4q + r, j) + 128;
 *   4-bit: nr * 2 bytes, byte 4 l + r = row 4q + r's byte l (nibbles:
 *          column l low, column l + nr / 2 high), used as n (int4: n - 8
 *          is the value) or through the e2m1 table (mxfp4: u = 2 v + 12).
 * The value is (u - off) * mult * scale: off 128 / 8 / 12, mult 1 / 1 / 0.5.
 *
 * Activation panel of mr rows for the same K and group: every block cut in
 * sub-blocks of MOE_Q8_BLOCK rows (the last fewer), each
 *   mr float scales s_a (row i's values are q * s_a; mxfp4: times 0.5
 *   folded in), mr int32 corrections off * sum(q), then ceil(rows / 4) * mr
 *   int32 quads (4 int8 codes of rows 4t .. 4t + 3 of row i at [t * mr + i],
 *   zeros past the sub-block); the tile sets' kernels (q8_tiles) read the
 *   codes in the row layout instead: row i's 4 ceil(rows / 4) codes
 *   (zeros past the sub-block) at byte i * 4 ceil(rows / 4), same size.
 * c(i, j) = sum over sub-blocks, in order, of one FMA each:
 *   c = fma((float)(sum_k u * q - corr_i), s_a_i * s_w_j, c)
 * (the integer sum is exact; |sum| < 2^24 so its conversion too).
 */
#define MOE_Q8_BLOCK 256

/* Bytes of one quad of a panel (nr columns x 4 rows). */
static inline int64_t
moe_q8_quad_bytes(int wtype, int nr)
{
    return wtype == MOE_WTYPE_INT8 ? (int64_t)nr * 4 : (int64_t)nr * 2;
}

/* Bytes of an int8-compute weight panel of K rows. */
static inline int64_t
moe_q8_panel_bytes(int wtype, int64_t K, int nr, int64_t group)
{
    const int64_t sb = (int64_t)nr * (wtype == MOE_WTYPE_MXFP4 ? 1 : 2);
    const int64_t qb = moe_q8_quad_bytes(wtype, nr), rest = K % group;

    return K / group * (sb + (group + 3) / 4 * qb) +
           (rest ? sb + (rest + 3) / 4 * qb : 0);
}

/* Bytes of the activation sub-blocks of one block of `rows` rows. */
static inline int64_t
moe_q8_block_act_bytes(int64_t rows, int mr)
{
    const int64_t full = rows / MOE_Q8_BLOCK, rest = rows % MOE_Q8_BLOCK;

    return (full * (8 + MOE_Q8_BLOCK) + (rest ? 8 + (rest + 3) / 4 * 4 : 0)) *
           mr;
}

/* Bytes of an int8-compute activation panel of K rows, mr rows. */
static inline int64_t
moe_q8_act_bytes(int64_t K, int64_t group, int mr)
{
    return K / group * moe_q8_block_act_bytes(group, mr) +
           moe_q8_block_act_bytes(K % group, mr);
}

/* fp32 -> bf16, round to nearest even; NaN stays NaN (quieted). */
static inline uint16_t
moe_bf16_round(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((u >> 16) | 0x40u);
    }
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to bf16, as an fp32 value (exact). */
static inline float
moe_bf16_value(float f)
{
    const uint32_t u = (uint32_t)moe_bf16_round(f) << 16;
    float v;

    memcpy(&v, &u, sizeof(v));
    return v;
}

/* Two fp32 values as one bf16 pair (lo: the even k) for the dot kernel. */
static inline uint32_t
moe_bf16_pair(float lo, float hi)
{
    return (uint32_t)moe_bf16_round(lo) | (uint32_t)moe_bf16_round(hi) << 16;
}

/*
 * Memory a micro-kernel prefetches towards L2 while it runs: one 64-byte line
 * every `every` k steps, from `at` on (NULL: none).  The FFN driver spreads
 * the next weight panel over the calls on the current one, so that panel
 * comes from memory while this one computes (cpu/ffn.c: moe_prefetch_slice).
 */
typedef struct moe_prefetch {
    const char *at;
    int         every;
} moe_prefetch;

/*
 * c (m, NR), row i at c + i * ldc, = first m rows of a @ b; rows >= m are not
 * written.  group: a quantized panel's rows per scale block (else unused).
 * Quantized weights are dequantized in registers, exactly (value * scale
 * is exact in fp32), so the result is the bits of the fp32 kernel on the
 * dequantized weights.
 */
typedef void (*moe_ukr_fn)(const float *a, const void *b, int64_t K,
                           int64_t group, int m, float *c, int64_t ldc,
                           moe_prefetch pf);

/*
 * The bf16-compute kernel: c (m, NR) = first m rows of a @ b with b (Kp, NR,
 * 2) bf16 weights (pairs of k) and a the dot_mr activation rows rounded to
 * bf16, laid out by the set's dot_layout (moe_dot_layout); pf as for
 * moe_ukr_fn.  See cpu/gemm.inc and cpu/gemm_amx.c.
 */
typedef void (*moe_dot_fn)(const void *a, const void *b, int64_t Kp, int m,
                           float *c, int64_t ldc, moe_prefetch pf);

/*
 * The bf16-compute kernel in k blocks (tile sets): c (rows of ldc floats) =
 * c_in (rows of 32 floats; NULL: 0) + a @ b over Kp pairs, a and b at the
 * block's first pair; continuing from the previous block's c gives the bits
 * of one call over all the blocks (the accumulators are fp32 either way).
 * c and c_in have 16 rows for m <= 16, else 32 (all read and written: rows
 * past m hold garbage).
 */
typedef void (*moe_dot_acc_fn)(const void *a, const void *b, int64_t Kp,
                               int m, const float *c_in, float *c,
                               int64_t ldc, moe_prefetch pf);

/* How the bf16-compute kernel reads its activation panel. */
typedef enum moe_dot_layout {
    MOE_DOT_VALUES = 0, /* (2 Kp, dot_mr) fp32 values, k-major            */
    MOE_DOT_PAIRS  = 1, /* (Kp, dot_mr) uint32 pairs (k = 2 kp low half,
                           2 kp + 1 high half), k-major                   */
    MOE_DOT_TILES  = 2  /* blocks of 16 pairs: (ceil(Kp / 16), dot_mr, 16)
                           uint32 pairs, each block's rows one tile's      */
} moe_dot_layout;

/* MOE_DOT_TILES: where pair kp of row i goes in a panel of mr rows, and the
 * panel's size in pairs (the last block's pairs past Kp unused). */
static inline int64_t
moe_tile_pair(int64_t kp, int i, int mr)
{
    return ((kp >> 4) * mr + i) * 16 + (kp & 15);
}

static inline int64_t
moe_tile_panel_pairs(int64_t Kp, int mr)
{
    return (Kp + 15) / 16 * 16 * mr;
}

/* out (n_x, n_w) = x (n_x, d) @ w (n_w, d)^T in float64 from float32 x and w
 * (see cpu/gemm.inc). */
typedef void (*moe_router_fn)(const float *x, int64_t n_x, const float *w,
                              int64_t n_w, int64_t d, double *out);

/*
 * Hidden activations from a gate/up tile (see cpu/gemm.inc): act is a
 * moe_activation (alpha, limit: MOE_ACTIVATION_SWIGLU_OAI's), bias (NR,) is
 * added first if not NULL; writes h[j * mr + i] for rows i < m, units
 * j < n_units.
 */
typedef void (*moe_epilogue_fn)(int act, int gated, const float *tile, int m,
                                int n_units, const float *bias, float alpha,
                                float limit, float *h, int mr);

/*
 * The epilogue into a MOE_DOT_TILES panel: the same hidden values rounded to
 * bf16 (nearest even), units j < n_units (even, within one 16-pair block)
 * of row i < m as pairs at h + i * 16 + j / 2.
 */
typedef void (*moe_epilogue_tiles_fn)(int act, int gated, const float *tile,
                                      int m, int n_units, const float *bias,
                                      float alpha, float limit, uint32_t *h);

/*
 * A MOE_DOT_TILES activation panel of mr rows from rows i < m (src[i], d
 * values, d even) rounded to bf16 (nearest even; NaN quieted): pair kp of
 * row i at moe_tile_pair(kp, i, mr); rows m .. mr - 1 zero.
 */
typedef void (*moe_pack_tiles_fn)(const float *const *src, int m, int mr,
                                  int64_t d, uint32_t *dst);

/*
 * Low-rank update of an output tile: for rows i < m,
 *   c[i * ldc + j] += sum_q coef[i * ld_coef + q] * bank[index[i * ld_index + q] * ld_bank + j]
 * for columns j < n_cols, q in order (index -1: skipped).  bank points at
 * the tile's first column; ld_index 0 shares one index row among the rows.
 */
typedef void (*moe_lowrank_fn)(float *c, int64_t ldc, int m, int n_cols,
                               const float *coef, int64_t ld_coef,
                               const int32_t *index, int64_t ld_index,
                               int n_terms, const float *bank, int64_t ld_bank);

/*
 * The backward's GEMM tile: c (m, NR) = a @ b, or c += a @ b continuing each
 * element's chain when load_c; a as for moe_ukr_fn, b fp32 row-major in place
 * (row k at b + k * ldb).  See cpu/gemm.inc.
 */
typedef void (*moe_ukr_acc_fn)(const float *a, const float *b, int64_t ldb,
                               int64_t K, int m, float *c, int64_t ldc,
                               int load_c);

/*
 * The activation's backward over n <= NR hidden units (see cpu/gemm.inc):
 * h = act(g, u) (the forward's bits), dg, du = dh * the partial derivatives;
 * g and dg NULL for ungated activations.
 */
typedef void (*moe_act_grad_fn)(int act, const float *g, const float *u,
                                const float *dh, int n, float alpha,
                                float limit, float *h, float *dg, float *du);

/* The int8-compute kernel: c (m, NR) = the first m rows of a @ b, with a
 * an activation panel and b a weight panel of K rows (moe_q8_*, above); c
 * row i at c + i * ldc; pf as for moe_ukr_fn. */
typedef void (*moe_q8_fn)(const void *a, const void *b, int64_t K,
                          int64_t group, int m, float *c, int64_t ldc,
                          moe_prefetch pf);

/* One sub-block of an int8-compute activation panel (cpu/gemm.inc:
 * moe_q8_quant): rows i < m, value k < n at src[i][k * sk] (sk > 1: a
 * panel's rows, src[i] = src[0] + i), the quad or (rowmajor) row layout. */
typedef void (*moe_q8_quant_fn)(const float *const *src, int64_t sk, int m,
                                int mr, int64_t n, float mult, int32_t off,
                                int rowmajor, uint8_t *dst);

/* A quantized panel's first K rows as fp32, (K, NR) row-major: the values
 * ukr computes with (NULL for the float types). */
typedef void (*moe_dequant_fn)(const void *b, int64_t K, int64_t group,
                               float *out);

typedef struct moe_kernels {
    const char    *name;  /* "amx", "avx512bf16", "avx512", "avx2",
                             "scalar" (portable), "avx512sim" (tests)     */
    int            mr;    /* rows per activation panel                     */
    int            nr;    /* columns per weight panel (2 vectors)          */
    moe_ukr_fn     ukr[MOE_WTYPE_COUNT];
    moe_dequant_fn dequant[MOE_WTYPE_COUNT];
    moe_q8_fn      q8[MOE_WTYPE_COUNT]; /* int8 compute (quantized types) */
    /* Tile sets: int8 compute on MOE_AMX_MR-row activation panels in the
     * row layout (moe_q8_pack), the tile configuration loaded; NULL: none */
    moe_q8_fn      q8_tiles[MOE_WTYPE_COUNT];
    moe_dot_fn     dot;   /* bf16 weights x bf16 activations               */
    int            dot_layout; /* its activation panel (moe_dot_layout)    */
    int            dot_mr;    /* rows per activation panel of dot          */
    const char    *dot_name;  /* "vdpbf16ps", "fma" or "amx" (build_info)  */
    /* Tile sets: dot needs the tile configuration tile_begin loads in the
     * calling thread (once per task); tile_end releases it.  NULL else. */
    void         (*tile_begin)(void);
    void         (*tile_end)(void);
    moe_dot_acc_fn dot_acc; /* tile sets: dot in k blocks (NULL: none)    */
    moe_router_fn  router;
    moe_epilogue_fn epilogue;
    moe_epilogue_tiles_fn epilogue_tiles;
    moe_pack_tiles_fn pack_tiles;
    moe_lowrank_fn lowrank;
    moe_ukr_acc_fn ukr_acc;
    moe_act_grad_fn act_grad;
    moe_q8_quant_fn q8_quant; /* int8 compute: one activation sub-block  */
} moe_kernels;

extern const moe_kernels moe_kernels_generic;
#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_HAVE_X86_KERNELS 1
extern const moe_kernels moe_kernels_avx2;
extern const moe_kernels moe_kernels_avx512;
extern const moe_kernels moe_kernels_avx512bf16;
extern const moe_kernels moe_kernels_avx512sim; /* tests: MOE_ISA=avx512sim */

/* cpu/gemm_amx.c: the AMX-BF16 dot kernel (MOE_DOT_TILES, MOE_AMX_MR rows)
 * and its tile hooks; moe_amx_request asks Linux for the tile state once
 * per process and says whether tiles may be used (cpuid checked first). */
#define MOE_AMX_MR 32
void moe_dot_amx(const void *a, const void *b, int64_t Kp, int m, float *c,
                 int64_t ldc, moe_prefetch pf);
void moe_dot_amx_acc(const void *a, const void *b, int64_t Kp, int m,
                     const float *c_in, float *c, int64_t ldc,
                     moe_prefetch pf);
/* moe_dot_amx_acc with c_in NULL (0) or c itself (rows ldc floats apart):
 * a an activation panel (MOE_DOT_TILES, 32 rows), b a (Kp, 32) pair panel;
 * c rows up to 16 (m <= 16) or 32 are written.  Tiles configured. */
void moe_gemm_amx(const uint32_t *a, const uint32_t *b, int64_t Kp, int m,
                  const float *c_in, float *c, int64_t ldc);
/* The int8-compute kernels on AMX-INT8 tiles (moe_kernels.q8_tiles). */
void moe_q8_amx_int8(const void *a, const void *b, int64_t K, int64_t group,
                     int m, float *c, int64_t ldc, moe_prefetch pf);
void moe_q8_amx_int4(const void *a, const void *b, int64_t K, int64_t group,
                     int m, float *c, int64_t ldc, moe_prefetch pf);
void moe_q8_amx_mxfp4(const void *a, const void *b, int64_t K, int64_t group,
                      int m, float *c, int64_t ldc, moe_prefetch pf);
void moe_amx_begin(void);
void moe_amx_end(void);
int moe_amx_request(void);
#endif

/* The kernel set in use (cpuid, lowered by MOE_ISA). */
const moe_kernels *moe_cpu_kernels(void);

/* cpu/ffn.c, for the backward too: an activation panel in the set's dot
 * layout, and a dot over one weight panel in the forward's order. */
void moe_pack_dot_panel(const moe_kernels *kr, const float *const *src, int m,
                        int mr, int64_t d, void *dst);
void moe_dot_panel(const moe_kernels *kr, const void *a, const void *b,
                   int64_t Kp, int m, int nr, float *c);

#endif /* MOE_CPU_KERNELS_H */
