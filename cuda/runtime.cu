/*
 * runtime.cu - the CUDA backend's entry points that are not kernels: ABI,
 * device count, and the thread-local last error.
 *
 * NOT YET RUN ON A GPU (compiled only).
 */
#include "moe_cuda.h"
#include "moe_cuda_impl.cuh"

#include <stdio.h>

static thread_local char moe_cuda_msg[512];

int
moe_cuda_fail(int status, const char *file, int line, const char *what)
{
    cudaError_t err = cudaGetLastError(); /* clears a sticky launch error */
    snprintf(moe_cuda_msg, sizeof(moe_cuda_msg), "%s failed (%s:%d)%s%s", what,
             file, line, err != cudaSuccess ? ": " : "",
             err != cudaSuccess ? cudaGetErrorString(err) : "");
    return status;
}

extern "C" int
moe_cuda_abi(void)
{
    return MOE_CUDA_ABI;
}

extern "C" int
moe_cuda_device_count(void)
{
    int n = 0;
    /* No driver / no GPU: an error, which here just means none. */
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" const char *
moe_cuda_last_error(void)
{
    return moe_cuda_msg;
}
