/*
 * runtime/cuda_loader.c - finds the CUDA backend at run time.  The library
 * moe/_moe_cuda.so (built by nvcc when the toolkit was there, see setup.py)
 * sits beside this extension; it is opened on first use with dlopen, its
 * entry points resolved through cuda/moe_cuda.h's names, and its ABI
 * checked.  A missing library, driver or GPU only means "no CUDA": the CPU
 * backend always works.
 */
#define _GNU_SOURCE /* dladdr */
#include "moe_impl.h"
#include "cuda/moe_cuda.h"

#include <stdio.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#include <pthread.h>

static moe_cuda_api moe_cuda_table;
static int moe_cuda_state; /* 0: not tried, 1: loaded, -1: absent */
static char moe_cuda_why[512];
static pthread_once_t moe_cuda_once = PTHREAD_ONCE_INIT;

static void
moe_cuda_load(void)
{
    Dl_info info;
    char path[4096];
    const char *slash;
    void *lib;
    int (*abi)(void);

    moe_cuda_state = -1;
    if (!dladdr((void *)&moe_cuda_load, &info) || info.dli_fname == NULL) {
        snprintf(moe_cuda_why, sizeof(moe_cuda_why), "cannot locate moe._C");
        return;
    }
    slash = strrchr(info.dli_fname, '/');
    snprintf(path, sizeof(path), "%.*s_moe_cuda.so",
             slash ? (int)(slash - info.dli_fname + 1) : 0, info.dli_fname);
    lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *e = dlerror();
        snprintf(moe_cuda_why, sizeof(moe_cuda_why), "%.400s", e ? e : path);
        return;
    }
    *(void **)&abi = dlsym(lib, "moe_cuda_abi");
    if (abi == NULL || abi() != MOE_CUDA_ABI) {
        snprintf(moe_cuda_why, sizeof(moe_cuda_why), "%.400s: ABI %d, expected %d",
                 path, abi ? abi() : -1, MOE_CUDA_ABI);
        dlclose(lib);
        return;
    }
#define MOE_CUDA_SYM(name)                                                  \
    *(void **)&moe_cuda_table.name = dlsym(lib, "moe_cuda_" #name);         \
    if (moe_cuda_table.name == NULL) {                                      \
        snprintf(moe_cuda_why, sizeof(moe_cuda_why), "%.400s: no moe_cuda_%s",\
                 path, #name);                                              \
        dlclose(lib);                                                       \
        return;                                                             \
    }
    MOE_CUDA_SYM(device_count)
    MOE_CUDA_SYM(last_error)
    MOE_CUDA_SYM(route_topk)
    MOE_CUDA_SYM(dispatch_workspace)
    MOE_CUDA_SYM(dispatch)
    MOE_CUDA_SYM(combine)
#undef MOE_CUDA_SYM
    moe_cuda_state = 1;
}

const moe_cuda_api *
moe_cuda(void)
{
    pthread_once(&moe_cuda_once, moe_cuda_load);
    return moe_cuda_state == 1 ? &moe_cuda_table : NULL;
}

const char *
moe_cuda_unavailable_reason(void)
{
    pthread_once(&moe_cuda_once, moe_cuda_load);
    return moe_cuda_state == 1 ? "" : moe_cuda_why;
}

#else

const moe_cuda_api *
moe_cuda(void)
{
    return NULL;
}

const char *
moe_cuda_unavailable_reason(void)
{
    return "no dlopen on this platform";
}

#endif

int
moe_cuda_built(void)
{
    return moe_cuda() != NULL;
}

int
moe_cuda_devices(void)
{
    const moe_cuda_api *api = moe_cuda();
    return api != NULL ? api->device_count() : 0;
}

const char *
moe_cuda_error(void)
{
    const moe_cuda_api *api = moe_cuda();
    return api != NULL ? api->last_error() : moe_cuda_unavailable_reason();
}
