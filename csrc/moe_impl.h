/*
 * moe_impl.h - private helpers shared by the C core: error recording,
 * checked allocation, and the CPU implementations behind csrc/ops/backend.c.
 * Not installed; nothing outside csrc/ includes it.
 */
#ifndef MOE_IMPL_H
#define MOE_IMPL_H

#include "moe.h"

#include <stdlib.h>

/* Record a printf-style message as this thread's last error; returns st. */
moe_status moe_set_error(moe_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Evaluate a moe_status expression and return it from the caller on error. */
#define MOE_TRY(expr)                                                       \
    do {                                                                    \
        moe_status moe_try_st_ = (expr);                                    \
        if (moe_try_st_ != MOE_STATUS_OK) {                                 \
            return moe_try_st_;                                             \
        }                                                                   \
    } while (0)

/* malloc of count * size bytes with overflow check; NULL sets the error. */
void *moe_alloc(size_t count, size_t size);
/* moe_alloc for big long-lived buffers (packed weights): 2 MiB aligned, huge
 * pages advised where the OS offers them; freed with free(). */
void *moe_alloc_big(size_t count, size_t size);

/* Softmax of one float64 row into prob (n,) (max subtracted: exp of
 * non-positive numbers only); returns its log-sum-exp (csrc/cpu/route.c). */
double moe_softmax_f64(const double *logit, int32_t n, double *prob);
/* dl (n,) += the softmax's backward for gradient g of its output p:
 * p * (g - <g, p>) (csrc/cpu/route_backward.c). */
void   moe_softmax_backward_f64(const double *p, const double *g, int32_t n,
                                double *dl);

/* A weight's strides (moe_wstrides) with all zero read as dense rows x
 * cols, so every user indexes through them. */
static inline moe_wstrides
moe_wst(moe_wstrides s, int64_t rows, int64_t cols)
{
    if (s.expert == 0 && s.row == 0 && s.col == 0) {
        s.expert = rows * cols;
        s.row = cols;
        s.col = 1;
    }
    return s;
}

/* Strides a core entry point takes: none negative, and (with quantized
 * weights, whose rows are byte streams) dense.  MOE_STATUS_OK or an error
 * naming `op`. */
moe_status moe_check_wstrides(const char *op, moe_dtype dtype,
                              const moe_wstrides *s, int n);

/* ---- thread pool (csrc/runtime/pool.c) ---- */

/* One task of a parallel job; tasks of a job must be independent. */
typedef void (*moe_task_fn)(void *ctx, int64_t task);

/*
 * Run tasks [0, n_tasks) on the pool and the calling thread; returns when
 * all are done.  MOE_STATUS_INTERRUPTED if moe_interrupt_request() came.
 */
moe_status moe_pool_run(int64_t n_tasks, moe_task_fn fn, void *ctx);

/* ---- packed expert weights (csrc/cpu/ffn.c) ---- */

struct moe_experts {
    moe_dtype dtype;
    int       nr;          /* panel width of the kernel set packed for     */
    int       gated;       /* gate and up interleaved in gu panels         */
    int       linear;      /* a packed linear: no gu panels; down holds
                              w (d_model = d_out, d_ff = d_in)              */
    int32_t   n_experts;
    int64_t   d_model;
    int64_t   d_ff;
    int64_t   gu_panels;   /* per expert: ceil(d_ff / (gated ? nr/2 : nr)) */
    int64_t   down_panels; /* per expert: ceil(d_model / nr)               */
    void     *gu;          /* (E, gu_panels, d_model, nr) elements         */
    void     *down;        /* (E, down_panels, d_ff, nr) elements; a
                              quantized panel of K rows holds ceil(K / group)
                              blocks: nr scales, then the group's rows
                              (moe_panel_bytes, cpu/gemm.inc)              */
    int64_t   group_gu;    /* quantized: rows per scale of the gu panels   */
    int64_t   group_down;  /*   and of the down panels; else 0            */
    int64_t   group_size;  /* as packed (moe_pack_params.group_size)        */
    float    *gu_bias;     /* (E, gu_panels, nr) as the panel columns, or
                              NULL                                         */
    float    *down_bias;   /* (E, d_model) or NULL                         */
    int64_t  *expert_ff;   /* (E,) hidden size of each expert (<= d_ff), or
                              NULL: all d_ff.  Panels stay d_ff-sized; the
                              forward skips the units past expert_ff[e]     */
    moe_compute compute;   /* moe_pack_params.compute                      */
    int       bf16_act;    /* compute BFLOAT16: bf16 panels hold pairs of k,
                              (K / 2, nr, 2), for the kernel sets' dot
                              kernel                                       */
    int       q8_act;      /* compute INT8: quantized panels in the layout
                              of cpu/kernels.h's moe_q8_* (quads of k)     */
    size_t    nbytes;
};

/* LoRA on expert weights (csrc/cpu/ffn.c); see moe_expert_lora_pack. */
struct moe_expert_lora {
    const moe_experts *experts; /* the pack it was made for (identity)     */
    int32_t      rank;
    int32_t      n_gu;      /* shrink rows before phase 1: rank per present
                               gate / up adapter (0, rank or 2 * rank)      */
    moe_experts *a_gu;      /* packed linear (E, n_gu, d_model) or NULL     */
    float       *bank_gu;   /* (E, gu_panels, n_gu, nr): s * B rows laid
                               out as the gate/up panel columns             */
    moe_experts *a_down;    /* packed linear (E, rank, d_ff) or NULL        */
    float       *bank_down; /* (E, down_panels, rank, nr): s * B_down[:, i]
                               in the down panels' columns                  */
    int32_t     *iota;      /* (max(n_gu, rank),) 0, 1, 2, ...              */
};

/* ---- per-thread scratch (csrc/runtime/workspace.c) ---- */

enum {
    MOE_WS_PANEL_X = 0,   /* cpu/ffn.c: packed activation panels             */
    MOE_WS_PANEL_H,       /* cpu/ffn.c: packed hidden panels                 */
    MOE_WS_LAYER_Y,       /* compose/layer.c: expert outputs, sorted rows    */
    MOE_WS_LAYER_SHARED,  /* compose/layer.c: shared-expert output           */
    MOE_WS_LAYER_LOGITS,  /* compose/layer.c: router logits                  */
    MOE_WS_ROUTE_EXT,     /* cpu/route_ext.c: expert-choice scores, heaps    */
    MOE_WS_SOFT_MOE,      /* compose/soft_moe.c: logits, weights, slots      */
    MOE_WS_PEER,          /* cpu/peer.c: float64 query and sub-key weights   */
    MOE_WS_PEER_TASK,     /* cpu/peer.c: one block's queries, scores, ids    */
    MOE_WS_MM,            /* cpu/matmul.c: A panels, an edge B panel, C      */
    MOE_WS_MM_SHARED,     /* cpu/matmul.c: moe_mm's A and B packed once      */
    MOE_WS_BWD_TASK,      /* cpu/ffn_backward.c: a task's tiles and panels   */
    MOE_WS_BWD_HIDDEN,    /* cpu/ffn_backward.c: H, dG, dU (rows, d_ff)      */
    MOE_WS_BWD_ROWS,      /* cpu/ffn_backward.c: the gathered rows           */
    MOE_WS_BWD_TILES,     /* cpu/ffn_backward.c: bf16 operands for the tiles */
    MOE_WS_LAYER_BWD,     /* compose/layer_backward.c: row gradients         */
    MOE_WS_DEQUANT,       /* cpu/ffn.c: a quantized panel widened to fp32    */
    MOE_WS_PANEL_Q,       /* cpu/ffn.c: int8 compute: quantized hidden panels */
    MOE_WS_COUNT
};

/*
 * A buffer of count * size bytes owned by this thread, reused by later
 * calls with the same slot (contents undefined); NULL with the error set on
 * failure.  Valid until the next request for the same slot on this thread.
 */
void *moe_workspace(int slot, size_t count, size_t size);

/* ---- the layer composer's routing (csrc/compose/layer.c) ---- */

/*
 * Route with p's router (route.router) from its logits (n_tokens, n_experts +
 * n_null) into p's routing outputs (expert_ids, weights, counts, n_dropped,
 * aux_loss, z_loss); *k: the slots per token written.  The forward and the
 * backward (which routes again to recover the selection) share it.
 */
moe_status moe_layer_route(const moe_layer_params *p, const double *logits,
                           int32_t *k);

/* ---- the backward's GEMM (csrc/cpu/matmul.c) ---- */

/* One product term: A (m, K) with element (i, k) at a[i * a_rs + k * a_cs],
 * B (K, n) fp32 row-major, element (k, j) at b[k * ldb + j].  With b_rows,
 * B's row k is at b + b_rows[k] * ldb; with a_rows, A's row i at a +
 * a_rows[i] * a_rs (rows picked from a larger matrix as they are packed: a
 * token-indexed product needs no gathered copy). */
typedef struct moe_mm_seg {
    const float   *a;
    int64_t        a_rs, a_cs;
    const float   *b;
    int64_t        ldb;
    int64_t        K;
    const int64_t *b_rows; /* NULL: row k is row k */
    const int64_t *a_rows; /* NULL: row i is row i */
} moe_mm_seg;

/* A term without picked rows. */
static inline moe_mm_seg
moe_mm_term(const float *a, int64_t a_rs, int64_t a_cs, const float *b,
            int64_t ldb, int64_t K)
{
    moe_mm_seg s = {a, a_rs, a_cs, b, ldb, K, NULL, NULL};
    return s;
}

#define MOE_MM_MAX_SEGS 2

/*
 * c (m, n), row i at c + i * ldc, = sum_s A_s @ B_s, each element one FMA
 * chain over the segments' k in order (the same bits however the work is
 * split); 0 where every K is 0.  moe_mm_block runs on the calling thread,
 * moe_mm on the pool.
 */
moe_status moe_mm_block(const moe_mm_seg *segs, int n_segs, int64_t m,
                        int64_t n, float *c, int64_t ldc);
/* A bf16 product term on tiles (moe_tmm_block): A (m, Kp pairs) as
 * activation panels of 32 rows (MOE_DOT_TILES: rows past the matrix
 * readable), a_panel uint32 apart; B (Kp, n) as (Kp, 32) pair panels of 32
 * columns, b_panel apart (columns up to n rounded up to 32 readable). */
typedef struct moe_tmm_seg {
    const uint32_t *a;
    int64_t         a_panel;
    const uint32_t *b;
    int64_t         b_panel;
    int64_t         Kp;
} moe_tmm_seg;

/* c (m, n) = sum_s A_s @ B_s on the set's tiles (kernel sets with dot_acc
 * only), each element one chain over the segments' pairs in order, in k
 * blocks of MOE_MM_TILE_KB; runs on the calling thread. */
moe_status moe_tmm_block(const moe_tmm_seg *segs, int n_segs, int64_t m,
                         int64_t n, float *c, int64_t ldc);
/* moe_mm_block with A and B rounded to bf16 (nearest even) as they are
 * read, fp32 sums: the bf16-compute backward's products. */
moe_status moe_mm_block_bf16(const moe_mm_seg *segs, int n_segs, int64_t m,
                             int64_t n, float *c, int64_t ldc);
moe_status moe_mm(const moe_mm_seg *segs, int n_segs, int64_t m, int64_t n,
                  float *c, int64_t ldc);
/* Several independent products on the pool in one job (small per-adapter
 * products: one dispatch, their blocks spread over the threads); each as
 * moe_mm, so the same bits. */
typedef struct moe_mm_prob {
    const moe_mm_seg *segs;
    int               n_segs;
    int64_t           m, n;
    float            *c;
    int64_t           ldc;
} moe_mm_prob;
moe_status moe_mm_many(const moe_mm_prob *probs, int n_probs);
/* (rows, cols) row-major -> (cols, rows), n_mats of them (cpu/matmul.c). */
void moe_transpose(const float *src, int64_t n_mats, int64_t rows,
                   int64_t cols, float *dst);

/* ---- the CUDA backend, loaded at run time (csrc/runtime/cuda_loader.c) --- */

struct moe_cuda_dispatch_params;
struct moe_cuda_combine_params;

typedef struct moe_cuda_api {
    int         (*device_count)(void);
    const char *(*last_error)(void);
    int         (*route_topk)(const struct moe_cuda_route_params *p,
                              void *stream);
    size_t      (*dispatch_workspace)(int64_t n_tokens, int32_t top_k,
                                      int32_t n_experts);
    int         (*dispatch)(const struct moe_cuda_dispatch_params *p,
                            void *stream);
    int         (*combine)(const struct moe_cuda_combine_params *p,
                           void *stream);
} moe_cuda_api;

/* The loaded library's entry points, or NULL when it is absent. */
const moe_cuda_api *moe_cuda(void);

/* CPU implementations (csrc/cpu/); csrc/ops/backend.c picks the backend. */
moe_status moe_cpu_router_logits(const moe_router_params *p);
moe_status moe_cpu_route_topk(const moe_route_params *p);
moe_status moe_cpu_route_expert_choice(const moe_expert_choice_params *p);
moe_status moe_cpu_expert_choice_by_token(const moe_ec_tokens_params *p);
moe_status moe_cpu_route_dynamic(const moe_route_dynamic_params *p);
moe_status moe_cpu_route_skip(const moe_route_skip_params *p);
moe_status moe_cpu_peer_forward(const moe_peer_params *p);
moe_status moe_cpu_peer_backward(const moe_peer_backward_params *p);
moe_status moe_cpu_dispatch_count(const moe_dispatch_params *p);
moe_status moe_cpu_dispatch_build(const moe_dispatch_params *p);
moe_status moe_cpu_dispatch_gather(const moe_gather_params *p);
moe_status moe_cpu_combine(const moe_combine_params *p);
moe_status moe_cpu_ffn_grouped(const moe_ffn_params *p);
moe_status moe_cpu_experts_pack(const moe_pack_params *p, moe_experts **out);
moe_status moe_cpu_linear_pack(const moe_linear_pack_params *p,
                               moe_experts **out);
moe_status moe_cpu_linear_grouped(const moe_linear_params *p);
moe_status moe_cpu_ffn_backward(const moe_ffn_backward_params *p);
moe_status moe_cpu_combine_backward(const moe_combine_backward_params *p);
moe_status moe_cpu_dispatch_backward(const moe_dispatch_backward_params *p);
moe_status moe_cpu_route_backward(const moe_route_backward_params *p);
moe_status moe_cpu_router_backward(const moe_router_backward_params *p);
moe_status moe_cpu_linear_backward(const moe_linear_backward_params *p);
moe_status moe_cpu_expert_lora_pack(const moe_expert_lora_params *p,
                                    const moe_experts *experts,
                                    moe_expert_lora **out);

#endif /* MOE_IMPL_H */
