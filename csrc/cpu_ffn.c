/*
 * cpu_ffn.c - the grouped expert FFN on the CPU: for each expert, its rows
 * go through gate/up projections, the activation, and the down projection,
 * in row blocks so the hidden activations stay in cache.  Only routed rows
 * are computed.  The tile kernel comes from cpu_tile_<isa>.c, picked once
 * from cpuid (or forced with MOE_ISA=scalar|avx2|avx512).
 */
#include "moe_impl.h"
#include "cpu_tile.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows per block: the (MOE_FFN_ROWS, d_ff) hidden block stays in L2. */
#define MOE_FFN_ROWS 32

/* ---- ISA choice ------------------------------------------------------- */

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

const char *
moe_cpu_isa(void)
{
    static const char *isa = NULL;
    const char *want, *best = "scalar";

    if (isa != NULL) {
        return isa;
    }
#ifdef MOE_HAVE_X86_TILES
    if (moe_has_feature("avx512f")) {
        best = "avx512";
    }
    else if (moe_has_feature("avx2") && moe_has_feature("fma")) {
        best = "avx2";
    }
#endif
    /* MOE_ISA can lower the choice, never raise it past what the CPU has. */
    want = getenv("MOE_ISA");
    if (want != NULL) {
        if (strcmp(want, "scalar") == 0) {
            best = "scalar";
        }
        else if (strcmp(want, "avx2") == 0 && strcmp(best, "avx512") == 0) {
            best = "avx2";
        }
    }
    isa = best;
    return isa;
}

static moe_tile_fn
moe_cpu_tile(void)
{
    const char *isa = moe_cpu_isa();

#ifdef MOE_HAVE_X86_TILES
    if (strcmp(isa, "avx512") == 0) {
        return moe_cpu_tile_avx512;
    }
    if (strcmp(isa, "avx2") == 0) {
        return moe_cpu_tile_avx2;
    }
#endif
    (void)isa;
    return moe_cpu_tile_scalar;
}

/* ---- activations ------------------------------------------------------ */

static inline float
moe_silu(float z)
{
    return z / (1.0f + expf(-z));
}

static inline float
moe_gelu(float z)
{
    return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
}

static inline float
moe_gelu_tanh(float z)
{
    const float c = 0.79788456080286536f; /* sqrt(2 / pi) */
    return 0.5f * z * (1.0f + tanhf(c * (z + 0.044715f * z * z * z)));
}

static inline float
moe_activate(moe_activation act, float gate, float up)
{
    switch (act) {
    case MOE_ACTIVATION_SWIGLU:     return moe_silu(gate) * up;
    case MOE_ACTIVATION_GEGLU:      return moe_gelu(gate) * up;
    case MOE_ACTIVATION_GEGLU_TANH: return moe_gelu_tanh(gate) * up;
    case MOE_ACTIVATION_GELU:       return moe_gelu(up);
    case MOE_ACTIVATION_GELU_TANH:  return moe_gelu_tanh(up);
    case MOE_ACTIVATION_RELU:       return up > 0.0f ? up : 0.0f;
    case MOE_ACTIVATION_SILU:       return moe_silu(up);
    }
    return 0.0f;
}

/* ---- one expert, one block of rows ------------------------------------ */

/*
 * Rows past the end of a tile repeat the last valid row and their results
 * are dropped: each element is computed the same way wherever it falls.
 */
static void
moe_tile_rows(const float *base, int64_t ld, int64_t i, int64_t n,
              const float *rows[MOE_TILE_MR])
{
    int r;

    for (r = 0; r < MOE_TILE_MR; r++) {
        int64_t ii = i + r < n ? i + r : n - 1;
        rows[r] = base + ii * ld;
    }
}

static void
moe_ffn_block(moe_tile_fn tile, const moe_ffn_params *p, int32_t e,
              const float *x, int64_t m, float *h, float *y)
{
    const int64_t d = p->d_model, F = p->d_ff;
    const float *wg = p->w_gate ? p->w_gate + (int64_t)e * F * d : NULL;
    const float *wu = p->w_up + (int64_t)e * F * d;
    const float *wd = p->w_down + (int64_t)e * d * F;
    const int gated = moe_activation_is_gated(p->activation);
    const float *a[MOE_TILE_MR], *b[MOE_TILE_NR];
    float out[MOE_TILE_MR][MOE_TILE_NR];
    int64_t i, f, o;
    int r, j;

    /* Up (and gate): a gated tile pairs 2 gate rows with the same 2 up rows. */
    for (f = 0; f < F; f += gated ? 2 : MOE_TILE_NR) {
        if (gated) {
            int64_t f1 = f + 1 < F ? f + 1 : f;
            b[0] = wg + f * d;
            b[1] = wg + f1 * d;
            b[2] = wu + f * d;
            b[3] = wu + f1 * d;
        }
        else {
            moe_tile_rows(wu, d, f, F, b);
        }
        for (i = 0; i < m; i += MOE_TILE_MR) {
            moe_tile_rows(x, d, i, m, a);
            tile(a, b, d, out);
            for (r = 0; r < MOE_TILE_MR && i + r < m; r++) {
                float *hr = h + (i + r) * F;
                if (gated) {
                    hr[f] = moe_activate(p->activation, out[r][0], out[r][2]);
                    if (f + 1 < F) {
                        hr[f + 1] = moe_activate(p->activation, out[r][1],
                                                 out[r][3]);
                    }
                }
                else {
                    for (j = 0; j < MOE_TILE_NR && f + j < F; j++) {
                        hr[f + j] = moe_activate(p->activation, 0.0f,
                                                 out[r][j]);
                    }
                }
            }
        }
    }
    /* Down: y = h @ w_down^T. */
    for (o = 0; o < d; o += MOE_TILE_NR) {
        moe_tile_rows(wd, F, o, d, b);
        for (i = 0; i < m; i += MOE_TILE_MR) {
            moe_tile_rows(h, F, i, m, a);
            tile(a, b, F, out);
            for (r = 0; r < MOE_TILE_MR && i + r < m; r++) {
                for (j = 0; j < MOE_TILE_NR && o + j < d; j++) {
                    y[(i + r) * d + o + j] = out[r][j];
                }
            }
        }
    }
}

moe_status
moe_cpu_ffn_grouped(const moe_ffn_params *p)
{
    const moe_tile_fn tile = moe_cpu_tile();
    float *h;
    int32_t e;

    if (p->n_rows == 0) {
        return MOE_STATUS_OK;
    }
    h = moe_alloc((size_t)MOE_FFN_ROWS * (size_t)p->d_ff, sizeof(float));
    if (h == NULL) {
        return MOE_STATUS_ALLOC;
    }
    for (e = 0; e < p->n_experts; e++) {
        int64_t r0;
        for (r0 = p->offsets[e]; r0 < p->offsets[e + 1]; r0 += MOE_FFN_ROWS) {
            int64_t m = p->offsets[e + 1] - r0;
            m = m < MOE_FFN_ROWS ? m : MOE_FFN_ROWS;
            if (p->d_ff == 0) {
                memset(p->out + r0 * p->d_model, 0,
                       sizeof(float) * (size_t)(m * p->d_model));
                continue;
            }
            moe_ffn_block(tile, p, e, p->x + r0 * p->d_model, m, h,
                          p->out + r0 * p->d_model);
        }
    }
    free(h);
    return MOE_STATUS_OK;
}
