/*
 * dispatch.cu - device-side dispatch plan and combine, no host
 * synchronisation: histogram -> exclusive scan -> stable scatter, and a
 * weighted combine in slot order (no atomics in the data path, so results
 * are deterministic).
 *
 * The scatter is stable because one block walks the (token, slot) pairs in
 * order per expert: block e scans all pairs and writes the ones of expert e
 * (O(T k E / 32) reads but no atomics; fine for the routing sizes of MoE
 * layers, E <= 1024, and it keeps the CPU's row order).
 *
 * NOT YET RUN ON A GPU (compiled only).
 */
#include "moe_cuda.h"
#include "moe_cuda_impl.cuh"

#include <stdint.h>

namespace {

constexpr int kThreads = 256;

/* counts[e] = pairs routed to e; one block per expert, a block-wide sum. */
__global__ void
count_kernel(const int32_t *ids, int64_t n, int64_t *counts)
{
    __shared__ int64_t part[kThreads];
    const int e = blockIdx.x;
    int64_t c = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        c += ids[i] == e;
    }
    part[threadIdx.x] = c;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            part[threadIdx.x] += part[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        counts[e] = part[0];
    }
}

/* offsets[e + 1] = sum of counts[0..e]; one thread (E <= a few thousand). */
__global__ void
scan_kernel(const int64_t *counts, int32_t E, int64_t *offsets)
{
    int64_t acc = 0;
    offsets[0] = 0;
    for (int e = 0; e < E; e++) {
        acc += counts[e];
        offsets[e + 1] = acc;
    }
}

/*
 * Block e writes expert e's rows in pair order: each chunk of kThreads pairs
 * is ranked with a block-wide exclusive scan of the match flags.
 */
__global__ void
scatter_kernel(const int32_t *ids, int64_t n, int32_t k,
               const int64_t *offsets, int64_t *token_index,
               int64_t *position)
{
    __shared__ int64_t flag[kThreads];
    __shared__ int64_t base;
    const int e = blockIdx.x;
    if (threadIdx.x == 0) {
        base = offsets[e];
    }
    __syncthreads();
    for (int64_t i0 = 0; i0 < n; i0 += kThreads) {
        const int64_t i = i0 + threadIdx.x;
        const int match = i < n && ids[i] == e;
        flag[threadIdx.x] = match;
        __syncthreads();
        /* inclusive scan (Hillis-Steele) */
        for (int s = 1; s < kThreads; s <<= 1) {
            int64_t v = threadIdx.x >= s ? flag[threadIdx.x - s] : 0;
            __syncthreads();
            flag[threadIdx.x] += v;
            __syncthreads();
        }
        if (match) {
            const int64_t row = base + flag[threadIdx.x] - 1;
            token_index[row] = i / k;
            position[i] = row;
        }
        else if (i < n && ids[i] < 0) {
            position[i] = -1;
        }
        __syncthreads();
        if (threadIdx.x == kThreads - 1) {
            base += flag[kThreads - 1];
        }
        __syncthreads();
    }
}

__global__ void
combine_kernel(moe_cuda_combine_params p)
{
    const int64_t t = blockIdx.x;
    for (int64_t i = threadIdx.x; i < p.d_model; i += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < p.top_k; j++) {
            const int64_t r = p.position[t * p.top_k + j];
            if (r >= 0) {
                acc += p.weights[t * p.top_k + j] * p.y[r * p.d_model + i];
            }
        }
        p.out[t * p.d_model + i] = acc;
    }
}

} // namespace

extern "C" size_t
moe_cuda_dispatch_workspace(int64_t n_tokens, int32_t top_k, int32_t n_experts)
{
    (void)n_tokens;
    (void)top_k;
    return sizeof(int64_t) * static_cast<size_t>(n_experts); /* counts */
}

extern "C" int
moe_cuda_dispatch(const moe_cuda_dispatch_params *p, void *stream)
{
    if (p->n_experts < 1 || p->top_k < 1 || p->n_tokens < 0 ||
        p->workspace == nullptr) {
        return moe_cuda_fail(MOE_CUDA_STATUS_INVALID_ARG, __FILE__, __LINE__,
                             "dispatch: n_experts >= 1, top_k >= 1 and a "
                             "workspace are required");
    }
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int64_t n = p->n_tokens * p->top_k;
    int64_t *counts = static_cast<int64_t *>(p->workspace);
    count_kernel<<<p->n_experts, kThreads, 0, s>>>(p->expert_ids, n, counts);
    MOE_CUDA_TRY(cudaGetLastError());
    scan_kernel<<<1, 1, 0, s>>>(counts, p->n_experts, p->offsets);
    MOE_CUDA_TRY(cudaGetLastError());
    if (n > 0) {
        scatter_kernel<<<p->n_experts, kThreads, 0, s>>>(
            p->expert_ids, n, p->top_k, p->offsets, p->token_index,
            p->position);
        MOE_CUDA_TRY(cudaGetLastError());
    }
    return 0;
}

extern "C" int
moe_cuda_combine(const moe_cuda_combine_params *p, void *stream)
{
    if (p->n_tokens < 0 || p->top_k < 1 || p->d_model < 0) {
        return moe_cuda_fail(MOE_CUDA_STATUS_INVALID_ARG, __FILE__, __LINE__,
                             "combine: n_tokens >= 0, top_k >= 1, d_model >= 0");
    }
    if (p->n_tokens == 0 || p->d_model == 0) {
        return 0;
    }
    combine_kernel<<<static_cast<unsigned>(p->n_tokens), 256, 0,
                     static_cast<cudaStream_t>(stream)>>>(*p);
    MOE_CUDA_TRY(cudaGetLastError());
    return 0;
}
