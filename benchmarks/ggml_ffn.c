/*
 * benchmarks/ggml_ffn.c - a baseline for bench_ggml.py: one routed SwiGLU expert FFN
 * (gate, up, down) through ggml's MUL_MAT_ID on its CPU backend, for the tokens and
 * expert ids the caller gives.  Built by bench_ggml.py against a ggml checkout
 * (https://github.com/ggml-org/ggml, not part of moe) as a shared library and called with
 * ctypes, so that its calls interleave with moe's in one process.
 *
 *   x (T, d) float32, ids (T, k) int32  ->  y (T, k, d): each selected expert's output
 *   (the combine, a weighted sum of k rows, is left out: moe's FFN-only timing leaves it
 *   out too).  Weights: random normal, stored as `type` (f32, bf16, q8_0, q4_0, q4_K,
 *   mxfp4, ...) by ggml_quantize_chunk / ggml_fp32_to_bf16_row; a persistent ggml
 *   threadpool of n_threads.  No repacking (ggml's CPU_REPACK buffer type is not used).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-cpu.h"

typedef struct gf_bench {
    struct ggml_context *ctx;
    struct ggml_cgraph *graph;
    struct ggml_tensor *x, *ids, *y;
    struct ggml_threadpool *pool;
    struct ggml_cplan plan;
    int64_t d, T;
    int k;
} gf_bench;

/* Box-Muller normals from a 64-bit LCG: the values only need to be plausible. */
static void
gf_normal(float *out, int64_t n, uint64_t *state)
{
    int64_t i;
    for (i = 0; i < n; i++) {
        double u1, u2;
        *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
        u1 = ((*state >> 11) + 1.0) / 9007199254740994.0;
        *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
        u2 = (*state >> 11) / 9007199254740992.0;
        out[i] = (float)(__builtin_sqrt(-2.0 * __builtin_log(u1)) *
                         __builtin_cos(6.283185307179586 * u2)) * 0.02f;
    }
}

/* w (E experts of rows x cols) stored as w->type: from src (E, rows, cols) float32,
 * else random normals. */
static int
gf_fill(struct ggml_tensor *w, const float *src, int64_t rows, int64_t cols,
        int64_t E, uint64_t *state)
{
    float *tmp = malloc(sizeof(float) * (size_t)(rows * cols));
    int64_t e;
    if (tmp == NULL) {
        return -1;
    }
    for (e = 0; e < E; e++) {
        char *dst = (char *)w->data + e * w->nb[2];
        if (src != NULL) {
            memcpy(tmp, src + e * rows * cols,
                   sizeof(float) * (size_t)(rows * cols));
        }
        else {
            gf_normal(tmp, rows * cols, state);
        }
        if (w->type == GGML_TYPE_F32) {
            memcpy(dst, tmp, sizeof(float) * (size_t)(rows * cols));
        }
        else if (w->type == GGML_TYPE_BF16) {
            ggml_fp32_to_bf16_row(tmp, (ggml_bf16_t *)dst, rows * cols);
        }
        else {
            ggml_quantize_chunk(w->type, tmp, dst, 0, rows, cols, NULL);
        }
    }
    free(tmp);
    return 0;
}

void gf_free(gf_bench *b);

/* w_gate, w_up (E, F, d) and w_down (E, d, F) float32 (nn.Linear layout), or NULL
 * for random weights. */
gf_bench *
gf_new(int type, int64_t d, int64_t F, int64_t E, int k, int64_t T, int n_threads,
       const float *w_gate, const float *w_up, const float *w_down)
{
    const enum ggml_type t = (enum ggml_type)type;
    const size_t wbytes = ggml_row_size(t, d) * (size_t)(F * E) * 2 +
                          ggml_row_size(t, F) * (size_t)(d * E);
    struct ggml_init_params ip;
    struct ggml_tensor *wg, *wu, *wd, *g, *u, *h;
    struct ggml_threadpool_params tp;
    uint64_t state = 12345;
    gf_bench *b = calloc(1, sizeof(*b));

    if (b == NULL || d % ggml_blck_size(t) || F % ggml_blck_size(t)) {
        free(b);
        return NULL;
    }
    ggml_cpu_init();
    ip.mem_size = wbytes + (size_t)(T * (d + 4 * F * k + d * k)) * 4 +
                  (size_t)T * k * 4 + 64 * ggml_tensor_overhead() +
                  ggml_graph_overhead() + (64 << 20);
    ip.mem_buffer = NULL;
    ip.no_alloc = false;
    b->ctx = ggml_init(ip);
    if (b->ctx == NULL) {
        free(b);
        return NULL;
    }
    b->d = d;
    b->T = T;
    b->k = k;
    wg = ggml_new_tensor_3d(b->ctx, t, d, F, E);
    wu = ggml_new_tensor_3d(b->ctx, t, d, F, E);
    wd = ggml_new_tensor_3d(b->ctx, t, F, d, E);
    if (gf_fill(wg, w_gate, F, d, E, &state) || gf_fill(wu, w_up, F, d, E, &state) ||
        gf_fill(wd, w_down, d, F, E, &state)) {
        gf_free(b);
        return NULL;
    }
    b->x = ggml_new_tensor_3d(b->ctx, GGML_TYPE_F32, d, 1, T); /* broadcast */
    b->ids = ggml_new_tensor_2d(b->ctx, GGML_TYPE_I32, k, T);
    g = ggml_mul_mat_id(b->ctx, wg, b->x, b->ids);            /* (F, k, T) */
    u = ggml_mul_mat_id(b->ctx, wu, b->x, b->ids);
    h = ggml_mul(b->ctx, ggml_silu(b->ctx, g), u);
    b->y = ggml_mul_mat_id(b->ctx, wd, h, b->ids);           /* (d, k, T) */
    b->graph = ggml_new_graph(b->ctx);
    ggml_build_forward_expand(b->graph, b->y);
    tp = ggml_threadpool_params_default(n_threads);
    b->pool = ggml_threadpool_new(&tp);
    b->plan = ggml_graph_plan(b->graph, n_threads, b->pool);
    b->plan.work_data = b->plan.work_size ? malloc(b->plan.work_size) : NULL;
    if (b->pool == NULL || (b->plan.work_size && b->plan.work_data == NULL)) {
        gf_free(b);
        return NULL;
    }
    return b;
}

/* x (T, d) float32 and ids (T, k) int32 into the graph's inputs. */
void
gf_set(gf_bench *b, const float *x, const int32_t *ids)
{
    memcpy(b->x->data, x, sizeof(float) * (size_t)(b->T * b->d));
    memcpy(b->ids->data, ids, sizeof(int32_t) * (size_t)(b->T * b->k));
}

/* One forward; y (T, k, d) float32 copied out when y is not NULL. */
int
gf_run(gf_bench *b, float *y)
{
    if (ggml_graph_compute(b->graph, &b->plan) != GGML_STATUS_SUCCESS) {
        return -1;
    }
    if (y != NULL) {
        memcpy(y, b->y->data, sizeof(float) * (size_t)(b->T * b->k * b->d));
    }
    return 0;
}

void
gf_free(gf_bench *b)
{
    if (b == NULL) {
        return;
    }
    if (b->pool != NULL) {
        ggml_threadpool_free(b->pool);
    }
    free(b->plan.work_data);
    ggml_free(b->ctx);
    free(b);
}

/* The ggml type named `name` ("f32", "bf16", "q4_0", "q4_K", "mxfp4", ...), or -1. */
int
gf_type(const char *name)
{
    int t;
    for (t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((enum ggml_type)t);
        if (n != NULL && strcmp(n, name) == 0 && ggml_blck_size((enum ggml_type)t) > 0) {
            return t;
        }
    }
    return -1;
}
