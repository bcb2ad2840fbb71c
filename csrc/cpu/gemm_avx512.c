/* cpu/gemm_avx512.c - micro-kernels for AVX-512F (+ F16C): 12 x 32 tiles. */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx2,fma,f16c,prefer-vector-width=512")
#include <immintrin.h>
#define MOE_K_CVTPH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define MOE_K_WIDEN(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define MOE_K_U8TOI32(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define MOE_K_S8TOI32(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define MOE_K_RINT(v)                                                       \
    _mm512_roundscale_ps((__m512)(v),                          \
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MOE_K_FMA(a, b, c)                                                   \
    _mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c))
#define MOE_K_NAME moe_kernels_avx512
#define MOE_K_ISA  "avx512"
#define MOE_K_VL   16
#define MOE_K_MR   12
#define MOE_K_NV   2
#include "gemm.inc"
#else
typedef int moe_cpu_gemm_avx512_unused;
#endif
