/*
 * route.cu - fused routing: one warp per token computes the scores, the
 * group-limited top-k and the weights in one pass over shared memory.  Ties
 * go to the lower index (of expert and of group), as on the CPU: every
 * warp-wide argmax compares (value, -index) pairs.
 *
 * NOT YET RUN ON A GPU (compiled only).
 */
#include "moe_cuda.h"
#include "moe_cuda_impl.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

namespace {

constexpr int kWarps = 4; /* warps (tokens) per block */

__device__ __forceinline__ float
load_logit(const void *p, int dtype, int64_t i)
{
    switch (dtype) {
    case MOE_CUDA_BF16:
        return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
    case MOE_CUDA_F16:
        return __half2float(static_cast<const __half *>(p)[i]);
    default:
        return static_cast<const float *>(p)[i];
    }
}

/* (v, i) beats (w, j): larger value, or equal and lower index; NaN loses. */
__device__ __forceinline__ bool
beats(float v, int i, float w, int j)
{
    if (isnan(v)) {
        return false;
    }
    if (isnan(w)) {
        return true;
    }
    return v > w || (v == w && i < j);
}

/* Warp-wide best (value, index); every lane gets it.  Index -1 = none. */
__device__ __forceinline__ void
warp_best(float &v, int &i)
{
    for (int off = 16; off > 0; off >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, off);
        int j = __shfl_xor_sync(0xffffffffu, i, off);
        if (j >= 0 && (i < 0 || beats(w, j, v, i))) {
            v = w;
            i = j;
        }
    }
}

__device__ __forceinline__ float
warp_sum(float v)
{
    for (int off = 16; off > 0; off >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

__device__ __forceinline__ float
warp_max(float v)
{
    for (int off = 16; off > 0; off >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    return v;
}

/*
 * Shared memory per warp: score (E), sel (E) with -inf once an expert is
 * taken or its group is out, gsel (n_groups).
 */
__global__ void
route_kernel(moe_cuda_route_params p)
{
    extern __shared__ float smem[];
    const int E = p.n_experts, G = p.n_groups, lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    float *score = smem + warp * (2 * E + G);
    float *sel = score + E;
    float *gsel = sel + E;

    if (t >= p.n_tokens) {
        return;
    }
    /* 1. scores */
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) {
        float l = load_logit(p.logits, p.dtype, t * E + e);
        score[e] = l;
        m = fmaxf(m, l);
    }
    m = warp_max(m);
    if (p.scoring == MOE_CUDA_SCORING_SOFTMAX) {
        float s = 0.0f;
        for (int e = lane; e < E; e += 32) {
            float z = expf(score[e] - m);
            score[e] = z;
            s += z;
        }
        s = warp_sum(s);
        for (int e = lane; e < E; e += 32) {
            score[e] /= s;
        }
    }
    else if (p.scoring == MOE_CUDA_SCORING_SIGMOID) {
        for (int e = lane; e < E; e += 32) {
            score[e] = 1.0f / (1.0f + expf(-score[e]));
        }
    }
    /* (softmax after top-k: selection on the logits, weights below) */
    for (int e = lane; e < E; e += 32) {
        sel[e] = score[e] + (p.expert_bias ? p.expert_bias[e] : 0.0f);
    }
    __syncwarp();

    /* 2. group-limited: keep the topk_groups groups with the best sum of
     *    their top-2 selection scores */
    if (G > 1) {
        const int per = E / G;
        for (int g = lane; g < G; g += 32) {
            float a = -INFINITY, b = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                float v = sel[e];
                if (v > a) {
                    b = a;
                    a = v;
                }
                else if (v > b) {
                    b = v;
                }
            }
            gsel[g] = per >= 2 ? a + b : a;
        }
        __syncwarp();
        for (int r = 0; r < p.topk_groups; r++) {
            float v = -INFINITY;
            int i = -1;
            for (int g = lane; g < G; g += 32) {
                /* +inf marks a group already kept */
                if (gsel[g] != INFINITY && (i < 0 || beats(gsel[g], g, v, i))) {
                    v = gsel[g];
                    i = g;
                }
            }
            warp_best(v, i);
            if (lane == 0 && i >= 0) {
                gsel[i] = INFINITY; /* kept */
            }
            __syncwarp();
        }
        for (int e = lane; e < E; e += 32) {
            if (gsel[e / per] != INFINITY) {
                sel[e] = -INFINITY;
            }
        }
        __syncwarp();
    }

    /* 3. top-k: k warp-wide argmaxes; the winner is taken out */
    float wsum = 0.0f, mx = -INFINITY;
    int my_id = -1;
    float my_w = 0.0f;
    for (int j = 0; j < p.top_k; j++) {
        float v = -INFINITY;
        int i = -1;
        for (int e = lane; e < E; e += 32) {
            /* -inf: taken, or outside the kept groups */
            if (sel[e] != -INFINITY && (i < 0 || beats(sel[e], e, v, i))) {
                v = sel[e];
                i = e;
            }
        }
        warp_best(v, i);
        if (i < 0) {
            i = 0; /* only with NaN scores: unspecified, but in range */
        }
        if (lane == j) {
            my_id = i;
            my_w = score[i];
        }
        __syncwarp();
        if (lane == 0) {
            sel[i] = -INFINITY;
        }
        mx = fmaxf(mx, score[i]);
        __syncwarp();
    }
    /* 4. weights */
    if (p.scoring == MOE_CUDA_SCORING_SOFTMAX_AFTER_TOPK) {
        my_w = lane < p.top_k ? expf(my_w - mx) : 0.0f;
        wsum = warp_sum(my_w);
        my_w /= wsum;
    }
    else if (p.renormalize) {
        wsum = warp_sum(lane < p.top_k ? my_w : 0.0f);
        if (wsum > 0.0f) {
            my_w /= wsum;
        }
    }
    if (lane < p.top_k) {
        p.expert_ids[t * p.top_k + lane] = my_id;
        p.weights[t * p.top_k + lane] = my_w * p.routed_scaling;
    }
}

} // namespace

extern "C" int
moe_cuda_route_topk(const moe_cuda_route_params *p, void *stream)
{
    if (p->n_experts < 1 || p->n_experts > 1024 || p->top_k < 1 ||
        p->top_k > 32 || p->top_k > p->n_experts || p->n_groups < 1 ||
        p->n_experts % p->n_groups != 0 || p->topk_groups < 1 ||
        p->topk_groups > p->n_groups || p->n_tokens < 0 ||
        p->topk_groups * (p->n_experts / p->n_groups) < p->top_k) {
        return moe_cuda_fail(MOE_CUDA_STATUS_INVALID_ARG, __FILE__, __LINE__,
                             "route: n_experts in 1..1024, top_k in "
                             "1..min(32, n_experts), n_groups dividing "
                             "n_experts, topk_groups covering top_k");
    }
    if (p->n_tokens == 0) {
        return 0;
    }
    const size_t smem = sizeof(float) * kWarps *
                        (2 * static_cast<size_t>(p->n_experts) + p->n_groups);
    const unsigned blocks =
        static_cast<unsigned>((p->n_tokens + kWarps - 1) / kWarps);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (smem > 48 * 1024) {
        MOE_CUDA_TRY(cudaFuncSetAttribute(
            route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
            static_cast<int>(smem)));
    }
    route_kernel<<<blocks, 32 * kWarps, smem, s>>>(*p);
    MOE_CUDA_TRY(cudaGetLastError());
    return 0;
}
