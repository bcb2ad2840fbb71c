/*
 * moe_cuda_impl.cuh - private helpers of the CUDA backend: error recording
 * and the MOE_CUDA_TRY / MOE_CUBLAS_TRY macros (they record #expr, file and
 * line and return a status).
 */
#ifndef MOE_CUDA_IMPL_CUH
#define MOE_CUDA_IMPL_CUH

#include <cuda_runtime.h>

/* The core's moe_status values (csrc/moe.h), without including it. */
enum {
    MOE_CUDA_STATUS_OK = 0,
    MOE_CUDA_STATUS_INVALID_ARG = 1,
    MOE_CUDA_STATUS_ALLOC = 3,
    MOE_CUDA_STATUS_UNSUPPORTED = 4,
    MOE_CUDA_STATUS_INTERNAL = 5
};

/* Record "what (file:line)" as this thread's last error; returns status. */
int moe_cuda_fail(int status, const char *file, int line, const char *what);

#define MOE_CUDA_TRY(expr)                                                  \
    do {                                                                    \
        cudaError_t moe_cuda_err_ = (expr);                                 \
        if (moe_cuda_err_ != cudaSuccess) {                                 \
            return moe_cuda_fail(moe_cuda_err_ == cudaErrorMemoryAllocation \
                                     ? MOE_CUDA_STATUS_ALLOC                \
                                     : MOE_CUDA_STATUS_INTERNAL,            \
                                 __FILE__, __LINE__,                        \
                                 #expr);                                    \
        }                                                                   \
    } while (0)

#endif /* MOE_CUDA_IMPL_CUH */
