/* cpu/gemm_avx512sim.c - the AVX-512 set's 12 x 32 tiles and layouts built
 * for AVX2 (GCC splits each 16-float vector in two): picked only by
 * MOE_ISA=avx512sim, so that the AVX-512 kernels' tiling, packing and bf16
 * interleave are tested on CPUs without AVX-512.  Slower than avx2. */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#define MOE_K_NAME moe_kernels_avx512sim
#define MOE_K_ISA  "avx512sim"
#define MOE_K_VL   16
#define MOE_K_MR   12
#define MOE_K_NV   2
#include "gemm.inc"
#else
typedef int moe_cpu_gemm_avx512sim_unused;
#endif
