/*
 * runtime/status.c - status names, the thread-local last-error message, checked
 * allocation and build information.  A library must never print or exit:
 * errors travel up as a moe_status plus the message recorded here.
 */
#include "moe_impl.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if defined(_MSC_VER)
#define MOE_THREAD_LOCAL __declspec(thread)
#else
#define MOE_THREAD_LOCAL _Thread_local
#endif

static MOE_THREAD_LOCAL char moe_error_buf[512];

const char *
moe_status_str(moe_status status)
{
    switch (status) {
    case MOE_STATUS_OK:          return "MOE_STATUS_OK";
    case MOE_STATUS_INVALID_ARG: return "MOE_STATUS_INVALID_ARG";
    case MOE_STATUS_NONFINITE:   return "MOE_STATUS_NONFINITE";
    case MOE_STATUS_ALLOC:       return "MOE_STATUS_ALLOC";
    case MOE_STATUS_UNSUPPORTED: return "MOE_STATUS_UNSUPPORTED";
    case MOE_STATUS_INTERNAL:    return "MOE_STATUS_INTERNAL";
    case MOE_STATUS_INTERRUPTED: return "MOE_STATUS_INTERRUPTED";
    }
    return "MOE_STATUS_UNKNOWN";
}

const char *
moe_last_error(void)
{
    return moe_error_buf;
}

moe_status
moe_set_error(moe_status st, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(moe_error_buf, sizeof(moe_error_buf), fmt, ap);
    va_end(ap);
    return st;
}

void *
moe_alloc(size_t count, size_t size)
{
    void *ptr;

    if (size != 0 && count > SIZE_MAX / size) {
        moe_set_error(MOE_STATUS_ALLOC, "allocation of %zu x %zu bytes "
                      "overflows size_t", count, size);
        return NULL;
    }
    /* 64-byte aligned (a cache line: the kernels' vector loads of packed
     * panels never straddle two); always at least a byte. */
    if (posix_memalign(&ptr, 64, count * size != 0 ? count * size : 1) != 0) {
        ptr = NULL;
    }
    if (ptr == NULL) {
        moe_set_error(MOE_STATUS_ALLOC, "out of memory allocating %zu bytes",
                      count * size);
    }
    return ptr;
}

/*
 * Big, long-lived buffers (packed weights): 2 MiB aligned and, where the
 * kernel offers transparent huge pages on request (madvise mode), backed by
 * them, so that streaming the weights of a decode step walks one page per
 * 2 MiB instead of one per 4 KiB.  Freed with free().
 */
void *
moe_alloc_big(size_t count, size_t size)
{
    const size_t huge = (size_t)2 << 20;
    size_t bytes;
    void *ptr = NULL;

    if (size != 0 && count > SIZE_MAX / size) {
        return moe_alloc(count, size); /* its error */
    }
    bytes = count * size;
    if (bytes < huge || bytes > SIZE_MAX - huge) {
        return moe_alloc(count, size);
    }
#if defined(__linux__)
    bytes = (bytes + huge - 1) / huge * huge;
    if (posix_memalign(&ptr, huge, bytes) != 0) {
        return moe_alloc(count, size);
    }
#if defined(MADV_HUGEPAGE)
    (void)madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
    return ptr;
#else
    return moe_alloc(count, size);
#endif
}

int
moe_activation_is_gated(moe_activation activation)
{
    return moe_activation_gated(activation);
}

/* ---- build information ------------------------------------------------ */

const char *
moe_build_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>

/* XCR0 tells whether the OS saves the AVX / AVX-512 register state. */
static uint64_t
moe_xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

const char *
moe_cpu_features(void)
{
    static char buf[256];
    static int done = 0;

    if (done) {
        return buf;
    }
    buf[0] = '\0';
#if defined(__x86_64__) && defined(__GNUC__)
    {
        unsigned a, b, c, d;
        unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
        int os_avx = 0, os_avx512 = 0, os_amx = 0;

        if (__get_cpuid(1, &a, &b, &c, &d)) {
            if (c & (1u << 27)) { /* OSXSAVE */
                uint64_t xcr0 = moe_xgetbv0();
                os_avx = (xcr0 & 0x6) == 0x6;
                os_avx512 = (xcr0 & 0xe6) == 0xe6;
                /* XTILECFG and XTILEDATA (Linux still wants a permission
                 * request before the first tile instruction: gemm_amx.c) */
                os_amx = (xcr0 & 0x60000) == 0x60000;
            }
            if (d & (1u << 26)) strcat(buf, "sse2 ");
            if (os_avx && (c & (1u << 28))) strcat(buf, "avx ");
            if (os_avx && (c & (1u << 12))) strcat(buf, "fma ");
            if (c & (1u << 29)) strcat(buf, "f16c ");
        }
        if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) {
            if (os_avx && (b7 & (1u << 5))) strcat(buf, "avx2 ");
            if (os_avx512 && (b7 & (1u << 16))) strcat(buf, "avx512f ");
            if (os_avx512 && (b7 & (1u << 30))) strcat(buf, "avx512bw ");
            if (os_avx512 && (b7 & (1u << 31))) strcat(buf, "avx512vl ");
            if (os_avx512 && (c7 & (1u << 11))) strcat(buf, "avx512vnni ");
            if (__get_cpuid_count(7, 1, &a71, &b, &c, &d) && os_avx512 &&
                (a71 & (1u << 5))) {
                strcat(buf, "avx512bf16 ");
            }
            if (os_amx && (d7 & (1u << 22))) strcat(buf, "amx-bf16 ");
            if (os_amx && (d7 & (1u << 24))) strcat(buf, "amx-tile ");
            if (os_amx && (d7 & (1u << 25))) strcat(buf, "amx-int8 ");
        }
    }
#elif defined(__aarch64__)
    strcat(buf, "neon ");
#endif
    if (buf[0] != '\0') {
        buf[strlen(buf) - 1] = '\0';
    }
    done = 1;
    return buf;
}
