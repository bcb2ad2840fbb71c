/*
 * cpu/ffn.c - the grouped expert FFN on the CPU: kernel-set choice, weight
 * packing, and the driver.  Weights are packed once into k-major panels
 * (gate and up interleaved per panel, so one micro-kernel pass yields both
 * and the activation is applied before anything is written).  A forward
 * runs three parallel phases over (expert, row-block, column-block) tasks:
 *   0. gather the routed rows into activation panels,
 *   1. h = act(x W_gate^T, x W_up^T), written as panels for phase 2,
 *   2. y = h W_down^T into the expert-sorted output rows.
 * Every output element is computed by exactly one task, as one FMA chain
 * in k order, so results are the same bits for any thread count or batch.
 */
#include "moe_impl.h"
#include "cpu/kernels.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows (activation panels) and weight panels per task: see phase 1. */
#define MOE_TASK_ROWS   192
#define MOE_TASK_PANELS 4
/* int8 compute runs on tiles (kr->q8_tiles) from this many rows an expert,
 * on average: int8 weights, 4-bit ones (whose tile kernel widens the codes
 * of every panel per call).  Measured on mixtral-small, AMX Xeon, 2
 * threads: int8 at 16 tokens (4 rows an expert) 2.13 ms on tiles against
 * 2.27 with VPDPBUSD, at 64 (16 rows) 2.98 / 4.63; int4 at 32 tokens
 * 3.99 / 2.63, at 64 5.17 / 5.32, at 128 8.91 / 10.39. */
#define MOE_Q8_TILE_ROWS_INT8 4
#define MOE_Q8_TILE_ROWS_4BIT 16
/* The tile sets' gate/up tasks: up to this many rows, while their bf16
 * activation panels fit MOE_TILE_UP_BYTES (the 2 MiB L2 of every AMX core so
 * far), so that an expert's gate/up weights are read once per 1024 rows, not
 * once per 192.  Measured (AMX Xeon, 2 threads, mixtral-small bf16 compute,
 * 2048 tokens, old/new builds alternated, 3 rounds): 58.6-62.0 -> 57.2-58.3
 * ms; 512 rows (1 MiB) measured no better than 192.  qwen3-small 2048: 51.5
 * -> 50.4; deepseek-small (about 190 rows an expert) and 512 tokens: within
 * noise.  The down GEMM (K = d_ff, 7 KiB a row at 3584) keeps MOE_TASK_ROWS:
 * bigger row blocks there measured no better.  acc: 128 KiB of stack. */
#define MOE_TILE_UP_ROWS  1024
#define MOE_TILE_UP_BYTES (2 << 20)

/* ---- kernel set ------------------------------------------------------- */

static int
moe_has_feature(const char *name)
{
    const char *f = moe_cpu_features();
    size_t n = strlen(name);

    while ((f = strstr(f, name)) != NULL) {
        if (f[n] == ' ' || f[n] == '\0') {
            return 1;
        }
        f += n;
    }
    return 0;
}

#ifdef MOE_HAVE_X86_KERNELS
#include <cpuid.h>

/* cpuid's vendor is Intel. */
static int
moe_cpu_is_intel(void)
{
    unsigned a, b, c, d;

    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547u /* Genu */ &&
           d == 0x49656e69u /* ineI */ && c == 0x6c65746eu /* ntel */;
}

/* base with the bf16-compute kernel of `dot` (the rest unchanged). */
static const moe_kernels *
moe_with_dot(moe_kernels *slot, const moe_kernels *base,
             const moe_kernels *dot)
{
    *slot = *base;
    slot->dot = dot->dot;
    slot->dot_layout = dot->dot_layout;
    slot->dot_mr = dot->dot_mr;
    slot->dot_name = dot->dot_name;
    return slot;
}
#endif

/*
 * The best set this CPU runs, lowered (never raised) by MOE_ISA, or the
 * test set avx512sim on any AVX2 CPU.  Decided once: the first call comes
 * from the module's init, under the GIL.  Two sets are composed here:
 *   - avx512bf16 on Intel keeps the FMA emulation for bf16 compute: there
 *     VDPBF16PS runs at half the FMA's flop rate (Xeons with AMX, register
 *     loops: 111-120 vs 221-240 GFLOP/s a core), on AMD Zen 4 twice it;
 *   - amx: that set with the tile kernel (cpu/gemm_amx.c) for bf16
 *     compute, where cpuid has AMX-BF16 and Linux grants the tile state
 *     (asked only when no MOE_ISA rules the set out; refused: avx512bf16),
 *     and with AMX-INT8 the int8-compute tile kernels (q8_tiles).
 */
const moe_kernels *
moe_cpu_kernels(void)
{
    static const moe_kernels *chosen = NULL;
    const moe_kernels *best = &moe_kernels_generic;
    const char *want;

    if (chosen != NULL) {
        return chosen;
    }
    want = getenv("MOE_ISA");
#ifdef MOE_HAVE_X86_KERNELS
    static moe_kernels bf16_intel, amx;
    const int avx2 = moe_has_feature("avx2") && moe_has_feature("fma") &&
                     moe_has_feature("f16c");
    const int avx512 = moe_has_feature("avx512f") && moe_has_feature("f16c") &&
                       moe_has_feature("fma");
    if (avx512 && moe_has_feature("avx512bf16") &&
        moe_has_feature("avx512bw") && moe_has_feature("avx512vnni")) {
        best = moe_cpu_is_intel()
            ? moe_with_dot(&bf16_intel, &moe_kernels_avx512bf16,
                           &moe_kernels_avx512)
            : &moe_kernels_avx512bf16;
        if (moe_has_feature("amx-bf16") && moe_has_feature("amx-tile") &&
            (want == NULL || strcmp(want, "amx") == 0) && moe_amx_request()) {
            amx = *best;
            amx.name = "amx";
            amx.dot = moe_dot_amx;
            amx.dot_layout = MOE_DOT_TILES;
            amx.dot_mr = MOE_AMX_MR;
            amx.dot_name = "amx";
            amx.tile_begin = moe_amx_begin;
            amx.tile_end = moe_amx_end;
            amx.dot_acc = moe_dot_amx_acc;
            if (moe_has_feature("amx-int8")) {
                amx.q8_tiles[MOE_WTYPE_INT8] = moe_q8_amx_int8;
                amx.q8_tiles[MOE_WTYPE_INT4] = moe_q8_amx_int4;
                amx.q8_tiles[MOE_WTYPE_MXFP4] = moe_q8_amx_mxfp4;
            }
            best = &amx;
        }
    }
    else if (avx512) {
        best = &moe_kernels_avx512;
    }
    else if (avx2) {
        best = &moe_kernels_avx2;
    }
#endif
    if (want != NULL) {
        if (strcmp(want, "scalar") == 0 || strcmp(want, "generic") == 0) {
            best = &moe_kernels_generic;
        }
#ifdef MOE_HAVE_X86_KERNELS
        else if (strcmp(want, "avx2") == 0 && best != &moe_kernels_generic) {
            best = &moe_kernels_avx2;
        }
        else if (strcmp(want, "avx512") == 0 &&
                 strcmp(best->name, "avx512bf16") == 0) {
            /* (amx is never chosen under another MOE_ISA) */
            best = &moe_kernels_avx512;
        }
        else if (strcmp(want, "avx512sim") == 0 && avx2) {
            /* the AVX-512 tiles on AVX2, for tests (cpu/gemm_avx512sim.c) */
            best = &moe_kernels_avx512sim;
        }
#endif
    }
    chosen = best;
    return chosen;
}

const char *
moe_cpu_isa(void)
{
    return moe_cpu_kernels()->name;
}

const char *
moe_cpu_bf16_dot(void)
{
    return moe_cpu_kernels()->dot_name;
}

const char *
moe_cpu_int8_dot(void)
{
    const moe_kernels *kr = moe_cpu_kernels();

    if (kr->q8_tiles[MOE_WTYPE_INT8] != NULL) {
        return "amx";
    }
#ifdef MOE_HAVE_X86_KERNELS
    if (kr->q8[MOE_WTYPE_INT8] == moe_kernels_avx512bf16.q8[MOE_WTYPE_INT8]) {
        return "vpdpbusd";
    }
    if (kr == &moe_kernels_avx2) {
        return "vpmaddubsw";
    }
#endif
    return "portable";
}

/* ---- packing ------------------------------------------------------------ */

typedef struct moe_pack_job {
    const moe_pack_params *p;
    moe_experts           *w;
    size_t                 es;        /* bytes per element */
    int                    nonfinite; /* set by a task that copied NaN / Inf */
} moe_pack_job;

/*
 * Where element (k, j) of a panel goes: bf16 interleaves the two vectors of
 * a row (lane l holds columns l and l + VL, see cpu/gemm.inc), bf16 compute
 * pairs rows instead ((k / 2, j, k % 2): the dot kernel's layout), the other
 * types are plain (k, j).
 */
static inline int64_t
moe_pack_at(const moe_experts *w, int64_t k, int j)
{
    const int vl = w->nr / 2;

    if (w->bf16_act) {
        return ((k >> 1) * w->nr + j) * 2 + (k & 1);
    }
    if (w->dtype == MOE_DTYPE_BF16) {
        return k * w->nr + (int64_t)(j % vl) * 2 + j / vl;
    }
    return k * w->nr + j;
}

/* Zero rows [k0, k1) of panel column j. */
static void
moe_pack_zero_rows(const moe_experts *w, size_t es, void *panel, int j,
                   int64_t k0, int64_t k1)
{
    int64_t k;

    for (k = k0; k < k1; k++) {
        if (es == 4) {
            ((float *)panel)[moe_pack_at(w, k, j)] = 0.0f;
        }
        else {
            ((uint16_t *)panel)[moe_pack_at(w, k, j)] = 0;
        }
    }
}

/*
 * Copy row `src` (K elements, or NULL for zeros) into panel column j; returns
 * nonzero when the row holds a NaN or Inf (all exponent bits set: the check
 * rides on the copy, which reads every weight anyway).
 */
static int
moe_pack_column(const moe_experts *w, size_t es, const void *src, int64_t K,
                int64_t cs, void *panel, int j)
{
    int64_t k;
    int bad = 0;

    if (src == NULL) {
        moe_pack_zero_rows(w, es, panel, j, 0, K);
    }
    else if (es == 4) {
        float *dst = panel;
        const float *s = src;
        uint32_t u;
        for (k = 0; k < K; k++) {
            dst[moe_pack_at(w, k, j)] = s[k * cs];
            memcpy(&u, s + k * cs, sizeof(u));
            bad |= (u & 0x7f800000u) == 0x7f800000u;
        }
    }
    else {
        const uint16_t exp = w->dtype == MOE_DTYPE_BF16 ? 0x7f80 : 0x7c00;
        uint16_t *dst = panel;
        const uint16_t *s = src;
        for (k = 0; k < K; k++) {
            dst[moe_pack_at(w, k, j)] = s[k * cs];
            bad |= (s[k * cs] & exp) == exp;
        }
    }
    return bad;
}

/* ---- quantized panels (cpu/kernels.h: moe_panel_bytes) ---- */

/* Bytes of one scale and one row of a quantized panel. */
static inline int
moe_qscale_size(const moe_experts *w)
{
    return w->dtype == MOE_DTYPE_MXFP4 ? 1 : 2;
}

static inline int64_t
moe_qrow_bytes(const moe_experts *w)
{
    return w->dtype == MOE_DTYPE_INT8 ? w->nr : w->nr / 2;
}

/* Bytes of a whole block (scales and rows) of a quantized panel. */
static inline int64_t
moe_qblock_bytes(const moe_experts *w, int64_t g)
{
    const int64_t sb = (int64_t)w->nr * moe_qscale_size(w);

    return w->q8_act ? sb + (g + 3) / 4 * moe_q8_quad_bytes(w->dtype, w->nr)
                     : sb + g * moe_qrow_bytes(w);
}

/* Bytes of a weight panel of K rows (cpu/kernels.h). */
static inline int64_t
moe_weight_panel_bytes(const moe_experts *w, int64_t K, int64_t g)
{
    return w->q8_act ? moe_q8_panel_bytes(w->dtype, K, w->nr, g)
                     : moe_panel_bytes(w->dtype, K, w->nr, g);
}

/*
 * Set element (k, j) of a quantized panel to code v (int8: the byte; 4-bit:
 * the nibble, column j in byte j % (nr / 2), high half for j >= nr / 2; int8
 * compute: in quads, int8 codes + 128, cpu/kernels.h: moe_q8_*).
 */
static inline void
moe_qput(const moe_experts *w, uint8_t *panel, int64_t g, int64_t k, int j,
         unsigned v)
{
    const int64_t t = k / g, r = k - t * g;
    const int64_t sb = (int64_t)w->nr * moe_qscale_size(w);
    const int half = w->nr / 2;
    uint8_t *at = panel + t * moe_qblock_bytes(w, g) + sb;
    int col = j < half ? j : j - half;

    if (w->q8_act) {
        at += r / 4 * moe_q8_quad_bytes(w->dtype, w->nr) + r % 4;
        if (w->dtype == MOE_DTYPE_INT8) {
            at[4 * j] = (uint8_t)(v ^ 0x80u);
            return;
        }
        at += 3 * col; /* byte 4 col + r % 4 */
    }
    else {
        at += r * moe_qrow_bytes(w);
        if (w->dtype == MOE_DTYPE_INT8) {
            at[j] = (uint8_t)v;
            return;
        }
    }
    if (j < half) {
        at[col] = (uint8_t)((at[col] & 0xf0u) | (v & 0xfu));
    }
    else {
        at[col] = (uint8_t)((at[col] & 0x0fu) | (v & 0xfu) << 4);
    }
}

/* The code of a zero weight. */
static inline unsigned
moe_qzero(const moe_experts *w)
{
    return w->dtype == MOE_DTYPE_INT4 ? 8u : 0u;
}

/*
 * Copy quantized row `src` (K values as the caller lays them out: K int8,
 * or ceil(K / 2) bytes, even k in the low nibble) with its scales `scales`
 * (ceil(K / group)) into panel column j; NULL: zeros.  Returns nonzero for
 * a scale that is NaN / Inf (float16 all-ones exponent, e8m0 255) or an
 * mxfp4 weight past the fp32 range.
 */
static int
moe_pack_qcolumn(const moe_experts *w, int64_t g, const uint8_t *src,
                 const uint8_t *scales, int64_t K, uint8_t *panel, int j)
{
    const int ss = moe_qscale_size(w);
    const int64_t n_blocks = (K + g - 1) / g;
    const int64_t block = moe_qblock_bytes(w, g);
    int64_t k, t;
    int bad = 0;

    for (t = 0; t < n_blocks; t++) {
        uint8_t *at = panel + t * block + (int64_t)j * ss;
        if (scales == NULL) {
            memset(at, 0, (size_t)ss);
            continue;
        }
        memcpy(at, scales + t * ss, (size_t)ss);
        if (ss == 2) {
            uint16_t h;
            memcpy(&h, at, sizeof(h));
            bad |= (h & 0x7c00u) == 0x7c00u;
        }
        else {
            bad |= scales[t] == 255;
        }
    }
    for (k = 0; k < K; k++) {
        unsigned v;
        if (src == NULL) {
            v = moe_qzero(w);
        }
        else if (w->dtype == MOE_DTYPE_INT8) {
            v = src[k];
        }
        else {
            v = (src[k / 2] >> (k & 1 ? 4 : 0)) & 0xfu;
        }
        /* e2m1 magnitude 2^(e - 126) (1 + m / 2) times 2^(s - 127) reaches
         * 2^128 only for scales 253 and 254 (255 is NaN, refused above) */
        if (w->dtype == MOE_DTYPE_MXFP4 && scales != NULL &&
            scales[k / g] >= 253) {
            static const float mag[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
            bad |= ldexpf(mag[v & 7], scales[k / g] - 127) > 3.4e38f;
        }
        moe_qput(w, panel, g, k, j, v);
    }
    return bad;
}

/* Set rows [k0, k1) of quantized panel column j to zero weights. */
static void
moe_pack_qzero_rows(const moe_experts *w, int64_t g, uint8_t *panel, int j,
                    int64_t k0, int64_t k1)
{
    int64_t k;

    for (k = k0; k < k1; k++) {
        moe_qput(w, panel, g, k, j, moe_qzero(w));
    }
}

/* moe_pack_task for quantized weights: panel c of expert e. */
static void
moe_pack_qtask(moe_pack_job *job, int64_t e, int64_t c)
{
    const moe_pack_params *p = job->p;
    const moe_experts *w = job->w;
    const int64_t d = w->d_model, F = w->d_ff;
    const int ss = moe_qscale_size(w);
    int j, bad = 0;

    if (c < w->gu_panels) {
        /* rows of d values: ceil(d / group) scales each */
        const int width = w->gated ? w->nr / 2 : w->nr;
        const int64_t rb = w->dtype == MOE_DTYPE_INT8 ? d : (d + 1) / 2;
        const int64_t g = w->group_gu, sr = (d + g - 1) / g * ss;
        uint8_t *panel = (uint8_t *)w->gu + (e * w->gu_panels + c) *
                         moe_weight_panel_bytes(w, d, g);
        const int64_t ff = w->expert_ff ? w->expert_ff[e] : F;
        for (j = 0; j < w->nr; j++) {
            int is_up = !w->gated || j >= width;
            int64_t unit = c * width + (is_up && w->gated ? j - width : j);
            const uint8_t *src = is_up ? p->w_up : p->w_gate;
            const uint8_t *sc = is_up ? p->s_up : p->s_gate;
            int64_t row = e * F + unit;
            bad |= moe_pack_qcolumn(w, g, unit < ff ? src + row * rb : NULL,
                                    unit < ff ? sc + row * sr : NULL, d,
                                    panel, j);
        }
    }
    else {
        const int64_t q = c - w->gu_panels;
        const int64_t rb = w->dtype == MOE_DTYPE_INT8 ? F : (F + 1) / 2;
        const int64_t g = w->group_down, sr = (F + g - 1) / g * ss;
        uint8_t *panel = (uint8_t *)w->down + (e * w->down_panels + q) *
                         moe_weight_panel_bytes(w, F, g);
        const int64_t ff = w->expert_ff ? w->expert_ff[e] : F;
        const uint8_t *src = p->w_down, *sc = p->s_down;
        for (j = 0; j < w->nr; j++) {
            int64_t row = q * w->nr + j;
            bad |= moe_pack_qcolumn(w, g, row < d ? src + (e * d + row) * rb : NULL,
                                    row < d ? sc + (e * d + row) * sr : NULL,
                                    F, panel, j);
            if (ff < F) {
                /* hidden units past this expert's size: zero weights */
                moe_pack_qzero_rows(w, g, panel, j, ff, F);
            }
        }
    }
    if (bad) {
        __atomic_store_n(&job->nonfinite, 1, __ATOMIC_RELAXED);
    }
}

/* Task t: one panel (gate/up panels first, then down panels) of one expert. */
static void
moe_pack_task(void *ctx, int64_t t)
{
    const moe_pack_job *job = ctx;
    const moe_pack_params *p = job->p;
    const moe_experts *w = job->w;
    const int64_t per_expert = w->gu_panels + w->down_panels;
    const int64_t e = t / per_expert, c = t % per_expert;
    const int64_t d = w->d_model, F = w->d_ff;
    const size_t es = job->es;
    int j, bad = 0;

    if (moe_dtype_quantized(w->dtype)) {
        moe_pack_qtask((moe_pack_job *)ctx, e, c);
        return;
    }
    if (c < w->gu_panels) {
        const int width = w->gated ? w->nr / 2 : w->nr;
        char *panel = (char *)w->gu + ((e * w->gu_panels + c) * d * w->nr) * es;
        const moe_wstrides su = moe_wst(p->up_strides, F, d);
        const moe_wstrides sg = moe_wst(p->gate_strides, F, d);
        const char *up = (const char *)p->w_up + (size_t)(e * su.expert) * es;
        const char *gate = p->w_gate
            ? (const char *)p->w_gate + (size_t)(e * sg.expert) * es : NULL;
        const int64_t ff = w->expert_ff ? w->expert_ff[e] : F;
        for (j = 0; j < w->nr; j++) {
            int is_up = !w->gated || j >= width;
            int64_t unit = c * width + (is_up && w->gated ? j - width : j);
            const moe_wstrides *s = is_up ? &su : &sg;
            const char *src = is_up ? up : gate;
            bad |= moe_pack_column(w, es, unit < ff
                                              ? src + (size_t)(unit * s->row) * es
                                              : NULL, d, s->col, panel, j);
        }
    }
    else {
        const int64_t q = c - w->gu_panels;
        char *panel = (char *)w->down +
                      ((e * w->down_panels + q) * F * w->nr) * es;
        const moe_wstrides sd = moe_wst(p->down_strides, d, F);
        const char *down = (const char *)p->w_down + (size_t)(e * sd.expert) * es;
        const int64_t ff = w->expert_ff && !w->linear ? w->expert_ff[e] : F;
        for (j = 0; j < w->nr; j++) {
            int64_t row = q * w->nr + j;
            bad |= moe_pack_column(w, es, row < d ? down + (size_t)(row * sd.row) * es
                                                  : NULL, F, sd.col, panel, j);
            if (ff < F) {
                /* hidden units past this expert's size: zero weights */
                moe_pack_zero_rows(w, es, panel, j, ff, F);
            }
        }
    }
    if (bad) {
        __atomic_store_n(&((moe_pack_job *)ctx)->nonfinite, 1, __ATOMIC_RELAXED);
    }
}

/* Gate/up biases laid out like the panel columns (plain, also for bf16). */
static void
moe_pack_gu_bias(const moe_pack_params *p, moe_experts *w)
{
    const int width = w->gated ? w->nr / 2 : w->nr;
    int64_t e, c;
    int j;

    for (e = 0; e < w->n_experts; e++) {
        for (c = 0; c < w->gu_panels; c++) {
            float *dst = w->gu_bias + (e * w->gu_panels + c) * w->nr;
            for (j = 0; j < w->nr; j++) {
                int is_up = !w->gated || j >= width;
                int64_t unit = c * width + (is_up && w->gated ? j - width : j);
                const float *src = is_up ? p->b_up : p->b_gate;
                dst[j] = unit < w->d_ff && src != NULL ? src[e * w->d_ff + unit]
                                                       : 0.0f;
            }
        }
    }
}

/* Pack experts; linear: p->w_down only, held as a packed linear. */
static moe_status
moe_pack(const moe_pack_params *p, int linear, moe_experts **out)
{
    const moe_kernels *kr = moe_cpu_kernels();
    moe_experts *w;
    moe_pack_job job;
    size_t es = p->dtype == MOE_DTYPE_F32 ? 4 : 2, gu_bytes, down_bytes;
    moe_status st;

    *out = NULL;
    w = moe_alloc(1, sizeof(*w));
    if (w == NULL) {
        return MOE_STATUS_ALLOC;
    }
    memset(w, 0, sizeof(*w));
    w->dtype = p->dtype;
    if (moe_dtype_quantized(p->dtype)) {
        w->group_size = p->group_size;
        /* group_size 0: one scale per row (per output channel) */
        /* group_size 0, or one as long as the row or longer: the row */
        w->group_gu = p->group_size && p->group_size < p->d_model
                          ? p->group_size : p->d_model;
        w->group_down = p->group_size && p->group_size < p->d_ff ? p->group_size
                                                                 : p->d_ff;
        w->group_gu += w->group_gu == 0; /* an empty k: any group */
        w->group_down += w->group_down == 0;
    }
    w->compute = linear ? MOE_COMPUTE_FLOAT32 : p->compute;
    w->bf16_act = w->compute == MOE_COMPUTE_BFLOAT16;
    w->q8_act = w->compute == MOE_COMPUTE_INT8;
    w->nr = kr->nr;
    w->gated = p->w_gate != NULL;
    w->linear = linear;
    w->n_experts = p->n_experts;
    w->d_model = p->d_model;
    w->d_ff = p->d_ff;
    w->gu_panels = linear ? 0 : (p->d_ff + (w->gated ? kr->nr / 2 : kr->nr) -
                                 1) / (w->gated ? kr->nr / 2 : kr->nr);
    if (p->expert_d_ff != NULL && !linear) {
        w->expert_ff = moe_alloc((size_t)p->n_experts, sizeof(int64_t));
        if (w->expert_ff == NULL) {
            free(w);
            return MOE_STATUS_ALLOC;
        }
        memcpy(w->expert_ff, p->expert_d_ff,
               sizeof(int64_t) * (size_t)p->n_experts);
    }
    w->down_panels = (p->d_model + kr->nr - 1) / kr->nr;
    gu_bytes = (size_t)(p->n_experts * w->gu_panels *
                        moe_weight_panel_bytes(w, p->d_model, w->group_gu));
    down_bytes = (size_t)(p->n_experts * w->down_panels *
                          moe_weight_panel_bytes(w, p->d_ff, w->group_down));
    w->gu = moe_alloc_big(gu_bytes, 1);
    w->down = moe_alloc_big(down_bytes, 1);
    if (w->gu == NULL || w->down == NULL) {
        moe_experts_free(w);
        return MOE_STATUS_ALLOC;
    }
    if (moe_dtype_quantized(w->dtype)) {
        /* nibble codes are set one at a time over the bytes they share */
        memset(w->gu, 0, gu_bytes);
        memset(w->down, 0, down_bytes);
    }
    w->nbytes = gu_bytes + down_bytes + sizeof(*w);
    if (p->b_gate != NULL || p->b_up != NULL) {
        w->gu_bias = moe_alloc((size_t)(p->n_experts * w->gu_panels * kr->nr),
                               sizeof(float));
        if (w->gu_bias == NULL) {
            moe_experts_free(w);
            return MOE_STATUS_ALLOC;
        }
        moe_pack_gu_bias(p, w);
        w->nbytes += (size_t)(p->n_experts * w->gu_panels * kr->nr) * sizeof(float);
    }
    if (p->b_down != NULL) {
        w->down_bias = moe_alloc((size_t)(p->n_experts * p->d_model),
                                 sizeof(float));
        if (w->down_bias == NULL) {
            moe_experts_free(w);
            return MOE_STATUS_ALLOC;
        }
        memcpy(w->down_bias, p->b_down,
               sizeof(float) * (size_t)(p->n_experts * p->d_model));
        w->nbytes += (size_t)(p->n_experts * p->d_model) * sizeof(float);
    }
    job.p = p;
    job.w = w;
    job.es = es;
    job.nonfinite = 0;
    /* With d_model or d_ff zero there is nothing to copy (and maybe 2^40
     * empty panels): skip the tasks. */
    st = p->d_model == 0 || p->d_ff == 0
        ? MOE_STATUS_OK
        : moe_pool_run(p->n_experts * (w->gu_panels + w->down_panels),
                       moe_pack_task, &job);
    if (st == MOE_STATUS_OK && job.nonfinite) {
        /* NaN / Inf weights would make every output they touch NaN; the
         * caller names the weight and its first bad index (moe/_api.py) */
        st = moe_set_error(MOE_STATUS_NONFINITE,
                           "an expert weight holds a NaN or Inf value");
    }
    if (st != MOE_STATUS_OK) {
        moe_experts_free(w);
        return st;
    }
    *out = w;
    return MOE_STATUS_OK;
}

moe_status
moe_cpu_experts_pack(const moe_pack_params *p, moe_experts **out)
{
    return moe_pack(p, 0, out);
}

moe_status
moe_cpu_linear_pack(const moe_linear_pack_params *p, moe_experts **out)
{
    moe_pack_params pp;

    memset(&pp, 0, sizeof(pp));
    pp.w_down = p->w;
    pp.dtype = p->dtype;
    pp.n_experts = p->n_groups;
    pp.d_model = p->d_out;
    pp.d_ff = p->d_in;
    pp.b_down = p->bias;
    return moe_pack(&pp, 1, out);
}

void
moe_experts_free(moe_experts *w)
{
    if (w != NULL) {
        free(w->gu);
        free(w->down);
        free(w->gu_bias);
        free(w->down_bias);
        free(w->expert_ff);
        free(w);
    }
}

void
moe_experts_get_info(const moe_experts *w, moe_experts_info *info)
{
    info->n_experts = w->n_experts;
    info->d_model = w->d_model;
    info->d_ff = w->d_ff;
    info->gated = w->gated;
    info->linear = w->linear;
    info->dtype = w->dtype;
    info->compute = w->compute;
    info->group_size = w->group_size;
    info->nbytes = w->nbytes;
}

/* ---- LoRA on expert weights: packing --------------------------------- */

moe_status
moe_cpu_expert_lora_pack(const moe_expert_lora_params *p,
                         const moe_experts *w, moe_expert_lora **out)
{
    const int32_t E = w->n_experts, r = p->rank;
    const int64_t d = w->d_model, F = w->d_ff, nr = w->nr;
    const int64_t ld_gu = w->gu_panels * nr;  /* bank_gu floats per row q */
    const int width = w->gated ? w->nr / 2 : w->nr;
    moe_linear_pack_params lp;
    moe_expert_lora *l;
    float *a_gu = NULL;
    moe_status st = MOE_STATUS_ALLOC;
    int64_t e, q, c, i, n_max;
    int j;

    *out = NULL;
    l = moe_alloc(1, sizeof(*l));
    if (l == NULL) {
        return MOE_STATUS_ALLOC;
    }
    memset(l, 0, sizeof(*l));
    l->experts = w;
    l->rank = r;
    l->n_gu = (p->a_gate ? r : 0) + (p->a_up ? r : 0);
    n_max = l->n_gu > r ? l->n_gu : r;
    l->iota = moe_alloc((size_t)n_max, sizeof(int32_t));
    if (l->iota == NULL) {
        goto fail;
    }
    for (i = 0; i < n_max; i++) {
        l->iota[i] = (int32_t)i;
    }
    memset(&lp, 0, sizeof(lp));
    lp.dtype = MOE_DTYPE_F32;
    lp.n_groups = E;
    if (l->n_gu > 0) {
        /* A: [A_gate; A_up] per expert.  Bank row q: s * B[:, q] in the
         * panel columns of its own half (gate or up), zeros elsewhere. */
        a_gu = moe_alloc((size_t)(E * l->n_gu * d), sizeof(float));
        l->bank_gu = moe_alloc((size_t)(E * l->n_gu * ld_gu), sizeof(float));
        if (!a_gu || !l->bank_gu) {
            goto fail;
        }
        memset(l->bank_gu, 0, sizeof(float) * (size_t)(E * l->n_gu * ld_gu));
        for (e = 0; e < E; e++) {
            for (q = 0; q < l->n_gu; q++) {
                const int is_up = p->a_gate == NULL || q >= r;
                const int64_t qi = q % r;
                const float *a = is_up ? p->a_up : p->a_gate;
                const float *b = (is_up ? p->b_up : p->b_gate) + e * F * r;
                memcpy(a_gu + (e * l->n_gu + q) * d, a + (e * r + qi) * d,
                       sizeof(float) * (size_t)d);
                for (c = 0; c < w->gu_panels; c++) {
                    /* panel c of expert e: (n_gu, nr), row q */
                    float *row = l->bank_gu +
                                 ((e * w->gu_panels + c) * l->n_gu + q) * nr;
                    for (j = 0; j < width; j++) {
                        int64_t unit = c * width + j;
                        int col = w->gated && is_up ? width + j : j;
                        if (unit < F) {
                            row[col] = p->scaling * b[unit * r + qi];
                        }
                    }
                }
            }
        }
        lp.w = a_gu;
        lp.d_in = d;
        lp.d_out = l->n_gu;
        if ((st = moe_cpu_linear_pack(&lp, &l->a_gu)) != MOE_STATUS_OK) {
            goto fail;
        }
        st = MOE_STATUS_ALLOC;
    }
    if (p->a_down != NULL) {
        const size_t n = (size_t)(E * w->down_panels * r * nr);
        l->bank_down = moe_alloc(n, sizeof(float));
        if (l->bank_down == NULL) {
            goto fail;
        }
        memset(l->bank_down, 0, sizeof(float) * n);
        for (e = 0; e < E; e++) {
            for (q = 0; q < r; q++) {
                for (i = 0; i < d; i++) {
                    /* panel i / nr of expert e: (r, nr), row q */
                    l->bank_down[((e * w->down_panels + i / nr) * r + q) * nr +
                                 i % nr] =
                        p->scaling * p->b_down[(e * d + i) * r + q];
                }
            }
        }
        lp.w = p->a_down;
        lp.d_in = F;
        lp.d_out = r;
        if ((st = moe_cpu_linear_pack(&lp, &l->a_down)) != MOE_STATUS_OK) {
            goto fail;
        }
    }
    free(a_gu);
    *out = l;
    return MOE_STATUS_OK;
fail:
    free(a_gu);
    moe_expert_lora_free(l);
    return st;
}

void
moe_expert_lora_free(moe_expert_lora *l)
{
    if (l != NULL) {
        moe_experts_free(l->a_gu);
        moe_experts_free(l->a_down);
        free(l->bank_gu);
        free(l->bank_down);
        free(l->iota);
        free(l);
    }
}

/* ---- the forward pass ------------------------------------------------- */

/* A block of activation panels of one expert times a block of its weight
 * panels. */
typedef struct moe_ffn_task {
    int32_t e;
    int64_t p0, p1; /* activation panels [p0, p1) (global numbering)     */
    int64_t c0, c1; /* weight panels [c0, c1) of expert e                */
} moe_ffn_task;

/*
 * One GEMM over the activation panels: out[r] = in_r @ W_e^T (+ b_e) with W
 * the down panels of w (K = w->d_ff, N = w->d_model), plus a fused
 * low-rank update of bank rows (laid out in column panels like w's).
 */
typedef struct moe_panel_gemm {
    const float       *in;       /* n_panels activation panels of K        */
    int64_t            in_panel; /* floats per panel of in                 */
    const uint8_t     *in_q;     /* int8 compute: the quantized panels     */
    const moe_experts *w;
    float             *out;      /* (n_rows, N)                            */
    const float       *coef;     /* (n_rows, ld_coef) or NULL: no update   */
    int64_t            ld_coef;
    const int32_t     *index;    /* rows of ld_index (0: one shared row)   */
    int64_t            ld_index;
    int                n_terms;
    const float       *bank;     /* panel-major: column panel c of expert e
                                    at bank + e * bank_expert + c * bank_panel,
                                    (rows, nr) k-major                     */
    int64_t            bank_expert;
    int64_t            bank_panel;
} moe_panel_gemm;

/* One forward of a grouped FFN or a grouped linear (w->linear). */
typedef struct moe_ffn_job {
    const moe_kernels    *kr;
    const moe_experts    *w;
    const float          *x;           /* (n_tokens, K of the first GEMM)  */
    const int64_t        *token_index; /* or NULL                          */
    const int64_t        *offsets;     /* (E+1,) sorted rows per expert    */
    moe_act_params        act;
    const moe_expert_lora *lora;       /* or NULL                          */
    float                *z_gu;        /* (n_rows, lora->n_gu)             */
    float                *save_gu;     /* moe_ffn_params.save_gu, or NULL  */
    moe_panel_gemm        gemm;        /* the GEMM phase running now       */
    int                   mr;        /* rows per activation panel: dot_mr
                                        for bf16 compute, MOE_AMX_MR for
                                        q8_tiles, else kr->mr              */
    int                   q8_tiles;  /* int8 compute on kr->q8_tiles      */
    int64_t               x_panel;   /* floats per panel of xp, of hp      */
    int64_t               h_panel;
    int64_t              *panel_off; /* (E+1,) first panel of expert e     */
    int32_t              *panel_e;   /* (n_panels,) expert of each panel   */
    int64_t               n_panels;
    float                *xp;        /* (n_panels, d_model, MR); linear: hp */
    float                *hp;        /* (n_panels, d_ff, MR)               */
    uint8_t              *hq;        /* int8 compute: hp quantized         */
    int64_t               xq_bytes;  /* int8 compute: bytes per panel of   */
    int64_t               hq_bytes;  /*   xp and of hq (cpu/kernels.h)     */
    moe_ffn_task         *tasks;
    int64_t               n_tasks;
} moe_ffn_job;

/* First row and number of valid rows of activation panel P. */
static inline void
moe_panel_rows(const moe_ffn_job *job, int64_t P, int64_t *r0, int *m)
{
    const int32_t e = job->panel_e[P];
    const int64_t end = job->offsets[e + 1];

    *r0 = job->offsets[e] + (P - job->panel_off[e]) * job->mr;
    *m = (int)(end - *r0 < job->mr ? end - *r0 : job->mr);
}

/* dst (d, mr) k-major from mr full rows src[i] (d,). */
static inline __attribute__((always_inline)) void
moe_pack_panel(float *dst, const float *const *src, int64_t d, int mr)
{
    int64_t k;
    int i;

    for (k = 0; k < d; k++) {
        for (i = 0; i < mr; i++) {
            dst[k * mr + i] = src[i][k];
        }
    }
}

/* The unsigned codes' offset of the int8-compute weights (cpu/kernels.h). */
static inline int32_t
moe_q8_offset(const moe_experts *w)
{
    return w->dtype == MOE_DTYPE_INT8 ? 128 : w->dtype == MOE_DTYPE_INT4 ? 8
                                                                          : 12;
}

/*
 * Quantize rows i < m (value k of row i at src[i][k * sk], k < K; sk > 1:
 * a panel's rows, src[i] = src[0] + i) into an int8-compute activation
 * panel of mr rows for weights of this group, in the quad layout or
 * (rowmajor, the tile kernels') the row layout (cpu/kernels.h: moe_q8_*);
 * rows >= m are zeros.  Per row and sub-block (kr->q8_quant): amax =
 * max |v|, q = round_even(v * min(127 / amax, FLT_MAX)) (0 if amax is 0),
 * s = amax / 127 (times 0.5 for mxfp4: its codes are 2 v); a NaN or Inf
 * value makes s NaN (the row's outputs NaN) and its codes 0.
 * moe/reference.py: quantize_activations computes the same q and s.
 */
static void
moe_q8_pack(const moe_kernels *kr, const moe_experts *w, int64_t K,
            int64_t group, const float *const *src, int64_t sk, int m, int mr,
            int rowmajor, uint8_t *dst)
{
    const int32_t off = moe_q8_offset(w);
    const float mult = w->dtype == MOE_DTYPE_MXFP4 ? 0.5f : 1.0f;
    const float *at[MOE_MAX_MR];
    int64_t k0, s0;
    int i;

    memset(dst, 0, (size_t)moe_q8_act_bytes(K, group, mr));
    for (k0 = 0; k0 < K; k0 += group) {
        const int64_t rows = K - k0 < group ? K - k0 : group;
        for (s0 = 0; s0 < rows; s0 += MOE_Q8_BLOCK) {
            const int64_t n = rows - s0 < MOE_Q8_BLOCK ? rows - s0
                                                       : MOE_Q8_BLOCK;
            for (i = 0; i < m; i++) {
                at[i] = src[i] + (k0 + s0) * sk;
            }
            kr->q8_quant(at, sk, m, mr, n, mult, off, rowmajor, dst);
            dst += (8 + 4 * ((n + 3) / 4)) * mr;
        }
    }
}

/*
 * Rows src[i] (i < m, d values, d even) rounded to bf16 into an activation
 * panel of mr rows as the set's dot kernel reads it (moe_dot_layout), rows
 * past m zero: the bf16-compute forward's panels, and the backward's when
 * it recomputes gate and up.
 */
void
moe_pack_dot_panel(const moe_kernels *kr, const float *const *src, int m,
                   int mr, int64_t d, void *dst)
{
    int64_t k;
    int i;

    if (kr->dot_layout == MOE_DOT_TILES) {
        /* blocks of 16 pairs of the mr rows */
        kr->pack_tiles(src, m, mr, d, (uint32_t *)dst);
        return;
    }
    if (kr->dot_layout == MOE_DOT_PAIRS) {
        uint32_t *pairs = dst;
        for (k = 0; k < d; k += 2) {
            for (i = 0; i < mr; i++) {
                pairs[(k / 2) * mr + i] =
                    i < m ? moe_bf16_pair(src[i][k], src[i][k + 1]) : 0;
            }
        }
        return;
    }
    /* the emulated dot kernel: values rounded to bf16, kept as fp32 */
    for (k = 0; k < d; k++) {
        for (i = 0; i < mr; i++) {
            ((float *)dst)[k * mr + i] = i < m ? moe_bf16_value(src[i][k])
                                               : 0.0f;
        }
    }
}

/*
 * Phase 0: gather the rows of panel P into xp, k-major, zero padded (a
 * linear's rows go straight to hp, the input of its one GEMM).  bf16
 * compute: the values rounded to bf16, laid out as the set's dot kernel
 * reads them (moe_dot_layout).
 */
static void
moe_ffn_pack_rows(void *ctx, int64_t P)
{
    const moe_ffn_job *job = ctx;
    const int mr = job->mr;
    const int64_t d = job->w->linear ? job->w->d_ff : job->w->d_model;
    float *dst = job->w->linear ? job->hp + P * job->h_panel
                                : job->xp + P * job->x_panel;
    const float *src[MOE_MAX_MR];
    int64_t r0, k;
    int m, i;

    moe_panel_rows(job, P, &r0, &m);
    for (i = 0; i < MOE_MAX_MR; i++) {
        int64_t r = r0 + (i < m ? i : 0);
        src[i] = job->x + (job->token_index ? job->token_index[r] : r) * d;
    }
    if (job->w->q8_act) {
        moe_q8_pack(job->kr, job->w, d, job->w->group_gu, src, 1, m, mr,
                    job->q8_tiles, (uint8_t *)job->xp + P * job->xq_bytes);
        return;
    }
    if (job->w->bf16_act) {
        moe_pack_dot_panel(job->kr, src, m, mr, d, dst);
        return;
    }
    if (m == mr) {
        /* k outer: mr read streams, one sequential write stream; the
         * kernel sets' row counts as constants, so the rows unroll */
        switch (mr) {
        case 4:  moe_pack_panel(dst, src, d, 4);  return;
        case 6:  moe_pack_panel(dst, src, d, 6);  return;
        case 12: moe_pack_panel(dst, src, d, 12); return;
        default: moe_pack_panel(dst, src, d, mr); return;
        }
    }
    /* a part panel (decode: often one or two rows): zeros, then the rows */
    memset(dst, 0, sizeof(float) * (size_t)(d * mr));
    for (i = 0; i < m; i++) {
        const float *s = src[i];
        for (k = 0; k < d; k++) {
            dst[k * mr + i] = s[k];
        }
    }
}

/*
 * The part of weight panel `next` (bytes long, NULL: none) that the kernel
 * call on activation panel p of n (over K steps) prefetches: the panel cut
 * in n slices, one line every K / slice-lines steps.  Each weight panel is
 * read from memory once per task and then reused from cache for the other
 * n - 1 activation panels; fetched this way, it streams in while the
 * previous panel computes instead of stalling its first call.
 */
static inline moe_prefetch
moe_prefetch_slice(const char *next, int64_t bytes, int64_t K, int64_t p,
                   int64_t n)
{
    moe_prefetch pf = {NULL, 1};
    const int64_t lines = (bytes + 63) / 64, per = (lines + n - 1) / n;

    /* n = 1 (a few tokens): the hardware prefetcher streams the panels, a
     * second stream only slows it (measured: 12.3 -> 11.5 GB/s, one core) */
    if (next != NULL && n > 1 && K > 0 && p * per < lines) {
        pf.at = next + p * per * 64;
        pf.every = per >= K ? 1 : (int)(K / per);
    }
    return pf;
}

/* A fp32 panel of K rows to widen task's quantized weight panels into when
 * it has several activation panels (else, or out of memory, NULL: the
 * kernels dequantize in registers, to the same values). */
static float *
moe_wide_panel(const moe_kernels *kr, const moe_experts *w,
               const moe_ffn_task *task, int64_t K)
{
    if (kr->dequant[w->dtype] == NULL || w->q8_act ||
        task->p1 - task->p0 < 2) {
        return NULL;
    }
    return moe_workspace(MOE_WS_DEQUANT, (size_t)(K * w->nr), sizeof(float));
}

/* Int8 compute, between phases 1 and 2: hidden panel P quantized into hq
 * (over the expert's own units). */
static void
moe_ffn_quantize_hidden(void *ctx, int64_t P)
{
    const moe_ffn_job *job = ctx;
    const moe_experts *w = job->w;
    const int mr = job->mr;
    const float *h = job->hp + P * job->h_panel;
    const float *src[MOE_MAX_MR];
    const int32_t e = job->panel_e[P];
    int64_t r0;
    int m, i;

    moe_panel_rows(job, P, &r0, &m);
    for (i = 0; i < mr; i++) {
        src[i] = h + i;
    }
    moe_q8_pack(job->kr, w, w->expert_ff ? w->expert_ff[e] : w->d_ff,
                w->group_down, src, mr, m, mr, job->q8_tiles,
                job->hq + P * job->hq_bytes);
}

/* The pre-activations of tile rows [r0, r0 + m), units c * width + j (j <
 * n_units), into save_gu: the tile plus the bias, as the activation (and the
 * backward) sees them. */
static void
moe_ffn_save_gu(const moe_ffn_job *job, const float *tile, int m, int64_t r0,
                int64_t c, int n_units, const float *bias)
{
    const moe_experts *w = job->w;
    const int nr = w->nr, width = w->gated ? nr / 2 : nr;
    const int64_t F = w->d_ff, ld = w->gated ? 2 * F : F;
    int i, j, half;

    for (i = 0; i < m; i++) {
        float *row = job->save_gu + (r0 + i) * ld + c * width;
        for (half = 0; half < (w->gated ? 2 : 1); half++) {
            const float *t = tile + i * nr + half * width;
            const float *b = bias ? bias + half * width : NULL;
            float *o = row + half * F;
            for (j = 0; j < n_units; j++) {
                o[j] = b ? t[j] + b[j] : t[j];
            }
        }
    }
}

/*
 * Tile sets (kr->dot_acc): the activation panels of a task times one weight
 * panel b of Kp pairs, into acc (one MOE_AMX_MR x nr tile per panel), k in
 * blocks of MOE_TILE_KB pairs, every panel per block, so that the block of
 * b (16 KiB) is read from L2 once and from L1 for the other panels; the
 * calls bring `next` (bytes long) to L2 as moe_prefetch_slice spreads it.
 * The tiles stay in acc (rows of nr floats) between blocks: accumulating in
 * the output rows instead (rows of d floats, 4 KiB apart at d 1024: one
 * cache set) made the down GEMM 1.2-1.4x slower on qwen3 / deepseek-small.
 * out (or NULL): the last block of a whole panel (MOE_AMX_MR rows) stores
 * there, at row r0 of ld_out floats, instead of in acc (a copy from acc
 * took 15-23% of qwen3-small's forward at 2048 tokens).
 * Measured, one core, 6 panels of 512 pairs (d 1024) from L2: 1.65
 * TFLOP/s in one pass over k, 2.3 in blocks of 128 pairs (64: 1.8).
 */
#define MOE_TILE_KB  128

/* Whether a GEMM of job on weights w runs as tile sets (bf16 compute on a
 * dot_acc set). */
static inline int
moe_ffn_tiles(const moe_ffn_job *job, const moe_experts *w)
{
    return w->bf16_act && job->kr->dot_acc != NULL;
}
/* The int8-compute kernel of job on weights w (NULL: not int8 compute). */
static inline moe_q8_fn
moe_ffn_q8(const moe_ffn_job *job, const moe_experts *w)
{
    return !w->q8_act ? NULL
         : job->q8_tiles ? job->kr->q8_tiles[w->dtype] : job->kr->q8[w->dtype];
}
#define MOE_TILE_ACC(rows) (((rows) + MOE_AMX_MR - 1) / MOE_AMX_MR * \
                            MOE_AMX_MR * MOE_MAX_NR)

static void
moe_tiles_gemm(const moe_ffn_job *job, const moe_ffn_task *task,
               const float *in, int64_t in_panel, const void *b, int64_t Kp,
               float *acc, float *out, int64_t ld_out, const char *next,
               int64_t next_bytes)
{
    const int64_t n = task->p1 - task->p0;
    const int64_t nkb = (Kp + MOE_TILE_KB - 1) / MOE_TILE_KB;
    const int nr = job->w->nr;
    int64_t kb, P, r0;
    int m;

    for (kb = 0; kb < nkb; kb++) {
        const int64_t k0 = kb * MOE_TILE_KB;
        const int64_t len = Kp - k0 < MOE_TILE_KB ? Kp - k0 : MOE_TILE_KB;
        for (P = task->p0; P < task->p1; P++) {
            const moe_prefetch pf = moe_prefetch_slice(
                next, next_bytes, len, kb * n + P - task->p0, nkb * n);
            float *t = acc + (P - task->p0) * MOE_AMX_MR * nr;
            int direct;
            moe_panel_rows(job, P, &r0, &m);
            direct = out != NULL && m == MOE_AMX_MR && kb == nkb - 1;
            job->kr->dot_acc((const uint32_t *)(in + P * in_panel) +
                                 k0 * job->mr,
                             (const uint32_t *)b + k0 * nr, len, m,
                             kb > 0 ? t : NULL,
                             direct ? out + r0 * ld_out : t,
                             direct ? ld_out : nr, pf);
        }
    }
}

/*
 * c (m rows of nr floats) = activation panel a (Kp pairs, the set's dot
 * layout) times weight panel b: tile sets in the k blocks of
 * moe_tiles_gemm, each continuing from c (the forward's order, so its
 * bits; the caller has loaded the tile configuration), else one dot call.
 */
void
moe_dot_panel(const moe_kernels *kr, const void *a, const void *b,
              int64_t Kp, int m, int nr, float *c)
{
    const moe_prefetch none = {NULL, 0};
    int64_t k0;

    if (kr->dot_acc == NULL) {
        kr->dot(a, b, Kp, m, c, nr, none);
        return;
    }
    for (k0 = 0; k0 < Kp; k0 += MOE_TILE_KB) {
        const int64_t len = Kp - k0 < MOE_TILE_KB ? Kp - k0 : MOE_TILE_KB;
        kr->dot_acc((const uint32_t *)a + k0 * kr->dot_mr,
                    (const uint32_t *)b + k0 * nr, len, m, k0 > 0 ? c : NULL,
                    c, nr, none);
    }
}

/* Phase 1: gate/up panels (+ LoRA) -> activation -> hidden panels (hp). */
static void
moe_ffn_up_task(void *ctx, int64_t t)
{
    const moe_ffn_job *job = ctx;
    const moe_ffn_task *task = &job->tasks[t];
    const moe_experts *w = job->w;
    const moe_expert_lora *lora = job->lora;
    const int mr = job->mr, nr = w->nr;
    const int width = w->gated ? nr / 2 : nr;
    const moe_ukr_fn ukr = job->kr->ukr[w->dtype];
    const int layout = w->bf16_act ? job->kr->dot_layout : -1;
    const int64_t d = w->d_model, F = w->d_ff;
    const int64_t panel = moe_weight_panel_bytes(w, d, w->group_gu);
    float one[MOE_MAX_MR * MOE_MAX_NR];
    float hb[MOE_MAX_MR * MOE_MAX_NR]; /* bf16 compute: h before rounding */
    /* tile sets: every activation panel's tile, computed in k blocks */
    const int tiles = moe_ffn_tiles(job, w);
    float acc[MOE_TILE_ACC(MOE_TILE_UP_ROWS)] __attribute__((aligned(64)));
    int64_t c, P, r0;
    int m, n_units;

    const int64_t ff = w->expert_ff ? w->expert_ff[task->e] : F;
    /* quantized weights serving several activation panels: widened once
     * (same values, so the same bits) for the fp32 kernel */
    float *wide = moe_wide_panel(job->kr, w, task, d);
    const moe_ukr_fn run = wide ? job->kr->ukr[MOE_WTYPE_F32] : ukr;
    const moe_q8_fn q8 = moe_ffn_q8(job, w);

    if ((w->bf16_act || job->q8_tiles) && job->kr->tile_begin != NULL) {
        job->kr->tile_begin();
    }
    /* The weight panel outside: it is read from memory once per task and
     * reused from cache for every activation panel of the block. */
    for (c = task->c0; c < task->c1; c++) {
        const char *b = (const char *)w->gu +
                        (task->e * w->gu_panels + c) * panel;
        const void *bk = b;
        if (wide != NULL) {
            job->kr->dequant[w->dtype](b, d, w->group_gu, wide);
            bk = wide;
        }
        /* the passes over panel c bring panel c + 1 to L2 */
        const char *next = c + 1 < task->c1 ? b + panel : NULL;
        if (tiles) {
            moe_tiles_gemm(job, task, job->xp, job->x_panel, b, d / 2, acc,
                           NULL, 0, next, panel);
        }
        for (P = task->p0; P < task->p1; P++) {
            float *h = job->hp + P * job->h_panel;
            const float *xp = job->xp + P * job->x_panel;
            const int64_t K = w->bf16_act ? d / 2 : d;
            const moe_prefetch pf = moe_prefetch_slice(
                next, panel, w->q8_act ? (d + 3) / 4 : K, P - task->p0,
                task->p1 - task->p0);
            float *tile = tiles ? acc + (P - task->p0) * MOE_AMX_MR * nr
                                : one;
            moe_panel_rows(job, P, &r0, &m);
            if (tiles) {
                /* computed above */
            }
            else if (w->q8_act) {
                q8((const uint8_t *)job->xp + P * job->xq_bytes, b, d,
                   w->group_gu, m, tile, nr, pf);
            }
            else if (w->bf16_act) {
                job->kr->dot(xp, b, K, m, tile, nr, pf);
            }
            else {
                run(xp, bk, K, w->group_gu, m, tile, nr, pf);
            }
            if (lora != NULL && lora->n_gu > 0) {
                job->kr->lowrank(tile, nr, m, nr, job->z_gu + r0 * lora->n_gu,
                                 lora->n_gu, lora->iota, 0, lora->n_gu,
                                 lora->bank_gu + (task->e * w->gu_panels + c) *
                                     lora->n_gu * nr, nr);
            }
            n_units = ff - c * width < width ? (int)(ff - c * width) : width;
            if (job->save_gu != NULL) {
                moe_ffn_save_gu(job, tile, m, r0, c, n_units,
                                w->gu_bias ? w->gu_bias +
                                    (task->e * w->gu_panels + c) * nr : NULL);
            }
            if (layout == MOE_DOT_TILES) {
                /* units c * width + j rounded to bf16, as pairs in their
                 * tile block (width and n_units even) */
                job->kr->epilogue_tiles(
                    (int)job->act.activation, w->gated, tile, m, n_units,
                    w->gu_bias ? w->gu_bias + (task->e * w->gu_panels + c) * nr
                               : NULL,
                    job->act.alpha, job->act.limit,
                    (uint32_t *)h + moe_tile_pair(c * width / 2, 0, mr));
                continue;
            }
            job->kr->epilogue((int)job->act.activation, w->gated, tile, m,
                              n_units,
                              w->gu_bias ? w->gu_bias +
                                  (task->e * w->gu_panels + c) * nr : NULL,
                              job->act.alpha, job->act.limit,
                              layout == MOE_DOT_PAIRS ? hb : h + c * width * mr,
                              mr);
            if (w->bf16_act) {
                /* units c * width + j rounded to bf16: as pairs (width and
                 * n_units even) or in place as fp32 values */
                uint32_t *pairs = (uint32_t *)h + (c * width / 2) * mr;
                float *hv = h + c * width * mr;
                int i, j;
                for (j = 0; j < n_units; j += 2) {
                    for (i = 0; i < m; i++) {
                        if (layout == MOE_DOT_PAIRS) {
                            pairs[(j / 2) * mr + i] = moe_bf16_pair(
                                hb[j * mr + i], hb[(j + 1) * mr + i]);
                        }
                        else {
                            hv[j * mr + i] = moe_bf16_value(hv[j * mr + i]);
                            hv[(j + 1) * mr + i] =
                                moe_bf16_value(hv[(j + 1) * mr + i]);
                        }
                    }
                }
            }
        }
    }
    if ((w->bf16_act || job->q8_tiles) && job->kr->tile_end != NULL) {
        job->kr->tile_end();
    }
}

/* The GEMM phases: activation panels times down panels -> sorted rows. */
static void
moe_ffn_gemm_task(void *ctx, int64_t t)
{
    const moe_ffn_job *job = ctx;
    const moe_ffn_task *task = &job->tasks[t];
    const moe_panel_gemm *g = &job->gemm;
    const moe_experts *w = g->w;
    const int nr = w->nr;
    const moe_ukr_fn ukr = job->kr->ukr[w->dtype];
    const int64_t d = w->d_model, F = w->d_ff;
    const int64_t panel = moe_weight_panel_bytes(w, F, w->group_down);
    /* heterogeneous experts: the units past expert_ff[e] are skipped */
    const int64_t K = w->expert_ff ? w->expert_ff[task->e] : F;
    const int64_t k_bytes = moe_weight_panel_bytes(w, K, w->group_down);
    float *wide = moe_wide_panel(job->kr, w, task, K);
    const moe_ukr_fn run = wide ? job->kr->ukr[MOE_WTYPE_F32] : ukr;
    const moe_q8_fn q8 = moe_ffn_q8(job, w);
    float one[MOE_MAX_MR * MOE_MAX_NR];
    /* tile sets: every activation panel's tile, computed in k blocks */
    const int tiles = moe_ffn_tiles(job, w);
    float acc[MOE_TILE_ACC(MOE_TASK_ROWS)] __attribute__((aligned(64)));
    int64_t c, P, r0;
    int m, i, j;

    if ((w->bf16_act || job->q8_tiles) && job->kr->tile_begin != NULL) {
        job->kr->tile_begin();
    }
    for (c = task->c0; c < task->c1; c++) {
        const char *b = (const char *)w->down +
                        (task->e * w->down_panels + c) * panel;
        /* the passes over panel c bring panel c + 1 to L2 */
        const char *next = c + 1 < task->c1 ? b + panel : NULL;
        const void *bk = b;
        if (wide != NULL) {
            job->kr->dequant[w->dtype](b, K, w->group_down, wide);
            bk = wide;
        }
        if (tiles) {
            moe_tiles_gemm(job, task, g->in, g->in_panel, b, K / 2, acc,
                           c * nr + nr <= d ? g->out + c * nr : NULL, d, next,
                           k_bytes);
        }
        for (P = task->p0; P < task->p1; P++) {
            const int n_cols = d - c * nr < nr ? (int)(d - c * nr) : nr;
            const moe_prefetch pf = moe_prefetch_slice(
                next, k_bytes, w->bf16_act ? K / 2 : w->q8_act ? (K + 3) / 4
                                                               : K,
                P - task->p0, task->p1 - task->p0);
            const float *in = g->in + P * g->in_panel;
            /* whole panels of columns go straight into the output rows
             * (the tile sets': of whole panels of rows, moe_tiles_gemm);
             * the rest through a tile */
            int direct;
            float *y, *tile = tiles ? acc + (P - task->p0) * MOE_AMX_MR * nr
                                    : one;
            moe_panel_rows(job, P, &r0, &m);
            direct = n_cols == nr && (!tiles || m == MOE_AMX_MR);
            y = g->out + r0 * d + c * nr;
            if (tiles) {
                /* computed above */
            }
            else if (w->q8_act) {
                q8(g->in_q + P * job->hq_bytes, b, K, w->group_down, m,
                   direct ? y : tile, direct ? d : nr, pf);
            }
            else if (w->bf16_act) {
                /* bf16 compute: the hidden panel as the dot kernel reads it */
                job->kr->dot(in, b, K / 2, m, direct ? y : tile,
                             direct ? d : nr, pf);
            }
            else {
                run(in, bk, K, w->group_down, m, direct ? y : tile,
                    direct ? d : nr, pf);
            }
            if (!direct) {
                for (i = 0; i < m; i++) {
                    memcpy(y + i * d, tile + i * nr,
                           sizeof(float) * (size_t)n_cols);
                }
            }
            if (w->down_bias != NULL) {
                /* (h W^T) + b, in that order, as the frameworks compute it. */
                const float *bias = w->down_bias + task->e * d + c * nr;
                for (i = 0; i < m; i++) {
                    for (j = 0; j < n_cols; j++) {
                        y[i * d + j] += bias[j];
                    }
                }
            }
            if (g->coef != NULL && g->n_terms > 0) {
                job->kr->lowrank(y, d, m, n_cols, g->coef + r0 * g->ld_coef,
                                 g->ld_coef, g->index + r0 * g->ld_index,
                                 g->ld_index, g->n_terms,
                                 g->bank + task->e * g->bank_expert +
                                     c * g->bank_panel, nr);
            }
        }
    }
    if ((w->bf16_act || job->q8_tiles) && job->kr->tile_end != NULL) {
        job->kr->tile_end();
    }
}

/* Cut every expert's (panels x weight panels) grid into tasks; col_panels
 * -1: each expert's own gate/up panels. */
static int64_t
moe_ffn_plan(moe_ffn_job *job, int64_t col_panels, moe_ffn_task *tasks)
{
    int64_t rows = MOE_TASK_ROWS, n = 0, p0, c0;
    int64_t rows_per;
    int32_t e;

    if (col_panels < 0 && moe_ffn_tiles(job, job->w)) {
        /* tile sets' gate/up: bf16 rows of d_model, 2 bytes each */
        const int64_t fit = MOE_TILE_UP_BYTES /
                            (2 * (job->w->d_model > 0 ? job->w->d_model : 1));
        rows = fit < MOE_TASK_ROWS ? MOE_TASK_ROWS
             : fit > MOE_TILE_UP_ROWS ? MOE_TILE_UP_ROWS : fit;
    }
    rows_per = (rows + job->mr - 1) / job->mr;

    for (e = 0; e < job->w->n_experts; e++) {
        int64_t cols = col_panels;
        if (col_panels < 0) {
            /* the gate/up panels of expert e (fewer for a smaller expert) */
            const moe_experts *w = job->w;
            const int width = w->gated ? w->nr / 2 : w->nr;
            cols = w->expert_ff ? (w->expert_ff[e] + width - 1) / width
                                : w->gu_panels;
        }
        for (p0 = job->panel_off[e]; p0 < job->panel_off[e + 1];
             p0 += rows_per) {
            int64_t p1 = p0 + rows_per < job->panel_off[e + 1]
                             ? p0 + rows_per : job->panel_off[e + 1];
            for (c0 = 0; c0 < cols; c0 += MOE_TASK_PANELS) {
                if (tasks != NULL) {
                    tasks[n].e = e;
                    tasks[n].p0 = p0;
                    tasks[n].p1 = p1;
                    tasks[n].c0 = c0;
                    tasks[n].c1 = c0 + MOE_TASK_PANELS < cols
                                      ? c0 + MOE_TASK_PANELS : cols;
                }
                n++;
            }
        }
    }
    return n;
}

/* Run one GEMM phase (g: its spec) over every expert's panels. */
static moe_status
moe_ffn_gemm(moe_ffn_job *job, const moe_panel_gemm *g)
{
    job->gemm = *g;
    job->n_tasks = moe_ffn_plan(job, g->w->down_panels, job->tasks);
    return moe_pool_run(job->n_tasks, moe_ffn_gemm_task, job);
}

/* Rows of an empty inner dimension: the bias (or 0) plus the update. */
static void
moe_ffn_bias_rows(const moe_ffn_job *job, const moe_panel_gemm *g)
{
    const moe_kernels *kr = moe_cpu_kernels();
    const moe_experts *w = g->w;
    const int64_t d = w->d_model, nr = w->nr;
    int64_t r0, c, j;
    int32_t e;
    int m, i;

    for (e = 0; e < w->n_experts; e++) {
        for (r0 = job->offsets[e]; r0 < job->offsets[e + 1]; r0 += m) {
            m = job->offsets[e + 1] - r0 < kr->mr ? (int)(job->offsets[e + 1] -
                                                          r0) : kr->mr;
            for (c = 0; c * nr < d; c++) {
                const int n_cols = d - c * nr < nr ? (int)(d - c * nr) : (int)nr;
                float *y = g->out + r0 * d + c * nr;
                for (i = 0; i < m; i++) {
                    for (j = 0; j < n_cols; j++) {
                        y[i * d + j] = w->down_bias
                            ? w->down_bias[e * d + c * nr + j] : 0.0f;
                    }
                }
                if (g->coef != NULL && g->n_terms > 0) {
                    kr->lowrank(y, d, m, n_cols, g->coef + r0 * g->ld_coef,
                                g->ld_coef, g->index + r0 * g->ld_index,
                                g->ld_index, g->n_terms,
                                g->bank + e * g->bank_expert +
                                    c * g->bank_panel, nr);
                }
            }
        }
    }
}

/* Floats per activation panel of K values a row (job->mr rows). */
static int64_t
moe_act_panel(const moe_ffn_job *job, int64_t K)
{
    if (job->w->bf16_act && job->kr->dot_layout == MOE_DOT_TILES) {
        return moe_tile_panel_pairs(K / 2, job->mr);
    }
    return K * job->mr;
}

/*
 * The phases: pack rows; [LoRA shrink of x]; gate/up + activation;
 * [LoRA shrink of h]; down (a linear runs only its one GEMM).  final: the
 * spec of the last GEMM (its in, w and update are filled in here for the
 * FFN).
 */
static moe_status
moe_ffn_run(moe_ffn_job *job, moe_panel_gemm *final, int64_t n_rows)
{
    const moe_experts *w = job->w;
    const moe_expert_lora *lora = job->lora;
    moe_status st = MOE_STATUS_ALLOC;
    float *z_down = NULL;
    int64_t n_up, n_down, P;
    int32_t e;

    if (n_rows == 0 || w->d_model == 0) {
        return MOE_STATUS_OK;
    }
    if (w->d_ff == 0) {
        /* No hidden units: h is empty, and so is any LoRA on it. */
        moe_ffn_bias_rows(job, final);
        return MOE_STATUS_OK;
    }
    job->kr = moe_cpu_kernels();
    /* int8 compute on tiles where the set has them and the experts average
     * MOE_Q8_TILE_ROWS_* rows (fewer: decode, bound by the weights' bytes,
     * where 32-row tiles would mostly multiply zeros) */
    job->q8_tiles = w->q8_act && job->kr->q8_tiles[w->dtype] != NULL &&
                    n_rows >= (w->dtype == MOE_DTYPE_INT8
                                   ? MOE_Q8_TILE_ROWS_INT8
                                   : MOE_Q8_TILE_ROWS_4BIT) * w->n_experts;
    job->mr = w->bf16_act ? job->kr->dot_mr
            : job->q8_tiles ? MOE_AMX_MR : job->kr->mr;
    job->x_panel = moe_act_panel(job, w->d_model);
    job->h_panel = moe_act_panel(job, w->d_ff);
    job->panel_off = moe_alloc((size_t)w->n_experts + 1, sizeof(int64_t));
    if (job->panel_off == NULL) {
        goto done;
    }
    job->panel_off[0] = 0;
    for (e = 0; e < w->n_experts; e++) {
        int64_t rows = job->offsets[e + 1] - job->offsets[e];
        job->panel_off[e + 1] = job->panel_off[e] +
                                (rows + job->mr - 1) / job->mr;
    }
    job->n_panels = job->panel_off[w->n_experts];
    n_up = w->linear ? 0 : moe_ffn_plan(job, -1, NULL);
    n_down = moe_ffn_plan(job, w->down_panels, NULL);
    if (lora != NULL) {
        /* the shrinks' GEMMs have ceil(rows of A / nr) column panels */
        int64_t n_s = lora->a_gu ? moe_ffn_plan(job, lora->a_gu->down_panels,
                                                NULL) : 0;
        n_down = n_s > n_down ? n_s : n_down;
        n_s = lora->a_down ? moe_ffn_plan(job, lora->a_down->down_panels,
                                          NULL) : 0;
        n_down = n_s > n_down ? n_s : n_down;
        if (lora->n_gu > 0) {
            job->z_gu = moe_alloc((size_t)(n_rows * lora->n_gu), sizeof(float));
        }
        if (lora->a_down != NULL) {
            z_down = moe_alloc((size_t)(n_rows * lora->rank), sizeof(float));
        }
        if ((lora->n_gu > 0 && !job->z_gu) || (lora->a_down && !z_down)) {
            goto done;
        }
    }
    job->panel_e = moe_alloc((size_t)job->n_panels, sizeof(int32_t));
    if (w->q8_act) {
        /* int8 compute: xp holds the quantized rows; hq the hidden ones */
        job->xq_bytes = moe_q8_act_bytes(w->d_model, w->group_gu, job->mr);
        job->hq_bytes = moe_q8_act_bytes(w->d_ff, w->group_down, job->mr);
        /* (+ 64: a tile's rows may read up to 64 bytes past the last) */
        job->hq = moe_workspace(MOE_WS_PANEL_Q,
                                (size_t)(job->n_panels * job->hq_bytes) + 64,
                                1);
        if (job->hq == NULL) {
            goto done;
        }
    }
    job->xp = w->linear ? NULL
        : w->q8_act ? moe_workspace(MOE_WS_PANEL_X,
                                    (size_t)(job->n_panels * job->xq_bytes) +
                                        64, 1)
        : moe_workspace(MOE_WS_PANEL_X, (size_t)(job->n_panels * job->x_panel),
                        sizeof(float));
    job->hp = moe_workspace(MOE_WS_PANEL_H,
                            (size_t)(job->n_panels * job->h_panel),
                            sizeof(float));
    job->tasks = moe_alloc((size_t)(n_up > n_down ? n_up : n_down),
                           sizeof(moe_ffn_task));
    if (!job->panel_e || (!w->linear && !job->xp) || !job->hp ||
        !job->tasks) {
        goto done;
    }
    for (e = 0; e < w->n_experts; e++) {
        for (P = job->panel_off[e]; P < job->panel_off[e + 1]; P++) {
            job->panel_e[P] = e;
        }
    }

    if ((st = moe_pool_run(job->n_panels, moe_ffn_pack_rows, job)) !=
        MOE_STATUS_OK) {
        goto done;
    }
    if (!w->linear) {
        moe_panel_gemm shrink;
        if (lora != NULL && lora->n_gu > 0) {
            memset(&shrink, 0, sizeof(shrink));
            shrink.in = job->xp;
            shrink.in_panel = job->x_panel;
            shrink.w = lora->a_gu;
            shrink.out = job->z_gu;
            if ((st = moe_ffn_gemm(job, &shrink)) != MOE_STATUS_OK) {
                goto done;
            }
        }
        job->n_tasks = moe_ffn_plan(job, -1, job->tasks);
        if ((st = moe_pool_run(job->n_tasks, moe_ffn_up_task, job)) !=
            MOE_STATUS_OK) {
            goto done;
        }
        if (z_down != NULL) {
            memset(&shrink, 0, sizeof(shrink));
            shrink.in = job->hp;
            shrink.in_panel = job->h_panel;
            shrink.w = lora->a_down;
            shrink.out = z_down;
            if ((st = moe_ffn_gemm(job, &shrink)) != MOE_STATUS_OK) {
                goto done;
            }
            final->coef = z_down;
            final->ld_coef = lora->rank;
            final->index = lora->iota;
            final->ld_index = 0;
            final->n_terms = lora->rank;
            final->bank = lora->bank_down;
            final->bank_expert = w->down_panels * lora->rank * w->nr;
            final->bank_panel = lora->rank * w->nr;
        }
    }
    final->in = job->hp;
    final->in_panel = job->h_panel;
    if (w->q8_act) {
        if ((st = moe_pool_run(job->n_panels, moe_ffn_quantize_hidden, job)) !=
            MOE_STATUS_OK) {
            goto done;
        }
        final->in_q = job->hq;
    }
    st = moe_ffn_gemm(job, final);
done:
    free(job->panel_off);
    free(job->panel_e);
    free(job->tasks);
    free(job->z_gu);
    free(z_down);
    return st;
}

moe_status
moe_cpu_ffn_grouped(const moe_ffn_params *p)
{
    moe_ffn_job job;
    moe_panel_gemm down;

    memset(&job, 0, sizeof(job));
    memset(&down, 0, sizeof(down));
    job.w = p->experts;
    job.x = p->x;
    job.token_index = p->token_index;
    job.offsets = p->offsets;
    job.act = p->act;
    job.lora = p->lora;
    job.save_gu = p->save_gu;
    down.w = p->experts;
    down.out = p->out;
    return moe_ffn_run(&job, &down, p->n_rows);
}

/* Whether rows [0, n) of index (n_terms each) are not all row 0. */
static int
moe_rows_differ(const int32_t *index, int64_t n, int32_t n_terms)
{
    int64_t r;

    for (r = 1; r < n; r++) {
        if (memcmp(index + r * n_terms, index,
                   sizeof(int32_t) * (size_t)n_terms) != 0) {
            return 1;
        }
    }
    return 0;
}

moe_status
moe_cpu_linear_grouped(const moe_linear_params *p)
{
    moe_ffn_job job;
    moe_panel_gemm g;

    memset(&job, 0, sizeof(job));
    memset(&g, 0, sizeof(g));
    job.w = p->weights;
    job.x = p->x;
    job.token_index = p->token_index;
    job.offsets = p->offsets;
    g.w = p->weights;
    g.out = p->out;
    if (p->lowrank != NULL) {
        g.coef = p->lowrank->coef;
        g.ld_coef = p->lowrank->n_terms;
        g.index = p->lowrank->index;
        /* one shared index row (0) when every row's terms are the same */
        g.ld_index = moe_rows_differ(p->lowrank->index, p->n_rows,
                                     p->lowrank->n_terms)
                         ? p->lowrank->n_terms : 0;
        g.n_terms = p->lowrank->n_terms;
        if (g.n_terms > 0) {
            g.bank = p->lowrank->bank->down;
            g.bank_panel = p->lowrank->bank->d_ff * p->lowrank->bank->nr;
        }
    }
    return moe_ffn_run(&job, &g, p->n_rows);
}
