/*
 * moe_cuda.h - the CUDA backend behind a small extern "C" interface.  It is
 * built by nvcc into its own shared library (moe/_moe_cuda*.so), which the C
 * core loads at run time (csrc/runtime/cuda_loader.c): the package imports and
 * runs without CUDA, a driver or a GPU.  Nothing here includes a CUDA header,
 * so csrc/ can include this file.
 *
 * Status codes are the core's moe_status values; moe_cuda_last_error() gives
 * the detail (the failing call, file and line) of the calling thread's last
 * error.  Every pointer in a params struct is device memory; stream is a
 * cudaStream_t (NULL: the default stream).  Calls are asynchronous on the
 * stream unless they say otherwise.
 *
 * NOT YET RUN ON A GPU: everything below compiles (sm_80, sm_90, PTX) but has
 * never executed; see the CUDA issue's closing note.
 */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "moe_options.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility: these are its exports. */
#if defined(__GNUC__)
#define MOE_CUDA_EXPORT __attribute__((visibility("default")))
#else
#define MOE_CUDA_EXPORT
#endif

/* The ABI version of this interface: the loader refuses a library whose
 * moe_cuda_abi() differs. */
#define MOE_CUDA_ABI 1

MOE_CUDA_EXPORT int         moe_cuda_abi(void);
/* Devices usable by this process (0 without a driver or GPU); never fails. */
MOE_CUDA_EXPORT int         moe_cuda_device_count(void);
MOE_CUDA_EXPORT const char *moe_cuda_last_error(void);

/* Scoring of the fused router: moe_scoring's values, from the same list
 * (csrc/moe_options.h), without moe.h. */
#define MOE_CUDA_SCORING_ENTRY_(name, str) MOE_CUDA_SCORING_##name,
enum { MOE_SCORING_LIST(MOE_CUDA_SCORING_ENTRY_) MOE_CUDA_SCORING_COUNT };
#undef MOE_CUDA_SCORING_ENTRY_

/* Element types of device logits. */
enum {
    MOE_CUDA_F32 = 0,
    MOE_CUDA_BF16 = 1,
    MOE_CUDA_F16 = 2
};

/*
 * Fused routing, one warp per token: logits -> softmax / sigmoid -> selection
 * bias -> group-limited top-k -> renormalise / scale -> ids and weights, in
 * one kernel, with the CPU's tie rule (the lower expert / group index wins).
 * n_experts up to 1024, top_k up to 32; computed in fp32.
 */
typedef struct moe_cuda_route_params {
    const void  *logits;       /* (n_tokens, n_experts), dtype below        */
    int          dtype;        /* MOE_CUDA_F32 / BF16 / F16                 */
    const float *expert_bias;  /* (n_experts,) selection only, or NULL      */
    int64_t      n_tokens;
    int32_t      n_experts;
    int32_t      top_k;
    int32_t      n_groups;     /* divides n_experts; 1 = no groups          */
    int32_t      topk_groups;
    int32_t      scoring;      /* MOE_CUDA_SCORING_*                        */
    int32_t      renormalize;
    float        routed_scaling;
    int32_t     *expert_ids;   /* out: (n_tokens, top_k)                    */
    float       *weights;      /* out: (n_tokens, top_k)                    */
} moe_cuda_route_params;

MOE_CUDA_EXPORT int moe_cuda_route_topk(const moe_cuda_route_params *p,
                                        void *stream);

/*
 * Device-side dispatch plan with no host synchronisation: a histogram of the
 * ids (-1 skipped), exclusive offsets, and a stable permutation (rows of an
 * expert in (token, slot) order, as on the CPU).  counts, offsets,
 * token_index and position as in moe_dispatch_params; workspace: at least
 * moe_cuda_dispatch_workspace(n_tokens, top_k, n_experts) bytes.
 */
typedef struct moe_cuda_dispatch_params {
    const int32_t *expert_ids;  /* (n_tokens, top_k), -1 = not dispatched   */
    int64_t        n_tokens;
    int32_t        top_k;
    int32_t        n_experts;
    int64_t       *offsets;     /* out: (n_experts + 1,)                    */
    int64_t       *token_index; /* out: (n_tokens * top_k,) valid to
                                   offsets[n_experts]                       */
    int64_t       *position;    /* out: (n_tokens, top_k), -1 = skipped     */
    void          *workspace;
} moe_cuda_dispatch_params;

MOE_CUDA_EXPORT size_t moe_cuda_dispatch_workspace(int64_t n_tokens,
                                                   int32_t top_k,
                                                   int32_t n_experts);
MOE_CUDA_EXPORT int moe_cuda_dispatch(const moe_cuda_dispatch_params *p,
                                      void *stream);

/*
 * out[t] = sum_j weights[t, j] * y[position[t, j]] in slot order (no atomics,
 * so the result is deterministic); y, out fp32 (n_rows, d) / (n_tokens, d).
 */
typedef struct moe_cuda_combine_params {
    const float   *y;
    const int64_t *position;   /* (n_tokens, top_k), -1 = skip              */
    const float   *weights;    /* (n_tokens, top_k)                         */
    int64_t        n_tokens;
    int32_t        top_k;
    int64_t        d_model;
    float         *out;
} moe_cuda_combine_params;

MOE_CUDA_EXPORT int moe_cuda_combine(const moe_cuda_combine_params *p,
                                     void *stream);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CUDA_H */
