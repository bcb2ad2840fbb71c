/*
 * moe.h - the public C API of the moe core: sparse Mixture-of-Experts routing,
 * token dispatch/combine and grouped expert FFNs.
 *
 * Every entry point returns one moe_status; moe_last_error() holds a
 * thread-local message with the detail.  Nothing here knows about Python:
 * csrc/binding/ is the only binding (the only files that include Python).
 * Each op takes one params struct by const pointer; every field carries its
 * shape.  Arrays are dense and row-major unless a stride field says otherwise.
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#include "moe_options.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_VERSION "0.1.0"

/* ---- status ---------------------------------------------------------- */

typedef enum moe_status {
    MOE_STATUS_OK          = 0,
    MOE_STATUS_INVALID_ARG = 1, /* a shape, range or option is wrong      */
    MOE_STATUS_NONFINITE   = 2, /* NaN or Inf where finite values needed  */
    MOE_STATUS_ALLOC       = 3, /* out of memory                          */
    MOE_STATUS_UNSUPPORTED = 4, /* valid request this build cannot run    */
    MOE_STATUS_INTERNAL    = 5, /* a bug: an invariant did not hold       */
    MOE_STATUS_INTERRUPTED = 6  /* stopped by moe_interrupt_request()     */
} moe_status;

/* A static name for the status ("MOE_STATUS_OK", ...). */
const char *moe_status_str(moe_status status);

/* The detail of the last failing call on this thread ("" if none). */
const char *moe_last_error(void);

/* ---- options --------------------------------------------------------- */

/* The enums come from the lists of moe_options.h (values: list order);
 * MOE_<SET>_COUNT is the number of entries of each. */
#define MOE_ENUM_ENTRY_(prefix, name) prefix##name,
#define MOE_SCORING_ENTRY_(name, str) MOE_ENUM_ENTRY_(MOE_SCORING_, name)
#define MOE_ACTIVATION_ENTRY_(name, str, gated)                             \
    MOE_ENUM_ENTRY_(MOE_ACTIVATION_, name)
#define MOE_DTYPE_ENTRY_(name, str, q) MOE_ENUM_ENTRY_(MOE_DTYPE_, name)
#define MOE_COMPUTE_ENTRY_(name, str) MOE_ENUM_ENTRY_(MOE_COMPUTE_, name)
#define MOE_ROUTER_ENTRY_(name, str) MOE_ENUM_ENTRY_(MOE_ROUTER_, name)
#define MOE_ROUTER_GRAD_ENTRY_(name, str)                                   \
    MOE_ENUM_ENTRY_(MOE_ROUTER_GRAD_, name)
#define MOE_NULL_ENTRY_(name, str) MOE_ENUM_ENTRY_(MOE_NULL_, name)
#define MOE_PEER_ACTIVATION_ENTRY_(name, str)                               \
    MOE_ENUM_ENTRY_(MOE_PEER_ACTIVATION_, name)

typedef enum moe_scoring {
    MOE_SCORING_LIST(MOE_SCORING_ENTRY_)
    MOE_SCORING_COUNT
} moe_scoring;

typedef enum moe_activation {
    MOE_ACTIVATION_LIST(MOE_ACTIVATION_ENTRY_)
    MOE_ACTIVATION_COUNT
} moe_activation;

/* Nonzero when the activation multiplies an activated gate by up. */
int moe_activation_is_gated(moe_activation activation);

/* The same, inline for the kernels. */
static inline int
moe_activation_gated(moe_activation activation)
{
    switch (activation) {
#define MOE_GATED_CASE_(name, str, gated)                                   \
    case MOE_ACTIVATION_##name: return gated;
    MOE_ACTIVATION_LIST(MOE_GATED_CASE_)
#undef MOE_GATED_CASE_
    default: return 0;
    }
}

/* Storage type of expert weights; activations are always float32. */
typedef enum moe_dtype {
    MOE_DTYPE_LIST(MOE_DTYPE_ENTRY_)
    MOE_DTYPE_COUNT
} moe_dtype;

/* What the expert FFN computes in (moe_options.h). */
typedef enum moe_compute {
    MOE_COMPUTE_LIST(MOE_COMPUTE_ENTRY_)
    MOE_COMPUTE_COUNT
} moe_compute;

/* Nonzero for the quantized storage types (moe_options.h). */
static inline int
moe_dtype_quantized(moe_dtype d)
{
    switch (d) {
#define MOE_QUANT_CASE_(name, str, q) case MOE_DTYPE_##name: return q;
    MOE_DTYPE_LIST(MOE_QUANT_CASE_)
#undef MOE_QUANT_CASE_
    default: return 0;
    }
}

/* An activation and its constants: one struct, embedded wherever an FFN
 * runs (moe_ffn_params, moe_layer_params, moe_soft_moe_params). */
typedef struct moe_act_params {
    moe_activation activation; /* gated iff moe_activation_gated          */
    float          alpha;      /* MOE_ACTIVATION_SWIGLU_OAI's alpha        */
    float          limit;      /* and its clamp limit                      */
} moe_act_params;

/* The top-k router's gradient estimators (moe_route_backward_params). */
typedef enum moe_router_grad {
    MOE_ROUTER_GRAD_LIST(MOE_ROUTER_GRAD_ENTRY_)
    MOE_ROUTER_GRAD_COUNT
} moe_router_grad;

/* Routers of a layer (moe_route_options.router, moe.SparseMoE's router=). */
typedef enum moe_router {
    MOE_ROUTER_LIST(MOE_ROUTER_ENTRY_)
    MOE_ROUTER_COUNT
} moe_router;

/* ---- threads and interrupts ------------------------------------------ */

/*
 * The CPU thread pool (pthreads) is process-wide; its size comes from
 * MOE_NUM_THREADS or the CPUs this process may use, and can be changed at
 * any time.  Results never depend on it.
 */
moe_status moe_set_num_threads(int n_threads);
int        moe_get_num_threads(void);

/*
 * Ask running ops to stop between tasks (async-signal-safe: a SIGINT
 * handler may call it).  Only ops called from a thread that is watching
 * (moe_interrupt_watch(1)) stop; they return MOE_STATUS_INTERRUPTED.
 * Turning the watch on or off clears a pending request.
 */
void moe_interrupt_request(void);
void moe_interrupt_watch(int on);

/* ---- packed expert weights ------------------------------------------- */

/*
 * Expert weights re-laid once into the micro-kernels' panel format: gate and
 * up interleaved by panel (so one pass gives both), and down.  The pack is
 * made for the kernel set in use (moe_cpu_isa()); it copies the weights,
 * so the caller's arrays may change afterwards without affecting it.
 */
typedef struct moe_experts moe_experts;

/*
 * Where element (e, r, c) of a float expert weight array lies: e * expert +
 * r * row + c * col elements from its start (strides >= 0).  All zero, as in
 * a zeroed params struct: dense row-major.  So a view needs no copy: the
 * gate or up half of a fused (E, 2F, d) gate_up array (expert 2F * d), a
 * transposed or column-interleaved one.  Quantized weights are dense.
 */
typedef struct moe_wstrides {
    int64_t expert, row, col;
} moe_wstrides;

typedef struct moe_pack_params {
    const void *w_gate;    /* (n_experts, d_ff, d_model) or NULL if ungated */
    const void *w_up;      /* (n_experts, d_ff, d_model)                    */
    const void *w_down;    /* (n_experts, d_model, d_ff)                    */
    moe_wstrides gate_strides, up_strides, down_strides; /* of the three
                              arrays: all zero for dense                   */
    moe_dtype   dtype;     /* element type of the three arrays and the pack.
                              Quantized: a row of K weights is K int8, or
                              ceil(K / 2) bytes of nibbles (int4, mxfp4)   */
    const void *s_gate;    /* quantized: the scales of each weight's rows,  */
    const void *s_up;      /*   (rows, ceil(K / group_size)) float16 bits   */
    const void *s_down;    /*   (uint16; mxfp4: uint8 e8m0); else NULL     */
    int64_t     group_size; /* quantized: weights per scale along k, or 0:
                              one scale per row (mxfp4: 32); else 0        */
    int32_t     n_experts;
    int64_t     d_model;
    int64_t     d_ff;
    const float *b_gate;   /* (n_experts, d_ff) bias, or NULL               */
    const float *b_up;     /* (n_experts, d_ff) bias, or NULL               */
    const float *b_down;   /* (n_experts, d_model) bias, or NULL            */
    const int64_t *expert_d_ff; /* (n_experts,) each expert's hidden size in
                              [0, d_ff] (rows past it are ignored), or NULL:
                              every expert has d_ff (heterogeneous experts) */
    moe_compute compute;   /* FLOAT32: fp32 activations.  BFLOAT16: the FFN
                              rounds its inputs (the routed rows and the
                              hidden activations) to bf16 and runs the bf16
                              x bf16 kernel, VDPBF16PS where the CPU has it;
                              needs dtype bf16, even d_model, d_ff and
                              expert_d_ff.  INT8: quantized dtypes only;
                              the inputs quantized to int8 per row and
                              block (cpu/kernels.h), integer dot products */
} moe_pack_params;

typedef struct moe_experts_info {
    int32_t   n_experts;
    int64_t   d_model;
    int64_t   d_ff;
    int32_t   gated;   /* packed with w_gate                               */
    int32_t   linear;  /* a packed linear (moe_linear_pack)                */
    moe_dtype dtype;
    moe_compute compute; /* packed with moe_pack_params.compute           */
    int64_t   group_size; /* quantized: weights per scale along k (0: one
                             per row), as packed; else 0                  */
    size_t    nbytes;  /* memory held by the pack                          */
} moe_experts_info;

moe_status moe_experts_pack(const moe_pack_params *p, moe_experts **out);
void       moe_experts_free(moe_experts *experts);
void       moe_experts_get_info(const moe_experts *experts,
                                moe_experts_info *info);

/* ---- router logits: logits = x @ w^T, accumulated in float64 --------- */

typedef struct moe_router_params {
    const float *x;         /* (n_tokens, d_model)                        */
    const float *weight;    /* (n_experts, d_model)                       */
    const float *bias;      /* (n_experts,) added to the logits, or NULL  */
    int64_t      n_tokens;
    int64_t      d_model;
    int32_t      n_experts;
    double      *logits;    /* out: (n_tokens, n_experts)                 */
} moe_router_params;

moe_status moe_router_logits(const moe_router_params *p);

/* ---- routing: logits -> top-k expert ids and gate weights ------------ */

/* The routing options: one struct, embedded in moe_route_params (top-k
 * only) and moe_layer_params (any router, over n_experts + n_null router
 * outputs). */
typedef struct moe_route_options {
    moe_router     router;          /* moe_route_topk reads none of router,
                                       router_p and k_min                  */
    int32_t        top_k;           /* 1..n_experts; top_p / threshold: the
                                       most experts a token takes          */
    moe_scoring    scoring;
    int32_t        renormalize;     /* selected weights sum to 1           */
    double         routed_scaling;  /* multiplies the final weights        */
    int32_t        n_groups;        /* divides n_experts; 1 = no groups    */
    int32_t        topk_groups;     /* groups kept, 1..n_groups            */
    double         capacity_factor; /* top_k: <= 0 dropless; expert_choice:
                                       each expert takes ceil(cf * T / E)
                                       tokens (at most T)                  */
    double         router_p;        /* top_p: the mass in (0, 1]; threshold:
                                       the least probability in [0, 1]     */
    int32_t        k_min;           /* top_p / threshold: the fewest experts
                                       a token takes, 1..top_k             */
    const float   *expert_bias;     /* (n_experts,) selection-only, or NULL */
    const uint8_t *allowed;         /* (n_tokens, n_experts) nonzero = may
                                       be selected, or NULL; selection only,
                                       and only with n_groups == 1.  With
                                       mask_rows: (n_mask_rows, n_experts) */
    const int32_t *mask_rows;       /* (n_tokens,) the row of allowed each
                                       token uses (its task / modality /
                                       domain group), or NULL: row t      */
    int64_t        n_mask_rows;     /* rows of allowed, with mask_rows     */
} moe_route_options;

typedef struct moe_route_params {
    const double     *logits;      /* (n_tokens, n_experts); finite        */
    int64_t           n_tokens;
    int32_t           n_experts;
    moe_route_options opt;

    int32_t      *expert_ids;      /* out: (n_tokens, top_k); -1 = dropped */
    float        *weights;         /* out: (n_tokens, top_k); 0 = dropped  */
    int64_t      *counts;          /* out: (n_experts,) kept assignments   */
    int64_t      *n_dropped;       /* out: scalar                          */
    double       *aux_loss;        /* out: Switch loss E * sum f_i P_i     */
    double       *z_loss;          /* out: mean(logsumexp(logits)^2)       */
} moe_route_params;

/*
 * Ties break toward the lower expert index (and the lower group index), so
 * the result is a pure function of the logits.  With capacity_factor > 0,
 * each expert keeps its first ceil(capacity_factor * T * k / E) assignments
 * in (token, slot) order.
 */
moe_status moe_route_topk(const moe_route_params *p);

/* bias += rate * sign(mean(counts) - counts), auxiliary-loss-free balancing */
moe_status moe_expert_bias_update(double *bias, const int64_t *counts,
                                  int32_t n_experts, double rate);

/* ---- dispatch: stable counting sort of (token, slot) pairs by expert - */

typedef struct moe_dispatch_params {
    const int32_t *expert_ids;  /* (n_tokens, top_k); -1 = not dispatched  */
    int64_t        n_tokens;
    int32_t        top_k;
    int32_t        n_experts;
    int64_t       *offsets;     /* out: (n_experts + 1,)                   */
    int64_t       *token_index; /* out: (offsets[E],) token of sorted row  */
    int64_t       *position;    /* out: (n_tokens, top_k) sorted row or -1 */
} moe_dispatch_params;

/* Validates ids and fills offsets only (token_index/position unused). */
moe_status moe_dispatch_count(const moe_dispatch_params *p);
/* Fills offsets, token_index and position. */
moe_status moe_dispatch_build(const moe_dispatch_params *p);

typedef struct moe_gather_params {
    const float   *x;           /* (n_tokens, d_model)                     */
    const int64_t *token_index; /* (n_rows,) values in [0, n_tokens)       */
    int64_t        n_tokens;
    int64_t        n_rows;
    int64_t        d_model;
    float         *out;         /* out: (n_rows, d_model)                  */
} moe_gather_params;

moe_status moe_dispatch_gather(const moe_gather_params *p);

/* ---- combine: out[t] = sum_j w[t,j] * y[position[t,j]], j in order --- */

typedef struct moe_combine_params {
    const float   *y;        /* (n_rows, d_model) expert outputs, sorted   */
    const int64_t *position; /* (n_tokens, top_k) rows of y, -1 = skip     */
    const float   *weights;  /* (n_tokens, top_k)                          */
    int64_t        n_rows;
    int64_t        n_tokens;
    int32_t        top_k;
    int64_t        d_model;
    float         *out;      /* out: (n_tokens, d_model)                   */
} moe_combine_params;

moe_status moe_combine(const moe_combine_params *p);

/* ---- LoRA adapters on expert weights ---------------------------------- */

/*
 * Per-expert LoRA on w_gate / w_up / w_down (PEFT's target_parameters on an
 * MoE): for routed rows of expert e,
 *   g = W_gate,e x + s B_gate,e A_gate,e x,   u likewise,
 *   y = W_down,e h + s B_down,e A_down,e h,   h = act(g, u).
 * Packed once against the experts it adapts (scaling folded into B); the
 * shrinks run on the FFN's own activation panels and the expands are fused
 * into its output tiles.  Any of the three may be absent.
 */
typedef struct moe_expert_lora moe_expert_lora;

typedef struct moe_expert_lora_params {
    int32_t      rank;
    float        scaling;  /* alpha / rank                                  */
    const float *a_gate;   /* (n_experts, rank, d_model), or NULL           */
    const float *b_gate;   /* (n_experts, d_ff, rank), with a_gate          */
    const float *a_up;     /* (n_experts, rank, d_model), or NULL           */
    const float *b_up;     /* (n_experts, d_ff, rank)                       */
    const float *a_down;   /* (n_experts, rank, d_ff), or NULL              */
    const float *b_down;   /* (n_experts, d_model, rank)                    */
} moe_expert_lora_params;

/* Sizes come from experts; a_gate needs gated experts. */
moe_status moe_expert_lora_pack(const moe_expert_lora_params *p,
                                const moe_experts *experts,
                                moe_expert_lora **out);
void       moe_expert_lora_free(moe_expert_lora *lora);

/* ---- grouped expert FFN over expert-sorted rows ---------------------- */

typedef struct moe_ffn_params {
    const float       *x;           /* (n_tokens, d_model)                  */
    const int64_t     *token_index; /* (n_rows,) row r is x[token_index[r]];
                                       NULL: row r is x[r]                  */
    int64_t            n_tokens;    /* rows of x                            */
    const int64_t     *offsets;     /* (n_experts + 1,), offsets[E]==n_rows */
    int64_t            n_rows;
    const moe_experts *experts;     /* packed weights                       */
    moe_act_params     act;         /* gated iff the pack has w_gate        */
    const moe_expert_lora *lora;    /* adapters on the experts, or NULL     */
    float             *out;         /* out: (n_rows, d_model), sorted rows  */
    float             *save_gu;     /* out, or NULL (float32 or bfloat16
                                       compute): each
                                       row's pre-activations as the
                                       activation reads them (bias and LoRA
                                       terms in), (n_rows, 2 * d_ff) gate
                                       then up, ungated (n_rows, d_ff) up;
                                       units past expert_d_ff[e] unwritten.
                                       moe_ffn_backward reads them instead
                                       of recomputing: the same bits       */
} moe_ffn_params;

/* Work is O(n_rows * d_ff * d_model): only routed rows are computed. */
moe_status moe_ffn_grouped(const moe_ffn_params *p);

/* ---- grouped linear: the engine under the LoRA layers --------------- */

/*
 * A packed linear is a moe_experts handle without gate/up: n_groups weight
 * matrices w_g (d_out, d_in) (+ bias), in the panels of moe_experts_pack.
 * moe_experts_get_info reports it as d_model = d_out, d_ff = d_in.
 */
typedef struct moe_linear_pack_params {
    const void  *w;        /* (n_groups, d_out, d_in)                       */
    moe_dtype    dtype;    /* element type of w and of the pack             */
    int32_t      n_groups;
    int64_t      d_in;
    int64_t      d_out;
    const float *bias;     /* (n_groups, d_out), or NULL                    */
} moe_linear_pack_params;

moe_status moe_linear_pack(const moe_linear_pack_params *p, moe_experts **out);

/*
 * A low-rank update fused into a linear's output rows:
 *   out[r] += sum_q coef[r, q] * U[:, index[r, q]],  q in order, -1 skipped,
 * U (d_out, n_bank) a packed linear (fp32) used as a bank of columns.  With
 * U = [B_0 | B_1 | ...] this is the LoRA expand sum_e B_e z_e, and no
 * per-adapter output is written anywhere.  Packed, the columns one output
 * tile needs are contiguous (n_bank x panel width) and stay in cache.
 */
typedef struct moe_lowrank {
    const float       *coef;  /* (n_rows, n_terms)                          */
    const int32_t     *index; /* (n_rows, n_terms) columns of U, -1 = none  */
    int32_t            n_terms;
    const moe_experts *bank;  /* packed linear (1, d_out, n_bank), fp32     */
} moe_lowrank;

typedef struct moe_linear_params {
    const float       *x;           /* (n_tokens, d_in)                      */
    const int64_t     *token_index; /* (n_rows,) row r is x[token_index[r]];
                                       NULL: row r is x[r]                   */
    int64_t            n_tokens;
    const int64_t     *offsets;     /* (n_groups + 1,): rows of group g are
                                       [offsets[g], offsets[g+1])            */
    int64_t            n_rows;
    const moe_experts *weights;     /* a packed linear                       */
    const moe_lowrank *lowrank;     /* fused update, or NULL                 */
    float             *out;         /* out: (n_rows, d_out)                  */
} moe_linear_params;

/* out[r] = x_r @ w_g^T + b_g (+ low-rank update), g the group of row r. */
moe_status moe_linear_grouped(const moe_linear_params *p);

/* ---- LoRA experts (csrc/compose/lora.c) ---------------------------------- */

/*
 * Mixtures of low-rank adapters over a frozen base linear W0 (d_out, d_in):
 *   out[t] = W0 x_t + b + sum_s c_s * (low-rank term of slot s of token t)
 * computed as a shrink (z = A x, grouped by adapter where A differs) and an
 * expand fused into the base GEMM's output tiles (see moe_lowrank); no
 * W0 + B A is ever formed and no per-adapter output is written.
 */
typedef enum moe_lora_kind {
    MOE_LORA_ADAPTERS = 0, /* slot s of token t: adapter e = ids[t, s] with
                              its own A_e, B_e:  c * B_e A_e x              */
    MOE_LORA_SHARED_A = 1, /* one A, heads B_e:  c * B_e (A x), A x once    */
    MOE_LORA_RANKS    = 2  /* one A, one B, slot = rank j:
                              c * B[:, j] (A[j] . x)                        */
} moe_lora_kind;

typedef struct moe_lora_params {
    const float       *x;          /* (n_tokens, d_in)                      */
    int64_t            n_tokens;
    int64_t            d_in;
    int64_t            d_out;
    int32_t            rank;
    const moe_experts *base;       /* packed linear (1, d_out, d_in) (+ its
                                      bias), or NULL: out = the update only */
    moe_lora_kind      kind;
    const moe_experts *lora_a;     /* packed linear (n_adapters, rank, d_in)
                                      for ADAPTERS, else (1, rank, d_in)    */
    const moe_experts *bank;       /* packed linear (1, d_out, n_bank), fp32:
                                      ADAPTERS, SHARED_A: [B_0 | B_1 | ...],
                                      n_bank = n_adapters * rank; RANKS: B */
    int32_t            n_adapters; /* adapters / heads; RANKS: 1            */
    int32_t            n_slots;    /* slots per token                       */
    const int32_t     *ids;        /* (n_tokens, n_slots) adapter, head or
                                      rank; -1 = empty slot.  NULL with
                                      select_k > 0                          */
    const float       *weights;    /* (n_tokens, n_slots) gates, or NULL: 1 */
    float              scaling;    /* alpha / rank                          */
    const float       *adapter_scaling; /* (n_adapters,) per-adapter
                                      scaling instead, or NULL              */
    /* RANKS only (FlyLoRA): with select_k > 0 the slots are the top select_k
       ranks of |z| + rank_bias (z + rank_bias if select_signed), ties to
       the lower rank, n_slots == select_k, weights NULL.                   */
    int32_t            select_k;
    int32_t            select_signed;
    const float       *rank_bias;  /* (rank,) selection only, or NULL       */
    int32_t           *selected;   /* out with select_k: (n_tokens, select_k) */
    int64_t           *counts;     /* out, or NULL: (n_adapters,) slots per
                                      adapter; RANKS: (rank,) per rank      */
    float             *save_z;     /* out, or NULL: the shrink for the
                                      backward: ADAPTERS (n_tokens, n_slots,
                                      rank), each slot's A_e x (0 for an
                                      empty slot); else (n_tokens, rank)    */
    float             *out;        /* out: (n_tokens, d_out)                */
} moe_lora_params;

moe_status moe_lora_forward(const moe_lora_params *p);

/*
 * The backward of moe_lora_forward: gradients of sum(dy * out) with the
 * slots fixed.  The base stays frozen (its dx term dy W0 only); z = A x is
 * recomputed from the forward's lora_a pack (its bits); the expand and the
 * shrink run backward as grouped linears (moe_linear_backward), the rows'
 * dx summed per token in slot order after the base's: the same bits for
 * any thread count, and a token's gradients depend on its own row.
 * FlyLoRA's selection: pass the forward's `selected` as ids, select_k 0.
 */
typedef struct moe_lora_backward_params {
    const moe_lora_params *forward; /* as it ran, select_k 0; its base,
                                       bank, counts and out are not read   */
    const moe_experts *base_t; /* the base transposed, packed as a linear
                                 (1, d_in, d_out) without bias (any dtype;
                                 frozen: pack it once), or NULL: no base
                                 term in dx                                */
    const float *lora_a;      /* unpacked A: (n_adapters, rank, d_in) for
                                 ADAPTERS, else (rank, d_in)               */
    const float *lora_b;      /* unpacked B: (n_adapters, d_out, rank),
                                 RANKS: (d_out, rank)                      */
    const float *z;           /* the forward's save_z, or NULL: recomputed */
    const float *dy;          /* (n_tokens, d_out)                         */
    float       *dx;          /* out, or NULL: (n_tokens, d_in)            */
    float       *d_lora_a;    /* out, or NULL: lora_a's shape              */
    float       *d_lora_b;    /* out, or NULL: lora_b's shape              */
    float       *d_weights;   /* out, or NULL: (n_tokens, n_slots); 0 for
                                 empty slots                               */
} moe_lora_backward_params;

moe_status moe_lora_backward(const moe_lora_backward_params *p);

/* ---- routing beyond top-k (csrc/cpu/route_ext.c) --------------------- */

/*
 * Expert-choice routing: scores per token (softmax over E, or sigmoid), then
 * each expert takes its top-`capacity` tokens by score, ties toward the
 * lower token index.  A token may be taken by 0..E experts.
 */
typedef struct moe_expert_choice_params {
    const double *logits;      /* (n_tokens, n_experts); finite             */
    int64_t       n_tokens;
    int32_t       n_experts;
    int64_t       capacity;    /* tokens per expert, 0..n_tokens            */
    moe_scoring   scoring;     /* MOE_SCORING_SOFTMAX or _SIGMOID           */

    int64_t      *token_ids;   /* out: (n_experts, capacity), best first    */
    float        *gates;       /* out: (n_experts, capacity) scores         */
    int32_t      *n_experts_per_token; /* out: (n_tokens,)                 */
} moe_expert_choice_params;

moe_status moe_route_expert_choice(const moe_expert_choice_params *p);

/*
 * The token-major view of an expert-choice result, for dispatch/combine:
 * row t lists the experts that took token t in ascending order, then -1 /
 * 0 padding.  width must be at least max(n_experts_per_token).
 */
typedef struct moe_ec_tokens_params {
    const int64_t *token_ids;  /* (n_experts, capacity) in [0, n_tokens)    */
    const float   *gates;      /* (n_experts, capacity)                     */
    int64_t        n_tokens;
    int32_t        n_experts;
    int64_t        capacity;
    int64_t        width;
    int32_t       *expert_ids; /* out: (n_tokens, width), -1 padding        */
    float         *weights;    /* out: (n_tokens, width), 0 padding         */
} moe_ec_tokens_params;

moe_status moe_expert_choice_by_token(const moe_ec_tokens_params *p);

typedef enum moe_dynamic_mode {
    MOE_DYNAMIC_TOP_P     = 0, /* fewest experts whose probability mass >= p */
    MOE_DYNAMIC_THRESHOLD = 1  /* every expert with probability >= p        */
} moe_dynamic_mode;

/*
 * Dynamic-k routing on softmax probabilities.  Experts are ranked by
 * probability, ties toward the lower index; the count k_t chosen by `mode`
 * is clamped to [k_min, k_max].  For top-p, p >= 1 selects k_max experts
 * (a float64 cumulative sum need not reach exactly 1).
 */
typedef struct moe_route_dynamic_params {
    const double    *logits;      /* (n_tokens, n_experts); finite          */
    int64_t          n_tokens;
    int32_t          n_experts;
    moe_dynamic_mode mode;
    double           p;           /* top-p mass (0, 1] or threshold [0, 1]  */
    int32_t          k_min;       /* 1..k_max                               */
    int32_t          k_max;       /* k_min..n_experts                       */
    int32_t          renormalize; /* selected weights sum to 1              */

    int32_t         *expert_ids;  /* out: (n_tokens, k_max), -1 padding     */
    float           *weights;     /* out: (n_tokens, k_max), 0 padding      */
    int32_t         *n_selected;  /* out: (n_tokens,)                       */
} moe_route_dynamic_params;

moe_status moe_route_dynamic(const moe_route_dynamic_params *p);

/*
 * Dynamic expert skipping, in place: slots with weight < threshold become
 * id -1, weight 0; with renormalize, each token's kept weights are divided
 * by their sum (float64).  Slots already -1 are left alone.
 */
typedef struct moe_route_skip_params {
    int32_t *expert_ids;  /* in/out: (n_tokens, top_k), -1 = empty slot     */
    float   *weights;     /* in/out: (n_tokens, top_k); finite              */
    int64_t  n_tokens;
    int32_t  top_k;
    double   threshold;
    int32_t  renormalize;
    int64_t *n_skipped;   /* out: scalar, slots newly emptied               */
} moe_route_skip_params;

moe_status moe_route_skip(const moe_route_skip_params *p);

/* ---- the whole layer ------------------------------------------------- */

/* Kinds of null experts (moe_layer_params). */
typedef enum moe_null_kind {
    MOE_NULL_LIST(MOE_NULL_ENTRY_)
    MOE_NULL_COUNT
} moe_null_kind;

typedef struct moe_layer_params {
    const float       *x;             /* (n_tokens, d_model)                */
    int64_t            n_tokens;
    int64_t            d_model;
    int32_t            n_experts;
    moe_act_params     act;
    const float       *router_weight; /* (n_experts + n_null, d_model)      */
    const float       *router_bias;   /* (n_experts + n_null,) or NULL      */
    const moe_experts *experts;       /* packed routed experts              */
    const moe_expert_lora *lora;      /* adapters on them, or NULL          */

    moe_route_options  route;         /* over n_experts + n_null outputs    */

    /* null experts (MoE++): n_null more router outputs after the real ones,
       never dispatched: zero adds 0, copy adds w * x, constant adds w * v */
    int32_t            n_null;
    const int32_t     *null_kinds;    /* (n_null,) MOE_NULL_*               */
    const float       *null_values;   /* (n_null, d_model) v of constant
                                         experts (other rows unused), or
                                         NULL when none is constant          */
    int32_t           *n_real;        /* out, or NULL: (n_tokens,) real
                                         experts each token kept             */
    double            *out_norm;      /* out, or NULL: (n_experts,) sum over
                                         each expert's assignments of
                                         gate * ||expert output||_2 (the
                                         pruning statistic)                  */

    /* shared experts: one packed expert of width n_shared * shared_d_ff   */
    const moe_experts *shared;        /* NULL = none                        */
    const float       *shared_gate;   /* (d_model,) sigmoid gate, or NULL   */

    float             *out;           /* out: (n_tokens, d_model)           */
    /* routing outputs, as in moe_route_params (all required); with
       expert_choice the buffers hold (n_tokens, n_experts + n_null) and the
       layer writes (n_tokens, *width) densely at their start */
    int32_t           *expert_ids;    /* out: (n_tokens, width); ids >=
                                         n_experts are null experts         */
    float             *weights;       /* out: (n_tokens, width)             */
    int32_t           *width;         /* out, or NULL: slots per token, top_k
                                         or for expert_choice the most
                                         experts a token got (at least 1)  */
    double             skip_threshold; /* > 0: slots whose weight is below it
                                         are emptied after routing (dynamic
                                         expert skipping), counts recounted */
    int32_t            skip_renormalize; /* and each token's kept weights
                                         divided by their sum               */
    int64_t           *n_skipped;     /* out, or NULL: slots skipped        */
    int64_t           *counts;        /* out: (n_experts + n_null,)         */
    int64_t           *n_dropped;
    double            *aux_loss;
    double            *z_loss;
    /* kept for moe_layer_backward (training), each out or NULL: */
    double            *save_logits;   /* (n_tokens, n_experts + n_null) the
                                         router logits                      */
    float             *save_y;        /* (n_tokens * width, d_model) the
                                         experts' outputs, dispatch order   */
    float             *save_shared;   /* (n_tokens, d_model) the shared
                                         experts' output before their gate  */
    float             *save_gu;       /* or NULL: the routed experts'
                                         moe_ffn_params.save_gu, room for
                                         n_tokens * width rows; the
                                         backward then recomputes nothing  */
} moe_layer_params;

/*
 * router logits -> route (any router of route.router) -> dispatch -> grouped
 * FFN -> combine (+ shared experts).  The losses come from the same float64
 * logits: top_k's from moe_route_topk; the other routers' over the
 * assignments they made (aux = E sum_e f_e P_e with f_e the share of the
 * kept assignments and P_e the mean softmax probability; z = mean lse^2).
 * In dropless top-k mode a token's output is bitwise independent of the
 * other tokens in the batch (expert choice depends on the batch).
 */
moe_status moe_layer_forward(const moe_layer_params *p);

/* ---- backward (training) ---------------------------------------------- */

/*
 * Gradients for training, float32 whatever the weights' storage dtype.  The
 * selection (top-k, groups, capacity) is piecewise constant: gradients flow
 * through the selected weights and the losses, as in every peer, and
 * expert_bias (selection only) gets none.  Every reduction runs in a fixed
 * order, so gradients are the same bits for any thread count, and a
 * token's dx depends on the rest of the batch only through the weight-free
 * parts the forward already shares (the aux loss's batch statistics).
 * Outputs marked "or NULL" are skipped when NULL; all are overwritten.
 */

/* The grouped FFN: the forward's arguments, the gradient of its output. */
typedef struct moe_ffn_backward_params {
    const float       *x;           /* as moe_ffn_params                    */
    const int64_t     *token_index;
    int64_t            n_tokens;
    const int64_t     *offsets;
    int64_t            n_rows;
    const moe_experts *experts;     /* the forward's pack: gate and up are
                                       recomputed from it (its bits)       */
    const void        *w_gate;      /* the unpacked weights, in the pack's
                                       dtype: (E, d_ff, d_model), NULL if
                                       ungated                              */
    const void        *w_up;        /* (E, d_ff, d_model)                   */
    const void        *w_down;      /* (E, d_model, d_ff)                   */
    moe_wstrides       gate_strides, up_strides, down_strides; /* as
                                       moe_pack_params: zero for dense      */
    moe_act_params     act;
    const float       *gu;          /* the forward's save_gu, or NULL: gate
                                       and up recomputed from the pack      */
    const float       *dy;          /* (n_rows, d_model) d out              */
    float             *dx;          /* out, or NULL: (n_rows, d_model), the
                                       sorted rows' gradient
                                       (moe_dispatch_backward sums them)   */
    float             *d_w_gate;    /* out, or NULL: the weights' shapes;   */
    float             *d_w_up;      /*  experts without rows and units past */
    float             *d_w_down;    /*  expert_d_ff[e] get 0                */
    int64_t            d_gu_stride; /* floats from one expert's d_w_gate /
                                       d_w_up to the next, or 0: d_ff *
                                       d_model (2 * that: the halves of one
                                       fused (E, 2 d_ff, d_model) gradient) */
    float             *d_b_gate;    /* out, or NULL: (E, d_ff)              */
    float             *d_b_up;      /* out, or NULL: (E, d_ff)              */
    float             *d_b_down;    /* out, or NULL: (E, d_model)           */
    /* Expert LoRA (the forward ran with an moe_expert_lora pack): the same
       adapters unpacked, or NULL.  G, U and Y gain their low-rank terms;
       the adapters' gradients go to d_lora_* (their shapes, or NULL). */
    const moe_expert_lora_params *lora;
    float *d_lora_a_gate, *d_lora_b_gate;
    float *d_lora_a_up, *d_lora_b_up;
    float *d_lora_a_down, *d_lora_b_down;
} moe_ffn_backward_params;

/* Gate and up are recomputed, never kept: memory O(n_rows * d_ff) while it
 * runs, nothing between the forward and the backward.  A bfloat16-compute
 * pack: the products read bf16-rounded operands (dy, dG, dU, the rows, H,
 * the weights) with float32 sums, on AMX tiles where the amx set runs;
 * the activation's backward and the bias sums stay float32 (moe/reference.py
 * ffn_backward, compute_dtype).  int8-compute packs have no backward. */
moe_status moe_ffn_backward(const moe_ffn_backward_params *p);

/* Combine: d_y[position[t, j]] = weights[t, j] * d_out[t] and
 * d_weights[t, j] = <d_out[t], y[position[t, j]]> (float64 sums). */
typedef struct moe_combine_backward_params {
    const float   *y;          /* as moe_combine_params                    */
    const int64_t *position;
    const float   *weights;
    int64_t        n_rows;
    int64_t        n_tokens;
    int32_t        top_k;
    int64_t        d_model;
    const float   *d_out;      /* (n_tokens, d_model)                      */
    float         *d_y;        /* out, or NULL: (n_rows, d_model); rows no
                                  slot reads get 0                         */
    float         *d_weights;  /* out, or NULL: (n_tokens, top_k); 0 where
                                  position is -1                           */
} moe_combine_backward_params;

moe_status moe_combine_backward(const moe_combine_backward_params *p);

/* Dispatch (the gather): dx[t] = the sum of the rows that copied token t,
 * slots in order. */
typedef struct moe_dispatch_backward_params {
    const float   *d_rows;     /* (n_rows, d_model)                        */
    const int64_t *position;   /* (n_tokens, top_k) rows, -1 = none        */
    int64_t        n_rows;
    int64_t        n_tokens;
    int32_t        top_k;
    int64_t        d_model;
    float         *dx;         /* out: (n_tokens, d_model)                 */
} moe_dispatch_backward_params;

moe_status moe_dispatch_backward(const moe_dispatch_backward_params *p);

/*
 * Top-k routing: d_logits of  sum(d_weights * weights) + aux_coef * aux_loss
 * + z_coef * z_loss  for moe_route_topk with the same logits and options.
 * Per token, with the selection fixed: q = the selected scores (softmax or
 * sigmoid of the logits; softmax-after-topk: the softmax of the selected
 * logits), w = c q / sum(q) with renormalize else c q (c = routed_scaling);
 * a dropped slot's weight is the constant 0 but its score stays in the sum
 * (expert_ids -1: dropped by the capacity, or skipped after routing; the
 * selection itself is recomputed from the logits).
 * The aux loss's f (the selection's share per expert) is constant; its P
 * is the mean probability (softmax, or sigmoid / its sum).
 * router_grad STRAIGHT_THROUGH also passes a gradient through the selection:
 * the top-k mask m (1 on the selected experts) takes the derivative of the
 * scores q it was cut from (the softmax over all E, or the sigmoid), with
 * dL/dm_e = w_j d_weights_j for the expert of slot j (its weight as routed)
 * and 0 for the others (their outputs were never computed): d_logits gains
 * (dq/dlogits)^T (w * d_weights), which reaches every expert's logit.
 */
typedef struct moe_route_backward_params {
    const double     *logits;      /* (n_tokens, n_experts), as routed     */
    int64_t           n_tokens;
    int32_t           n_experts;
    moe_route_options opt;         /* as routed: router top_k              */
    const int32_t    *expert_ids;  /* (n_tokens, top_k) the forward's ids  */
    const float      *d_weights;   /* (n_tokens, top_k)                    */
    double            aux_coef;
    double            z_coef;
    moe_router_grad   router_grad; /* DEFAULT (0) or STRAIGHT_THROUGH      */
    double           *d_logits;    /* out: (n_tokens, n_experts)           */
} moe_route_backward_params;

moe_status moe_route_backward(const moe_route_backward_params *p);

/* The router linear logits = x W^T + b: dx = d_logits W, dW = d_logits^T x,
 * db = column sums (float32 products of the float64 d_logits rounded). */
typedef struct moe_router_backward_params {
    const float  *x;          /* (n_tokens, d_model)                       */
    const float  *weight;     /* (n_experts, d_model)                      */
    int64_t       n_tokens;
    int64_t       d_model;
    int32_t       n_experts;
    const double *d_logits;   /* (n_tokens, n_experts)                     */
    float        *dx;         /* out, or NULL: (n_tokens, d_model)         */
    float        *d_weight;   /* out, or NULL: (n_experts, d_model)        */
    float        *d_bias;     /* out, or NULL: (n_experts,)                */
} moe_router_backward_params;

moe_status moe_router_backward(const moe_router_backward_params *p);

/*
 * A linear y = x W^T (W in its storage dtype): dx = dy W, dW = dy^T x; or,
 * with offsets, a grouped linear as moe_linear_grouped runs it (row r of
 * group g: y_r = x_r W_g^T): dx_r = dy_r W_g, dW_g = the sum over g's rows
 * of dy_r^T x_r (0 for a group without rows).
 */
typedef struct moe_linear_backward_params {
    const float   *x;           /* (n_tokens, d_in)                        */
    const void    *w;           /* (n_groups, d_out, d_in) in dtype        */
    moe_dtype      dtype;
    int64_t        n_tokens;
    int64_t        d_in;
    int64_t        d_out;
    const int64_t *offsets;     /* (n_groups + 1,), or NULL: one group, row
                                   r = token r                             */
    int32_t        n_groups;    /* with offsets                            */
    const int64_t *token_index; /* (n_rows,) row r is x[token_index[r]],
                                   or NULL: x[r]; with offsets only        */
    const float   *dy;          /* (n_rows, d_out), n_rows = offsets[n_groups]
                                   (n_tokens without offsets)              */
    float         *dx;          /* out, or NULL: (n_rows, d_in), per row   */
    float         *d_w;         /* out, or NULL: (n_groups, d_out, d_in)   */
} moe_linear_backward_params;

moe_status moe_linear_backward(const moe_linear_backward_params *p);

/*
 * The whole layer.  forward: the params of the forward as it ran (any
 * router, null experts and skipping included; no expert LoRA), with save_logits,
 * save_y and (with shared experts) save_shared set; its routing outputs
 * (expert_ids, weights) and those saved buffers are read.
 */
typedef struct moe_layer_backward_params {
    const moe_layer_params *forward;
    int32_t      width;           /* slots per token of the forward's
                                     expert_ids / weights: its *width      */
    const void  *w_gate;          /* the routed experts' unpacked weights, */
    const void  *w_up;            /*   as moe_ffn_backward_params          */
    const void  *w_down;
    moe_wstrides gate_strides, up_strides, down_strides; /* of the three:
                                     zero for dense (moe_pack_params)      */
    const void  *shared_w_gate;   /* (shared_d_ff, d_model) or NULL        */
    const void  *shared_w_up;     /* (shared_d_ff, d_model)                */
    const void  *shared_w_down;   /* (d_model, shared_d_ff)                */
    const float *dy;              /* (n_tokens, d_model) d out             */
    double       aux_coef;        /* d loss / d aux_loss                   */
    double       z_coef;          /* d loss / d z_loss                     */
    moe_router_grad router_grad;  /* the top-k router's estimator          */
    /* out, or NULL: float32, the shapes of what they are the gradient of */
    float *dx;
    float *d_router_weight;
    float *d_router_bias;
    float *d_w_gate, *d_w_up, *d_w_down;
    int64_t d_gu_stride;          /* as moe_ffn_backward_params            */
    float *d_b_gate, *d_b_up, *d_b_down;
    float *d_shared_w_gate, *d_shared_w_up, *d_shared_w_down;
    float *d_shared_gate;         /* (d_model,)                            */
    float *d_null_values;         /* (n_null, d_model): constant null
                                     experts' rows (the others get 0)      */
    /* the forward's expert LoRA unpacked (required when it had one), and
       its gradients (as moe_ffn_backward_params) */
    const moe_expert_lora_params *lora;
    float *d_lora_a_gate, *d_lora_b_gate;
    float *d_lora_a_up, *d_lora_b_up;
    float *d_lora_a_down, *d_lora_b_down;
} moe_layer_backward_params;

moe_status moe_layer_backward(const moe_layer_backward_params *p);

/* ---- product-key expert retrieval (csrc/cpu/peer.c) ------------------ */

/*
 * PEER ("Mixture of A Million Experts", He 2024): N = n^2 single-neuron
 * experts addressed by product keys.  For token x and head h:
 *   q = W_q[h] x (d_key), halves q1, q2;  s1 = K1 q1, s2 = K2 q2   (n,)
 *   top-k of s1 (i_a) and of s2 (j_b), ties to the lower index;
 *   of the k^2 sums s1[i_a] + s2[j_b] the best k, ties to the lower expert
 *   e = i n + j; gates g = softmax of those k sums;
 *   out += sum_j g_j act(u_e . x) v_e   (heads in order, slots best first).
 * Queries, scores, u . x and the output sums are float64, so selection
 * matches a float64 reference.  Nothing of size N is formed besides the
 * weights: work is O(T H (d_key d_model + n d_key + k^2 + k (d_model +
 * d_out))).  A token's output is bitwise independent of the batch and the
 * thread count.
 */
typedef enum moe_peer_activation {
    MOE_PEER_ACTIVATION_LIST(MOE_PEER_ACTIVATION_ENTRY_)
    MOE_PEER_ACTIVATION_COUNT
} moe_peer_activation;

typedef struct moe_peer_params {
    const float *x;          /* (n_tokens, d_model); finite                 */
    int64_t      n_tokens;
    int64_t      d_model;
    int64_t      d_out;
    int32_t      n_heads;
    int32_t      d_key;      /* even; each half is d_key / 2                */
    int32_t      n_sub_keys; /* n, 1..46340 (expert ids n^2 fit int32)     */
    int32_t      top_k;      /* experts per head, 1..n_sub_keys             */
    int32_t      n_key_sets; /* 1: sub-keys shared by the heads; n_heads    */
    const float *w_query;    /* (n_heads, d_key, d_model); finite           */
    const float *sub_keys_1; /* (n_key_sets, n_sub_keys, d_key / 2); finite */
    const float *sub_keys_2; /* (n_key_sets, n_sub_keys, d_key / 2); finite */
    const float *u;          /* (n_sub_keys^2, d_model) expert input rows   */
    const float *v;          /* (n_sub_keys^2, d_out) expert output rows    */
    moe_peer_activation activation;

    float       *out;        /* out: (n_tokens, d_out)                      */
    int32_t     *expert_ids; /* out, or NULL: (n_tokens, n_heads, top_k),
                                best first                                  */
    float       *gates;      /* out, or NULL: (n_tokens, n_heads, top_k)    */
} moe_peer_params;

moe_status moe_peer_forward(const moe_peer_params *p);

/*
 * The backward of moe_peer_forward, the selection held fixed: gradients flow
 * through the selected experts' gates (their softmax), into the two sub-key
 * scores of each, the sub-keys and the query projection, and through
 * act(u_e . x) into u_e, v_e and x.  u and v get sparse gradients: one row
 * per expert the batch used (moe_peer_used lists them), never (N, d).
 * Each row, sub-key and weight gradient is summed in (token, head, slot)
 * order: the same bits for any thread count; a token's dx depends on its
 * own row.
 */
typedef struct moe_peer_backward_params {
    const moe_peer_params *forward;   /* as it ran (its outputs not read)  */
    const int32_t *expert_ids;        /* (n_tokens, n_heads, top_k), its ids */
    const float   *dy;                /* (n_tokens, d_out)                   */
    int64_t        n_used;            /* the used experts, ascending, as     */
    const int64_t *used;              /*   moe_peer_used gives them          */
    float *dx;                        /* out, or NULL: (n_tokens, d_model)   */
    float *d_w_query;                 /* out, or NULL: w_query's shape       */
    float *d_sub_keys_1;              /* out, or NULL: the sub-keys' shape   */
    float *d_sub_keys_2;
    float *d_u;                       /* out, or NULL: (n_used, d_model)     */
    float *d_v;                       /* out, or NULL: (n_used, d_out)       */
} moe_peer_backward_params;

/* The distinct ids of n entries, ascending, into used (NULL: count only);
 * *n_used: how many. */
moe_status moe_peer_used(const int32_t *ids, int64_t n, int64_t *used,
                         int64_t *n_used);
moe_status moe_peer_backward(const moe_peer_backward_params *p);

/* ---- Soft MoE and Mixture of Tokens (csrc/compose/soft_moe.c) ------------ */

/*
 * Soft MoE [Puigcerver et al. 2023], per group of m tokens X (m, d):
 *   L = X Phi / temperature          (m, E*s); slot j = e * s + i is slot i
 *                                    of expert e
 *   D = softmax of L over the m tokens (per slot),   slots = D^T X (E*s, d)
 *   Y_slots = FFN_e(slots of expert e), on the grouped expert FFN
 *   C = softmax of L over the E*s slots (per token), Y = C Y_slots (m, d)
 * With normalize, L = scale * <x / |x|, phi_j / |phi_j|> / temperature,
 * |v| = sqrt(sum v^2 + 1e-6) (the authors' l2 normalisation); the slots
 * still mix the unnormalised x.  Mixture of Tokens [Antoniak et al. 2023]
 * is the same computation with a group across the batch (tokens at one
 * position of every sequence): MOE_SOFT_GROUPS_STRIDED reads those groups
 * in place.  With m == 1, D is 1 and each token goes through every expert
 * (once, not s times), weighted by C summed over the expert's slots.
 * Logits are fp32 GEMMs; both softmaxes run in float64 (max subtracted),
 * rounded to float32 once.  Deterministic, and a group's output is bitwise
 * independent of the other groups and of the thread count.
 */
typedef enum moe_soft_grouping {
    MOE_SOFT_GROUPS_ROWS    = 0, /* x (n_groups, group_size, d): a group is
                                    consecutive rows (a sequence, an image) */
    MOE_SOFT_GROUPS_STRIDED = 1  /* x (group_size, n_groups, d): group g is
                                    rows g, g + n_groups, ... (one position
                                    of every sequence: Mixture of Tokens)   */
} moe_soft_grouping;

typedef struct moe_soft_moe_params {
    const float       *x;          /* (n_groups * group_size, d_model), rows
                                      grouped as `grouping` says            */
    int64_t            n_groups;   /* B                                     */
    int64_t            group_size; /* m: tokens mixed into each slot        */
    int64_t            d_model;
    moe_soft_grouping  grouping;
    const float       *phi;        /* (d_model, n_experts * slots_per_expert) */
    int32_t            n_experts;
    int32_t            slots_per_expert;
    int32_t            normalize;  /* l2-normalise x rows and phi columns   */
    double             scale;      /* multiplies normalised logits          */
    double             temperature; /* > 0; divides the logits (1: Soft MoE) */
    const moe_experts *experts;    /* packed (n_experts, d_ff, d_model)     */
    moe_act_params     act;
    float             *out;        /* out: (n_groups * group_size, d_model),
                                      rows as x                             */
    float             *dispatch;   /* out, or NULL: (n_tokens, E*s) D, rows
                                      as x; sums to 1 over a group's tokens */
    float             *combine;    /* out, or NULL: (n_tokens, E*s) C; each
                                      row sums to 1                         */
    float             *save_ys;    /* out, or NULL: the experts' outputs for
                                      moe_soft_moe_backward, (n_ys, d_model):
                                      n_ys = n_groups * E*s (group_size > 1)
                                      or n_tokens * E (group_size 1)        */
} moe_soft_moe_params;

moe_status moe_soft_moe_forward(const moe_soft_moe_params *p);

/*
 * The backward of moe_soft_moe_forward: gradients of sum(dy * out) through
 * the combine and dispatch softmaxes, the slot and combine products, the
 * experts (gate and up recomputed, as moe_ffn_backward) and the logits
 * (with normalize, through both l2 norms and the scale).  The forward's
 * softmaxes and slots are recomputed (their bits); its expert outputs come
 * from save_ys.  Same bits for any thread count.
 */
typedef struct moe_soft_moe_backward_params {
    const moe_soft_moe_params *forward; /* as it ran (outputs not read)   */
    const float *ys;          /* its save_ys                               */
    const void  *w_gate;      /* the unpacked expert weights, in the      */
    const void  *w_up;        /*   pack's dtype (w_gate NULL if ungated)  */
    const void  *w_down;
    const float *dy;          /* (n_tokens, d_model), rows as x            */
    float       *dx;          /* out, or NULL: (n_tokens, d_model)         */
    float       *d_phi;       /* out, or NULL: (d_model, E*s)              */
    double      *d_scale;     /* out, or NULL: d / d scale (0 without
                                 normalize)                                */
    float       *d_w_gate;    /* out, or NULL: the weights' shapes         */
    float       *d_w_up;
    float       *d_w_down;
} moe_soft_moe_backward_params;

moe_status moe_soft_moe_backward(const moe_soft_moe_backward_params *b);

/* ---- CUDA backend (loaded at run time, see cuda/moe_cuda.h) ---------- */

/* Whether moe/_moe_cuda.so was found and loaded. */
int         moe_cuda_built(void);
/* Usable devices: 0 without the library, a driver or a GPU. */
int         moe_cuda_devices(void);
/* Why the library is not loaded ("" when it is). */
const char *moe_cuda_unavailable_reason(void);

struct moe_cuda_route_params;
/* The fused router on device memory (cuda/moe_cuda.h); asynchronous. */
moe_status  moe_cuda_route(const struct moe_cuda_route_params *p,
                           void *stream);
/* The CUDA backend's message for its last failure on this thread. */
const char *moe_cuda_error(void);

/* ---- build information ----------------------------------------------- */

/* Compiler that built the core, e.g. "gcc 12.2.0". */
const char *moe_build_compiler(void);
/* Space-separated CPU features found by cpuid ("avx2 fma avx512f ..."). */
const char *moe_cpu_features(void);
/* The CPU kernel set in use: "amx", "avx512bf16", "avx512", "avx2" or
 * "scalar". */
const char *moe_cpu_isa(void);
/* What its bf16-compute kernel multiplies with: "amx" (tiles), "vdpbf16ps"
 * or "fma" (bf16 values widened to fp32, two FMAs per pair). */
const char *moe_cpu_bf16_dot(void);
/* What its int8-compute kernels (quantized weights) sum with: "amx"
 * (AMX-INT8 tiles from 4 rows an expert for int8 weights, 16 for 4-bit;
 * VPDPBUSD below), "vpdpbusd",
 * "vpmaddubsw" (4-bit weights; int8 weights portable) or "portable". */
const char *moe_cpu_int8_dot(void);

#ifdef __cplusplus
}
#endif

#endif /* MOE_H */
